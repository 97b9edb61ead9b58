"""Exceptions raised by npcalls.

Every error npcalls raises derives from :class:`NpcallsError`, and most also
derive from the built-in exception a caller would naturally catch
(``ValueError`` for bad input, ``FileNotFoundError`` for a missing table, ...),
so ``except ValueError`` keeps working for code that does not know npcalls.
"""

from __future__ import annotations

from typing import Any, Sequence

__all__ = [
    "NpcallsError",
    "InvalidKeyError",
    "BatchKeyError",
    "InvalidTimestampError",
    "TableFullError",
    "FormatError",
    "TableNotFoundError",
    "TableExistsError",
    "ReadOnlyError",
    "TableClosedError",
    "TableRemovedError",
]


class NpcallsError(Exception):
    """Base class of every error raised by npcalls."""


class InvalidKeyError(NpcallsError, ValueError):
    """A Call-ID that cannot be stored: empty, too long, holding NUL, or not str/bytes.

    Attributes
    ----------
    key : object
        The offending key as given (possibly shortened in the message).
    reason : str
        What is wrong with it.
    """

    def __init__(self, key: Any, reason: str) -> None:
        self.key = key
        self.reason = reason
        super().__init__(f"invalid Call-ID {_short(key)}: {reason}")


class BatchKeyError(InvalidKeyError):
    """Some keys of a batch were invalid; every other row of the batch was applied.

    Attributes
    ----------
    positions : numpy.ndarray
        Positions (0-based, in the batch) of the rejected keys, ascending.
    reasons : list of str
        One reason per position.
    result : object
        What the batch call would have returned, with the rejected rows
        reported as not applied (``False`` / not found).
    """

    def __init__(self, positions: Any, reasons: Sequence[str], keys: Any, result: Any = None) -> None:
        self.positions = positions
        self.reasons = list(reasons)
        self.result = result
        shown = []
        for p, r in list(zip(positions, self.reasons))[:5]:
            shown.append(f"#{int(p)} {_short(keys[int(p)])}: {r}")
        more = f" (and {len(self.reasons) - 5} more)" if len(self.reasons) > 5 else ""
        NpcallsError.__init__(
            self,
            f"{len(self.reasons)} invalid Call-ID(s) in batch, rest applied: " + "; ".join(shown) + more,
        )
        self.key = keys[int(positions[0])] if len(self.reasons) else None
        self.reason = self.reasons[0] if self.reasons else ""


class InvalidTimestampError(NpcallsError, ValueError):
    """A timestamp that is not int64 nanoseconds since the epoch (or convertible to it)."""


class TableFullError(NpcallsError):
    """Inserting would push the table past its load-factor limit.

    Attributes
    ----------
    count, capacity, limit : int
        Live rows, slots, and the most live rows the table accepts.
    """

    def __init__(self, count: int, needed: int, capacity: int, limit: int, path: str) -> None:
        self.count = count
        self.needed = needed
        self.capacity = capacity
        self.limit = limit
        super().__init__(
            f"table {path} is full: {count} calls stored, {needed} more to insert, "
            f"capacity {capacity} slots accepts at most {limit} calls "
            f"(max load {limit / capacity:.2f}); expire old calls, grow() the table, "
            f"or create it with auto_grow=True"
        )


class FormatError(NpcallsError, ValueError):
    """A file that is not a usable npcalls table: truncated, foreign, corrupt, newer format."""


class TableNotFoundError(NpcallsError, FileNotFoundError):
    """No table exists under that name or path."""


class TableExistsError(NpcallsError, FileExistsError):
    """Create refused: something already exists at that path."""


class ReadOnlyError(NpcallsError, PermissionError):
    """A write was attempted through a table opened with ``readonly=True``."""


class TableClosedError(NpcallsError, ValueError):
    """The CallTable object was closed."""


class TableRemovedError(NpcallsError):
    """The table was unlinked by another process while this one was attached."""


def _short(key: Any, limit: int = 80) -> str:
    text = repr(key)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text
