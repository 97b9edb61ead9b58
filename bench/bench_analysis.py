#!/usr/bin/env python3
"""Analysis benchmark: snapshot, to_pandas and concurrency on a 1M-call table,
and the writers' op latency with and without a snapshot loop in another process.

Targets (issue 5), on this machine:

* ``snapshot()`` of 1M calls             < 100 ms
* ``to_pandas`` of 1M calls              < 1 s
* ``concurrency`` over 1M calls          < 200 ms
* writers' p99 op latency while another process snapshots in a loop: reported,
  next to the same figure without the loop (readers take no lock, so the two
  should be close; a reader that blocked writers would push the p99 to the
  length of a snapshot).

Run from the repository root::

    .venv/bin/python bench/bench_analysis.py              # 1M calls, ~1 minute
    .venv/bin/python bench/bench_analysis.py --quick      # 100k calls, smoke run
    .venv/bin/python bench/bench_analysis.py --json out.json

The table (capacity 2N, so load 0.5 after the fill, as in bench_core.py) is
created in ``$NPCALLS_DIR`` if set, else in a private directory under
/dev/shm, and removed at the end, on an error, on Ctrl-C and on SIGTERM.

Timing: each analysis step runs ``--reps`` times (default 5) on the warm
table; best and median are printed, the target is judged on the median.
CPU time / wall time is printed with each step: well below 1.0 means other
processes took the CPU (the machine is shared) and the figure is pessimistic.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import analysis_procs as procs  # noqa: E402  (bench/, the script's own directory)

import npcalls  # noqa: E402
from npcalls import NOT_SET, analysis  # noqa: E402

S = 1_000_000_000

def fill(t: Any, n: int, rng: np.random.Generator) -> np.ndarray:
    """N calls of the last hour: 85% ended (lognormal holds, mean 90 s), 15% up."""
    now = time.time_ns()
    hexes = rng.integers(0, 2**63, n, dtype=np.int64)
    keys = np.char.add(np.char.add(np.char.mod("%016x", hexes).astype("S16"), b"-"),
                       np.arange(n).astype("S8"))
    keys = np.char.add(keys, b"@10.1.2.3")
    st = now - rng.integers(0, 3600 * S, n)
    hold = (rng.lognormal(np.log(90) - 0.5, 1.0, n) * S).astype(np.int64)
    en = np.where((rng.random(n) < 0.85) & (st + hold < now), st + hold, NOT_SET)
    t.record_many(keys, st, en)
    return keys


def timed(f: Callable[[], Any], reps: int) -> tuple[list[float], list[float], Any]:
    walls, cpus, out = [], [], None
    for _ in range(reps):
        c0, w0 = time.process_time(), time.perf_counter()
        out = f()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return walls, cpus, out


def latency_phase(name: str, writers: int, seconds: float, with_loop: bool) -> dict:
    loop = None
    if with_loop:
        loop = subprocess.Popen(procs.command("snapshot-loop", name, seconds + 1.0),
                                stdout=subprocess.PIPE, text=True)
        time.sleep(0.5)         # the loop is snapshotting before the writers start
    ws = [subprocess.Popen(procs.command("writer", name, w, seconds),
                           stdout=subprocess.PIPE, text=True) for w in range(writers)]
    res = [json.loads(p.communicate()[0]) for p in ws]
    if any(p.returncode for p in ws):
        raise RuntimeError("a writer failed")
    out = {"writers": res,
           "p99_us_worst_writer": max(r["p99_us"] for r in res),
           "p50_us_worst_writer": max(r["p50_us"] for r in res),
           "ops_per_s_total": sum(r["ops_per_s"] for r in res)}
    if loop is not None:
        out["snapshot_loop"] = json.loads(loop.communicate()[0])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="calls in the table (default 1M)")
    ap.add_argument("--quick", action="store_true", help="N = 100,000")
    ap.add_argument("--reps", type=int, default=5, help="repetitions per step (default 5)")
    ap.add_argument("--writers", type=int, default=1,
                    help="writer processes in the latency test (default 1: with the snapshot "
                         "loop that makes one process per core on a 2-core machine)")
    ap.add_argument("--seconds", type=float, default=4.0,
                    help="duration of each latency phase (default 4)")
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--json", metavar="PATH", help="also write every figure as JSON")
    a = ap.parse_args()
    n = 100_000 if a.quick else a.n

    own_dir = None
    if "NPCALLS_DIR" not in os.environ:
        own_dir = tempfile.mkdtemp(prefix="npcalls-bench-analysis-",
                                   dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        os.environ["NPCALLS_DIR"] = own_dir      # inherited by the writer processes
    name = f"bench-analysis-{os.getpid()}"

    def cleanup(*_: Any) -> None:
        npcalls.CallTable.unlink(name)
        if own_dir:
            shutil.rmtree(own_dir, ignore_errors=True)

    def on_signal(signum: int, frame: Any) -> None:
        cleanup()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    results: dict[str, Any] = {"n": n, "load_before": os.getloadavg()}
    try:
        t = npcalls.CallTable.create(name, 2 * n)
        t0 = time.perf_counter()
        fill(t, n, np.random.default_rng(a.seed))
        print(f"npcalls analysis benchmark: {n:,} calls (table capacity {2 * n:,}), "
              f"filled in {time.perf_counter() - t0:.1f} s; "
              f"load average {results['load_before'][0]:.2f} on {os.cpu_count()} CPUs\n")
        r = npcalls.CallTable.open(name, readonly=True)
        snap = r.snapshot()
        df = analysis.to_pandas(snap)
        steps = [
            ("snapshot()", lambda: r.snapshot(), 0.100),
            ("to_pandas(snapshot)", lambda: analysis.to_pandas(snap), None),
            ("to_pandas(table): snapshot + convert", lambda: analysis.to_pandas(r), 1.0),
            ("concurrency(df, '1s'): 3,600 points + peak", lambda: analysis.concurrency(df, "1s"),
             0.200),
            ("concurrency(df): automatic grid + peak", lambda: analysis.concurrency(df), None),
            ("peak_concurrency(df)", lambda: analysis.peak_concurrency(df), None),
            ("concurrency(df, '10s', how='max')",
             lambda: analysis.concurrency(df, "10s", how="max"), None),
            ("duration_stats(df)", lambda: analysis.duration_stats(df), None),
            ("arrivals(df, '1min')", lambda: analysis.arrivals(df, "1min"), None),
            ("long_running(df, '1h')", lambda: analysis.long_running(df, "1h"), None),
        ]
        print(f"{'step':<46}{'best':>10}{'median':>10}{'cpu/wall':>10}  target")
        results["steps"] = {}
        for label, f, target in steps:
            walls, cpus, _ = timed(f, a.reps)
            med = statistics.median(walls)
            ratio = sum(cpus) / sum(walls)
            verdict = ""
            if target is not None:
                verdict = f"< {target * 1e3:.0f} ms: {'PASS' if med < target else 'MISS'}"
            print(f"{label:<46}{min(walls) * 1e3:>8.1f}ms{med * 1e3:>8.1f}ms{ratio:>10.2f}  "
                  f"{verdict}")
            results["steps"][label] = {"wall_s": walls, "cpu_s": cpus, "target_s": target}
        c = analysis.concurrency(df, "1s")
        print(f"\n(concurrency peak {c.attrs['peak']:,} calls at {c.attrs['peak_at']}; "
              f"{len(df):,} rows, {(df['state'] == 'active').sum():,} active)")
        df = snap = None        # free ~200 MB before the latency phases
        r.close()
        t.close()

        print(f"\nwriter op latency (start, stop, remove; {a.writers} writer process(es), "
              f"{a.seconds:g} s per phase)")
        base = latency_phase(name, a.writers, a.seconds, False)
        loaded = latency_phase(name, a.writers, a.seconds, True)
        results["latency"] = {"without_snapshots": base, "with_snapshot_loop": loaded}
        print(f"{'':<34}{'p50':>9}{'p99':>9}{'p99.9':>10}{'max':>10}{'ops/s':>11}")
        for label, ph in (("without readers", base), ("with a snapshot loop", loaded)):
            for w in ph["writers"]:
                print(f"{label:<34}{w['p50_us']:>7.1f}us{w['p99_us']:>7.1f}us"
                      f"{w['p999_us']:>8.0f}us{w['max_us']:>8.0f}us{w['ops_per_s']:>11,.0f}")
        sl = loaded["snapshot_loop"]
        print(f"snapshot loop: {sl['snapshots']} snapshots of {sl['rows']:,} rows, "
              f"{sl['mean_ms']:.0f} ms each, in another process, during the second phase")
        ratio = loaded["p99_us_worst_writer"] / base["p99_us_worst_writer"]
        print(f"p99 with / without the snapshot loop: {ratio:.2f}x "
              f"({'writers not stalled' if loaded['p99_us_worst_writer'] < 1000 * sl['mean_ms'] / 4 else 'STALLED?'}"
              f": a blocked writer would wait up to a snapshot, {sl['mean_ms']:.0f} ms)")
        results["load_after"] = os.getloadavg()
        print(f"\nload average at the end: {results['load_after'][0]:.2f}")
        if a.json:
            with open(a.json, "w") as f:
                json.dump(results, f, indent=1, default=str)
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
