"""Record calls from Kamailio's Python engine (app_python3, KEMI) into an npcalls table.

A routing script loaded by Kamailio's ``app_python3`` module creates one
:class:`CallMonitor` and calls :meth:`CallMonitor.start_monitoring` when an
INVITE is answered (a 2xx reply of the initial INVITE transaction) and
:meth:`CallMonitor.stop_monitoring` on the BYE; every worker process writes
to the same shared-memory table, which any other process (an analyst's
notebook, ``npcalls dump``) can attach to while the proxy runs::

    import KSR
    from npcalls.kamailio import CallMonitor

    class kamailio:
        def __init__(self):
            self.calls = CallMonitor("calls", capacity=1 << 20)

        def child_init(self, rank):
            return self.calls.child_init(rank)          # always 0

        def ksr_request_route(self, msg):
            ...
            if KSR.is_BYE() and KSR.tm.t_newtran() > 0:
                self.calls.stop_monitoring(msg)
            ...

        def ksr_onreply_invite(self, msg):              # armed with KSR.tm.t_on_reply()
            if 200 <= int(KSR.pv.get("$rs") or 0) < 300:
                self.calls.start_monitoring(msg)
            return 1

    def mod_init():
        return kamailio()

See ``examples/kamailio/`` for a complete, tested configuration.

Kamailio's process model, and what this helper does about it
------------------------------------------------------------
The routing module is imported, and ``mod_init()`` runs, once in Kamailio's
main process; the main process then forks every worker (``fork()`` from C) and
each worker calls ``child_init(rank)``.  Python's ``os.register_at_fork``
handlers run in a worker only because the embedding module calls
``PyOS_AfterFork_Child`` (app_python3 of Kamailio 5.6.3 does; nothing
guarantees it of every version or embedder).

* The table is opened in the main process (``open_now=True``), so a table
  that cannot be created (no space, bad permissions, a foreign file) is
  reported at start-up, and it exists before any worker runs.
* Everything per process is re-created in each worker: the first use in a
  process whose pid differs from the one that opened the table (detected
  by :meth:`child_init` or by a pid check on every call, so a script that
  forgets ``child_init`` is safe too) drops the inherited handle and opens
  the table again.  The worker thus has its own mapping, its own descriptor
  of the lock file and fresh thread locks, whatever state the parent's were
  in at the fork; if the process was forked without Python's at-fork
  handlers, the helper runs npcalls' own fork repair itself.  (The writer
  lock is a POSIX record lock, which belongs to a process, so a worker never
  inherits a lock held by its parent.)
* Nothing here ever raises into Kamailio: an exception escaping a KEMI
  routing function makes Kamailio drop the SIP message silently.  Every
  failure (no Call-ID, a Call-ID longer than ``key_width``, a full table,
  an unopenable file) is logged through ``KSR.err`` / ``KSR.warn``,
  rate-limited so that a failure on every call cannot flood the log, counted
  in :attr:`CallMonitor.stats`, and the method returns False.  A table that
  cannot be opened is retried at most every ``retry_interval`` seconds.

Semantics
---------
``start_monitoring`` records ``start = now`` for the message's Call-ID if the
call is not yet in the table (a retransmitted 200 OK, a re-INVITE answered
later, or a second worker relaying the same reply returns False and keeps the
first start).  ``stop_monitoring`` sets ``end = now`` once; a BYE for a call
the table does not know (it started before the table existed, or was never
answered) records nothing unless ``stop_inserts_missing=True``.

Outside Kamailio (tests, tools) pass ``ksr=`` any object with ``pv.get`` and
``err`` / ``warn`` / ``info`` methods; without one, and without an importable
``KSR`` module, messages go to the ``logging`` logger ``npcalls.kamailio``.
That object is the only way the helper reaches Kamailio (reading ``$ci``,
logging), so another embedder would need only another such adapter
(OpenSIPS's ``python`` module has the same ``python_exec`` shape but reads
pseudo-variables through the message; nothing here has been run there).

A writer stalled inside the table must not stall the proxy: each write waits
at most ``lock_timeout`` for the writer lock, then keeps the event in the
process's backlog (see :class:`CallMonitor`).

Native kamailio.cfg
-------------------
For a config in Kamailio's own language, ``modparam("app_python3", "load",
...)`` loads the script shipped in ``npcalls/kamailio_script/`` (its path:
:func:`script_path`, ``npcalls kamailio-script``), whose ``mod_init()``
returns a :class:`KamailioScript` built from the environment
(:func:`read_settings`); the config calls ``python_exec("start_monitoring")``
and ``python_exec("stop_monitoring")``.  See ``examples/kamailio-native/``.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from . import locking
from .table import CallTable

__all__ = ["CallMonitor", "KamailioScript", "script_from_environ", "script_path"]

_log = logging.getLogger("npcalls.kamailio")

# The pid in which Python's at-fork handlers last ran (or this module was
# imported).  A process whose pid differs was forked without them, like a
# worker of an embedding program that forks from C and never calls
# PyOS_AfterFork_Child (app_python3 5.6 does call it; nothing guarantees it).
_hooks_pid = os.getpid()


def _fork_hooks_ran() -> None:
    global _hooks_pid
    _hooks_pid = os.getpid()


os.register_at_fork(after_in_child=_fork_hooks_ran)


def _repair_after_raw_fork() -> None:
    """In a process forked without Python's at-fork handlers, do what they would have done.

    npcalls.locking re-creates its per-process thread locks in an at-fork
    handler; if that never ran, a lock some parent thread held at the fork
    would stay held forever here.
    """
    global _hooks_pid
    if _hooks_pid != os.getpid():
        locking.after_fork_in_child()
        _hooks_pid = os.getpid()


class _LoggingKSR:
    """Stand-in for ``KSR`` outside Kamailio: log through :mod:`logging`, no message access."""

    class pv:  # noqa: N801 - mirrors KSR.pv
        @staticmethod
        def get(name: str) -> None:
            return None

    @staticmethod
    def err(text: str) -> None:
        _log.error(text)

    @staticmethod
    def warn(text: str) -> None:
        _log.warning(text)

    @staticmethod
    def info(text: str) -> None:
        _log.info(text)


def _default_ksr() -> Any:
    try:
        import KSR  # type: ignore[import-not-found]  # only exists inside Kamailio
        return KSR
    except Exception:
        return _LoggingKSR


class CallMonitor:
    """Start/stop calls in an npcalls table from a Kamailio KEMI Python script.

    Parameters
    ----------
    name : str
        Table name (in ``$NPCALLS_DIR``, default ``/dev/shm``) or path.
        Opened if it exists, created otherwise.
    capacity : int, default 65536
        Slots of the table if it has to be created.
    key_width : int, default 128
        Longest Call-ID in bytes if the table has to be created.  A longer
        Call-ID is logged and not recorded (never truncated).
    mode : int, default 0o600
        Permission bits of a created table (Kamailio usually runs as its own
        user: readers need read access to the file).
    auto_grow : bool, default True
        Create the table so that it doubles when full instead of refusing
        calls.  Ended calls stay in the table until something removes or
        expires them.
    open_now : bool, default True
        Open (or create) the table in the constructor, i.e. in Kamailio's
        main process when the monitor is built in ``mod_init``.  With False,
        each process opens it at its first use.
    trace : bool, default False
        Log one info line per recorded start and stop (``npcalls: start
        call_id=... pid=...``).  For tests and debugging; it costs a log
        line per event.
    stop_inserts_missing : bool, default False
        Record an end-only row for a BYE whose call the table does not hold.
    ksr : object, optional
        The ``KSR`` module (default: imported lazily; a logging stand-in
        outside Kamailio).  Tests pass a fake.
    retry_interval : float, default 5.0
        Seconds between attempts to open a table that could not be opened.
    log_interval : float, default 10.0
        After the first few errors of one kind, at most one line per kind
        in this many seconds (with the number of suppressed messages).
    lock_timeout : float or None, default 0.05
        Longest wait, in seconds, for the table's writer lock.  A writer
        stopped or slowed inside the table (SIGSTOP, a long rebuild, a full
        disk) must not stall SIP workers: when the lock stays busy that long,
        the event is kept in this process's backlog with its own timestamp,
        the miss is counted and logged (rate-limited), and the call returns
        False.  Until the lock is free again this process does not wait at
        all, it only tries; the first write that gets the lock writes the
        backlog first.  None waits as long as it takes.
    max_pending : int, default 10000
        Most events kept in the backlog; beyond that they are counted in
        ``stats["dropped"]`` and logged.

    Attributes
    ----------
    stats : dict
        Counters of this process since it started using the monitor:
        ``started``, ``already_started``, ``stopped``, ``already_stopped``,
        ``unknown_stop``, ``errors`` (every failure logged, warnings included),
        ``lock_busy`` (writes that found the lock busy past ``lock_timeout``),
        ``deferred`` (events written later from the backlog), ``dropped``
        (events lost because the backlog was full).

    Notes
    -----
    Events in the backlog of one worker are written when that worker next
    gets the lock, i.e. at its next call: on a proxy with traffic, moments
    after the lock is free.  A stop written from the backlog, or in a process
    that saw the lock busy in the last minute, inserts an end-only row when
    the call is unknown (its start may still be in another worker's backlog;
    the start fills the row in when it is written).
    """

    _BURST = 5          # errors of one kind logged in full before rate limiting

    def __init__(self, name: str | os.PathLike, capacity: int = 65536, key_width: int = 128,
                 *, mode: int = 0o600, auto_grow: bool = True, open_now: bool = True,
                 trace: bool = False, stop_inserts_missing: bool = False, ksr: Any = None,
                 retry_interval: float = 5.0, log_interval: float = 10.0,
                 lock_timeout: float | None = 0.05, max_pending: int = 10000) -> None:
        if lock_timeout is not None and not lock_timeout >= 0:
            raise ValueError(f"lock_timeout must be >= 0 seconds or None, not {lock_timeout!r}")
        self.name = os.fspath(name)
        self.capacity = int(capacity)
        self.key_width = int(key_width)
        self.mode = mode
        self.auto_grow = auto_grow
        self.trace = trace
        self.stop_inserts_missing = stop_inserts_missing
        self.retry_interval = retry_interval
        self.log_interval = log_interval
        self.lock_timeout = lock_timeout
        self.max_pending = int(max_pending)
        self._ksr = ksr if ksr is not None else _default_ksr()
        self._table: CallTable | None = None
        self._pid = os.getpid()
        self._next_open = 0.0
        self._reset_process_state()
        if open_now:
            self._open()

    # ------------------------------------------------------------------ per process

    def _reset_process_state(self) -> None:
        self._pid = os.getpid()
        self.stats = dict.fromkeys(("started", "already_started", "stopped", "already_stopped",
                                    "unknown_stop", "errors", "lock_busy", "deferred",
                                    "dropped"), 0)
        self._logged: dict[str, list] = {}        # kind -> [count, suppressed, next_time]
        self._next_open = 0.0
        # The backlog: (column, call_id, ts) written at the next lock acquisition.
        self._pending: list[tuple[int, Any, int]] = []
        self._busy_since = 0.0          # > 0: the lock was found busy; only try until free
        self._busy_recent = 0.0         # stops insert end-only rows until this time
        # This process's handle on the table's writer lock (the same per-process
        # lock-file state the table uses, so the table's own writes inside it
        # take no second lock), and the table object it was made for.
        self._wlock: locking.WriterLock | None = None
        self._wlock_of: CallTable | None = None

    def _after_fork(self) -> None:
        """First use in a new process: drop what was inherited, re-open the table here."""
        inherited = self._table
        inherited_lock = self._wlock
        self._table = None
        self._reset_process_state()
        _repair_after_raw_fork()
        if inherited_lock is not None:
            try:
                inherited_lock.close()
            except Exception as e:  # pragma: no cover - defensive
                self._error("close", f"closing the inherited lock handle failed: {e!r}")
        if inherited is not None:
            try:
                # Closes only this process's copy: the mapping and, if no other
                # object here shares it, the lock descriptor (this process holds
                # no POSIX lock yet, so closing it drops nothing).
                inherited.close()
            except Exception as e:  # pragma: no cover - defensive
                self._error("close", f"closing the inherited table handle failed: {e!r}")
        self._open()

    def child_init(self, rank: int = 0) -> int:
        """Call from the script's ``child_init(rank)``; re-creates per-process state.

        Returns 0 (what Kamailio expects from ``child_init``), even on failure:
        a table that cannot be opened is logged and retried later, it must not
        stop Kamailio from starting.
        """
        try:
            if os.getpid() != self._pid:
                self._after_fork()
            elif self._table is None:
                self._open()
        except BaseException as e:  # never let anything escape into Kamailio
            self._error("child_init", f"child_init({rank}) failed: {e!r}")
        return 0

    def _open(self) -> CallTable | None:
        now = time.monotonic()
        if now < self._next_open:
            return None
        try:
            self._table = CallTable.open_or_create(self.name, self.capacity, self.key_width,
                                                   self.mode, auto_grow=self.auto_grow)
        except Exception as e:
            self._next_open = now + self.retry_interval
            self._error("open", f"cannot open or create table {self.name!r} "
                                f"(retrying in {self.retry_interval:g}s): {e}")
            return None
        return self._table

    @property
    def table(self) -> CallTable | None:
        """This process's handle on the table (opened on demand), or None if it cannot be opened."""
        if os.getpid() != self._pid:
            self._after_fork()
        t = self._table
        if t is None:
            t = self._open()
        return t

    # ------------------------------------------------------------------ logging

    def _error(self, kind: str, text: str, level: str = "err") -> None:
        """Log through KSR, rate-limited per kind; never raises."""
        try:
            self.stats["errors"] += 1
            now = time.monotonic()
            st = self._logged.get(kind)
            if st is None:
                st = self._logged[kind] = [0, 0, 0.0]
            st[0] += 1
            if st[0] > self._BURST:
                if now < st[2]:
                    st[1] += 1
                    return
                if st[1]:
                    text += f" ({st[1]} similar messages suppressed)"
                    st[1] = 0
            if st[0] >= self._BURST:
                st[2] = now + self.log_interval
            getattr(self._ksr, level)(f"npcalls: {text}\n")
        except BaseException:
            pass

    def _info(self, text: str) -> None:
        try:
            self._ksr.info(text)
        except BaseException:
            pass

    # ------------------------------------------------------------------ the two hooks

    def _call_id(self, call_id: Any) -> Any:
        if call_id is None:
            call_id = self._ksr.pv.get("$ci")
        if not call_id:
            self._error("no_call_id", "message has no Call-ID; call not recorded", "warn")
            return None
        return call_id

    def start_monitoring(self, msg: Any = None, call_id: str | bytes | None = None) -> bool:
        """Record that the current message's call started (now).

        Call it for the 2xx reply of the initial INVITE (from the transaction's
        onreply route), after ``t_newtran()`` created the transaction.

        Parameters
        ----------
        msg : object, optional
            The KEMI message object (unused: the Call-ID is read through
            ``KSR.pv.get("$ci")``, which refers to the message being routed).
        call_id : str or bytes, optional
            Use this Call-ID instead of the message's.

        Returns
        -------
        bool
            True if the call was recorded now; False if it was already
            started, or on any failure (logged, never raised).
        """
        return self._monitor(call_id, 1, "start_monitoring")

    def stop_monitoring(self, msg: Any = None, call_id: str | bytes | None = None) -> bool:
        """Record that the current message's call ended (now).

        Call it for the BYE, after ``t_newtran()`` created its transaction.

        Returns
        -------
        bool
            True if the end was recorded now; False if the call had already
            ended, is unknown to the table, or on any failure (logged, never
            raised).
        """
        return self._monitor(call_id, 2, "stop_monitoring")

    def _monitor(self, call_id: str | bytes | None, col: int, what: str) -> bool:
        """start_monitoring (col 1) and stop_monitoring (col 2): never raises."""
        try:
            t = self.table
            if t is None:
                return False
            cid = self._call_id(call_id)
            if cid is None:
                return False
            return self._record(t, cid, col)
        except BaseException as e:
            self._error(type(e).__name__, f"{what} failed: {type(e).__name__}: {e}")
            return False

    # ------------------------------------------------------------------ bounded writes

    def _record(self, t: CallTable, cid: Any, col: int) -> bool:
        ts = time.time_ns()             # the event's time, whatever the wait below
        if self.lock_timeout is None:
            return self._apply(t, col, cid, ts, False)
        held = self._acquire(t)
        if held is None:
            self._defer(t, col, cid, ts)
            return False
        try:
            if self._pending:
                self._flush_locked(t)
            return self._apply(t, col, cid, ts, False)
        finally:
            held.release()

    def _apply(self, t: CallTable, col: int, cid: Any, ts: int, deferred: bool) -> bool:
        if col == 1:
            if t.start(cid, ts):
                self.stats["started"] += 1
                if self.trace:
                    self._info(f"npcalls: start call_id={cid} pid={self._pid}\n")
                return True
            self.stats["already_started"] += 1
            return False
        insert = bool(self.stop_inserts_missing or deferred
                      or (self._busy_recent and time.monotonic() < self._busy_recent))
        if t.stop(cid, ts, insert_missing=insert):
            self.stats["stopped"] += 1
            if self.trace:
                self._info(f"npcalls: stop call_id={cid} pid={self._pid}\n")
            return True
        if t.get(cid) is None:
            self.stats["unknown_stop"] += 1
        else:
            self.stats["already_stopped"] += 1
        return False

    def _acquire(self, t: CallTable) -> Any:
        """The writer lock, entered, waiting at most ``lock_timeout``; None if still busy.

        Polls with the non-blocking ``WriterLock.acquire(0)`` rather than a
        blocking acquire, so that the wait ends at the deadline itself; the
        caller releases what this returns.  Once the lock was found busy for the whole wait, later calls
        only try once until they get it: a stalled table costs each SIP
        message one failed system call, not a wait.
        """
        limit = self.lock_timeout
        assert limit is not None        # callers take the unbounded path otherwise
        wl = self._wlock
        if wl is None or self._wlock_of is not t:
            if wl is not None:
                wl.close()
                self._wlock = None
            if t.closed or t.readonly:
                # The table's own error; and never create a lock file for a
                # table this process no longer holds open.
                with t.locked(timeout=0):
                    pass
            wl = self._wlock = locking.WriterLock(t.lock_path)
            self._wlock_of = t
        now = time.monotonic()
        deadline = now + (0.0 if self._busy_since else limit)
        delay = 0.0002
        while True:
            try:
                wl.acquire(0)
            except TimeoutError:
                now = time.monotonic()
                if now < deadline:
                    time.sleep(min(delay, deadline - now))
                    delay = min(delay * 2, 0.005)
                    continue
                self.stats["lock_busy"] += 1
                if not self._busy_since:
                    self._busy_since = now
                    holder = locking.lock_holder(t.lock_path)
                    self._error("lock_busy",
                                f"writer lock of {self.name} busy for more than "
                                f"{limit * 1e3:g} ms (held by pid {holder}): "
                                f"recording deferred, not waiting again until it is free",
                                "warn")
                self._busy_recent = now + 60.0
                return None
            if self._busy_since:
                now = time.monotonic()
                self._info(f"npcalls: writer lock of {self.name} free again after "
                           f"{now - self._busy_since:.3f} s; writing "
                           f"{len(self._pending)} deferred events\n")
                self._busy_since = 0.0
                self._busy_recent = now + 60.0
            return wl

    def _defer(self, t: CallTable, col: int, cid: Any, ts: int) -> None:
        if len(self._pending) >= self.max_pending:
            self.stats["dropped"] += 1
            self._error("backlog_full", f"backlog full ({self.max_pending} events) while the "
                                        f"writer lock of {self.name} is busy: "
                                        f"{'start' if col == 1 else 'stop'} of {cid} lost")
            return
        self._pending.append((col, cid, ts))

    # Events from the backlog written per call: keeps each hold of the lock
    # short (other workers wait for it too), while a backlog still drains at
    # this many events per call of the worker.
    _FLUSH_BATCH = 100

    def _flush_locked(self, t: CallTable) -> None:
        batch = self._pending[:self._FLUSH_BATCH]
        del self._pending[:self._FLUSH_BATCH]
        for col, cid, ts in batch:
            self.stats["deferred"] += 1
            try:
                self._apply(t, col, cid, ts, True)
            except Exception as e:      # this event only (a Call-ID too long, ...)
                what = "start_monitoring" if col == 1 else "stop_monitoring"
                self._error(type(e).__name__, f"{what} (deferred) failed: "
                                              f"{type(e).__name__}: {e}")

    def flush(self) -> int:
        """Write this process's backlog now if the lock can be had within ``lock_timeout``.

        Returns the number of events still pending.  Never raises.
        """
        try:
            t = self.table
            if t is not None and self._pending:
                held = self._acquire(t)
                if held is not None:
                    try:
                        while self._pending:
                            self._flush_locked(t)
                    finally:
                        held.release()
        except BaseException as e:
            self._error(type(e).__name__, f"flush failed: {type(e).__name__}: {e}")
        return len(self._pending)

    @property
    def pending(self) -> int:
        """Events of this process waiting in the backlog for the writer lock."""
        return len(self._pending)

    def close(self) -> None:
        """Detach this process from the table (the table itself stays)."""
        t, self._table = self._table, None
        wl, self._wlock, self._wlock_of = self._wlock, None, None
        if os.getpid() == self._pid:
            for h in (wl, t):
                if h is not None:
                    try:
                        h.close()
                    except Exception:
                        pass

    def __repr__(self) -> str:
        state = "open" if self._table is not None else "not open"
        return f"<CallMonitor {self.name!r} ({state}) pid {self._pid} {self.stats}>"


# ---------------------------------------------------------------------- native kamailio.cfg

_NULL_ARGS = ("", "<null>")     # what a pseudo-variable without a value turns into


class KamailioScript:
    """What ``mod_init()`` returns to app_python3 for a native ``kamailio.cfg``.

    The config calls ``python_exec("start_monitoring")`` /
    ``python_exec("stop_monitoring")`` (the message's Call-ID, ``$ci``) or
    their one-argument forms ``python_exec("start_monitoring", "$dlg(callid)")``
    (the argument is the Call-ID).  Kamailio 5.6's app_python3 reads each
    return value as an int: > 0 true, < 0 false, and 0 would end the route
    like ``exit``; ``None`` would leave a Python error pending in the worker
    (5.6.x), so every method returns a non-zero int and never raises.

    Parameters
    ----------
    monitor : CallMonitor or None
        The monitor doing the work (None: accept the calls, record nothing).
    """

    def __init__(self, monitor: CallMonitor | None) -> None:
        self.monitor = monitor

    def child_init(self, rank: int) -> int:
        """Run by app_python3 in every forked process (required); returns 0 (success)."""
        try:
            if self.monitor is not None:
                self.monitor.child_init(rank)
        except BaseException:
            pass
        return 0

    def _run(self, method: str, msg: Any, call_id: Any) -> int:
        try:
            m = self.monitor
            if m is None:
                return 1
            if call_id is not None:
                if not isinstance(call_id, (str, bytes)) or call_id in _NULL_ARGS:
                    m._error("no_call_id", f"{method}: argument {call_id!r} is not a Call-ID; "
                                           "call not recorded", "warn")
                    return -1
            return 1 if getattr(m, method)(None, call_id) else -1
        except BaseException:
            return -1

    def start_monitoring(self, msg: Any = None, call_id: str | None = None) -> int:
        """Record the call's start (now); 1 if recorded now, -1 otherwise (never 0 or None)."""
        return self._run("start_monitoring", msg, call_id)

    def stop_monitoring(self, msg: Any = None, call_id: str | None = None) -> int:
        """Record the call's end (now); 1 if recorded now, -1 otherwise (never 0 or None)."""
        return self._run("stop_monitoring", msg, call_id)

    def flush_monitoring(self, msg: Any = None, arg: Any = None) -> int:
        """Write this worker's backlog if the lock is free (e.g. from an rtimer route); 1 if empty after."""
        try:
            return 1 if self.monitor is None or self.monitor.flush() == 0 else -1
        except BaseException:
            return -1


# name -> (default, parser); the environment (or NPCALLS_CONFIG's file) sets them
def _int(v: str) -> int:
    return int(v, 0)


def _octal(v: str) -> int:
    return int(v, 8)


def _bool(v: str) -> bool:
    low = v.strip().lower()
    if low in ("1", "yes", "true", "on"):
        return True
    if low in ("0", "no", "false", "off", ""):
        return False
    raise ValueError("expected 1/0, yes/no, true/false or on/off")


def _wait_ms(v: str) -> float | None:
    if v.strip().lower() in ("none", "forever"):
        return None
    ms = float(v)
    if not 0 <= ms <= 60_000:
        raise ValueError("expected milliseconds between 0 and 60000, or 'forever'")
    return ms / 1e3


SETTINGS: dict[str, tuple[str, Any]] = {
    "NPCALLS_TABLE": ("calls", str),
    "NPCALLS_CAPACITY": ("65536", _int),
    "NPCALLS_KEY_WIDTH": ("128", _int),
    "NPCALLS_MODE": ("0600", _octal),
    "NPCALLS_LOCK_WAIT_MS": ("50", _wait_ms),
    "NPCALLS_MAX_PENDING": ("10000", _int),
    "NPCALLS_STOP_INSERTS_MISSING": ("0", _bool),
    "NPCALLS_TRACE": ("0", _bool),
    "NPCALLS_RECORD": ("1", _bool),
}
"""Settings of the native script: variable -> (default, parser)."""


def read_settings(environ: Any = None) -> dict[str, Any]:
    """The native script's settings: defaults, then ``$NPCALLS_CONFIG``'s file, then the environment.

    The file holds ``NAME=value`` lines with the variables' names (``#``
    comments and blank lines allowed).  Raises ValueError naming the
    variable (and the file and line) for an unknown name or a bad value.
    """
    env = os.environ if environ is None else environ
    raw: dict[str, tuple[str, str]] = {k: (d, "default") for k, (d, _) in SETTINGS.items()}
    cfg = env.get("NPCALLS_CONFIG")
    if cfg:
        with open(cfg, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                k, eq, v = line.partition("=")
                k, v = k.strip(), v.strip().strip('"').strip("'")
                if not eq or k not in SETTINGS:
                    raise ValueError(f"{cfg}:{n}: expected NAME=value with NAME one of "
                                     f"{', '.join(SETTINGS)}, got {line!r}")
                raw[k] = (v, f"{cfg}:{n}")
    for k in SETTINGS:
        if k in env:
            raw[k] = (env[k], "the environment")
    out: dict[str, Any] = {}
    for k, (v, where) in raw.items():
        try:
            out[k] = SETTINGS[k][1](v)
        except ValueError as e:
            raise ValueError(f"npcalls: bad {k}={v!r} (from {where}): {e}") from None
    if out["NPCALLS_CAPACITY"] <= 0 or out["NPCALLS_KEY_WIDTH"] <= 0:
        raise ValueError("npcalls: NPCALLS_CAPACITY and NPCALLS_KEY_WIDTH must be positive")
    return out


def script_from_environ(environ: Any = None, ksr: Any = None) -> KamailioScript:
    """Build the native script's object from the settings (see :func:`read_settings`).

    Called by the shipped script's ``mod_init()`` in Kamailio's main process.
    A bad setting raises (Kamailio then refuses to start, with the reason in
    its log); a table that cannot be opened is logged and retried, as
    :class:`CallMonitor` does, so that monitoring never keeps the proxy down.
    """
    s = read_settings(environ)
    if not s["NPCALLS_RECORD"]:
        return KamailioScript(None)
    mon = CallMonitor(s["NPCALLS_TABLE"], capacity=s["NPCALLS_CAPACITY"],
                      key_width=s["NPCALLS_KEY_WIDTH"], mode=s["NPCALLS_MODE"],
                      trace=s["NPCALLS_TRACE"], stop_inserts_missing=s["NPCALLS_STOP_INSERTS_MISSING"],
                      lock_timeout=s["NPCALLS_LOCK_WAIT_MS"], max_pending=s["NPCALLS_MAX_PENDING"],
                      ksr=ksr)
    return KamailioScript(mon)


def script_path() -> str:
    """Path of the ready script for ``modparam("app_python3", "load", ...)`` (``npcalls kamailio-script``)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "kamailio_script",
                        "npcalls_native.py")
