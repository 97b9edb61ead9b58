"""CallTable: the shared-memory table of SIP calls.

Concurrency model (the LMDB shape: one writer at a time, readers never wait):

* Writers serialise on the writer lock (:mod:`npcalls.locking`).  Every write
  operation makes the header word ``wseq`` odd while it runs and even when it
  is done; a writer that finds it odd on taking the lock knows its
  predecessor died mid-operation and repairs the table first
  (:func:`npcalls.protocol.recover`).
* Readers take no lock.  Each row carries a version word ``seq``; batch
  reads and snapshots read ``wseq`` first and each row's ``seq`` after the
  row (the one-read rule of docs/format.md, "Reading without a lock"), while
  the single-key :meth:`CallTable.get` reads ``seq``, the row, ``seq``.  A
  row a writer was changing is read again.  Rows never move while a file is
  live, so a key present for a whole read is always found.  That needs x86's
  store order; on other CPUs (or on request) readers hold a shared lock for
  each read instead (:mod:`npcalls.readlock`).
* Growth and tombstone compaction build a new file and rename it over the
  path; the old file is marked RETIRED first.  A process notices at its next
  operation and re-attaches; a reader in the middle of a batch finishes on the
  old mapping, which no writer touches any more.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import struct
import threading
import time
from bisect import bisect_left as _bisect_left
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np
import xxhash

from . import lifecycle, maintenance, probe, protocol
from .batching import group_sorted
from .crashpoints import crashpoint
from .errors import (
    BatchKeyError,
    NpcallsError,
    ReadOnlyError,
    TableClosedError,
    TableNotFoundError,
)
from .hashing import tags_of
from .keys import encode_key, encode_keys
from .layout import (
    DEFAULT_MAX_LOAD,
    DURATION_BOUNDS_NS,
    DURATION_BOUNDS_S,
    FLAG_AUTO_GROW,
    NOT_SET,
    STATE_LIVE,
    STATE_REMOVED,
    STATE_RETIRED,
    TOMBSTONE,
    W,
    make_geometry,
    snapshot_dtype,
)
from .locking import WriterLock, lock_holder
from .locking import enter as _enter
from .locking import leave as _leave
from .readlock import SHARED, SharedReadLock, resolve_read_mode
from .storage import Mapping, open_mapping, resolve, sweep_temps
from .timestamps import to_ns, to_ns_array

__all__ = ["CallTable", "Stats", "Counters", "GetManyResult", "CheckReport"]

from .maintenance import CheckReport  # noqa: E402  (re-exported)

_xxh = xxhash.xxh64_intdigest
_time_ns = time.time_ns
_TAGS8 = struct.Struct("<8Q")
_I64_MAX = (1 << 63) - 1
_W_STATE, _W_WSEQ, _W_COUNT, _W_TOMB = W["state"], W["wseq"], W["count"], W["tombstones"]
_W_NSTART, _W_NSTOP, _W_NREM = W["n_started"], W["n_stopped"], W["n_removed"]
_W_LOCK = W["lock_ino"]
_WSEQ_WRAP = protocol.WSEQ_WRAP  # a writer sequence this high is renumbered
_SLOW = 1 | _WSEQ_WRAP      # wseq bits that send a write to the general path
_W_DURSUM, _W_DUR0 = W["dur_sum_us"], W["dur_bucket_0"]
_DUR_BOUNDS = np.array(DURATION_BOUNDS_NS, np.int64)
_U64 = struct.Struct("<Q")
_I64 = struct.Struct("<q")
_DUR0_OFF, _DURSUM_OFF = _W_DUR0 * 8, _W_DURSUM * 8
_M64 = 0xFFFFFFFFFFFFFFFF


def _observe_duration(mv: memoryview, d: int) -> None:
    """Count one call that now has both times (lock held; see docs/format.md).

    On the single-key hot path: struct on the mapping's memoryview costs
    about half of numpy scalar arithmetic on the header words.
    """
    off = _DUR0_OFF + (_bisect_left(DURATION_BOUNDS_NS, d) << 3)
    _U64.pack_into(mv, off, (_U64.unpack_from(mv, off)[0] + 1) & _M64)
    if d > 0:
        _U64.pack_into(mv, _DURSUM_OFF, (_U64.unpack_from(mv, _DURSUM_OFF)[0] + d // 1000) & _M64)


def _observe_durations(q: Any, d: np.ndarray) -> None:
    """Count many calls that now have both times (lock held)."""
    n = np.bincount(np.searchsorted(_DUR_BOUNDS, d, side="left"), minlength=len(_DUR_BOUNDS) + 1)
    for i in np.flatnonzero(n):
        q[_W_DUR0 + i] += int(n[i])
    q[_W_DURSUM] += np.sum(np.maximum(d, 0) // 1000, dtype=np.uint64)


class Counters(NamedTuple):
    """What :meth:`CallTable.counters` reports: header words only, no pass over the rows."""

    capacity: int
    limit: int
    count: int  # type: ignore[assignment]  # public field name; shadows tuple.count
    tombstones: int
    generation: int
    n_started: int
    n_stopped: int
    n_removed: int
    n_rebuilds: int
    n_recoveries: int
    duration_bounds_s: tuple[int, ...]
    """Upper bounds of the duration buckets (seconds); a last bucket holds the rest."""
    duration_buckets: tuple[int, ...]
    """Calls per bucket (not cumulative), len(duration_bounds_s) + 1 entries."""
    duration_sum_s: float


class Stats(NamedTuple):
    """What :meth:`CallTable.stats` reports."""

    path: str
    capacity: int
    count: int  # type: ignore[assignment]  # public field name; shadows tuple.count
    limit: int
    load_factor: float
    key_width: int
    bytes_per_slot: int
    file_bytes: int
    tombstones: int
    active: int
    ended: int
    end_only: int
    max_probe: int
    mean_probe: float
    generation: int
    n_started: int
    n_stopped: int
    n_removed: int
    n_rebuilds: int
    n_recoveries: int
    auto_grow: bool
    writer_pid: int | None


class GetManyResult(NamedTuple):
    """What :meth:`CallTable.get_many` returns: arrays aligned with the keys."""

    start: np.ndarray
    end: np.ndarray
    found: np.ndarray


class CallTable:
    """A table of SIP calls (Call-ID -> start, end) in shared memory.

    Do not instantiate directly: use :meth:`create`, :meth:`open` or
    :meth:`open_or_create`.  Any number of processes may attach to one table;
    all of them see every write at once.

    Timestamps are int64 nanoseconds since the Unix epoch; :data:`NOT_SET`
    (INT64_MIN, NaT as datetime64[ns]) means "not recorded".

    Examples
    --------
    >>> t = CallTable.create("demo-doc", capacity=1000)
    >>> t.start("a84b4c76e66710@pc33.atlanta.com", ts=1_000)
    True
    >>> t.stop("a84b4c76e66710@pc33.atlanta.com", ts=5_000)
    True
    >>> t.get("a84b4c76e66710@pc33.atlanta.com")
    (1000, 5000)
    >>> t.close(); CallTable.unlink("demo-doc")
    True
    """

    # ------------------------------------------------------------------ lifecycle

    def __init__(self, mapping: Mapping, lock_path: str, readonly: bool,
                 read_mode: str | None = None) -> None:
        self._m = mapping
        self._path = mapping.path
        self._lock_path = lock_path
        self._readonly = readonly
        self._closed = False
        # Serialises switching this handle to a rebuilt file between its threads.
        self._swap = threading.RLock()
        self._read_mode = resolve_read_mode(read_mode)
        self._rl: SharedReadLock | None = None
        if readonly:
            self._lock = None
        else:
            st = os.fstat(mapping.fd)
            self._lock = WriterLock(lock_path, st.st_mode & 0o7777, owner=(st.st_uid, st.st_gid))
        self._lockfile = None if self._lock is None else self._lock.lock_file
        if self._read_mode == SHARED:
            self._rl = SharedReadLock(lock_path, maintenance.file_mode(mapping.fd), self._path)
            try:
                with self._rl:      # fail at open, not at the first read, if it cannot work
                    pass
            except BaseException:
                if self._lock is not None:
                    self._lock.close()
                raise
            # The class whose get() takes the shared lock: the default mode's get()
            # keeps its fast path without even a test for the mode (and a bound
            # method stored on the instance would make a reference cycle).
            self.__class__ = _SharedReadCallTable
        self._set_geometry(mapping)
        self.last_rounds = 0
        """Probe rounds the last batch operation of this object took."""

    def _set_geometry(self, m: Mapping) -> None:
        g = m.geometry
        # Limits before the tuple: a thread that already sees the new mapping
        # in _fast must not use the old file's (smaller) limits with it.
        self._limit = g.limit
        self._tomb_limit = probe.tomb_limit(g)
        self._g = g
        self._kw = g.key_width
        self._kf = g.key_field
        self._seed = g.seed
        self._nb = g.nbuckets
        self._row = struct.Struct(f"<Qqq{g.key_field}s")
        # Everything a single-key operation needs, in one tuple: unpacking it
        # costs less than the attribute look-ups it replaces (ops are ~1 us).
        # A plain tuple of the named view: unpacking a tuple subclass takes
        # CPython's slow path (~5% of a get()).
        self._fast = tuple(probe.SingleKeyView(
            mm=m.mm, mv=m.mv, q=m.q, qi=m.qi, nb=g.nbuckets, tags_off=g.tags_offset,
            rows_off=g.rows_offset, rs=g.row_size, unpack_row=self._row.unpack_from,
            pack_row=self._row.pack_into, kw=g.key_width, kf=g.key_field, seed=g.seed))

    def _install(self, m: Mapping) -> None:
        """Switch this handle to ``m`` (a rebuilt file).

        The old mapping is not closed: another thread of this process may be
        in the middle of reading it (a batch finishes on the mapping it
        started on).  It is unmapped when the last reference to it goes.
        """
        with self._swap:
            self._m = m
            self._set_geometry(m)

    @classmethod
    def create(cls, name_or_path: str | os.PathLike, capacity: int, key_width: int = 64,
               mode: int = 0o600, *, max_load: float = DEFAULT_MAX_LOAD,
               auto_grow: bool = False, seed: int | None = None,
               read_mode: str | None = None) -> "CallTable":
        """Create a new, empty table and attach to it for writing.

        Parameters
        ----------
        name_or_path : str or os.PathLike
            A bare name (``"calls"`` -> ``/dev/shm/npcalls.calls``) or a path
            (anything containing ``/``; a table on disk persists).
        capacity : int
            Number of slots (rounded up to a multiple of 8).  The table accepts
            up to ``max_load * capacity`` calls.
        key_width : int, default 64
            Longest Call-ID in bytes (1..4096).  Longer keys are refused, never
            truncated.
        mode : int, default 0o600
            Permission bits of the table and lock files, applied exactly
            (not filtered by the umask).
        max_load : float, default 0.75
            Load factor limit (0.05..0.95).
        auto_grow : bool, default False
            Double the capacity instead of raising :class:`TableFullError`.
        seed : int, optional
            XXH64 seed.  Random by default, so that Call-IDs chosen by a
            remote party cannot be crafted to collide (hash flooding).
        read_mode : {"lockfree", "shared"}, optional
            This handle's read mode (see :meth:`open`).

        Raises
        ------
        TableExistsError
            Something already exists at the path (a symlink included).
        NpcallsError
            Not enough space to reserve the file.
        """
        path, lock_path = resolve(name_or_path)
        resolve_read_mode(read_mode)          # a bad mode is refused before anything is made
        if seed is None:
            seed = secrets.randbits(64)
        sweep_temps(path)
        g = make_geometry(capacity, key_width, seed, max_load, time.time_ns(),
                          FLAG_AUTO_GROW if auto_grow else 0)
        lifecycle.create_file(path, lock_path, g, mode)
        return cls.open(path, read_mode=read_mode)

    @classmethod
    def open(cls, name_or_path: str | os.PathLike, readonly: bool = False, *,
             read_mode: str | None = None) -> "CallTable":
        """Attach to an existing table.

        Parameters
        ----------
        readonly : bool, default False
            Map the file read-only: any write raises :class:`ReadOnlyError`.
            In the default lock-free read mode no lock file is needed or touched.
        read_mode : {"lockfree", "shared"}, optional
            How this handle's reads exclude torn rows.  ``"lockfree"`` (the
            default on x86-64): no lock, rows validated by their versions.
            ``"shared"`` (the default on other CPUs): each read holds a shared
            lock on the lock file for its duration, so writers wait for it;
            needs the lock file (created if missing).  Default:
            ``$NPCALLS_READ_MODE``, else the platform's.  See docs/format.md.

        Raises
        ------
        TableNotFoundError
            No table at that name or path.
        FormatError
            The file is not a valid npcalls table (truncated, foreign, corrupt,
            newer format); the message names what is wrong.
        """
        path, lock_path = resolve(name_or_path)
        m = open_mapping(path, readonly)
        if not readonly:
            sweep_temps(path)
        try:
            return cls(m, lock_path, readonly, read_mode)
        except BaseException:
            m.close()
            raise

    @classmethod
    def open_or_create(cls, name_or_path: str | os.PathLike, capacity: int,
                       key_width: int = 64, mode: int = 0o600, **kw: Any) -> "CallTable":
        """Attach to the table, creating it first if it does not exist (race-free)."""
        from .errors import TableExistsError
        for _ in range(10):
            try:
                return cls.open(name_or_path, read_mode=kw.get("read_mode"))
            except TableNotFoundError:
                pass
            try:
                return cls.create(name_or_path, capacity, key_width, mode, **kw)
            except TableExistsError:
                continue
        raise NpcallsError(f"could not open or create {name_or_path}")

    @staticmethod
    def unlink(name_or_path: str | os.PathLike) -> bool:
        """Remove a table and its lock file.

        Processes still attached are told at their next operation
        (:class:`TableRemovedError`); their mappings stay valid until they
        close.  Returns True if the table existed.
        """
        return lifecycle.unlink_table(*resolve(name_or_path))

    def close(self) -> None:
        """Detach.  Never removes the table: other processes keep using it."""
        if self._closed:
            return
        self._closed = True
        self._lockfile = None
        self._fast = _CLOSED_FAST
        if self._rl is not None:
            self._rl.close()
        if self._lock is not None:
            self._lock.close()
        self._m.close()

    def __enter__(self) -> "CallTable":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if not self._closed:
                self.close()
        except Exception:
            pass

    # ------------------------------------------------------------------ properties

    @property
    def path(self) -> str:
        """The table's data file."""
        return self._path

    @property
    def lock_path(self) -> str:
        """The table's lock file."""
        return self._lock_path

    @property
    def capacity(self) -> int:
        """Number of slots."""
        self._live_mapping()
        return self._g.capacity

    @property
    def key_width(self) -> int:
        """Longest accepted Call-ID, in bytes."""
        return self._kw

    @property
    def max_load(self) -> float:
        return self._g.max_load

    @property
    def limit(self) -> int:
        """The most calls the table accepts at its current capacity."""
        self._live_mapping()
        return self._g.limit

    @property
    def readonly(self) -> bool:
        return self._readonly

    @property
    def read_mode(self) -> str:
        """``"lockfree"`` or ``"shared"``: how this handle's reads exclude torn rows."""
        return self._read_mode

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def seed(self) -> int:
        """The XXH64 seed of this table."""
        return self._seed

    def __len__(self) -> int:
        return int(self._live_mapping().q[_W_COUNT])

    def __repr__(self) -> str:
        if self._closed:
            return f"<CallTable {self._path} (closed)>"
        m = self._live_mapping()
        n = int(m.q[_W_COUNT])
        ro = " readonly" if self._readonly else ""
        return (f"<CallTable {self._path}{ro}: {n} calls, capacity {self._g.capacity} "
                f"(load {n / self._g.capacity:.2f}), key_width {self._kw}>")

    def _repr_html_(self) -> str:
        """Jupyter's view: capacity, calls, active calls, load and a few rows."""
        from .display import table_html
        return table_html(self)

    # ------------------------------------------------------------------ mapping state

    def _live_mapping(self) -> Mapping:
        """The current mapping, following a rebuild or noticing a removal (readers)."""
        if self._closed:
            raise TableClosedError(f"table {self._path} is closed")
        m = self._m
        if m.q[_W_STATE]:
            m = self._follow()
        return m

    def _follow(self) -> Mapping:
        """Follow a rebuild, or raise TableRemovedError; returns the mapping to use.

        A file marked retired that is still the one at the path (its
        rebuilder died between retiring it and renaming the new file over it)
        is returned as it is: it still holds the table, readers answer from
        it, and the next writer revives it (:meth:`_begin_locked`).
        """
        while True:
            with self._swap:
                m = self._m
                if not m.q[_W_STATE]:
                    return m                # another thread followed already
                new = protocol.follow(m, self._path, self._readonly)
                if new is None:
                    return m
                self._install(new)

    # ------------------------------------------------------------------ writing

    @contextlib.contextmanager
    def locked(self, timeout: float | None = None) -> Iterator["CallTable"]:
        """Hold the writer lock across several operations (re-entrant).

        Single operations take the lock themselves; holding it around a loop
        of them saves the two system calls each would spend on it.
        """
        lock = self._writable_lock()
        lock.acquire(timeout)
        try:
            yield self
        finally:
            lock.release()

    def _writable_lock(self) -> WriterLock:
        """The writer lock, or the right error for a closed or read-only table."""
        if self._closed or self._lock is None:
            raise self._unwritable()
        return self._lock

    def _unwritable(self) -> NpcallsError:
        """The error for writing through a closed or read-only handle."""
        if self._closed:
            return TableClosedError(f"table {self._path} is closed")
        return ReadOnlyError(f"table {self._path} was opened read-only")

    def _begin_locked(self) -> tuple[Mapping, int]:
        """With the lock held: follow rebuilds, make sure the lock is the table's lock
        (the lock file may have been removed or replaced), revive a retired file that
        nothing replaced, recover a crashed writer; return (mapping, wseq)."""
        m = self._settled_locked()
        return m, protocol.settle_sequence(m, self._path)

    def _settled_locked(self) -> Mapping:
        """With the lock held: the mapping to write, once our lock is the table's lock."""
        lock = self._lock
        assert lock is not None             # a writable handle
        ino = lock.lock_file.ino
        while True:
            m = self._m
            if m.q[_W_STATE]:
                m = self._follow()
            if m.q[_W_LOCK] == ino:
                return m
            lock.settle(m.q, _W_LOCK)   # may have waited: look at the path again
            ino = lock.lock_file.ino

    def _insert_one(self, m: Mapping, w: int, slot: int, field: bytes, tag: int,
                    start: int, end: int) -> None:
        if slot < 0:
            raise NpcallsError(f"table {self._path}: no free slot on the key's probe path "
                               "although the counts say there is room (run `npcalls check "
                               "--repair`)")
        protocol.publish_row(m, w, slot, field, tag, start, end)

    def _make_room_locked(self, m: Mapping, needed: int) -> tuple[Mapping, int]:
        """Ensure ``needed`` more rows fit (:func:`npcalls.maintenance.make_room`)."""
        new = maintenance.make_room(self._path, m, needed)
        if new is not None:
            self._install(new)
            m = new
        return m, int(m.q[_W_WSEQ])

    def _write_one(self, call_id: Any, ts: Any, col: int, insert: bool) -> bool:
        """start() (col 1) and stop() (col 2): set a field if unset, inserting if allowed.

        This is the hottest path of the library (one call per SIP transaction
        in every proxy worker), so the probe and the row writes are inlined
        here: copies of :func:`npcalls.probe.find_one`,
        :func:`npcalls.protocol.set_field` and :func:`npcalls.protocol.publish_row`
        inside the bracket of :class:`npcalls.protocol.Operation`, which are the
        reference; tests/test_protocol.py checks that both write the same bytes.
        The rare cases (a rebuilt or removed file, a crashed predecessor, a full
        table) go through :meth:`_write_one_locked`, built on the reference.
        """
        mm, mv, q, qi, nb, tags_off, rows_off, rs, _, pack_row, kw, kf, seed = self._fast
        if type(call_id) is str and call_id.isascii():      # encode_key's common case
            field = call_id.encode()
            if not 0 < len(field) <= kw or 0 in field:
                field = encode_key(call_id, kw, kf)
            else:
                field = field.ljust(kf, b"\x00")
        else:
            field = encode_key(call_id, kw, kf)
        if ts is None:
            ts = _time_ns()
        elif type(ts) is not int or not -_I64_MAX <= ts <= _I64_MAX:
            ts = to_ns(ts)
        tag = _xxh(field, seed)
        if tag < 2:
            tag += 2
        lf = self._lockfile
        if lf is None:
            raise self._unwritable()
        # The writer lock's functions rather than a `with` block (which costs
        # ~0.5 us, a sixth of the operation).
        _enter(lf)
        try:
            if q[_W_STATE] or q[_W_WSEQ] & _SLOW or q[_W_LOCK] != lf.ino:
                return self._write_one_locked(field, tag, ts, col, insert)
            b = ((tag >> 32) * nb) >> 32
            free = -1
            left = nb
            while left:
                left -= 1
                blk = _TAGS8.unpack_from(mv, tags_off + (b << 6))
                if tag in blk:
                    j = blk.index(tag)
                    while True:
                        o = rows_off + ((b << 3) + j) * rs
                        if mm[o + 24:o + 24 + kf] == field:
                            o >>= 3
                            if qi[o + col] != NOT_SET:
                                return False
                            w = q[_W_WSEQ]
                            q[_W_WSEQ] = w + 1
                            q[o] = w + 1
                            qi[o + col] = ts
                            q[o] = w + 2
                            q[_W_NSTART if col == 1 else _W_NSTOP] += 1
                            other = _I64.unpack_from(mv, (o + 3 - col) << 3)[0]
                            if other != NOT_SET:    # the call now has both times
                                # _observe_duration, inlined (hot path)
                                d = ts - other if col == 2 else other - ts
                                b = _DUR0_OFF + (_bisect_left(DURATION_BOUNDS_NS, d) << 3)
                                _U64.pack_into(mv, b, _U64.unpack_from(mv, b)[0] + 1)
                                if d > 0:
                                    _U64.pack_into(mv, _DURSUM_OFF, (_U64.unpack_from(
                                        mv, _DURSUM_OFF)[0] + d // 1000) & _M64)
                            q[_W_WSEQ] = w + 2
                            return True
                        if tag not in blk[j + 1:]:
                            break
                        j = blk.index(tag, j + 1)
                if 0 in blk:
                    if free < 0:
                        j = blk.index(0)
                        if 1 in blk:
                            j = min(j, blk.index(1))
                        free = (b << 3) + j
                    break
                if free < 0 and 1 in blk:
                    free = (b << 3) + blk.index(1)
                b += 1
                if b == nb:
                    b = 0
            if not insert:
                return False
            if q[_W_COUNT] >= self._limit or q[_W_TOMB] > self._tomb_limit or free < 0:
                return self._write_one_locked(field, tag, ts, col, insert)
            w = q[_W_WSEQ]
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
                    _observe_duration(m.mv, ts - other if col == 2 else other - ts)
                m.q[_W_NSTART if col == 1 else _W_NSTOP] += 1
            return True
        if not insert:
            return False
        g = self._g
        if m.q[_W_COUNT] >= g.limit or m.q[_W_TOMB] > probe.tomb_limit(g):
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
        field = encode_key(call_id, self._kw, self._kf)
        tag = _xxh(field, self._seed)
        if tag < 2:
            tag += 2
        with self._writable_lock():
            m, w = self._begin_locked()
            slot, _ = probe.find_one(self._fast, field, tag)
            if slot < 0:
                return False
            protocol.open_op(m.q, w)     # not a `with`: remove() is a single-key op
            protocol.free_slot(m, w, slot)
            protocol.close_op(m.q, w)
            return True

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
        # encode_key's common case, inlined (a function call is ~8% of a get)
        if type(call_id) is str and call_id.isascii():
            field = call_id.encode()
            if not 0 < len(field) <= kw or 0 in field:
                field = encode_key(call_id, kw, kf)
            else:
                field = field.ljust(kf, b"\x00")
        else:
            field = encode_key(call_id, kw, kf)
        tag = _xxh(field, seed)
        if tag < 2:
            tag += 2
        if q[_W_STATE] and self._live_mapping().q is not q:
            # followed a rebuild: read the new file (CallTable.get, not self.get:
            # in shared read mode the caller already holds the read lock)
            return CallTable.get(self, call_id)
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

    def __contains__(self, call_id: object) -> bool:
        return self.get(call_id) is not None  # type: ignore[arg-type]

    def __getitem__(self, call_id: str | bytes) -> tuple[int, int]:
        r = self.get(call_id)
        if r is None:
            raise KeyError(call_id)
        return r

    def __iter__(self) -> Iterator[str]:
        """Iterate over the Call-IDs present (a snapshot, decoded as UTF-8)."""
        for k in self.snapshot()["key"]:
            yield k.decode("utf-8", "surrogateescape")

    # ------------------------------------------------------------------ batches

    def _encode_batch(self, keys: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, Any]:
        enc = encode_keys(keys, self._kw, self._kf)
        n = len(enc.fields)
        keyq = enc.fields.view(np.uint64).reshape(n, self._kf // 8)
        tag = tags_of(enc.fields, self._seed)
        return enc.fields, keyq, tag, enc

    @staticmethod
    def _raise_bad(enc: Any, keys: Any, result: Any, errors: str) -> None:
        if len(enc.bad) and errors == "raise":
            if not hasattr(keys, "__getitem__"):
                keys = _Unnamed()
            raise BatchKeyError(enc.bad, enc.reasons, keys, result)

    def get_many(self, keys: Sequence[str | bytes] | np.ndarray, *,
                 errors: str = "raise") -> GetManyResult:
        """Look up many calls at once, without taking a lock (lock-free read mode).

        In the shared read mode the shared lock is held per slice of 16,384
        keys, so writers wait for one slice at most.

        Parameters
        ----------
        keys : sequence of str/bytes, or numpy S/U array
        errors : {"raise", "ignore"}
            What to do about invalid keys: "raise" (default) raises
            :class:`BatchKeyError` listing their positions, with the full
            result in its ``result`` attribute; "ignore" reports them as not
            found.

        Returns
        -------
        GetManyResult
            ``(start, end, found)``: int64, int64 and bool arrays aligned with
            ``keys``; start/end are NOT_SET where not found or not recorded.
        """
        _check_errors_arg(errors)
        fields, keyq, tag, enc = self._encode_batch(keys)
        valid = _valid_index(len(fields), enc.bad)
        if valid is None:
            f = self._lookup_read(tag, keyq)
            res = GetManyResult(f.start, f.end, f.slot >= 0)
        else:
            f = self._lookup_read(tag[valid], keyq[valid])
            n = len(fields)
            start = np.full(n, NOT_SET, np.int64)
            end = np.full(n, NOT_SET, np.int64)
            found = np.zeros(n, bool)
            start[valid], end[valid], found[valid] = f.start, f.end, f.slot >= 0
            res = GetManyResult(start, end, found)
        self.last_rounds = f.rounds
        self._raise_bad(enc, keys, res, errors)
        return res

    def contains_many(self, keys: Sequence[str | bytes] | np.ndarray, *,
                      errors: str = "raise") -> np.ndarray:
        """Boolean array: which keys are present (invalid keys: see :meth:`get_many`)."""
        try:
            return self.get_many(keys, errors=errors).found
        except BatchKeyError as e:
            e.result = e.result.found
            raise

    def _lookup_read(self, tag: np.ndarray, keyq: np.ndarray) -> probe.Found:
        """A reader's batch lookup, in this handle's read mode."""
        rl = self._rl
        if rl is None:
            return probe.lookup(self._live_mapping(), tag, keyq, consistent=True,
                                want_rows=True, stuck_ok=self._stuck_ok)
        # Shared mode: under the shared lock no writer runs, so rows are read
        # as they are; the lock is taken per slice so that writers wait for one
        # slice at most, never for a whole large batch.
        n = len(tag)
        if n <= probe.CHUNK:
            with rl:
                return probe.lookup(self._live_mapping(), tag, keyq, consistent=False,
                                    want_rows=True)
        slot = np.empty(n, np.int64)
        start = np.empty(n, np.int64)
        end = np.empty(n, np.int64)
        rounds = 0
        for c in range(0, n, probe.CHUNK):
            sl = slice(c, c + probe.CHUNK)
            with rl:
                f = probe.lookup(self._live_mapping(), tag[sl], keyq[sl], consistent=False,
                                 want_rows=True)
            slot[sl], start[sl], end[sl] = f.slot, f.start, f.end
            rounds = max(rounds, f.rounds)
        return probe.Found(slot, start, end, rounds)

    def _stuck_ok(self) -> bool:
        return lock_holder(self._lock_path) is None

    def start_many(self, keys: Sequence[str | bytes] | np.ndarray, ts: Any = None, *,
                   errors: str = "raise") -> np.ndarray:
        """Record many call starts; exactly like :meth:`start` on each key in order.

        Parameters
        ----------
        keys : sequence of str/bytes, or numpy S/U array
        ts : None, scalar, or array of int64 ns / datetime64, optional
            One timestamp per key, one for all, or None for now.
        errors : {"raise", "ignore"}
            Invalid keys are skipped either way (every valid row is applied);
            "raise" then raises :class:`BatchKeyError` naming their positions.

        Returns
        -------
        numpy.ndarray
            bool per key: True where this call recorded the start.
        """
        started, _ = self._record(keys, ts, None, insert=True, errors=errors, want="start")
        return started

    def stop_many(self, keys: Sequence[str | bytes] | np.ndarray, ts: Any = None, *,
                  insert_missing: bool = False, errors: str = "raise") -> np.ndarray:
        """Record many call ends; exactly like :meth:`stop` on each key in order.

        Returns
        -------
        numpy.ndarray
            bool per key: True where this call recorded the end.
        """
        _, ended = self._record(keys, None, ts, insert=insert_missing, errors=errors, want="end")
        return ended

    def record_many(self, keys: Sequence[str | bytes] | np.ndarray, start: Any = None,
                    end: Any = None, *, insert: bool = True,
                    errors: str = "raise") -> tuple[np.ndarray, np.ndarray]:
        """Record start and/or end times for many calls in one pass (CDRs, log replays).

        For each key in order: an absent key is inserted (if ``insert``);
        then its start is set if it is unset and this row gives one, and
        likewise its end.  ``NOT_SET`` entries in ``start`` / ``end`` mean
        "this row does not know".  Equivalent to ``start()`` then
        ``stop(insert_missing=insert)`` per row, so the order of a BYE and its
        INVITE in a log does not change the result.

        Returns
        -------
        (numpy.ndarray, numpy.ndarray)
            bool per key: whether its start, and its end, were recorded.
        """
        return self._record(keys, start, end, insert=insert, errors=errors, want="both",
                            allow_unset=True)

    def _record(self, keys: Any, start_ts: Any, end_ts: Any, *, insert: bool, errors: str,
                want: str, allow_unset: bool = False) -> tuple[np.ndarray, np.ndarray]:
        _check_errors_arg(errors)
        lock = self._writable_lock()
        fields, keyq, tag, enc = self._encode_batch(keys)
        n = len(fields)
        sv = _times(start_ts, n, allow_unset or want == "end")
        ev = _times(end_ts, n, allow_unset or want == "start")
        started = np.zeros(n, bool)
        ended = np.zeros(n, bool)
        valid = _valid_index(n, enc.bad)
        if n and (valid is None or len(valid)):
            lock.acquire()
            try:
                self._record_locked(valid, keyq, tag, sv, ev, insert, started, ended)
            finally:
                lock.release()
        self._raise_bad(enc, keys, (started if want == "start" else ended if want == "end"
                                    else (started, ended)), errors)
        return started, ended

    def _record_locked(self, idx: np.ndarray | None, keyq: np.ndarray, tag: np.ndarray,
                       sv: np.ndarray | None, ev: np.ndarray | None, insert: bool,
                       started: np.ndarray, ended: np.ndarray) -> None:
        m, w = self._begin_locked()
        t = tag if idx is None else tag[idx]
        kq = keyq if idx is None else keyq[idx]
        grp = group_sorted(t, kq)
        o = grp.order
        rep = o[grp.first]                  # position of each key's first row
        rt = t[rep]
        while True:
            f = probe.lookup(m, rt, kq, consistent=False, want_rows=True, key_index=rep)
            found = f.slot >= 0
            new_groups = np.flatnonzero(~found) if insert else np.empty(0, np.int64)
            if not len(new_groups):
                break
            m2, w = self._make_room_locked(m, len(new_groups))
            if m2 is m:
                break
            m = m2                          # rebuilt: slots moved, look again
        rounds = f.rounds
        q = m.q
        seq_odd = w + 1
        protocol.open_op(q, w)
        gid = grp.group
        ngroups = len(rep)
        new_vals = {1: np.full(ngroups, NOT_SET, np.int64), 2: np.full(ngroups, NOT_SET, np.int64)}
        upd_vals = {1: np.full(ngroups, NOT_SET, np.int64), 2: np.full(ngroups, NOT_SET, np.int64)}
        for vals, col, out, counter in ((sv, 1, started, _W_NSTART), (ev, 2, ended, _W_NSTOP)):
            if vals is None:
                continue
            v = (vals if idx is None else vals[idx])[o]     # sorted batch order
            rows = np.flatnonzero(v != NOT_SET)
            if not len(rows):
                continue
            g = gid[rows]
            lead = np.ones(len(rows), bool)
            lead[1:] = g[1:] != g[:-1]
            win, wg = rows[lead], g[lead]   # the first row with a value, per key
            fnd = found[wg]
            cur = (f.start if col == 1 else f.end)[wg]
            upd = fnd & (cur == NOT_SET)
            if upd.any():
                probe.set_field(m, f.slot[wg[upd]], col, v[win[upd]], seq_odd)
                upd_vals[col][wg[upd]] = v[win[upd]]
            rec = upd
            if insert:
                new_vals[col][wg[~fnd]] = v[win[~fnd]]
                rec = upd | ~fnd
            hit_rows = o[win[rec]]
            out[hit_rows if idx is None else idx[hit_rows]] = True
            q[counter] += int(np.count_nonzero(rec))
        # Calls that got their second time in this batch enter the duration histogram.
        s_old = np.where(found, f.start, NOT_SET)
        e_old = np.where(found, f.end, NOT_SET)
        s_new = np.where(s_old != NOT_SET, s_old, np.where(found, upd_vals[1], new_vals[1]))
        e_new = np.where(e_old != NOT_SET, e_old, np.where(found, upd_vals[2], new_vals[2]))
        done = (s_new != NOT_SET) & (e_new != NOT_SET) & ((s_old == NOT_SET) | (e_old == NOT_SET))
        if done.any():
            _observe_durations(q, e_new[done] - s_new[done])
        crashpoint("batch-fields-set")
        if len(new_groups):
            fields = kq.view(f"S{self._kf}").reshape(len(kq))
            _, pr, reused = probe.place(m, rt[new_groups], fields, rep[new_groups],
                                        new_vals[1][new_groups], new_vals[2][new_groups], seq_odd)
            rounds += pr
            crashpoint("batch-placed")
            q[_W_COUNT] += len(new_groups)
            q[_W_TOMB] -= reused
        protocol.close_op(q, w)
        self.last_rounds = rounds

    def remove_many(self, keys: Sequence[str | bytes] | np.ndarray, *,
                    errors: str = "raise") -> np.ndarray:
        """Remove many calls; bool per key, True where this call removed it."""
        _check_errors_arg(errors)
        lock = self._writable_lock()
        fields, keyq, tag, enc = self._encode_batch(keys)
        n = len(fields)
        removed = np.zeros(n, bool)
        valid = _valid_index(n, enc.bad)
        idx = np.arange(n) if valid is None else valid
        if len(idx):
            lock.acquire()
            try:
                m, w = self._begin_locked()
                t, kq = (tag, keyq) if valid is None else (tag[idx], keyq[idx])
                grp = group_sorted(t, kq)
                rep = grp.order[grp.first]
                f = probe.lookup(m, t[rep], kq, consistent=False, want_rows=False,
                                 key_index=rep)
                hit = np.flatnonzero(f.slot >= 0)
                if len(hit):
                    self._remove_slots_locked(m, w, f.slot[hit])
                removed[idx[rep[hit]]] = True
                self.last_rounds = f.rounds
            finally:
                lock.release()
        self._raise_bad(enc, keys, removed, errors)
        return removed

    def _remove_slots_locked(self, m: Mapping, w: int, slots: np.ndarray) -> None:
        with protocol.Operation(m.q, w):
            protocol.free_slots(m, w, slots)

    # ------------------------------------------------------------------ whole table

    def snapshot(self) -> np.ndarray:
        """A copy of every call present, as a structured array ``(key, start, end)``.

        Taken without the lock and without blocking writers (lock-free read
        mode; the shared mode holds the shared lock for the copy).  Each row is
        consistent, no Call-ID appears twice, a call present for the whole
        snapshot is always in it, and rows written while it runs may or may not
        be (each row is as it was at some instant during the snapshot).
        """
        if self._rl is not None:
            # Shared mode: one consistent copy under the shared lock (writers wait
            # for the copy: ~75 ms per million rows on the reference machine).
            with self._rl:
                m = self._live_mapping()
                tags = m.tags.copy()
                live = np.flatnonzero(tags >= 2)
                rows = np.take(m.rowq, live, axis=0)
        else:
            m = self._live_mapping()
            q = m.q
            w1 = q[_W_WSEQ]
            tags = m.tags.copy()
            live = np.flatnonzero(tags >= 2)
            rows = np.take(m.rowq, live, axis=0)
            unstable = np.flatnonzero(~probe.row_is_stable(m.seqcol[live], w1, None, q))
            if len(unstable):
                live, rows = self._reread_rows(m, live, rows, tags[live], unstable)
        out = np.empty(len(live), snapshot_dtype(self._kw))
        out["start"] = rows[:, 1].view(np.int64)
        out["end"] = rows[:, 2].view(np.int64)
        keys = np.ascontiguousarray(rows[:, 3:]).view(f"S{self._kf}").reshape(len(live))
        out["key"] = keys if self._kf == self._kw else keys.astype(f"S{self._kw}")
        return out

    def times(self) -> tuple[np.ndarray, np.ndarray]:
        """``(start, end)`` of every call present, without their keys: snapshot() for monitors.

        The same lock-free protocol and guarantees as :meth:`snapshot` (no
        torn row, no call twice, every call present for the whole read is
        there), reading 16 bytes per call instead of the whole row: the
        Prometheus exporter's one pass per scrape.

        Returns
        -------
        (numpy.ndarray, numpy.ndarray)
            int64 ns, aligned, in no particular order; NOT_SET where unset.
        """
        m = self._live_mapping()
        w1 = m.q[_W_WSEQ]
        tags = m.tags.copy()
        live = np.flatnonzero(tags >= 2)
        se = np.take(m.rowq[:, 1:3], live, axis=0)     # one gather: both times of a row
        start, end = se[:, 0], se[:, 1]
        ok = probe.row_is_stable(m.seqcol[live], w1, None)   # versions read after the times
        if not ok.all():
            # Rows a writer touched meanwhile: re-read them whole (their keys
            # tell a call that moved from its older copy), as snapshot() does.
            lu = live[~ok]
            _, rows = self._reread_rows(m, lu, np.take(m.rowq, lu, axis=0), tags[lu],
                                        np.arange(len(lu)))
            start = np.concatenate([start[ok], rows[:, 1]])
            end = np.concatenate([end[ok], rows[:, 2]])
        return start.view(np.int64), end.view(np.int64)

    def _reread_rows(self, m: Mapping, live: np.ndarray, rows: np.ndarray, tag: np.ndarray,
                     todo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Re-read rows a writer touched while a snapshot copied them.

        A call can move while a snapshot runs (removed from one slot, started
        again in another): the older copy of a key that a re-read found again
        is dropped, so that no key appears twice.
        """
        keep = np.ones(len(live), bool)
        when = np.zeros(len(live), np.int64)       # 0: first pass; k: k-th re-read round
        dead_w = None
        since = time.monotonic()
        rounds = 0
        while len(todo):
            rounds += 1
            w1 = m.q[_W_WSEQ]
            slots = live[todo]
            tg = np.take(m.tags, slots)
            r = np.take(m.rowq, slots, axis=0)
            ok = probe.row_is_stable(m.seqcol[slots], w1, dead_w, m.q)
            done = todo[ok]
            rows[done] = r[ok]
            tag[done] = tg[ok]
            when[done] = rounds
            keep[done[tg[ok] < 2]] = False          # removed meanwhile
            todo = todo[~ok]
            if len(todo) and time.monotonic() - since > 0.05:
                if w1 & 1 and self._stuck_ok():
                    dead_w = int(w1)
                else:
                    time.sleep(0.001)
        reread = np.flatnonzero((when > 0) & keep)
        if len(reread):
            cand = np.flatnonzero(keep & np.isin(tag, tag[reread]))
            newest: dict[bytes, int] = {}
            for i in cand[np.argsort(when[cand], kind="stable")]:
                k = rows[i, 3:].tobytes()
                j = newest.get(k)
                if j is not None:
                    keep[j] = False                 # an older copy of this call
                newest[k] = i
        return live[keep], rows[keep]

    def stats(self) -> Stats:
        """Counts, load and probe lengths (a pass over the table; takes no lock)."""
        m = self._live_mapping()
        g = m.geometry
        q = m.q
        pl = probe.probe_lengths(m)
        snap_start = m.rowq[:, 1].view(np.int64)
        snap_end = m.rowq[:, 2].view(np.int64)
        live = m.tags >= 2
        has_s = snap_start != NOT_SET
        has_e = snap_end != NOT_SET
        return Stats(
            path=self._path, capacity=g.capacity, count=int(q[_W_COUNT]), limit=g.limit,
            load_factor=int(q[_W_COUNT]) / g.capacity, key_width=g.key_width,
            bytes_per_slot=8 + g.row_size, file_bytes=g.file_size,
            tombstones=int(q[_W_TOMB]),
            active=int(np.count_nonzero(live & has_s & ~has_e)),
            ended=int(np.count_nonzero(live & has_s & has_e)),
            end_only=int(np.count_nonzero(live & ~has_s & has_e)),
            max_probe=int(pl.max()) if len(pl) else 0,
            mean_probe=float(pl.mean()) if len(pl) else 0.0,
            generation=g.generation, n_started=int(q[_W_NSTART]), n_stopped=int(q[_W_NSTOP]),
            n_removed=int(q[_W_NREM]), n_rebuilds=int(q[W["n_rebuilds"]]),
            n_recoveries=int(q[W["n_recoveries"]]), auto_grow=g.auto_grow,
            writer_pid=lock_holder(self._lock_path),
        )

    def counters(self) -> Counters:
        """The header's counts and monotonic counters, without a pass over the rows.

        Cheap (a few dozen word reads) and lock-free, for monitoring: the
        Prometheus exporter reads these on every scrape.  ``n_started`` and
        ``n_stopped`` never decrease (expire and rebuilds keep them), and the
        duration histogram counts every call once, when it first has both a
        start and an end, so it also survives ``expire`` (docs/format.md).
        Words are read one by one while writers may run: each is exact, the
        set is not one atomic picture.
        """
        m = self._live_mapping()
        g = m.geometry
        q = m.q
        b0 = _W_DUR0
        buckets = tuple(int(x) for x in q[b0:b0 + len(DURATION_BOUNDS_S) + 1])
        return Counters(
            capacity=g.capacity, limit=g.limit, count=int(q[_W_COUNT]),
            tombstones=int(q[_W_TOMB]), generation=g.generation,
            n_started=int(q[_W_NSTART]), n_stopped=int(q[_W_NSTOP]), n_removed=int(q[_W_NREM]),
            n_rebuilds=int(q[W["n_rebuilds"]]), n_recoveries=int(q[W["n_recoveries"]]),
            duration_bounds_s=DURATION_BOUNDS_S, duration_buckets=buckets,
            duration_sum_s=int(q[_W_DURSUM]) / 1e6,
        )

    # ------------------------------------------------------------------ rebuild

    def grow(self, capacity: int) -> None:
        """Move the table to a larger (or equal: compaction) capacity, online.

        Every attached process follows at its next operation.
        """
        with self._writable_lock():
            m, _ = self._begin_locked()
            self._install(maintenance.grow(self._path, m, capacity))

    def compact(self) -> None:
        """Rebuild at the same capacity, dropping every tombstone."""
        self.grow(self._live_mapping().geometry.capacity)

    # ------------------------------------------------------------------ expiry and checks

    def expire(self, ended_before: Any = None, started_before: Any = None, *,
               return_rows: bool = False) -> int | np.ndarray:
        """Remove calls that ended before a cutoff, and optionally stale calls that never ended.

        Like Kamailio htable's autoexpire and the dialog module's timeouts: a
        table that runs for months must shed the calls it no longer needs.

        Parameters
        ----------
        ended_before : timestamp, optional
            Remove calls (and end-only calls) whose end is earlier.
        started_before : timestamp, optional
            Also remove calls that started earlier and have no end (their BYE
            was lost).
        return_rows : bool, default False
            Return the removed rows (snapshot dtype) instead of their number,
            so that the caller can archive them.

        Returns
        -------
        int or numpy.ndarray
        """
        if ended_before is None and started_before is None:
            raise ValueError("expire needs ended_before and/or started_before")
        eb = None if ended_before is None else to_ns(ended_before)
        sb = None if started_before is None else to_ns(started_before)
        with self._writable_lock():
            m, w = self._begin_locked()
            out, new = maintenance.expire(self._path, m, w, eb, sb, return_rows)
            if new is not None:
                self._install(new)
        return out

    def check(self, repair: bool = False) -> CheckReport:
        """Verify the table's invariants; with ``repair``, fix what can be fixed.

        Checked: the header (state, counts against the tags, the writer
        sequence), every row stable (no half-written row without a writer),
        every key valid and hashing to its stored tag, every row findable by
        its own key from its home bucket (which also rules out duplicate keys
        and broken probe paths), no stale temporary files of dead rebuilders.

        A writer killed mid-operation leaves work that the next writer finishes
        on its own; check reports it as a note, and ``repair`` finishes it now.
        Corruption that no crash can cause (a wrong tag, an invalid key, a
        duplicate) is a problem; ``repair`` rebuilds the table from its keys,
        dropping invalid rows and merging duplicates.

        Takes the writer lock (a read-only handle checks without it, and may
        then report counts that a concurrent writer is changing).
        """
        notes: list[str] = []
        problems: list[str] = []
        repaired: list[str] = []
        lock = self._lock
        if lock is None:
            if self._closed:
                raise TableClosedError(f"table {self._path} is closed")
            if repair:
                raise ReadOnlyError(f"table {self._path} was opened read-only; repair needs a "
                                    "writer")
            notes.append("read-only handle: checked without the writer lock")
            return maintenance.check(self._path, self._live_mapping(), False, notes, problems,
                                     repaired, False)[0]
        with lock:
            m = self._m
            state = int(m.q[_W_STATE])
            if state not in (STATE_LIVE, STATE_RETIRED, STATE_REMOVED):
                problems.append(f"unknown table state {state} in the header")
                if repair:
                    m.q[_W_STATE] = STATE_LIVE
                    repaired.append("reset the header state to live")
            else:
                m = self._settled_locked()
                if repair and m.q[_W_STATE] == STATE_RETIRED:
                    m.q[_W_STATE] = STATE_LIVE
                    repaired.append("made the table file live again (it was marked retired by "
                                    "a rebuild that died before replacing it)")
            w = int(m.q[_W_WSEQ])
            if w >= _WSEQ_WRAP:
                notes.append(f"the writer sequence {w} is past 2**63 (a corrupt header); the "
                             "next writer renumbers it")
                if repair:
                    protocol.renumber(m)
                    repaired.append("renumbered the writer sequence and row versions")
            report, new = maintenance.check(self._path, m, True, notes, problems, repaired,
                                            repair)
            if new is not None:
                self._install(new)
            return report



class _SharedReadCallTable(CallTable):
    """A :class:`CallTable` handle in the shared read mode (set by ``__init__``)."""

    def get(self, call_id: str | bytes) -> tuple[int, int] | None:
        """``(start, end)`` of a call, or None if absent; under the shared read lock."""
        if self._closed:
            raise TableClosedError(f"table {self._path} is closed")
        rl = self._rl
        assert rl is not None               # this class is installed in the shared mode only
        with rl:
            return CallTable.get(self, call_id)


class _ClosedWords:
    """Stands in for the header words of a closed table: any access says so."""

    def __getitem__(self, i: int) -> int:
        raise TableClosedError("table is closed")


_CLOSED_FAST = tuple(probe.SingleKeyView(
    mm=None, mv=None, q=_ClosedWords(), qi=None, nb=1, tags_off=0, rows_off=0, rs=0,
    unpack_row=None, pack_row=None, kw=1 << 30, kf=8, seed=0))


class _Unnamed:
    """Stands in for keys that came from an iterator and can no longer be shown."""

    def __getitem__(self, i: int) -> str:
        return f"<key #{i}>"


def _check_errors_arg(errors: str) -> None:
    if errors not in ("raise", "ignore"):
        raise ValueError(f"errors must be 'raise' or 'ignore', not {errors!r}")


def _valid_index(n: int, bad: np.ndarray) -> np.ndarray | None:
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
