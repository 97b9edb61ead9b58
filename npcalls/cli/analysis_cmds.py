"""Verbs for watching and feeding live tables: top, simulate.

Both import their heavy parts (rich, the simulator's multiprocessing) only
when run, so ``npcalls --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ._common import (
    CliError,
    add_table_arg,
    duration_arg,
    need_extra,
    no_table_message,
    open_table,
    positive_int,
)


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return v


def _interval(text: str) -> float:
    ns = duration_arg(text)
    if ns <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return ns / 1e9


def register(sub: Any) -> None:
    p = sub.add_parser(
        "top", help="watch a table live: counts, calls/s, concurrency, longest calls",
        description="A live view of a table, refreshed in place: counts, starts/s and ends/s "
                    "(from the table's lifetime counters), calls up now with their history and "
                    "peak, and the longest active calls. Read-only, lock-free: never slows the "
                    "writers. q or Ctrl-C quits. With --once, or when stdout is not a "
                    "terminal, prints one frame and exits.")
    add_table_arg(p)
    p.add_argument("--interval", "-n", type=_interval, default=1.0, metavar="DURATION",
                   help="time between refreshes, e.g. 1s, 500ms (default 1s)")
    p.add_argument("--rows", type=int, default=10, help="longest active calls shown (default 10)")
    p.add_argument("--once", action="store_true", help="print one frame and exit")
    p.set_defaults(func=cmd_top)

    p = sub.add_parser(
        "simulate", help="generate live calls (Poisson arrivals, random holds) for demos",
        description="Write simulated traffic to a table through the public API from several "
                    "processes: Poisson arrivals at --cps calls/s, each call held for an "
                    "exponential or lognormal time of mean --mean-hold. --speedup F runs the "
                    "simulated clock F times faster (cps*F calls per wall second, holds / F); "
                    "recorded times are real wall-clock times. Stops after --duration, on "
                    "Ctrl-C or on SIGTERM, hanging up the calls in progress. Exit 1 if calls "
                    "were rejected because the table was full.")
    add_table_arg(p)
    p.add_argument("--cps", type=_positive_float, default=200.0,
                   help="call arrivals per (simulated) second (default 200)")
    p.add_argument("--mean-hold", type=duration_arg, default=90 * 10**9, metavar="DURATION",
                   help="mean call duration, e.g. 90s, 3m (default 90s)")
    p.add_argument("--hold-dist", choices=("exp", "lognormal"), default="exp",
                   help="distribution of call durations (default exp)")
    p.add_argument("--hold-sigma", type=_positive_float, default=1.0,
                   help="sigma of the lognormal's log (default 1.0)")
    p.add_argument("--duration", type=duration_arg, default=60 * 10**9, metavar="DURATION",
                   help="wall-clock run time (default 60s; 0 runs until Ctrl-C / SIGTERM)")
    p.add_argument("--speedup", type=_positive_float, default=1.0, metavar="F",
                   help="run the simulated clock F times faster (default 1)")
    p.add_argument("--workers", type=positive_int, default=2,
                   help="writer processes (default 2)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    p.add_argument("--on-exit", choices=("hangup", "leave"), default="hangup",
                   help="at the end, end the calls in progress (default) or leave them active")
    p.add_argument("--expire-after", type=duration_arg, default=None, metavar="DURATION",
                   help="remove ended calls this long after their end (keeps long runs from "
                        "filling the table)")
    p.add_argument("--create", action="store_true",
                   help="create the table if it does not exist")
    p.add_argument("--capacity", type=positive_int, default=None,
                   help="slots for --create (default: enough for the whole run at load 0.6)")
    p.add_argument("--json", action="store_true", help="print the run's totals as JSON on stdout")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress line on stderr")
    p.set_defaults(func=cmd_simulate)


def cmd_top(a: argparse.Namespace) -> int:
    need_extra("rich")
    from ..top import run_top
    with open_table(a.table, readonly=True) as t:
        return run_top(t, interval=a.interval, rows=a.rows, once=a.once)


def _progress_line(s: Any, elapsed: float) -> None:
    print(f"\r{elapsed:6.0f} s  {s.active:>9,} active  {s.n_started:>11,} started  "
          f"{s.n_stopped:>11,} ended  load {s.load_factor:6.1%}", end="", file=sys.stderr,
          flush=True)


def cmd_simulate(a: argparse.Namespace) -> int:
    """The ``npcalls simulate`` verb: run :func:`npcalls.simulate.run` from the options."""
    from ..errors import TableExistsError, TableNotFoundError
    from ..simulate import SimConfig, default_capacity, run
    from ..table import CallTable
    cfg = SimConfig(table=a.table, cps=a.cps, mean_hold_ns=a.mean_hold, hold_dist=a.hold_dist,
                    hold_sigma=a.hold_sigma, duration_ns=a.duration or None,
                    speedup=a.speedup, workers=a.workers, seed=a.seed, on_exit=a.on_exit,
                    expire_after_ns=a.expire_after)
    try:
        cfg.check()
    except ValueError as e:
        raise CliError(str(e)) from None
    if a.create:
        cap = a.capacity or default_capacity(cfg)
        try:
            CallTable.create(a.table, cap).close()
            print(f"npcalls simulate: created {a.table} with {cap:,} slots", file=sys.stderr)
        except TableExistsError:
            pass                                # --create means "if it does not exist"
    progress = _progress_line if sys.stderr.isatty() and not a.quiet else None
    try:
        res = run(cfg, progress=progress)
        if progress is not None:
            print(file=sys.stderr)
    except TableNotFoundError:
        raise CliError(no_table_message(a.table, ", or add --create")) from None
    for err in res.errors:
        print(f"npcalls simulate: {err}", file=sys.stderr)
    print(f"npcalls simulate: {res.summary()}", file=sys.stderr)
    if res.rejected:
        print(f"npcalls simulate: {res.rejected:,} calls rejected: the table is full; "
              f"`npcalls grow {a.table} --capacity N` makes room online (or run with "
              "--expire-after)", file=sys.stderr)
    if a.json:
        import json
        print(json.dumps(res.__dict__))
    if res.errors:
        return 2
    return 1 if res.rejected else 0
