"""The header's monotonic counters and duration histogram (docs/format.md).

The histogram counts each call once, when it first has both times, in the
writer that completed it: so it must equal a histogram computed from a model
of every call ever completed, whatever expire/remove/grow did in between,
and whatever processes wrote.
"""

from __future__ import annotations

import multiprocessing as mp
import random
import time

import numpy as np

import npcalls
from npcalls.layout import DURATION_BOUNDS_S, NOT_SET

S = 1_000_000_000


def model_hist(durations_ns: list[int]) -> tuple[list[int], float]:
    bounds = [b * S for b in DURATION_BOUNDS_S]
    counts = [0] * (len(bounds) + 1)
    total_us = 0
    for d in durations_ns:
        i = next((k for k, b in enumerate(bounds) if d <= b), len(bounds))
        counts[i] += 1
        total_us += max(d, 0) // 1000
    return counts, total_us / 1e6


def test_counters_match_a_model_under_random_ops_with_expire_and_rebuilds(make_table):
    t = make_table(4096, auto_grow=True)
    rng = random.Random(7)
    model: dict[str, list[int]] = {}       # key -> [start, end]
    completed: list[int] = []
    n_started = n_stopped = n_removed = 0
    now = 10_000 * S
    for step in range(3000):
        now += rng.randrange(0, 3 * S)
        op = rng.random()
        k = f"call-{rng.randrange(400)}"
        if op < 0.3:
            ok = t.start(k, now)
            row = model.get(k)
            exp_ok = row is None or row[0] == NOT_SET
            assert ok == exp_ok
            if ok:
                n_started += 1
                if row is None:
                    model[k] = [now, NOT_SET]
                else:
                    row[0] = now
                    if row[1] != NOT_SET:
                        completed.append(row[1] - now)
        elif op < 0.6:
            end = now - rng.randrange(0, 4000 * S)      # some ends before their start
            ins = rng.random() < 0.3
            ok = t.stop(k, end, insert_missing=ins)
            row = model.get(k)
            exp_ok = (row is not None and row[1] == NOT_SET) or (row is None and ins)
            assert ok == exp_ok
            if ok:
                n_stopped += 1
                if row is None:
                    model[k] = [NOT_SET, end]
                else:
                    row[1] = end
                    if row[0] != NOT_SET:
                        completed.append(end - row[0])
        elif op < 0.8:
            keys = [f"call-{rng.randrange(400)}" for _ in range(rng.randrange(1, 20))]
            st = [rng.choice([NOT_SET, now - rng.randrange(10**4 * S)]) for _ in keys]
            en = [rng.choice([NOT_SET, now - rng.randrange(10**4 * S)]) for _ in keys]
            started, ended = t.record_many(keys, np.array(st, np.int64), np.array(en, np.int64))
            for k2, s2, e2, did_s, did_e in zip(keys, st, en, started, ended):
                row = model.get(k2)
                was_complete = row is not None and NOT_SET not in row
                if row is None:             # inserted even with no times (an "empty" row)
                    row = model[k2] = [NOT_SET, NOT_SET]
                if True:
                    if s2 != NOT_SET and row[0] == NOT_SET:
                        row[0] = s2
                        assert did_s
                        n_started += 1
                    else:
                        assert not did_s
                    if e2 != NOT_SET and row[1] == NOT_SET:
                        row[1] = e2
                        assert did_e
                        n_stopped += 1
                    else:
                        assert not did_e
                    if not was_complete and NOT_SET not in row:
                        completed.append(row[1] - row[0])
        elif op < 0.9:
            cutoff = now - rng.randrange(0, 2000 * S)
            gone = [k2 for k2, (s2, e2) in model.items() if e2 != NOT_SET and e2 < cutoff]
            assert t.expire(ended_before=cutoff) == len(gone)
            for k2 in gone:
                del model[k2]
            n_removed += len(gone)
        elif op < 0.97:
            was = k in model
            assert t.remove(k) == was
            if was:
                del model[k]
                n_removed += 1
        else:
            t.compact()
        if step % 500 == 0:
            c = t.counters()
            assert (c.n_started, c.n_stopped, c.n_removed) == (n_started, n_stopped, n_removed)
    c = t.counters()
    counts, total = model_hist(completed)
    assert list(c.duration_buckets) == counts
    assert abs(c.duration_sum_s - total) < 1e-6 * max(1, len(completed))
    assert c.count == len(model) == len(t)
    assert (c.n_started, c.n_stopped, c.n_removed) == (n_started, n_stopped, n_removed)
    assert sum(counts) == len(completed) > 100      # the run really completed calls
    assert c.n_rebuilds >= 1


def _writer(name: str, worker: int, n: int, q: "mp.Queue") -> None:
    t = npcalls.CallTable.open(name)
    rng = random.Random(worker)
    durations = []
    for i in range(n):
        k = f"w{worker}-{i}"
        s = 1_000 * S + i * S
        d = rng.choice([0, S // 2, 3 * S, 45 * S, 200 * S, 5000 * S, 9000 * S])
        t.start(k, s)
        if i % 3 == 0:
            t.stop_many([k], [s + d])
        else:
            t.stop(k, s + d)
        durations.append(d)
    q.put(durations)
    t.close()


def _expirer(name: str, rounds: int) -> None:
    t = npcalls.CallTable.open(name)
    for _ in range(rounds):
        t.expire(ended_before=10**6 * S)            # every ended call, as soon as it ends
    t.close()


def test_histogram_counts_each_call_once_across_processes_while_expire_removes_them(make_table):
    t = make_table(1 << 14)
    for method in ("fork", "spawn"):
        ctx = mp.get_context(method)
        before = t.counters()
        q = ctx.Queue()
        ws = [ctx.Process(target=_writer, args=(t.path, w + (10 if method == "spawn" else 0),
                                                 1500, q)) for w in range(2)]
        ex = ctx.Process(target=_expirer, args=(t.path, 300))
        for p in ws + [ex]:
            p.start()
        durations = q.get(timeout=120) + q.get(timeout=120)
        for p in ws + [ex]:
            p.join(120)
            assert p.exitcode == 0
        t.expire(ended_before=10**6 * S)
        after = t.counters()
        counts, total = model_hist(durations)
        got = [a - b for a, b in zip(after.duration_buckets, before.duration_buckets)]
        assert got == counts
        assert abs((after.duration_sum_s - before.duration_sum_s) - total) < 1e-3
        assert after.n_started - before.n_started == 3000
        assert after.n_stopped - before.n_stopped == 3000
        assert after.n_removed - before.n_removed == 3000
        assert len(t) == 0


def test_counters_are_cheap_header_reads_on_a_readonly_handle(make_table):
    t = make_table(1024)
    t.start("a", 0)
    t.stop("a", 2 * S)
    ro = npcalls.CallTable.open(t.path, readonly=True)
    try:
        c = ro.counters()
        assert c.count == 1 and c.n_started == 1 and c.n_stopped == 1
        assert c.duration_buckets[1] == 1 and sum(c.duration_buckets) == 1
        assert c.duration_sum_s == 2.0
        assert c.capacity == t.capacity and c.limit == t.limit
        t.grow(4096)                    # the read-only handle follows the rebuild
        c2 = ro.counters()
        assert c2.capacity == 4096 and c2.duration_buckets == c.duration_buckets
        assert c2.n_rebuilds == 1 and c2.generation == 1
    finally:
        ro.close()


def _churn_writer(path: str, stop_ev, started_ev) -> None:
    t = npcalls.CallTable.open(path)
    rng = random.Random(1)
    i = 0
    started_ev.set()
    while not stop_ev.is_set():
        keys = [f"w{(i + j) % 3000}" for j in range(200)]
        st = np.arange(i, i + 200, dtype=np.int64)
        t.start_many(keys, st)
        got = t.get_many(keys)
        has = got.found & (got.start != NOT_SET)
        t.stop_many(np.array(keys)[has], got.start[has] + 7)
        t.remove_many(keys[: rng.randrange(200)])          # calls leave and come back elsewhere
        i += 200
    t.close()


def test_times_is_consistent_under_a_concurrent_writer_process(make_table):
    """times(): no torn row, no call twice, every call present throughout is there."""
    t = make_table(1 << 14)
    base = 10**12
    t.record_many([f"base-{j}" for j in range(2000)], np.arange(base, base + 2000),
                  np.arange(base, base + 2000) + 7)
    ctx = mp.get_context("spawn")
    stop_ev, started_ev = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_churn_writer, args=(t.path, stop_ev, started_ev))
    p.start()
    try:
        assert started_ev.wait(60)
        deadline = time.monotonic() + 3
        reads = 0
        while time.monotonic() < deadline:
            s, e = t.times()
            ended = e != NOT_SET
            assert (e[ended] - s[ended] == 7).all()             # never a torn row
            b = np.sort(s[s >= base])
            assert (b == np.arange(base, base + 2000)).all()    # each base call exactly once
            reads += 1
        assert reads > 5
    finally:
        stop_ev.set()
        p.join(60)
    assert p.exitcode == 0
    sn = t.snapshot()
    s, e = t.times()
    assert sorted(zip(s.tolist(), e.tolist())) == sorted(zip(sn["start"].tolist(),
                                                             sn["end"].tolist()))
