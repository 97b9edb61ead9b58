"""Reads of the whole table: snapshot, times, stats and counters.

Lock-free, by the one-read rule of docs/format.md, "Reading without a lock"
(``wseq`` before, each row's ``seq`` after; rows a writer touched meanwhile
are read again, and a call that moved while the copy ran is kept once);
in the shared read mode (docs/format.md, "Read modes and platforms") the
copy is made under the shared lock instead.  The header words read here are
listed in docs/format.md, "Header, dynamic words".
"""

from __future__ import annotations

import time
from typing import Callable, NamedTuple

import numpy as np

from . import probe
from .layout import DURATION_BOUNDS_S, NOT_SET, W, snapshot_dtype
from .locking import lock_holder
from .readlock import SharedReadLock
from .storage import Mapping

__all__ = ["Counters", "Stats", "snapshot", "times", "reread_rows", "stats", "counters"]

_W_WSEQ, _W_COUNT, _W_TOMB = W["wseq"], W["count"], W["tombstones"]
_W_NSTART, _W_NSTOP, _W_NREM = W["n_started"], W["n_stopped"], W["n_removed"]
_W_DURSUM, _W_DUR0 = W["dur_sum_us"], W["dur_bucket_0"]


class Counters(NamedTuple):
    """What :meth:`CallTable.counters` reports: header words only, no pass over the rows."""

    # The header words of docs/format.md, "Header, dynamic words" (generation: static part).
    capacity: int
    limit: int
    count: int  # type: ignore[assignment]  # public field name; shadows tuple.count
    tombstones: int
    generation: int
    n_started: int          # monotonic, like the n_* below: they survive expire and rebuilds
    n_stopped: int
    n_removed: int          # rows removed by remove/expire
    n_rebuilds: int         # in this table's lineage
    n_recoveries: int       # crashed writers recovered from
    duration_bounds_s: tuple[int, ...]
    """Upper bounds of the duration buckets (seconds); a last bucket holds the rest."""
    duration_buckets: tuple[int, ...]
    """Calls per bucket (not cumulative), len(duration_bounds_s) + 1 entries."""
    duration_sum_s: float


class Stats(NamedTuple):
    """What :meth:`CallTable.stats` reports."""

    path: str
    capacity: int
    count: int  # type: ignore[assignment]  # public field name; shadows tuple.count
    limit: int
    load_factor: float
    key_width: int
    bytes_per_slot: int
    file_bytes: int
    tombstones: int
    active: int
    ended: int
    end_only: int
    max_probe: int
    mean_probe: float
    generation: int
    n_started: int
    n_stopped: int
    n_removed: int
    n_rebuilds: int
    n_recoveries: int
    auto_grow: bool
    writer_pid: int | None


def snapshot(live_mapping: Callable[[], Mapping], rl: SharedReadLock | None,
             stuck_ok: Callable[[], bool]) -> np.ndarray:
    """What :meth:`CallTable.snapshot` returns, from the mapping ``live_mapping()`` gives.

    With ``rl`` (the shared read mode) the copy is made under that lock;
    otherwise rows are validated by their versions and re-read
    (:func:`reread_rows`), ``stuck_ok`` telling whether a writer that left rows
    mid-write is dead.
    """
    if rl is not None:
        # Shared mode: one consistent copy under the shared lock (writers wait
        # for the copy: ~75 ms per million rows on the reference machine).
        with rl:
            m = live_mapping()
            tags = m.tags.copy()
            live = np.flatnonzero(tags >= 2)
            rows = np.take(m.rowq, live, axis=0)
    else:
        m = live_mapping()
        q = m.q
        w1 = q[_W_WSEQ]
        tags = m.tags.copy()
        live = np.flatnonzero(tags >= 2)
        rows = np.take(m.rowq, live, axis=0)
        unstable = np.flatnonzero(~probe.row_is_stable(m.seqcol[live], w1, None, q))
        if len(unstable):
            live, rows = reread_rows(m, live, rows, tags[live], unstable, stuck_ok)
    kw, kf = m.geometry.key_width, m.geometry.key_field
    out = np.empty(len(live), snapshot_dtype(kw))
    out["start"] = rows[:, 1].view(np.int64)
    out["end"] = rows[:, 2].view(np.int64)
    keys = np.ascontiguousarray(rows[:, 3:]).view(f"S{kf}").reshape(len(live))
    out["key"] = keys if kf == kw else keys.astype(f"S{kw}")
    return out


def times(m: Mapping, stuck_ok: Callable[[], bool]) -> tuple[np.ndarray, np.ndarray]:
    """What :meth:`CallTable.times` returns: :func:`snapshot`'s rules, 16 bytes read per row."""
    w1 = m.q[_W_WSEQ]
    tags = m.tags.copy()
    live = np.flatnonzero(tags >= 2)
    se = np.take(m.rowq[:, 1:3], live, axis=0)     # one gather: both times of a row
    start, end = se[:, 0], se[:, 1]
    ok = probe.row_is_stable(m.seqcol[live], w1, None)   # versions read after the times
    if not ok.all():
        # Rows a writer touched meanwhile: re-read them whole (their keys
        # tell a call that moved from its older copy), as snapshot() does.
        lu = live[~ok]
        _, rows = reread_rows(m, lu, np.take(m.rowq, lu, axis=0), tags[lu],
                              np.arange(len(lu)), stuck_ok)
        start = np.concatenate([start[ok], rows[:, 1]])
        end = np.concatenate([end[ok], rows[:, 2]])
    return start.view(np.int64), end.view(np.int64)


def reread_rows(m: Mapping, live: np.ndarray, rows: np.ndarray, tag: np.ndarray,
                todo: np.ndarray, stuck_ok: Callable[[], bool]) -> tuple[np.ndarray, np.ndarray]:
    """Re-read rows a writer touched while a snapshot copied them.

    A call can move while a snapshot runs (removed from one slot, started
    again in another): the older copy of a key that a re-read found again
    is dropped, so that no key appears twice.
    """
    keep = np.ones(len(live), bool)
    when = np.zeros(len(live), np.int64)       # 0: first pass; k: k-th re-read round
    dead_w = None
    since = time.monotonic()
    rounds = 0
    while len(todo):
        rounds += 1
        w1 = m.q[_W_WSEQ]
        slots = live[todo]
        tg = np.take(m.tags, slots)
        r = np.take(m.rowq, slots, axis=0)
        ok = probe.row_is_stable(m.seqcol[slots], w1, dead_w, m.q)
        done = todo[ok]
        rows[done] = r[ok]
        tag[done] = tg[ok]
        when[done] = rounds
        keep[done[tg[ok] < 2]] = False          # removed meanwhile
        todo = todo[~ok]
        if len(todo) and time.monotonic() - since > 0.05:
            if w1 & 1 and stuck_ok():
                dead_w = int(w1)
            else:
                time.sleep(0.001)
    reread = np.flatnonzero((when > 0) & keep)
    if len(reread):
        cand = np.flatnonzero(keep & np.isin(tag, tag[reread]))
        newest: dict[bytes, int] = {}
        for i in cand[np.argsort(when[cand], kind="stable")]:
            k = rows[i, 3:].tobytes()
            j = newest.get(k)
            if j is not None:
                keep[j] = False                 # an older copy of this call
            newest[k] = i
    return live[keep], rows[keep]


def stats(m: Mapping, path: str, lock_path: str) -> Stats:
    """Counts, load and probe lengths (a pass over the table; takes no lock)."""
    g = m.geometry
    q = m.q
    pl = probe.probe_lengths(m)
    snap_start = m.rowq[:, 1].view(np.int64)
    snap_end = m.rowq[:, 2].view(np.int64)
    live = m.tags >= 2
    has_s = snap_start != NOT_SET
    has_e = snap_end != NOT_SET
    return Stats(
        path=path, capacity=g.capacity, count=int(q[_W_COUNT]), limit=g.limit,
        load_factor=int(q[_W_COUNT]) / g.capacity, key_width=g.key_width,
        bytes_per_slot=8 + g.row_size, file_bytes=g.file_size,
        tombstones=int(q[_W_TOMB]),
        active=int(np.count_nonzero(live & has_s & ~has_e)),
        ended=int(np.count_nonzero(live & has_s & has_e)),
        end_only=int(np.count_nonzero(live & ~has_s & has_e)),
        max_probe=int(pl.max()) if len(pl) else 0,
        mean_probe=float(pl.mean()) if len(pl) else 0.0,
        generation=g.generation, n_started=int(q[_W_NSTART]), n_stopped=int(q[_W_NSTOP]),
        n_removed=int(q[_W_NREM]), n_rebuilds=int(q[W["n_rebuilds"]]),
        n_recoveries=int(q[W["n_recoveries"]]), auto_grow=g.auto_grow,
        writer_pid=lock_holder(lock_path),
    )


def counters(m: Mapping) -> Counters:
    """What :meth:`CallTable.counters` returns: header words only, one by one, no lock."""
    g = m.geometry
    q = m.q
    b0 = _W_DUR0
    buckets = tuple(int(x) for x in q[b0:b0 + len(DURATION_BOUNDS_S) + 1])
    return Counters(
        capacity=g.capacity, limit=g.limit, count=int(q[_W_COUNT]),
        tombstones=int(q[_W_TOMB]), generation=g.generation,
        n_started=int(q[_W_NSTART]), n_stopped=int(q[_W_NSTOP]), n_removed=int(q[_W_NREM]),
        n_rebuilds=int(q[W["n_rebuilds"]]), n_recoveries=int(q[W["n_recoveries"]]),
        duration_bounds_s=DURATION_BOUNDS_S, duration_buckets=buckets,
        duration_sum_s=int(q[_W_DURSUM]) / 1e6,
    )
