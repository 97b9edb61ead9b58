"""npcalls.files: what sits at a table's or lock file's path is opened only if it is a file."""

from __future__ import annotations

import fcntl
import os
import socket
import stat

import pytest

from npcalls.files import DIRECTORY, SPECIAL, SYMLINK, RefusedFile, open_regular


def test_a_regular_file_opens_blocking_and_close_on_exec(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"x")
    fd, st = open_regular(str(p), os.O_RDWR)
    try:
        assert stat.S_ISREG(st.st_mode) and st.st_size == 1
        assert os.get_blocking(fd)
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert os.pread(fd, 1, 0) == b"x"
    finally:
        os.close(fd)


def test_create_exclusive_uses_the_mode_and_refuses_an_existing_file(tmp_path):
    p = str(tmp_path / "new")
    old = os.umask(0)
    try:
        fd, st = open_regular(p, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o640)
    finally:
        os.umask(old)
    os.close(fd)
    assert stat.S_IMODE(st.st_mode) == 0o640
    with pytest.raises(FileExistsError):
        open_regular(p, os.O_RDWR | os.O_CREAT | os.O_EXCL)


def _planted(kind: str, p: str) -> object:
    if kind == "symlink":
        target = p + ".target"
        open(target, "w").close()
        os.symlink(target, p)
    elif kind == "dir":
        os.mkdir(p)
    elif kind == "fifo":
        os.mkfifo(p)
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(p)
        return s
    return None


@pytest.mark.parametrize("flags", [os.O_RDONLY, os.O_RDWR])
@pytest.mark.parametrize("kind,what", [("symlink", SYMLINK), ("dir", DIRECTORY),
                                       ("fifo", SPECIAL), ("socket", SPECIAL)])
def test_anything_but_a_regular_file_is_refused_without_blocking(tmp_path, kind, what, flags):
    p = str(tmp_path / "planted")
    keep = _planted(kind, p)
    try:
        with pytest.raises(RefusedFile) as e:
            open_regular(p, flags)          # a FIFO with no writer must not hang here
        assert e.value.what == what and e.value.filename == p
        assert p in str(e.value)
    finally:
        if keep is not None:
            keep.close()            # type: ignore[attr-defined]


def test_a_device_is_refused():
    with pytest.raises(RefusedFile) as e:
        open_regular("/dev/null", os.O_RDONLY)
    assert e.value.what == SPECIAL


def test_other_errors_pass_through(tmp_path):
    with pytest.raises(FileNotFoundError):
        open_regular(str(tmp_path / "absent"), os.O_RDONLY)
