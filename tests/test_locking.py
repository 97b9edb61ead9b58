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
