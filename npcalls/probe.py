"""Finding keys: vectorized batch lookup and placement, and the single-key walk.

The rules are docs/format.md, "Hashing and probing": a key's home bucket
(:mod:`npcalls.buckets`), linear probing over 8-slot buckets, and the
invariant that lets a lookup stop at the first bucket holding its key or an
EMPTY slot.  Deletes (:func:`npcalls.protocol.remove_slots`) keep it.

A *round* of a batch operation looks at one bucket for every pending key at
once: one gather of 64-byte tag lines, an 8-wide compare, a gather of the
candidate rows.  With 8-slot buckets nearly every key resolves in its home
bucket; the benchmark prints the rounds each batch took.

Batch lookups read rows by the one-read rule of docs/format.md, "Reading
without a lock" (:func:`row_is_stable`); :func:`place` writes through
:func:`npcalls.protocol.write_rows`.  One mechanism, two front doors: the
vectorized :func:`lookup`/:func:`place`, and :func:`find_one` for one key
(writers, which hold the lock and need no check), over a
:class:`SingleKeyView`.
"""

from __future__ import annotations

import struct
import time
from typing import Any, Callable, NamedTuple

import numpy as np

from .buckets import _bool_words, home_bucket, home_bucket_one
from .layout import BUCKET, EMPTY, NOT_SET, TOMBSTONE, W
from .protocol import write_rows
from .storage import Mapping

__all__ = ["SingleKeyView", "home_bucket", "home_bucket_one", "lookup", "place", "Found", "rows_equal",
           "row_is_stable", "overversioned", "probe_lengths", "find_one"]

_U = np.uint64
_ONE = _U(1)
_WSEQ_INDEX = W["wseq"]
_TAGS8 = struct.Struct("<8Q")     # one bucket's tags, for the single-key paths


def _byte_index(words: np.ndarray) -> np.ndarray:
    """Index (0..7) of the lowest nonzero byte of each nonzero word from :func:`_bool_words`."""
    low = words & (~words + _ONE)                  # lowest set bit: a power of two
    _, exp = np.frexp(low.astype(np.float64))      # exact: low == 2 ** (exp - 1)
    return ((exp - 1) >> 3).astype(np.int64)


_BYTES1 = _U(0x0101010101010101)
_HIGH = _U(0x8080808080808080)


def _nth_byte_index(words: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Index of the n-th (0-based) nonzero byte of each word from :func:`_bool_words`.

    SWAR: multiplying by 0x0101..01 turns the 0/1 bytes into their running
    sums (at most 8, so no carries); the n-th set byte sits after exactly the
    bytes whose running sum is <= n, which a bytewise compare and a popcount count.
    """
    prefix = words * _BYTES1
    le = ((n.astype(_U) * _BYTES1) | _HIGH) - prefix     # high bit of byte k: n >= prefix[k]
    return np.bitwise_count(le & _HIGH).astype(np.int64)


def rows_equal(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise equality of two (m, k) uint64 matrices."""
    ne = a != b
    if ne.shape[1] % 8 == 0:
        w = ne.view(_U)                            # 8 booleans per word: one compare per 64 bytes
        return (w[:, 0] == 0) if w.shape[1] == 1 else ~w.any(axis=1)
    return ~ne.any(axis=1)


class Found(NamedTuple):
    """Result of :func:`lookup`: per key its slot (-1 if absent) and, if asked, its times."""

    slot: np.ndarray
    start: np.ndarray
    """Start per key if asked for (``want_rows``), else an empty array."""
    end: np.ndarray
    rounds: int


_NO_ROWS = np.empty(0, np.int64)       # Found.start/end when the times were not asked for
_NO_ROWS.flags.writeable = False


_FOUND, _NOT_HERE, _RETRY = 1, 0, 2


def row_is_stable(s2: np.ndarray, w1: int, dead_w: int | None,
                  q: Any = None) -> np.ndarray:
    """Which rows, read after a header ``wseq`` of ``w1``, are certainly untorn.

    Row versions are taken from the header's writer sequence: an operation
    that starts when ``wseq == w`` marks the rows it touches ``w + 1`` (odd)
    and then ``w + 2``.  So a row whose version, read *after* its payload, is
    at most ``w1`` rounded down to even was last changed by an operation that
    had finished before the reader read ``w1``, hence before it read the row
    (an odd version below that bound is left by no writer at all: a hostile
    or copied file; nothing is changing such a row either).  Any other row is
    re-read.  This needs one read of the version per row, after the payload,
    instead of the classic seqlock's two.

    With ``q`` (the header words), rows still in doubt are compared with the
    writer sequence read *now*, after their versions: a version above anything
    a writer can have stamped so far (``wseq``, or ``wseq + 1`` while an
    operation runs) was never written by a writer of this file, which
    therefore has not touched the row since (a ``cp`` of a live table, whose
    header was copied before its rows, or a hostile file).  Such a row is read
    as it is instead of being waited for forever.
    """
    ok = s2 <= _U(w1 & ~1)
    if dead_w is not None:
        # The writer of operation dead_w died (the header stays odd): its rows,
        # and rows a recovery it interrupted had made even (dead_w + 1), are
        # readable as they are, since no one is changing them.
        ok |= s2 <= _U(dead_w + 1)
    if q is not None and not ok.all():
        ok |= s2 > _U(_stamp_bound(int(q[_WSEQ_INDEX])))
    return ok


_MAX64 = (1 << 64) - 1


def _stamp_bound(w: int) -> int:
    """The highest row version writers can have stamped while the header reads ``w``."""
    return min(w + (w & 1), _MAX64)


def overversioned(seq: np.ndarray, w_after: int) -> np.ndarray:
    """Rows whose version (read before ``w_after``) no writer of this file has stamped."""
    return seq > _U(_stamp_bound(w_after))


CHUNK = 16384
"""Keys per slice of a batch: each round's temporaries (a 64-byte tag line and
an 88-byte row per key) then stay in the L2 cache; measured ~25% faster on
1M-key lookups than whole-batch rounds."""


def lookup(m: Mapping, tag: np.ndarray, keyq: np.ndarray, *, consistent: bool,
           want_rows: bool, stuck_ok: Callable[[], bool] | None = None,
           key_index: np.ndarray | None = None) -> Found:
    """Find many keys at once, in slices of :data:`CHUNK` keys (see :func:`_lookup`)."""
    n = len(tag)
    if n <= CHUNK:
        return _lookup(m, tag, keyq, consistent=consistent, want_rows=want_rows,
                       stuck_ok=stuck_ok, key_index=key_index)
    slot = np.empty(n, np.int64)
    start = np.empty(n, np.int64) if want_rows else _NO_ROWS
    end = np.empty(n, np.int64) if want_rows else _NO_ROWS
    rounds = 0
    for c in range(0, n, CHUNK):
        sl = slice(c, c + CHUNK)
        f = _lookup(m, tag[sl], keyq if key_index is not None else keyq[sl],
                    consistent=consistent, want_rows=want_rows, stuck_ok=stuck_ok,
                    key_index=None if key_index is None else key_index[sl])
        slot[sl] = f.slot
        if want_rows:
            start[sl], end[sl] = f.start, f.end
        rounds = max(rounds, f.rounds)
    return Found(slot, start, end, rounds)


def _lookup(m: Mapping, tag: np.ndarray, keyq: np.ndarray, *, consistent: bool,
            want_rows: bool, stuck_ok: Callable[[], bool] | None = None,
            key_index: np.ndarray | None = None) -> Found:
    """Find many keys at once.

    Parameters
    ----------
    m : Mapping
        The mapped table.
    tag : numpy.ndarray
        uint64 tags of the keys, shape (n,).
    keyq : numpy.ndarray
        The keys' padded fields as uint64 lanes, shape (n, key_field // 8), or
        a larger batch indexed by ``key_index``.
    consistent : bool
        True for lock-free readers: rows a writer may be changing are re-read
        (:func:`row_is_stable`).  A writer holding the lock passes False.
    want_rows : bool
        Also return the start/end of found rows.
    stuck_ok : callable, optional
        Asked when rows stay mid-write for a while: True if the writer that
        left them is dead (its rows are then read as they are, which is safe
        because a write publishes its fields in an order that keeps a
        half-done row self-consistent; see docs/format.md).
    key_index : numpy.ndarray, optional
        Row of ``keyq`` holding the key of each tag (default: the same row).
        Keys are compared only for tag hits, so this saves copying a whole
        batch of keys into a new order.
    """
    n = len(tag)
    nb = m.geometry.nbuckets
    slot = np.full(n, -1, np.int64)
    start = np.full(n, NOT_SET, np.int64) if want_rows else _NO_ROWS
    end = np.full(n, NOT_SET, np.int64) if want_rows else _NO_ROWS
    b = home_bucket(tag, nb)
    steps = np.zeros(n, np.int64)
    pend = np.arange(n)
    tags2d, rowq, seqcol, q = m.tags2d, m.rowq, m.seqcol, m.q
    w_index = _WSEQ_INDEX
    rounds = 0
    retry_since = 0.0
    dead_w: int | None = None
    while len(pend):
        rounds += 1
        w1 = q[w_index] if consistent else 0      # read before any tag or row of this round
        bb = b[pend] if rounds > 1 or n != len(pend) else b
        blk = np.take(tags2d, bb, axis=0)
        eqw = _bool_words(blk == (tag[pend] if rounds > 1 else tag)[:, None])
        has_empty = _bool_words(blk == EMPTY) != 0
        status = np.zeros(len(pend), np.int8)
        hit = np.flatnonzero(eqw != 0)            # (nonzero of a bool array is ~7x faster)
        if len(hit):
            w = eqw[hit]
            multi = (w & (w - _ONE)) != 0          # two equal tags in one bucket: 2**-64 rare
            if multi.any():
                for i in hit[multi]:
                    p = int(pend[i])
                    status[i] = _scan_bucket(m, p, int(bb[i]), int(tag[p]),
                                             keyq[p if key_index is None else key_index[p]],
                                             slot, start, end, consistent, dead_w, int(w1))
                hit, w = hit[~multi], w[~multi]
            s = bb[hit] * BUCKET + _byte_index(w)
            k = pend[hit]
            rw = np.take(rowq, s, axis=0)
            if consistent:
                stable = row_is_stable(seqcol[s], w1, dead_w, q)
                if not stable.all():
                    now = time.monotonic()
                    if not retry_since:
                        retry_since = now
                    elif now - retry_since > 0.05:
                        if stuck_ok is not None and w1 & 1 and stuck_ok():
                            dead_w = int(w1)
                        else:
                            time.sleep(0.001)      # a live writer is mid-batch: let it run
                    status[hit[~stable]] = _RETRY
                    hit, s, k, rw = hit[stable], s[stable], k[stable], rw[stable]
            same = rows_equal(rw[:, 3:], keyq[k if key_index is None else key_index[k]])
            if not same.all():          # a 64-bit tag shared by two keys: 2**-64 rare
                hit, s, k, rw = hit[same], s[same], k[same], rw[same]
            slot[k] = s
            if want_rows:
                start[k] = rw[:, 1].view(np.int64)
                end[k] = rw[:, 2].view(np.int64)
            status[hit] = _FOUND
        not_here = status == _NOT_HERE
        done = (status == _FOUND) | (not_here & has_empty)
        walk = not_here & ~has_empty
        adv = pend[walk]
        if len(adv):
            b[adv] += 1
            b[adv[b[adv] == nb]] = 0
            steps[adv] += 1
            # a key that has walked every bucket is absent (a table with no EMPTY slot left)
            done[walk] = steps[adv] >= nb
        pend = pend[~done]
    return Found(slot, start, end, rounds)


def _scan_bucket(m: Mapping, i: int, bucket: int, tag: int, want: np.ndarray, slot, start, end,
                 consistent: bool, dead_w: int | None, w1: int = 0) -> int:
    """Slow path for a bucket holding several slots with the key's tag (same rules as lookup)."""
    busy = False
    for j in range(BUCKET):
        s = bucket * BUCKET + j
        if int(m.tags[s]) != tag:
            continue
        row = m.rowq[s].copy()
        s2 = m.seqcol[s:s + 1].copy()
        if consistent and not row_is_stable(s2, w1, dead_w, m.q)[0]:
            busy = True
            continue
        if np.array_equal(row[3:], want):
            slot[i] = s
            if start is not _NO_ROWS:            # want_rows
                start[i] = row[1:2].view(np.int64)[0]
                end[i] = row[2:3].view(np.int64)[0]
            return _FOUND
    return _RETRY if busy else _NOT_HERE


def place(m: Mapping, tag: np.ndarray, fields: np.ndarray, key_index: np.ndarray,
          start: np.ndarray, end: np.ndarray, seq_odd: int) -> tuple[np.ndarray, int, int]:
    """:func:`_place` in slices of :data:`CHUNK` keys.

    Correct across slices because each slice is placed after the previous one
    is published: its rounds see the slots the earlier slices took.
    """
    n = len(tag)
    if n <= CHUNK:
        return _place(m, tag, fields, key_index, start, end, seq_odd)
    slots = np.empty(n, np.int64)
    rounds = reused = 0
    for c in range(0, n, CHUNK):
        sl = slice(c, c + CHUNK)
        s_, r_, u_ = _place(m, tag[sl], fields, key_index[sl], start[sl], end[sl], seq_odd)
        slots[sl] = s_
        rounds = max(rounds, r_)
        reused += u_
    return slots, rounds, reused


def _place(m: Mapping, tag: np.ndarray, fields: np.ndarray, key_index: np.ndarray,
           start: np.ndarray, end: np.ndarray, seq_odd: int) -> tuple[np.ndarray, int, int]:
    """Insert distinct absent keys, given in bucket order (sorted by tag >> 32).

    Each round, the keys aiming at one bucket are ranked in order and the
    r-th of them takes the bucket's r-th free slot (EMPTY or TOMBSTONE); those
    beyond the free slots move on to the next bucket, which they may do only
    because the bucket is now full (the invariant above).  Rows are written and
    published round by round, so each round sees the slots the previous took.

    Parameters
    ----------
    tag, start, end : numpy.ndarray
        One entry per key to insert.
    fields, key_index : numpy.ndarray
        The keys are ``fields[key_index]`` (``S{key_field}``).

    Returns
    -------
    slots : numpy.ndarray
        Slot of each key.
    rounds : int
        Rounds taken (the longest distance any key was pushed, plus one).
    reused : int
        Tombstones the new rows replaced.
    """
    n = len(tag)
    nb = m.geometry.nbuckets
    slots = np.empty(n, np.int64)
    b = home_bucket(tag, nb)
    pend = np.arange(n)
    rounds = 0
    reused = 0
    while len(pend):
        rounds += 1
        if rounds > nb:
            from .errors import FormatError
            raise FormatError(f"{m.path}: corrupt table: no free slot anywhere although the "
                              "header leaves room (run `npcalls check --repair`)")
        bb = b[pend] if rounds > 1 else b
        blk = np.take(m.tags2d, bb, axis=0)
        fw = _bool_words(blk < 2)                  # free: EMPTY or TOMBSTONE
        nfree = np.bitwise_count(fw).astype(np.int64)
        mlen = len(pend)
        idx = np.arange(mlen)
        newrun = np.ones(mlen, bool)
        newrun[1:] = bb[1:] != bb[:-1]
        rank = idx - np.maximum.accumulate(np.where(newrun, idx, 0))
        ok = rank < nfree
        allok = bool(ok.all())
        j = _nth_byte_index(fw if allok else fw[ok], rank if allok else rank[ok])
        okb = bb if allok else bb[ok]
        s = okb * BUCKET + j
        reused += int(np.count_nonzero(np.take(m.tags, s) == TOMBSTONE))
        if allok and rounds == 1:       # the common case: every key in its home bucket
            write_rows(m, s, tag, fields[key_index], start, end, seq_odd)
            return s, rounds, reused
        k = pend if allok else pend[ok]
        write_rows(m, s, tag[k], fields[key_index[k]], start[k], end[k], seq_odd)
        slots[k] = s
        if allok:
            break
        pend = pend[~ok]
        b[pend] += 1
        b[pend[b[pend] == nb]] = 0
    return slots, rounds, reused


def probe_lengths(m: Mapping) -> np.ndarray:
    """For every live slot, how many buckets a lookup of its key visits (1 = home bucket)."""
    tags = m.tags
    live = np.flatnonzero(tags >= 2)
    nb = m.geometry.nbuckets
    home = home_bucket(tags[live], nb)
    return (live // BUCKET - home) % nb + 1


# ----------------------------------------------------------------------------- single keys
# The same rules for one key at a time, in plain Python on the mapping: numpy's
# per-call overhead would cost more than the whole operation.

class SingleKeyView(NamedTuple):
    """What a single-key operation needs of a mapping, in one tuple.

    Unpacking one tuple costs less than the attribute look-ups it replaces
    (operations take about a microsecond); CallTable keeps it as a plain
    tuple, which CPython unpacks faster than a subclass.  Hot paths unpack it in one
    statement whose targets are these field names, in this order (``_`` for
    the ones not used): tests/test_protocol.py checks every such statement.
    """

    mm: Any             # the mmap (bytes slices compare keys)
    mv: Any             # memoryview of it (struct unpack_from / pack_into)
    q: Any              # the same as uint64 words
    qi: Any             # the same as int64 words
    nb: int             # buckets
    tags_off: int       # byte offset of the tags
    rows_off: int       # byte offset of the rows
    rs: int             # row size in bytes
    unpack_row: Any     # struct unpack_from of a row
    pack_row: Any       # struct pack_into of a row
    kw: int             # key width
    kf: int             # key field size
    seed: int           # XXH64 seed


def find_one(fast: tuple[Any, ...], field: bytes, tag: int) -> tuple[int, int]:
    """Writer-side probe for one key: (its slot or -1, first free slot on its path or -1).

    ``fast`` is a :class:`SingleKeyView` (or the plain tuple of one).
    """
    mm, mv, _, _, nb, tags_off, rows_off, rs, _, _, _, kf, _ = fast
    b = ((tag >> 32) * nb) >> 32
    free = -1
    rk = rows_off + 24
    left = nb               # a countdown, not range(): ~2% of a start() (same-process A/B)
    while left:
        left -= 1
        blk = _TAGS8.unpack_from(mv, tags_off + (b << 6))
        if tag in blk:
            j = blk.index(tag)
            while True:
                s = (b << 3) + j
                o = rk + s * rs
                if mm[o:o + kf] == field:
                    return s, free
                if tag not in blk[j + 1:]:
                    break
                j = blk.index(tag, j + 1)
        if 0 in blk:
            if free < 0:
                j = blk.index(0)
                if 1 in blk:
                    j = min(j, blk.index(1))
                free = (b << 3) + j
            return -1, free
        if free < 0 and 1 in blk:
            free = (b << 3) + blk.index(1)
        b += 1
        if b == nb:
            b = 0
    return -1, free
