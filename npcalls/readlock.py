"""How readers are kept from seeing torn rows: the platform rule and the two read modes.

* ``"lockfree"`` (the default on x86-64): readers take no lock at all and
  validate each row against the writer sequence (docs/format.md, "Reading
  without a lock").  This relies on the CPU keeping stores in program order
  and loads in program order (x86's total store order): numpy cannot issue the
  memory barriers a weakly ordered CPU would need between a row's payload and
  its version.
* ``"shared"`` (the default on every other CPU, e.g. aarch64, and selectable
  anywhere): each read operation holds a *shared* lock on the table's lock
  file for the duration of that read only.  Writers take their exclusive lock
  as always, so no writer runs while a read holds the shared lock, and the
  kernel's lock calls order memory on every CPU.

The shared lock is an open-file-description lock (``F_OFD_SETLKW``, Linux
3.15+) over the whole lock file, taken through a descriptor of the reading
thread's own.  Not a POSIX record lock: those belong to the *process*, so a
reader thread taking ``F_RDLCK`` where a writer thread of the same process
holds ``F_WRLCK`` would silently turn the writer's lock into a read lock (and
its release would drop the writer's lock altogether).  An OFD lock conflicts
with a POSIX lock even inside one process, so such a reader thread simply
waits for the writer thread.  A thread that itself holds the writer lock
reads without the shared lock (it is the only writer).

Byte order: tables are little-endian and every row is read through
native-order numpy views, so npcalls refuses to import on a big-endian host.
"""

from __future__ import annotations

import errno
import fcntl
import os
import platform
import struct
import sys
import threading

from . import locking
from .errors import NpcallsError
from .files import SYMLINK, RefusedFile, open_regular

__all__ = ["LOCKFREE", "SHARED", "READ_MODES", "ENV_VAR", "resolve_read_mode", "tso_cpu",
           "SharedReadLock"]

if sys.byteorder != "little":
    raise ImportError(
        f"npcalls needs a little-endian CPU: its tables are little-endian and are read through "
        f"native-order views, and this host ({platform.machine() or 'unknown'}) is "
        f"{sys.byteorder}-endian")

LOCKFREE = "lockfree"
SHARED = "shared"
READ_MODES = (LOCKFREE, SHARED)
ENV_VAR = "NPCALLS_READ_MODE"
_TSO_MACHINES = {"x86_64", "amd64", "x86", "i386", "i486", "i586", "i686"}


def tso_cpu() -> bool:
    """True on CPUs whose memory order the lock-free read protocol relies on (x86)."""
    return platform.machine().lower() in _TSO_MACHINES


def resolve_read_mode(read_mode: str | None) -> str:
    """The read mode to use: the argument, else ``$NPCALLS_READ_MODE``, else the platform's.

    Raises
    ------
    ValueError
        An unknown mode, or ``"lockfree"`` on a CPU where it would be unsafe.
    """
    where = "read_mode"
    if read_mode is None:
        env = os.environ.get(ENV_VAR, "").strip()
        if env:
            read_mode, where = env, f"${ENV_VAR}"
        else:
            return LOCKFREE if tso_cpu() else SHARED
    if read_mode not in READ_MODES:
        raise NpcallsError(f"{where}={read_mode!r}: expected one of {', '.join(READ_MODES)}")
    if read_mode == LOCKFREE and not tso_cpu():
        raise NpcallsError(
            f"{where}={read_mode!r}: lock-free reads rely on x86's store ordering, and this CPU "
            f"({platform.machine()}) does not guarantee it; use read_mode='shared'")
    return read_mode


_FLOCK = "hhqqi4x"      # struct flock on Linux 64-bit: type, whence, start, len, pid, padding
_RDLOCK_ALL = struct.pack(_FLOCK, fcntl.F_RDLCK, os.SEEK_SET, 0, 0, 0)
_UNLOCK_ALL = struct.pack(_FLOCK, fcntl.F_UNLCK, os.SEEK_SET, 0, 0, 0)
_F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
_F_OFD_SETLKW = getattr(fcntl, "F_OFD_SETLKW", 38)


class _ThreadFd:
    """One thread's descriptor of the lock file (closed when the thread's state goes)."""

    __slots__ = ("fd", "pid", "ino", "depth")

    def __init__(self, fd: int, ino: tuple[int, int]) -> None:
        self.fd = fd
        self.pid = os.getpid()
        self.ino = ino
        self.depth = 0

    def close(self) -> None:
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1

    def __del__(self) -> None:
        # never in a forked child: the descriptor number may have been reused there
        if self.pid == os.getpid():
            self.close()


class SharedReadLock:
    """The shared lock a reader holds for the duration of one read (``with lock: ...``).

    Re-entrant within a thread; each thread (and each forked child) uses its
    own descriptor, since OFD locks belong to the open file description.

    Parameters
    ----------
    lock_path : str
        The table's lock file.  Created (with ``mode``) if it does not exist,
        like a writer would: without it readers could not exclude writers.
    mode : int
        Permission bits for a lock file this reader has to create.
    table_path : str
        For messages.
    """

    def __init__(self, lock_path: str, mode: int, table_path: str) -> None:
        self.lock_path = lock_path
        self.mode = mode
        self.table_path = table_path
        self._local = threading.local()
        # the writer-lock registry's key, computed once (realpath costs ~10 us)
        self._reg_key = locking._key(lock_path)

    # -- descriptors

    def _open(self) -> _ThreadFd:
        for _ in range(100):
            try:
                fd, st = open_regular(self.lock_path, os.O_RDONLY)
            except FileNotFoundError:
                self._create()
                continue
            except RefusedFile as e:
                if e.what == SYMLINK:
                    raise self._error(e) from None
                raise NpcallsError(f"lock file {self.lock_path} of table {self.table_path} is "
                                   "not a regular file; remove it (readers in shared mode lock "
                                   "it)") from None
            except OSError as e:
                raise self._error(e) from None
            return _ThreadFd(fd, (st.st_dev, st.st_ino))
        raise NpcallsError(f"lock file {self.lock_path} keeps disappearing")

    def _create(self) -> None:
        try:
            fd = os.open(self.lock_path,
                         os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         self.mode)
        except FileExistsError:
            return
        except OSError as e:
            raise self._error(e) from None
        try:
            os.fchmod(fd, self.mode)
        finally:
            os.close(fd)

    def _error(self, e: OSError) -> NpcallsError:
        if e.errno == errno.ELOOP:
            return NpcallsError(f"lock file {self.lock_path} is a symbolic link; refusing to "
                                "follow it")
        return NpcallsError(
            f"shared-lock reads of table {self.table_path} need its lock file "
            f"{self.lock_path}: {os.strerror(e.errno or 0)}.  Let a writer create it, give "
            f"this user read access to it, or read lock-free (read_mode='lockfree', x86-64 "
            "only)")

    def _thread_fd(self) -> _ThreadFd:
        tf = getattr(self._local, "tf", None)
        if tf is None or tf.pid != os.getpid() or tf.fd < 0:
            if tf is not None and tf.pid != os.getpid():
                tf.close()      # inherited across fork: shares the parent's lock state
            tf = self._open()
            self._local.tf = tf
        return tf

    # -- locking

    def __enter__(self) -> "SharedReadLock":
        tf = self._thread_fd()
        if tf.depth:
            tf.depth += 1
            return self
        if _this_thread_writes(self._reg_key):
            tf.depth = -1 << 20     # the writer itself: nothing to exclude; keep counting
            tf.depth += 1
            return self
        while True:
            fcntl.fcntl(tf.fd, _F_OFD_SETLKW, _RDLOCK_ALL)
            # The lock only excludes writers that lock the same file: if the lock
            # file was replaced (removed and re-created), lock the one at the path.
            try:
                st = os.stat(self.lock_path, follow_symlinks=False)
                same = (st.st_dev, st.st_ino) == tf.ino
            except FileNotFoundError:
                same = False
            if same:
                break
            fcntl.fcntl(tf.fd, _F_OFD_SETLK, _UNLOCK_ALL)
            tf.close()
            self._local.tf = tf = self._open()
        tf.depth = 1
        return self

    def __exit__(self, *exc: object) -> None:
        tf = self._local.tf
        tf.depth -= 1
        if tf.depth == 0:
            fcntl.fcntl(tf.fd, _F_OFD_SETLK, _UNLOCK_ALL)
        elif tf.depth == -1 << 20:
            tf.depth = 0

    def close(self) -> None:
        """Close this thread's descriptor (other threads' close when they end)."""
        tf = getattr(self._local, "tf", None)
        if tf is not None and tf.pid == os.getpid() and tf.depth == 0:
            tf.close()
        self._local = threading.local()


def _this_thread_writes(reg_key: str) -> bool:
    """True if the calling thread holds this table's writer lock (it must not wait on itself)."""
    lf = locking._registry.get(reg_key)
    if lf is None or not lf.depth:
        return False
    if not lf.rlock.acquire(blocking=False):
        return False                    # another thread of this process writes: wait for it
    try:
        return lf.depth > 0             # re-entered: this thread is the one holding it
    finally:
        lf.rlock.release()
