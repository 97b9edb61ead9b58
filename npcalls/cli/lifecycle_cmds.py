"""Verbs that keep a long-running table healthy: check, expire, grow, compact."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from typing import Any

from ._common import (
    EXIT_NEGATIVE,
    CliError,
    add_table_arg,
    duration_arg,
    open_table,
    out_stream,
    positive_int,
    world_writable,
)


def _cutoff(text: str) -> Any:
    """A cutoff: a duration means "that long ago" (15m), anything else a point in time."""
    from ..timestamps import parse_duration, parse_time
    try:
        ago = parse_duration(text)
        return lambda: time.time_ns() - ago
    except ValueError:
        pass
    try:
        t = parse_time(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{e}; or a duration such as 15m") from None
    return lambda: t


def register(sub: Any) -> None:
    p = sub.add_parser("check", help="verify a table's invariants (and repair)",
                       description="Verify the header, the counts, every row's key and tag and "
                                   "that every row is findable by its own key. Exit 1 if a "
                                   "problem is found (after --repair: if one remains).")
    add_table_arg(p)
    p.add_argument("--repair", action="store_true",
                   help="finish a crashed writer's recovery now; rebuild from the keys if "
                        "rows are corrupt")
    p.add_argument("--json", action="store_true", help="the report as one JSON object")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("expire", help="remove calls that ended (or started) before a cutoff",
                       description="Remove calls that ended before a cutoff and, with "
                                   "--started-before, calls that started before it and never "
                                   "ended. A cutoff is a duration (15m = 15 minutes ago) or a "
                                   "time. With --every, repeat until interrupted (a small "
                                   "daemon; run it under systemd or your supervisor).")
    add_table_arg(p)
    p.add_argument("--ended-before", type=_cutoff, metavar="WHEN",
                   help="e.g. 15m, 2h, 2026-11-26T00:00Z")
    p.add_argument("--started-before", type=_cutoff, metavar="WHEN",
                   help="also remove unended calls started before this (lost BYEs), e.g. 4h")
    p.add_argument("--every", type=duration_arg, metavar="DURATION",
                   help="repeat every DURATION (e.g. 60s) until SIGINT/SIGTERM")
    p.add_argument("--archive", metavar="FILE",
                   help="append the removed calls to FILE as JSON lines ('-' = stdout)")
    p.add_argument("--quiet", "-q", action="store_true", help="no per-run line on stderr")
    p.set_defaults(func=cmd_expire)

    p = sub.add_parser("grow", help="move a table to a larger capacity, online",
                       description="Rebuild the table with more slots while other processes "
                                   "keep using it; each follows at its next operation.")
    add_table_arg(p)
    p.add_argument("--capacity", "-c", type=positive_int, required=True)
    p.set_defaults(func=cmd_grow)

    p = sub.add_parser("compact", help="rebuild a table in place, dropping tombstones",
                       description="Rebuild at the same capacity (online), so that lookups "
                                   "walk no tombstones.")
    add_table_arg(p)
    p.set_defaults(func=cmd_compact)


def cmd_check(a: argparse.Namespace) -> int:
    try:
        t = open_table(a.table, readonly=False)
    except PermissionError as e:
        # checking needs to read only: without write permission, check read-only
        if a.repair:
            raise CliError(f"--repair needs write permission on the table: {e}") from None
        t = open_table(a.table, readonly=True)
    with t:
        r = t.check(repair=a.repair)
    warnings = [f"{p} is world-writable: any local user can change or corrupt it "
                f"(chmod o-w {p})" for p in world_writable(a.table)]
    if a.json:
        d = r._asdict()
        d["warnings"] = warnings
        print(json.dumps(d))
    else:
        print(f"{a.table}: {'ok' if r.ok else 'PROBLEMS'} ({r.calls} calls)")
        for label, items in (("problem", r.problems), ("note", r.notes),
                             ("repaired", r.repaired), ("warning", warnings)):
            for item in items:
                print(f"  {label}: {item}")
    return 0 if r.ok else EXIT_NEGATIVE


def cmd_expire(a: argparse.Namespace) -> int:
    if a.ended_before is None and a.started_before is None:
        raise CliError("give --ended-before and/or --started-before")
    from .. import export
    stop = {"now": False}

    def _stop(signum: int, frame: Any) -> None:
        stop["now"] = True

    if a.every:
        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
    archive = out_stream(a.archive) if a.archive else None
    t = open_table(a.table, readonly=False)
    try:
        while True:
            eb = a.ended_before() if a.ended_before else None
            sb = a.started_before() if a.started_before else None
            if archive is not None:
                rows = t.expire(eb, sb, return_rows=True)
                export.write_jsonl(rows, archive)
                archive.flush()
                n = len(rows)
            else:
                n = t.expire(eb, sb)
            if not a.quiet:
                print(f"npcalls expire: removed {n} calls, {len(t)} left", file=sys.stderr)
            if not a.every:
                return 0
            deadline = time.monotonic() + a.every / 1e9
            while not stop["now"] and time.monotonic() < deadline:
                time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
            if stop["now"]:
                return 0
    finally:
        t.close()
        if archive is not None and archive is not sys.stdout:
            archive.close()


def cmd_grow(a: argparse.Namespace) -> int:
    with open_table(a.table, readonly=False) as t:
        before = t.capacity
        t0 = time.perf_counter()
        t.grow(a.capacity)
        print(f"npcalls grow: {before} -> {t.capacity} slots in "
              f"{time.perf_counter() - t0:.3f} s", file=sys.stderr)
    return 0


def cmd_compact(a: argparse.Namespace) -> int:
    with open_table(a.table, readonly=False) as t:
        tomb = t.stats().tombstones
        t0 = time.perf_counter()
        t.compact()
        print(f"npcalls compact: dropped {tomb} tombstones in "
              f"{time.perf_counter() - t0:.3f} s", file=sys.stderr)
    return 0
