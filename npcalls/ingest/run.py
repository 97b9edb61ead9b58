"""The load as a whole: inputs -> parsers -> loader -> summary (also what the CLI runs)."""

from __future__ import annotations

import os
import time
from typing import Any, BinaryIO, Callable, Iterable, Sequence

from . import parallel as _par
from .acc import AccParser
from .common import Parsed
from .loader import DEFAULT_BATCH, Loader
from .sources import SourceError, Tail, TruncatedInput, open_source
from .summary import Summary
from .tabular import TabularParser, looks_like_csv_header

__all__ = ["ingest", "detect_format", "FORMATS"]

FORMATS = ("auto", "acc", "csv", "jsonl")

ProgressFn = Callable[[Summary, int, "int | None"], None]


def detect_format(head: bytes, call_id_col: str | None = None) -> str:
    """Guess an input's format from its first bytes: ``acc``, ``csv`` or ``jsonl``.

    JSON lines start with ``{``; a CSV's first line is a header naming a
    Call-ID column; anything else is read as a log (acc lines are found
    wherever they are, other lines are ignored).
    """
    text = head.lstrip(b"\xef\xbb\xbf")
    first = b""
    for line in text.split(b"\n", 50)[:50]:
        if line.strip():
            first = line
            break
    if first.lstrip().startswith(b"{"):
        return "jsonl"
    if b"ACC: " in text or b" start_time=" in text:
        return "acc"
    if looks_like_csv_header(first, call_id_col):
        return "csv"
    return "acc"


class _Feed:
    """One input's parsing state: its parser (chosen on its first bytes) and line count."""

    def __init__(self, name: str, opts: dict[str, Any], loader: Loader, summary: Summary) -> None:
        self.name = name
        self.opts = opts
        self.loader = loader
        self.summary = summary
        self.parser: Any = None
        self.line = 0
        self.failed = False

    def feed(self, chunk: bytes) -> None:
        if self.failed or not chunk:
            return
        if self.parser is None:
            o = self.opts
            fmt = o["format"]
            if fmt == "auto":
                fmt = detect_format(chunk[:65536], o["call_id_col"])
            kw = self.loader.table.key_width
            if fmt == "acc":
                self.parser = AccParser(kw, o["show_bad"])
            else:
                self.parser = TabularParser(fmt, o["call_id_col"], o["start_col"], o["end_col"],
                                            o["time_unit"], kw, o["show_bad"])
        try:
            p: Parsed = self.parser.parse(chunk, self.line, self.name)
        except ValueError as e:            # a CSV header without the columns asked for
            self.summary.errors.append(f"{self.name}: {e}")
            self.failed = True
            return
        self.line += p.lines
        self.loader.add(p)

    def finish(self) -> None:
        """The input ended: what a parser still holds (an open quoted CSV record) is reported."""
        end = getattr(self.parser, "finish", None)
        if end is not None and not self.failed:
            p = end(self.name)
            if p is not None:
                self.loader.add(p)


def ingest(table: Any, inputs: Sequence[str], *, format: str = "auto",
           call_id_col: str | None = None, start_col: str | None = None,
           end_col: str | None = None, time_unit: str = "auto",
           batch_size: int = DEFAULT_BATCH, show_bad: int = 10, follow: bool = False,
           progress: ProgressFn | None = None, stop: Callable[[], bool] | None = None,
           poll_interval: float = 0.2, stdin: BinaryIO | None = None,
           jobs: int | None = None, background: bool = True) -> Summary:
    """Load acc logs, CDR CSV or JSON-lines files into a table.

    Parameters
    ----------
    table : CallTable or str
        A table open for writing, or its name/path.
    inputs : sequence of str
        Paths (plain, .gz, .bz2, .xz: recognised by content) and ``-`` for stdin.
    format : {"auto", "acc", "csv", "jsonl"}
        ``auto`` decides per input from its first bytes.
    call_id_col, start_col, end_col : str, optional
        CSV column / JSON key names (default: the usual names).
    time_unit : {"auto", "s", "ms", "us", "ns", "iso"}
        Unit of CSV/JSON times (``auto`` guesses per column).
    batch_size : int
        Event rows per table write.
    show_bad : int
        Problems kept, with file and line, in ``Summary.problems``.
    follow : bool
        Keep reading the files as they grow, like ``tail -F`` (rotation and
        truncation included), until ``stop()`` returns True.
    progress : callable, optional
        Called as ``progress(summary, bytes_done, bytes_total_or_None)``
        after each chunk.
    stop : callable, optional
        Polled while following; return True to finish.
    poll_interval : float
        Seconds between polls of followed files.
    stdin : binary file, optional
        What ``-`` reads (default ``sys.stdin.buffer``).
    jobs : int, optional
        Processes parsing large files (default: one per CPU, at most 8;
        1 parses in this process).  Files under 48 MB are always parsed here.
    background : bool
        Write to the table from a helper thread while parsing goes on.

    Returns
    -------
    Summary
        Counts, the first problems, errors (inputs that could not be read).
        ``Summary.interrupted`` is True if the load was cut short by Ctrl-C;
        everything read until then is in the table.

    Examples
    --------
    >>> import npcalls, npcalls.ingest as ing          # doctest: +SKIP
    >>> t = npcalls.CallTable.create("calls", capacity=1 << 20)
    >>> s = ing.ingest(t, ["/var/log/kamailio.log"])
    >>> print(s.format())
    """
    from ..table import CallTable
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}")
    own = not isinstance(table, CallTable)
    if own:
        table = CallTable.open(table)
    t0 = time.monotonic()
    summary = Summary(key_width=table.key_width)
    live = follow or "-" in inputs
    loader = Loader(table, batch_rows=batch_size, max_problems=show_bad,
                    cdr_delay=2.0 if live else None, flush_interval=0.5 if live else None,
                    background=background, summary=summary)
    opts = dict(format=format, call_id_col=call_id_col, start_col=start_col, end_col=end_col,
                time_unit=time_unit, show_bad=show_bad,
                jobs=_par.default_jobs() if jobs is None else max(1, int(jobs)))
    total: int | None = 0
    for path in inputs:
        try:
            size = os.path.getsize(path) if path != "-" else None
        except OSError:
            size = 0
        total = None if (size is None or total is None) else total + size
    done = [0]

    def report() -> None:
        if progress is not None:
            summary.seconds = time.monotonic() - t0
            progress(summary, done[0], total)

    try:
        if follow:
            _follow(inputs, opts, loader, summary, stop, poll_interval, stdin, report)
        else:
            for path in inputs:
                _read_one(path, opts, loader, summary, stdin, done, report)
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        try:
            loader.close()
        finally:
            summary.seconds = time.monotonic() - t0
            if own:
                table.close()
    return summary


def _read_one(path: str, opts: dict, loader: Loader, summary: Summary,
              stdin: BinaryIO | None, done: list[int], report: Callable[[], None]) -> None:
    try:
        src = open_source(path, stdin)
    except SourceError as e:
        summary.errors.append(str(e))
        return
    summary.sources.append(src.name)
    feed = _Feed(src.name, opts, loader, summary)
    base = done[0]
    jobs = opts.get("jobs") or 1
    big = (jobs > 1 and path != "-" and src.compression is None and src.size is not None
           and src.size >= _par.PARALLEL_MIN)
    # CSV records may span lines (quoted newlines), so a CSV file cannot be cut
    # into ranges at arbitrary newlines: it is parsed here, in order.
    big_ok = lambda: not (isinstance(feed.parser, TabularParser) and feed.parser.fmt == "csv")
    with src:
        try:
            for chunk in src.chunks():
                feed.feed(chunk)
                done[0] = base + src.position()
                report()
                if feed.failed:
                    return
                if big and big_ok():
                    break
            else:
                feed.finish()
                return
        except TruncatedInput as e:
            feed.finish()
            summary.truncated.append(str(e))
            return
        except SourceError as e:
            summary.errors.append(str(e))
            return
        # A large file: its first chunk (the header, the format) was read
        # here; the rest is parsed by worker processes.
        offset = src.position()
    assert src.size is not None         # (big is only set for files of a known size)
    for p, pos in _par.parallel_parse(path, offset, src.size, feed.parser, jobs, feed.line):
        loader.add(p)
        done[0] = base + pos
        report()


def _follow(inputs: Iterable[str], opts: dict, loader: Loader, summary: Summary,
            stop: Callable[[], bool] | None, poll: float, stdin: BinaryIO | None,
            report: Callable[[], None]) -> None:
    tails: list[tuple[Tail, _Feed]] = []
    for path in inputs:
        if path == "-":
            # a pipe cannot be re-opened: read it to its end (it may be a live
            # `tail -f`), loading as lines come
            _read_one(path, opts, loader, summary, stdin, [0], report)
            continue
        try:
            src = open_source(path)
            compressed = src.compression
            src.close()
        except SourceError:
            compressed = None               # not there yet: wait for it
        if compressed:
            summary.errors.append(f"{path}: cannot follow a {compressed} file; read once")
            _read_one(path, opts, loader, summary, None, [0], report)
            continue
        try:
            tail = Tail(path)
        except SourceError as e:
            summary.errors.append(str(e))
            continue
        summary.sources.append(path)
        tails.append((tail, _Feed(path, opts, loader, summary)))
    try:
        while tails and not (stop is not None and stop()):
            got = False
            for tail, feed in tails:
                data = tail.poll()
                while data:
                    got = True
                    # keep chunks at parser size even after a long pause
                    cut = data.rfind(b"\n", 0, 4 << 20) + 1 if len(data) > 4 << 20 else len(data)
                    feed.feed(data[:cut])
                    data = data[cut:]
            loader.tick()
            if got:
                report()
            else:
                time.sleep(poll)
    finally:
        for tail, feed in tails:
            tail.close()
            feed.finish()           # an open quoted CSV record is reported, never dropped
