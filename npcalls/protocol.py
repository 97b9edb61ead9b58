"""The write protocol of docs/format.md, in one place: the words writers touch, and their order.

Everything here runs with the writer lock held (:mod:`npcalls.locking`):

* the operation bracket on ``wseq`` (docs/format.md, "Writing", steps 2 and
  4): :class:`Operation`, or :func:`open_op` / :func:`close_op` where a
  context manager does not fit;
* a row's own ``seq`` window and publication order ("Writing", step 3), one
  row at a time (:func:`publish_row`, :func:`set_field`, :func:`free_slot`)
  or many (:func:`write_rows`, used by :func:`npcalls.probe.place`;
  :func:`set_fields`, :func:`free_slots`); a delete's EMPTY or TOMBSTONE
  ("Hashing and probing": :func:`remove_slots`, :func:`free_one`);
* the duration histogram ("Header, dynamic words": :func:`observe_duration`,
  :func:`observe_durations`);
* on taking the lock ("Writing", step 1, and "Recovery"):
  :func:`settle_sequence`, :func:`recover`, :func:`renumber`;
* following the path after a rebuild or a removal ("Rebuilding"): :func:`follow`.

The single-key write (:mod:`npcalls.single`) keeps an inlined copy of
:func:`set_field`, :func:`publish_row` and :func:`observe_duration` for
speed; ``tests/test_protocol.py`` checks that the two write the same bytes.
"""

from __future__ import annotations

import functools
import struct
from bisect import bisect_left as _bisect_left
from typing import Any

import numpy as np

from .buckets import _bool_words, home_bucket
from .errors import FormatError, TableNotFoundError, TableRemovedError
from .layout import (
    BUCKET,
    DURATION_BOUNDS_NS,
    EMPTY,
    STATE_LIVE,
    STATE_REMOVED,
    STATE_RETIRED,
    TOMBSTONE,
    W,
)
from .storage import Mapping, open_mapping, same_file, sweep_temps

__all__ = ["Operation", "open_op", "close_op", "publish_row", "set_field", "free_slot",
           "free_slots", "write_rows", "set_fields", "remove_slots", "free_one", "observe_duration", "observe_durations", "settle_sequence", "recover",
           "renumber", "follow", "WSEQ_WRAP"]

_W_STATE, _W_WSEQ, _W_COUNT, _W_TOMB = W["state"], W["wseq"], W["count"], W["tombstones"]
_W_NREM, _W_NREC = W["n_removed"], W["n_recoveries"]
_U = np.uint64
_U1 = np.uint64(1)
_TAGS8 = struct.Struct("<8Q")     # one bucket's tags
_W_DURSUM, _W_DUR0 = W["dur_sum_us"], W["dur_bucket_0"]
_DUR_BOUNDS = np.array(DURATION_BOUNDS_NS, np.int64)
_U64 = struct.Struct("<Q")
_DUR0_OFF, _DURSUM_OFF = _W_DUR0 * 8, _W_DURSUM * 8
_M64 = 0xFFFFFFFFFFFFFFFF

WSEQ_WRAP = 1 << 63
"""A writer sequence at or past this is renumbered (docs/format.md, "Writing")."""
_SLOW = 1 | WSEQ_WRAP


# ---------------------------------------------------------------- the operation bracket

def open_op(q: memoryview, w: int) -> None:
    """Start an operation: ``wseq`` from the even ``w`` to ``w + 1``."""
    q[_W_WSEQ] = w + 1


def close_op(q: memoryview, w: int) -> None:
    """End the operation :func:`open_op` started: ``wseq = w + 2``."""
    q[_W_WSEQ] = w + 2


class Operation:
    """The writer-sequence bracket as a context manager: ``with Operation(m.q, w) as seq_odd``.

    Closes the operation only when the block completes.  An exception leaves
    ``wseq`` odd on purpose: every step keeps each row self-consistent, and
    the next writer recovers (:func:`recover`) exactly as after a crash.
    """

    __slots__ = ("q", "w")

    def __init__(self, q: memoryview, w: int) -> None:
        self.q = q
        self.w = w

    def __enter__(self) -> int:
        self.q[_W_WSEQ] = self.w + 1
        return self.w + 1

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.q[_W_WSEQ] = self.w + 2


# ---------------------------------------------------------------- rows

@functools.lru_cache(maxsize=None)
def row_struct(key_field: int) -> struct.Struct:
    """A row's layout (seq, start, end, key) for ``struct`` (docs/format.md, "Rows")."""
    return struct.Struct(f"<Qqq{key_field}s")


def row_word(m: Mapping, slot: int) -> int:
    """Index in ``m.q`` of a slot's row (its ``seq`` word)."""
    g = m.geometry
    return (g.rows_offset + slot * g.row_size) >> 3


def publish_row(m: Mapping, w: int, slot: int, field: bytes, tag: int, start: int,
                end: int) -> None:
    """Write a new row into a free slot (EMPTY or TOMBSTONE) and publish it; counts follow.

    Inside an operation opened at ``w``.
    """
    q = m.q
    g = m.geometry
    o = row_word(m, slot)
    tw = (g.tags_offset >> 3) + slot
    was_tomb = q[tw] == TOMBSTONE
    q[o] = w + 1
    row_struct(g.key_field).pack_into(m.mv, o << 3, w + 1, start, end, field)
    q[tw] = tag                     # publish: the row is complete
    q[o] = w + 2
    q[_W_COUNT] += 1
    if was_tomb:
        q[_W_TOMB] -= 1


def set_field(m: Mapping, w: int, slot: int, col: int, ts: int) -> int:
    """Set start (``col`` 1) or end (2) of a live row; returns the row's other time."""
    o = row_word(m, slot)
    q = m.q
    q[o] = w + 1
    m.qi[o + col] = ts
    q[o] = w + 2
    return int(m.qi[o + 3 - col])


def free_slot(m: Mapping, w: int, slot: int) -> None:
    """Remove the live row in ``slot`` (EMPTY or TOMBSTONE by :func:`free_one`)."""
    q = m.q
    o = row_word(m, slot)
    q[o] = w + 1
    q[_W_TOMB] += free_one(m, slot)
    q[o] = w + 2
    q[_W_COUNT] -= 1
    q[_W_NREM] += 1


def free_slots(m: Mapping, w: int, slots: np.ndarray) -> None:
    """Remove the live rows in distinct ``slots`` (:func:`remove_slots`)."""
    q = m.q
    tomb = remove_slots(m, slots, w + 1)
    q[_W_COUNT] -= len(slots)
    q[_W_TOMB] += tomb
    q[_W_NREM] += len(slots)


# ---------------------------------------------------------------- many rows at once (vectorized)

def write_rows(m: Mapping, s: np.ndarray, tag: np.ndarray, fields: np.ndarray,
               start: np.ndarray, end: np.ndarray, seq_odd: int) -> None:
    """Write complete rows into free slots ``s`` and publish them (seqlock order).

    Field by field rather than as whole rows: building whole rows first would
    copy every key once more.
    """
    seq = m.seqcol
    rowq = m.rowq
    seq[s] = seq_odd                     # 1. the rows are being written
    rowq[s, 1] = start.view(_U)          # 2. payload
    rowq[s, 2] = end.view(_U)
    m.rows["key"][s] = fields
    m.tags[s] = tag                      # 3. publish
    seq[s] = seq_odd + 1                 # 4. stable again


def set_fields(m: Mapping, s: np.ndarray, column: int, values: np.ndarray, seq_odd: int) -> None:
    """Overwrite start (column 1) or end (column 2) of existing rows, seqlock order."""
    m.seqcol[s] = seq_odd
    m.rowq[s, column] = values.view(_U)
    m.seqcol[s] = seq_odd + 1


def remove_slots(m: Mapping, s: np.ndarray, seq_odd: int) -> int:
    """Free distinct live slots; returns the change in the number of tombstones.

    A freed slot becomes EMPTY when no live key's walk passes its bucket b:
    certainly so if b holds an EMPTY slot (the invariant above), and also if
    bucket b+1 holds an EMPTY slot and all of b+1's keys are at home (walks
    are runs of consecutive buckets, so a walk past b would end in b+1 or go
    through it).  In that second case b's old tombstones are reclaimed too.
    Only otherwise is a TOMBSTONE left.  Churn thus leaves few tombstones, and
    compaction (a rebuild) clears the rest when they pass 1/16 of the slots.

    The tag changes happen inside an odd-seq window like every other change,
    so a snapshot that copied a row while it was removed notices.
    """
    nb = m.geometry.nbuckets
    buckets = s // BUCKET
    blk = np.take(m.tags2d, buckets, axis=0)
    has_empty = _bool_words(blk == EMPTY) != 0
    clean = has_empty.copy()
    full = np.flatnonzero(~has_empty)
    if len(full) and nb > 1:
        nxt = (buckets[full] + 1) % nb
        nblk = np.take(m.tags2d, nxt, axis=0)
        away = (nblk >= 2) & (home_bucket(nblk.ravel(), nb).reshape(nblk.shape) != nxt[:, None])
        clean[full] = (_bool_words(nblk == EMPTY) != 0) & (_bool_words(away) == 0)
    reclaim = np.unique(buckets[clean & ~has_empty])      # full buckets no walk passes
    m.seqcol[s] = seq_odd
    m.tags[s] = np.where(clean, _U(EMPTY), _U(TOMBSTONE))
    cleared = 0
    if len(reclaim):
        rb = np.take(m.tags2d, reclaim, axis=0)
        tomb = np.flatnonzero((rb == TOMBSTONE).ravel())
        if len(tomb):
            slots = reclaim[tomb // BUCKET] * BUCKET + tomb % BUCKET
            m.tags[slots] = _U(EMPTY)
            cleared = len(slots)
    m.seqcol[s] = seq_odd + 1
    return int(np.count_nonzero(~clean)) - cleared


def free_one(m: Mapping, slot: int) -> int:
    """Free one live slot (lock held, row seq odd): :func:`remove_slots` for one key.

    Returns the change in the number of tombstones.
    """
    g = m.geometry
    nb = g.nbuckets
    q = m.q
    b = slot >> 3
    tw = g.tags_offset >> 3
    blk = _TAGS8.unpack_from(m.mv, g.tags_offset + (b << 6))
    if 0 in blk:
        q[tw + slot] = 0
        return 0
    c = b + 1 if b + 1 < nb else 0
    nxt = _TAGS8.unpack_from(m.mv, g.tags_offset + (c << 6))
    if nb > 1 and 0 in nxt and all(t < 2 or ((t >> 32) * nb) >> 32 == c for t in nxt):
        # no walk passes bucket b: free the slot and b's old tombstones
        q[tw + slot] = 0
        cleared = 0
        for j, t in enumerate(blk):
            if t == TOMBSTONE:
                q[tw + (b << 3) + j] = 0
                cleared += 1
        return -cleared
    q[tw + slot] = TOMBSTONE
    return 1


# ---------------------------------------------------------------- the duration histogram

def observe_duration(mv: memoryview, d: int) -> None:
    """Count one call that now has both times (lock held; see docs/format.md).

    On the single-key hot path: struct on the mapping's memoryview costs
    about half of numpy scalar arithmetic on the header words.
    """
    off = _DUR0_OFF + (_bisect_left(DURATION_BOUNDS_NS, d) << 3)
    _U64.pack_into(mv, off, (_U64.unpack_from(mv, off)[0] + 1) & _M64)
    if d > 0:
        _U64.pack_into(mv, _DURSUM_OFF, (_U64.unpack_from(mv, _DURSUM_OFF)[0] + d // 1000) & _M64)


def observe_durations(q: Any, d: np.ndarray) -> None:
    """Count many calls that now have both times (lock held)."""
    n = np.bincount(np.searchsorted(_DUR_BOUNDS, d, side="left"), minlength=len(_DUR_BOUNDS) + 1)
    for i in np.flatnonzero(n):
        q[_W_DUR0 + i] += int(n[i])
    q[_W_DURSUM] += np.sum(np.maximum(d, 0) // 1000, dtype=np.uint64)


# ---------------------------------------------------------------- taking over the table

def settle_sequence(m: Mapping, path: str) -> int:
    """With the lock held, before writing: returns the even writer sequence to start from.

    Revives a retired file nothing replaced (its rebuilder died before the
    rename: it is still the table), recovers from a writer that died
    mid-operation, renumbers a sequence past :data:`WSEQ_WRAP`.
    """
    q = m.q
    if q[_W_STATE] == STATE_RETIRED:
        q[_W_STATE] = STATE_LIVE
    w = q[_W_WSEQ]
    if w & _SLOW:
        if w >= WSEQ_WRAP:
            renumber(m)
        else:
            recover(m, path)
        w = q[_W_WSEQ]
    return w


def renumber(m: Mapping) -> None:
    """Start the writer sequence again from 2 (it passed 2**63: a corrupt or hostile header).

    Row versions go to 0 first (even and not above any writer sequence,
    so every reader accepts them), then the sequence; a crashed writer's
    leftovers are recovered on the way (odd rows made even, counts
    recomputed).
    """
    crashed = bool(m.q[_W_WSEQ] & 1)
    m.seqcol[:] = 0
    tags = m.tags
    m.q[_W_COUNT] = int(np.count_nonzero(tags >= 2))
    m.q[_W_TOMB] = int(np.count_nonzero(tags == TOMBSTONE))
    if crashed:
        m.q[_W_NREC] += 1
    m.q[_W_WSEQ] = 2


def recover(m: Mapping, path: str) -> None:
    """Repair what a writer killed mid-operation can leave: odd rows and stale counts.

    Every write publishes in an order that keeps each half-done row
    self-consistent (payload before tag, tag before seq is even), so
    making odd seq words even is enough for the rows; the counts are
    recomputed from the tags, and the dead writer's temporary files go.
    """
    seq = m.seqcol
    odd = np.flatnonzero(seq & _U1)
    if len(odd):
        seq[odd] = seq[odd] + _U1
    tags = m.tags
    m.q[_W_COUNT] = int(np.count_nonzero(tags >= 2))
    m.q[_W_TOMB] = int(np.count_nonzero(tags == TOMBSTONE))
    sweep_temps(path)
    m.q[_W_NREC] += 1
    m.q[_W_WSEQ] = m.q[_W_WSEQ] + 1


def follow(m: Mapping, path: str, readonly: bool) -> Mapping | None:
    """The mapping to use instead of ``m``, whose ``state`` word is not LIVE.

    Returns None if ``m`` is still the one to use (retired, but still the
    file at the path: its rebuilder died before renaming the new file over
    it), else the rebuilt file now at the path, opened.  Raises
    TableRemovedError if the table was removed, or the path now holds
    another table (docs/format.md, "Rebuilding").
    """
    state = m.q[_W_STATE]
    if state == STATE_REMOVED:
        raise TableRemovedError(f"table {path} was removed (unlinked)")
    if state != STATE_RETIRED:
        raise FormatError(f"{path}: unknown table state {int(state)} in the header (corrupt?)")
    if same_file(path, m.inode):
        return None
    try:
        new = open_mapping(path, readonly)
    except TableNotFoundError:
        raise TableRemovedError(f"table {path} was removed (unlinked)") from None
    g, ng = m.geometry, new.geometry
    if (ng.seed, ng.created_ns, ng.key_width) != (g.seed, g.created_ns, g.key_width):
        new.close()
        raise TableRemovedError(f"table {path} was removed; the table now at that path is "
                                "another one (open it again)")
    return new
