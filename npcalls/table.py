"""CallTable: the shared-memory table of SIP calls, the facade over the core's layers.

The concurrency model is docs/format.md's (the LMDB shape: one writer at a
time, readers never wait): writers serialise on the lock ("Writing"), take
over the table as :mod:`npcalls.protocol` says, and write through it;
readers take no lock ("Reading without a lock") unless the handle reads in
the shared mode ("Read modes and platforms"); a rebuild ("Rebuilding")
replaces the file and every handle follows it at its next operation.

This module holds the handle's state (the current mapping, the lock, the
read mode), checks arguments and calls the layers: :mod:`npcalls.single`
(start/stop/remove/get, a base class), :mod:`npcalls.many` (the batches),
:mod:`npcalls.scan`, :mod:`npcalls.maintenance`, :mod:`npcalls.lifecycle`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import struct
import threading
import time
from typing import Any, Callable, Generic, Iterator, Sequence, TypeVar, overload

import numpy as np

from . import batching, lifecycle, maintenance, many, probe, protocol, scan
from .errors import (
    NpcallsError,
    ReadOnlyError,
    TableClosedError,
    TableNotFoundError,
)
from .layout import (
    DEFAULT_MAX_LOAD,
    FLAG_AUTO_GROW,
    W,
    make_geometry,
)
from .locking import WriterLock, lock_holder
from .readlock import SHARED, SharedReadLock, resolve_read_mode
from .single import SingleKeyOps
from .storage import Mapping, open_mapping, resolve, sweep_temps
from .timestamps import to_ns

__all__ = ["CallTable", "Stats", "Counters", "GetManyResult", "CheckReport"]

from .maintenance import CheckReport  # noqa: E402  (re-exported)
from .many import GetManyResult  # noqa: E402  (re-exported)
from .scan import Counters, Stats  # noqa: E402  (re-exported)

_T = TypeVar("_T")
_W_STATE, _W_WSEQ, _W_COUNT = W["state"], W["wseq"], W["count"]
_W_LOCK = W["lock_ino"]


class _ReadOnly(Generic[_T]):
    """A typed read-only attribute computed from the handle (a property without its boilerplate)."""

    def __init__(self, get: Callable[[Any], _T], doc: str) -> None:
        self._get = get
        self.__doc__ = doc

    @overload
    def __get__(self, obj: None, owner: type) -> "_ReadOnly[_T]": ...
    @overload
    def __get__(self, obj: object, owner: type) -> _T: ...

    def __get__(self, obj: object, owner: type) -> "_T | _ReadOnly[_T]":
        return self if obj is None else self._get(obj)

    def __set__(self, obj: object, value: object) -> None:
        raise AttributeError("read-only attribute")


class CallTable(SingleKeyOps):
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
        self._tomb_limit = g.tomb_limit
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
            # The single-key view first, the mapping last: get() on another
            # thread that sees the new mapping in _m re-reads through _fast, which
            # must then be the new one already (else it recursed until this
            # thread ran again: a RecursionError under load).
            self._set_geometry(m)
            self._m = m

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
        self._fast = _closed_view(self._path, self._g)
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

    # Read-only views of the handle's state (the geometry ones follow a rebuild first).
    path = _ReadOnly[str](lambda t: t._path, "The table's data file.")
    lock_path = _ReadOnly[str](lambda t: t._lock_path, "The table's lock file.")
    capacity = _ReadOnly[int](lambda t: t._live_mapping().geometry.capacity, "Number of slots.")
    limit = _ReadOnly[int](lambda t: t._live_mapping().geometry.limit,
                           "The most calls the table accepts at its current capacity.")
    key_width = _ReadOnly[int](lambda t: t._kw, "Longest accepted Call-ID, in bytes.")
    max_load = _ReadOnly[float](lambda t: t._g.max_load, "The load factor limit.")
    seed = _ReadOnly[int](lambda t: t._seed, "The XXH64 seed of this table.")
    readonly = _ReadOnly[bool](lambda t: t._readonly, "Opened read-only.")
    read_mode = _ReadOnly[str](lambda t: t._read_mode, '''``"lockfree"`` or ``"shared"``: how
        this handle's reads exclude torn rows.''')
    closed = _ReadOnly[bool](lambda t: t._closed, "Closed by :meth:`close`.")

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

    def _make_room_locked(self, m: Mapping, needed: int) -> tuple[Mapping, int]:
        """Ensure ``needed`` more rows fit (:func:`npcalls.maintenance.make_room`)."""
        new = maintenance.make_room(self._path, m, needed)
        if new is not None:
            self._install(new)
            m = new
        return m, int(m.q[_W_WSEQ])

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

    def _codec(self) -> many.KeyCodec:
        return many.KeyCodec(self._kw, self._kf, self._seed)

    def _writer_side(self) -> many.WriterSide:
        """What the batch writes need of this handle (:class:`npcalls.many.WriterSide`)."""
        return many.WriterSide(self._codec(), self._writable_lock, self._begin_locked,
                               self._make_room_locked)

    def _finish(self, out: many.Outcome, keys: Any, errors: str) -> Any:
        if out.rounds is not None:
            self.last_rounds = out.rounds
        return many.finish(out, keys, errors)

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
        return self._finish(many.get_many(keys, self._codec(), self._lookup_read, errors),
                            keys, errors)

    def contains_many(self, keys: Sequence[str | bytes] | np.ndarray, *,
                      errors: str = "raise") -> np.ndarray:
        """Boolean array: which keys are present (invalid keys: see :meth:`get_many`)."""
        out = many.get_many(keys, self._codec(), self._lookup_read, errors)
        return self._finish(out._replace(result=out.result.found), keys, errors)

    def _lookup_read(self, tag: np.ndarray, keyq: np.ndarray) -> probe.Found:
        """A reader's batch lookup, in this handle's read mode."""
        return batching.lookup_read(self._live_mapping, self._rl, tag, keyq, self._stuck_ok)

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
        return self._finish(many.record(keys, ts, None, self._writer_side(), insert=True,
                                        errors=errors, want="start"), keys, errors)

    def stop_many(self, keys: Sequence[str | bytes] | np.ndarray, ts: Any = None, *,
                  insert_missing: bool = False, errors: str = "raise") -> np.ndarray:
        """Record many call ends; exactly like :meth:`stop` on each key in order.

        ``ts`` and ``errors`` as in :meth:`start_many`; ``insert_missing``
        records end-only calls for the keys not present, as :meth:`stop` does.
        Returns a bool per key: True where this call recorded the end.
        """
        return self._finish(many.record(keys, None, ts, self._writer_side(),
                                        insert=insert_missing, errors=errors, want="end"),
                            keys, errors)

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
        return self._finish(many.record(keys, start, end, self._writer_side(), insert=insert,
                                        errors=errors, want="both", allow_unset=True),
                            keys, errors)

    def remove_many(self, keys: Sequence[str | bytes] | np.ndarray, *,
                    errors: str = "raise") -> np.ndarray:
        """Remove many calls; bool per key, True where this call removed it."""
        return self._finish(many.remove_many(keys, self._writer_side(), errors), keys, errors)

    # ------------------------------------------------------------------ whole table

    def snapshot(self) -> np.ndarray:
        """A copy of every call present, as a structured array ``(key, start, end)``.

        Taken without the lock and without blocking writers (lock-free read
        mode; the shared mode holds the shared lock for the copy).  Each row is
        consistent, no Call-ID appears twice, a call present for the whole
        snapshot is always in it, and rows written while it runs may or may not
        be (each row is as it was at some instant during the snapshot).
        """
        return scan.snapshot(self._live_mapping, self._rl, self._stuck_ok)

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
        return scan.times(self._live_mapping(), self._stuck_ok)

    def stats(self) -> Stats:
        """Counts, load and probe lengths (a pass over the table; takes no lock)."""
        return scan.stats(self._live_mapping(), self._path, self._lock_path)

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
        return scan.counters(self._live_mapping())

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
            m = maintenance.check_header(self._m, self._settled_locked, notes, problems, repaired,
                                         repair)
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

    def __init__(self, path: str) -> None:
        self.path = path

    def __getitem__(self, i: int) -> int:
        raise TableClosedError(f"table {self.path} is closed")


def _closed_view(path: str, g: Any) -> tuple[Any, ...]:
    """The single-key view of a closed handle: keys are still checked against the
    table's width, and the first touch of the table raises TableClosedError."""
    return tuple(probe.SingleKeyView(
        mm=None, mv=None, q=_ClosedWords(path), qi=None, nb=1, tags_off=0, rows_off=0, rs=0,
        unpack_row=None, pack_row=None, kw=g.key_width, kf=g.key_field, seed=g.seed))
