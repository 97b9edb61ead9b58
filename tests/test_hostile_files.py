"""P6 (docs/properties.md): truncated, foreign, corrupt or hostile files give clear errors, never a crash.

Opening happens in a separate worker process, so that a SIGBUS or a segfault
would show as the worker dying (a test failure), not as the test run dying.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import struct
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import npcalls
from npcalls import CallTable, FormatError, NpcallsError
from npcalls.layout import FORMAT_VERSION, HEADER_SIZE, STATIC_CHECKSUM_OFFSET, W, _checksum

HERE = os.path.dirname(__file__)


class Worker:
    def __init__(self) -> None:
        self.start()

    def start(self) -> None:
        self.p = subprocess.Popen([sys.executable, os.path.join(HERE, "helpers", "hostile_worker.py")],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(self, path: str, ops: bool = False) -> dict:
        self.p.stdin.write(json.dumps({"path": path, "ops": ops}) + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line:
            code = self.p.wait(10)
            self.start()
            sig = -code if code < 0 else None
            raise AssertionError(f"worker died on {path} (exit {code}"
                                 f"{', signal ' + signal.Signals(sig).name if sig else ''})")
        return json.loads(line)

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait(10)


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.close()


@pytest.fixture
def good(tmp_path):
    p = str(tmp_path / "good.npcalls")
    t = CallTable.create(p, 256)
    t.start_many([f"call-{i}" for i in range(100)], list(range(100)))
    t.close()
    with open(p, "rb") as f:
        data = f.read()
    yield p, data


def _write(path: str, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return path


def _reseal(data: bytearray) -> bytearray:
    """Recompute the header checksum, so that only the field checks stand in the way."""
    struct.pack_into("<Q", data, STATIC_CHECKSUM_OFFSET, _checksum(bytes(data[:STATIC_CHECKSUM_OFFSET])))
    return data


@pytest.mark.parametrize("case,message", [
    ("empty", "truncated"),
    ("short-garbage", "not an npcalls table"),
    ("foreign", "not an npcalls table"),
    ("truncated-rows", "truncated"),
    ("trailing-bytes", "trailing bytes"),
    ("newer-version", "newer format version"),
    ("checksum", "checksum"),
    ("absurd-capacity", "impossible values|inconsistent"),
    ("absurd-offsets", "inconsistent"),
])
def test_broken_files_give_a_clear_format_error(worker, good, tmp_path, case, message):
    path, data = good
    p = str(tmp_path / f"{case}.npcalls")
    d = bytearray(data)
    if case == "empty":
        d = bytearray()
    elif case == "short-garbage":
        d = bytearray(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)
    elif case == "foreign":
        d = bytearray(os.urandom(len(data)))
    elif case == "truncated-rows":
        d = d[: len(d) - 1000]
    elif case == "trailing-bytes":
        d += b"\x00" * 4096
    elif case == "newer-version":
        struct.pack_into("<I", d, 8, FORMAT_VERSION + 1)
        d = _reseal(d)
    elif case == "checksum":
        d[40] ^= 0x01                                 # a capacity bit, checksum left stale
    elif case == "absurd-capacity":
        struct.pack_into("<Q", d, 32, 1 << 62)
        d = _reseal(d)
    elif case == "absurd-offsets":
        struct.pack_into("<Q", d, 56, 1 << 40)       # rows_offset far beyond the file
        d = _reseal(d)
    _write(p, bytes(d))
    r = worker.ask(p)
    assert r["result"] == "error" and r["error"] == "FormatError", r
    import re
    assert re.search(message, r["message"]), r
    assert p in r["message"]                          # the error names the file
    with pytest.raises(FormatError):
        CallTable.open(p)


def test_special_files_and_links_are_refused(worker, good, tmp_path):
    path, _ = good
    link = str(tmp_path / "link.npcalls")
    os.symlink(path, link)
    r = worker.ask(link)
    assert r["result"] == "error" and "symbolic link" in r["message"], r
    d = str(tmp_path / "dir.npcalls")
    os.mkdir(d)
    assert worker.ask(d)["error"] == "FormatError"
    fifo = str(tmp_path / "fifo.npcalls")
    os.mkfifo(fifo)
    r = worker.ask(fifo)                              # must not block on the FIFO
    assert r["error"] == "FormatError" and "regular" in r["message"], r
    r = worker.ask(str(tmp_path / "missing.npcalls"))
    assert r["error"] == "TableNotFoundError", r


def test_create_refuses_existing_files_and_symlinks(tmp_path):
    target = str(tmp_path / "victim")
    _write(target, b"precious")
    link = str(tmp_path / "t.npcalls")
    os.symlink(target, link)
    with pytest.raises(NpcallsError, match="symbolic link"):
        CallTable.create(link, 64)
    dangling = str(tmp_path / "dangling.npcalls")
    os.symlink(str(tmp_path / "nowhere"), dangling)
    with pytest.raises(NpcallsError, match="symbolic link"):
        CallTable.create(dangling, 64)
    assert not os.path.exists(str(tmp_path / "nowhere"))
    with pytest.raises(npcalls.TableExistsError):
        CallTable.create(target, 64)
    with open(target, "rb") as f:
        assert f.read() == b"precious"            # nothing was written through
    leftovers = [n for n in os.listdir(tmp_path) if ".new-" in n]
    assert leftovers == []


def test_created_files_have_the_mode_asked_for(tmp_path):
    old = os.umask(0o022)
    try:
        a = str(tmp_path / "a.npcalls")
        CallTable.create(a, 64).close()
        assert stat.S_IMODE(os.stat(a).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(a + ".lock").st_mode) == 0o600
        b = str(tmp_path / "b.npcalls")
        CallTable.create(b, 64, mode=0o660).close()   # wider than the umask allows
        assert stat.S_IMODE(os.stat(b).st_mode) == 0o660
    finally:
        os.umask(old)


def test_no_space_is_an_error_at_create_time(tmp_path):
    # posix_fallocate reserves the space up front: with a file-size limit the
    # create fails cleanly instead of a SIGBUS at some later write.
    p = str(tmp_path / "big.npcalls")
    code = ("import resource, signal, sys\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))\n"
            "from npcalls import CallTable, NpcallsError\n"
            "try:\n"
            "    CallTable.create(sys.argv[1], 1 << 20)\n"
            "except NpcallsError as e:\n"
            "    print(e); sys.exit(7)\n")
    r = subprocess.run([sys.executable, "-c", code, p], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 7, (r.returncode, r.stdout, r.stderr)
    assert "cannot reserve" in r.stdout and "MiB" in r.stdout
    assert not os.path.exists(p)
    assert [n for n in os.listdir(tmp_path) if ".new-" in n] == []


def test_readonly_attach_cannot_write(good):
    path, _ = good
    with CallTable.open(path, readonly=True) as t:
        with pytest.raises(npcalls.ReadOnlyError):
            t.start("x")
        with pytest.raises(npcalls.ReadOnlyError):
            t.start_many(["x"])
        with pytest.raises(npcalls.ReadOnlyError):
            t.expire(ended_before=1)
        assert t.get("call-5") == (5, npcalls.NOT_SET)


def test_hostile_header_words_and_tags(worker, good, tmp_path):
    """A checksum-valid header with hostile dynamic words, and garbage tags."""
    path, data = good
    d = bytearray(data)
    q = memoryview(d).cast("Q")
    q[W["state"]] = 77
    q[W["count"]] = 1 << 60
    q[W["wseq"]] = 12345                             # odd: a "crashed" writer
    p = _write(str(tmp_path / "h1.npcalls"), bytes(d))
    r = worker.ask(p, ops=True)
    assert r["result"] in ("error", "error-after-open") and r["error"] == "FormatError", r
    d = bytearray(data)
    tags = memoryview(d)[HEADER_SIZE:HEADER_SIZE + 8 * 256].cast("Q")
    for i in range(256):
        tags[i] = (i * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF | 2   # no EMPTY anywhere
    p = _write(str(tmp_path / "h2.npcalls"), bytes(d))
    r = worker.ask(p, ops=True)
    assert r["result"] in ("opened", "error-after-open"), r


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_headers_and_sizes(worker, good, tmp_path, data):
    """Random header bytes, random sizes: the documented error or a usable table."""
    path, orig = good
    d = bytearray(orig)
    for _ in range(data.draw(st.integers(1, 6), label="edits")):
        off = data.draw(st.integers(0, HEADER_SIZE - 8), label="offset")
        kind = data.draw(st.sampled_from(["byte", "word", "huge"]), label="kind")
        if kind == "byte":
            d[off] = data.draw(st.integers(0, 255))
        elif kind == "word":
            struct.pack_into("<Q", d, off & ~7, data.draw(st.integers(0, 2**64 - 1)))
        else:
            struct.pack_into("<Q", d, off & ~7, 2**63 + data.draw(st.integers(0, 2**32)))
    if data.draw(st.booleans(), label="reseal"):
        d = _reseal(d)
    size = data.draw(st.sampled_from(["same", "cut", "grow"]), label="size")
    if size == "cut":
        d = d[: data.draw(st.integers(0, len(d) - 1))]
    elif size == "grow":
        d += b"\x00" * data.draw(st.integers(1, 9000))
    p = _write(str(tmp_path / "fuzz.npcalls"), bytes(d))
    r = worker.ask(p, ops=data.draw(st.booleans(), label="ops"))
    assert r["result"] in ("opened", "error", "error-after-open"), r
    if r["result"] != "opened":
        assert r["error"] in ("FormatError", "TableRemovedError", "NpcallsError",
                              "TableFullError"), r


def test_a_count_past_any_capacity_is_a_full_table_not_a_crash(tmp_path):
    """A header claiming more calls than any table can hold (found by the fuzz test above):
    an auto-grow table must not try to grow past the largest capacity (a ValueError
    from the geometry); it is full, and says so."""
    path = str(tmp_path / "huge-count.npcalls")
    CallTable.create(path, capacity=64, key_width=16, auto_grow=True).close()
    with open(path, "r+b") as f:
        f.seek(8 * W["count"])
        f.write(struct.pack("<Q", 22_194_710_512))
    code = (f"import npcalls\nt = npcalls.CallTable.open({path!r})\n"
            "try:\n    t.start_many(['a', 'b'])\nexcept npcalls.TableFullError as e:\n"
            "    print('full', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("full"), r.stdout
    CallTable.unlink(path)
