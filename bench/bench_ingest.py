#!/usr/bin/env python3
"""Benchmark the log loaders: acc logs and CSV CDRs into a table, end to end.

Generates a realistic Kamailio acc log (answered calls with re-INVITEs and
callee-side BYEs, rejected, cancelled and challenged calls, dialog CDRs for
every dialog, script and error lines quoting Call-IDs, workers' clocks a few
ms apart), then measures in the same run:

* ``npcalls.ingest.ingest`` into a fresh table (lines/s, end to end: reading,
  parsing, writing the table);
* a straightforward per-line Python parser feeding a dict (the baseline: the
  same semantics, the code one writes first);
* CSV CDRs (``call_id,start,end,duration_s,state`` as ``npcalls dump``
  writes them, ISO 8601 times; and epoch-ns times) into a fresh table
  (rows/s), and the CSV parser alone.

Each measurement is the best of ``--repeat`` runs (the machine may be busy).

Usage::

    python bench/bench_ingest.py            # 1M lines
    python bench/bench_ingest.py --quick    # 100k lines
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import npcalls  # noqa: E402
from npcalls.ingest import acc, ingest  # noqa: E402
from npcalls.ingest.sources import open_source  # noqa: E402
from npcalls.ingest.tabular import TabularParser  # noqa: E402

T0 = 1795668428.0


# ---------------------------------------------------------------------- generation

def generate(path: str, n_lines: int, seed: int = 7) -> dict:
    """Write a realistic acc log of about ``n_lines`` lines; return what it holds."""
    rnd = random.Random(seed)
    events: list[tuple[float, str]] = []
    calls = 0
    t = T0
    i = 0
    pids = [13750 + r for r in range(1, 9)]

    def pfx(mod: str = "acc [acc.c:268]: acc_log_request(): ") -> str:
        r = rnd.randrange(8)
        return f" {r + 1}({pids[r]}) NOTICE: {mod}"

    def acc(kind: str, ts: float, method: str, cid: str, code: int, reason: str,
            ft: str, tt: str) -> str:
        return (pfx() + f"ACC: {kind}: timestamp={int(ts)};t_ms={ts:.3f};method={method};"
                f"from_tag={ft};to_tag={tt};call_id={cid};code={code};reason={reason};"
                f"src_user=alice;src_domain=example.com;src_ip=10.0.0.{rnd.randrange(1, 250)};"
                f"dst_ouser=bob;dst_user=bob;dst_domain=example.com;ua=Phone/{rnd.randrange(9)}.1;"
                f"pid={rnd.choice(pids)}")

    def cdr(st: float, en: float, cid: str) -> str:
        dur = "0" if st == en else f"{en - st:.3f}"
        return (pfx("acc [acc_cdr.c:395]: log_write_cdr(): ")
                + f"start_time={st:.3f}; end_time={en:.3f}; duration={dur}; call_id={cid}; "
                  f"src_user=alice")

    while len(events) < n_lines:
        i += 1
        t += rnd.expovariate(300.0)
        if rnd.random() < 0.05:             # a UUID-style Call-ID from another UA
            cid = f"{rnd.getrandbits(128):032x}-{rnd.getrandbits(32):08x}@pbx{i % 7}.example.com"
        else:
            cid = f"{i}-{pids[i % 8]}@10.0.0.{i % 250}"
        ft, tt = f"{i}SIPpTag00{i % 10}", f"{i}SIPpTag01{i % 10}"
        r = rnd.random()
        if r < 0.62 or 0.92 <= r < 0.97:
            if r >= 0.92:                     # challenged first
                events.append((t, acc("call missed", t, "INVITE", cid, 407,
                                      "Proxy Authentication Required", ft, "")))
                events.append((t, acc("transaction answered", t, "INVITE", cid, 407,
                                      "Proxy Authentication Required", ft, "")))
                events.append((t, cdr(t, t, cid)))
                t2 = t + 0.04
            else:
                t2 = t
            d = rnd.uniform(1.0, 240.0)
            calls += 1
            events.append((t2, acc("transaction answered", t2, "INVITE", cid, 200, "OK", ft, tt)))
            if rnd.random() < 0.05:
                tr = t2 + d / 2
                events.append((tr, acc("transaction answered", tr, "INVITE", cid, 200, "OK",
                                       ft, tt)))
            te = t2 + d
            if rnd.random() < 0.3:            # the callee hangs up
                events.append((te, acc("transaction answered", te, "BYE", cid, 200, "OK", tt, ft)))
            else:
                events.append((te, acc("transaction answered", te, "BYE", cid, 200, "OK", ft, tt)))
            events.append((te - 0.004, cdr(t2 + 0.004, te - 0.004, cid)))
        elif r < 0.77:                        # busy / rejected
            code, why = rnd.choice([(486, "Busy Here"), (480, "Temporarily Unavailable"),
                                    (404, "Not Found"), (603, "Decline")])
            events.append((t, acc("call missed", t, "INVITE", cid, code, why, ft, "")))
            events.append((t, acc("transaction answered", t, "INVITE", cid, code, why, ft, "")))
            events.append((t, cdr(t, t, cid)))
        elif r < 0.87:                        # cancelled
            tc = t + rnd.uniform(1, 20)
            events.append((tc, acc("call missed", tc, "INVITE", cid, 487, "Request Terminated",
                                   ft, "")))
            events.append((tc, acc("transaction answered", tc, "INVITE", cid, 487,
                                   "Request Terminated", ft, "")))
            events.append((tc, acc("transaction answered", tc, "CANCEL", cid, 200, "OK", ft, "")))
            events.append((tc, cdr(t, t, cid)))
        else:                                 # noise quoting Call-IDs
            if rnd.random() < 0.5:
                events.append((t, f" 3(13753) INFO: <script>: INVITE from sip:alice@example.com "
                                  f"call_id={cid} code=200 ru=sip:bob@example.com"))
            else:
                events.append((t, f" 5(13755) ERROR: tm [t_reply.c:641]: bad reply "
                                  f"Call-ID: {cid} CSeq: 1 INVITE"))
    # each worker logs on its own; lines of different workers cross by a few ms
    events.sort(key=lambda e: e[0] + rnd.uniform(-0.003, 0.003))
    events = events[:n_lines]
    with open(path, "w") as f:
        for _, line in events:
            f.write(line)
            f.write("\n")
    return {"lines": len(events), "answered_calls": calls}


REAL = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", f)
        for f in ("kamailio-acc.log", "kamailio-acc-syslog.log")]


def replay(path: str, n_lines: int) -> int:
    """Repeat the real Kamailio lines of tests/data to ``n_lines`` lines (new Call-IDs per round).

    Each round prefixes every Call-ID with ``r<round>.``, so that rounds are
    new calls rather than repeats of the same 2,000.
    """
    import re
    src = [ln for f in REAL for ln in open(f, "rb").read().splitlines(keepends=True)]
    rx = re.compile(rb"(call_id=)")
    n = 0
    with open(path, "wb") as out:
        r = 0
        while n < n_lines:
            take = src[:n_lines - n]
            out.write(rx.sub(b"\\1r%d." % r, b"".join(take)))
            n += len(take)
            r += 1
    return n


def cli_ingest(log: str, jobs: int, cap: int, fmt: str = "acc") -> float:
    """Seconds of ``npcalls ingest --create`` in a fresh process (interpreter start included)."""
    import subprocess
    name = f"cli{os.getpid()}-{time.monotonic_ns()}"
    cmd = [sys.executable, "-m", "npcalls", "ingest", "--create", "--capacity", str(cap),
           "--key-width", "64", "--jobs", str(jobs), "--format", fmt, "-q", name, log]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    dt = time.perf_counter() - t0
    npcalls.CallTable.unlink(name)
    return dt


def where_time_goes(log: str, cap: int) -> dict:
    """Split one in-process load into reading, parsing and writing the table (seconds).

    The three phases run one after the other in one pass (the loader takes
    the parsed chunks as ``ingest`` hands them over), so their sum is a load.
    """
    from npcalls.ingest import Loader
    from npcalls.ingest.acc import AccParser
    t0 = time.perf_counter()
    with open_source(log) as src:
        chunks = list(src.chunks())
    t_read = time.perf_counter() - t0
    p = AccParser(key_width=64)
    t0 = time.perf_counter()
    parts = [p.parse(c) for c in chunks]
    t_parse = time.perf_counter() - t0
    del chunks
    # what --jobs adds in the parent: each worker's parsed chunks cross the
    # process boundary pickled (dumps in the worker, loads here)
    import pickle
    t0 = time.perf_counter()
    blobs = [pickle.dumps(x, pickle.HIGHEST_PROTOCOL) for x in parts]
    t_dumps = time.perf_counter() - t0
    t0 = time.perf_counter()
    parts = [pickle.loads(b) for b in blobs]
    t_loads = time.perf_counter() - t0
    handed = sum(map(len, blobs))
    del blobs
    name = f"split{os.getpid()}-{time.monotonic_ns()}"
    t = npcalls.CallTable.create(name, capacity=cap, key_width=64)
    try:
        t0 = time.perf_counter()
        loader = Loader(t)
        for x in parts:
            loader.add(x)
        loader.close()
        t_write = time.perf_counter() - t0
    finally:
        t.close()
        npcalls.CallTable.unlink(name)
    return dict(read=t_read, parse=t_parse, write=t_write, total=t_read + t_parse + t_write,
                pickle_dumps=t_dumps, pickle_loads=t_loads, handed_bytes=handed)


def paper_speedup(w: dict, fixed: float, cores: int) -> float:
    """The speedup of ``--jobs cores`` on ``cores`` idle cores, from where one pass's time goes.

    Workers read and parse their ranges (and pickle the results); the parent
    unpickles them, folds and writes the table, which no worker can do for
    it.  The loader writes a batch once it holds ``DEFAULT_BATCH`` (500,000)
    event rows, and a million log lines give about that many: the fold and
    the write come after the last range is parsed, so they add to the
    parallel part instead of overlapping it.  ``fixed`` (the interpreter,
    imports, creating the table) is paid once.  Memory bandwidth shared by
    the cores, the page cache and starting the workers are not modelled: a
    paper figure, an upper bound for this input.
    """
    one = fixed + w["total"]
    par = w["read"] + w["parse"] + w["pickle_dumps"]
    ser = w["write"] + w["pickle_loads"]
    return one / (fixed + ser + par / cores)


def numpy_path(log: str, cap: int):
    """:func:`_ingest_in_process` with one job and the compiled scanner off."""
    saved = acc.USE_SCAN
    acc.USE_SCAN = False
    try:
        return _ingest_in_process(log, cap, 1)
    finally:
        acc.USE_SCAN = saved


def _ingest_in_process(log: str, cap: int, jobs: int):
    name = f"inp{os.getpid()}-{time.monotonic_ns()}"
    t = npcalls.CallTable.create(name, capacity=cap, key_width=64)
    try:
        return ingest(t, [log], jobs=jobs)
    finally:
        t.close()
        npcalls.CallTable.unlink(name)


# ---------------------------------------------------------------------- the baseline

def baseline(path: str) -> dict:
    """A straightforward per-line parser: split each acc line into a dict of fields."""
    calls: dict[str, list] = {}
    cdrs: dict[str, tuple] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            i = line.find("ACC: ")
            if i >= 0:
                kind, _, rest = line[i + 5:].partition(": ")
                fields = dict(kv.split("=", 1) for kv in rest.rstrip("\r\n").split(";")
                              if "=" in kv)
                if kind == "call missed":
                    continue
                try:
                    method, code, cid = fields["method"], int(fields["code"]), fields["call_id"]
                    ts = fields.get("t_ms") or fields["timestamp"]
                    t = int(round(float(ts) * 1e6)) * 1000
                except (KeyError, ValueError):
                    continue
                if not 200 <= code < 300:
                    continue
                if method == "INVITE":
                    c = calls.setdefault(cid, [None, None])
                    if c[0] is None:
                        c[0] = t
                elif method == "BYE":
                    c = calls.setdefault(cid, [None, None])
                    if c[1] is None:
                        c[1] = t
                continue
            j = line.find(" start_time=")
            if j >= 0:
                fields = dict(kv.strip().split("=", 1) for kv in line[j:].split(";")
                              if "=" in kv)
                try:
                    if float(fields["duration"]) == 0:
                        continue
                    cdrs[fields["call_id"].strip()] = (
                        int(round(float(fields["start_time"]) * 1e6)) * 1000,
                        int(round(float(fields["end_time"]) * 1e6)) * 1000)
                except (KeyError, ValueError):
                    continue
    for cid, (st, en) in cdrs.items():          # a CDR fills what the acc lines lack
        c = calls.setdefault(cid, [None, None])
        if c[0] is None:
            c[0] = st
        if c[1] is None:
            c[1] = en
    return calls


# ---------------------------------------------------------------------- CSV

def write_csv(path: str, n: int, epoch_ns: bool, seed: int = 3) -> int:
    """``n`` CDRs as ``npcalls dump`` writes them (a tenth of the calls still active)."""
    from npcalls.export import write_csv as _w
    from npcalls.layout import snapshot_dtype
    rng = np.random.default_rng(seed)
    snap = np.empty(n, snapshot_dtype(64))
    ids = rng.integers(0, 1 << 40, n)
    snap["key"] = np.char.add(np.char.add(np.arange(n).astype("S10"), b"-"),
                              np.char.add(np.char.mod(b"%x", ids).astype("S12"),
                                          b"@10.0.0.1"))
    start = int(T0 * 1e9) + np.sort(rng.integers(0, 86_400 * 10**9, n))
    start -= start % 1000                           # dump writes microseconds
    snap["start"] = start
    end = start + rng.integers(10**9, 600 * 10**9, n) // 1000 * 1000
    snap["end"] = np.where(rng.random(n) < 0.1, npcalls.NOT_SET, end)
    with open(path, "w", newline="") as f:
        return _w(snap, f, epoch_ns=epoch_ns)


def csv_parse_only(path: str) -> int:
    p = TabularParser("csv")
    n = 0
    line = 0
    with open_source(path) as src:
        for chunk in src.chunks():
            r = p.parse(chunk, line, path)
            line += r.lines
            n += r.records
    return n


# ---------------------------------------------------------------------- measuring

def best(fn, repeat: int) -> tuple[float, object]:
    times = []
    out = None
    for _ in range(repeat):
        gc.collect()
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--quick", action="store_true", help="100k lines, one run each")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    a = ap.parse_args(argv)
    if a.quick:
        a.lines, a.repeat = 100_000, 1
    work = tempfile.mkdtemp(prefix="npcalls-bench-ingest-")
    shm = tempfile.mkdtemp(prefix="npcalls-bench-ingest-", dir="/dev/shm"
                           if os.path.isdir("/dev/shm") else None)
    os.environ["NPCALLS_DIR"] = shm
    res: dict = {}
    try:
        log = os.path.join(work, "acc.log")
        t0 = time.perf_counter()
        info = generate(log, a.lines)
        size = os.path.getsize(log)
        print(f"generated {info['lines']:,} lines ({size / 1e6:.0f} MB, "
              f"{info['answered_calls']:,} answered calls) in {time.perf_counter() - t0:.1f} s")
        n = info["lines"]
        cap = max(1024, info["answered_calls"] * 2)

        def ours_on(path, cp, jobs):
            return _ingest_in_process(path, cp, jobs)

        inputs = [("generated", log, n, cap)]
        rp = os.path.join(work, "replay.log")
        nr = replay(rp, a.lines)
        inputs.append(("real Kamailio lines replayed", rp, nr, max(1024, nr)))
        res["acc"] = {}
        for label, path, nl, cp in inputs:
            tb, calls = best(lambda: baseline(path), a.repeat)
            to, summ = best(lambda: ours_on(path, cp, 1), a.repeat)
            tn, _ = best(lambda: numpy_path(path, cp), a.repeat)
            load_b = os.getloadavg()[0]
            tc1, _ = best(lambda: cli_ingest(path, 1, cp), a.repeat)
            load_1 = os.getloadavg()[0]
            tc2, _ = best(lambda: cli_ingest(path, 2, cp), a.repeat)
            load_2 = os.getloadavg()[0]
            ended = sum(1 for c in calls.values() if c[0] is not None and c[1] is not None)
            print(f"\nacc log ({label}), {nl:,} lines, {os.path.getsize(path) / 1e6:.0f} MB:")
            from npcalls.ingest.parallel import PARALLEL_MIN
            small = os.path.getsize(path) < PARALLEL_MIN
            print(f"  npcalls ingest CLI, --jobs 1   {tc1:7.2f} s  {nl / tc1:>12,.0f} lines/s   "
                  f"(fresh process: start, create, read, parse, write; load {load_1:.1f})")
            print(f"  npcalls ingest CLI, --jobs 2   {tc2:7.2f} s  {nl / tc2:>12,.0f} lines/s   "
                  f"speedup {tc1 / tc2:.2f}x (load {load_2:.1f})"
                  + ("  [file below PARALLEL_MIN: one process]" if small else ""))
            print(f"  ingest() in-process, 1 job     {to:7.2f} s  {nl / to:>12,.0f} lines/s   "
                  f"[{summ.started:,} started, {summ.ended:,} ended, {summ.end_only:,} end-only]"
                  f" ({'compiled scanner' if acc.USE_SCAN else 'numpy path: scanner not built'})")
            print(f"  ingest() in-process, numpy     {tn:7.2f} s  {nl / tn:>12,.0f} lines/s   "
                  f"(NPCALLS_INGEST_NUMPY=1: the parser without the compiled scanner)")
            print(f"  per-line Python -> dict        {tb:7.2f} s  {nl / tb:>12,.0f} lines/s   "
                  f"[{len(calls):,} calls, {ended:,} ended] (load {load_b:.1f})")
            print(f"  ratio CLI --jobs 1 / per-line  {tb / tc1:7.1f}x")
            if summ.started != sum(1 for c in calls.values() if c[0] is not None):
                print("  WARNING: the two parsers disagree on the number of started calls")
            w = where_time_goes(path, cp)
            fixed = max(0.0, tc1 - w["total"])    # start, imports, create: the CLI's own cost
            est2 = paper_speedup(w, fixed, 2)
            est16 = paper_speedup(w, fixed, 16)
            print(f"  where the time goes (in-process, one pass): read {w['read']:.2f} s, parse "
                  f"{w['parse']:.2f} s, fold + table writes {w['write']:.2f} s; hand-over to "
                  f"the parent with --jobs: pickle {w['pickle_dumps']:.2f} s in the workers, "
                  f"unpickle {w['pickle_loads']:.2f} s in the parent "
                  f"({w['handed_bytes'] / 1e6:.0f} MB); fixed cost of the CLI {fixed:.2f} s")
            print(f"  on paper (idle cores, see paper_speedup): 2 cores {est2:.2f}x, "
                  f"16 cores {est16:.1f}x one core; measured 2 jobs {tc1 / tc2:.2f}x "
                  f"at load {load_2:.1f}")
            res["acc"][label] = dict(
                lines=nl, cli_jobs1_seconds=tc1, cli_jobs1_lines_per_s=nl / tc1,
                cli_jobs2_seconds=tc2, jobs2_speedup=tc1 / tc2, seconds=to,
                numpy_path_seconds=tn, compiled_scanner=acc.USE_SCAN,
                lines_per_s=nl / to, baseline_seconds=tb, baseline_lines_per_s=nl / tb,
                ratio=tb / tc1, ratio_in_process=tb / to, time=w, est16_speedup=est16,
                est2_speedup=est2, cli_fixed_seconds=fixed,
                load=dict(baseline=load_b, jobs1=load_1, jobs2=load_2))
        jobs = 1

        # CSV CDRs, as `npcalls dump` writes them
        n_csv = n
        for label, epoch_ns in (("ISO 8601", False), ("epoch ns", True)):
            csv_path = os.path.join(work, f"cdr-{'ns' if epoch_ns else 'iso'}.csv")
            rows = write_csv(csv_path, n_csv, epoch_ns)
            k = [0]

            def load_csv():
                k[0] += 1
                name = f"csv{k[0]}"
                tt = npcalls.CallTable.create(name, capacity=2 * rows, key_width=64)
                try:
                    return ingest(tt, [csv_path], jobs=jobs)
                finally:
                    tt.close()
                    npcalls.CallTable.unlink(name)

            def insert_only():
                # what the table alone costs for these rows (the floor of any loader)
                k[0] += 1
                name = f"ins{k[0]}"
                tt = npcalls.CallTable.create(name, capacity=2 * rows, key_width=64)
                try:
                    tt.record_many(keys, st, en)
                finally:
                    tt.close()
                    npcalls.CallTable.unlink(name)

            tc, s = best(load_csv, a.repeat)
            tp, nparsed = best(lambda: csv_parse_only(csv_path), a.repeat)
            p = TabularParser("csv")
            with open_source(csv_path) as src:
                parts = [p.parse(c) for c in src.chunks()]
            keys = np.concatenate([x.acc_keys for x in parts])
            st = np.concatenate([x.acc_start for x in parts])
            en = np.concatenate([x.acc_end for x in parts])
            ti, _ = best(insert_only, a.repeat)
            tcli, _ = best(lambda: cli_ingest(csv_path, 1, 2 * rows, "csv"), a.repeat)
            print(f"\nCSV CDRs ({label} times), {rows:,} rows (load {os.getloadavg()[0]:.1f}):")
            print(f"  npcalls ingest (end to end)   {tc:7.2f} s  {rows / tc:>12,.0f} rows/s   "
                  f"[{s.records:,} rows loaded]")
            print(f"  npcalls ingest CLI             {tcli:7.2f} s  {rows / tcli:>12,.0f} rows/s   "
                  f"(fresh process)")
            print(f"  CSV parsing alone             {tp:7.2f} s  {rows / tp:>12,.0f} rows/s")
            print(f"  table record_many alone       {ti:7.2f} s  {rows / ti:>12,.0f} rows/s")
            res[f"csv_{'ns' if epoch_ns else 'iso'}"] = dict(
                rows=rows, seconds=tc, rows_per_s=rows / tc, cli_seconds=tcli,
                cli_rows_per_s=rows / tcli, parse_seconds=tp,
                parse_rows_per_s=rows / tp, insert_seconds=ti, insert_rows_per_s=rows / ti)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(res, f, indent=2)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
