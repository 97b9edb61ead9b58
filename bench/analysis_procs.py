#!/usr/bin/env python3
"""The processes of the analysis benchmark, also run by tests/test_analysis_snapshot.py.

One home for both (a file, run as a separate program, so that the figures
come from processes of their own, as in production)::

    python bench/analysis_procs.py writer NAME WRITER_ID SECONDS
    python bench/analysis_procs.py snapshot-loop NAME SECONDS

``writer`` records calls one operation at a time through the public API for
SECONDS: start, stop, and remove of the call started 1,000 calls earlier (the
table stays at the same size); it prints one JSON line, the op latencies
``{"ops", "ops_per_s", "p50_us", "p99_us", "p999_us", "max_us"}``.
``snapshot-loop`` opens the table read-only and takes snapshots back to back
for SECONDS; it prints ``{"snapshots", "mean_ms", "rows"}``.

The table NAME is resolved like every bare name (``$NPCALLS_DIR``, inherited
from the caller).
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import npcalls  # noqa: E402

PATH = os.path.abspath(__file__)


def command(proc: str, *args: object) -> list[str]:
    """The argv that runs ``proc`` (``writer`` or ``snapshot-loop``) in a new interpreter."""
    return [sys.executable, PATH, proc, *map(str, args)]


def writer(name: str, wid: int, dur: float) -> dict:
    t = npcalls.CallTable.open(name)
    lat = np.empty(4_000_000, np.int64)
    clock = time.perf_counter_ns
    prefix = f"bench-w{wid}-{time.time_ns()}-"
    i = n = 0
    t.start(prefix + "warm")
    t.stop(prefix + "warm")
    stop_at = time.monotonic() + dur
    # start, stop, and remove of the call started 1,000 calls earlier: the table
    # stays at the same size (at load 0.5 removals rarely leave tombstones).
    while time.monotonic() < stop_at and n < len(lat) - 3:
        k = f"{prefix}{i}@192.0.2.1"
        a = clock()
        t.start(k)
        b = clock()
        t.stop(k)
        c = clock()
        lat[n] = b - a
        lat[n + 1] = c - b
        n += 2
        if i >= 1000:
            old = f"{prefix}{i - 1000}@192.0.2.1"
            a = clock()
            t.remove(old)
            b = clock()
            lat[n] = b - a
            n += 1
        i += 1
    lat = lat[:n]
    return {"ops": n, "ops_per_s": n / dur,
            "p50_us": float(np.percentile(lat, 50)) / 1e3,
            "p99_us": float(np.percentile(lat, 99)) / 1e3,
            "p999_us": float(np.percentile(lat, 99.9)) / 1e3,
            "max_us": float(lat.max()) / 1e3}


def snapshot_loop(name: str, dur: float) -> dict:
    t = npcalls.CallTable.open(name, readonly=True)
    times = []
    rows = 0
    stop_at = time.monotonic() + dur
    while time.monotonic() < stop_at:
        a = time.perf_counter()
        rows = len(t.snapshot())
        times.append(time.perf_counter() - a)
    return {"snapshots": len(times), "mean_ms": 1e3 * sum(times) / max(1, len(times)),
            "rows": rows}


def main(argv: list[str]) -> int:
    if len(argv) == 4 and argv[0] == "writer":
        out = writer(argv[1], int(argv[2]), float(argv[3]))
    elif len(argv) == 3 and argv[0] == "snapshot-loop":
        out = snapshot_loop(argv[1], float(argv[2]))
    else:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
