"""What the Kamailio tests share: a fake KSR, lock holders, forks, and the end-to-end set-up.

* Without Kamailio (test_kamailio_unit.py, test_kamailio_native.py):
  :class:`FakeKSR`, :func:`monitor`, :class:`Holder` (a separate process
  holding the writer lock), :func:`lock_held_by_a_thread`, :func:`in_child`,
  :func:`raw_fork`, :func:`wait_child`.
* With Kamailio (the ``*_e2e.py`` tests, through :mod:`helpers.kamailio_harness`):
  :func:`require_programs`, :func:`new_table_dir`, :func:`read_table`, :func:`check_table`.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path
from typing import Callable, Iterator

import pytest

from npcalls import CallTable
from npcalls.kamailio import CallMonitor

from helpers import kamailio_harness as harness


class FakeKSR:
    """The parts of Kamailio's KSR module the helper uses: pv.get and the log functions."""

    def __init__(self, call_id: str | None = None) -> None:
        self.vars: dict[str, object] = {"$ci": call_id}
        self.lines: list[tuple[str, str]] = []
        self.pv = types.SimpleNamespace(get=self.vars.get)

    def err(self, text: str) -> None:
        self.lines.append(("err", text))

    def warn(self, text: str) -> None:
        self.lines.append(("warn", text))

    def info(self, text: str) -> None:
        self.lines.append(("info", text))

    def level(self, lvl: str) -> list[str]:
        return [t for l, t in self.lines if l == lvl]


def monitor(tname: str, call_id: str | None = None, **kw) -> tuple[CallMonitor, FakeKSR]:
    ksr = FakeKSR(call_id)
    return CallMonitor(tname, capacity=kw.pop("capacity", 1024), ksr=ksr, **kw), ksr


# ---------------------------------------------------------------- holding the writer lock

_HOLD = r"""
import sys, time
import npcalls
t = npcalls.CallTable.open(sys.argv[1])
with t.locked():
    print("held", flush=True)
    sys.stdin.readline()            # hold until the test writes a line (or closes stdin)
print("released", flush=True)
"""


class Holder:
    """A separate process holding the table's writer lock until release()."""

    def __init__(self, path: str) -> None:
        self.p = subprocess.Popen([sys.executable, "-c", _HOLD, path], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        line = self.p.stdout.readline()
        assert line.strip() == "held", line

    def release(self) -> None:
        if self.p.poll() is None:
            self.p.stdin.write("go\n")
            self.p.stdin.flush()
            assert self.p.stdout.readline().strip() == "released"
            self.p.wait(20)

    def close(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(20)


@contextlib.contextmanager
def lock_held_by_a_thread(table: CallTable) -> Iterator[None]:
    """Another thread of this process holds ``table``'s writer lock for the block."""
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with table.locked():
            holding.set()
            release.wait(10)

    th = threading.Thread(target=hold)
    th.start()
    try:
        assert holding.wait(5), "the holder thread never got the lock"
        yield
    finally:
        release.set()
        th.join()


# ---------------------------------------------------------------- forks

def in_child(fn: Callable[[], bool]) -> int:
    """Run fn() in an os.fork()ed child; return its pid (exit status 0: fn returned True)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = 0 if fn() else 1
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def raw_fork() -> int:
    """fork(2) from C, holding the GIL, without Python's at-fork handlers."""
    return ctypes.PyDLL(None).fork()


def wait_child(pid: int, timeout: float) -> int | None:
    """The child's exit code, or None (and the child killed) if it overran ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return None


# ---------------------------------------------------------------- end to end

def require_programs() -> None:
    """Fail (never skip) when Kamailio or sipp is missing, saying how to install them."""
    missing = harness.missing_programs()
    if missing:
        pytest.fail("the Kamailio end-to-end test needs " + ", ".join(missing)
                    + ": run scripts/install-system-deps.sh as root (make test does)",
                    pytrace=False)


def new_table_dir(prefix: str) -> Path:
    """A directory for a run's table where tables live, in /dev/shm: inside this test run's
    own $NPCALLS_DIR (conftest), removed when the run ends."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir=os.environ["NPCALLS_DIR"]))


_READER = r"""
import json, os, sys
import npcalls
t = npcalls.CallTable.open(sys.argv[1], readonly=True)
snap = t.snapshot()
rows = {k.decode(): [int(s), int(e)] for k, s, e in snap[["key", "start", "end"]].tolist()}
json.dump({"pid": os.getpid(), "len": len(t), "rows": rows}, sys.stdout)
"""


def read_table(path: str, env: dict) -> dict:
    """Read the table from a separate process: ``{"pid", "len", "rows": {call_id: (start, end)}}``."""
    r = subprocess.run([sys.executable, "-c", _READER, path], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"reader process failed:\n{r.stderr}"
    got = json.loads(r.stdout)
    got["rows"] = {k: tuple(v) for k, v in got["rows"].items()}
    return got


def check_table(path: str, env: dict) -> tuple[int, str]:
    """``npcalls check PATH`` as a program: (exit status, stdout + stderr)."""
    chk = subprocess.run([sys.executable, "-m", "npcalls", "check", path], env=env,
                         capture_output=True, text=True, timeout=60)
    return chk.returncode, chk.stdout + chk.stderr
