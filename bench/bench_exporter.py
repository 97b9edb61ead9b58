"""What one Prometheus scrape of a 1M-call table costs (target: < 200 ms, one snapshot).

Measured in the same run: the full HTTP scrape (``GET /metrics`` through
prometheus_client), the collector alone, and its parts' peers:
``CallTable.snapshot()`` (the one pass over the rows a scrape makes) and
``CallTable.stats()`` (the existing whole-table summary, which a scrape does
not use).  Also checks that a scrape takes exactly one snapshot.

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


def best(f, repeat: int) -> float:
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return min(ts)


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
    orig = npcalls.CallTable.snapshot

    def counting(self):
        calls["n"] += 1
        return orig(self)

    npcalls.CallTable.snapshot = counting
    list(col.collect())
    assert calls["n"] == 1, f"a scrape took {calls['n']} snapshots"
    npcalls.CallTable.snapshot = orig
    srv = serve([path], "127.0.0.1:0", host="bench")
    try:
        def http():
            with urllib.request.urlopen(srv.url, timeout=30) as r:
                body = r.read()
            assert b"npcalls_active_calls" in body
        http()
        t_http = best(http, a.repeat)
        t_col = best(lambda: list(col.collect()), a.repeat)
        t_snap = best(ro.snapshot, a.repeat)
        t_stats = best(ro.stats, a.repeat)
    finally:
        srv.close()
        col.close()
        ro.close()
        t.close()
        npcalls.CallTable.unlink(path)
        os.rmdir(d)
    print(f"table: {n:,} calls ({int(0.3 * n):,} active), capacity {2 * n:,}")
    print(f"scrape over HTTP        {t_http * 1e3:7.1f} ms  (target < 200 ms: "
          f"{'met' if t_http < 0.2 else 'MISSED'})")
    print(f"collector alone         {t_col * 1e3:7.1f} ms")
    print(f"peer: snapshot()        {t_snap * 1e3:7.1f} ms  scrape/snapshot = {t_http / t_snap:.2f}x")
    print(f"peer: stats()           {t_stats * 1e3:7.1f} ms  scrape/stats = {t_http / t_stats:.2f}x")
    print("snapshots per scrape: 1")


if __name__ == "__main__":
    main()
