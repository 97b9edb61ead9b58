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


class _Display:
    """What both displays share: a refresh limit and the figures they show."""

    interval = 0.2
    """Seconds between two refreshes at most (the callback comes per chunk)."""

    def __init__(self, follow: bool) -> None:
        self.follow = follow
        self._last = 0.0

    def _due(self) -> bool:
        now = time.monotonic()
        if now - self._last < self.interval:
            return False
        self._last = now
        return True

    @staticmethod
    def _figures(s: Summary, sep: str) -> tuple[str, str]:
        """(lines/s, "N started<sep>N ended[<sep>N bad]")."""
        rate = s.lines / s.seconds if s.seconds > 0 else 0.0
        calls = f"{_human(s.started)} started{sep}{_human(s.ended)} ended"
        if s.bad or s.too_long:
            calls += f"{sep}{s.bad + s.too_long} bad"
        return _human(rate), calls


class _Plain(_Display):
    """One line on stderr, rewritten in place."""

    def __init__(self, stream: TextIO, follow: bool) -> None:
        super().__init__(follow)
        self.stream = stream
        self._width = 0

    def __call__(self, s: Summary, done: int, total: int | None) -> None:
        if not self._due():
            return
        rate, calls = self._figures(s, "  ")
        pct = f"{100 * done / total:5.1f}% " if total else ""
        line = (f"{pct}{_human(s.lines)} lines  {rate} lines/s  {calls}"
                + ("  (following; Ctrl-C ends)" if self.follow else ""))
        self._width = max(self._width, len(line))
        self.stream.write("\r" + line.ljust(self._width))
        self.stream.flush()

    def close(self) -> None:
        if self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()


class _Rich(_Display):
    """A rich progress bar (manual refresh: no thread)."""

    interval = 0.1

    def __init__(self, stream: TextIO, follow: bool) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
        super().__init__(follow)
        self.progress = Progress(
            TextColumn("[bold]ingest[/]"), BarColumn(), TaskProgressColumn(),
            TextColumn("{task.fields[lines]} lines  {task.fields[rate]} lines/s  "
                       "{task.fields[calls]}"),
            TimeElapsedColumn(),
            console=Console(file=stream), auto_refresh=False, transient=True)
        self.task = self.progress.add_task("ingest", total=None, lines="0", rate="0",
                                           calls="")
        self.progress.start()

    def __call__(self, s: Summary, done: int, total: int | None) -> None:
        if not self._due():
            return
        rate, calls = self._figures(s, ", ")
        self.progress.update(self.task, completed=done, total=None if self.follow else total,
                             lines=_human(s.lines), rate=rate, calls=calls)
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
