"""Worker code for the multi-process tests, importable by forked, spawned and `python -c` children.

Every row the workers write satisfies one invariant a reader can check from
the row alone: the key is a prefix letter and nine digits ``n``, the start is
``BASE + 16 * n`` and the end is the start + 1.  A torn row (a key with
another call's times, half-written key bytes) breaks it.  Rows written by
single start()/stop() calls (prefixes in :data:`OPEN_OK`) may be seen
between the two calls, with the end not yet set.

Children rendezvous through files in a sync directory (the one mechanism that
works the same for fork, spawn and separate programs): each touches
``ready-<who>`` and waits for ``go``; writers touch ``churning-<id>`` once
their inserts and their first churn round are done, readers touch
``rdone-<id>`` when they have read enough; results come back as
``result-<tag>.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import sys
import time
import traceback

import numpy as np

from npcalls import NOT_SET, CallTable

KEY_WIDTH = 16
BASE = 1_700_000_000 * 10**9
PREFIXES = b"prscd"
OPEN_OK = b"sd"                 # single-op rows: end may be unset between start() and stop()
OWN = 1_000_000                 # writer w owns numbers OWN * (w + 1) + i; shared numbers are < OWN

DEFAULTS = dict(
    n_perm=1500,                # 'p': inserted by the parent before the children start
    n_own=1500,                 # 'r' per writer, record_many
    n_shared=1000,              # 'r' shared by all writers, record_many
    n_single=200,               # 's' per writer, start()+stop()
    n_shared_single=150,        # 's' shared by all writers, start()+stop()
    n_churn=400,                # 'c' per writer: removed and re-inserted by batches
    n_churn_single=40,          # 'd' per writer: removed and re-inserted by single calls
    min_reads=120,              # reader iterations at least
    max_seconds=25.0,           # hard bound on any loop of a child
    compact_every=0,            # writer 0 compacts the table every this many churn rounds
)


# ---------------------------------------------------------------- keys and the invariant


def keys_of(prefix: bytes, numbers) -> np.ndarray:
    return np.array([b"%c%09d" % (prefix[0], int(n)) for n in numbers], dtype="S10")


def start_of(numbers) -> np.ndarray:
    return BASE + np.asarray(numbers, dtype=np.int64) * 16


def own_numbers(wid: int, count: int) -> np.ndarray:
    return OWN * (wid + 1) + np.arange(count)


def parse(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(well-formed, prefix byte, number) of each key of an S array."""
    n = len(keys)
    raw = np.zeros((n, KEY_WIDTH), np.uint8)
    if n:
        src = np.ascontiguousarray(keys).view(np.uint8).reshape(n, keys.dtype.itemsize)
        w = min(KEY_WIDTH, src.shape[1])
        raw[:, :w] = src[:, :w]
    prefix = raw[:, 0]
    digits = raw[:, 1:10].astype(np.int64) - 48
    ok = np.isin(prefix, np.frombuffer(PREFIXES, np.uint8))
    ok &= ((digits >= 0) & (digits <= 9)).all(axis=1)
    ok &= (raw[:, 10:] == 0).all(axis=1)
    number = digits @ (10 ** np.arange(8, -1, -1, dtype=np.int64))
    return ok, prefix, number


def violations(keys: np.ndarray, start: np.ndarray, end: np.ndarray) -> int:
    """Rows that break the invariant (see the module docstring)."""
    ok, prefix, number = parse(keys)
    want = start_of(number)
    good = ok & (start == want)
    open_ok = np.isin(prefix, np.frombuffer(OPEN_OK, np.uint8))
    good &= (end == want + 1) | (open_ok & (end == NOT_SET))
    return int(np.count_nonzero(~good))


def expected_keys(cfg: dict, n_writers: int) -> set[bytes]:
    """Every key present once all writers are done."""
    out = set(keys_of(b"p", range(cfg["n_perm"])).tolist())
    out |= set(keys_of(b"r", range(cfg["n_shared"])).tolist())
    out |= set(keys_of(b"s", range(cfg["n_shared_single"])).tolist())
    for w in range(n_writers):
        out |= set(keys_of(b"r", own_numbers(w, cfg["n_own"])).tolist())
        out |= set(keys_of(b"s", own_numbers(w, cfg["n_single"])).tolist())
        out |= set(keys_of(b"c", own_numbers(w, cfg["n_churn"])).tolist())
        out |= set(keys_of(b"d", own_numbers(w, cfg["n_churn_single"])).tolist())
    return out


def insert_permanent(t: CallTable, cfg: dict) -> int:
    n = np.arange(cfg["n_perm"])
    started, _ = t.record_many(keys_of(b"p", n), start_of(n), start_of(n) + 1)
    return int(started.sum())


# ---------------------------------------------------------------- rendezvous


def touch(path: str) -> None:
    with open(path, "w"):
        pass


def wait_for(path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout}s")
        time.sleep(0.001)


def count_files(sync_dir: str, prefix: str) -> int:
    return sum(1 for f in os.listdir(sync_dir) if f.startswith(prefix))


# ---------------------------------------------------------------- writer


def writer(table: str, wid: int, n_writers: int, n_readers: int, sync_dir: str,
           cfg: dict | None = None) -> dict:
    """Insert own and shared keys, then churn own keys until the readers are done."""
    cfg = {**DEFAULTS, **(cfg or {})}
    rng = random.Random(wid * 7919 + 1)
    t = CallTable.open(table)
    res = dict(pid=os.getpid(), started=0, stopped=0, removed=0, shared_r_started=0,
               shared_r_ended=0, shared_s_started=0, shared_s_stopped=0, own_all_new=True,
               churn_rounds=0, compactions=0)
    touch(os.path.join(sync_dir, f"ready-w{wid}"))
    wait_for(os.path.join(sync_dir, "go"), 60)

    # phase 1: record_many of own and shared 'r' keys in chunks of random size, in random order
    items = [(n, False) for n in own_numbers(wid, cfg["n_own"])]
    items += [(n, True) for n in range(cfg["n_shared"])]
    rng.shuffle(items)
    i = 0
    while i < len(items):
        size = rng.randint(1, 250)
        chunk = items[i:i + size]
        i += size
        nums = np.array([n for n, _ in chunk])
        shared = np.array([s for _, s in chunk])
        ks = keys_of(b"r", nums)
        if rng.random() < 0.3:
            ks = [k.decode() for k in ks.tolist()]          # the list-of-str path too
        started, ended = t.record_many(ks, start_of(nums), start_of(nums) + 1)
        res["started"] += int(started.sum())
        res["stopped"] += int(ended.sum())
        res["shared_r_started"] += int(started[shared].sum())
        res["shared_r_ended"] += int(ended[shared].sum())
        if not (started[~shared].all() and ended[~shared].all()):
            res["own_all_new"] = False

    # ... and single start()/stop() of own and shared 's' keys, some under one held lock
    items = [(int(n), False) for n in own_numbers(wid, cfg["n_single"])]
    items += [(n, True) for n in range(cfg["n_shared_single"])]
    rng.shuffle(items)
    for j in range(0, len(items), 10):
        group = items[j:j + 10]
        with t.locked() if rng.random() < 0.5 else contextlib.nullcontext():
            for n, shared in group:
                k = b"s%09d" % n
                s = int(start_of(n))
                a = t.start(k, s)
                b = t.stop(k.decode(), s + 1)
                res["started"] += a
                res["stopped"] += b
                if shared:
                    res["shared_s_started"] += a
                    res["shared_s_stopped"] += b
                elif not (a and b):
                    res["own_all_new"] = False

    # phase 2: churn own keys (remove, re-insert) until every reader has read enough
    churn = own_numbers(wid, cfg["n_churn"])
    ck = keys_of(b"c", churn)
    started, ended = t.record_many(ck, start_of(churn), start_of(churn) + 1)
    res["started"] += int(started.sum())
    res["stopped"] += int(ended.sum())
    single = [int(n) for n in own_numbers(wid, cfg["n_churn_single"])]
    deadline = time.monotonic() + cfg["max_seconds"]
    while time.monotonic() < deadline:
        if res["churn_rounds"] >= 3 and count_files(sync_dir, "rdone-") >= n_readers:
            break
        res["churn_rounds"] += 1
        pick = np.flatnonzero(np.array([rng.random() < 0.3 for _ in churn]))
        removed = t.remove_many(ck[pick])
        res["removed"] += int(removed.sum())
        started, ended = t.record_many(ck[pick], start_of(churn[pick]), start_of(churn[pick]) + 1)
        res["started"] += int(started.sum())
        res["stopped"] += int(ended.sum())
        for n in rng.sample(single, 5):
            k = "d%09d" % n
            res["removed"] += t.remove(k)
            res["started"] += t.start(k, int(start_of(n)))
            res["stopped"] += t.stop(k, int(start_of(n)) + 1)
        every = cfg["compact_every"]
        if wid == 0 and every and res["churn_rounds"] % every == 0:
            t.compact()
            res["compactions"] += 1
        if res["churn_rounds"] == 1:
            touch(os.path.join(sync_dir, f"churning-{wid}"))
    # leave every own churn key present, so that the final table is known exactly
    started, ended = t.record_many(ck, start_of(churn), start_of(churn) + 1)
    res["started"] += int(started.sum())
    res["stopped"] += int(ended.sum())
    for n in single:
        res["started"] += t.start("d%09d" % n, int(start_of(n)))
        res["stopped"] += t.stop("d%09d" % n, int(start_of(n)) + 1)
    t.close()
    return res


# ---------------------------------------------------------------- reader


def reader(table: str, rid: int, n_writers: int, sync_dir: str, cfg: dict | None = None,
           readonly: bool = True) -> dict:
    """Read with get_many, get and snapshot while writers write; count broken rows."""
    cfg = {**DEFAULTS, **(cfg or {})}
    rng = np.random.default_rng(1000 + rid)
    t = CallTable.open(table, readonly=readonly)
    res = dict(pid=os.getpid(), iterations=0, violations=0, missed_permanent=0, duplicates=0,
               rows_checked=0, churn_rows_seen=0, snapshots=0, gets=0)
    perm = keys_of(b"p", range(cfg["n_perm"]))
    pools = [perm, keys_of(b"r", range(cfg["n_shared"])),
             keys_of(b"s", range(cfg["n_shared_single"])),
             keys_of(b"r", np.arange(OWN * 50, OWN * 50 + 100))]       # never written: misses
    for w in range(n_writers):
        pools += [keys_of(b"r", own_numbers(w, cfg["n_own"])),
                  keys_of(b"s", own_numbers(w, cfg["n_single"])),
                  keys_of(b"c", own_numbers(w, cfg["n_churn"])),
                  keys_of(b"d", own_numbers(w, cfg["n_churn_single"]))]
    universe = np.concatenate(pools)
    touch(os.path.join(sync_dir, f"ready-r{rid}"))
    wait_for(os.path.join(sync_dir, "go"), 60)
    deadline = time.monotonic() + cfg["max_seconds"]
    after_churn = 0             # iterations since every writer was seen churning
    while time.monotonic() < deadline:
        if after_churn or count_files(sync_dir, "churning-") >= n_writers:
            after_churn += 1
        if res["iterations"] >= cfg["min_reads"] and after_churn > 10:
            break
        res["iterations"] += 1
        q = universe[rng.integers(0, len(universe), 1000)]
        p = perm[rng.integers(0, len(perm), 100)]
        r = t.get_many(np.concatenate([q, p]))
        f = r.found
        qk = np.concatenate([q, p])[f]
        res["violations"] += violations(qk, r.start[f], r.end[f])
        res["rows_checked"] += int(f.sum())
        res["missed_permanent"] += int(np.count_nonzero(~f[len(q):]))
        res["churn_rows_seen"] += int(np.count_nonzero(np.char.startswith(qk, b"c")))
        for k in q[:20].tolist():
            got = t.get(k if rng.random() < 0.5 else k.decode())
            res["gets"] += 1
            if got is not None:
                res["rows_checked"] += 1
                res["violations"] += violations(np.array([k], "S10"), np.array([got[0]]),
                                                np.array([got[1]]))
        if res["iterations"] % 3 == 0:
            snap = t.snapshot()
            res["snapshots"] += 1
            res["rows_checked"] += len(snap)
            res["violations"] += violations(snap["key"], snap["start"], snap["end"])
            uniq = np.unique(snap["key"])
            res["duplicates"] += len(snap) - len(uniq)
            res["missed_permanent"] += len(perm) - int(np.isin(perm, uniq).sum())
    touch(os.path.join(sync_dir, f"rdone-{rid}"))
    t.close()
    return res


# ---------------------------------------------------------------- small jobs


def echo_client(table: str, rounds: int, timeout: float) -> dict:
    """Answer each ``ping-i`` the parent writes with a ``pong-i`` (P1: writes seen at once)."""
    t = CallTable.open(table)
    deadline = time.monotonic() + timeout
    for i in range(rounds):
        while t.get(f"ping-{i}") is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"ping-{i} never became visible")
        start, _ = t.get(f"ping-{i}")
        t.start(f"pong-{i}", start + 1)
    t.close()
    return dict(pid=os.getpid(), rounds=rounds)


def mover(table: str, keys: list[str], sync_dir: str, max_seconds: float) -> dict:
    """Move calls between slots: remove two, re-insert them in the other order.

    Each re-inserted call takes the lowest free slot of its bucket, which is
    often the one the other call just left, so calls keep changing slots while
    staying present almost all the time.
    """
    t = CallTable.open(table)
    touch(os.path.join(sync_dir, "ready-mover"))
    wait_for(os.path.join(sync_dir, "go"), 60)
    stop = os.path.join(sync_dir, "stop")
    deadline = time.monotonic() + max_seconds
    moves = 0
    while time.monotonic() < deadline and not (moves % 64 == 0 and os.path.exists(stop)):
        a = keys[moves % len(keys)]
        b = keys[(moves * 7 + 3) % len(keys)]
        if a != b:
            t.remove(a)
            t.remove(b)
            t.start(b, 1)
            t.start(a, 1)
        moves += 1
    t.close()
    return dict(pid=os.getpid(), moves=moves)


def write_under_parent_lock(t: CallTable, sync_dir: str) -> dict:
    """In a child forked while the parent holds ``t.locked()``: write through the same object."""
    out = dict(pid=os.getpid(), holder=t.stats().writer_pid, timed_out=False)
    try:
        with t.locked(timeout=0.3):
            pass
    except TimeoutError:
        out["timed_out"] = True
    touch(os.path.join(sync_dir, "child-writing"))
    t.start("child-key", 1)                 # blocks until the parent releases
    out["wrote_at"] = time.monotonic()
    out["holder_after"] = t.stats().writer_pid
    return out


def read_while_locked(table: str | None, t: CallTable | None, keys: list[str]) -> dict:
    """Every read path must complete although another process holds the writer lock."""
    own = t is None
    if own:
        t = CallTable.open(table, readonly=True)
    t0 = time.monotonic()
    got = [t.get(k) for k in keys]
    r = t.get_many(keys)
    snap = t.snapshot()
    out = dict(pid=os.getpid(), got=[list(g) if g else None for g in got],
               found=r.found.tolist(), snapshot_rows=len(snap), length=len(t),
               listed=sorted(t), holder=t.stats().writer_pid, seconds=time.monotonic() - t0,
               contains=[k in t for k in keys])
    if own:
        t.close()
    return out


def try_lock(table: str, timeout: float) -> dict:
    """Whether this process can take the writer lock within ``timeout`` seconds."""
    with CallTable.open(table) as t:
        try:
            with t.locked(timeout=timeout):
                return dict(pid=os.getpid(), acquired=True, holder=None)
        except TimeoutError:
            return dict(pid=os.getpid(), acquired=False, holder=t.stats().writer_pid)


def grow_table(table: str, capacity: int, keys: list[str]) -> dict:
    with CallTable.open(table) as t:
        t.grow(capacity)
        t.start_many(keys, 42)
        return dict(pid=os.getpid(), capacity=t.capacity)


# ---------------------------------------------------------------- process plumbing


def run_to_file(sync_dir: str, tag: str, fn_name: str, *args, **kw) -> None:
    """Process target: run ``fn_name`` and leave {ok, value | error} in result-<tag>.json."""
    try:
        out = dict(ok=True, value=globals()[fn_name](*args, **kw))
    except BaseException:       # noqa: BLE001 - the parent must hear of any failure
        out = dict(ok=False, error=traceback.format_exc())
    path = os.path.join(sync_dir, f"result-{tag}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(out, f)
    os.rename(path + ".tmp", path)      # the parent never reads half a result


def main_json() -> None:
    """``python -c`` entry point: argv[1] is JSON {sync_dir, tag, fn, args, kw}."""
    spec = json.loads(sys.argv[1])
    run_to_file(spec["sync_dir"], spec["tag"], spec["fn"], *spec.get("args", []),
                **spec.get("kw", {}))
