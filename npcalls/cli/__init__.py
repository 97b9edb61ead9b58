"""The ``npcalls`` command: one verb per operators' task, each with its own --help.

Exit status, as grep has it: 0 success; 1 a negative answer (a Call-ID not
found, ``check`` found problems, nothing matched); 2 an error (bad usage, no
such table, a corrupt file, ...).  Errors go to stderr, data to stdout.

Verbs live in small modules of this package; each module has a
``register(subparsers)`` that adds its verbs.  Modules import heavy
dependencies (pandas, rich, ...) only inside the verb that needs them, so
``npcalls --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

from ._common import EXIT_ERROR, CliError

# Order = order in `npcalls --help`.  A module missing from a checkout (an
# optional feature not built yet) is simply absent from the command.
VERB_MODULES = (
    "table_cmds",      # create, info, get, start, stop, rm, dump, unlink
    "lifecycle_cmds",  # check, expire, grow, compact
    "ingest_cmd",      # ingest
    "analysis_cmds",   # top, simulate
    "demo_cmd",        # demo
    "kamailio_cmd",    # kamailio-script
)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    p = argparse.ArgumentParser(
        prog="npcalls",
        description="A live table of SIP calls in shared memory.",
        epilog="Exit status: 0 ok, 1 negative answer (not found, check failed), 2 error. "
               "Tables given by bare name live in $NPCALLS_DIR (default /dev/shm).",
    )
    p.add_argument("--version", action="version", version=f"npcalls {__version__}")
    sub = p.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    for name in VERB_MODULES:
        try:
            mod = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"{__name__}.{name}":
                continue
            raise
        mod.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``npcalls`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
        sys.stdout.flush()
        return int(rc or 0)
    except CliError as e:
        print(f"npcalls {args.verb}: {e}", file=sys.stderr)
        return e.code
    except BrokenPipeError:
        # `npcalls dump x | head`: the reader left; that is not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the last line of defence of a CLI
        from ..errors import NpcallsError
        if isinstance(e, (NpcallsError, OSError, ValueError)):
            print(f"npcalls {args.verb}: {e}", file=sys.stderr)
            return EXIT_ERROR
        raise


def run() -> None:
    sys.exit(main())
