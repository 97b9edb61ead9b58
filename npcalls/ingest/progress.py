"""Progress on a terminal while a load runs: lines, lines/s, how much of the input is done.

``rich`` draws a bar when it is installed (``pip install npcalls[analysis]``);
otherwise one line is rewritten in place.  Neither starts a thread (the load
may start worker processes, which must not be forked from a threaded
process): the display is refreshed from the load's own progress callback, at
most a few times a second.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from .summary import Summary

__all__ = ["make_progress"]


def _human(n: float) -> str:
    for unit in ("", "k", "M", "G"):
        if abs(n) < 1000:
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}T"


class _Plain:
    """One line on stderr, rewritten in place."""

    def __init__(self, stream: TextIO, follow: bool) -> None:
        self.stream = stream
        self.follow = follow
        self._last = 0.0
        self._width = 0

    def __call__(self, s: Summary, done: int, total: int | None) -> None:
        now = time.monotonic()
        if now - self._last < 0.2:
            return
        self._last = now
        rate = s.lines / s.seconds if s.seconds > 0 else 0.0
        pct = f"{100 * done / total:5.1f}% " if total else ""
        line = (f"{pct}{_human(s.lines)} lines  {_human(rate)} lines/s  "
                f"{_human(s.started)} started  {_human(s.ended)} ended"
                + (f"  {s.bad + s.too_long} bad" if s.bad or s.too_long else "")
                + ("  (following; Ctrl-C ends)" if self.follow else ""))
        self._width = max(self._width, len(line))
        self.stream.write("\r" + line.ljust(self._width))
        self.stream.flush()

    def close(self) -> None:
        if self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()


class _Rich:
    """A rich progress bar (manual refresh: no thread)."""

    def __init__(self, stream: TextIO, follow: bool) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
        self.follow = follow
        self.progress = Progress(
            TextColumn("[bold]ingest[/]"), BarColumn(), TaskProgressColumn(),
            TextColumn("{task.fields[lines]} lines  {task.fields[rate]} lines/s  "
                       "{task.fields[calls]}"),
            TimeElapsedColumn(),
            console=Console(file=stream), auto_refresh=False, transient=True)
        self.task = self.progress.add_task("ingest", total=None, lines="0", rate="0",
                                           calls="")
        self.progress.start()
        self._last = 0.0

    def __call__(self, s: Summary, done: int, total: int | None) -> None:
        now = time.monotonic()
        if now - self._last < 0.1:
            return
        self._last = now
        rate = s.lines / s.seconds if s.seconds > 0 else 0.0
        calls = f"{_human(s.started)} started, {_human(s.ended)} ended"
        if s.bad or s.too_long:
            calls += f", {s.bad + s.too_long} bad"
        self.progress.update(self.task, completed=done, total=None if self.follow else total,
                             lines=_human(s.lines), rate=_human(rate), calls=calls)
        self.progress.refresh()

    def close(self) -> None:
        self.progress.stop()


def make_progress(stream: TextIO | None = None, follow: bool = False) -> Any:
    """A progress callback for :func:`npcalls.ingest.ingest` (with ``close()``)."""
    stream = stream or sys.stderr
    try:
        return _Rich(stream, follow)
    except ImportError:
        return _Plain(stream, follow)
