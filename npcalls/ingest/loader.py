"""From parsed chunks to the table: batching, acc/CDR reconciliation, counting.

Events of many chunks are pooled and written with one
:meth:`~npcalls.CallTable.record_many` per batch.  ``record_many`` sets a
call's start and end where they are unset and inserts absent calls, keeping
the first value it sees, so the order of a BYE and its INVITE in the log does
not matter, a re-INVITE does not move a start, and a BYE without its INVITE
leaves an end-only call.

Reconciling acc lines and CDRs: a call described by both must be counted once
and get the acc lines' times (a CDR's times are the dialog's: confirmation by
ACK, the BYE request, a few ms off).  Within a batch the acc rows come first,
so they win; across batches the danger is a CDR applied before the acc line
it duplicates, and Kamailio writes the CDR a few ms *before* the BYE's acc
line (or a few ms after it: both orders occur).  So CDR rows wait until
10,000 more lines have been read (or, following a live log, two seconds)
before they are applied, which lets the acc lines of their call land first.
A CDR alone still gives a call, and fills what the acc lines of its call lack
(the start of a call whose INVITE predates the log).

Before writing, each batch is folded to one row per Call-ID (a 64-bit hash
of the key, a stable sort, first value per call): a call's INVITE, BYE and
CDR lines then cost the table one probe instead of three.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

from ..errors import BatchKeyError
from ..layout import NOT_SET
from .common import Parsed
from .summary import Summary

__all__ = ["Loader", "aggregate", "DEFAULT_BATCH"]

DEFAULT_BATCH = 500_000
"""Event rows pooled per table write."""

CDR_LINES = 10_000
"""Lines read after a CDR before it is applied (see the module docstring)."""

_M1 = np.uint64(0x9E3779B97F4A7C15)
_S31 = np.uint64(31)
_S29 = np.uint64(29)


def _row_hash(keys: np.ndarray) -> np.ndarray:
    """A 64-bit hash per key (not the table's: only used to group a batch)."""
    n = len(keys)
    w = keys.dtype.itemsize
    w8 = -(-w // 8) * 8
    k = keys if w8 == w and keys.flags.c_contiguous else keys.astype(f"S{w8}")
    lanes = k.view(np.uint64).reshape(n, w8 // 8)
    h = np.full(n, w8, np.uint64)
    for j in range(lanes.shape[1]):
        # a multiply carries every bit of a lane into the high bits, which
        # are the ones used (collisions only cost speed: they are checked)
        h ^= lanes[:, j]
        h *= _M1
    h ^= h >> _S31
    h *= _M1
    h ^= h >> _S29
    return h


def aggregate(keys: np.ndarray, start: np.ndarray, end: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fold rows to one per key: the first start and the first end each key has, in row order.

    Exactly what :meth:`~npcalls.CallTable.record_many` would keep from the
    same rows, with fewer rows for it to look up.

    Parameters
    ----------
    keys : numpy.ndarray
        ``S`` array of Call-IDs.
    start, end : numpy.ndarray
        int64 ns, ``NOT_SET`` where a row does not know.
    """
    n = len(keys)
    if n < 2:
        return keys, start, end
    # Sort (hash, row) pairs packed in one uint64 -- the high bits of the hash,
    # the row number in the low bits -- with an unstable sort of plain
    # integers (faster than a stable argsort): rows of one key come out
    # together and in log order.  Keys whose high hash bits collide are
    # caught by the comparison below.
    bits = max(20, int(n).bit_length())
    low = np.uint64((1 << bits) - 1)
    packed = (_row_hash(keys) & ~low) | np.arange(n, dtype=np.uint64)
    packed.sort()
    order = (packed & low).astype(np.intp)
    hs = packed >> np.uint64(bits)
    newg = np.empty(n, bool)
    newg[0] = True
    np.not_equal(hs[1:], hs[:-1], out=newg[1:])
    gid = np.cumsum(newg) - 1
    first = np.flatnonzero(newg)
    ks = keys[order]
    # every row of a group must hold the group's key: neighbours in one group are equal
    if not (ks[1:] == ks[:-1])[~newg[1:]].all():
        return keys, start, end               # a hash collision: let record_many group them
    uk = ks[first]
    out = []
    for src in (start, end):
        v = src[order]
        col = np.full(len(first), NOT_SET, np.int64)
        idx = np.flatnonzero(v != NOT_SET)
        if len(idx):
            g = gid[idx]
            lead = np.empty(len(idx), bool)
            lead[0] = True
            np.not_equal(g[1:], g[:-1], out=lead[1:])
            col[g[lead]] = v[idx[lead]]
        out.append(col)
    return uk, out[0], out[1]


class _Part:
    __slots__ = ("keys", "start", "end", "line", "t")

    def __init__(self, keys: np.ndarray, start: np.ndarray, end: np.ndarray,
                 line: int = 0, t: float = 0.0) -> None:
        self.keys, self.start, self.end, self.line, self.t = keys, start, end, line, t


class Loader:
    """Pool parsed chunks and write them to a table in large batches.

    Parameters
    ----------
    table : CallTable
        Open for writing.
    batch_rows : int
        Event rows pooled before a table write.
    max_problems : int
        Problems kept with their text in the summary (all are counted).
    cdr_lines : int
        A CDR row waits until this many more lines have been read before it
        is applied (the acc line it duplicates is a few lines away at most).
    cdr_delay : float or None
        Or until it has waited this many seconds (live inputs, where lines may
        come slowly); None: no time limit.
    flush_interval : float or None
        Also write whenever this many seconds passed since the last write
        (live inputs); None: only when a batch is full, and at the end.
    aggregate : bool
        Fold each batch to one row per Call-ID first (a speed-up; the result
        is the same either way).
    background : bool
        Write batches from a helper thread while the caller parses on
        (batches stay in order; errors surface at the next flush or close).
    """

    def __init__(self, table: Any, *, batch_rows: int = DEFAULT_BATCH, max_problems: int = 10,
                 cdr_lines: int = CDR_LINES, cdr_delay: float | None = None,
                 flush_interval: float | None = None,
                 aggregate: bool = True, background: bool = False,
                 summary: Summary | None = None) -> None:
        self.table = table
        self.batch_rows = max(1, int(batch_rows))
        self.max_problems = max_problems
        self.cdr_lines = cdr_lines
        self.cdr_delay = cdr_delay
        self.flush_interval = flush_interval
        self.aggregate = aggregate
        self.summary = summary if summary is not None else Summary(key_width=table.key_width)
        self._acc: list[_Part] = []
        self._cdr_wait: list[_Part] = []
        self._rows = 0
        self._fold = False
        self._last_flush = time.monotonic()
        self._cand: list[np.ndarray] = []
        self._ncand = 0
        self.writes = 0
        """Number of record_many calls made."""
        self.background = background
        self._pool: Any = None
        self._inflight: Any = None

    @property
    def pending(self) -> int:
        """Event rows not written yet (CDR rows waiting included)."""
        return self._rows + sum(len(p.keys) for p in self._cdr_wait)

    def add(self, p: Parsed) -> None:
        """Take a parsed chunk's counts, problems and events; write if a batch is full."""
        s = self.summary
        s.lines += p.lines
        s.acc_lines += p.acc_lines
        s.cdr_lines += p.cdr_lines
        s.records += p.records
        s.failed += p.failed
        s.ignored += p.ignored
        s.bad += p.bad
        s.too_long += p.too_long
        room = self.max_problems - len(s.problems)
        if room > 0 and p.problems:
            s.problems.extend(p.problems[:room])
        self._fold |= p.fold
        if len(p.acc_keys):
            self._acc.append(_Part(p.acc_keys, p.acc_start, p.acc_end))
            self._rows += len(p.acc_keys)
        if len(p.cdr_keys):
            self._cdr_wait.append(_Part(p.cdr_keys, p.cdr_start, p.cdr_end, s.lines,
                                        time.monotonic()))
            self._rows += len(p.cdr_keys)
        if self._rows >= self.batch_rows:
            self.flush()
        elif self.flush_interval is not None and self.pending \
                and time.monotonic() - self._last_flush >= self.flush_interval:
            self.flush()

    def tick(self) -> None:
        """Write what is due (live inputs call this while waiting for more lines)."""
        if self.flush_interval is not None and self.pending \
                and time.monotonic() - self._last_flush >= self.flush_interval:
            self.flush()

    def flush(self, final: bool = False) -> None:
        """Write the pooled rows (CDR rows only once they have waited; all of them if final)."""
        now = time.monotonic()
        lines = self.summary.lines
        release: list[_Part] = []
        keep: list[_Part] = []
        for part in self._cdr_wait:
            if (final or lines - part.line >= self.cdr_lines
                    or (self.cdr_delay is not None and now - part.t >= self.cdr_delay)):
                release.append(part)
            else:
                keep.append(part)
        self._cdr_wait = keep
        parts = self._acc + release            # acc rows first: their times win
        self._acc = []
        self._rows = 0
        self._last_flush = now
        if parts:
            self._wait()
            if self.background and not final:
                # numpy releases the GIL for most of a table write: let the
                # next chunks be parsed meanwhile (one write in flight at most,
                # so batches still reach the table in order)
                if self._pool is None:
                    from concurrent.futures import ThreadPoolExecutor
                    self._pool = ThreadPoolExecutor(1, thread_name_prefix="npcalls-write")
                self._inflight = self._pool.submit(self._write, parts)
            else:
                self._write(parts)

    def _wait(self) -> None:
        f, self._inflight = self._inflight, None
        if f is not None:
            f.result()

    def _write(self, parts: list[_Part]) -> None:
        if len(parts) == 1:
            keys, start, end = parts[0].keys, parts[0].start, parts[0].end
        else:
            keys = np.concatenate([p.keys for p in parts])
            start = np.concatenate([p.start for p in parts])
            end = np.concatenate([p.end for p in parts])
        if self.aggregate and self._fold:
            keys, start, end = aggregate(keys, start, end)
        s = self.summary
        try:
            started, ended = self.table.record_many(keys, start, end, insert=True,
                                                    errors="raise")
        except BatchKeyError as e:
            # the parsers check keys against the table first; this is a safety net
            started, ended = e.result
            s.bad += len(e.positions)
        self.writes += 1
        s.started += int(np.count_nonzero(started))
        s.ended += int(np.count_nonzero(ended))
        cand = (end != NOT_SET) & (start == NOT_SET) & ended
        if cand.any():
            c = keys[cand]
            self._cand.append(c)
            self._ncand += len(c)
            if self._ncand > 2_000_000 and self.flush_interval is not None:
                self._settle_candidates()

    def _settle_candidates(self) -> None:
        """Count end-only calls among the candidates, and forget them."""
        if not self._cand:
            return
        keys = np.unique(np.concatenate(self._cand))
        self._cand, self._ncand = [], 0
        r = self.table.get_many(keys, errors="ignore")
        self.summary.end_only += int(np.count_nonzero(r.found & (r.start == NOT_SET)
                                                      & (r.end != NOT_SET)))

    def close(self) -> Summary:
        """Write everything left and return the summary."""
        try:
            self.flush(final=True)
            self._wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
        self._settle_candidates()
        return self.summary


ProgressFn = Callable[[int, int, int | None], None]
