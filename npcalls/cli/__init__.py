"""The ``npcalls`` command: one verb per operators' task, each with its own --help.

Exit status, as grep has it: 0 success; 1 a negative answer (a Call-ID not
found, ``check`` found problems, nothing matched); 2 an error (bad usage, no
such table, a corrupt file, ...).  Errors go to stderr, data to stdout.

Whatever goes wrong, the command prints one line and exits 2: an exception
no verb expected (a bug) included.  ``--debug`` (or ``NPCALLS_DEBUG=1`` in
the environment) prints its traceback instead.  A reader that leaves early
(``npcalls dump t | head``) is not an error: the command stops quietly, 0.

Verbs live in small modules of this package; each module has a
``register(subparsers)`` that adds its verbs.  Modules import heavy
dependencies (pandas, rich, ...) only inside the verb that needs them, so
``npcalls --help`` stays fast.
"""

from __future__ import annotations

import argparse
import errno
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
    "ops_cmds",        # exporter, export
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
    p.add_argument("--debug", action="store_true",
                   help="show the traceback of an unexpected error (or set NPCALLS_DEBUG=1)")
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


def _quiet_stdout() -> None:
    """Point fd 1 at /dev/null: the reader has gone, and Python's final flush must not fail."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)
    except OSError:
        pass


def _broken_pipe(e: BaseException) -> bool:
    return isinstance(e, BrokenPipeError) or (isinstance(e, OSError) and e.errno == errno.EPIPE)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``npcalls`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("NPCALLS_DEBUG", "") not in ("", "0")
    try:
        rc = args.func(args)
        sys.stdout.flush()
        return int(rc or 0)
    except CliError as e:
        print(f"npcalls {args.verb}: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the last line of defence of a CLI
        if _broken_pipe(e):
            # `npcalls dump x | head`: the reader left; that is not an error
            _quiet_stdout()
            return 0
        from ..errors import NpcallsError
        if debug:
            import traceback
            traceback.print_exc()
        elif isinstance(e, (NpcallsError, OSError, ValueError)):
            print(f"npcalls {args.verb}: {e}", file=sys.stderr)
        else:
            print(f"npcalls {args.verb}: internal error: {type(e).__name__}: {e} "
                  "(--debug or NPCALLS_DEBUG=1 shows the traceback)", file=sys.stderr)
        return EXIT_ERROR


def run() -> None:
    rc = main()
    try:
        sys.stdout.flush()
    except Exception as e:  # noqa: BLE001
        if not _broken_pipe(e):
            raise
        _quiet_stdout()
    sys.exit(rc)
