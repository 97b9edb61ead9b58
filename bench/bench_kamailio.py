"""Kamailio with and without npcalls recording: CPU per call and sipp response times.

Three proxies, each measured with and without recording, in the same run:

* ``kemi``: examples/kamailio/kamailio.cfg (4 UDP workers, acc and dialog
  on) whose routing is the Python (KEMI) script; once recording every
  answered call with npcalls.kamailio.CallMonitor (NPCALLS_RECORD=1), once
  routing identically without recording (NPCALLS_RECORD=0);
* ``native``: examples/kamailio-native/kamailio.cfg, routing in Kamailio's
  own language, recording with python_exec("start_monitoring") on the 2xx
  and python_exec("stop_monitoring") on the BYE; the baseline is the same
  config without the monitoring lines (NO_NPCALLS: app_python3 not loaded);
* ``native-dialog``: the same with WITH_DIALOG_EVENTS (dialog module on in
  both passes, recording from event_route[dialog:start] / [dialog:end]).  Each pass starts a fresh Kamailio, places the same sipp
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

For the native configs the recording pass also pays for app_python3 itself
(loading the embedded interpreter, one python_exec per start and per stop),
which the baseline does not load at all: the overhead shown is everything
monitoring adds to a native config.  The helpers' own in-process cost (fake
KSR, no Kamailio) is printed at the end.

Usage:  .venv/bin/python bench/bench_kamailio.py [--quick] [--rate R] [--calls N]
                                                 [--rounds K] [--configs kemi,native,native-dialog]
                                                 [--json FILE]
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
                                               REPO / "tests" / "helpers" / "kamailio_harness.py")
harness = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = harness
_spec.loader.exec_module(harness)

MODES = ("baseline", "npcalls")


def one_pass(mode: str, workdir: Path, args, config: str = "kemi") -> dict:
    """Fresh Kamailio running `config` in `mode`, warm-up, then the measured traffic."""
    wd = workdir / f"{config}-{mode}-{time.monotonic_ns()}"
    with harness.Stack(wd, workers=args.workers, record=(mode == "npcalls"), trace=False,
                       table="bench-calls", capacity=max(65536, 4 * args.calls),
                       config=config) as st:
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
        "config": config, "mode": mode, "calls": res.created, "successful": res.successful,
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


HELPERS = {
    "kemi": "CallMonitor.start_monitoring + stop_monitoring ($ci via KSR), bounded lock wait",
    "kemi-unbounded": "the same with lock_timeout=None (blocking lock, as before the bound)",
    "native": "KamailioScript.start_monitoring + stop_monitoring (python_exec's methods)",
    "native-arg": "the same with the Call-ID as argument ($dlg(callid), the dialog variant)",
}


def helper_cost_us(kind: str = "kemi", n: int = 20000, repeat: int = 5) -> float:
    """In-process cost of one start + one stop (fake KSR), microseconds per call.

    The best of ``repeat`` runs of ``n`` new calls each (the machine's other
    work only ever adds time)."""
    from npcalls import CallTable
    from npcalls.kamailio import CallMonitor, script_from_environ
    d = tempfile.mkdtemp(prefix="npcalls-bench-kam-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    path = os.path.join(d, "calls")
    ksr = types.SimpleNamespace(vars={}, err=print, warn=print, info=print)
    ksr.pv = types.SimpleNamespace(get=lambda name: ksr.vars["$ci"])
    batches = [[f"{r}-{i}-{os.getpid()}@127.0.0.1" for i in range(n)] for r in range(repeat)]
    ids: list[str] = []
    cap = str(2 * n * repeat)
    if kind.startswith("native"):
        obj = script_from_environ({"NPCALLS_TABLE": path, "NPCALLS_CAPACITY": cap}, ksr=ksr)
        m = obj.monitor
        arg = kind == "native-arg"

        def run():
            for cid in ids:
                if arg:
                    obj.start_monitoring(None, cid)
                    obj.stop_monitoring(None, cid)
                else:
                    ksr.vars["$ci"] = cid
                    obj.start_monitoring(None)
                    obj.stop_monitoring(None)
    else:
        m = CallMonitor(path, capacity=int(cap), ksr=ksr,
                        lock_timeout=None if kind == "kemi-unbounded" else 0.05)

        def run():
            for cid in ids:
                ksr.vars["$ci"] = cid
                m.start_monitoring()
                m.stop_monitoring()

    best = float("inf")
    for batch in batches:
        ids[:] = batch
        best = min(best, timeit.timeit(run, number=1))
    assert m.stats["started"] == n * repeat == m.stats["stopped"], m.stats
    m.close()
    CallTable.unlink(path)
    os.rmdir(d)
    return best / n * 1e6


def fmt_pct(p: dict) -> str:
    return (f"{p['p50']:6.2f} {p['p90']:6.2f} {p['p99']:7.2f} {p['max']:7.1f}" if p
            else "     -      -       -       -")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one short round per config")
    ap.add_argument("--rate", type=float, default=None, help="calls/s (default 400, quick 300)")
    ap.add_argument("--calls", type=int, default=None, help="calls per pass (default 4000)")
    ap.add_argument("--rounds", type=int, default=None, help="ABBA rounds (default 3)")
    ap.add_argument("--call-ms", type=int, default=500, help="call length (ms)")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=100, help="calls before measuring")
    ap.add_argument("--configs", default="kemi,native,native-dialog",
                    help="comma-separated, from: " + ", ".join(harness.CONFIGS))
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    args.rate = args.rate or (300 if args.quick else 400)
    args.calls = args.calls or (1200 if args.quick else 4000)
    args.rounds = args.rounds or (1 if args.quick else 3)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [c for c in configs if c not in harness.CONFIGS]
    if bad or not configs:
        ap.error(f"--configs: unknown {bad}; choose from {', '.join(harness.CONFIGS)}")
    missing = harness.missing_programs()
    if missing:
        print("bench_kamailio: missing " + ", ".join(missing)
              + ": run scripts/install-system-deps.sh (as root)", file=sys.stderr)
        return 2

    print(f"Kamailio + npcalls benchmark: {', '.join(configs)}; {args.rounds} round(s) x "
          f"{len(MODES)} modes, {args.calls} calls at {args.rate:g}/s, {args.call_ms} ms calls, "
          f"1 in 8 rejected (486), {args.workers} workers; {platform.node()}, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f} (other work on the machine "
          f"adds noise to every figure)")
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="npcalls-bench-kam-") as td:
        for r in range(args.rounds):
            for config in configs:
                order = MODES if r % 2 == 0 else MODES[::-1]
                for mode in order:
                    res = one_pass(mode, Path(td), args, config)
                    res["round"] = r + 1
                    results.append(res)
                    print(f"  round {r + 1} {config:13s} {mode:8s}: "
                          f"{res['cpu_ms_per_call'] * 1e3:7.1f} us CPU/call, "
                          f"{res['failed']} failed, rate {res['rate']:.0f}/s"
                          + (f", {res['recorded']} recorded" if res["recorded"] is not None else ""),
                          flush=True)

    helpers = {k: helper_cost_us(k) for k in HELPERS}
    summary: dict = {}
    for config in configs:
        print()
        print(f"  {config}: Kamailio CPU      INVITE->200 ms (p50 p90 p99 max)   "
              "BYE->200 ms (p50 p90 p99 max)   failed")
        summary[config] = {}
        for mode in MODES:
            rs = [x for x in results if x["mode"] == mode and x["config"] == config]
            cpu = statistics.median(x["cpu_ms_per_call"] for x in rs) * 1e3
            inv = _pct(np.concatenate([x["_raw"][0] for x in rs]))
            bye = _pct(np.concatenate([x["_raw"][1] for x in rs]))
            failed = sum(x["failed"] for x in rs)
            summary[config][mode] = {"cpu_us_per_call": cpu, "invite_ms": inv, "bye_ms": bye,
                                     "failed": failed}
            print(f"  {mode:9s} {cpu:8.1f} us/call   {fmt_pct(inv)}        {fmt_pct(bye)}      {failed}")
        base = summary[config]["baseline"]["cpu_us_per_call"]
        rec = summary[config]["npcalls"]["cpu_us_per_call"]
        per_round = []
        for r in range(1, args.rounds + 1):
            b = next(x for x in results if x["round"] == r and x["mode"] == "baseline"
                     and x["config"] == config)
            n = next(x for x in results if x["round"] == r and x["mode"] == "npcalls"
                     and x["config"] == config)
            per_round.append((n["cpu_ms_per_call"] - b["cpu_ms_per_call"]) * 1e3)
        summary[config]["overhead_us_per_call"] = rec - base
        summary[config]["overhead_per_round_us"] = per_round
        print(f"  overhead of recording: {rec - base:+.1f} us CPU per call "
              f"({(rec - base) / base * 100:+.1f}% of the proxy's {base:.0f} us); per round: "
              + ", ".join(f"{x:+.1f}" for x in per_round) + " us")
        if args.rounds > 1:
            spread = [[x["cpu_ms_per_call"] * 1e3 for x in results
                       if x["mode"] == m and x["config"] == config] for m in MODES]
            noise = max(max(v) - min(v) for v in spread)
            print(f"  pass-to-pass spread of the same mode: up to {noise:.1f} us per call "
                  f"(the machine's noise: a smaller overhead is not resolved by this run)")
    print()
    print("  the helper alone, in process (one start + one stop per call):")
    for k, us in helpers.items():
        print(f"    {k:15s} {us:6.1f} us   {HELPERS[k]}")
    ok = all(x["failed"] == 0 and x["python_errors"] == 0 for x in results) and all(
        x["recorded"] == x["answered"] for x in results if x["mode"] == "npcalls")
    print(f"  every pass: 0 failed calls, no Python error, every answered call recorded: "
          f"{'yes' if ok else 'NO'}")
    for x in results:
        del x["_raw"]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "passes": results, "summary": summary,
                       "helper_us_per_call": helpers}, f, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
