"""A day of a small fleet, snapshotted like `npcalls export`, queried on DuckDB and on Dask.

Each "host" gets its own table and a day of Poisson call arrivals (UTC
yesterday by default).  The day is replayed in order: every ``--every``
minutes the calls that started and ended meanwhile are recorded, ended calls
older than ``--expire`` are expired (as ``npcalls expire --every`` would do
next to the proxy), and a snapshot is written exactly as ``npcalls export``
writes it.  Then the four fleet questions run on DuckDB and on a Dask
``distributed.LocalCluster`` of worker processes; the answers must be the
same, and both timings are printed.

    .venv/bin/python examples/fleet/fleet_example.py                 # 3 hosts, 24 h
    .venv/bin/python examples/fleet/fleet_example.py --hours 1 --out /tmp/fleet

On a real fleet, each proxy runs ``npcalls export calls --to /mnt/fleet
--every 60s --keep 7d`` and the analysis runs the same two functions,
:func:`npcalls.fleet.duckdb_queries` and :func:`npcalls.fleet.dask_queries`,
on the shared directory (or an object-store prefix).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import tempfile
import time

import numpy as np
import pandas as pd

import npcalls
from npcalls import fleet
from npcalls.snapshots import write_snapshot

S = 1_000_000_000


def build(root: str, tdir: str, hosts: int, cps: float, hours: float, every_min: float,
          expire_min: float, day: dt.date, seed: int) -> tuple[int, int]:
    d0, _ = fleet.day_bounds(day)
    span = int(hours * 3600 * S)
    rng = np.random.default_rng(seed)
    files = calls_total = 0
    for h in range(hosts):
        host = f"pbx-{chr(ord('a') + h)}"
        n = rng.poisson(cps * hours * 3600)
        start = np.sort(d0 + rng.integers(0, span, n))
        hold = (rng.exponential(90.0, n) * S).astype(np.int64)
        end = start + hold
        keys = np.char.add(f"{host}-".encode(), np.arange(n).astype("S10"))
        order_end = np.argsort(end, kind="stable")
        t = npcalls.CallTable.create(os.path.join(tdir, f"npcalls.{host}"),
                                     capacity=max(1024, int(cps * (90 + expire_min * 60) * 4)))
        try:
            prev = d0 - 1
            step = int(every_min * 60 * S)
            for snap_t in range(d0 + step, d0 + span + 1, step):
                a, b = np.searchsorted(start, [prev + 1, snap_t + 1])
                t.start_many(keys[a:b], start[a:b])
                ea, eb = np.searchsorted(end[order_end], [prev + 1, snap_t + 1])
                sel = order_end[ea:eb]
                t.stop_many(keys[sel], end[sel])
                t.expire(ended_before=snap_t - int(expire_min * 60 * S))
                write_snapshot(t, root, host=host, name="calls", now_ns=snap_t)
                files += 1
                prev = snap_t
        finally:
            t.close()
            npcalls.CallTable.unlink(t.path)
        calls_total += n
    return files, calls_total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hosts", type=int, default=3)
    ap.add_argument("--cps", type=float, default=2.0, help="calls per second per host")
    ap.add_argument("--hours", type=float, default=24.0)
    ap.add_argument("--every", type=float, default=5.0, help="minutes between snapshots")
    ap.add_argument("--expire", type=float, default=15.0,
                    help="minutes an ended call stays in its table")
    ap.add_argument("--workers", type=int, default=2, help="Dask worker processes")
    ap.add_argument("--out", default=None, help="keep the snapshots in this directory")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    day = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=1)).date()
    work = tempfile.mkdtemp(prefix="npcalls-fleet-")
    tdir = tempfile.mkdtemp(prefix="npcalls-fleet-", dir="/dev/shm")
    root = a.out or os.path.join(work, "snapshots")
    try:
        t0 = time.perf_counter()
        files, calls = build(root, tdir, a.hosts, a.cps, a.hours, a.every, a.expire, day, a.seed)
        rows = sum(len(pd.read_parquet(os.path.join(dp, f), columns=["call_id"]))
                   for dp, _, fs in os.walk(root) for f in fs)
        print(f"{a.hosts} hosts, {calls:,} calls on {day}, {files} snapshots, {rows:,} rows "
              f"(built in {time.perf_counter() - t0:.1f} s)")

        t0 = time.perf_counter()
        duck = fleet.duckdb_queries(root, day)
        t_duck = time.perf_counter() - t0

        from distributed import Client, LocalCluster
        with LocalCluster(n_workers=a.workers, threads_per_worker=1, processes=True,
                          dashboard_address=None, silence_logs=40) as cluster, \
                Client(cluster) as client:
            fleet.dask_queries(root, day, client)       # warm-up: imports on the workers
            t0 = time.perf_counter()
            dsk = fleet.dask_queries(root, day, client)
            t_dask = time.perf_counter() - t0

        pd.testing.assert_frame_equal(duck.latest_calls, dsk.latest_calls)
        pd.testing.assert_series_equal(duck.active_now, dsk.active_now)
        pd.testing.assert_series_equal(duck.started_per_minute, dsk.started_per_minute)
        assert (duck.peak, duck.peak_at) == (dsk.peak, dsk.peak_at)
        print("DuckDB and Dask agree on all four answers")
        print(f"  latest row per call: {len(duck.latest_calls):,} calls")
        print(f"  active calls per host now: {duck.active_now.to_dict()}")
        busiest = duck.started_per_minute.idxmax()
        print(f"  calls started per minute: {len(duck.started_per_minute)} minutes, busiest "
              f"{busiest:%H:%M} with {duck.started_per_minute.max()}")
        print(f"  peak concurrency on {day}: {duck.peak} at {duck.peak_at}")
        print(f"timings: DuckDB {t_duck:.2f} s, Dask ({a.workers} worker processes) "
              f"{t_dask:.2f} s, Dask/DuckDB {t_dask / t_duck:.1f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(tdir, ignore_errors=True)


if __name__ == "__main__":
    main()
