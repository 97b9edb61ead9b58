"""``npcalls demo``: the README's main job on a built-in default.

Creates (or recreates) a table, loads the Kamailio acc log shipped with the
package (1000 real calls relayed by Kamailio 5.6, with their dialog CDRs) and
prints what the table holds.  Needs nothing beyond numpy and xxhash.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ._common import CliError, command_name

DATA = "kamailio-acc.log.gz"


def register(sub: Any) -> None:
    p = sub.add_parser(
        "demo", help="load the bundled Kamailio log into a table and show it",
        description="Create (or recreate) a table, load the Kamailio 5.6 acc log shipped with "
                    "npcalls (1000 real calls: acc lines and dialog CDRs) and print what the "
                    "table holds. The table stays for you to explore "
                    "(npcalls info/get/dump).")
    p.add_argument("--table", default="demo", metavar="NAME",
                   help="table name or path (default: demo, in $NPCALLS_DIR or /dev/shm)")
    p.add_argument("--rows", type=int, default=5, help="rows to show (default 5)")
    p.set_defaults(func=cmd_demo)


def bundled_log() -> str:
    """Path of the bundled log (a file inside the installed package)."""
    from importlib import resources
    ref = resources.files("npcalls") / "data" / DATA
    if not ref.is_file():
        raise CliError(f"the bundled log {DATA} is missing from this installation")
    return str(ref)


def cmd_demo(a: argparse.Namespace) -> int:
    import numpy as np

    from ..ingest import ingest
    from ..layout import NOT_SET
    from ..table import CallTable
    from ..timestamps import format_ns

    path = bundled_log()
    CallTable.unlink(a.table)
    t = CallTable.create(a.table, capacity=4096, key_width=64)
    try:
        s = ingest(t, [path], jobs=1)
        out = sys.stdout
        print(f"table {t.path}", file=out)
        print(f"loaded the bundled Kamailio 5.6 acc log ({DATA}):", file=out)
        print(s.format(), file=out)
        st = t.stats()
        print(f"\nthe table holds {st.count} calls: {st.active} active, {st.ended} ended, "
              f"{st.end_only} end-only; capacity {st.capacity} (load {st.load_factor:.2f}, "
              f"longest probe {st.max_probe})", file=out)
        snap = t.snapshot()
        both = (snap["start"] != NOT_SET) & (snap["end"] != NOT_SET)
        if both.any():
            dur = (snap["end"][both] - snap["start"][both]) / 1e9
            first = int(snap["start"][snap["start"] != NOT_SET].min())
            last = int(snap["end"][snap["end"] != NOT_SET].max())
            print(f"calls from {format_ns(first)} to {format_ns(last)}; duration "
                  f"min {dur.min():.3f} s, median {np.median(dur):.3f} s, "
                  f"max {dur.max():.3f} s", file=out)
        order = np.argsort(snap["start"], kind="stable")[:max(0, a.rows)]
        if len(order):
            print(f"\n{'call_id':<28} {'start':<28} {'end':<28} duration_s", file=out)
            for i in order.tolist():
                k = snap["key"][i].decode("utf-8", "backslashreplace")
                s0, e0 = int(snap["start"][i]), int(snap["end"][i])
                d = f"{(e0 - s0) / 1e9:.3f}" if NOT_SET not in (s0, e0) else ""
                print(f"{k:<28} {format_ns(s0):<28} {format_ns(e0):<28} {d}", file=out)
        import shlex
        cmd = command_name()
        tbl = shlex.quote(a.table)
        one = shlex.quote(snap["key"][order[0]].decode()) if len(order) else "CALL-ID"
        print(f"\nexplore it: {cmd} info {tbl}; {cmd} get {tbl} {one}; "
              f"{cmd} dump {tbl} | head", file=out)
    finally:
        t.close()
    return 0 if s.ok else 1
