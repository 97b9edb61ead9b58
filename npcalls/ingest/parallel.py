"""Parsing a large file on several cores.

The file is cut into byte ranges of a few MB at line boundaries; worker
processes parse the ranges (each opens the file itself, so only the small
result arrays cross process boundaries) while this process writes the
results to the table in file order.  Line numbers are counted per range and
shifted here, so problems are reported exactly as by a single process.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, Iterator

from . import sources as _sources
from .common import Parsed

__all__ = ["PARALLEL_MIN", "TASK_BYTES", "default_jobs", "ranges", "parse_range",
           "parallel_parse"]

PARALLEL_MIN = 48 << 20
"""Files smaller than this are parsed in-process (starting workers costs more)."""

TASK_BYTES = 16 << 20
"""Bytes per task: enough work to hide the hand-over, small enough to balance."""


def default_jobs() -> int:
    """Worker processes to use: the CPUs this process may run on (``os.sched_getaffinity``).

    A container or ``taskset`` limit is honoured; the load of the moment is
    not guessed at (the scheduler shares the cores, and a parse that takes
    every allowed core is what a batch load wants).  ``--jobs`` overrides it.
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def ranges(start: int, size: int, task: int = TASK_BYTES) -> list[tuple[int, int]]:
    """Byte ranges ``[a, b)`` covering ``[start, size)`` of a file."""
    out = []
    while start < size:
        end = min(size, start + task)
        out.append((start, end))
        start = end
    return out


def parse_range(path: str, start: int, end: int, parser: Any) -> list[Parsed]:
    """Parse the lines that *start* in ``[start, end)`` of a file (in a worker).

    A line that straddles ``start`` belongs to the previous range, one that
    straddles ``end`` to this one.  Problem line numbers count from the
    range's first line (the caller shifts them).
    """
    out: list[Parsed] = []
    with open(path, "rb") as f:
        if start > 0:
            f.seek(start - 1)
            if f.read(1) != b"\n":
                f.readline()
        pos = f.tell()
        line = 0
        while pos < end:
            data = f.read(min(_sources.CHUNK, end - pos))
            if not data:
                break
            if data[-1] != 10:
                data += f.readline()
                if data[-1] != 10:
                    data += b"\n"               # the file's last line had no newline
            pos += len(data)
            p = parser.parse(data, line, path)
            line += p.lines
            out.append(p)
    return out


def _context() -> Any:
    # fork is fast and inherits the imports; it is only safe while this
    # process runs a single thread
    if threading.active_count() == 1 and "fork" in mp.get_all_start_methods():
        return mp.get_context("fork")
    return mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods()
                          else "spawn")


def parallel_parse(path: str, offset: int, size: int, parser: Any, jobs: int,
                   base_line: int = 0, task_bytes: int | None = None
                   ) -> Iterator[tuple[Parsed, int]]:
    """Yield ``(parsed chunk, bytes done)`` for a file, in file order, parsed by ``jobs`` processes.

    Parameters
    ----------
    path : str
        A regular, uncompressed file.
    offset : int
        Where to start (a line start: what was already read in-process).
    size : int
        Where to stop (the size when the load started).
    parser : object
        A picklable parser (an ``AccParser``, or a ``TabularParser`` that has
        seen its header); each task gets a copy.
    jobs : int
        Worker processes.
    base_line : int
        Lines before ``offset`` (for problem line numbers).
    task_bytes : int, optional
        Bytes per task (default :data:`TASK_BYTES`).
    """
    tasks = ranges(offset, size, task_bytes or TASK_BYTES)
    window = 2 * jobs
    with ProcessPoolExecutor(max_workers=jobs, mp_context=_context()) as ex:
        pending: list[tuple[Future, int]] = []
        it = iter(tasks)
        try:
            for a, b in it:
                pending.append((ex.submit(parse_range, path, a, b, parser), b))
                if len(pending) >= window:
                    break
            base = base_line
            while pending:
                fut, done = pending.pop(0)
                nxt = next(it, None)
                if nxt is not None:
                    pending.append((ex.submit(parse_range, path, nxt[0], nxt[1], parser), nxt[1]))
                range_base = base
                for p in fut.result():
                    if p.problems:
                        p.problems = [q._replace(line=q.line + range_base) for q in p.problems]
                    base += p.lines
                    yield p, done
        finally:
            for fut, _ in pending:
                fut.cancel()
