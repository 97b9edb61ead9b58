"""Kamailio with and without npcalls recording: CPU per call and sipp response times.

The same proxy (examples/kamailio/kamailio.cfg, 4 UDP workers, acc and dialog
on) and the same Python routing script run twice per round, in the same run:
once recording every answered call with npcalls.kamailio.CallMonitor
(NPCALLS_RECORD=1), once routing identically without recording
(NPCALLS_RECORD=0).  Each pass starts a fresh Kamailio, places the same sipp
traffic (every 8th call rejected with 486) at a fixed rate, and measures:

* Kamailio's CPU time (user + system of the main process and every worker,
  from /proc) over the traffic, divided by the number of calls;
* sipp's response times: INVITE sent -> 200 received and BYE sent -> 200
  received, per call, from the UAC's own clock readings in microseconds (its
  -trace_rtt file only has whole milliseconds);
* failed calls (must be 0: the rate is below what the proxy sustains).

Rounds alternate the order of the two passes (ABBA) so that a trend in the
machine's background load hits both alike; the report gives per-round
numbers and the median.  The overhead is what recording adds per call (one
start on the 200, one stop on the BYE, each a Call-ID read through KSR and a
locked write into shared memory).

Usage:  .venv/bin/python bench/bench_kamailio.py [--quick] [--rate R] [--calls N]
                                                 [--rounds K] [--json FILE]
Needs kamailio, kamailio-python3-modules and sip-tester (scripts/install-system-deps.sh).
Runs only on 127.0.0.1; stops every process it starts.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import timeit
import types
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

_spec = importlib.util.spec_from_file_location("npcalls_kamailio_harness",
                                               REPO / "tests" / "kamailio" / "harness.py")
harness = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = harness
_spec.loader.exec_module(harness)

MODES = ("baseline", "npcalls")


def one_pass(mode: str, workdir: Path, args) -> dict:
    """Fresh Kamailio in `mode`, warm-up, then the measured traffic."""
    wd = workdir / f"{mode}-{time.monotonic_ns()}"
    with harness.Stack(wd, workers=args.workers, record=(mode == "npcalls"), trace=False,
                       table="bench-calls", capacity=max(65536, 4 * args.calls)) as st:
        warm = st.run_uac(args.warmup, min(args.rate, 200), args.call_ms, busy_every=8,
                          timeout=60, name="warmup")
        cpu0 = st.kamailio_cpu()
        t0 = time.monotonic()
        res = st.run_uac(args.calls, args.rate, args.call_ms, busy_every=8,
                         timeout=args.calls / args.rate + 60, name="uac",
                         limit=args.rate * 4)
        wall = time.monotonic() - t0
        cpu = st.kamailio_cpu() - cpu0
        recorded = None
        if mode == "npcalls":
            import npcalls
            os.environ["NPCALLS_DIR"] = str(wd)
            with npcalls.CallTable.open("bench-calls", readonly=True) as t:
                recorded = len(t)
        errors = harness.python_errors(st.log())
    inv, bye = (np.array(x, dtype=float) for x in res.response_ms())
    answered = len(res.completed_answered()) + len(warm.completed_answered())
    return {
        "mode": mode, "calls": res.created, "successful": res.successful,
        "failed": res.failed + max(0, warm.failed), "answered": answered,
        "recorded": recorded, "python_errors": len(errors),
        "rate": round(res.placing_rate(), 1), "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 3), "cpu_ms_per_call": cpu / max(res.created, 1) * 1e3,
        "invite_ms": _pct(inv), "bye_ms": _pct(bye), "_raw": (inv, bye),
    }


def _pct(a: np.ndarray) -> dict:
    if not len(a):
        return {}
    q = np.percentile(a, [50, 90, 99])
    return {"n": int(len(a)), "p50": float(q[0]), "p90": float(q[1]), "p99": float(q[2]),
            "max": float(a.max())}


def helper_cost_us(n: int = 20000) -> float:
    """In-process cost of start_monitoring + stop_monitoring (fake KSR), microseconds per call."""
    from npcalls import CallTable
    from npcalls.kamailio import CallMonitor
    d = tempfile.mkdtemp(prefix="npcalls-bench-kam-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    path = os.path.join(d, "calls")
    ksr = types.SimpleNamespace(vars={}, err=print, warn=print, info=print)
    ksr.pv = types.SimpleNamespace(get=lambda name: ksr.vars["$ci"])
    m = CallMonitor(path, capacity=4 * n, ksr=ksr)
    ids = [f"{i}-{os.getpid()}@127.0.0.1" for i in range(n)]

    def run():
        for cid in ids:
            ksr.vars["$ci"] = cid
            m.start_monitoring()
            m.stop_monitoring()

    secs = timeit.timeit(run, number=1)
    m.close()
    CallTable.unlink(path)
    os.rmdir(d)
    return secs / n * 1e6


def fmt_pct(p: dict) -> str:
    return (f"{p['p50']:6.2f} {p['p90']:6.2f} {p['p99']:7.2f} {p['max']:7.1f}" if p
            else "     -      -       -       -")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one short round (about 20 s)")
    ap.add_argument("--rate", type=float, default=None, help="calls/s (default 400, quick 300)")
    ap.add_argument("--calls", type=int, default=None, help="calls per pass (default 4000)")
    ap.add_argument("--rounds", type=int, default=None, help="ABBA rounds (default 3)")
    ap.add_argument("--call-ms", type=int, default=500, help="call length (ms)")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=100, help="calls before measuring")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    args.rate = args.rate or (300 if args.quick else 400)
    args.calls = args.calls or (1200 if args.quick else 4000)
    args.rounds = args.rounds or (1 if args.quick else 3)
    missing = harness.missing_programs()
    if missing:
        print("bench_kamailio: missing " + ", ".join(missing)
              + ": run scripts/install-system-deps.sh (as root)", file=sys.stderr)
        return 2

    print(f"Kamailio + npcalls benchmark: {args.rounds} round(s) x {len(MODES)} modes, "
          f"{args.calls} calls at {args.rate:g}/s, {args.call_ms} ms calls, 1 in 8 rejected "
          f"(486), {args.workers} workers; {platform.node()}, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.2f}")
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="npcalls-bench-kam-") as td:
        for r in range(args.rounds):
            order = MODES if r % 2 == 0 else MODES[::-1]
            for mode in order:
                res = one_pass(mode, Path(td), args)
                res["round"] = r + 1
                results.append(res)
                print(f"  round {r + 1} {mode:8s}: {res['cpu_ms_per_call'] * 1e3:7.1f} us CPU/call, "
                      f"{res['failed']} failed, rate {res['rate']:.0f}/s"
                      + (f", {res['recorded']} recorded" if res["recorded"] is not None else ""),
                      flush=True)

    print()
    print("                 Kamailio CPU      INVITE->200 ms (p50 p90 p99 max)   "
          "BYE->200 ms (p50 p90 p99 max)   failed")
    summary = {}
    for mode in MODES:
        rs = [x for x in results if x["mode"] == mode]
        cpu = statistics.median(x["cpu_ms_per_call"] for x in rs) * 1e3
        # response-time percentiles over every pass of the mode together
        inv = _pct(np.concatenate([x["_raw"][0] for x in rs]))
        bye = _pct(np.concatenate([x["_raw"][1] for x in rs]))
        failed = sum(x["failed"] for x in rs)
        summary[mode] = {"cpu_us_per_call": cpu, "invite_ms": inv, "bye_ms": bye, "failed": failed}
        print(f"  {mode:9s} {cpu:8.1f} us/call   {fmt_pct(inv)}        {fmt_pct(bye)}      {failed}")
    base, rec = summary["baseline"]["cpu_us_per_call"], summary["npcalls"]["cpu_us_per_call"]
    per_round = []
    for r in range(1, args.rounds + 1):
        b = next(x for x in results if x["round"] == r and x["mode"] == "baseline")
        n = next(x for x in results if x["round"] == r and x["mode"] == "npcalls")
        per_round.append((n["cpu_ms_per_call"] - b["cpu_ms_per_call"]) * 1e3)
    helper = helper_cost_us()
    spread = {m: [x["cpu_ms_per_call"] * 1e3 for x in results if x["mode"] == m] for m in MODES}
    print()
    print(f"  overhead of recording: {rec - base:+.1f} us CPU per call "
          f"({(rec - base) / base * 100:+.1f}% of the proxy's {base:.0f} us); per round: "
          + ", ".join(f"{x:+.1f}" for x in per_round) + " us")
    if args.rounds > 1:
        noise = max(max(v) - min(v) for v in spread.values())
        print(f"  pass-to-pass spread of the same mode: up to {noise:.1f} us per call "
              f"(the machine's noise: a smaller overhead is not resolved by this run)")
    print(f"  the helper alone (start_monitoring + stop_monitoring, in process): {helper:.1f} us per call")
    ok = all(x["failed"] == 0 and x["python_errors"] == 0 for x in results) and all(
        x["recorded"] == x["answered"] for x in results if x["mode"] == "npcalls")
    print(f"  every pass: 0 failed calls, no Python error, every answered call recorded: "
          f"{'yes' if ok else 'NO'}")
    for x in results:
        del x["_raw"]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "passes": results, "summary": summary,
                       "overhead_us_per_call": rec - base, "overhead_per_round_us": per_round,
                       "helper_us_per_call": helper}, f, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
