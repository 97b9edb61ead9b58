"""What one Prometheus scrape of a 1M-call table costs (target: < 200 ms, one snapshot).

Measured in the same run: the full HTTP scrape (``GET /metrics`` through
prometheus_client), the collector alone, and as peers
``CallTable.times()`` (the one pass over the rows a scrape makes: a snapshot
without the keys), ``CallTable.snapshot()`` (with the keys) and
``CallTable.stats()`` (the whole-table summary).  Also checks that a scrape
makes exactly one pass over the rows (one times(), no snapshot()).

    .venv/bin/python bench/bench_exporter.py [--calls 1000000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import urllib.request

import numpy as np

import npcalls
from npcalls.exporter import TableCollector, serve


def best(f, repeat: int) -> tuple[float, float]:
    """Best wall time and best CPU time (this process, all threads) of ``repeat`` runs.

    Both: on a machine shared with other jobs the wall time includes waiting
    for a core; the CPU time is what the scrape itself costs.
    """
    wall, cpu = [], []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        f()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return min(wall), min(cpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    d = tempfile.mkdtemp(prefix="npcalls-bench-", dir="/dev/shm")
    path = os.path.join(d, "npcalls.bench")
    n = a.calls
    t = npcalls.CallTable.create(path, capacity=2 * n)
    rng = np.random.default_rng(1)
    now = time.time_ns()
    keys = np.char.add(b"bench-", np.arange(n).astype("S12")).astype("S64")
    start = now - rng.integers(1, 3600 * 10**9, n)
    t.start_many(keys, start)
    ended = rng.random(n) < 0.7                      # 70% ended, 30% active
    t.stop_many(keys[ended], start[ended] + rng.integers(10**9, 600 * 10**9, ended.sum()))
    ro = npcalls.CallTable.open(path, readonly=True)
    col = TableCollector([path], host="bench")
    calls = {"n": 0}
    orig = {m: getattr(npcalls.CallTable, m) for m in ("snapshot", "times", "stats")}

    def counting(name):
        def f(self):
            calls["n"] += 1
            calls[name] = calls.get(name, 0) + 1
            return orig[name](self)
        return f

    for m in orig:
        setattr(npcalls.CallTable, m, counting(m))
    list(col.collect())
    assert calls["n"] == 1 and calls.get("times") == 1, f"a scrape made these passes: {calls}"
    for m, f in orig.items():
        setattr(npcalls.CallTable, m, f)
    srv = serve([path], "127.0.0.1:0", host="bench")
    try:
        def http():
            with urllib.request.urlopen(srv.url, timeout=30) as r:
                body = r.read()
            assert b"npcalls_active_calls" in body
        http()
        t_http = best(http, a.repeat)
        t_col = best(lambda: list(col.collect()), a.repeat)
        t_times = best(ro.times, a.repeat)
        t_snap = best(ro.snapshot, a.repeat)
        t_stats = best(ro.stats, a.repeat)
    finally:
        srv.close()
        col.close()
        ro.close()
        t.close()
        npcalls.CallTable.unlink(path)
        os.rmdir(d)
    print(f"table: {n:,} calls ({int(0.3 * n):,} active), capacity {2 * n:,}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"{'':24}{'wall':>9}{'cpu':>10}")
    for label, (w, c) in (("scrape over HTTP", t_http), ("collector alone", t_col),
                          ("peer: times()", t_times), ("peer: snapshot()", t_snap),
                          ("peer: stats()", t_stats)):
        print(f"{label:24}{w * 1e3:7.1f} ms{c * 1e3:7.1f} ms")
    w, c = t_http
    print(f"scrape / snapshot(): wall {w / t_snap[0]:.2f}x, cpu {c / t_snap[1]:.2f}x; "
          f"target < 200 ms: {'met' if w < 0.2 else 'missed'} (wall), "
          f"{'met' if c < 0.2 else 'missed'} (cpu)")
    print("passes over the rows per scrape: 1 (times(); no snapshot())")


if __name__ == "__main__":
    main()
