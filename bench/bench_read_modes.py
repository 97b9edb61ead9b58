#!/usr/bin/env python3
"""What the shared-lock read mode costs against the lock-free one, in the same run.

Two read-only handles on one table, one per mode (docs/format.md, "Read modes
and platforms"); alternating repetitions, medians.  Run from the repository
root::

    .venv/bin/python bench/bench_read_modes.py            # 1M calls
    .venv/bin/python bench/bench_read_modes.py --n 100000
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import npcalls  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="calls in the table")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--singles", type=int, default=50_000, help="get() calls per repetition")
    a = ap.parse_args()
    d = tempfile.mkdtemp(prefix="npcalls-bench-", dir="/dev/shm")
    path = os.path.join(d, "modes")
    t = npcalls.CallTable.create(path, 2 * a.n)
    keys = np.array([f"{i:08x}-call@bench.example".encode() for i in range(a.n)])
    t.start_many(keys, 1)
    singles = [k.decode() for k in keys[np.random.default_rng(1).integers(0, a.n, a.singles)]]
    handles = {m: npcalls.CallTable.open(path, readonly=True, read_mode=m)
               for m in ("lockfree", "shared")}
    res: dict = {m: {"get": [], "get_many": [], "snapshot": []} for m in handles}
    for _ in range(a.reps):
        for m, h in handles.items():
            t0 = time.perf_counter()
            for k in singles:
                h.get(k)
            res[m]["get"].append((time.perf_counter() - t0) / len(singles) * 1e6)
            t0 = time.perf_counter()
            h.get_many(keys)
            res[m]["get_many"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            h.snapshot()
            res[m]["snapshot"].append(time.perf_counter() - t0)
    print(f"{a.n:,} calls, median of {a.reps}; machine: {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f}")
    print(f"{'operation':<28}{'lockfree':>12}{'shared':>12}{'shared/lockfree':>18}")
    for op, unit in (("get", "us/op"), ("get_many", "s"), ("snapshot", "s")):
        lf = float(np.median(res["lockfree"][op]))
        sh = float(np.median(res["shared"][op]))
        print(f"{op + ' (' + unit + ')':<28}{lf:>12.4f}{sh:>12.4f}{sh / lf:>17.2f}x")
    for h in handles.values():
        h.close()
    t.close()
    npcalls.CallTable.unlink(path)
    os.rmdir(d)


if __name__ == "__main__":
    main()
