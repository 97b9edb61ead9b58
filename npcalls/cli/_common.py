"""Helpers shared by the command-line verbs."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Iterable, Iterator

EXIT_OK = 0
EXIT_NEGATIVE = 1
EXIT_ERROR = 2


class CliError(Exception):
    """An error to report on stderr with an exit status (no traceback)."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


def add_table_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("table", metavar="TABLE",
                   help="table name (in $NPCALLS_DIR, default /dev/shm) or path (contains '/')")


def no_table_message(name: str, hint: str = "") -> str:
    """"no table 'x' in DIR (...)": says where a bare name was looked for."""
    from ..storage import resolve
    try:
        path = resolve(name)[0]
    except ValueError as e:
        return str(e)
    where = f" in {os.path.dirname(path)}" if "/" not in name else f" ({path} does not exist)"
    return (f"no table {name!r}{where} (create it with `npcalls create {name} --capacity N`"
            f"{hint}; bare names live in $NPCALLS_DIR, default /dev/shm)")


def open_table(name: str, readonly: bool = True) -> Any:
    """Open a table for a verb, turning a missing table into a one-line error."""
    from ..errors import TableNotFoundError
    from ..table import CallTable
    try:
        return CallTable.open(name, readonly=readonly)
    except TableNotFoundError:
        raise CliError(no_table_message(name)) from None


def world_writable(name: str) -> list[str]:
    """The table's files (data, lock) that any local user may write."""
    from ..storage import resolve
    out = []
    for p in resolve(name):
        try:
            if os.stat(p).st_mode & 0o002:
                out.append(p)
        except OSError:
            pass
    return out


def read_keys(args_keys: list[str]) -> Iterator[str]:
    """Call-IDs from the command line, or one per line from stdin when given '-'."""
    for k in args_keys:
        if k == "-":
            for line in sys.stdin:
                line = line.rstrip("\r\n")
                if line:
                    yield line
        else:
            yield k


def time_arg(text: str) -> int:
    """argparse type for a point in time (see npcalls.timestamps.parse_time)."""
    from ..timestamps import parse_time
    try:
        return parse_time(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def duration_arg(text: str) -> int:
    """argparse type for a duration (see npcalls.timestamps.parse_duration)."""
    from ..timestamps import parse_duration
    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def positive_int(text: str) -> int:
    try:
        v = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return v


def mode_arg(text: str) -> int:
    try:
        v = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an octal mode: {text!r}") from None
    if not 0 <= v <= 0o777:
        raise argparse.ArgumentTypeError(f"mode out of range: {text!r}")
    return v


def need_extra(*modules: str, extra: str = "analysis") -> None:
    """Fail with one line, before anything is created, if an extra's module is missing.

    The ``npcalls`` core needs numpy and xxhash only (what ``make demo``
    installs); verbs that need more say which extra and how to install it.
    """
    import importlib
    for m in modules:
        try:
            importlib.import_module(m)
        except ImportError:
            raise CliError(f"this needs the '{extra}' extra ({m} is not installed): "
                           f"pip install 'npcalls[{extra}]'") from None


def out_stream(path: str | None, binary: bool = False) -> Any:
    """Where a verb writes its data: a file (``-o``) or stdout."""
    if path in (None, "-"):
        return sys.stdout.buffer if binary else sys.stdout
    return open(path, "wb" if binary else "w", newline="" if not binary else None)


def write_lines(lines: Iterable[str], stream: Any) -> None:
    for line in lines:
        stream.write(line)
        stream.write("\n")


def command_name() -> str:
    """The ``npcalls`` command as the user can type it here, for hints meant to be pasted.

    ``npcalls`` when that name on PATH is this installation; otherwise the path
    it was run by (``.venv/bin/npcalls`` after ``make demo``), or
    ``PYTHON -m npcalls``.
    """
    import shlex
    import shutil

    def short(path: str) -> str:
        rel = os.path.relpath(path)
        if rel.startswith(".."):
            return os.path.abspath(path)
        return rel if os.sep in rel else os.path.join(".", rel)

    on_path = shutil.which("npcalls")
    prog = sys.argv[0] if sys.argv else ""
    if os.path.basename(prog) == "npcalls" and os.path.isfile(prog):      # the console script
        if on_path and os.path.samefile(on_path, prog):
            return "npcalls"
        return shlex.quote(short(prog))
    here = os.path.dirname(os.path.abspath(sys.executable))
    if on_path and os.path.dirname(os.path.abspath(on_path)) == here:
        return "npcalls"
    return f"{shlex.quote(short(sys.executable))} -m npcalls"


def stderr_is_tty() -> bool:
    return sys.stderr.isatty() and os.environ.get("TERM") != "dumb"
