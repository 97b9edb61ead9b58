"""Lifecycle benchmark: probing after churn, growth, compaction, expiry, crash recovery.

Churn: calls start, end ``active`` calls later and are expired soon after,
``--cycles`` times through a 1M-slot table holding ~300k calls (issue 3).
Lookups are then timed on the churned table and on a fresh table holding the
same calls, in the same run, so the ratio shows what tombstones cost.

    .venv/bin/python bench/bench_lifecycle.py            # 10M cycles, ~1 minute
    .venv/bin/python bench/bench_lifecycle.py --quick    # 1M cycles
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from npcalls import CallTable
from npcalls.layout import W
from npcalls.simulate import churn


def lookup_rate(t: CallTable, keys: np.ndarray, reps: int = 3) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        t.get_many(keys)
        best = min(best, time.perf_counter() - t0)
    return len(keys) / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=10_000_000)
    ap.add_argument("--quick", action="store_true", help="1M cycles")
    a = ap.parse_args()
    cycles = 1_000_000 if a.quick else a.cycles
    d = tempfile.mkdtemp(dir="/dev/shm", prefix="npcalls-bench-")
    p = os.path.join(d, "churn")
    paths = [p, p + "-fresh", p + "-big"]
    try:
        t = CallTable.create(p, 1 << 20, key_width=16)
        t0 = time.perf_counter()
        churn(t, cycles, active=250_000, batch=50_000, seed=7)
        secs = time.perf_counter() - t0
        s = t.stats()
        snap = t.snapshot()
        f = CallTable.create(p + "-fresh", 1 << 20, key_width=16)
        f.record_many(snap["key"], snap["start"], snap["end"])
        fs = f.stats()
        rng = np.random.default_rng(1)
        hits = rng.choice(snap["key"], 500_000)
        miss = np.char.add(b"m", np.arange(500_000).astype("S12"))
        q = np.concatenate([hits, miss]).astype("S16")
        rng.shuffle(q)
        for x in (t, f):              # warm both mappings before timing
            x.get_many(q)
        r_churned, r_fresh = lookup_rate(t, q), lookup_rate(f, q)
        print(f"churn: {cycles:,} start/stop/expire cycles in {secs:.1f} s "
              f"({cycles / secs / 1e6:.2f} M cycles/s) through {s.capacity:,} slots")
        print(f"{'':24}{'after churn':>14}{'fresh table':>14}")
        print(f"{'calls':24}{s.count:>14,}{fs.count:>14,}")
        print(f"{'tombstones':24}{s.tombstones:>14,}{fs.tombstones:>14,}")
        print(f"{'mean probe (buckets)':24}{s.mean_probe:>14.4f}{fs.mean_probe:>14.4f}")
        print(f"{'max probe (buckets)':24}{s.max_probe:>14}{fs.max_probe:>14}")
        print(f"{'get_many M keys/s':24}{r_churned / 1e6:>14.2f}{r_fresh / 1e6:>14.2f}"
              f"   (1M lookups, 50% misses; ratio {r_churned / r_fresh:.2f})")
        print(f"{'rebuilds during churn':24}{s.n_rebuilds:>14}")
        f.close()
        t.close()

        # growth, compaction, expiry and recovery of a 1M-call table
        b = CallTable.create(p + "-big", 1 << 21)
        keys = np.char.add(b"call-", np.arange(1_000_000).astype("S12")).astype("S64")
        b.record_many(keys, np.arange(1_000_000), np.arange(1_000_000) + 10)
        t0 = time.perf_counter(); b.grow(1 << 22); t_grow = time.perf_counter() - t0
        t0 = time.perf_counter(); b.compact(); t_compact = time.perf_counter() - t0
        m = b._m
        m.q[W["wseq"]] = m.q[W["wseq"]] + 1          # pretend a writer died mid-operation
        t0 = time.perf_counter(); b.start("after-crash", 1); t_recover = time.perf_counter() - t0
        t0 = time.perf_counter(); n = b.expire(ended_before=500_010); t_expire = time.perf_counter() - t0
        t0 = time.perf_counter(); rep = b.check(); t_check = time.perf_counter() - t0
        print(f"1M calls: grow 2M -> 4M slots {t_grow * 1e3:.0f} ms, compact {t_compact * 1e3:.0f} ms, "
              f"crash recovery {t_recover * 1e3:.0f} ms, expire {n:,} calls {t_expire * 1e3:.0f} ms, "
              f"check {t_check * 1e3:.0f} ms ({'ok' if rep.ok else rep.problems})")
        b.close()
    finally:
        for x in paths:
            CallTable.unlink(x)
        os.rmdir(d)


if __name__ == "__main__":
    main()
