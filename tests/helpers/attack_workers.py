"""Child processes for tests/test_attacks.py: ``python tests/helpers/attack_workers.py FUNC JSON-ARGS``.

Each function runs in a process of its own (possibly as another user), prints
one JSON line with its result on stdout and exits 0; an npcalls error is
reported as ``{"error": class name, "message": ...}`` so that the test can
assert on it; anything else (a traceback, a signal) is a test failure.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import numpy as np

import npcalls
from npcalls import CallTable


def _wait(path: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.002)


def _touch(path: str) -> None:
    with open(path, "w"):
        pass


def batch_writer(path: str, prefix: str, n: int, batch: int, ready: str, go: str) -> dict:
    """Open, say ready, wait for go, then write n disjoint keys in batches (start, then stop)."""
    t = CallTable.open(path)
    _touch(ready)
    _wait(go)
    acked = _write_batches(t, prefix, n, batch)
    t.close()
    return {"acked": acked}


def forking_writer(path: str, prefix: str, n: int, batch: int, ready: str, go: str,
                   kids: int) -> dict:
    """Open, say ready, wait for go, fork ``kids`` children that write with the inherited
    handle, write too; every process n disjoint keys in batches."""
    t = CallTable.open(path)
    _touch(ready)
    _wait(go)
    pids = []
    for k in range(kids):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                got = _write_batches(t, f"{prefix}{k + 1}", n, batch)
                code = 0 if got == n else 3
            except BaseException:       # noqa: BLE001 - reported through the exit status
                code = 4
            os._exit(code)
        pids.append(pid)
    acked = _write_batches(t, f"{prefix}0", n, batch)
    codes = [os.waitpid(p, 0)[1] for p in pids]
    t.close()
    return {"acked": acked, "children": codes}


def _write_batches(t: CallTable, prefix: str, n: int, batch: int) -> int:
    acked = 0
    for lo in range(0, n, batch):
        keys = np.array([f"{prefix}-{i}".encode() for i in range(lo, min(n, lo + batch))])
        ts = np.arange(lo, lo + len(keys), dtype=np.int64) + 1
        acked += int(t.start_many(keys, ts).sum())
        t.stop_many(keys, ts + 1)
    return acked


def open_and_start(path: str, key: str = "k") -> dict:
    t = CallTable.open(path)
    ok = t.start(key, 1)
    t.close()
    return {"started": bool(ok)}


def hold_lock(path: str, seconds: float, ready: str) -> dict:
    t = CallTable.open(path)
    with t.locked():
        _touch(ready)
        time.sleep(seconds)
    t.close()
    return {"pid": os.getpid()}


def hold_grow_hold(path: str, held: str, grow_now: str, grown: str, release: str,
                   capacity: int) -> dict:
    """Hold the lock; on cue grow the table (still holding it); release on cue."""
    t = CallTable.open(path)
    with t.locked():
        _touch(held)
        _wait(grow_now)
        t.grow(capacity)
        _touch(grown)
        _wait(release)
    t.close()
    return {"grown": capacity}


def attached_writer(path: str, ready: str, go: str, done: str, pre_write: bool = True) -> dict:
    """Attach (and write), say ready; on go, write and read: report what happened."""
    t = CallTable.open(path)
    if pre_write:
        t.start("before", 1)
    _touch(ready)
    _wait(go)
    out: dict = {}
    try:
        out["start"] = bool(t.start("after-unlink", 2))
    except npcalls.NpcallsError as e:
        out["start_error"] = type(e).__name__
    try:
        out["get"] = t.get("before")
    except npcalls.NpcallsError as e:
        out["get_error"] = type(e).__name__
    _touch(done)
    return out


def grow(path: str, capacity: int) -> dict:
    t = CallTable.open(path)
    t.grow(capacity)
    t.close()
    return {"grown": capacity}


def unlink(path: str) -> dict:
    return {"existed": CallTable.unlink(path)}


def owner_loop(path: str, ready: str, go: str, n: int) -> dict:
    """The owner's long-lived process: keep writing across another user's rebuild."""
    t = CallTable.open(path)
    t.start("owner-0", 1)
    _touch(ready)
    _wait(go)
    for i in range(1, n):
        t.start(f"owner-{i}", i + 1)
    found = int(t.get_many([f"owner-{i}" for i in range(n)]).found.sum())
    t.close()
    return {"found": found}


def do_grow_or_error(path: str, capacity: int) -> dict:
    t = CallTable.open(path)
    try:
        t.grow(capacity)
        return {"grown": True}
    finally:
        t.close()


def churn_until_compaction(path: str, rounds: int, prefill: int) -> dict:
    """Inserts and removals that make start() want to compact the table."""
    t = CallTable.open(path)
    g0 = t.stats().generation
    ok = int(t.start_many([f"p{i}" for i in range(prefill)], 1).sum())
    for r in range(rounds):
        keys = [f"c{r}-{i}" for i in range(40)]
        for k in keys:
            ok += t.start(k, 1)
        for k in keys:
            t.remove(k)
    st = t.stats()
    t.close()
    return {"ok": ok, "generation_before": g0, "generation_after": st.generation}


def readers_everywhere(path: str, keys: list) -> dict:
    out = {}
    for ro in (True, False):
        t = CallTable.open(path, readonly=ro)
        tag = "ro" if ro else "rw"
        try:
            out[f"{tag}_get"] = t.get(keys[0])
            out[f"{tag}_in"] = keys[0] in t
            out[f"{tag}_get_many"] = int(t.get_many(keys).found.sum())
            out[f"{tag}_snapshot"] = len(t.snapshot())
        finally:
            t.close()
    return out


def snapshot_and_write(path: str, readonly: bool) -> dict:
    t = CallTable.open(path, readonly=readonly)
    out = {"snapshot": len(t.snapshot())}
    if not readonly:
        t.start_many([f"new-{i}" for i in range(1000)])
        t.start("one-more", 1)
        out["written"] = True
    t.close()
    return out


def threaded_reads_while_grown(path: str, keys: list, seconds: float, ready: str) -> dict:
    """Three reader threads and two writer threads on one handle each, for ``seconds``."""
    ro = CallTable.open(path, readonly=True)
    rw = CallTable.open(path)
    errors: list[str] = []
    counts = {"reads": 0, "writes": 0}
    stop = time.monotonic() + seconds
    arr = np.array([k.encode() for k in keys])

    def reader(i: int) -> None:
        n = 0
        try:
            while time.monotonic() < stop:
                f = ro.get_many(arr).found
                if not f.all():
                    errors.append(f"reader {i}: {int((~f).sum())} permanent keys missing")
                    return
                if ro.get(keys[n % len(keys)]) is None:
                    errors.append(f"reader {i}: get missed {keys[n % len(keys)]}")
                    return
                if n % 7 == 0:
                    s = ro.snapshot()
                    if len(s) < len(keys):
                        errors.append(f"reader {i}: snapshot of {len(s)} rows")
                        return
                n += 1
        except Exception as e:  # noqa: BLE001 - the test asserts there are none
            errors.append(f"reader {i}: {type(e).__name__}: {e}")
        counts["reads"] += n

    def writer(i: int) -> None:
        n = 0
        try:
            while time.monotonic() < stop:
                b = [f"w{i}-{n}-{j}" for j in range(50)]
                if not rw.start_many(b, 5).all():
                    errors.append(f"writer {i}: a new key was not started")
                    return
                for k in b[:10]:
                    if not rw.stop(k, 6):
                        errors.append(f"writer {i}: stop of {k} failed")
                        return
                rw.remove_many(b)
                n += 1
        except Exception as e:  # noqa: BLE001
            errors.append(f"writer {i}: {type(e).__name__}: {e}")
        counts["writes"] += n

    ths = [threading.Thread(target=reader, args=(i,)) for i in range(3)]
    ths += [threading.Thread(target=writer, args=(i,)) for i in range(2)]
    _touch(ready)
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    ro.close()
    rw.close()
    return {"errors": errors[:10], **counts}


def create(path: str, capacity: int, mode: int, seed: int | None = None) -> dict:
    CallTable.create(path, capacity, mode=mode, seed=seed).close()
    return {"created": path}


def _become(uid: int, gid: int, groups: list) -> None:
    """Drop from root to another user in this process (the interpreter lives under
    /root, which other users cannot read: import what may be imported lazily first)."""
    import ctypes  # noqa: F401
    import errno  # noqa: F401
    import logging  # noqa: F401
    import secrets  # noqa: F401
    import stat  # noqa: F401
    import struct  # noqa: F401

    import npcalls.maintenance  # noqa: F401
    os.setgroups(groups)
    os.setgid(gid)
    os.setuid(uid)


def main() -> None:
    fn = globals()[sys.argv[1]]
    args = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    who = args.pop("as_user", None)
    if who is not None:
        _become(*who)
    try:
        out = fn(**args)
    except npcalls.NpcallsError as e:
        out = {"error": type(e).__name__, "message": str(e)}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
