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
when the last of them closes (:class:`_LockFile` is reference-counted).

POSIX locks do not exclude threads of one process from each other, so each
lock file also has a ``threading.RLock``; it is re-created in a forked child,
where a lock held by a parent thread would otherwise never be released.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading
import time

from .errors import NpcallsError

__all__ = ["WriterLock", "lock_holder"]

_lockf = fcntl.lockf
_LOCK_EX = fcntl.LOCK_EX
_LOCK_UN = fcntl.LOCK_UN
_registry: dict[str, "_LockFile"] = {}
_registry_guard = threading.Lock()


class _LockFile:
    __slots__ = ("path", "fd", "rlock", "depth", "refs")

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self.fd = fd
        self.rlock = threading.RLock()
        self.depth = 0
        self.refs = 0


def _after_fork_in_child() -> None:
    global _registry_guard
    _registry_guard = threading.Lock()
    for lf in _registry.values():
        lf.rlock = threading.RLock()
        lf.depth = 0


os.register_at_fork(after_in_child=_after_fork_in_child)


def after_fork_in_child() -> None:
    """Re-create this process's thread locks of every lock file, as the at-fork handler does.

    For a process forked from C without Python's at-fork handlers (an
    embedding program that never calls ``PyOS_AfterFork_Child``): a thread
    lock some parent thread held at the fork would otherwise stay held here.
    """
    _after_fork_in_child()


def open_lock_file(path: str, mode: int, create: bool) -> tuple[int, bool]:
    """Open (or create) a lock file, never following a symlink at its last component.

    Returns ``(fd, created)``.  A new lock file gets exactly ``mode`` (set with
    fchmod: the umask must not keep a group the table is shared with out of
    its lock).
    """
    import stat
    base = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW
    created = False
    try:
        if create:
            try:
                fd = os.open(path, base | os.O_CREAT | os.O_EXCL, mode)
                created = True
                os.fchmod(fd, mode)
            except FileExistsError:
                fd = os.open(path, base)
        else:
            fd = os.open(path, base)
    except OSError as e:
        if e.errno == errno.ELOOP or (e.errno == errno.EEXIST and os.path.islink(path)):
            raise NpcallsError(f"lock file {path} is a symbolic link; refusing to follow it") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NpcallsError(f"lock file {path} is not a regular file")
    return fd, created


class WriterLock:
    """A process's handle on a table's writer lock (re-entrant within a thread).

    Parameters
    ----------
    path : str
        The lock file.
    mode : int
        Permission bits if the lock file has to be created.
    """

    def __init__(self, path: str, mode: int = 0o600) -> None:
        key = os.path.realpath(path)
        self.created = False
        """True if this handle created the lock file."""
        with _registry_guard:
            lf = _registry.get(key)
            if lf is None:
                fd, self.created = open_lock_file(path, mode, create=True)
                lf = _LockFile(key, fd)
                _registry[key] = lf
            lf.refs += 1
        self._lf: _LockFile | None = lf

    def acquire(self, timeout: float | None = None) -> None:
        """Take the lock, waiting up to ``timeout`` seconds (None: as long as it takes)."""
        lf = self._lf
        if lf is None:
            raise NpcallsError("writer lock used after close")
        if timeout is None:
            lf.rlock.acquire()
        elif not lf.rlock.acquire(timeout=timeout):
            raise TimeoutError(f"writer lock {lf.path} still held by another thread after {timeout}s")
        if lf.depth == 0:
            try:
                if timeout is None:
                    fcntl.lockf(lf.fd, fcntl.LOCK_EX)
                else:
                    self._acquire_polling(lf, timeout)
            except BaseException:
                lf.rlock.release()
                raise
        lf.depth += 1

    @staticmethod
    def _acquire_polling(lf: _LockFile, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        delay = 0.0005
        while True:
            try:
                fcntl.lockf(lf.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError as e:
                if e.errno not in (errno.EACCES, errno.EAGAIN):
                    raise
            if time.monotonic() >= deadline:
                holder = lock_holder(lf.path)
                who = f" by pid {holder}" if holder else ""
                raise TimeoutError(f"writer lock {lf.path} still held{who} after {timeout}s")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    # The context-manager form is the hot path of every single write: kept lean.
    def __enter__(self) -> "WriterLock":
        lf = self._lf
        lf.rlock.acquire()
        if lf.depth == 0:
            try:
                _lockf(lf.fd, _LOCK_EX)
            except BaseException:
                lf.rlock.release()
                raise
        lf.depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        lf = self._lf
        lf.depth -= 1
        if lf.depth == 0:
            _lockf(lf.fd, _LOCK_UN)
        lf.rlock.release()

    def release(self) -> None:
        """Release one level of the lock; the file lock goes when the outermost level does."""
        lf = self._lf
        lf.depth -= 1
        if lf.depth == 0:
            fcntl.lockf(lf.fd, fcntl.LOCK_UN)
        lf.rlock.release()

    @property
    def held(self) -> bool:
        """True if this process holds the lock (in any thread)."""
        return self._lf is not None and self._lf.depth > 0

    def close(self) -> None:
        """Drop this handle; the descriptor closes when the process's last handle does."""
        lf = self._lf
        if lf is None:
            return
        self._lf = None
        with _registry_guard:
            lf.refs -= 1
            if lf.refs == 0:
                _registry.pop(lf.path, None)
                os.close(lf.fd)


_FLOCK = "hhqqi4x"  # struct flock on Linux x86-64 / aarch64: type, whence, start, len, pid


def lock_holder(path: str) -> int | None:
    """The pid holding the writer lock on ``path``, or None; takes no lock itself.

    Used by lock-free readers to tell a writer that is merely slow from one
    that died in the middle of a row (whose half-done row they may then read).
    """
    query = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
    lf = _registry.get(os.path.realpath(path))
    if lf is not None:
        # Never open and close a second descriptor here: closing it would drop
        # this process's own lock (the POSIX close trap described above).
        if lf.depth > 0:
            return os.getpid()
        ltype, _, _, _, pid = struct.unpack(_FLOCK, fcntl.fcntl(lf.fd, fcntl.F_GETLK, query))
        return None if ltype == fcntl.F_UNLCK else pid
    with _registry_guard:   # no handle of this process can take the lock while we close
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            return None
        try:
            ltype, _, _, _, pid = struct.unpack(_FLOCK, fcntl.fcntl(fd, fcntl.F_GETLK, query))
            return None if ltype == fcntl.F_UNLCK else pid
        finally:
            os.close(fd)
