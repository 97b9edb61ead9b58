"""One pass of numpy over a chunk's bytes: the acc and CDR lines of the usual layout.

:class:`~npcalls.ingest.acc.AccParser` reads most lines here, without
building a Python object per line: the chunk is viewed as ``uint8`` and as a
``uint64`` at every byte offset (a strided view, no copy), so that comparing
eight bytes of every row with a literal is one gather and one compare.  Line
ends come from one scan for ``\\n``, the acc markers from one scan for ``A``;
the fields of a row sit at known distances (the kind, the time layout, the
method) or are found in a short window gathered after the previous field.

Only rows whose every byte this module checked are taken: the kind is one of
the usual ones, the time section matches a template, the method a known
word, the Call-ID is printable ASCII within the key width and has no ``;``,
the code three digits, and the last field the one the input's lines end with
(see "Lines cut short" in :mod:`.acc`).  These are exactly rows the general
vectorized pass of :mod:`.acc` accepts, read to the same values; every other
line holding a marker is returned as "slow", for that pass (and its careful
per-line parser) to read.  Lines with no marker are no acc lines.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np

from ..layout import NOT_SET
from ._vec import Template, gather

__all__ = ["Scan", "scan"]

_NS = 1_000_000_000
_REST = 2048
"""Rows at least this long go to the general pass (its capture stops there)."""

_CDR_AT = re.compile(rb" start_time=")
_CDR_AT_BOL = re.compile(rb"(?:^| )start_time=", re.M)

_KINDS = (b"transaction answered", b"call missed", b"request acknowledged",
          b"request accounted")
_METHODS = (b"INVITE", b"BYE", b"CANCEL", b"ACK", b"OPTIONS", b"UPDATE", b"PRACK", b"REFER",
            b"NOTIFY", b"INFO", b"MESSAGE", b"PUBLISH")
# (layout from ": timestamp=" to ";method=", digit run of the seconds, of the fraction)
_ACC_TIMES = (
    (Template(b": timestamp=##########;t_ms=##########.###"), 1, 2),
    (Template(b": timestamp=##########;time_attr=##########.###"), 1, 2),
    (Template(b": timestamp=##########"), 0, None),
)
_CDR_TIMES = (
    Template(b"##########.###; end_time=##########.###; duration="),
    Template(b"##########.######; end_time=##########.######; duration="),
)
_WIN_TAGS = 128
"""Bytes searched after the method for ``;call_id=`` (the From and To tags lie between)."""
_WIN_TAIL = 64
"""Bytes searched back from a line's end for its last ``;``."""


class Scan(NamedTuple):
    """What :func:`scan` read, and which lines it left."""

    lines: int
    acc_keys: np.ndarray
    acc_start: np.ndarray
    acc_end: np.ndarray
    acc_lines: int
    cdr_keys: np.ndarray
    cdr_start: np.ndarray
    cdr_end: np.ndarray
    cdr_lines: int
    failed: int
    slow: np.ndarray
    """Indices (in the chunk, from 0) of the lines left to the general pass, ascending."""
    nl: np.ndarray
    """Where each line's ``\\n`` is."""


def _word(lit: bytes) -> tuple[np.uint64, np.uint64]:
    return (np.uint64(int.from_bytes(lit.ljust(8, b"\0"), "little")),
            np.uint64((1 << 8 * len(lit)) - 1))


_PAD = 512
"""Zero bytes after a chunk's copy: windows and words past its end read zeros."""


class _Bytes:
    """A chunk as bytes and as the 8-byte word at every offset."""

    def __init__(self, chunk: bytes) -> None:
        self.n = n = len(chunk)
        self.b = np.zeros(n + _PAD, np.uint8)
        self.b[:n] = np.frombuffer(chunk, np.uint8)
        self.m = self.b.reshape(1, -1)
        self.W = np.ndarray((n + _PAD - 7,), "<u8", buffer=self.b, strides=(1,))

    def word(self, pos: np.ndarray) -> np.ndarray:
        """The 8 bytes at each position as a little-endian uint64 (positions clipped to
        the chunk: a position outside it must be refused by the caller anyway)."""
        return self.W[np.clip(pos, 0, self.n)]

    def eq(self, pos: np.ndarray, lit: bytes) -> np.ndarray:
        """Whether ``lit`` lies at each position."""
        ok = (pos >= 0) & (pos <= self.n)
        for k in range(0, len(lit), 8):
            val, mask = _word(lit[k:k + 8])
            ok &= (self.word(pos + k) & mask) == val
        return ok

    def window(self, pos: np.ndarray, k: int) -> np.ndarray:
        """The ``k`` bytes from each position, as an (n, k) array (zeros past the chunk)."""
        return gather(self.m, pos, None, k, np.zeros(len(pos), np.int64))


def _first_per_line(pos: np.ndarray, nl: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    line = np.searchsorted(nl, pos)
    keep = np.ones(len(pos), bool)
    keep[1:] = line[1:] != line[:-1]
    return pos[keep], line[keep]


def _first(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of a 2-D mask: whether any is set, and the first set column."""
    return np.asarray(mask.any(axis=1)), np.asarray(mask.argmax(axis=1))


def _token_at(B: _Bytes, eol: np.ndarray, floor: np.ndarray, token: bytes) -> np.ndarray:
    """Whether the text after each line's last ';' (searched back from ``eol``, not
    before ``floor``) starts with ``token``."""
    a = np.maximum(eol - _WIN_TAIL, floor)
    g = B.window(a, _WIN_TAIL)
    semi = (g == 59) & (np.arange(_WIN_TAIL) < (eol - a)[:, None])
    have = semi.any(axis=1)
    last = _WIN_TAIL - 1 - semi[:, ::-1].argmax(axis=1)
    return have & B.eq(a + last + 1, token)


def _key(B: _Bytes, c0: np.ndarray, stops: tuple[int, ...], key_width: int | None
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The Call-ID from ``c0`` to the first of ``stops``: (ok, stop position, keys).

    ok: the stop was found within the key width, the Call-ID is not empty
    and is printable ASCII (other rows go to the general pass, which reports
    them or reads them with care).
    """
    kw = min(key_width or 64, 255)
    g = B.window(c0, kw + 1)
    hit = g == stops[0]
    for s in stops[1:]:
        hit |= g == s
    have, ln = _first(hit)
    cols = np.arange(kw + 1)
    inside = cols < ln[:, None]
    # (two compares: a 256-entry lookup table indexed by every byte is 20x slower)
    ok = have & (ln >= 1) & (((g >= 33) & (g < 127)) | ~inside).all(axis=1)
    w = max(int(ln[ok].max()) if ok.any() else 1, 1)
    keys = np.ascontiguousarray((g * inside)[:, :w]).view(f"S{w}").reshape(len(g))
    return ok, c0 + ln, keys


def _acc(B: _Bytes, hit: np.ndarray, eol: np.ndarray, token: bytes, key_width: int | None):
    n = len(hit)
    r0 = hit + 5
    ok = (eol - r0) < _REST
    kpos = np.full(n, -1, np.int64)
    missed = np.zeros(n, bool)
    words = [B.word(r0 + k) for k in range(0, max(map(len, _KINDS)), 8)]
    for kind in _KINDS:
        is_k = kpos < 0
        for j, k in enumerate(range(0, len(kind), 8)):
            val, mask = _word(kind[k:k + 8])
            is_k &= (words[j] & mask) == val
        kpos[is_k] = r0[is_k] + len(kind)
        if kind == b"call missed":
            missed = is_k
    ok &= kpos >= 0
    t = np.zeros(n, np.int64)
    p_m = np.full(n, -1, np.int64)
    for tpl, ri, rf in _ACC_TIMES:
        sel = np.flatnonzero(ok & (p_m < 0))
        if not len(sel):
            break
        match, vals = tpl.match(B.m, kpos[sel], np.zeros(len(sel), np.int64))
        match &= B.eq(kpos[sel] + tpl.size, b";method=")
        rows = sel[match]
        v = vals[ri][match] * _NS
        if rf is not None:
            v += vals[rf][match] * 10 ** (9 - tpl.runs[rf][1])
        t[rows] = v
        p_m[rows] = kpos[rows] + tpl.size
    ok &= p_m >= 0
    q = np.full(n, -1, np.int64)
    is_inv = np.zeros(n, bool)
    is_bye = np.zeros(n, bool)
    wm = B.word(p_m + 8)
    for meth in _METHODS:
        val, mask = _word(meth + b";")
        is_m = ok & (q < 0) & ((wm & mask) == val)
        q[is_m] = p_m[is_m] + 8 + len(meth)
        if meth == b"INVITE":
            is_inv = is_m
        elif meth == b"BYE":
            is_bye = is_m
    ok &= q >= 0
    # ";call_id=": the first ';' of the window that starts it
    g = B.window(q, _WIN_TAGS)
    # (flatnonzero and a division: np.nonzero of a 2-D mask is several times slower)
    r, c = np.divmod(np.flatnonzero(g == 59), _WIN_TAGS)
    at = q[r] + c
    good = B.eq(at, b";call_id=")
    r, at = r[good][::-1], at[good][::-1]
    p_c = np.full(n, -1, np.int64)
    p_c[r] = at                       # reversed: the first hit of a row is written last
    ok &= p_c >= 0
    kok, p_k, keys = _key(B, p_c + 9, (59,), key_width)
    ok &= kok & B.eq(p_k, b";code=") & (p_k + 9 <= eol)
    d = B.window(p_k + 6, 4)
    ok &= ((d[:, :3] >= 48) & (d[:, :3] <= 57)).all(axis=1)
    ok &= (d[:, 3] == 59) | (p_k + 9 == eol)
    ok &= _token_at(B, eol, r0, token)
    two = (d[:, 0] == 50) & ~missed
    start = ok & two & is_inv
    end = ok & two & is_bye
    failed = int(np.count_nonzero(ok & (missed | (is_inv & ~two))))
    ev = start | end
    st = np.where(start, t, NOT_SET)[ev]
    en = np.where(end, t, NOT_SET)[ev]
    return ok, keys[ev], st, en, failed


def _cdr(B: _Bytes, v0: np.ndarray, eol: np.ndarray, token: bytes, key_width: int | None):
    n = len(v0)
    ok = (eol - v0) < _REST
    st = np.zeros(n, np.int64)
    en = np.zeros(n, np.int64)
    dstart = np.full(n, -1, np.int64)
    for tpl in _CDR_TIMES:
        sel = np.flatnonzero(ok & (dstart < 0))
        if not len(sel):
            break
        match, vals = tpl.match(B.m, v0[sel], np.zeros(len(sel), np.int64))
        rows = sel[match]
        f = 10 ** (9 - tpl.runs[1][1])
        st[rows] = vals[0][match] * _NS + vals[1][match] * f
        en[rows] = vals[2][match] * _NS + vals[3][match] * f
        dstart[rows] = v0[rows] + tpl.size
    ok &= dstart >= 0
    # the duration: digits with at most one '.', then "; call_id="
    g = B.window(dstart, 24)
    have, ln = _first(g == 59)
    inside = np.arange(24) < ln[:, None]
    digit = (g >= 48) & (g <= 57)
    dot = g == 46
    ok &= have & (digit | dot | ~inside).all(axis=1)
    ok &= (np.count_nonzero(dot & inside, axis=1) <= 1) & (digit & inside).any(axis=1)
    answered = (digit & inside & (g != 48)).any(axis=1)
    p_c = dstart + ln
    ok &= B.eq(p_c, b"; call_id=")
    kok, c_end, keys = _key(B, p_c + 10, (59, 10), key_width)
    hashes = (keys.view(np.uint8).reshape(n, keys.dtype.itemsize) == 35).any(axis=1)
    ok &= kok & (c_end <= eol) & ~hashes     # rsyslog's escapes: the careful parser strips them
    ok &= _token_at(B, eol, v0, token)
    good = ok & answered
    failed = int(np.count_nonzero(ok & ~answered))
    return ok, keys[good], st[good], en[good], failed


def scan(chunk: bytes, acc_token: bytes, cdr_token: bytes | None, key_width: int | None,
         bol_cdr: bool) -> Scan | None:
    """Read the usual acc and CDR lines of a chunk of whole lines.

    ``acc_token`` / ``cdr_token``: the "name=" each line of the kind ends its
    last field with (None: not known yet).  None if this chunk must go to the
    general pass whole (CDR lines before their shape is known).
    """
    B = _Bytes(chunk)
    nl = np.flatnonzero(B.b == 10)
    a = np.flatnonzero(B.b == 65)
    a = a[a <= B.n - 8]
    val, mask = _word(b"ACC: ")
    a = a[(B.W[a] & mask) == val]
    a, la = _first_per_line(a, nl)
    rx = _CDR_AT_BOL if bol_cdr else _CDR_AT
    if bol_cdr or b" start_time=" in chunk:
        c = np.array([x.end() for x in rx.finditer(chunk)], np.int64)
    else:
        c = np.zeros(0, np.int64)
    c, lc = _first_per_line(c, nl)
    if len(c) and cdr_token is None:
        return None
    marked = np.zeros(len(nl), bool)
    marked[la] = True
    kc = ~marked[lc]
    if not kc.all():
        both = lc[~kc]
        marked[:] = False
        marked[both] = True
        ka = ~marked[la]
    else:
        both = np.zeros(0, np.int64)
        ka = np.ones(len(a), bool)
        kc = np.ones(len(c), bool)
    aok, akeys, ast, aen, afail = _acc(B, a[ka], nl[la[ka]], acc_token, key_width)
    if len(c):
        assert cdr_token is not None
        cok, ckeys, cst, cen, cfail = _cdr(B, c[kc], nl[lc[kc]], cdr_token, key_width)
    else:
        cok = np.zeros(0, bool)
        ckeys, cst, cen, cfail = np.empty(0, "S1"), np.empty(0, np.int64), \
            np.empty(0, np.int64), 0
    slow = np.concatenate([la[ka][~aok], lc[kc][~cok], both])
    slow.sort()
    return Scan(len(nl), akeys, ast, aen, int(np.count_nonzero(aok)), ckeys, cst, cen,
                int(np.count_nonzero(cok)), afail + cfail, slow, nl)
