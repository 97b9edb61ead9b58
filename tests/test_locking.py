"""npcalls.locking on its own: enter/leave, re-entrancy, threads and processes.

The lock's use by tables (lock file removed or replaced, waits reported,
forked Kamailio workers) is tested in test_attacks.py and test_multiprocess.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

from npcalls import locking


def test_enter_is_reentrant_and_leave_releases_at_the_outermost_level(tmp_path):
    path = str(tmp_path / "t.lock")
    wl = locking.WriterLock(path)
    try:
        lf = wl.lock_file
        locking.enter(lf)
        locking.enter(lf)
        assert wl.held and lf.depth == 2
        locking.leave(lf)
        assert wl.held and locking.lock_holder(path) == os.getpid()
        locking.leave(lf)
        assert not wl.held and locking.lock_holder(path) is None
    finally:
        wl.close()


def test_two_handles_of_one_process_share_one_lock_file(tmp_path):
    path = str(tmp_path / "t.lock")
    a, b = locking.WriterLock(path), locking.WriterLock(path)
    try:
        assert a.lock_file is b.lock_file
        with a:
            assert b.held                    # the same process-wide lock
    finally:
        a.close()
        b.close()


def test_a_thread_waits_for_another_threads_lock(tmp_path):
    path = str(tmp_path / "t.lock")
    wl = locking.WriterLock(path)
    order: list[str] = []
    inside = threading.Event()
    try:
        def other() -> None:
            inside.wait(30)
            with wl:
                order.append("other")

        th = threading.Thread(target=other)
        th.start()
        with wl:
            inside.set()
            time.sleep(0.3)                  # the other thread is blocked meanwhile
            order.append("main")
        th.join(30)
        assert order == ["main", "other"]
    finally:
        wl.close()


def test_another_process_is_excluded_and_sees_the_holder(tmp_path):
    path = str(tmp_path / "t.lock")
    wl = locking.WriterLock(path)
    code = textwrap.dedent(f"""
        import sys, time
        from npcalls import locking
        wl = locking.WriterLock({path!r})
        print(locking.lock_holder({path!r}), flush=True)
        try:
            wl.acquire(timeout=0.2)
            print("got it", flush=True)
        except TimeoutError as e:
            print("timeout", e, flush=True)
        wl.acquire(timeout=60)             # once the parent lets go
        print("got it later", flush=True)
    """)
    try:
        locking.enter(wl.lock_file)
        p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert p.stdout is not None
        assert p.stdout.readline().strip() == str(os.getpid())
        line = p.stdout.readline()
        assert line.startswith("timeout") and str(os.getpid()) in line
        locking.leave(wl.lock_file)
        assert p.stdout.readline().strip() == "got it later"
        assert p.wait(60) == 0
    finally:
        if wl.held:
            locking.leave(wl.lock_file)
        wl.close()


_COUNTER = """
import os, sys
from npcalls import locking
path, counter, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
wl = locking.WriterLock(path)
lf = wl.lock_file
fd = os.open(counter, os.O_RDWR)
for _ in range(n):
    locking.enter(lf)               # the writers' hot path: spin, then block
    try:
        v = int(os.pread(fd, 20, 0) or b"0")
        os.sched_yield()            # widen the window a broken lock would let a rival in
        os.pwrite(fd, b"%020d" % (v + 1), 0)
    finally:
        locking.leave(lf)
print("done", flush=True)
"""


def test_contending_processes_never_overlap(tmp_path):
    # three processes on two cores contend on every iteration, so most acquisitions
    # go through the spin and many through the blocking wait; a lost update would
    # show an overlap
    path, counter = str(tmp_path / "t.lock"), tmp_path / "counter"
    counter.write_bytes(b"%020d" % 0)
    n = 3000
    ps = [subprocess.Popen([sys.executable, "-c", _COUNTER, path, str(counter), str(n)],
                           stdout=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=300)[0] for p in ps]
    assert [p.returncode for p in ps] == [0, 0, 0], outs
    assert int(counter.read_bytes()) == 3 * n


_WAITER = """
import sys, time
from npcalls import locking
wl = locking.WriterLock(sys.argv[1])
print("ready", flush=True)
t0 = time.monotonic()
with wl:                            # enter(): spin, then block in the kernel
    print(f"got it after {time.monotonic() - t0:.3f}", flush=True)
"""


def test_a_waiter_outlasting_the_spin_blocks_until_release(tmp_path):
    path = str(tmp_path / "t.lock")
    wl = locking.WriterLock(path)
    try:
        locking.enter(wl.lock_file)
        p = subprocess.Popen([sys.executable, "-c", _WAITER, path], stdout=subprocess.PIPE,
                             text=True)
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "ready"
        time.sleep(0.5)                 # far past any spin: the child is in F_SETLKW
        assert p.poll() is None
        locking.leave(wl.lock_file)
        line = p.stdout.readline()
        assert line.startswith("got it after"), line
        assert float(line.split()[-1]) >= 0.4
        assert p.wait(60) == 0
    finally:
        if wl.held:
            locking.leave(wl.lock_file)
        wl.close()


def test_a_waiter_gets_the_lock_of_a_holder_killed_with_sigkill(tmp_path):
    path = str(tmp_path / "t.lock")
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys, time
        from npcalls import locking
        wl = locking.WriterLock(sys.argv[1])
        locking.enter(wl.lock_file)
        print("held", flush=True)
        time.sleep(600)
    """), path], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        p = subprocess.Popen([sys.executable, "-c", _WAITER, path], stdout=subprocess.PIPE,
                             text=True)
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        time.sleep(0.3)
        assert p.poll() is None         # excluded by the live holder
        holder.kill()
        line = p.stdout.readline()
        assert line.startswith("got it after"), line
        assert p.wait(60) == 0
    finally:
        holder.kill()
        holder.wait()
