"""Verbs on one table: create, info, get, start, stop, rm, dump, unlink."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ._common import (
    EXIT_NEGATIVE,
    CliError,
    add_table_arg,
    mode_arg,
    need_extra,
    open_table,
    out_stream,
    positive_int,
    read_keys,
    time_arg,
)


def register(sub: Any) -> None:
    p = sub.add_parser("create", help="create a table",
                       description="Create an empty table (mode 0600 unless --mode says otherwise).")
    add_table_arg(p)
    p.add_argument("--capacity", "-c", type=positive_int, required=True,
                   help="slots; the table holds up to max-load x capacity calls")
    p.add_argument("--key-width", type=positive_int, default=64,
                   help="longest Call-ID in bytes (default 64)")
    p.add_argument("--mode", type=mode_arg, default=0o600, help="octal file mode (default 0600)")
    p.add_argument("--max-load", type=float, default=0.75, help="load factor limit (default 0.75)")
    p.add_argument("--auto-grow", action="store_true", help="double the capacity when full")
    p.add_argument("--if-not-exists", action="store_true",
                   help="succeed (doing nothing) if the table already exists")
    p.set_defaults(func=cmd_create)

    p = sub.add_parser("info", help="show a table's size, load and counters",
                       description="Show capacity, calls, load, probe lengths and counters.")
    add_table_arg(p)
    p.add_argument("--json", action="store_true", help="one JSON object instead of text")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("get", help="look up calls",
                       description="Print call_id, start, end, duration_s, state (tab-separated) "
                                   "for each Call-ID; '-' reads Call-IDs from stdin. Exit 1 if "
                                   "any is absent.")
    add_table_arg(p)
    p.add_argument("call_ids", nargs="+", metavar="CALL_ID")
    p.add_argument("--json", action="store_true", help="JSON lines")
    p.add_argument("--epoch-ns", action="store_true", help="times as int ns since the epoch")
    p.set_defaults(func=cmd_get)

    for verb, helptext in (("start", "record call starts"), ("stop", "record call ends")):
        p = sub.add_parser(verb, help=helptext,
                           description=f"{helptext.capitalize()} ('-' reads Call-IDs from stdin). "
                                       "Exit 1 if any was not recorded (already set, or unknown "
                                       "for stop).")
        add_table_arg(p)
        p.add_argument("call_ids", nargs="+", metavar="CALL_ID")
        p.add_argument("--ts", type=time_arg, default=None,
                       help="time: now (default), ISO 8601, epoch seconds, '15m ago' (or --ts=-15m)")
        if verb == "stop":
            p.add_argument("--insert-missing", action="store_true",
                           help="record an end-only call for unknown Call-IDs")
        p.set_defaults(func=cmd_start if verb == "start" else cmd_stop)

    p = sub.add_parser("rm", help="remove calls",
                       description="Remove calls ('-' reads Call-IDs from stdin). Exit 1 if any "
                                   "was absent.")
    add_table_arg(p)
    p.add_argument("call_ids", nargs="+", metavar="CALL_ID")
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser("dump", help="write all calls as CSV, JSON lines or Parquet",
                       description="Write a consistent snapshot (taken without blocking writers) "
                                   "to stdout or -o FILE.")
    add_table_arg(p)
    p.add_argument("--format", "-f", choices=("csv", "jsonl", "parquet"), default="csv")
    p.add_argument("--active", action="store_true", help="only calls that have not ended")
    p.add_argument("--epoch-ns", action="store_true", help="times as int ns (csv, jsonl)")
    p.add_argument("--no-header", action="store_true", help="csv without the header row")
    p.add_argument("--host", metavar="NAME",
                   help="parquet: value of the host column (default: this host's name)")
    p.add_argument("--output", "-o", metavar="FILE", help="write here instead of stdout")
    p.set_defaults(func=cmd_dump)

    p = sub.add_parser("unlink", help="remove a table",
                       description="Remove a table and its lock file. Attached processes are "
                                   "told at their next operation. Exit 1 if it did not exist.")
    add_table_arg(p)
    p.set_defaults(func=cmd_unlink)


def cmd_create(a: argparse.Namespace) -> int:
    from ..errors import TableExistsError
    from ..table import CallTable
    try:
        t = CallTable.create(a.table, a.capacity, a.key_width, a.mode, max_load=a.max_load,
                             auto_grow=a.auto_grow)
    except TableExistsError:
        if a.if_not_exists:
            return 0
        raise CliError(f"table {a.table!r} already exists (npcalls unlink {a.table} removes it)")
    print(t, file=sys.stderr)
    t.close()
    if a.mode & 0o002:
        print(f"npcalls create: warning: mode {a.mode:04o} makes {a.table!r} world-writable: "
              "any local user can change or corrupt its calls (0600 or 0660 with a group "
              "is safer)", file=sys.stderr)
    return 0


def _stats_dict(t: Any) -> dict:
    s = t.stats()._asdict()
    return s


def cmd_info(a: argparse.Namespace) -> int:
    with open_table(a.table) as t:
        s = _stats_dict(t)
    if a.json:
        print(json.dumps(s))
        return 0
    width = max(len(k) for k in s)
    for k, v in s.items():
        if k == "load_factor":
            v = f"{v:.4f}"
        elif k == "mean_probe":
            v = f"{v:.4f}"
        print(f"{k:<{width}}  {v}")
    return 0


def _row_out(key: str, start: int, end: int, epoch_ns: bool) -> dict:
    from ..layout import NOT_SET
    from ..timestamps import format_ns
    state = {(True, False): "active", (True, True): "ended", (False, True): "end-only",
             (False, False): "empty"}[(start != NOT_SET, end != NOT_SET)]
    dur = (end - start) / 1e9 if state == "ended" else None
    fmt = (lambda v: None if v == NOT_SET else v) if epoch_ns else (lambda v: format_ns(v) or None)
    return {"call_id": key, "start": fmt(start), "end": fmt(end), "duration_s": dur,
            "state": state}


def cmd_get(a: argparse.Namespace) -> int:
    keys = list(read_keys(a.call_ids))
    missing = 0
    with open_table(a.table) as t:
        res = t.get_many(keys, errors="ignore")
    for k, st, en, f in zip(keys, res.start.tolist(), res.end.tolist(), res.found.tolist()):
        if not f:
            missing += 1
            print(f"npcalls get: {k}: not found", file=sys.stderr)
            continue
        row = _row_out(k, st, en, a.epoch_ns)
        if a.json:
            print(json.dumps(row))
        else:
            dur = "" if row["duration_s"] is None else f"{row['duration_s']:.6f}"
            print("\t".join([k, str(row["start"] or ""), str(row["end"] or ""), dur,
                             row["state"]]))
    return EXIT_NEGATIVE if missing else 0


def _write_verb(a: argparse.Namespace, op: str) -> int:
    keys = list(read_keys(a.call_ids))
    from ..errors import BatchKeyError
    with open_table(a.table, readonly=False) as t:
        try:
            if op == "start":
                done = t.start_many(keys, a.ts)
            elif op == "stop":
                done = t.stop_many(keys, a.ts, insert_missing=a.insert_missing)
            else:
                done = t.remove_many(keys)
        except BatchKeyError as e:
            for p, r in zip(e.positions, e.reasons):
                print(f"npcalls {op}: {keys[int(p)]!r}: {r}", file=sys.stderr)
            raise CliError(f"{len(e.reasons)} invalid Call-ID(s); the others were applied")
    return 0 if done.all() else EXIT_NEGATIVE


def cmd_start(a: argparse.Namespace) -> int:
    return _write_verb(a, "start")


def cmd_stop(a: argparse.Namespace) -> int:
    return _write_verb(a, "stop")


def cmd_rm(a: argparse.Namespace) -> int:
    return _write_verb(a, "rm")


def cmd_dump(a: argparse.Namespace) -> int:
    from .. import export
    with open_table(a.table) as t:
        snap = t.snapshot()
    if a.active:
        snap = snap[export.active_mask(snap)]
    if a.format == "parquet":
        if a.output in (None, "-") and sys.stdout.isatty():
            raise CliError("refusing to write Parquet to a terminal; use -o FILE or a pipe")
        need_extra("pyarrow")
        import os
        name = os.path.basename(a.table)
        if a.output in (None, "-"):
            # written to stdout's buffer, which stays open (main() flushes it)
            export.write_parquet(snap, sys.stdout.buffer, table=name, host=a.host)
        else:
            export.write_parquet(snap, a.output, table=name, host=a.host)
        return 0
    stream = out_stream(a.output)
    try:
        if a.format == "csv":
            export.write_csv(snap, stream, epoch_ns=a.epoch_ns, header=not a.no_header)
        else:
            export.write_jsonl(snap, stream, epoch_ns=a.epoch_ns)
    finally:
        if stream is not sys.stdout:
            stream.close()
    return 0


def cmd_unlink(a: argparse.Namespace) -> int:
    from ..table import CallTable
    return 0 if CallTable.unlink(a.table) else EXIT_NEGATIVE
