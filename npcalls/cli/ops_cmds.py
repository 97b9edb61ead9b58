"""Operations verbs: ``exporter`` (Prometheus) and ``export`` (periodic Parquet snapshots)."""

from __future__ import annotations

import argparse
import sys
import threading
from typing import Any

from ..signals import stop_event
from ._common import CliError, duration_arg


def _positive_duration(text: str) -> int:
    v = duration_arg(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return v


def _listen(text: str) -> str:
    from ..exporter import parse_listen
    try:
        parse_listen(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def register(sub: Any) -> None:
    p = sub.add_parser(
        "exporter", help="serve Prometheus metrics of one or more tables",
        description="Serve /metrics for Prometheus: active calls, calls started/ended "
                    "(the tables' own monotonic counters), a call duration histogram, the "
                    "longest and stuck calls, capacity, load, tombstones, writer recoveries; "
                    "labelled by host and table. Reads lock-free (one snapshot per table per "
                    "scrape). Runs until SIGTERM or Ctrl-C. Needs: pip install "
                    "'npcalls[exporter]'.")
    p.add_argument("tables", nargs="+", metavar="TABLE", help="table names or paths")
    p.add_argument("--listen", type=_listen, default="127.0.0.1:9464", metavar="HOST:PORT",
                   help="address to serve on (default 127.0.0.1:9464; port 0: any free port, "
                        "printed on stderr)")
    p.add_argument("--host", default=None, help="value of the host label (default: hostname)")
    p.add_argument("--stuck-after", type=_positive_duration, default=4 * 3600 * 10**9,
                   metavar="DURATION",
                   help="calls up longer than this count as stuck (default 4h)")
    p.set_defaults(func=cmd_exporter)

    p = sub.add_parser(
        "export", help="write Parquet snapshots periodically (hive layout)",
        description="Write a Parquet snapshot of each table to "
                    "DIR/host=HOST/date=YYYY-MM-DD/TABLE-TIME.parquet (temporary file, then "
                    "rename), every --every, pruning this host's files older than --keep. "
                    "SIGTERM or Ctrl-C ends it between snapshots. Needs: pip install "
                    "'npcalls[fleet]'.")
    p.add_argument("tables", nargs="+", metavar="TABLE", help="table names or paths")
    p.add_argument("--to", required=True, metavar="DIR", help="root directory of the snapshots")
    p.add_argument("--every", type=_positive_duration, default=None, metavar="DURATION",
                   help="interval (e.g. 60s); without it, one snapshot and exit")
    p.add_argument("--keep", type=_positive_duration, default=None, metavar="DURATION",
                   help="remove this host's snapshots older than this (e.g. 7d)")
    p.add_argument("--host", default=None, help="the host label (default: hostname)")
    p.add_argument("--quiet", "-q", action="store_true", help="no line per file on stderr")
    p.set_defaults(func=cmd_export)


def _stop_on_signals() -> threading.Event:
    return stop_event()[0]


def cmd_exporter(a: argparse.Namespace) -> int:
    try:
        from .. import exporter
        exporter._prometheus()
    except ImportError as e:
        raise CliError(str(e)) from None
    stop = _stop_on_signals()
    try:
        srv = exporter.serve(a.tables, a.listen, host=a.host, stuck_after_s=a.stuck_after / 1e9)
    except ValueError as e:
        raise CliError(str(e)) from None
    except OSError as e:
        raise CliError(f"cannot listen on {a.listen}: {e.strerror or e}") from None
    print(f"npcalls exporter: serving {', '.join(a.tables)} on {srv.url}", file=sys.stderr,
          flush=True)
    try:
        while not stop.wait(3600):
            pass
    finally:
        srv.close()
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    try:
        from .. import snapshots
        snapshots._pyarrow()
    except ImportError as e:
        raise CliError(str(e)) from None
    stop = _stop_on_signals()

    def report(line: str) -> None:
        if not a.quiet:
            print(f"npcalls export: {line}", file=sys.stderr, flush=True)

    failed: list[str] = []

    def error(line: str) -> None:
        failed.append(line)
        print(f"npcalls export: {line}", file=sys.stderr, flush=True)

    try:
        snapshots.run_periodic(
            a.tables, a.to, a.every / 1e9 if a.every else 1.0, keep_ns=a.keep, host=a.host,
            count=None if a.every else 1, stop=stop, report=report, on_error=error)
    except ValueError as e:
        raise CliError(str(e)) from None
    # A one-off export that could not read a table failed; a service keeps going.
    return 2 if failed and not a.every else 0
