"""Timestamps: int64 nanoseconds since the Unix epoch, INT64_MIN meaning "not set".

Accepted inputs are ints (nanoseconds), ``numpy.datetime64`` (any unit),
``datetime.datetime`` (naive values are taken as UTC, as numpy and pandas do)
and ``pandas.Timestamp``.  Floats are refused on purpose: a float is usually
seconds (``time.time()``), and guessing the unit would silently store dates
in 1970; :func:`from_seconds` converts explicitly.

Every form is converted exactly, in Python or overflow-checked integer
arithmetic: numpy's own ``astype("datetime64[ns]")`` wraps silently outside
1677-09-21 .. 2262-04-11 (``datetime64('3000-01-01', 's')`` becomes 1830),
so values outside :data:`FIRST_NS` .. :data:`LAST_NS` raise
:class:`InvalidTimestampError` naming the value and the range instead.
"""

from __future__ import annotations

import datetime as _dt
import time
from typing import Any, Callable

import numpy as np

from .errors import InvalidTimestampError
from .layout import NOT_SET

__all__ = ["now_ns", "to_ns", "to_ns_array", "from_seconds", "parse_duration", "parse_time", "format_ns",
           "format_age"]

_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)
_I64_MAX = np.iinfo(np.int64).max
now_ns = time.time_ns


def from_seconds(seconds: Any) -> Any:
    """Convert seconds since the epoch (float or array of floats) to int64 nanoseconds.

    Rounds to the nearest microsecond first, so that ``1795668428.565`` becomes
    ``1795668428565000000`` and not ``...564999936`` (float64 carries ~16 digits).
    """
    a = np.asarray(seconds, dtype=np.float64)
    ns = np.round(a * 1e6).astype(np.int64) * 1000
    return int(ns) if ns.ndim == 0 else ns


def _bad(ts: Any, why: str) -> InvalidTimestampError:
    return InvalidTimestampError(f"invalid timestamp {_show(ts)}: {why}")


FIRST_NS = -_I64_MAX
"""The earliest storable time: 1677-09-21T00:12:43.145224193 UTC (INT64_MIN means 'not set')."""
LAST_NS = _I64_MAX
"""The latest storable time: 2262-04-11T23:47:16.854775807 UTC."""
RANGE_TEXT = ("the storable range is 1677-09-21T00:12:43.145224193 .. "
              "2262-04-11T23:47:16.854775807 UTC (int64 nanoseconds since the epoch)")

# Nanoseconds per tick of the linear datetime64 units (calendar units Y and M
# are not linear and go through days; sub-nanosecond units are divided).
_DT64_NS = {"W": 604_800_000_000_000, "D": 86_400_000_000_000, "h": 3_600_000_000_000,
            "m": 60_000_000_000, "s": 1_000_000_000, "ms": 1_000_000, "us": 1_000, "ns": 1}
_DT64_SUB = {"ps": 1_000, "fs": 1_000_000, "as": 1_000_000_000}
# Within these bounds (in years or months from 1970) a calendar value converts
# to days without any overflow; beyond them it is far outside the range anyway.
_CAL_LIMIT = {"Y": 1_000, "M": 12_000}


def _show(ts: Any) -> str:
    """A timestamp as a person recognises it: numpy's repr of an out-of-range value hides nothing."""
    if isinstance(ts, np.datetime64):
        try:
            return f"numpy.datetime64('{np.datetime_as_string(ts)}', '{_unit_text(ts.dtype)}')"
        except (ValueError, OverflowError):
            return repr(ts)
    if isinstance(ts, _dt.datetime) and not _is_pandas_nat(ts):
        kind = "pandas.Timestamp" if type(ts).__name__ == "Timestamp" else type(ts).__name__
        return f"{kind} {ts.isoformat()}"
    return repr(ts)


def _unit_text(dtype: np.dtype) -> str:
    unit, count = np.datetime_data(dtype)
    return unit if count == 1 else f"{count}{unit}"


def _out_of_range(ts: Any) -> InvalidTimestampError:
    return _bad(ts, f"outside the time range npcalls stores: {RANGE_TEXT}")


def _is_pandas_nat(ts: Any) -> bool:
    # pandas.NaT is a datetime subclass whose methods raise; recognised by type
    # name so that the core never imports pandas.
    return type(ts).__name__ == "NaTType"


def _dt64_scalar_ns(ts: np.datetime64) -> int:
    """Exact nanoseconds of a datetime64 scalar of any unit, computed without wrapping."""
    unit, count = np.datetime_data(ts.dtype)
    if unit == "generic":
        raise _bad(ts, "a datetime64 without a unit is not a point in time")
    v = int(ts.astype(np.int64)) * count
    if unit in _CAL_LIMIT:
        if abs(v) > _CAL_LIMIT[unit]:
            raise _out_of_range(ts)
        days = int(np.datetime64(v, unit).astype("datetime64[D]")  # type: ignore[call-overload]
                   .astype(np.int64))   # unit is a str the stubs cannot narrow to a Literal
        ns = days * _DT64_NS["D"]
    elif unit in _DT64_NS:
        ns = v * _DT64_NS[unit]
    else:
        ns = v // _DT64_SUB[unit]
    if not FIRST_NS <= ns <= LAST_NS:
        raise _out_of_range(ts)
    return ns


def _dt64_array_ns(a: np.ndarray, allow_unset: bool) -> np.ndarray:
    """int64 nanoseconds of a datetime64 array of any unit; refuses what would wrap.

    NaT elements become NOT_SET (the caller decides whether that is allowed).
    """
    unit, count = np.datetime_data(a.dtype)
    if unit == "generic":
        raise InvalidTimestampError("datetime64 timestamps without a unit are not points in time")
    v = a.view(np.int64)
    nat = v == NOT_SET
    if unit == "ns" and count == 1:
        return v.copy()
    if unit in _CAL_LIMIT or unit in _DT64_SUB or count != 1:
        # rare units: exact element by element in Python integers
        return _each(a, nat.tolist(), _dt64_scalar_ns)
    f = _DT64_NS[unit]
    lim = _I64_MAX // f
    bad = ~nat & ((v > lim) | (v < -lim))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InvalidTimestampError(f"timestamp #{i}: {_out_of_range(a[i])}")
    out = np.where(nat, 0, v) * f
    out[nat] = NOT_SET
    return out


def to_ns(ts: Any) -> int:
    """Normalise one timestamp (None = now) to int nanoseconds since the epoch."""
    if ts is None:
        return time.time_ns()
    t = type(ts)
    if t is int:
        if -_I64_MAX <= ts <= _I64_MAX:
            return ts
        if ts == NOT_SET:
            raise _bad(ts, "INT64_MIN means 'not set' (NaT), not a time")
        raise _out_of_range(ts)
    if isinstance(ts, (bool, np.bool_)):
        raise _bad(ts, "a bool is not a timestamp")
    if isinstance(ts, (int, np.integer)):
        return to_ns(int(ts))
    if isinstance(ts, np.datetime64):
        if np.isnat(ts):
            raise _bad(ts, "NaT is 'not set', not a time")
        return _dt64_scalar_ns(ts)
    if isinstance(ts, _dt.datetime):
        if _is_pandas_nat(ts):
            raise InvalidTimestampError("invalid timestamp pandas.NaT: NaT is 'not set', "
                                        "not a time")
        orig = ts
        if ts.tzinfo is None:
            ts = ts.replace(tzinfo=_dt.timezone.utc)
        delta = ts - _EPOCH
        ns = (delta.days * 86400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000
        ns += int(getattr(ts, "nanosecond", 0))
        if not FIRST_NS <= ns <= LAST_NS:
            raise _out_of_range(orig)
        return ns
    if isinstance(ts, (float, np.floating)):
        raise _bad(ts, "floats are refused: give int nanoseconds, a datetime, "
                       "or npcalls.from_seconds(seconds)")
    raise _bad(ts, f"expected int nanoseconds or a datetime, not {t.__name__}")


def _each(items: Any, unset: list[bool], convert: Callable[[Any], int]) -> np.ndarray:
    """Convert timestamps one by one (NOT_SET where ``unset``); an error names the element."""
    out = np.empty(len(items), np.int64)
    for i, x in enumerate(items):
        if unset[i]:
            out[i] = NOT_SET
            continue
        try:
            out[i] = convert(x)
        except InvalidTimestampError as e:
            raise InvalidTimestampError(f"timestamp #{i}: {e}") from None
    return out


def to_ns_array(ts: Any, n: int, allow_unset: bool = False) -> np.ndarray:
    """Normalise the timestamps of a batch of ``n`` keys to an int64 array of length ``n``.

    ``None`` means "now" (one reading of the clock for the whole batch); a
    scalar is used for every key.  With ``allow_unset`` (record_many), NaT,
    ``None`` elements and INT64_MIN are accepted and mean "not set".

    Raises
    ------
    InvalidTimestampError
        Naming the first bad position; nothing is written by the caller then.
    """
    if ts is None:
        return np.full(n, time.time_ns(), np.int64)
    if np.isscalar(ts) or isinstance(ts, (_dt.datetime, np.datetime64)):
        if allow_unset and _is_unset(ts):
            return np.full(n, NOT_SET, np.int64)
        return np.full(n, to_ns(ts), np.int64)
    a = np.asarray(ts)
    if a.dtype.kind in "fu" and not isinstance(ts, np.ndarray) and a.size:
        # a list numpy could only fit into floats or uint64 (an int beyond int64,
        # a float among ints): judge each element, so the message names it
        a = np.asarray(ts, dtype=object)
    if a.size == 0 and a.dtype.kind == "f":
        a = a.astype(np.int64)          # np.asarray([]) is float64: an empty list is fine
    if a.ndim != 1 or len(a) != n:
        raise InvalidTimestampError(f"expected {n} timestamps (one per key), got shape {a.shape}")
    kind = a.dtype.kind
    if kind == "O":
        items = a.tolist()
        return _each(items, [allow_unset and _is_unset(x) for x in items], to_ns)
    if kind == "M":
        out = _dt64_array_ns(a, allow_unset)
    elif kind in "iu":
        if kind == "u" and len(a) and int(a.max()) > _I64_MAX:
            i = int(np.flatnonzero(a > _I64_MAX)[0])
            raise InvalidTimestampError(f"timestamp #{i} ({int(a[i])}) exceeds the int64 "
                                        "nanosecond range")
        out = a.astype(np.int64, copy=False)
    elif kind == "b":
        raise InvalidTimestampError("bool array is not timestamps")
    elif kind == "f":
        raise InvalidTimestampError("float timestamps are refused: give int64 nanoseconds or "
                                    "datetime64, or convert with npcalls.from_seconds(seconds)")
    else:
        raise InvalidTimestampError(f"timestamps of dtype {a.dtype} are not supported")
    if not allow_unset and (out == NOT_SET).any():
        i = int(np.flatnonzero(out == NOT_SET)[0])
        raise InvalidTimestampError(f"timestamp #{i} is NaT / INT64_MIN, which means 'not set', "
                                    "not a time")
    return out


def _is_unset(x: Any) -> bool:
    if x is None:
        return True
    if isinstance(x, np.datetime64):
        return bool(np.isnat(x))
    if _is_pandas_nat(x):
        return True
    if isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_)):
        return int(x) == NOT_SET
    return False


_UNITS = {"ns": 1, "us": 1_000, "ms": 1_000_000, "s": 1_000_000_000, "m": 60_000_000_000,
          "min": 60_000_000_000, "h": 3_600_000_000_000, "d": 86_400_000_000_000,
          "w": 604_800_000_000_000}


def parse_duration(text: str) -> int:
    """Parse a duration such as ``90s``, ``15m``, ``1h30m``, ``2d`` or ``250ms`` into nanoseconds.

    A bare number is seconds.

    Raises
    ------
    ValueError
        Naming the text that could not be read.
    """
    import re
    s = text.strip().lower()
    if not s:
        raise ValueError("empty duration")
    try:
        return int(round(float(s) * 1e9))
    except ValueError:
        pass
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(ns|us|ms|min|s|m|h|d|w)", s)
    if not parts or "".join(a + b for a, b in parts) != re.sub(r"\s+", "", s):
        raise ValueError(f"cannot read duration {text!r} (examples: 90s, 15m, 1h30m, 2d)")
    return int(round(sum(float(a) * _UNITS[b] for a, b in parts)))


def parse_time(text: str, now: int | None = None) -> int:
    """Parse a point in time for the command line into ns since the epoch.

    Accepts ``now``, ISO 8601 (``2026-11-26T05:51:55.710Z``, a date alone; no
    zone means UTC), epoch seconds with an optional fraction
    (``1795668428.565``), and offsets from now: ``-15m`` or ``15m ago``.
    """
    s = text.strip()
    now = time.time_ns() if now is None else now
    if s.lower() == "now":
        return now
    if s.lower().endswith(" ago"):
        return now - parse_duration(s[:-4])
    if s.startswith("-") and not s[1:2].isdigit() or (s.startswith("-") and s[-1:].isalpha()):
        return now - parse_duration(s[1:])
    try:
        if any(c in s for c in "eE") and "T" not in s:
            raise ValueError
        secs = float(s)
    except ValueError:
        pass
    else:
        if not -9.2e9 < secs < 9.2e9:          # would not fit int64 ns: refuse, never wrap
            raise _out_of_range(text)
        return from_seconds(secs)
    import re
    bad = ValueError(f"cannot read time {text!r} (examples: now, -15m, 2026-11-26T05:51:55Z, "
                     "1795668428.565)")
    if re.search(r"T.*[+-]\d\d:?\d\d$", s):
        # an explicit UTC offset: numpy has no zones, datetime has (to the microsecond)
        try:
            return to_ns(_dt.datetime.fromisoformat(s))
        except ValueError:
            raise bad from None
    try:
        # the unit the text carries (a date alone: days); converting to ns
        # with to_ns refuses what int64 ns cannot hold instead of wrapping
        t = np.datetime64(s.rstrip("Zz"))
    except ValueError:
        raise bad from None
    if np.isnat(t):
        raise bad
    try:
        return to_ns(t)
    except InvalidTimestampError:
        raise _out_of_range(text) from None


def format_age(ns: int, seconds_below: float = 60) -> str:
    """A duration for people: ``42.5 s`` below ``seconds_below`` seconds, else ``[Nd ]h:mm:ss``."""
    s = ns / 1e9
    if s < seconds_below:
        return f"{s:.1f} s"
    m, sec = divmod(int(s), 60)
    h, m = divmod(m, 60)
    d, h = divmod(h, 24)
    return (f"{d}d " if d else "") + f"{h}:{m:02d}:{sec:02d}"


def format_ns(ns: int) -> str:
    """ISO 8601 UTC with microseconds (``2026-11-26T05:51:55.710074Z``), or '' when not set."""
    if ns == NOT_SET:
        return ""
    return str(np.datetime64(int(ns), "ns").astype("datetime64[us]")) + "Z"
