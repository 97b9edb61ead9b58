#!/usr/bin/env python3
"""Every performance target of issue 13, measured in one run, as one PASS/MISS table.

Runs, each against its peer in the same run:

* ``bench_core.py`` (its JSON): later ``start_many`` batches vs the dict build
  with the same first-start-wins semantics, ``get_many`` vs pandas, single
  ``start()`` / ``get()`` vs LMDB;
* a first batch in a fresh process, table creation included, vs a dict build
  in a fresh process;
* two writer processes doing single ``start()`` calls vs two LMDB writers
  (median of 3 alternating runs; one single-writer run of each for scale);
* ``bench_ingest.py`` (its JSON): acc-log ingest through ``npcalls ingest``
  on the generated log and on the replayed real Kamailio lines, ``--jobs 2``
  vs ``--jobs 1``, CSV CDRs;
* peak RSS of one ``start_many`` of many keys (``--rss-keys``, 2M by default;
  10M peaks at about 6.2 GB, ~45 s here) against the keys + table + 512 MB.

Usage::

    .venv/bin/python bench/targets.py              # 1M keys / lines
    .venv/bin/python bench/targets.py --quick      # smoke run (100k)
    .venv/bin/python bench/targets.py --rss-keys 10000000
    .venv/bin/python bench/targets.py --only writers,rss   # some parts only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PY = sys.executable


def _run_json(script: str, args: list[str], quiet: bool) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    try:
        subprocess.run([PY, os.path.join(HERE, script), *args, "--json", out], check=True,
                       stdout=subprocess.DEVNULL if quiet else None)
        with open(out) as f:
            return json.load(f)
    finally:
        os.unlink(out)


def _py(code: str, *args: str, env: dict | None = None) -> Any:
    """Run ``code`` in a fresh interpreter; it prints one JSON value last."""
    r = subprocess.run([PY, "-c", textwrap.dedent(code), *args], capture_output=True,
                       text=True, check=True, cwd=ROOT, env=env)
    return json.loads(r.stdout.strip().splitlines()[-1])


# The keys of the fresh-process runs: bench_core's realistic Call-IDs, written
# once to a file so that every process reads the same list (reading is not timed).
_KEYS = """
    import json, sys
    sys.path.insert(0, "bench")
    from bench_core import make_call_ids
    keys = make_call_ids(int(sys.argv[1]), 20240601)
    with open(sys.argv[2], "w") as f:
        f.write("\\n".join(keys))
    print(json.dumps(len(keys)))
"""

_FIRST_TABLE = """
    import json, sys, time
    import numpy as np
    import npcalls
    keys = open(sys.argv[1]).read().split("\\n")
    ts = np.arange(len(keys), dtype=np.int64) + 1_700_000_000_000_000_000
    t0 = time.perf_counter()
    t = npcalls.CallTable.create(sys.argv[2], capacity=2 * len(keys), key_width=64)
    t1 = time.perf_counter()
    ok = t.start_many(keys, ts)
    t2 = time.perf_counter()
    assert ok.all() and len(t) == len(keys)
    t.close()
    npcalls.CallTable.unlink(sys.argv[2])
    print(json.dumps({"create": t1 - t0, "start_many": t2 - t1, "total": t2 - t0}))
"""

_FIRST_DICT = """
    import json, sys, time
    import numpy as np
    keys = open(sys.argv[1]).read().split("\\n")
    ts = (np.arange(len(keys), dtype=np.int64) + 1_700_000_000_000_000_000).tolist()
    NOT_SET = -(1 << 63)
    t0 = time.perf_counter()
    d = {}
    for k, v in zip(keys, ts):
        if k not in d:
            d[k] = [v, NOT_SET]
    t1 = time.perf_counter()
    assert len(d) == len(keys)
    print(json.dumps({"total": t1 - t0}))
"""

# Two writer processes, each doing single start() calls on its own new keys.
_WRITER = """
    import json, sys, time
    import numpy as np
    import npcalls
    kind, where, w, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    keys = [f"w{w}-{i}-a84b4c76e66710@pc33.example.com" for i in range(n)]
    go = float(sys.argv[5])
    if kind == "npcalls":
        t = npcalls.CallTable.open(where)
        ts = 1_700_000_000_000_000_000
        while time.time() < go:
            time.sleep(0.001)
        t0 = time.perf_counter()
        for k in keys:
            t.start(k, ts)
        dt = time.perf_counter() - t0
        t.close()
    else:
        import lmdb
        env = lmdb.open(where, map_size=4 << 30, writemap=True, sync=False, metasync=False,
                        lock=True)
        v = (1_700_000_000_000_000_000).to_bytes(8, "little") * 2
        bk = [k.encode() for k in keys]
        while time.time() < go:
            time.sleep(0.001)
        t0 = time.perf_counter()
        for k in bk:
            with env.begin(write=True) as txn:
                txn.put(k, v, overwrite=False)
        dt = time.perf_counter() - t0
        env.close()
    print(json.dumps({"seconds": dt, "ops": n}))
"""

_RSS = """
    import json, sys, resource
    import numpy as np
    import npcalls
    n, name = int(sys.argv[1]), sys.argv[2]
    keys = [f"{i:016x}-{i * 2654435761 % (1 << 32):08x}@10.0.{i % 250}.{i % 199}" for i in range(n)]
    ts = np.full(n, 1_700_000_000_000_000_000, np.int64)
    def hwm():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    before = hwm()
    t = npcalls.CallTable.create(name, capacity=2 * n, key_width=64)
    size = t.stats().file_bytes
    # reset the peak: only the batch call counts (Linux >= 4.0, write "5" to clear_refs)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    base = hwm()
    ok = t.start_many(keys, ts)
    peak = hwm()
    assert ok.all()
    t.close()
    npcalls.CallTable.unlink(name)
    print(json.dumps({"keys_rss": before, "table_bytes": size, "base": base, "peak": peak,
                      "reset": reset}))
"""


def _writers(kind: str, where: str, n_ops: int, nw: int) -> float:
    """Ops/s of ``nw`` writer processes started together, each doing ``n_ops`` single writes."""
    go = time.time() + 1.5                           # all start together
    ps = [subprocess.Popen([PY, "-c", textwrap.dedent(_WRITER), kind, where, str(w),
                            str(n_ops), str(go)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
          for w in range(nw)]
    outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in ps]
    if any(p.returncode for p in ps):
        raise RuntimeError(f"a {kind} writer failed")
    return nw * n_ops / max(o["seconds"] for o in outs)


def two_writers(n_ops: int, work: str, rounds: int = 3) -> tuple[float, float, dict]:
    """Ops/s of two writer processes: npcalls single start() vs LMDB put in own txn.

    ``rounds`` alternating runs of each, each on a new table / environment;
    the medians are returned, with every run and one single-writer run of
    each (how far two writers scale) in the dict.
    """
    import statistics

    import npcalls
    runs: dict[str, list[float]] = {"npcalls": [], "lmdb": [], "npcalls 1 writer": [],
                                    "lmdb 1 writer": []}
    for r in range(rounds + 1):
        nw = 2 if r < rounds else 1
        suffix = "" if nw == 2 else " 1 writer"
        name = f"targets-w-{os.getpid()}-{r}"
        t = npcalls.CallTable.create(name, capacity=4 * n_ops, key_width=64)
        t.close()
        try:
            runs["npcalls" + suffix].append(_writers("npcalls", name, n_ops, nw))
        finally:
            npcalls.CallTable.unlink(name)
        where = os.path.join(work, f"lmdb-{r}")
        os.makedirs(where)
        runs["lmdb" + suffix].append(_writers("lmdb", where, n_ops, nw))
    return (statistics.median(runs["npcalls"]), statistics.median(runs["lmdb"]), runs)


_PARTS = ("core", "first", "writers", "ingest", "rss")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="100k keys / lines, one run each")
    ap.add_argument("--n", type=int, default=1_000_000, help="keys of the batch runs")
    ap.add_argument("--lines", type=int, default=1_000_000, help="log lines of the ingest runs")
    ap.add_argument("--rss-keys", type=int, default=2_000_000,
                    help="keys of the peak-RSS run (10M: peak about 6.2 GB, ~45 s here)")
    ap.add_argument("--writer-ops", type=int, default=50_000, help="single starts per writer")
    ap.add_argument("--show", action="store_true", help="also print the scripts' own reports")
    ap.add_argument("--only", default=",".join(_PARTS),
                    help=f"comma-separated parts to run (default all: {','.join(_PARTS)})")
    a = ap.parse_args(argv)
    parts = set(a.only.split(","))
    if parts - set(_PARTS):
        ap.error(f"--only: unknown part(s) {', '.join(sorted(parts - set(_PARTS)))}")
    if a.quick:
        a.n, a.lines, a.rss_keys, a.writer_ops = 100_000, 100_000, 1_000_000, 10_000
    quick = ["--quick"] if a.quick else []
    work = tempfile.mkdtemp(prefix="npcalls-targets-")
    rows: list[tuple[str, float | None, str, float, str]] = []     # what, value, op, limit, unit
    t_start = time.perf_counter()
    load0 = os.getloadavg()
    try:
        if "core" in parts:
            print("bench_core ...", flush=True)
            core = _run_json("bench_core.py", quick or ["--n", str(a.n)], not a.show)
        else:
            core = {"batch": {"insert": {}, "lookup": {}}, "single": {}}
        ins, look, single = core["batch"]["insert"], core["batch"]["lookup"], core["single"]

        def r(sec: dict, label: str) -> float | None:
            return sec[label]["keys_per_s"] if label in sec else None

        def div(x: float | None, y: float | None) -> float | None:
            return x / y if x and y else None

        dict_loop = r(ins, "dict: loop, if k not in d: d[k]=[t,NOT_SET]")
        ft = fd = None
        if "first" in parts:
            print("first batch in a fresh process ...", flush=True)
            kf = os.path.join(work, "keys.txt")
            _py(_KEYS, str(a.n), kf)
            firsts = [_py(_FIRST_TABLE, kf, f"targets-first-{os.getpid()}-{i}")
                      for i in range(1 if a.quick else 3)]
            dicts = [_py(_FIRST_DICT, kf) for _ in range(1 if a.quick else 3)]
            ft = min(x["total"] for x in firsts)
            fd = min(x["total"] for x in dicts)
            rows.append((f"first start_many of {a.n:,} new keys, fresh process, create included "
                         f">= 1.5x dict build", div(fd, ft), ">=", 1.5, "x"))
        if "core" in parts:
            rows.append(("later start_many(list) batches >= 2x dict build (same semantics)",
                         div(r(ins, "npcalls start_many(list of str)"), dict_loop), ">=", 2, "x"))
            rows.append(("get_many(list) >= 1.8x pandas get_indexer(list, object Index)",
                         div(r(look, "npcalls get_many(list of str)"),
                             r(look, "pandas get_indexer(list of str)")), ">=", 1.8, "x"))
            s = {k: v["ns_median"] for k, v in single.items()}
            rows.append(("get() <= LMDB get (ratio of times)",
                         div(s.get("npcalls get (hit)"), s.get("LMDB get (hit, own read txn)")),
                         "<=", 1.0, "x"))
            rows.append(("start() <= 0.6x LMDB put in own txn (ratio of times)",
                         div(s.get("npcalls start (new key, writer lock)"),
                             s.get("LMDB put (new key, own write txn)")), "<=", 0.6, "x"))
        w_np = w_lm = None
        if "writers" in parts:
            print("two writer processes ...", flush=True)
            try:
                w_np, w_lm, w_runs = two_writers(a.writer_ops, work)
                print("  ops/s, each run: " + "; ".join(
                    f"{k} " + " ".join(f"{v:,.0f}" for v in vs) for k, vs in w_runs.items()),
                    flush=True)
            except ImportError:                 # no py-lmdb: the row says the peer is missing
                pass
            rows.append(("two writers: npcalls start() >= 2x LMDB put", div(w_np, w_lm),
                         ">=", 2, "x"))

        if "ingest" in parts:
            print("bench_ingest ...", flush=True)
            ing = _run_json("bench_ingest.py", quick or ["--lines", str(a.lines), "--repeat", "2"],
                            not a.show)
        else:
            ing = {"acc": {}}
        for label, v in ing["acc"].items():
            rows.append((f"acc ingest CLI --jobs 1, {label} >= 1M lines/s",
                         v["cli_jobs1_lines_per_s"] / 1e6, ">=", 1.0, "M/s"))
            rows.append((f"acc ingest CLI --jobs 1, {label} >= 5x per-line parser",
                         v["ratio"], ">=", 5, "x"))
            rows.append((f"acc ingest --jobs 2 vs --jobs 1, {label} >= 1.7x",
                         v["jobs2_speedup"], ">=", 1.7, "x"))
        for k, label in (("csv_iso", "ISO times"), ("csv_ns", "epoch ns")):
            if k in ing:
                rows.append((f"CSV CDRs ({label}) end to end >= 2M rows/s",
                             ing[k]["rows_per_s"] / 1e6, ">=", 2.0, "M/s"))

        if "rss" in parts:
            print(f"peak RSS of start_many({a.rss_keys:,} keys) ...", flush=True)
            m = _py(_RSS, str(a.rss_keys), f"targets-rss-{os.getpid()}")
            extra = (m["peak"] - m["base"] if m["reset"] else m["peak"] - m["keys_rss"]
                     - m["table_bytes"])
            rows.append((f"peak RSS of start_many({a.rss_keys:,}) beyond keys + table <= 512 MB",
                         extra / 2**20, "<=", 512, "MB"))
    finally:
        import shutil
        shutil.rmtree(work, ignore_errors=True)

    print()
    print("ISSUE 13 TARGETS, one run "
          f"({time.perf_counter() - t_start:.0f} s; load average at start "
          f"{load0[0]:.1f}, at end {os.getloadavg()[0]:.1f}; {os.cpu_count()} CPUs)")
    for what, v, op, limit, unit in rows:
        if v is None:
            print(f"  {'n/a':5} {what:78} (peer missing)")
            continue
        ok = v >= limit if op == ">=" else v <= limit
        val = f"{v:.2f}{unit}" if unit == "x" else f"{v:.2f} {unit}"
        print(f"  {'PASS' if ok else 'MISS':5} {what:78} {val:>11}  ({op} {limit:g})")
    print("  info  first batch: " + (f"table {ft:.2f} s (create "
          f"{min(x['create'] for x in firsts):.2f} s) vs dict {fd:.2f} s" if ft else "n/a")
          + "; two writers (median): npcalls "
          + (f"{w_np:,.0f} ops/s, LMDB {w_lm:,.0f} ops/s" if w_np else "n/a"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
