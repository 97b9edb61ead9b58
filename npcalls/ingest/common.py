"""What every ingest format produces and reports: parsed chunks, problems, line texts.

The acc-log parser (:mod:`.acc`), the CSV / JSON-lines parser (:mod:`.tabular`),
the loader, the parallel runner and :func:`.run.ingest` all speak these types,
so none of them depends on another format's parser.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np

__all__ = ["Parsed", "Problem", "ChunkLines", "call_id_problem", "too_long_reason",
           "count_lines", "clean_eol", "show", "count_problem", "problem_text"]

_ESCAPES = re.compile(rb"(?:#0[0-3][0-7]|[\r\n])+$")

PROBLEM_TEXT = 160
"""Characters of a problem line kept in a report."""


class Problem(NamedTuple):
    """A line that could not be loaded."""

    source: str
    line: int
    kind: str
    """``"bad"`` (a needed field missing or unreadable) or ``"too_long"`` (Call-ID > key width)."""
    reason: str
    text: str


class Parsed:
    """What one chunk of input holds: event rows, counts and problems.

    Attributes
    ----------
    acc_keys, acc_start, acc_end : numpy.ndarray
        One row per start (answered INVITE) or end (answered BYE) line, in
        log order; the other time is ``NOT_SET``.
    cdr_keys, cdr_start, cdr_end : numpy.ndarray
        One row per CDR of an answered call.
    lines, acc_lines, cdr_lines, records, failed, ignored, bad, too_long : int
        Counts of this chunk's lines (``records``: good CSV/JSON rows, whose
        events are in the ``acc_*`` arrays).
    problems : list of Problem
        The first problems (as many as the parser was asked to keep).
    """

    __slots__ = ("acc_keys", "acc_start", "acc_end", "cdr_keys", "cdr_start", "cdr_end",
                 "lines", "acc_lines", "cdr_lines", "records", "failed", "ignored", "bad",
                 "too_long", "problems", "fold")

    def __init__(self) -> None:
        empty_k = np.empty(0, "S1")
        empty_t = np.empty(0, np.int64)
        self.acc_keys = self.cdr_keys = empty_k
        self.acc_start = self.acc_end = self.cdr_start = self.cdr_end = empty_t
        self.lines = self.acc_lines = self.cdr_lines = self.records = self.failed = 0
        self.ignored = self.bad = self.too_long = 0
        self.problems: list[Problem] = []
        self.fold = True
        """Whether rows of one call are likely to repeat (a log: INVITE, BYE, CDR
        lines), so that folding a batch to one row per call pays."""

    @property
    def rows(self) -> int:
        return len(self.acc_keys) + len(self.cdr_keys)


def count_lines(chunk: bytes) -> int:
    """The newlines in a chunk (numpy counts them about 3x faster than ``bytes.count``)."""
    return int(np.count_nonzero(np.frombuffer(chunk, np.uint8) == 10))


def clean_eol(b: bytes) -> bytes:
    """Drop a line's end: CR/LF and rsyslog's escapes of control characters (``#015#012``)."""
    return _ESCAPES.sub(b"", b)


def show(v: bytes, n: int = 40) -> str:
    """A value quoted for a problem reason, cut to ``n`` characters."""
    s = v.decode("utf-8", "backslashreplace")
    return repr(s if len(s) <= n else s[:n] + "...")


def call_id_problem(cid: bytes) -> str | None:
    """Why a Call-ID cannot be a key (None if it can): RFC 3261 wants printable ASCII.

    Bytes above ASCII are accepted when they are valid UTF-8 (tables store
    UTF-8 keys), never control bytes, spaces or NUL.
    """
    if not cid:
        return "empty Call-ID"
    if any(c < 33 or c == 127 for c in cid):
        return f"Call-ID {show(cid)} holds spaces or control bytes"
    if max(cid) > 127:
        try:
            cid.decode("utf-8")
        except UnicodeDecodeError:
            return f"Call-ID {show(cid)} is not valid UTF-8"
    return None


def too_long_reason(n: int, key_width: int | None) -> str:
    """Why a Call-ID of ``n`` bytes is refused, with a key width that would hold it if any can."""
    from ..layout import MAX_KEY_WIDTH
    if n > MAX_KEY_WIDTH:
        return (f"line too long: its Call-ID is {n} bytes, more than any table holds "
                f"(key width at most {MAX_KEY_WIDTH})")
    return (f"Call-ID is {n} bytes, longer than the table's key width of {key_width} "
            f"(create the table with a larger key width, e.g. --key-width "
            f"{min(MAX_KEY_WIDTH, max(n, 2 * (key_width or 0)))})")


def count_problem(p: Parsed, kind: str) -> None:
    """Count a refused line in ``p`` (``kind`` is ``"bad"`` or ``"too_long"``)."""
    if kind == "bad":
        p.bad += 1
    else:
        p.too_long += 1


def problem_text(line: bytes, log_escapes: bool = True) -> str:
    """A refused line as shown in a report: its end dropped, cut to :data:`PROBLEM_TEXT`.

    With ``log_escapes`` the end also loses rsyslog's escapes (``#015#012``),
    which only logs carry; CSV keeps them as data.
    """
    s = (clean_eol(line) if log_escapes else line.rstrip(b"\r\n")).decode(
        "utf-8", "backslashreplace")
    return s if len(s) <= PROBLEM_TEXT else s[:PROBLEM_TEXT] + "..."


class ChunkLines:
    """Line numbers and texts of a chunk, computed only when a line must be reported.

    Parameters
    ----------
    chunk : bytes
        Whole lines.
    base : int
        Lines of the source before the chunk.
    starts, ends : numpy.ndarray, optional
        Where each line begins and ends, when the caller has cut the chunk
        already: then ``lines[i]`` is line ``i`` without its end.
    """

    def __init__(self, chunk: bytes, base: int = 0, starts: np.ndarray | None = None,
                 ends: np.ndarray | None = None) -> None:
        self.chunk = chunk
        self.base = base
        self.starts, self.ends = starts, ends
        self._nl: np.ndarray | None = None
        self._asked = 0

    def __getitem__(self, i: int) -> bytes:
        assert self.starts is not None and self.ends is not None
        return self.chunk[int(self.starts[i]):int(self.ends[i])]

    def number(self, off: int) -> int:
        """The source's line number (from 1) of the byte at ``off``."""
        self._asked += 1
        # counting newlines is cheapest for a few questions, an index for many
        if self._nl is None and self._asked > 16:
            self._nl = np.flatnonzero(np.frombuffer(self.chunk, np.uint8) == 10)
        if self._nl is not None:
            return self.base + int(np.searchsorted(self._nl, off)) + 1
        return self.base + self.chunk.count(b"\n", 0, off) + 1

    def text(self, off: int) -> bytes:
        """The whole line holding the byte at ``off``."""
        c = self.chunk
        a = c.rfind(b"\n", 0, off) + 1
        b = c.find(b"\n", off)
        return c[a:b if b >= 0 else len(c)]
