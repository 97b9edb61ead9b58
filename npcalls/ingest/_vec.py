"""Vectorized helpers for the loaders: numbers, times and keys from numpy ``S`` arrays.

Every function takes whole columns (numpy ``S`` arrays, one element per log
line or CSV row) and returns arrays plus an ``ok`` mask, so a loader parses a
chunk of tens of thousands of lines with a few dozen numpy calls instead of a
Python loop.  Rows a function cannot read are reported through ``ok``, never
by an exception, so that one odd line never costs the rest of its chunk.
"""

from __future__ import annotations

import numpy as np

from ..layout import NOT_SET

S = np.strings

__all__ = ["S", "NOT_SET", "UNIT_NS", "starts", "cut", "parse_uint", "parse_iso", "parse_column",
           "guess_unit", "key_check", "matrix", "gather", "field", "digits", "decimal_ns",
           "find_in", "strip_if_needed", "Template"]

UNIT_NS = {"s": 1_000_000_000, "ms": 1_000_000, "us": 1_000, "ns": 1}
_I64_MAX = np.iinfo(np.int64).max
_POW10 = 10 ** np.arange(19, dtype=np.int64)


# -------------------------------------------------------------------- byte-matrix fields
#
# np.strings.slice/partition return arrays as wide as their input (a whole log
# line per row), so cutting five fields out of 300-byte lines copies 1.5 kB per
# line.  These helpers work on positions instead (np.strings.find copies
# nothing) and gather only the bytes of the field itself.

def matrix(a: np.ndarray) -> np.ndarray:
    """The (n, itemsize) uint8 view of an ``S`` array (no copy)."""
    return a.view(np.uint8).reshape(len(a), a.dtype.itemsize)


def find_in(a: np.ndarray, sub: bytes, start: np.ndarray, stop: np.ndarray) -> np.ndarray:
    """Position of ``sub`` in ``a[i][start[i]:stop[i]]`` (absolute), or -1."""
    p = S.find(a, sub, starts(start))
    return np.where((p >= 0) & (p + len(sub) <= stop), p, -1)


def gather(m: np.ndarray, start: np.ndarray, length: np.ndarray | None, k: int,
           rows: np.ndarray | None = None) -> np.ndarray:
    """Bytes ``m[r, start[i]:start[i]+length[i]]`` as an (n, k) array, zero-padded.

    ``r`` is ``rows[i]`` if rows are given (a subset of the matrix, without
    copying it), else ``i``.  ``length`` None means ``k`` for every row (no
    padding: bytes past the row's end are zeros anyway, or the next row's).
    """
    n = len(start)
    w = m.shape[1]
    if not n or not w:
        return np.zeros((n, k), np.uint8)
    flat = m.reshape(-1)
    size = flat.size
    base = (np.arange(0, n * w, w) if rows is None else rows * w) + np.clip(start, 0, w)
    if k <= size:
        # Fancy-indexing rows of a sliding-window view copies k bytes per row
        # with no (n, k) index array: several times faster than np.take.
        over = base > size - k
        any_over = bool(over.any())
        out = _windows(flat, k)[np.minimum(base, size - k) if any_over else base]
        if any_over:                        # windows past the end: the careful way
            j = np.arange(k)
            out[over] = np.take(flat, base[over][:, None] + j, mode="clip") * \
                (base[over][:, None] + j < size)
    else:
        j = np.arange(k)
        out = np.take(flat, base[:, None] + j, mode="clip") * (base[:, None] + j < size)
        out = out.astype(np.uint8)
    if length is not None:
        out *= np.arange(k) < length[:, None]
    return out


def _windows(flat: np.ndarray, k: int) -> np.ndarray:
    return np.lib.stride_tricks.sliding_window_view(flat, k)


class Template:
    """A fixed layout of bytes, ``#`` standing for a decimal digit.

    Logs of one proxy repeat one layout for their time fields (``timestamp=``
    then ten digits, ``;t_ms=``, ten digits, a dot, three digits): rows that
    match it are read with one gather and a few integer operations; the
    others take the general path.
    """

    def __init__(self, layout: bytes) -> None:
        self.layout = layout
        self.size = len(layout)
        lay = np.frombuffer(layout, np.uint8)
        self.digit = lay == ord("#")
        self.fixed = np.where(self.digit, 0, lay).astype(np.uint8)
        self.runs: list[tuple[int, int]] = []
        i = 0
        while i < len(layout):
            if layout[i:i + 1] == b"#":
                j = i
                while j < len(layout) and layout[j:j + 1] == b"#":
                    j += 1
                self.runs.append((i, j - i))
                i = j
            else:
                i += 1

    def match(self, m: np.ndarray, start: np.ndarray, rows: np.ndarray
              ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Which rows match at ``start``, and the integer value of each digit run."""
        g = gather(m, start, None, self.size, rows)
        d = g - np.uint8(48)                          # digits become 0..9, others wrap high
        ok = np.where(self.digit, d <= 9, g == self.fixed).all(axis=1)
        vals = []
        for a, ln in self.runs:
            v = d[:, a].astype(np.int64)
            for j in range(a + 1, a + ln):
                v *= 10
                v += d[:, j]
            vals.append(v)
        return ok, vals


def field(a: np.ndarray | None, start: np.ndarray, stop: np.ndarray,
          m: np.ndarray | None = None, k: int | None = None,
          rows: np.ndarray | None = None) -> np.ndarray:
    """``a[i][start[i]:stop[i]]`` as an ``S`` array just wide enough for the longest one.

    ``rows`` as for :func:`gather` (with a one-row ``m``, positions in a flat buffer).
    """
    if m is None:
        assert a is not None, "field() needs the array or its matrix"
        m = matrix(a)
    length = np.maximum(stop - start, 0)
    if k is None:
        k = max(int(length.max()) if len(length) else 0, 1)
    else:
        length = np.minimum(length, k)
    g = gather(m, start, length, k, rows)
    return g.view(f"S{k}").reshape(len(g))


def digits(m: np.ndarray, start: np.ndarray, stop: np.ndarray, max_digits: int,
           allow_empty: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The unsigned decimal integer at ``[start, stop)`` of each row: ``(int64, ok)``."""
    length = stop - start
    ok = (length <= max_digits) & (length >= 0)
    if not allow_empty:
        ok &= length >= 1
    f = field(None, start, np.where(ok, stop, start), m, max_digits)
    empty = length == 0
    ok &= S.isdigit(f) | empty
    out = np.zeros(len(f), np.int64)
    good = ok & ~empty
    if good.all():
        out = f.astype(np.int64) if len(f) else out
    elif good.any():
        out[good] = f[good].astype(np.int64)
    return out, ok


def decimal_ns(a: np.ndarray, start: np.ndarray, stop: np.ndarray, unit_ns: int = 1_000_000_000,
               int_digits: int = 11, m: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """``digits[.digits]`` at ``[start, stop)`` in a unit, to int64 ns, exactly.

    One gather that skips the dot puts all the digits side by side, and one
    integer conversion reads them; fraction digits below a nanosecond are
    dropped.  Up to 19 digits in all (epoch nanoseconds have 19).
    """
    if m is None:
        m = matrix(a)
    n = len(start)
    frac_digits = len(str(unit_ns)) - 1
    dot = find_in(a, b".", start, stop)
    has_dot = dot >= 0
    ilen = np.where(has_dot, dot, stop) - start
    flen = np.where(has_dot, stop - dot - 1, 0)
    total = ilen + flen
    ok = (ilen >= 1) & (ilen <= int_digits) & (flen >= 0) & (total <= 19)
    total = np.where(ok, total, 0)
    k = max(int(total.max()) if n else 0, 1)
    j = np.arange(k)
    w = m.shape[1]
    if n and w:
        src = np.clip(start, 0, w)[:, None] + j + (j >= ilen[:, None])
        src += np.arange(0, n * w, w)[:, None]
        g = np.take(m.reshape(-1), src, mode="clip")
        g *= j < total[:, None]
    else:
        g = np.zeros((n, k), np.uint8)
    f = g.view(f"S{k}").reshape(n)
    ok &= S.isdigit(f)
    if k >= 19:                                   # int64 holds every 18-digit number, not all 19
        ok &= (total < 19) | (f <= b"9223372036854775807")
    v = np.zeros(n, np.int64)
    if ok.all():
        if n:
            v = f.astype(np.int64)
    elif ok.any():
        v[ok] = f[ok].astype(np.int64)
    # v holds int digits followed by flen fraction digits
    keep = np.minimum(flen, frac_digits)
    v //= _POW10[np.clip(flen - keep, 0, 18)]
    ok &= v <= _I64_MAX // _POW10[np.clip(frac_digits - keep, 0, 18)]
    v = v * _POW10[np.clip(frac_digits - keep, 0, 18)]
    return np.where(ok, v, 0), ok


def starts(a: np.ndarray) -> np.ndarray:
    """Clip positions from ``np.strings.find`` (-1 = not found) so they can be used as starts."""
    return np.maximum(a, 0)


def cut(a: np.ndarray, start: np.ndarray, stop: np.ndarray | None = None) -> np.ndarray:
    """``a[i][start[i]:stop[i]]`` for every row (a thin wrapper over ``np.strings.slice``)."""
    start = starts(start)
    if stop is None:
        return S.slice(a, start, None)
    return S.slice(a, start, np.maximum(stop, start))


def parse_uint(a: np.ndarray, max_digits: int = 18) -> tuple[np.ndarray, np.ndarray]:
    """Unsigned decimal integers: ``(values int64, ok)``; empty or non-digit rows are not ok."""
    ok = S.isdigit(a) & (S.str_len(a) <= max_digits)
    out = np.zeros(len(a), np.int64)
    if ok.all():
        if len(a):
            out = a.astype(np.int64)
    elif ok.any():
        out[ok] = a[ok].astype(np.int64)
    return out, ok


def _zone_offsets(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split ``...+HH:MM`` / ``...-HHMM`` / ``...Z`` suffixes off ISO 8601 strings.

    Returns the strings without their zone, the offset in ns to subtract,
    and which rows had a readable zone (or none).
    """
    n = len(a)
    offset = np.zeros(n, np.int64)
    ok = np.ones(n, bool)
    z = S.endswith(a, b"Z") | S.endswith(a, b"z")
    if z.any():
        a = np.where(z, cut(a, np.zeros(n, np.int64), S.str_len(a) - 1), a)
    # a zone sign can only follow the time of day ("T12:00:00+02:00"): search
    # after the date so the date's own hyphens are not taken for one
    tpos = np.maximum(S.find(a, b"T"), S.find(a, b" "))
    has_t = tpos > 0
    if not has_t.any():
        return a, offset, ok
    plus = S.find(a, b"+", starts(tpos))
    minus = S.find(a, b"-", starts(tpos))
    sign_pos = np.where(has_t, np.maximum(plus, minus), -1)
    zoned = sign_pos > 0
    if zoned.any():
        zone = cut(a, sign_pos + 1)
        zone = S.replace(zone, b":", b"")
        zl = S.str_len(zone)
        hh, okh = parse_uint(cut(zone, np.zeros(n, np.int64), np.full(n, 2)), 2)
        mm, okm = parse_uint(cut(zone, np.full(n, 2), np.full(n, 4)), 2)
        mm = np.where(zl == 2, 0, mm)
        okm |= zl == 2
        good = okh & okm & ((zl == 2) | (zl == 4)) & (hh < 24) & (mm < 60)
        sign = np.where(minus == sign_pos, -1, 1)
        offset = np.where(zoned & good, sign * (hh * 3600 + mm * 60) * 1_000_000_000, 0)
        ok &= ~zoned | good
        a = np.where(zoned, cut(a, np.zeros(n, np.int64), sign_pos), a)
    return a, offset, ok


def parse_iso(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ISO 8601 date-times (``2026-11-26T05:51:55.710Z``, ``2026-11-26 05:51:55+02:00``).

    No zone means UTC (as numpy, pandas and ``npcalls dump`` have it).

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        int64 nanoseconds since the epoch, and which rows were readable.
    """
    n = len(a)
    if not n:
        return np.zeros(0, np.int64), np.zeros(0, bool)
    fast = _iso_fixed(a)
    if fast is not None:
        return fast
    b, offset, ok = _zone_offsets(S.strip(a))
    # numpy's parser rejects the whole array if one element is bad: take the
    # fast path when possible, else find the bad rows one by one
    b = np.where(ok, b, b"")
    try:
        t = b.astype("datetime64[ns]").view(np.int64)
    except ValueError:
        t = np.empty(n, np.int64)
        for i, s in enumerate(b.tolist()):
            try:
                t[i] = np.datetime64(s.decode("ascii"), "ns").astype(np.int64)
            except (ValueError, UnicodeDecodeError):
                t[i] = NOT_SET
    # a date-time needs at least a full date "YYYY-MM-DD": numpy also reads
    # "2026", "" (NaT) and even "1795668428" (as a year)
    ok &= (t != NOT_SET) & (S.str_len(b) >= 10) & (S.find(b, b"-") == 4)
    ok &= _iso_in_range(b, t, ok)
    return np.where(ok, t - offset, 0), ok


def _iso_in_range(b: np.ndarray, t: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """Which parsed "YYYY-..." rows fit int64 nanoseconds.

    numpy's string-to-datetime64[ns] conversion wraps silently outside
    1677-09-21 .. 2262-04-11 (year 3000 comes out as 1830): a row outside is
    unreadable, never stored as another date.  Rows of the two edge years are
    parsed again at microseconds and compared.
    """
    if b.dtype.itemsize < 4:
        return np.zeros(len(b), bool)
    d = matrix(b)[:, :4].astype(np.int64) - 48
    year = ((d[:, 0] * 10 + d[:, 1]) * 10 + d[:, 2]) * 10 + d[:, 3]
    good = (year > 1677) & (year < 2262)
    for i in np.flatnonzero(ok & ((year == 1677) | (year == 2262))):
        try:
            us = int(np.datetime64(b[i].decode("ascii"), "us").astype(np.int64))
        except (ValueError, UnicodeDecodeError):
            continue
        good[i] = -(2**63) < us * 1000 + int(t[i]) % 1000 < 2**63 and \
            us * 1000 + int(t[i]) % 1000 == int(t[i])
    return good


def _iso_fixed(a: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The common case, one width and a ``Z`` (or no zone) on every row: one numpy parse.

    None if the column is not that regular (the general path then decides).
    """
    n = len(a)
    lens = S.str_len(a)
    w = int(lens[0])
    if w < 19 or not (lens == w).all():
        return None
    m = matrix(a)[:, :w]
    if not ((m[:, 4] == 45) & ((m[:, 10] == 84) | (m[:, 10] == 32))).all():
        return None
    if (m[:, w - 1] == 90).all():
        w -= 1                                       # "...Z": UTC, numpy wants no zone
    elif ((m[:, 11:] == 43) | (m[:, 11:] == 45) | (m[:, 11:] == 90)).any():
        return None                                  # offsets: the general path
    b = np.ascontiguousarray(m[:, :w]).view(f"S{w}").reshape(n)
    try:
        t = b.astype("datetime64[ns]").view(np.int64)
    except ValueError:
        return None
    ok = t != NOT_SET
    ok &= _iso_in_range(b, t, ok)
    return np.where(ok, t, 0), ok


def parse_column(a: np.ndarray, unit: str) -> tuple[np.ndarray, np.ndarray]:
    """A column of times in one of the tabular units (``s``, ``ms``, ``us``, ``ns``:
    decimals allowed; or ``iso``) to int64 ns, with which rows were readable.

    Plain integers (the common case for epoch columns) take one numpy
    conversion; decimals and dates their own paths.
    """
    n = len(a)
    if unit == "iso":
        return parse_iso(a)
    unit_ns = UNIT_NS[unit]
    if not n:
        return np.zeros(0, np.int64), np.zeros(0, bool)
    if (S.find(a, b".") >= 0).any():
        return decimal_ns(a, np.zeros(n, np.int64), S.str_len(a), unit_ns, 19)
    lens = S.str_len(a)
    ok = S.isdigit(a) & (lens <= 19)
    if a.dtype.itemsize >= 19:
        ok &= (lens < 19) | (a <= b"9223372036854775807")
    v = np.zeros(n, np.int64)
    w = int(np.max(lens[ok])) if ok.any() else 0
    same = ok & (lens == w)
    if w and np.count_nonzero(same) * 2 >= n:
        # most rows of one width (epoch values of one era; the others are
        # often empty): Horner over the digit columns beats numpy's
        # string-to-int conversion several times
        m = matrix(a)
        h = m[:, 0].astype(np.int64) - 48
        for j in range(1, w):
            h *= 10
            h += m[:, j]
            h -= 48
        v = np.where(same, h, 0)
        rest = ok & ~same
        if rest.any():
            v[rest] = a[rest].astype(np.int64)
    elif ok.all():
        v = a.astype(np.int64)
    elif ok.any():
        v[ok] = a[ok].astype(np.int64)
    ok &= v <= _I64_MAX // unit_ns
    return np.where(ok, v * unit_ns, 0), ok


def guess_unit(a: np.ndarray) -> str | None:
    """Guess the unit of a column of times from its non-empty values.

    ISO 8601 if it looks like a date, else epoch seconds / ms / us / ns by
    magnitude (any of them lands in 1973..2286 only in its own unit).
    None if the column holds nothing readable.
    """
    a = S.strip(a)
    a = a[S.str_len(a) > 0]
    if not len(a):
        return None
    if (S.find(a, b"-") > 0).any() or (S.find(a, b"T") > 0).any():
        return "iso"
    ip = S.partition(a, b".")[0]
    v, ok = parse_uint(ip, 19)
    if not ok.any():
        return None
    m = int(np.median(v[ok]))
    for unit, lim in (("s", 10**11), ("ms", 10**14), ("us", 10**17)):
        if m < lim:
            return unit
    return "ns"


_BAD_KEY_BYTE = np.ones(256, bool)
_BAD_KEY_BYTE[33:127] = False      # printable ASCII, no space
_BAD_KEY_BYTE[0] = False           # padding (a NUL inside a key is found by its length)


def key_check(keys: np.ndarray, key_width: int | None, nul: bool = True
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which Call-IDs can be stored as they are.

    Returns ``(ok, too_long, odd)``: ``too_long`` rows are longer than the
    table's key width; ``odd`` rows are empty or hold bytes outside printable
    ASCII (RFC 3261 Call-IDs are printable ASCII), which a careful per-line
    check then accepts (valid UTF-8 without spaces) or refuses.  ``nul``
    False skips the search for NUL bytes (the caller knows there are none).
    """
    n = len(keys)
    lens = S.str_len(keys)
    too_long = lens > key_width if key_width else np.zeros(n, bool)
    w = keys.dtype.itemsize
    if n and w:
        m = keys.view(np.uint8).reshape(n, w)
        odd = np.take(_BAD_KEY_BYTE, m).any(axis=1) | (lens == 0)
        if nul:
            # zeros before a key's last byte are NULs inside it, not padding
            odd |= np.count_nonzero(m, axis=1) < lens
    else:
        odd = lens == 0
    return ~too_long & ~odd, too_long, odd & ~too_long


_STRIP = np.zeros(256, bool)
_STRIP[[9, 32, 34]] = True                          # tab, space, double quote


def strip_if_needed(a: np.ndarray) -> np.ndarray:
    """``np.strings.strip(a, ' \\t"')``, skipped when no value starts or ends with those."""
    n = len(a)
    if not n or not a.dtype.itemsize:
        return a
    m = matrix(a)
    lens = S.str_len(a)
    last = m[np.arange(n), np.maximum(lens - 1, 0)]
    if not (_STRIP[m[:, 0]] | _STRIP[last]).any():
        return a
    return S.strip(a, b' \t"')
