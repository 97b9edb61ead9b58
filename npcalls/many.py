"""The batch operations of a handle: ``get_many``, the batch writes, ``remove_many``.

:mod:`npcalls.single` is the one-key side of :class:`~npcalls.CallTable`;
this module is its batch side: checking the arguments, encoding and hashing
the keys, setting the refused keys aside, cutting large batches into slices
(:func:`npcalls.batching.run_in_slices`) and calling the batch semantics of
:mod:`npcalls.batching` with the lock held.

It does not know CallTable.  A handle passes what an operation needs: its
key geometry (:class:`KeyCodec`), a reader's lookup, or for writes a
:class:`WriterSide` (the lock, taking over the table under it, making room).
Each operation returns an :class:`Outcome`, which the handle turns into its
result and, for refused keys, a :class:`~npcalls.errors.BatchKeyError`
(:func:`finish`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, NamedTuple

import numpy as np

from . import batching
from .errors import BatchKeyError
from .hashing import tags_of
from .keys import EncodedKeys, encode_keys
from .layout import NOT_SET, W
from .probe import Found
from .storage import Mapping
from .timestamps import to_ns_array

if TYPE_CHECKING:
    from .locking import WriterLock

__all__ = ["GetManyResult", "KeyCodec", "WriterSide", "Outcome", "encode", "get_many",
           "record", "remove_many", "finish", "check_errors_arg"]

_W_COUNT = W["count"]


class GetManyResult(NamedTuple):
    """What :meth:`CallTable.get_many` returns: arrays aligned with the keys."""

    start: np.ndarray
    end: np.ndarray
    found: np.ndarray


class KeyCodec(NamedTuple):
    """A table's key geometry: all that encoding and hashing a batch needs.

    Fixed for the life of a table (rebuilds keep it).
    """

    key_width: int
    key_field: int
    seed: int


class WriterSide(NamedTuple):
    """The writer side of a handle, as the batch writes use it."""

    codec: KeyCodec
    lock: Callable[[], "WriterLock"]
    """Returns the writer lock, or raises the handle's error (closed, read-only)."""
    begin: Callable[[], tuple[Mapping, int]]
    """With the lock held: the mapping to write and its even writer sequence
    (rebuilds followed, a crashed writer recovered)."""
    make_room: Callable[[Mapping, int], tuple[Mapping, int]]
    """With the lock held: make room for that many new rows; the mapping and
    writer sequence to use then (a rebuilt file if it grew or compacted)."""


class Outcome(NamedTuple):
    """What a batch operation did: its result, the refused keys, the probe rounds."""

    result: Any
    bad: np.ndarray
    """Positions of the refused keys in the batch (ascending)."""
    reasons: list
    rounds: int | None
    """Probe rounds taken (the handle's ``last_rounds``); None if nothing was probed."""


class _Unnamed:
    """Stands in for keys that came from an iterator and can no longer be shown."""

    def __getitem__(self, i: int) -> str:
        return f"<key #{i}>"


def finish(out: Outcome, keys: Any, errors: str) -> Any:
    """``out.result``, or a :class:`BatchKeyError` carrying it if keys were refused and
    ``errors`` is "raise"."""
    if len(out.bad) and errors == "raise":
        if not hasattr(keys, "__getitem__"):
            keys = _Unnamed()
        raise BatchKeyError(out.bad, out.reasons, keys, out.result)
    return out.result


def check_errors_arg(errors: str) -> None:
    if errors not in ("raise", "ignore"):
        raise ValueError(f"errors must be 'raise' or 'ignore', not {errors!r}")


def encode(batch: Any, codec: KeyCodec) -> tuple[np.ndarray, np.ndarray, EncodedKeys]:
    """A batch's keys as uint64 lanes ``(n, key_field // 8)``, their tags, and the encoding."""
    enc = encode_keys(batch, codec.key_width, codec.key_field)
    n = len(enc.fields)
    keyq = enc.fields.view(np.uint64).reshape(n, codec.key_field // 8)
    return keyq, tags_of(enc.fields, codec.seed), enc


def _valid_index(n: int, bad: np.ndarray) -> np.ndarray | None:
    """Positions of the accepted keys, or None if all are."""
    if not len(bad):
        return None
    keep = np.ones(n, bool)
    keep[bad] = False
    return np.flatnonzero(keep)


def _times(ts: Any, n: int, allow_unset: bool) -> np.ndarray | None:
    """A batch's timestamps, validated in full before any write begins."""
    if ts is None and allow_unset:
        return None
    return to_ns_array(ts, n, allow_unset)


# ----------------------------------------------------------------------------- reads

def get_many(keys: Any, codec: KeyCodec, lookup: Callable[[np.ndarray, np.ndarray], Found],
             errors: str) -> Outcome:
    """Look up a batch with ``lookup(tag, keyq)`` (the handle's reader lookup)."""
    check_errors_arg(errors)
    batch = batching.as_batch(keys)
    if len(batch) <= batching.SLICE:
        return _get(batch, codec, lookup)
    # bounded memory: slice by slice
    n = len(batch)
    start = np.full(n, NOT_SET, np.int64)
    end = np.full(n, NOT_SET, np.int64)
    found = np.zeros(n, bool)
    rounds = [0]

    def step(a: int, b: int) -> tuple[np.ndarray, list]:
        out = _get(batch[a:b], codec, lookup)
        start[a:b], end[a:b], found[a:b] = out.result
        if out.rounds is not None:
            rounds.append(out.rounds)
        return out.bad, out.reasons

    bad, reasons = batching.run_in_slices(n, batching.SLICE, step)
    return Outcome(GetManyResult(start, end, found), bad, reasons, max(rounds))


def _get(batch: Any, codec: KeyCodec,
         lookup: Callable[[np.ndarray, np.ndarray], Found]) -> Outcome:
    """:func:`get_many` of a batch of at most :data:`~npcalls.batching.SLICE` keys."""
    keyq, tag, enc = encode(batch, codec)
    n = len(tag)
    valid = _valid_index(n, enc.bad)
    if valid is None:
        f = lookup(tag, keyq)
        return Outcome(GetManyResult(f.start, f.end, f.slot >= 0), enc.bad, enc.reasons,
                       f.rounds)
    f = lookup(tag[valid], keyq[valid])
    start = np.full(n, NOT_SET, np.int64)
    end = np.full(n, NOT_SET, np.int64)
    found = np.zeros(n, bool)
    start[valid], end[valid], found[valid] = f.start, f.end, f.slot >= 0
    return Outcome(GetManyResult(start, end, found), enc.bad, enc.reasons, f.rounds)


# ----------------------------------------------------------------------------- writes

def _wanted(started: np.ndarray, ended: np.ndarray, want: str) -> Any:
    return started if want == "start" else ended if want == "end" else (started, ended)


def record(keys: Any, start_ts: Any, end_ts: Any, side: WriterSide, *, insert: bool,
           errors: str, want: str, allow_unset: bool = False) -> Outcome:
    """Record start and/or end times for a batch (start_many, stop_many, record_many).

    ``want`` ("start", "end" or "both") picks the result: the bool array of
    keys whose start, or end, this call recorded, or both arrays.
    Timestamps are validated in full before anything is written.
    """
    check_errors_arg(errors)
    lock = side.lock()
    batch = batching.as_batch(keys)
    if len(batch) > batching.SLICE:
        # bounded memory: see npcalls.batching.run_in_slices
        return _record_sliced(batch, start_ts, end_ts, side, lock, insert, want, allow_unset)
    keyq, tag, enc = encode(batch, side.codec)
    n = len(tag)
    sv = _times(start_ts, n, allow_unset or want == "end")
    ev = _times(end_ts, n, allow_unset or want == "start")
    started = np.zeros(n, bool)
    ended = np.zeros(n, bool)
    valid = _valid_index(n, enc.bad)
    rounds = None
    if n and (valid is None or len(valid)):
        lock.acquire()
        try:
            rounds = _record_locked(side, valid, keyq, tag, sv, ev, insert, started, ended)
        finally:
            lock.release()
    return Outcome(_wanted(started, ended, want), enc.bad, enc.reasons, rounds)


def _record_sliced(batch: Any, start_ts: Any, end_ts: Any, side: WriterSide, lock: WriterLock,
                   insert: bool, want: str, allow_unset: bool) -> Outcome:
    """:func:`record` of a large batch, slice by slice under one hold of the lock.

    All timestamps are validated first (nothing is written if one is bad).
    Slicing is skipped when the table might not hold every key of the
    batch (and cannot grow): a batch that would overfill the table must
    change nothing, which only the whole batch's lookup can tell.
    """
    n = len(batch)
    sv = _times(start_ts, n, allow_unset or want == "end")
    ev = _times(end_ts, n, allow_unset or want == "start")
    started = np.zeros(n, bool)
    ended = np.zeros(n, bool)
    rounds = [0]

    def step(a: int, b: int) -> tuple[np.ndarray, list]:
        keyq, tag, enc = encode(batch[a:b], side.codec)
        valid = _valid_index(b - a, enc.bad)
        if valid is None or len(valid):
            rounds.append(_record_locked(side, valid, keyq, tag,
                                         None if sv is None else sv[a:b],
                                         None if ev is None else ev[a:b], insert,
                                         started[a:b], ended[a:b]))
        return enc.bad, enc.reasons

    lock.acquire()
    try:
        m, _ = side.begin()
        g = m.geometry
        size = (batching.SLICE if g.auto_grow or int(m.q[_W_COUNT]) + n <= g.limit
                else n)
        bad, reasons = batching.run_in_slices(n, size, step)
    finally:
        lock.release()
    return Outcome(_wanted(started, ended, want), bad, reasons, max(rounds))


def _record_locked(side: WriterSide, idx: np.ndarray | None, keyq: np.ndarray,
                   tag: np.ndarray, sv: np.ndarray | None, ev: np.ndarray | None,
                   insert: bool, started: np.ndarray, ended: np.ndarray) -> int:
    m, w = side.begin()
    return batching.record_locked(m, w, idx, keyq, tag, sv, ev, insert, started, ended,
                                  side.make_room)


def remove_many(keys: Any, side: WriterSide, errors: str) -> Outcome:
    """Remove a batch's keys; the result is a bool per key, True where this call removed it."""
    check_errors_arg(errors)
    lock = side.lock()
    batch = batching.as_batch(keys)
    if len(batch) <= batching.SLICE:
        return _remove(batch, side, lock)
    # bounded memory: slices of at most SLICE keys, under one hold of the lock
    removed = np.zeros(len(batch), bool)
    rounds: list[int | None] = [None]

    def step(a: int, b: int) -> tuple[np.ndarray, list]:
        out = _remove(batch[a:b], side, lock)
        removed[a:b] = out.result
        if out.rounds is not None:
            rounds.append(out.rounds)
        return out.bad, out.reasons

    with lock:
        bad, reasons = batching.run_in_slices(len(batch), batching.SLICE, step)
    return Outcome(removed, bad, reasons, rounds[-1])


def _remove(batch: Any, side: WriterSide, lock: WriterLock) -> Outcome:
    keyq, tag, enc = encode(batch, side.codec)
    n = len(tag)
    removed = np.zeros(n, bool)
    valid = _valid_index(n, enc.bad)
    idx = np.arange(n) if valid is None else valid
    rounds = None
    if len(idx):
        lock.acquire()
        try:
            m, w = side.begin()
            t, kq = (tag, keyq) if valid is None else (tag[idx], keyq[idx])
            hit, rounds = batching.remove_locked(m, w, t, kq)
            removed[idx[hit]] = True
        finally:
            lock.release()
    return Outcome(removed, enc.bad, enc.reasons, rounds)
