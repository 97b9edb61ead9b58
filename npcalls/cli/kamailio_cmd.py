"""``npcalls kamailio-script``: where the ready app_python3 script for a native kamailio.cfg is."""

from __future__ import annotations

import argparse
import os
from typing import Any

from ._common import CliError


def register(sub: Any) -> None:
    p = sub.add_parser(
        "kamailio-script", help="print the path of the script for a native kamailio.cfg",
        description="Print the path of the Python script shipped with npcalls for Kamailio's "
                    "app_python3 module, to use in kamailio.cfg as "
                    'modparam("app_python3", "load", "PATH"); then call '
                    'python_exec("start_monitoring") and python_exec("stop_monitoring") '
                    "from the routing blocks. --settings lists the variables it reads.")
    p.add_argument("--settings", action="store_true",
                   help="also check and print the settings the script would use "
                        "(environment and $NPCALLS_CONFIG)")
    p.set_defaults(func=cmd_kamailio_script)


def cmd_kamailio_script(args: argparse.Namespace) -> int:
    from ..kamailio import read_settings, script_path
    path = script_path()
    if not os.path.isfile(path):
        raise CliError(f"the script {path} is missing from this installation")
    settings = {}
    if args.settings:
        try:
            settings = read_settings()
        except (ValueError, OSError) as e:
            raise CliError(str(e)) from None
    print(path)
    for k, v in settings.items():
        if k == "NPCALLS_MODE":
            v = f"{v:04o}"
        elif k == "NPCALLS_LOCK_WAIT_MS":
            v = "forever" if v is None else f"{v * 1e3:g}"
        elif isinstance(v, bool):
            v = int(v)
        print(f"{k}={v}")
    return 0
