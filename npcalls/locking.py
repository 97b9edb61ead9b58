"""The writer lock: a POSIX record lock (fcntl F_SETLKW) on a lock file beside the table.

Why POSIX record locks and not flock() or OFD locks:

* A POSIX lock belongs to the *process*.  A forked child never holds its
  parent's lock, even though it inherits the file descriptor, so a Kamailio
  or multiprocessing worker forked while the parent was writing cannot
  believe it is the writer.  flock() and OFD locks belong to the open file
  description, which parent and child share after fork(): both would "hold"
  the lock at once, and a lock taken by a parent that then dies stays held
  for as long as any child keeps the inherited descriptor open.
* The kernel drops a POSIX lock when its process dies, however it dies
  (SIGKILL included), so a crashed writer never leaves the table locked.

Their one trap is that closing *any* descriptor of the lock file drops every
lock the process holds on it.  So each process keeps exactly one descriptor
per lock file, shared by every CallTable object on that table and closed only
when the last of them closes (:class:`LockFile` is reference-counted).

POSIX locks do not exclude threads of one process from each other, so each
lock file also has a ``threading.RLock``; it is re-created in a forked child,
where a lock held by a parent thread would otherwise never be released.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
import threading
import time
from typing import Any

from .errors import NpcallsError
from .files import DIRECTORY, SYMLINK, RefusedFile, open_regular

__all__ = ["WriterLock", "LockFile", "enter", "leave", "lock_holder", "WAIT_REPORT_S",
           "SPIN_TRIES"]

_lockf = fcntl.lockf
_LOCK_EX = fcntl.LOCK_EX
_LOCK_EX_NB = fcntl.LOCK_EX | fcntl.LOCK_NB
_LOCK_UN = fcntl.LOCK_UN
_BUSY = (errno.EAGAIN, errno.EACCES)
_registry: dict[str, "LockFile"] = {}
_registry_guard = threading.Lock()


WAIT_REPORT_S = 1.0
"""A writer that has waited this long for the lock says so, once (logging, else stderr)."""


class LockFile:
    """This process's one descriptor of a lock file, shared by every handle on it."""

    __slots__ = ("path", "key", "fd", "dev", "ino", "mode", "owner", "rlock", "depth", "refs")

    def __init__(self, path: str, key: str, fd: int, mode: int,
                 owner: tuple[int, int] | None) -> None:
        self.path = path
        self.key = key
        self.fd = fd
        st = os.fstat(fd)
        self.dev, self.ino = st.st_dev, st.st_ino
        self.mode = mode
        self.owner = owner
        self.rlock = threading.RLock()
        self.depth = 0
        self.refs = 0


def _key(path: str) -> str:
    # the directory resolved, the last component not: the lock path itself may be
    # replaced by a link, which must not change which registry entry it is
    d, b = os.path.split(os.path.abspath(path))
    return os.path.join(os.path.realpath(d), b)


def _after_fork_in_child() -> None:
    global _registry_guard, _watch_lock, _watch_thread, _watch_pid
    _registry_guard = threading.Lock()
    _watch_lock = threading.Lock()
    _watch_thread = None
    _watch_pid = os.getpid()
    _waiters.clear()
    for lf in _registry.values():
        lf.rlock = threading.RLock()
        lf.depth = 0


os.register_at_fork(after_in_child=_after_fork_in_child)

_REMEDY = "remove it (as its owner or root); npcalls re-creates the lock file on the next write"


def after_fork_in_child() -> None:
    """Re-create this process's thread locks of every lock file, as the at-fork handler does.

    For a process forked from C without Python's at-fork handlers (an
    embedding program that never calls ``PyOS_AfterFork_Child``): a thread
    lock some parent thread held at the fork would otherwise stay held here.
    """
    _after_fork_in_child()


def open_lock_file(path: str, mode: int, create: bool,
                   owner: tuple[int, int] | None = None) -> tuple[int, bool]:
    """Open (or create) a lock file, never following a symlink at its last component.

    Returns ``(fd, created)``.  A new lock file gets exactly ``mode`` (set with
    fchmod: the umask must not keep a group the table is shared with out of
    its lock) and, when root creates it, the table's owner and group.

    Raises
    ------
    NpcallsError
        The path is a directory, FIFO, symlink or other non-file, a file that
        belongs neither to the table's owner nor to this user, or one this
        user may not open: the message names the file and what to do.
    """
    created = False
    try:
        if create:
            try:
                fd, st = open_regular(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)
                created = True
            except FileExistsError:
                fd, st = open_regular(path, os.O_RDWR)
        else:
            fd, st = open_regular(path, os.O_RDWR)
    except RefusedFile as e:
        if e.what == SYMLINK:
            raise NpcallsError(f"lock file {path} is a symbolic link; refusing to follow it: "
                               f"{_REMEDY}") from None
        if e.what == DIRECTORY:
            raise NpcallsError(f"lock file {path} is a directory, not a lock file: "
                               f"{_REMEDY}") from None
        raise NpcallsError(f"lock file {path} is not a regular file: {_REMEDY}") from None
    except PermissionError:
        try:
            st = os.lstat(path)
            what = f" (owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o})"
        except OSError:
            what = ""
        raise NpcallsError(f"cannot open lock file {path}{what}: permission denied; a "
                           "writer needs read-write access to the table's lock file: give "
                           f"it the table's owner and mode, or {_REMEDY}") from None
    try:
        if created:
            os.fchmod(fd, mode)
            if owner is not None and os.geteuid() == 0 and (st.st_uid, st.st_gid) != owner:
                os.fchown(fd, *owner)       # a lock root re-creates stays the table owner's
                os.fchmod(fd, mode)
        elif owner is not None and st.st_uid not in (owner[0], os.geteuid()):
            raise NpcallsError(f"lock file {path} belongs to uid {st.st_uid}, the table to uid "
                               f"{owner[0]}: a lock file of another user could keep writers "
                               f"out or let two in; {_REMEDY}")
    except BaseException:
        os.close(fd)
        if created:
            try:
                os.unlink(path)
            except OSError:
                pass
        raise
    return fd, created


# ---------------------------------------------------------------- waiting, reported once

_waiters: dict[int, list] = {}          # id(entry) -> [lock file, since, reported?]
_watch_lock = threading.Lock()
_watch_thread: threading.Thread | None = None
_watch_pid = os.getpid()


def _lock_waiting(lf: LockFile) -> None:
    """Block until the lock is ours; a watchdog thread reports a wait past WAIT_REPORT_S.

    Only reached when the lock stayed taken through :func:`_lock_busy`'s spin,
    so the uncontended path costs one system call and a short wait none.
    """
    global _watch_thread, _watch_lock, _watch_pid
    if _watch_pid != os.getpid():
        # forked by C code (a Kamailio worker) that ran no at-fork handler: the
        # watchdog thread did not come along, and its lock may look held
        _watch_lock, _watch_thread, _watch_pid = threading.Lock(), None, os.getpid()
        _waiters.clear()
    entry = [lf, time.monotonic(), False]
    with _watch_lock:
        _waiters[id(entry)] = entry
        if _watch_thread is None:
            _watch_thread = threading.Thread(target=_watch, name="npcalls-lock-watch",
                                             daemon=True)
            _watch_thread.start()
    try:
        _lockf(lf.fd, _LOCK_EX)
    finally:
        with _watch_lock:
            _waiters.pop(id(entry), None)


def _watch() -> None:
    global _watch_thread
    idle = 0
    while True:
        time.sleep(0.2)
        now = time.monotonic()
        with _watch_lock:
            if not _waiters:
                idle += 1
                if idle > 25:               # nobody waited for 5 s: stop until needed again
                    _watch_thread = None
                    return
                continue
            idle = 0
            due = [e for e in _waiters.values() if not e[2] and now - e[1] >= WAIT_REPORT_S]
            for e in due:
                e[2] = True
        for e in due:
            lf = e[0]
            try:
                holder = _holder_of(lf.fd)
            except OSError:
                holder = None
            import logging
            who = f"held by pid {holder}" if holder else "held by another process"
            logging.getLogger("npcalls").warning(
                "npcalls: pid %d waiting %.1f s for the writer lock %s, %s (a writer stopped "
                "or very slow?); still waiting", os.getpid(), now - e[1], lf.path, who)


def _at_path(lf: LockFile) -> bool:
    """True if ``lf``'s open file is still the one its path names."""
    try:
        st = os.lstat(lf.path)
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) == (lf.dev, lf.ino)


SPIN_TRIES = 12
"""Non-blocking retries (each after a ``sched_yield``) before a writer sleeps in the kernel."""

_yield = os.sched_yield


def _lock_ex(lf: LockFile) -> None:
    """Take the file lock: one non-blocking attempt, then :func:`_lock_busy`."""
    try:
        _lockf(lf.fd, _LOCK_EX_NB)
    except OSError as e:
        _lock_busy(lf, e)


def _lock_busy(lf: LockFile, e: OSError) -> None:
    """The first attempt at the file lock failed with ``e``: a short spin, then a reported wait.

    Writers hold the lock for a few microseconds per single-key operation,
    while a waiter that sleeps in ``F_SETLKW`` pays a wake-up (an
    inter-processor interrupt, the scheduler, often a core leaving its idle
    state) of tens of microseconds, and makes the holder's unlock pay for
    waking it: with two writers that doubled the cost of every contended
    operation.  So a writer that finds the lock taken first retries
    ``SPIN_TRIES`` times, yielding the CPU between tries (on a busy machine the
    holder may be waiting for this very core), and only then blocks, with
    the watchdog that reports long waits.  An error other than "held by
    another process" is raised.
    """
    for _ in range(SPIN_TRIES):
        if e.errno not in _BUSY:
            raise e
        _yield()
        try:
            _lockf(lf.fd, _LOCK_EX_NB)
            return
        except OSError as again:
            e = again
    if e.errno not in _BUSY:
        raise e
    _lock_waiting(lf)


def enter(lf: LockFile) -> None:
    """Take this process's writer lock on ``lf`` (re-entrant within a thread).

    The thread lock first, then, at the outermost level only, the file lock
    (uncontended: one non-blocking system call, made here rather than through
    :func:`_lock_ex` to save a call level on the hot path).
    :meth:`WriterLock.__enter__` and the single-key writes of
    :class:`~npcalls.CallTable` use this.
    """
    lf.rlock.acquire()
    if lf.depth == 0:
        try:
            try:
                _lockf(lf.fd, _LOCK_EX_NB)
            except OSError as e:
                _lock_busy(lf, e)
        except BaseException:
            lf.rlock.release()
            raise
    lf.depth += 1


def leave(lf: LockFile) -> None:
    """Undo one :func:`enter`; the file lock goes with the outermost level."""
    lf.depth -= 1
    if lf.depth == 0:
        _lockf(lf.fd, _LOCK_UN)
    lf.rlock.release()


# ---------------------------------------------------------------- the lock file's identity

def _wait_out_holders(dev: int, ino: int) -> list[int]:
    """Wait until no process holds a lock on the (unlinked) file ``dev``/``ino``.

    The file is found through the descriptors other processes still have open
    (``/proc/PID/fd``); a shared lock on it is granted only once its writer is
    out, and is kept (the descriptors are returned) until the caller has
    stamped the new lock file into the table header.  Processes this user may
    not inspect are not seen (see docs/format.md, "Limits").
    """
    me = os.getpid()
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return []
    for pid in pids:
        if pid == me:
            continue
        d = f"/proc/{pid}/fd"
        try:
            names = os.listdir(d)
        except OSError:
            continue
        for n in names:
            p = f"{d}/{n}"
            try:
                st = os.stat(p)
                if st.st_ino != ino or st.st_dev != dev or not stat.S_ISREG(st.st_mode):
                    continue
                fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
            except OSError:
                continue
            try:
                _lockf(fd, fcntl.LOCK_SH)
            except OSError:
                os.close(fd)
                continue
            return [fd]                     # one descriptor of the inode is enough
    return []


class WriterLock:
    """A process's handle on a table's writer lock (re-entrant within a thread).

    Parameters
    ----------
    path : str
        The lock file.
    mode : int
        Permission bits if the lock file has to be created.
    owner : (uid, gid), optional
        The table file's owner: a lock file of another user is refused, and one
        that root (re-)creates is given to this owner.
    """

    def __init__(self, path: str, mode: int = 0o600,
                 owner: tuple[int, int] | None = None) -> None:
        key = _key(path)
        self.created = False
        """True if this handle created the lock file."""
        with _registry_guard:
            lf = _registry.get(key)
            if lf is None:
                fd, self.created = open_lock_file(path, mode, create=True, owner=owner)
                lf = LockFile(path, key, fd, mode, owner)
                _registry[key] = lf
            lf.refs += 1
        self._lf: LockFile = lf

    @property
    def lock_file(self) -> LockFile:
        """The process-wide lock file this handle locks (for :func:`enter`/:func:`leave`)."""
        return self._lf

    @property
    def inode(self) -> int:
        """Inode number of the lock file this process locks (stamped into the table header)."""
        return self._lf.ino

    def acquire(self, timeout: float | None = None) -> None:
        """Take the lock, waiting up to ``timeout`` seconds (None: as long as it takes)."""
        lf = self._lf
        if lf is None:                  # closed (see close())
            raise NpcallsError("writer lock used after close")
        if timeout is None:
            lf.rlock.acquire()
        elif not lf.rlock.acquire(timeout=timeout):
            raise TimeoutError(f"writer lock {lf.path} still held by another thread after {timeout}s")
        if lf.depth == 0:
            try:
                if timeout is None:
                    _lock_ex(lf)
                else:
                    self._acquire_polling(lf, timeout)
            except BaseException:
                lf.rlock.release()
                raise
        lf.depth += 1

    @staticmethod
    def _acquire_polling(lf: LockFile, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        delay = 0.0005
        while True:
            try:
                fcntl.lockf(lf.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                # A bounded wait must not end in settle()'s blocking move: a
                # lock taken on a file that is no longer at the lock path
                # (removed or replaced) excludes nobody, so move now, without
                # blocking, and keep polling the file every writer now takes.
                if _at_path(lf):
                    return
                WriterLock._move(lf, block=False)
                continue
            except OSError as e:
                if e.errno not in _BUSY:
                    raise
            if time.monotonic() >= deadline:
                holder = lock_holder(lf.path)
                who = f" by pid {holder}" if holder else ""
                raise TimeoutError(f"writer lock {lf.path} still held{who} after {timeout}s")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    # The context-manager form is the hot path of every single write: kept lean.
    def __enter__(self) -> "WriterLock":
        enter(self._lf)
        return self

    def __exit__(self, *exc: object) -> None:
        leave(self._lf)

    def release(self) -> None:
        """Release one level of the lock; the file lock goes when the outermost level does."""
        lf = self._lf
        lf.depth -= 1
        if lf.depth == 0:
            fcntl.lockf(lf.fd, fcntl.LOCK_UN)
        lf.rlock.release()

    def settle(self, q: Any, word: int) -> None:
        """With the lock held: make sure it is the lock every writer of the table takes.

        ``q[word]`` is the table header's record of the lock file's inode.
        If it names another file, the lock file was removed or replaced: if
        ours is no longer the file at the lock path, move to the one that is
        (re-creating it if it vanished) and take that; if ours is the file at
        the path, first wait until no process is inside on the old one, then
        record ours.  So two writers are never inside at once, whatever
        happened to the lock file (docs/format.md, "Writing").
        """
        lf = self._lf
        while q[word] != lf.ino:
            if not _at_path(lf):
                self._move(lf)
                continue
            old = int(q[word])
            held = _wait_out_holders(lf.dev, old) if old else []
            try:
                q[word] = lf.ino
            finally:
                for fd in held:
                    os.close(fd)

    @staticmethod
    def _move(lf: LockFile, block: bool = True) -> None:
        """Swap our (stale) lock file for the one at the path, and lock that if ``block``."""
        fd, _ = open_lock_file(lf.path, lf.mode, create=True, owner=lf.owner)
        old = lf.fd
        _lockf(old, _LOCK_UN)
        st = os.fstat(fd)
        lf.fd, lf.dev, lf.ino = fd, st.st_dev, st.st_ino
        os.close(old)
        if block:
            _lock_ex(lf)

    @property
    def held(self) -> bool:
        """True if this process holds the lock (in any thread)."""
        return self._lf is not None and self._lf.depth > 0

    def close(self) -> None:
        """Drop this handle; the descriptor closes when the process's last handle does."""
        lf = self._lf
        if lf is None:                  # already closed
            return
        # None, not Optional in the annotation: the hot methods would otherwise
        # each need a test; using a closed handle fails with AttributeError
        self._lf = None  # type: ignore[assignment]
        with _registry_guard:
            lf.refs -= 1
            if lf.refs == 0:
                _registry.pop(lf.key, None)
                os.close(lf.fd)


_FLOCK = "hhqqi4x"  # struct flock on Linux x86-64 / aarch64: type, whence, start, len, pid


def _holder_of(fd: int) -> int | None:
    query = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
    ltype, _, _, _, pid = struct.unpack(_FLOCK, fcntl.fcntl(fd, fcntl.F_GETLK, query))
    return None if ltype == fcntl.F_UNLCK else pid


def lock_holder(path: str) -> int | None:
    """The pid holding the writer lock on ``path``, or None; takes no lock itself.

    Used by lock-free readers to tell a writer that is merely slow from one
    that died in the middle of a row (whose half-done row they may then read).
    """
    # A read-lock query conflicts only with write locks: readers holding the
    # shared lock of npcalls.readlock are not writers.
    query = struct.pack(_FLOCK, fcntl.F_RDLCK, os.SEEK_SET, 0, 0, 0)
    lf = _registry.get(_key(path))
    if lf is not None:
        # Never open and close a second descriptor here: closing it would drop
        # this process's own lock (the POSIX close trap described above).
        if lf.depth > 0:
            return os.getpid()
        for _ in range(3):
            try:
                return _holder_of(lf.fd)
            except OSError:
                # another thread moved to a new lock file and closed this descriptor
                # meanwhile; never fall back to opening the path while we have a
                # handle: closing that descriptor would drop the lock we may hold
                continue
        return None
    with _registry_guard:   # no handle of this process can take the lock while we close
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return None
        try:
            ltype, _, _, _, pid = struct.unpack(_FLOCK, fcntl.fcntl(fd, fcntl.F_GETLK, query))
            return None if ltype == fcntl.F_UNLCK else pid
        finally:
            os.close(fd)
