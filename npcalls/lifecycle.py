"""Making and removing a table's files: docs/format.md, "Files" and "Rebuilding" (Unlink).

Creation builds the file complete under a temporary name, creates the lock
file first and records its inode in the header ("The lock file's
identity"), then publishes the file with ``link(2)``.  Removal takes the
lock, marks the file the path names REMOVED, then removes both files.
"""

from __future__ import annotations

import os
import struct

from .crashpoints import crashpoint
from .errors import NpcallsError, TableNotFoundError
from .layout import LOCK_INO_OFFSET, STATE_REMOVED, Geometry, W
from .locking import WriterLock
from .storage import build_temp, link_into_place, open_mapping, remove_files

__all__ = ["create_file", "unlink_table", "stamp_lock"]

_W_STATE, _W_LOCK = W["state"], W["lock_ino"]


def create_file(path: str, lock_path: str, g: Geometry, mode: int) -> None:
    """Create the table file of geometry ``g`` at ``path``, and its lock file."""
    tmp = build_temp(path, g, mode)
    crashpoint("create-built")
    # The lock file exists before the table does, so that no writer can ever
    # see a table without its lock.  A refused create leaves nothing behind.
    try:
        lock = WriterLock(lock_path, mode)
        stamp_lock(tmp, lock.inode)
    except BaseException:
        os.unlink(tmp)
        raise
    try:
        link_into_place(tmp, path)
    except BaseException:
        lock.close()
        if lock.created:
            try:
                os.unlink(lock_path)
            except FileNotFoundError:
                pass
        raise
    lock.close()


def unlink_table(path: str, lock_path: str) -> bool:
    """Remove a table and its lock file (see :meth:`CallTable.unlink`)."""
    try:
        m = open_mapping(path, readonly=False)
    except NpcallsError:
        return remove_files(path, lock_path)  # not a usable table: just remove the files
    try:
        st = os.fstat(m.fd)
        lock = WriterLock(lock_path, st.st_mode & 0o7777, owner=(st.st_uid, st.st_gid))
    except BaseException:
        m.close()
        raise
    try:
        lock.acquire()
        try:
            # Act on the file the path names now, with the lock that its
            # writers take: a rebuild may have replaced the file while we
            # waited, and the lock file may have moved.
            while True:
                m.close()
                try:
                    m = open_mapping(path, readonly=False)
                except TableNotFoundError:
                    return remove_files(path, lock_path)
                if m.q[_W_LOCK] == lock.inode:
                    break
                lock.settle(m.q, _W_LOCK)
            m.q[_W_STATE] = STATE_REMOVED
            return remove_files(path, lock_path)
        finally:
            lock.release()
    finally:
        lock.close()
        m.close()


def stamp_lock(tmp: str, ino: int) -> None:
    """Record the lock file's inode in a new table's header (docs/format.md, "Writing")."""
    fd = os.open(tmp, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.pwrite(fd, struct.pack("<Q", ino), LOCK_INO_OFFSET)
    finally:
        os.close(fd)
