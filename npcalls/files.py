"""Opening npcalls' own files (tables, lock files) without trusting what is at the path.

/dev/shm is writable by every user, so whatever sits at a table's or a lock
file's path may have been put there by someone else.  These files are
therefore opened without following a symbolic link at the last component
(``O_NOFOLLOW``) and without blocking on a FIFO (``O_NONBLOCK``, turned off
again once the file is known to be regular), and anything but a regular
file is refused.  Each caller words the refusal for its own file.
"""

from __future__ import annotations

import errno
import os
import stat

__all__ = ["RefusedFile", "open_regular", "SYMLINK", "DIRECTORY", "SPECIAL"]

SYMLINK = "a symbolic link"
DIRECTORY = "a directory"
SPECIAL = "not a regular file"      # a FIFO, socket or device

_SAFE = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
# What open(2) with _SAFE says when the path holds no regular file.  ENXIO:
# a FIFO opened for writing with no reader, or a socket.
_REFUSED = {errno.ELOOP: SYMLINK, errno.EISDIR: DIRECTORY, errno.ENXIO: SPECIAL}
_ERRNO = {what: code for code, what in _REFUSED.items()}


class RefusedFile(OSError):
    """Something other than a regular file sits at the path.

    Attributes
    ----------
    what : str
        :data:`SYMLINK`, :data:`DIRECTORY` or :data:`SPECIAL`.
    """

    def __init__(self, path: str, what: str) -> None:
        super().__init__(_ERRNO[what], f"{path} is {what}", path)
        self.what = what


def open_regular(path: str, flags: int, mode: int = 0o600) -> tuple[int, os.stat_result]:
    """Open ``path``, which must be a regular file; returns ``(fd, its fstat)``.

    Parameters
    ----------
    path : str
    flags : int
        :func:`os.open` flags (``O_CREAT | O_EXCL`` allowed); the descriptor
        is always close-on-exec and, once returned, blocking.
    mode : int
        For a file ``O_CREAT`` creates (less the umask).

    Raises
    ------
    RefusedFile
        A symbolic link, a directory, a FIFO, a socket or a device is at the path.
    OSError
        Any other failure of open(2), e.g. ``FileNotFoundError``,
        ``FileExistsError`` or ``PermissionError``.
    """
    try:
        fd = os.open(path, flags | _SAFE, mode)
    except OSError as e:
        what = _REFUSED.get(e.errno or 0)
        if what is None:
            raise
        raise RefusedFile(path, what) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RefusedFile(path, DIRECTORY if stat.S_ISDIR(st.st_mode) else SPECIAL)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, st
