"""Table files: where they live, how they are created, validated and mapped.

Creation is atomic: the file is built complete under a temporary name
(O_EXCL, mode set explicitly, space reserved with posix_fallocate) and then
hard-linked into place, which fails if anything, a symlink included, already
holds the name.  So another process sees either no table or a whole one, never
a half-written header, and a full /dev/shm is an ENOSPC error at create time
instead of a SIGBUS at some later write.

Opening checks that the path is a regular file (not following a symlink),
reads the header with ordinary reads, validates every field against the file
size (:func:`npcalls.layout.parse_header`) and only then maps the file, so a
truncated, foreign or hostile file is a :class:`FormatError`, never a fault.
"""

from __future__ import annotations

import errno
import mmap
import os
import re
import secrets
from dataclasses import dataclass

import numpy as np

from .errors import FormatError, NpcallsError, TableExistsError, TableNotFoundError
from .files import DIRECTORY, SYMLINK, RefusedFile, open_regular
from .layout import BUCKET, HEADER_SIZE, Geometry, pack_header, parse_header, row_dtype

__all__ = ["resolve", "pid_alive", "shm_dir", "Mapping", "build_temp", "link_into_place", "open_mapping",
           "remove_files", "same_file", "stale_temp_files", "sweep_temps"]

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,200}$")


def shm_dir() -> str:
    """Directory for tables given by bare name: $NPCALLS_DIR, else /dev/shm."""
    return os.environ.get("NPCALLS_DIR") or "/dev/shm"


def resolve(name_or_path: str | os.PathLike) -> tuple[str, str]:
    """Map a table name or path to ``(data file, lock file)``.

    A bare name (no ``/``) such as ``"calls"`` lives in shared memory as
    ``/dev/shm/npcalls.calls``; anything containing a ``/`` is used as a path
    (a table on disk outlives reboots).  The lock file is the data file's
    path plus ``.lock``.
    """
    s = os.fspath(name_or_path)
    if isinstance(s, bytes):
        s = os.fsdecode(s)
    if not s:
        raise ValueError("table name is empty")
    if "/" in s:
        path = s
    else:
        if not _NAME.match(s):
            raise ValueError(f"invalid table name {s!r}: use letters, digits, '_', '.', '-' "
                             "(not starting with '.' or '-'), or give a path containing '/'")
        path = os.path.join(shm_dir(), "npcalls." + s)
    return path, path + ".lock"


@dataclass(eq=False)
class Mapping:
    """One mapped table file and the numpy/memoryview windows onto it."""

    path: str
    geometry: Geometry
    fd: int
    mm: mmap.mmap
    inode: tuple[int, int]
    readonly: bool

    def __post_init__(self) -> None:
        g = self.geometry
        self.mv = memoryview(self.mm)
        self.q = self.mv.cast("Q")          # uint64 words: header, tags, seq
        self.qi = self.mv.cast("q")         # int64 words: start, end
        self.tags = np.frombuffer(self.mm, np.uint64, g.capacity, g.tags_offset)
        self.tags2d = self.tags.reshape(g.nbuckets, BUCKET)
        self.rows = np.frombuffer(self.mm, row_dtype(g.key_field), g.capacity, g.rows_offset)
        self.rowq = np.frombuffer(self.mm, np.uint64, g.capacity * g.row_size // 8,
                                  g.rows_offset).reshape(g.capacity, g.row_size // 8)
        self.seqcol = self.rowq[:, 0]

    def __del__(self) -> None:
        # A mapping a rebuild left behind is never closed explicitly (another
        # thread may still read it); its descriptor goes with its last reference.
        fd = self.__dict__.get("fd", -1)
        if fd >= 0:
            self.fd = -1
            try:
                os.close(fd)
            except OSError:
                pass

    def close(self) -> None:
        """Release every view, then the mapping and the descriptor."""
        for attr in ("tags", "tags2d", "rows", "rowq", "seqcol"):
            self.__dict__.pop(attr, None)
        for attr in ("qi", "q", "mv"):
            v = self.__dict__.pop(attr, None)
            if v is not None:
                v.release()
        try:
            self.mm.close()
        except BufferError:
            pass  # a caller still holds a view; the mapping goes when it does
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _no_follow_error(path: str) -> NpcallsError:
    return NpcallsError(f"{path} is a symbolic link; npcalls never follows links to table "
                        "files (a link in world-writable /dev/shm could redirect writes)")


def build_temp(path: str, g: Geometry, mode: int) -> str:
    """Create a complete, empty table file under a temporary name beside ``path``.

    The caller publishes it with :func:`link_into_place` (create) or
    ``os.rename`` (rebuild), or unlinks it.
    """
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise TableNotFoundError(errno.ENOENT, f"directory {d} does not exist", d)
    tmp = os.path.join(d, f".{os.path.basename(path)}.new-{os.getpid()}-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # the umask must not weaken or widen what the caller asked for
        try:
            os.posix_fallocate(fd, 0, g.file_size)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EFBIG):
                raise NpcallsError(
                    f"cannot reserve {g.file_size / 2**20:.1f} MiB for table {path}: "
                    f"{os.strerror(e.errno)} (free space in {d}, or choose a smaller capacity)"
                ) from None
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                os.ftruncate(fd, g.file_size)   # a filesystem without fallocate
            else:
                raise
        os.pwrite(fd, pack_header(g), 0)
        _fresh.add(_inode(os.fstat(fd)))
    except BaseException:
        _unlink_quietly(tmp)
        raise
    finally:
        os.close(fd)
    return tmp


_fresh: set[tuple[int, int]] = set()
"""Files this process built and has not mapped yet: the first writable mapping pre-faults them."""

_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)   # Linux >= 5.14


def _inode(st: os.stat_result) -> tuple[int, int]:
    return (st.st_dev, st.st_ino)


def _prefault(mm: mmap.mmap) -> None:
    """Map every page of a new table now, in one kernel call.

    A fresh table is written all over by its first batch (homes spread by
    the hash), and taking those pages one fault at a time costs about twice
    as much as populating them up front.  Older kernels (EINVAL) or other
    platforms simply fault on first touch, as before.
    """
    if hasattr(mm, "madvise"):
        try:
            mm.madvise(_MADV_POPULATE_WRITE)
        except (OSError, ValueError, OverflowError):
            pass


def link_into_place(tmp: str, path: str) -> None:
    """Give the finished file ``tmp`` the name ``path``, failing if the name is taken."""
    try:
        os.link(tmp, path)   # unlike rename, link never replaces: O_EXCL for a whole file
    except FileExistsError:
        if os.path.islink(path):
            raise _no_follow_error(path) from None
        raise TableExistsError(errno.EEXIST, f"table {path} already exists", path) from None
    finally:
        _unlink_quietly(tmp)


def _unlink_quietly(p: str) -> None:
    try:
        os.unlink(p)
    except FileNotFoundError:
        pass


def open_mapping(path: str, readonly: bool) -> Mapping:
    """Open, validate and map a table file."""
    try:
        fd, st = open_regular(path, os.O_RDONLY if readonly else os.O_RDWR)
    except FileNotFoundError:
        raise TableNotFoundError(errno.ENOENT, f"no table at {path}", path) from None
    except RefusedFile as e:
        if e.what == SYMLINK:
            raise _no_follow_error(path) from None
        if e.what == DIRECTORY:
            raise FormatError(f"{path}: is a directory, not a table") from None
        raise FormatError(f"{path}: not a regular file") from None
    try:
        buf = os.pread(fd, HEADER_SIZE, 0)
        g = parse_header(buf, st.st_size, path)
        if st.st_blocks * 512 < g.file_size:
            _reserve_or_refuse(fd, path, g.file_size, st.st_blocks * 512, readonly)
        prot = mmap.PROT_READ if readonly else mmap.PROT_READ | mmap.PROT_WRITE
        mm = mmap.mmap(fd, g.file_size, mmap.MAP_SHARED, prot)
        if os.fstat(fd).st_size != g.file_size:
            mm.close()
            raise FormatError(f"{path}: file size changed while opening it")
        if not readonly and _inode(st) in _fresh:
            _fresh.discard(_inode(st))
            _prefault(mm)
        return Mapping(path, g, fd, mm, (st.st_dev, st.st_ino), readonly)
    except BaseException:
        os.close(fd)
        raise


_MEMORY_FS = (0x01021994, 0x858458F6)   # tmpfs (also /dev/shm), ramfs


def _fs_type(fd: int) -> int | None:
    """statfs f_type of an open file (os.statvfs does not give it); None if unknown."""
    import ctypes
    import struct
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        buf = ctypes.create_string_buffer(256)
        if libc.fstatfs(fd, buf) != 0:
            return None
        return struct.unpack_from("l", buf.raw)[0] & 0xFFFFFFFF
    except (OSError, AttributeError):
        return None


def _reserve_or_refuse(fd: int, path: str, size: int, allocated: int, readonly: bool) -> None:
    """A sparse table file: reserve its space (writers) or refuse it, never a SIGBUS later.

    On tmpfs every page touched, even read, must be allocated then: in a full
    tmpfs that is a SIGBUS.  A writer reserves the whole file first
    (posix_fallocate) and refuses cleanly if the space is not there; a reader
    may not write, so it refuses a sparse file on tmpfs and names the fix.  On
    disk filesystems holes read as zeros without allocating anything, and some
    (compressing ones) report fewer blocks than the size for dense files:
    readers accept those.
    """
    what = (f"{path}: the file is sparse ({allocated / 2**20:.1f} of {size / 2**20:.1f} MiB "
            "allocated, e.g. copied with `cp --sparse=always`)")
    fix = ("open it once for writing to reserve its space (with room free), or copy it again "
           "with `cp --sparse=never`")
    if readonly:
        if _fs_type(fd) in _MEMORY_FS:
            raise FormatError(f"{what}; reading it could crash this process with SIGBUS when "
                              f"memory runs short: {fix}")
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
            return              # a filesystem without fallocate: nothing to reserve with
        d = os.path.dirname(os.path.abspath(path))
        raise FormatError(f"{what} and its space cannot be reserved: {os.strerror(e.errno or 0)}; "
                          f"free space in {d}, or copy the table again with "
                          "`cp --sparse=never`") from None


def same_file(path: str, inode: tuple[int, int]) -> bool:
    """True if ``path`` (not followed if a link) is still the file ``inode``."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) == inode


def stale_temp_files(path: str) -> list[str]:
    """Temporary files left by creators or rebuilders that died (their pid is gone)."""
    d = os.path.dirname(os.path.abspath(path))
    prefix = f".{os.path.basename(path)}.new-"
    out: list[str] = []
    try:
        names = os.listdir(d)
    except OSError:
        return out
    for n in names:
        if n.startswith(prefix):
            try:
                pid = int(n[len(prefix):].split("-")[0])
            except ValueError:
                continue
            if not pid_alive(pid):
                out.append(os.path.join(d, n))
    return out


def sweep_temps(path: str) -> None:
    """Remove temporary files that dead creators or rebuilders left beside ``path``."""
    for p in stale_temp_files(path):
        try:
            os.unlink(p)
        except OSError:
            pass


def pid_alive(pid: int) -> bool:
    """True if a process ``pid`` exists (also one of another user, which we may not signal)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_files(path: str, lock_path: str) -> bool:
    """Unlink a table's data and lock files; True if the data file existed."""
    existed = True
    for p in (path, lock_path):
        try:
            os.unlink(p)
        except FileNotFoundError:
            if p == path:
                existed = False
    return existed
