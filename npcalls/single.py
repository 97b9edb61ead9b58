"""The single-key operations: start, stop, remove and get, one key at a time.

These run once per SIP transaction in every proxy worker, so they stay
methods of :class:`~npcalls.CallTable` (through the :class:`SingleKeyOps`
base class: an extra call level costs a measurable share of a microsecond
operation) and work in plain Python on the mapping's words rather than
through numpy.  Every one of them finds its key with
:func:`npcalls.probe.find_one` (``get`` excepted: it walks the buckets itself
because it must also read each candidate row by the seqlock rule of
docs/format.md, "Reading without a lock") and encodes it with
:func:`key_tag`.  ``start``/``stop`` inline the row writes of
:mod:`npcalls.protocol` (docs/format.md, "Writing"); the rare cases (a
rebuilt or removed file, a crashed predecessor, a full table) go through
:meth:`SingleKeyOps._write_one_locked`, built on those references.
tests/test_protocol.py checks that both write the same bytes,
tests/test_single.py checks the key encoding, and
tests/test_model_hypothesis.py checks ``get`` against ``get_many`` (the
vectorized probe) and a model.
"""

from __future__ import annotations

import struct
import time
from bisect import bisect_left as _bisect_left
from typing import TYPE_CHECKING, Any

import xxhash

from . import probe, protocol
from .errors import NpcallsError
from .keys import encode_key
from .layout import DURATION_BOUNDS_NS, NOT_SET, TOMBSTONE, W
from .locking import LockFile, lock_holder
from .locking import enter as _enter
from .locking import leave as _leave
from .probe import find_one as _find_one
from .storage import Mapping
from .timestamps import to_ns

if TYPE_CHECKING:
    from .locking import WriterLock

__all__ = ["SingleKeyOps"]

_xxh = xxhash.xxh64_intdigest
_time_ns = time.time_ns
_TAGS8 = struct.Struct("<8Q")
_I64_MAX = (1 << 63) - 1
_W_STATE, _W_WSEQ, _W_COUNT, _W_TOMB = W["state"], W["wseq"], W["count"], W["tombstones"]
_W_NSTART, _W_NSTOP = W["n_started"], W["n_stopped"]
_W_LOCK = W["lock_ino"]
_SLOW = 1 | protocol.WSEQ_WRAP    # wseq bits that send a write to the general path
_W_DURSUM, _W_DUR0 = W["dur_sum_us"], W["dur_bucket_0"]
_U64 = struct.Struct("<Q")
_DUR0_OFF, _DURSUM_OFF = _W_DUR0 * 8, _W_DURSUM * 8
_M64 = 0xFFFFFFFFFFFFFFFF


def key_tag(call_id: Any, kw: int, kf: int, seed: int) -> tuple[bytes, int]:
    """The stored field and the tag of one Call-ID (docs/format.md, "Keys" and "Hashing").

    :func:`npcalls.keys.encode_key` and :func:`npcalls.hashing.tag_of` in one
    call, with the common case (an ASCII str that fits, without NUL) first;
    every other key, and every error, goes through ``encode_key``.
    :meth:`SingleKeyOps.get` carries the first three lines inline (the call
    costs ~4% of a get); tests/test_single.py checks both against the references.
    """
    field = (call_id.encode().ljust(kf, b"\0") if type(call_id) is str and call_id.isascii()
             and 0 < len(call_id) <= kw and "\0" not in call_id else encode_key(call_id, kw, kf))
    tag = _xxh(field, seed)
    return field, (tag if tag > 1 else tag + 2)


class SingleKeyOps:
    """start, stop, remove and get of :class:`~npcalls.CallTable` (its base class).

    Uses the handle's state that CallTable keeps: ``_fast`` (a
    :class:`npcalls.probe.SingleKeyView` as a plain tuple), the lock file,
    the limits of the current geometry, and its methods that follow rebuilds
    and take over the table under the lock.
    """

    _fast: tuple[Any, ...]
    _m: Mapping
    _lockfile: LockFile | None
    _limit: int
    _tomb_limit: int
    _path: str
    _lock_path: str
    _closed: bool

    if TYPE_CHECKING:
        def _live_mapping(self) -> Mapping: ...
        def _begin_locked(self) -> tuple[Mapping, int]: ...
        def _make_room_locked(self, m: Mapping, needed: int) -> tuple[Mapping, int]: ...
        def _unwritable(self) -> NpcallsError: ...
        def _writable_lock(self) -> WriterLock: ...

    def _insert_one(self, m: Mapping, w: int, slot: int, field: bytes, tag: int,
                    start: int, end: int) -> None:
        if slot < 0:
            raise NpcallsError(f"table {self._path}: no free slot on the key's probe path "
                               "although the counts say there is room (run `npcalls check "
                               "--repair`)")
        protocol.publish_row(m, w, slot, field, tag, start, end)

    def _write_one(self, call_id: Any, ts: Any, col: int, insert: bool) -> bool:
        """start() (col 1) and stop() (col 2): set a field if unset, inserting if allowed.

        This is the hottest path of the library (one call per SIP transaction
        in every proxy worker), so the row writes are inlined here: copies of
        :func:`npcalls.protocol.set_field`, :func:`~npcalls.protocol.observe_duration`
        and :func:`~npcalls.protocol.publish_row` inside the bracket of
        :class:`npcalls.protocol.Operation`, which are the reference;
        tests/test_protocol.py checks that both write the same bytes.  The
        probe is :func:`npcalls.probe.find_one` itself.  The rare cases (a
        rebuilt or removed file, a crashed predecessor, a full table) go
        through :meth:`_write_one_locked`, built on the references.
        """
        fast = self._fast
        mm, mv, q, qi, nb, tags_off, rows_off, rs, _, pack_row, kw, kf, seed = fast
        field, tag = key_tag(call_id, kw, kf, seed)
        if ts is None:
            ts = _time_ns()
        elif type(ts) is not int or not -_I64_MAX <= ts <= _I64_MAX:
            ts = to_ns(ts)
        lf = self._lockfile
        if lf is None:
            raise self._unwritable()
        # The writer lock's functions rather than a `with` block (which costs
        # ~0.5 us, a sixth of the operation).
        _enter(lf)
        try:
            w = q[_W_WSEQ]
            if q[_W_STATE] or w & _SLOW or q[_W_LOCK] != lf.ino:
                return self._write_one_locked(field, tag, ts, col, insert)
            # The home bucket settles nearly every call (docs/format.md, "Hashing
            # and probing"): the key is there, or the bucket has an EMPTY slot, so
            # the key is nowhere and its first free slot is in this bucket.  Any
            # other case walks with find_one.  (Calling find_one for every write
            # cost ~5% of a start().)
            hb = ((tag >> 32) * nb) >> 32
            blk = _TAGS8.unpack_from(mv, tags_off + (hb << 6))
            slot = -1
            if tag in blk:
                slot = (hb << 3) + blk.index(tag)
                o = rows_off + slot * rs + 24
                if mm[o:o + kf] != field:
                    slot, free = _find_one(fast, field, tag)
            elif 0 in blk:
                j = blk.index(0)
                free = (hb << 3) + (min(j, blk.index(1)) if 1 in blk else j)
            else:
                slot, free = _find_one(fast, field, tag)
            if slot >= 0:
                o = (rows_off + slot * rs) >> 3
                if qi[o + col] != NOT_SET:
                    return False
                q[_W_WSEQ] = w + 1
                q[o] = w + 1
                qi[o + col] = ts
                q[o] = w + 2
                q[_W_NSTART if col == 1 else _W_NSTOP] += 1
                other = qi[o + 3 - col]
                if other != NOT_SET:    # the call now has both times
                    d = ts - other if col == 2 else other - ts
                    b = _DUR0_OFF + (_bisect_left(DURATION_BOUNDS_NS, d) << 3)
                    _U64.pack_into(mv, b, _U64.unpack_from(mv, b)[0] + 1)
                    if d > 0:
                        _U64.pack_into(mv, _DURSUM_OFF, (_U64.unpack_from(
                            mv, _DURSUM_OFF)[0] + d // 1000) & _M64)
                q[_W_WSEQ] = w + 2
                return True
            if not insert:
                return False
            if q[_W_COUNT] >= self._limit or q[_W_TOMB] > self._tomb_limit or free < 0:
                return self._write_one_locked(field, tag, ts, col, insert)
            o = (rows_off + free * rs) >> 3
            tw = (tags_off >> 3) + free
            was_tomb = q[tw] == TOMBSTONE
            q[_W_WSEQ] = w + 1
            q[o] = w + 1
            if col == 1:
                pack_row(mv, o << 3, w + 1, ts, NOT_SET, field)
            else:
                pack_row(mv, o << 3, w + 1, NOT_SET, ts, field)
            q[tw] = tag                     # publish: the row is complete
            q[o] = w + 2
            q[_W_COUNT] += 1
            if was_tomb:
                q[_W_TOMB] -= 1
            q[_W_NSTART if col == 1 else _W_NSTOP] += 1
            q[_W_WSEQ] = w + 2
            return True
        finally:
            _leave(lf)

    def _write_one_locked(self, field: bytes, tag: int, ts: int, col: int, insert: bool) -> bool:
        """The general path of :meth:`_write_one` (lock held)."""
        m, w = self._begin_locked()
        slot, free = probe.find_one(self._fast, field, tag)
        if slot >= 0:
            if m.qi[protocol.row_word(m, slot) + col] != NOT_SET:
                return False
            with protocol.Operation(m.q, w):
                other = protocol.set_field(m, w, slot, col, ts)
                if other != NOT_SET:
                    protocol.observe_duration(m.mv, ts - other if col == 2 else other - ts)
                m.q[_W_NSTART if col == 1 else _W_NSTOP] += 1
            return True
        if not insert:
            return False
        g = m.geometry
        if m.q[_W_COUNT] >= g.limit or m.q[_W_TOMB] > g.tomb_limit:
            m, w = self._make_room_locked(m, 1)
            slot, free = probe.find_one(self._fast, field, tag)
        with protocol.Operation(m.q, w):
            if col == 1:
                self._insert_one(m, w, free, field, tag, ts, NOT_SET)
            else:
                self._insert_one(m, w, free, field, tag, NOT_SET, ts)
            m.q[_W_NSTART if col == 1 else _W_NSTOP] += 1
        return True

    def start(self, call_id: str | bytes, ts: Any = None) -> bool:
        """Record that a call started.

        Inserts the call with ``start = ts`` (now if None) and returns True.
        If the call is already present its first start is kept (retransmitted
        INVITE, re-INVITE) and False is returned, except that a call known only
        by its end (``stop(..., insert_missing=True)``) gets its start set.
        """
        return self._write_one(call_id, ts, 1, True)

    def stop(self, call_id: str | bytes, ts: Any = None, *, insert_missing: bool = False) -> bool:
        """Record that a call ended.

        Sets ``end = ts`` (now if None) on a present call whose end is unset
        and returns True; a second stop keeps the first end and returns False.
        A call that is not in the table is left alone (False) unless
        ``insert_missing`` is True, which records an end-only call (a BYE whose
        INVITE predates the log).
        """
        return self._write_one(call_id, ts, 2, insert_missing)

    def remove(self, call_id: str | bytes) -> bool:
        """Remove a call; True if it was present."""
        fast = self._fast
        _, _, q, _, _, _, _, _, _, _, kw, kf, seed = fast
        field, tag = key_tag(call_id, kw, kf, seed)
        lf = self._lockfile
        if lf is None:
            raise self._unwritable()
        _enter(lf)      # as in _write_one
        try:
            m = self._m
            if m.q is not q or q[_W_STATE] or q[_W_WSEQ] & _SLOW or q[_W_LOCK] != lf.ino:
                m, w = self._begin_locked()
                fast = self._fast
            else:
                w = q[_W_WSEQ]
            slot, _ = _find_one(fast, field, tag)
            if slot < 0:
                return False
            protocol.open_op(m.q, w)     # not a `with`: remove() is a single-key op
            protocol.free_slot(m, w, slot)
            protocol.close_op(m.q, w)
            return True
        finally:
            _leave(lf)

    # ------------------------------------------------------------------ reading

    def get(self, call_id: str | bytes) -> tuple[int, int] | None:
        """``(start, end)`` of a call, or None if absent.

        Takes no lock in the lock-free read mode; in the shared mode (see
        :meth:`open`) holds the shared lock for the probe only.

        Either value may be :data:`NOT_SET` (an active call has no end yet).
        """
        # The hot read path: the bucket walk of npcalls.probe.find_one and the
        # seq/row/seq read of docs/format.md ("Reading without a lock"),
        # inlined; tests/test_model_hypothesis.py checks get() against
        # get_many() (the vectorized lookup) and a model.
        _, mv, q, _, nb, tags_off, rows_off, rs, unpack_row, _, kw, kf, seed = self._fast
        # key_tag(), inlined: the call would cost ~4% of a get
        field = (call_id.encode().ljust(kf, b"\0") if type(call_id) is str and call_id.isascii()
                 and 0 < len(call_id) <= kw and "\0" not in call_id else encode_key(call_id, kw, kf))
        tag = _xxh(field, seed)
        if tag < 2:
            tag += 2
        if q[_W_STATE] and self._live_mapping().q is not q:
            # followed a rebuild: read the new file (CallTable.get, not self.get:
            # in shared read mode the caller already holds the read lock)
            return SingleKeyOps.get(self, call_id)
        b = ((tag >> 32) * nb) >> 32
        left = nb
        while True:
            blk = _TAGS8.unpack_from(mv, tags_off + (b << 6))
            if tag in blk:
                j = blk.index(tag)
                while True:
                    o = rows_off + ((b << 3) + j) * rs
                    o8 = o >> 3
                    s1 = q[o8]
                    _, st, en, key = unpack_row(mv, o)
                    if s1 != q[o8] or s1 & 1:
                        st, en, key = self._read_row_slow(mv, q, o, unpack_row)
                    if key == field:
                        return st, en
                    if tag not in blk[j + 1:]:          # another key with this tag: 2**-64
                        break
                    j = blk.index(tag, j + 1)
            if 0 in blk:
                return None
            left -= 1
            if not left:
                return None
            b += 1
            if b == nb:
                b = 0

    def _read_row_slow(self, mv: Any, q: Any, o: int, unpack_row: Any) -> tuple[int, int, bytes]:
        """Re-read a row a writer may be changing.

        Accepted (see :func:`npcalls.probe.row_is_stable`): the classic seqlock
        (the same even version before and after), a version at most the
        header's even writer sequence read before the row, or a version above
        anything a writer has stamped (a copied or hostile file: read as is).
        """
        o8 = o >> 3
        spins = 0
        while True:
            w1 = q[_W_WSEQ]
            s1 = q[o8]
            _, st, en, key = unpack_row(mv, o)
            s2 = q[o8]
            if s1 == s2 and not s1 & 1 or s2 <= w1 & ~1:
                return st, en, key
            if s1 == s2 and s2 > probe._stamp_bound(q[_W_WSEQ]):
                return st, en, key
            spins += 1
            if spins > 1000 and s1 == q[o8] and self._writer_is_dead(spins):
                return st, en, key

    def _writer_is_dead(self, spins: int) -> bool:
        """A row has stayed mid-write through ``spins`` re-reads: is its writer gone?

        If the lock is free, the writer died mid-row; a half-done row is
        still consistent because each field is published in a safe order
        (payload, then tag, then seq), so the reader may take it as it is.
        """
        if spins % 1000:
            return False
        time.sleep(0.0001 if spins < 100_000 else 0.001)
        return lock_holder(self._lock_path) is None
