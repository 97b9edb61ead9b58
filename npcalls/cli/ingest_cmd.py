"""``npcalls ingest``: load acc logs, CDR CSV or JSON lines into a table."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import Any

from ._common import (
    EXIT_ERROR,
    EXIT_NEGATIVE,
    CliError,
    add_table_arg,
    no_table_message,
    positive_int,
    stderr_is_tty,
)

_EPILOG = """\
inputs:
  FILE may be plain, gzip, bzip2 or xz (recognised by content); '-' reads stdin.
  acc logs: Kamailio/OpenSIPS 'ACC: transaction answered|call missed: ...' lines
  with any prefix (stderr, syslog RFC 3164/3339, none), and dialog CDR lines
  ('start_time=..; end_time=..; duration=..; call_id=..'). An answered INVITE
  starts a call, a BYE with 2xx ends it; failed, missed and cancelled INVITEs
  start nothing; a BYE without its INVITE gives an end-only call. Where acc
  lines and CDRs describe the same call, it is counted once with the acc times.
  Other lines (script logs, other daemons) are ignored.

exit status:
  0  every line loaded or deliberately ignored
  1  some lines were bad (or Call-IDs too long for the table), a compressed
     input was truncated (the lines before the damage were loaded), or no line
     of the input was a call (an empty input too); everything else was loaded
  2  error: no such table, an unreadable input, bad usage, table full

examples:
  npcalls ingest calls /var/log/kamailio.log --create --capacity 2000000
  zcat old/*.gz | npcalls ingest calls -
  npcalls ingest calls cdr.csv --start-col setup --end-col hangup --time-unit ms
  npcalls ingest calls /var/log/kamailio.log --follow      # keep the table current
"""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "ingest", help="load acc logs, CDR CSV or JSON lines into a table",
        description="Load Kamailio/OpenSIPS acc logs (transaction and CDR lines), CDR CSV "
                    "files or JSON lines into a table, in large batches. A summary goes to "
                    "stderr; a progress bar too when stderr is a terminal.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_table_arg(p)
    p.add_argument("files", nargs="+", metavar="FILE", help="inputs ('-' = stdin)")
    p.add_argument("--format", "-f", choices=("auto", "acc", "csv", "jsonl"), default="auto",
                   help="input format (default: decided per input from its first bytes)")
    g = p.add_argument_group("CSV / JSON lines")
    g.add_argument("--call-id-col", metavar="NAME",
                   help="Call-ID column/key (default: call_id, callid, call-id, ...)")
    g.add_argument("--start-col", metavar="NAME",
                   help="start time column/key (default: start, start_time, ...)")
    g.add_argument("--end-col", metavar="NAME",
                   help="end time column/key (default: end, end_time, stop, ...)")
    g.add_argument("--time-unit", choices=("auto", "s", "ms", "us", "ns", "iso"),
                   default="auto",
                   help="epoch seconds/ms/us/ns (decimals allowed) or ISO 8601; default: "
                        "guessed per column")
    g = p.add_argument_group("table")
    g.add_argument("--create", action="store_true",
                   help="create the table if it does not exist")
    g.add_argument("--capacity", "-c", type=positive_int, default=1 << 20,
                   help="slots of a created table (default 1048576)")
    g.add_argument("--key-width", type=positive_int, default=64,
                   help="longest Call-ID of a created table, in bytes (default 64)")
    g.add_argument("--auto-grow", action="store_true",
                   help="a created table doubles its capacity when full")
    g = p.add_argument_group("running")
    g.add_argument("--follow", "-F", action="store_true",
                   help="keep reading files as they grow, like tail -F (survives rotation "
                        "and truncation); Ctrl-C or SIGTERM ends, with the summary")
    g.add_argument("--batch-size", type=positive_int, default=None,
                   help="event rows per table write (default 500000)")
    g.add_argument("--jobs", "-j", type=int, default=None,
                   help="processes parsing large files (default: the CPUs this process may "
                        "use; 1 = none)")
    g.add_argument("--show-bad", type=int, default=10, metavar="N",
                   help="bad lines to show with file:line (default 10; all are counted)")
    g.add_argument("--quiet", "-q", action="store_true",
                   help="no progress bar and no summary (errors and bad lines still set "
                        "the exit status)")
    g.add_argument("--json", action="store_true",
                   help="print the summary as one JSON object on stdout")
    p.set_defaults(func=cmd_ingest)


def _open_table(a: argparse.Namespace) -> Any:
    from ..errors import TableNotFoundError
    from ..table import CallTable
    if a.create:
        return CallTable.open_or_create(a.table, a.capacity, a.key_width,
                                        auto_grow=a.auto_grow)
    try:
        return CallTable.open(a.table)
    except TableNotFoundError:
        raise CliError(no_table_message(a.table, ", or add --create")) from None


def cmd_ingest(a: argparse.Namespace) -> int:
    from ..ingest import DEFAULT_BATCH, ingest
    from ..ingest.progress import make_progress
    if a.files.count("-") > 1:
        raise CliError("stdin ('-') can be given only once")
    table = _open_table(a)
    progress = None
    if not a.quiet and stderr_is_tty():
        progress = make_progress(sys.stderr, follow=a.follow)
    stop = [False]
    old: dict[int, Any] = {}
    if a.follow:
        # Ctrl-C and SIGTERM end a follow cleanly: the last lines are
        # written and the summary printed
        def _stop(signum: int, frame: Any) -> None:
            stop[0] = True
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, _stop)
    try:
        s = ingest(table, a.files, format=a.format, call_id_col=a.call_id_col,
                   start_col=a.start_col, end_col=a.end_col, time_unit=a.time_unit,
                   batch_size=a.batch_size or DEFAULT_BATCH, show_bad=max(0, a.show_bad),
                   follow=a.follow, progress=progress, stop=lambda: stop[0],
                   jobs=a.jobs)
    finally:
        for signum, h in old.items():
            signal.signal(signum, h)
        if progress is not None:
            progress.close()
        table.close()
    if a.json:
        print(json.dumps(s.as_dict()))
    if not a.quiet:
        print(s.format(show=max(0, a.show_bad)), file=sys.stderr)
    else:
        for e in s.errors:
            print(f"npcalls ingest: {e}", file=sys.stderr)
    if s.interrupted:
        return 130
    if s.errors:
        return EXIT_ERROR
    if s.bad or s.too_long or s.truncated:
        return EXIT_NEGATIVE
    if not (s.acc_lines or s.cdr_lines or s.records) and not a.follow:
        if not a.quiet:
            print("npcalls ingest: no acc, CDR or CSV/JSON call lines in the input"
                  + (" (is --format right?)" if s.lines else " (it is empty)"),
                  file=sys.stderr)
        return EXIT_NEGATIVE
    return 0
