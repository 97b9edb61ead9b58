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
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from . import locking
from .table import CallTable

__all__ = ["CallMonitor"]

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
        locking._after_fork_in_child()
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

    Attributes
    ----------
    stats : dict
        Counters of this process since it started using the monitor:
        ``started``, ``already_started``, ``stopped``, ``already_stopped``,
        ``unknown_stop``, ``errors`` (every failure logged, warnings included).
    """

    _BURST = 5          # errors of one kind logged in full before rate limiting

    def __init__(self, name: str | os.PathLike, capacity: int = 65536, key_width: int = 128,
                 *, mode: int = 0o600, auto_grow: bool = True, open_now: bool = True,
                 trace: bool = False, stop_inserts_missing: bool = False, ksr: Any = None,
                 retry_interval: float = 5.0, log_interval: float = 10.0) -> None:
        self.name = os.fspath(name)
        self.capacity = int(capacity)
        self.key_width = int(key_width)
        self.mode = mode
        self.auto_grow = auto_grow
        self.trace = trace
        self.stop_inserts_missing = stop_inserts_missing
        self.retry_interval = retry_interval
        self.log_interval = log_interval
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
                                    "unknown_stop", "errors"), 0)
        self._logged: dict[str, list] = {}        # kind -> [count, suppressed, next_time]
        self._next_open = 0.0

    def _after_fork(self) -> None:
        """First use in a new process: drop what was inherited, re-open the table here."""
        inherited = self._table
        self._table = None
        self._reset_process_state()
        _repair_after_raw_fork()
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
        try:
            t = self.table
            if t is None:
                return False
            cid = self._call_id(call_id)
            if cid is None:
                return False
            if t.start(cid):
                self.stats["started"] += 1
                if self.trace:
                    self._ksr.info(f"npcalls: start call_id={cid} pid={self._pid}\n")
                return True
            self.stats["already_started"] += 1
            return False
        except BaseException as e:
            self._error(type(e).__name__, f"start_monitoring failed: {type(e).__name__}: {e}")
            return False

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
        try:
            t = self.table
            if t is None:
                return False
            cid = self._call_id(call_id)
            if cid is None:
                return False
            if t.stop(cid, insert_missing=self.stop_inserts_missing):
                self.stats["stopped"] += 1
                if self.trace:
                    self._ksr.info(f"npcalls: stop call_id={cid} pid={self._pid}\n")
                return True
            if t.get(cid) is None:
                self.stats["unknown_stop"] += 1
            else:
                self.stats["already_stopped"] += 1
            return False
        except BaseException as e:
            self._error(type(e).__name__, f"stop_monitoring failed: {type(e).__name__}: {e}")
            return False

    def close(self) -> None:
        """Detach this process from the table (the table itself stays)."""
        t, self._table = self._table, None
        if t is not None and os.getpid() == self._pid:
            try:
                t.close()
            except Exception:
                pass

    def __repr__(self) -> str:
        state = "open" if self._table is not None else "not open"
        return f"<CallMonitor {self.name!r} ({state}) pid {self._pid} {self.stats}>"
