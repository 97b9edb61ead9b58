"""``npcalls top``: a terminal view of a live table, refreshed in place.

Shows the counts, the start and end rates (from the table's lifetime
counters ``n_started`` / ``n_stopped``, so no call is missed between two
refreshes), the number of calls up now with its recent history and peak,
and the longest active calls.  Reads only: attaches read-only, takes no
lock, never slows the writers.

Keys: ``q`` quits; Ctrl-C and SIGTERM quit cleanly too (the terminal is
restored).  With ``--once``, or when stdout is not a terminal, one frame is
printed as plain text and the command exits.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import time
from typing import Any, Iterator

import numpy as np

from .layout import NOT_SET
from .timestamps import format_age

__all__ = ["TopView", "run_top"]

_SPARK = " ▁▂▃▄▅▆▇█"


def _fmt_clock(ns: int) -> str:
    if ns == NOT_SET:
        return "-"
    return str(np.datetime64(int(ns), "ns").astype("datetime64[ms]")).replace("T", " ")


def sparkline(values: list[int], width: int) -> str:
    """The last ``width`` values as a row of block characters, scaled to their range."""
    v = values[-width:]
    if not v:
        return ""
    lo, hi = min(v), max(v)
    if hi == lo:
        return _SPARK[4 if hi else 1] * len(v)
    return "".join(_SPARK[1 + (x - lo) * 7 // (hi - lo)] for x in v)


class TopView:
    """Samples a table and renders one frame of ``npcalls top``.

    Parameters
    ----------
    table : CallTable
    rows : int, default 10
        Longest active calls listed.
    history : int, default 120
        Samples of the active count kept for the sparkline.
    """

    def __init__(self, table: Any, rows: int = 10, history: int = 120) -> None:
        self.table = table
        self.rows = rows
        self.history_len = history
        self.history: list[int] = []
        self.prev: Any = None
        self.prev_t = 0.0
        self.cur: Any = None
        self.cur_t = 0.0
        self.now_ns = 0
        self.longest: list[tuple[str, int]] = []
        self.peak = (0, NOT_SET)

    def sample(self) -> None:
        """Read the table once: stats (counters) and the longest active calls."""
        t = time.monotonic()
        s = self.table.stats()
        snap_t = time.time_ns()
        longest: list[tuple[str, int]] = []
        if s.active and self.rows > 0:
            snap = self.table.snapshot()
            st, en = snap["start"], snap["end"]
            act = np.flatnonzero((st != NOT_SET) & (en == NOT_SET))
            k = min(self.rows, len(act))
            if k:
                pick = act[np.argpartition(st[act], k - 1)[:k]] if len(act) > k else act
                pick = pick[np.argsort(st[pick], kind="stable")]
                longest = [(snap["key"][i].decode("utf-8", "backslashreplace"), int(st[i]))
                            for i in pick]
        self.prev, self.prev_t = self.cur, self.cur_t
        self.cur, self.cur_t, self.now_ns = s, t, snap_t
        self.longest = longest
        self.history.append(s.active)
        del self.history[:-self.history_len]
        if s.active > self.peak[0]:
            self.peak = (s.active, snap_t)

    def rates(self) -> tuple[float, float] | None:
        """(starts/s, ends/s) between the last two samples, or None after the first."""
        p, c = self.prev, self.cur
        if p is None or c is None:
            return None
        dt = self.cur_t - self.prev_t
        if dt <= 0 or c.n_started < p.n_started:        # the table was re-created
            return None
        return (c.n_started - p.n_started) / dt, (c.n_stopped - p.n_stopped) / dt

    def render(self, interval: float, interactive: bool) -> Any:
        """The frame as a rich renderable."""
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        s = self.cur
        ro = " (read-only)" if getattr(self.table, "readonly", False) else ""
        head = Text.assemble(("npcalls top  ", "bold"), (f"{s.path}{ro}", "cyan"), "\n",
                             f"{_fmt_clock(self.now_ns)} UTC, every {interval:g} s",
                             ("   (q quits)" if interactive else "", "dim"))
        r = self.rates()
        rate_s, rate_e = ("…", "…") if r is None else (f"{r[0]:,.1f}", f"{r[1]:,.1f}")
        of_limit = s.count / s.limit if s.limit else 0.0
        g = Table.grid(padding=(0, 2))
        for _ in range(4):
            g.add_column()
        g.add_row("calls / limit", f"{s.count:,} / {s.limit:,} ({of_limit:.0%})",
                  "capacity", f"{s.capacity:,} (load {s.load_factor:.0%})")
        g.add_row("active (up now)", Text(f"{s.active:,}", "bold green"),
                  "peak seen", f"{self.peak[0]:,} at {_fmt_clock(self.peak[1])[11:19]}"
                  if self.peak[0] else "-")
        g.add_row("ended", f"{s.ended:,}", "end-only", f"{s.end_only:,}")
        g.add_row("starts/s", Text(rate_s, "bold"), "ends/s", Text(rate_e, "bold"))
        g.add_row("started / stopped", f"{s.n_started:,} / {s.n_stopped:,}",
                  "writer", "idle" if s.writer_pid is None else f"pid {s.writer_pid}")
        spark = Text.assemble("concurrency  ", (sparkline(self.history, 60), "green"),
                              (f"  last {min(len(self.history), 60)} samples", "dim"))
        lt = Table(title="Longest active calls", title_justify="left", expand=False,
                   show_edge=False, pad_edge=False)
        lt.add_column("#", justify="right", style="dim")
        lt.add_column("call_id", overflow="ellipsis", max_width=60, no_wrap=True)
        lt.add_column("started (UTC)")
        lt.add_column("up for", justify="right")
        for i, (k, st) in enumerate(self.longest, 1):
            lt.add_row(str(i), k, _fmt_clock(st), format_age(max(self.now_ns - st, 0)))
        if not self.longest:
            lt.add_row("", Text("no active calls", "dim"), "", "")
        return Group(head, Text(""), g, spark, Text(""), lt)


@contextlib.contextmanager
def _keys(stream: Any) -> Iterator[int | None]:
    """cbreak mode on a terminal stdin (a key press arrives at once); fd or None."""
    if stream is None or not stream.isatty():
        yield None
        return
    import termios
    import tty
    fd = stream.fileno()
    old = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)       # ISIG stays on: Ctrl-C still raises KeyboardInterrupt
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, old)


def _wait_key(fd: int | None, timeout: float) -> bytes | None:
    """Wait up to ``timeout`` s for a key: the bytes read, b'' if none came, None at EOF."""
    if fd is None:
        time.sleep(timeout)
        return b""
    r, _, _ = select.select([fd], [], [], timeout)
    if not r:
        return b""
    return os.read(fd, 32) or None


def run_top(table: Any, interval: float = 1.0, rows: int = 10, once: bool = False,
            out: Any = None, stdin: Any = None, iterations: int | None = None) -> int:
    """Run ``npcalls top`` on an open table; return the exit status.

    Parameters
    ----------
    interval : float, default 1.0
        Seconds between refreshes (and the window the rates are measured on).
    once : bool, default False
        Print one frame and return (also done when ``out`` is not a
        terminal).  The rates need two samples, so the frame comes
        ``min(interval, 1)`` s after the start.
    iterations : int, optional
        Stop after this many refreshes (tests).
    """
    from rich.console import Console
    out = sys.stdout if out is None else out
    stdin = sys.stdin if stdin is None else stdin
    view = TopView(table, rows=rows)
    if once or not out.isatty():
        view.sample()
        time.sleep(min(interval, 1.0))
        view.sample()
        # Plain text, whatever the environment says (a Jupyter kernel's
        # children inherit FORCE_COLOR): this output goes to pipes and files.
        Console(file=out, highlight=False, color_system=None, force_terminal=False,
                force_jupyter=False).print(view.render(interval, interactive=False))
        return 0
    from rich.live import Live

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, on_term)
    console = Console(file=out, highlight=False)
    n = 0
    try:
        with _keys(stdin) as fd, Live(console=console, screen=True, auto_refresh=False,
                                      redirect_stdout=False, redirect_stderr=False) as live:
            while iterations is None or n < iterations:
                t0 = time.monotonic()
                view.sample()
                live.update(view.render(interval, interactive=fd is not None), refresh=True)
                n += 1
                deadline = t0 + interval
                while (left := deadline - time.monotonic()) > 0:
                    key = _wait_key(fd, left)
                    if key is None:         # the terminal went away: keep refreshing
                        fd = None
                    elif key[:1] in (b"q", b"Q"):
                        return 0
    except KeyboardInterrupt:
        return 0                # Ctrl-C is the other way out of a top: not an error
    finally:
        signal.signal(signal.SIGTERM, old_term)
    return 0
