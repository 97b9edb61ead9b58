"""``npcalls top``: one frame for pipes, a live view in a (pseudo-)terminal, clean exits."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import time
import uuid

import pytest
import rich  # noqa: F401,E402  (dev dependency: `top` draws with it)

import npcalls
from npcalls import NOT_SET
from npcalls.top import TopView, sparkline

S = 1_000_000_000


@pytest.fixture
def table(tdir):
    name = f"top-{uuid.uuid4().hex[:8]}"
    t = npcalls.CallTable.create(name, 1024)
    now = time.time_ns()
    # three active calls, oldest first: 3 h, 20 min, 5 s; two ended; one end-only
    t.record_many(["oldest@a", "middle@a", "young@a", "done1@a", "done2@a", "bye-only@a"],
                  [now - 3 * 3600 * S, now - 1200 * S, now - 5 * S, now - 100 * S,
                   now - 50 * S, NOT_SET],
                  [NOT_SET, NOT_SET, NOT_SET, now - 10 * S, now - 20 * S, now - S])
    yield t
    t.close()
    npcalls.CallTable.unlink(name)


def top_cmd(*args, timeout=30):
    return subprocess.run([sys.executable, "-m", "npcalls", "top", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_once_prints_one_frame(table):
    r = top_cmd(table.path, "--once", "--interval", "200ms")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "npcalls top" in out and table.path in out and "read-only" in out
    assert "\x1b[" not in out                      # plain text for pipes and files
    for word in ("calls", "active", "ended", "end-only", "starts/s", "ends/s",
                 "concurrency", "Longest active calls"):
        assert word in out, word
    # oldest first, with their ages
    assert out.index("oldest@a") < out.index("middle@a") < out.index("young@a")
    assert "3:00:0" in out and "0:20:0" in out
    assert "done1@a" not in out                     # ended calls are not "longest active"


def test_without_a_terminal_it_prints_one_frame_and_exits(table):
    t0 = time.monotonic()
    r = top_cmd(table.path, "--interval", "300ms")     # no --once, but stdout is a pipe
    assert r.returncode == 0 and "Longest active calls" in r.stdout
    assert time.monotonic() - t0 < 15


def test_missing_table(tdir):
    r = top_cmd("nosuch", "--once")
    assert r.returncode == 2 and "no table" in r.stderr


def test_rates_come_from_the_lifetime_counters(table):
    v = TopView(table, rows=2)
    v.sample()
    assert v.rates() is None
    table.start_many([f"new-{i}" for i in range(500)])
    table.stop_many([f"new-{i}" for i in range(200)])
    time.sleep(0.2)
    v.sample()
    dt = v.cur_t - v.prev_t
    starts, ends = v.rates()
    assert starts == pytest.approx(500 / dt) and ends == pytest.approx(200 / dt)
    assert [k for k, _ in v.longest] == ["oldest@a", "middle@a"]
    assert v.history == [3, 303] and v.peak[0] == 303


def test_sparkline():
    assert sparkline([], 10) == ""
    assert sparkline([5, 5, 5], 10) == "▄▄▄"
    assert sparkline([0, 7, 14], 10) == "▁▄█"
    assert len(sparkline(list(range(100)), 60)) == 60


def _spawn_in_pty(path):
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))

    def make_controlling_tty():
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    env = dict(os.environ, TERM="xterm-256color")
    p = subprocess.Popen([sys.executable, "-m", "npcalls", "top", path, "--interval", "200ms"],
                         stdin=slave, stdout=slave, stderr=slave, env=env,
                         start_new_session=True, preexec_fn=make_controlling_tty)
    os.close(slave)
    return p, master


def _read_until(master, needle, timeout=20.0):
    buf = b""
    deadline = time.monotonic() + timeout
    while needle not in buf and time.monotonic() < deadline:
        r, _, _ = select.select([master], [], [], 0.1)
        if r:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
    return buf


def _drain(master, p, timeout=10.0):
    buf = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r, _, _ = select.select([master], [], [], 0.1)
        if r:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                chunk = b""
            buf += chunk
            if not chunk and p.poll() is not None:
                break
        elif p.poll() is not None:
            break
    return buf


@pytest.mark.parametrize("how", ["q", "Ctrl-C", "SIGTERM"])
def test_live_view_in_a_terminal_quits_cleanly(table, how):
    p, master = _spawn_in_pty(table.path)
    try:
        out = _read_until(master, b"Longest active calls")
        assert b"Longest active calls" in out, out[-2000:]
        assert b"\x1b[?1049h" in out                     # full-screen, refreshed in place
        out += _read_until(master, b"starts/s", timeout=3)
        time.sleep(0.5)                                  # a few refreshes
        if how == "q":
            os.write(master, b"q")
        elif how == "Ctrl-C":
            os.write(master, b"\x03")                    # the terminal sends SIGINT
        else:
            p.send_signal(signal.SIGTERM)
        out += _drain(master, p)
        p.wait(timeout=10)
        lflag = termios.tcgetattr(master)[3]
        assert lflag & termios.ICANON and lflag & termios.ECHO    # cbreak mode undone
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        os.close(master)
    assert p.returncode == 0, out[-2000:]
    assert b"Traceback" not in out
    assert b"\x1b[?1049l" in out                                   # screen restored
    assert out.count(b"Longest active calls") >= 2                # it refreshed
