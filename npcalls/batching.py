"""Batch semantics: putting a batch in bucket order and grouping repeated Call-IDs.

A batch must behave exactly like the same single operations in order, so a
Call-ID that occurs several times in one batch is one *group*, and only its
first occurrence (in batch order) that carries a value may change the row.

Writers sort each batch by the high 32 bits of its tags: that order is the
home-bucket order (bucket = hi32 * nbuckets >> 32), which the placement needs
and which turns the table accesses of the batch into one forward sweep.  The
sort is an LSD radix sort of two stable 16-bit passes (numpy radix-sorts
16-bit keys in linear time), about 3x faster than a comparison sort of the
64-bit tags.  Being stable, it keeps the occurrences of one key in batch order.

Large batches are cut into slices of :data:`SLICE` keys, each encoded,
hashed, grouped and written on its own (:func:`run_in_slices`), so a batch's
temporaries (the fixed-width key fields, tags, sort permutations, probe
results: a few hundred bytes per key) are bounded by the slice, not by the
batch.  A batch is exactly the single operations in order, and so is a run
of consecutive slices of it: a Call-ID repeated across a slice boundary is
found by the later slice exactly as a later single call would find it.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import numpy as np

from . import probe, protocol
from .crashpoints import crashpoint
from .layout import NOT_SET, W
from .probe import rows_equal
from .readlock import SharedReadLock
from .storage import Mapping

__all__ = ["bucket_order", "Groups", "group_sorted", "record_locked", "remove_locked",
           "lookup_read", "SLICE", "as_batch", "run_in_slices"]

_W_COUNT, _W_TOMB = W["count"], W["tombstones"]
_W_NSTART, _W_NSTOP = W["n_started"], W["n_stopped"]

_U = np.uint64


def bucket_order(tags: np.ndarray) -> np.ndarray:
    """A stable permutation sorting ``tags`` by their high 32 bits."""
    lo = (tags >> _U(32)).astype(np.uint16)
    order = np.argsort(lo, kind="stable")
    hi = (tags[order] >> _U(48)).astype(np.uint16)
    return order[np.argsort(hi, kind="stable")]


class Groups(NamedTuple):
    """The distinct keys of a batch already in bucket order.

    Attributes
    ----------
    order : numpy.ndarray
        Permutation of the batch such that occurrences of one key are
        contiguous and in batch order, and groups are in bucket order.
    group : numpy.ndarray
        Group number (0..g-1, ascending) of each row of the *sorted* batch.
    first : numpy.ndarray
        Sorted-batch position of the first row of each group.
    tags : numpy.ndarray
        The tags in that order (``tag[order]``).
    """

    order: np.ndarray
    group: np.ndarray
    first: np.ndarray
    tags: np.ndarray


def group_sorted(tag: np.ndarray, keyq: np.ndarray) -> Groups:
    """Order a batch by bucket and group equal keys.

    Parameters
    ----------
    tag : numpy.ndarray
        uint64 tags (n,).
    keyq : numpy.ndarray
        Padded keys as uint64 lanes (n, k).
    """
    n = len(tag)
    order = bucket_order(tag)
    ts = tag[order]
    if n < 2:
        return Groups(order, np.zeros(n, np.int64), np.zeros(min(n, 1), np.int64), ts)
    hi = ts >> _U(32)
    same_hi = hi[1:] == hi[:-1]
    cand = np.flatnonzero(same_hi)
    newgroup = np.ones(n, bool)
    if len(cand):
        a, b = order[cand], order[cand + 1]
        eq = (ts[cand] == ts[cand + 1]) & rows_equal(keyq[a], keyq[b])
        if not eq.all():
            # A run of equal hi32 holds several distinct keys (a 32-bit
            # coincidence, ~n**2 / 2**33 of them per batch): reorder each such
            # run so that equal keys become neighbours, keeping batch order.
            order = _regroup_mixed_runs(order, tag, keyq, same_hi, cand[~eq])
            ts = tag[order]
            a, b = order[cand], order[cand + 1]
            eq = (ts[cand] == ts[cand + 1]) & rows_equal(keyq[a], keyq[b])
        newgroup[cand + 1] = ~eq
    group = np.cumsum(newgroup) - 1
    return Groups(order, group, np.flatnonzero(newgroup), ts)


def _regroup_mixed_runs(order: np.ndarray, tag: np.ndarray, keyq: np.ndarray,
                        same_hi: np.ndarray, mixed_pairs: np.ndarray) -> np.ndarray:
    order = order.copy()
    run_start = np.flatnonzero(np.r_[True, ~same_hi])          # start of every equal-hi32 run
    run_of_pair = np.searchsorted(run_start, mixed_pairs, side="right") - 1
    run_end = np.r_[run_start[1:], len(order)]
    for r in np.unique(run_of_pair):
        lo, hi = int(run_start[r]), int(run_end[r])
        members = order[lo:hi]                                  # batch order within the run
        first_seen: dict[bytes, int] = {}
        keyed = []
        for rank, p in enumerate(members):
            k = keyq[p].tobytes()
            keyed.append((first_seen.setdefault(k, rank), rank, p))
        keyed.sort()
        order[lo:hi] = [p for _, _, p in keyed]
    return order


SLICE = 1 << 18
"""Keys per slice of a large write batch: ~100 MB of temporaries at most, while the
per-slice overhead (a few numpy calls per probe round) stays well under 1%."""


def as_batch(keys: Any) -> Any:
    """``keys`` as a sliceable sequence with a length, without copying lists or arrays.

    Lists, tuples and 1-d arrays are kept (an n-d array is flattened, as the
    key encoder does); any other iterable is read into a list once.  A single
    ``str``/``bytes`` is refused here, with the encoder's message.
    """
    if isinstance(keys, np.ndarray):
        return keys if keys.ndim == 1 else keys.reshape(-1)
    if isinstance(keys, (str, bytes)):
        raise TypeError("keys must be a sequence of Call-IDs, not a single "
                        f"{type(keys).__name__} (use start()/stop()/get() for one key)")
    if isinstance(keys, (list, tuple)):
        return keys
    return list(keys)


def run_in_slices(n: int, size: int,
                  step: Callable[[int, int], tuple[np.ndarray, list]]) -> tuple[np.ndarray, list]:
    """Run ``step(a, b)`` over consecutive slices ``a:b`` of a batch of ``n`` keys, in order.

    ``step`` encodes and writes one slice and returns its refused keys'
    positions (relative to ``a``) and reasons.  Returns the refused positions
    in the whole batch (ascending) and their reasons, for one
    :class:`~npcalls.errors.BatchKeyError` at the end, as an unsliced batch
    would raise.
    """
    bad: list[np.ndarray] = []
    reasons: list[str] = []
    for a in range(0, n, size):
        b = min(a + size, n)
        sbad, sreasons = step(a, b)
        if len(sbad):
            bad.append(np.asarray(sbad, np.intp) + a)
            reasons.extend(sreasons)
    return (np.concatenate(bad) if bad else np.empty(0, np.intp)), reasons
def record_locked(m: Mapping, w: int, idx: np.ndarray | None, keyq: np.ndarray, tag: np.ndarray,
                  sv: np.ndarray | None, ev: np.ndarray | None, insert: bool,
                  started: np.ndarray, ended: np.ndarray,
                  make_room: Callable[[Mapping, int], tuple[Mapping, int]]) -> int:
    """Record a batch's start (``sv``) and end (``ev``) times, exactly as the same single
    operations in batch order would (lock held; ``w`` the even writer sequence).

    ``idx``: the batch positions to apply (None: all); ``started`` and
    ``ended`` are set True where this batch recorded a time; ``make_room``
    grows or compacts the table for the new keys and returns the mapping and
    writer sequence to use.  Returns the probe rounds taken.
    """
    t = tag if idx is None else tag[idx]
    kq = keyq if idx is None else keyq[idx]
    grp = group_sorted(t, kq)
    o = grp.order
    rep = o[grp.first]                  # position of each key's first row
    rt = grp.tags[grp.first]            # t[rep], read in order
    while True:
        f = probe.lookup(m, rt, kq, consistent=False, want_rows=True, key_index=rep)
        found = f.slot >= 0
        new_groups = np.flatnonzero(~found) if insert else np.empty(0, np.int64)
        if not len(new_groups):
            break
        m2, w = make_room(m, len(new_groups))
        if m2 is m:
            break
        m = m2                          # rebuilt: slots moved, look again
    rounds = f.rounds
    q = m.q
    seq_odd = w + 1
    protocol.open_op(q, w)
    gid = grp.group
    ngroups = len(rep)
    new_vals = {1: np.full(ngroups, NOT_SET, np.int64), 2: np.full(ngroups, NOT_SET, np.int64)}
    upd_vals = {1: np.full(ngroups, NOT_SET, np.int64), 2: np.full(ngroups, NOT_SET, np.int64)}
    for vals, col, out, counter in ((sv, 1, started, _W_NSTART), (ev, 2, ended, _W_NSTOP)):
        if vals is None:
            continue
        v = (vals if idx is None else vals[idx])[o]     # sorted batch order
        rows = np.flatnonzero(v != NOT_SET)
        if not len(rows):
            continue
        if ngroups == len(gid):         # no key twice: each row is its key's only one
            win = wg = rows
        else:
            g = gid[rows]
            lead = np.ones(len(rows), bool)
            lead[1:] = g[1:] != g[:-1]
            win, wg = rows[lead], g[lead]   # the first row with a value, per key
        fnd = found[wg]
        cur = (f.start if col == 1 else f.end)[wg]
        upd = fnd & (cur == NOT_SET)
        if upd.any():
            protocol.set_fields(m, f.slot[wg[upd]], col, v[win[upd]], seq_odd)
            upd_vals[col][wg[upd]] = v[win[upd]]
        rec = upd
        if insert:
            new_vals[col][wg[~fnd]] = v[win[~fnd]]
            rec = upd | ~fnd
        hit_rows = o[win[rec]]
        out[hit_rows if idx is None else idx[hit_rows]] = True
        q[counter] += int(np.count_nonzero(rec))
    # Calls that got their second time in this batch enter the duration histogram.
    # A new call gets both times only from a batch that gives both: otherwise
    # only the calls found can be done, and a batch of new calls skips this.
    sel: Any = (slice(None) if sv is not None and ev is not None
                else np.flatnonzero(found))
    fnd = found[sel]
    if len(fnd):
        s_old = np.where(fnd, f.start[sel], NOT_SET)
        e_old = np.where(fnd, f.end[sel], NOT_SET)
        s_new = np.where(s_old != NOT_SET, s_old, np.where(fnd, upd_vals[1][sel], new_vals[1][sel]))
        e_new = np.where(e_old != NOT_SET, e_old, np.where(fnd, upd_vals[2][sel], new_vals[2][sel]))
        done = (s_new != NOT_SET) & (e_new != NOT_SET) & ((s_old == NOT_SET) | (e_old == NOT_SET))
        if done.any():
            protocol.observe_durations(q, e_new[done] - s_new[done])
    crashpoint("batch-fields-set")
    if len(new_groups):
        fields = kq.view(f"S{m.geometry.key_field}").reshape(len(kq))
        _, pr, reused = probe.place(m, rt[new_groups], fields, rep[new_groups],
                                    new_vals[1][new_groups], new_vals[2][new_groups], seq_odd)
        rounds += pr
        crashpoint("batch-placed")
        q[_W_COUNT] += len(new_groups)
        q[_W_TOMB] -= reused
    protocol.close_op(q, w)
    return rounds


def remove_locked(m: Mapping, w: int, tag: np.ndarray, keyq: np.ndarray) -> tuple[np.ndarray, int]:
    """Remove the keys of a batch that are present (lock held; ``w`` the even writer sequence).

    Returns the batch positions that removed a key (a key's first
    occurrence) and the probe rounds taken.
    """
    grp = group_sorted(tag, keyq)
    rep = grp.order[grp.first]
    f = probe.lookup(m, grp.tags[grp.first], keyq, consistent=False, want_rows=False, key_index=rep)
    hit = np.flatnonzero(f.slot >= 0)
    if len(hit):
        with protocol.Operation(m.q, w):
            protocol.free_slots(m, w, f.slot[hit])
    return rep[hit], f.rounds


def lookup_read(live_mapping: Callable[[], Mapping], rl: SharedReadLock | None, tag: np.ndarray,
                keyq: np.ndarray, stuck_ok: Callable[[], bool]) -> probe.Found:
    """A reader's batch lookup (``get_many``): lock-free, or under ``rl`` per slice of keys."""
    if rl is None:
        return probe.lookup(live_mapping(), tag, keyq, consistent=True,
                            want_rows=True, stuck_ok=stuck_ok)
    # Shared mode: under the shared lock no writer runs, so rows are read
    # as they are; the lock is taken per slice so that writers wait for one
    # slice at most, never for a whole large batch.
    n = len(tag)
    if n <= probe.CHUNK:
        with rl:
            return probe.lookup(live_mapping(), tag, keyq, consistent=False,
                                want_rows=True)
    slot = np.empty(n, np.int64)
    start = np.empty(n, np.int64)
    end = np.empty(n, np.int64)
    rounds = 0
    for c in range(0, n, probe.CHUNK):
        sl = slice(c, c + probe.CHUNK)
        with rl:
            f = probe.lookup(live_mapping(), tag[sl], keyq[sl], consistent=False,
                             want_rows=True)
        slot[sl], start[sl], end[sl] = f.slot, f.start, f.end
        rounds = max(rounds, f.rounds)
    return probe.Found(slot, start, end, rounds)
