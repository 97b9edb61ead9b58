"""Maintenance of a table: rebuild, grow, compact, make room, expire, check.

* :func:`rebuild` copies the live rows into a new file (growth, compaction,
  repair) and retires the old one (docs/format.md, "Rebuilding: growth and
  compaction"); :func:`grow` and :func:`make_room` (the policy of
  docs/format.md, "Hashing and probing": grow when full, compact when
  tombstones or the load near the capacity) decide when.
* :func:`expire` removes calls past a cutoff.
* :func:`check` verifies the invariants and repairs what can be repaired;
  :class:`CheckReport` is what it finds.

Each works on a mapping (and its path) with the writer lock held, and
returns the rebuilt mapping when it made one: the caller
(:class:`~npcalls.CallTable`) switches its handle to it.
"""

from __future__ import annotations

import os
import stat
from typing import Any, Callable, NamedTuple

import numpy as np

from . import probe, protocol
from .batching import bucket_order, group_sorted
from .crashpoints import crashpoint
from .errors import NpcallsError, TableFullError
from .hashing import tags_of
from .keys import encode_keys
from .layout import (
    DURATION_WORDS,
    MAX_CAPACITY,
    NOT_SET,
    STATE_LIVE,
    STATE_REMOVED,
    STATE_RETIRED,
    TOMBSTONE,
    W,
    make_geometry,
    snapshot_dtype,
)
from .storage import Mapping, build_temp, open_mapping, same_file, stale_temp_files

__all__ = ["CheckReport", "rebuild", "grow", "make_room", "expire", "check_header", "check",
           "rebuild_refusal", "sanitize_rows", "file_mode"]

_W_WSEQ, _W_COUNT, _W_TOMB, _W_STATE = W["wseq"], W["count"], W["tombstones"], W["state"]


def file_mode(fd: int) -> int:
    """Permission bits of an open file (a rebuilt file keeps its table's mode)."""
    return os.fstat(fd).st_mode & 0o7777


def rebuild_refusal(path: str, m: Mapping) -> str | None:
    """Why this process may not rebuild the table file, or None if it may.

    A rebuilt file replaces the old one by rename, so it must get the old
    file's owner, group and mode, and the rename must be allowed.  Only root
    can give a file to another user; a user can give it only a group it is a
    member of; a rename over another user's file in a sticky directory (such
    as /dev/shm) is refused by the kernel.  Checked before anything changes,
    so a refused rebuild leaves the table exactly as it was.
    """
    st = os.fstat(m.fd)
    euid = os.geteuid()
    d = os.path.dirname(os.path.abspath(path))
    if euid != 0:
        if st.st_uid != euid:
            return (f"cannot rebuild table {path}: it belongs to uid {st.st_uid}, and a rebuilt "
                    f"file would belong to uid {euid} (this user); grow or compact it as uid "
                    f"{st.st_uid} or as root")
        if st.st_gid != os.getegid() and st.st_gid not in os.getgroups():
            return (f"cannot rebuild table {path}: its group {st.st_gid} is not one of this "
                    f"user's groups, so the rebuilt file could not keep it; rebuild it as root")
    try:
        dst = os.stat(d)
    except OSError as e:
        return f"cannot rebuild table {path}: {d}: {e.strerror}"
    if not os.access(d, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
        return (f"cannot rebuild table {path}: no permission to create files in {d} (a rebuild "
                "writes a new file beside the table and renames it over the table)")
    if dst.st_mode & stat.S_ISVTX and euid != 0 and euid not in (st.st_uid, dst.st_uid):
        return (f"cannot rebuild table {path}: {d} is a sticky directory and the table belongs "
                f"to uid {st.st_uid}; only its owner or root may replace it")
    return None


class CheckReport(NamedTuple):
    """What :meth:`CallTable.check` found.

    Attributes
    ----------
    ok : bool
        No invariant is violated (notes do not count).
    problems : list of str
        Violated invariants.
    notes : list of str
        Conditions that are not violations (a crashed writer's unfinished
        recovery, stale temporary files).
    repaired : list of str
        What ``repair=True`` did.
    calls : int
        Live rows seen.
    """

    ok: bool
    problems: list
    notes: list
    repaired: list
    calls: int


def sanitize_rows(fields: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                   g: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """For repair: drop rows with invalid keys, merge duplicate keys, recompute tags."""
    dropped: list[str] = []
    enc = encode_keys(fields, g.key_width, g.key_field)
    if len(enc.bad):
        keep = np.ones(len(fields), bool)
        keep[enc.bad] = False
        dropped.append(f"dropped {len(enc.bad)} rows with invalid keys")
        fields, starts, ends = enc.fields[keep], starts[keep], ends[keep]
    else:
        fields = enc.fields
    tags = tags_of(fields, g.seed)
    keyq = np.ascontiguousarray(fields).view(np.uint64).reshape(len(fields), g.key_field // 8)
    grp = group_sorted(tags, keyq)
    if len(grp.first) < len(fields):
        o = grp.order
        ng = len(grp.first)
        st, en = np.full(ng, NOT_SET, np.int64), np.full(ng, NOT_SET, np.int64)
        for src, dst in ((starts[o], st), (ends[o], en)):
            has = np.flatnonzero(src != NOT_SET)
            gid = grp.group[has]
            lead = np.ones(len(has), bool)
            lead[1:] = gid[1:] != gid[:-1]
            dst[gid[lead]] = src[has[lead]]
        rep = o[grp.first]
        dropped.append(f"merged {len(fields) - ng} duplicate rows")
        fields, starts, ends, tags = fields[rep], st, en, tags[rep]
    return fields, starts, ends, tags, dropped


def rebuild(path: str, m: Mapping, capacity: int,
            rehash: bool = False) -> tuple[Mapping, list[str]]:
    """Copy every live row of ``m`` into a new file of ``capacity`` slots, renamed over ``path``.

    Lock held.  Returns the new file's mapping (the caller switches to it;
    ``m`` is left RETIRED) and, with ``rehash`` (repair: tags recomputed from
    the keys instead of trusted, rows whose key is invalid dropped, duplicate
    keys merged keeping the first start and first end), what was dropped.
    """
    g = m.geometry
    refusal = rebuild_refusal(path, m)
    if refusal:
        raise NpcallsError(refusal)
    st = os.fstat(m.fd)
    w = int(m.q[_W_WSEQ]) & ~1
    protocol.open_op(m.q, w)
    tmp = None
    retired = renamed = False
    try:
        live = np.flatnonzero(m.tags >= 2)
        rows = np.take(m.rowq, live, axis=0)
        fields = np.ascontiguousarray(rows[:, 3:]).view(f"S{g.key_field}").reshape(len(rows))
        starts = np.ascontiguousarray(rows[:, 1]).view(np.int64)
        ends = np.ascontiguousarray(rows[:, 2]).view(np.int64)
        dropped: list[str] = []
        if rehash:
            fields, starts, ends, tags, dropped = sanitize_rows(fields, starts, ends, g)
        else:
            tags = m.tags[live]
        order = bucket_order(tags)
        ng = make_geometry(capacity, g.key_width, g.seed, g.max_load, g.created_ns, g.flags,
                           g.generation + 1)
        if len(tags) > ng.limit:
            raise ValueError(f"capacity {capacity} cannot hold the {len(tags)} calls present "
                             f"at max load {g.max_load}")
        mode = stat.S_IMODE(st.st_mode)
        tmp = build_temp(path, ng, mode)
        if (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
            # the file replaces the table: it keeps the table's owner and group
            # (chown may drop set-id bits: the mode is set again after it)
            os.chown(tmp, st.st_uid, st.st_gid)
            os.chmod(tmp, mode)
        new = open_mapping(tmp, readonly=False)
        try:
            probe.place(new, tags[order], fields, order, starts[order], ends[order], 1)
            for name in ("n_started", "n_stopped", "n_removed", "n_recoveries", "lock_ino",
                         *DURATION_WORDS):
                new.q[W[name]] = m.q[W[name]]
            new.q[W["n_rebuilds"]] = m.q[W["n_rebuilds"]] + 1
            new.q[_W_COUNT] = len(tags)
            new.q[_W_WSEQ] = w + 2
            crashpoint("rebuild-built")
            # Retire first, then rename: a writer of the old file that takes
            # the lock after us re-opens the path; if we die in between, the
            # next writer finds the old file still at the path and revives it.
            m.q[_W_STATE] = STATE_RETIRED
            retired = True
            crashpoint("rebuild-retired")
            os.rename(tmp, path)
            renamed = True
        except BaseException:
            new.close()
            raise
    except BaseException:
        if tmp is not None and not renamed:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        if retired and not renamed:
            m.q[_W_STATE] = STATE_LIVE      # nothing replaced it: it is still the table
        protocol.close_op(m.q, w)
        raise
    new.path = path
    protocol.close_op(m.q, w)
    return new, dropped


def check_header(m: Mapping, settle: Callable[[], Mapping], notes: list, problems: list,
                 repaired: list, repair: bool) -> Mapping:
    """With the lock held, before :func:`check`: the header's state and writer sequence.

    An unknown state, a retired file nothing replaced (docs/format.md,
    "Rebuilding"), a writer sequence past 2**63 ("Writing"); ``settle`` gives
    the mapping to write once the lock is the table's.  Returns the mapping
    to check.
    """
    state = int(m.q[_W_STATE])
    if state not in (STATE_LIVE, STATE_RETIRED, STATE_REMOVED):
        problems.append(f"unknown table state {state} in the header")
        if repair:
            m.q[_W_STATE] = STATE_LIVE
            repaired.append("reset the header state to live")
    else:
        m = settle()
        if repair and m.q[_W_STATE] == STATE_RETIRED:
            m.q[_W_STATE] = STATE_LIVE
            repaired.append("made the table file live again (it was marked retired by "
                            "a rebuild that died before replacing it)")
    w = int(m.q[_W_WSEQ])
    if w >= protocol.WSEQ_WRAP:
        notes.append(f"the writer sequence {w} is past 2**63 (a corrupt header); the "
                     "next writer renumbers it")
        if repair:
            protocol.renumber(m)
            repaired.append("renumbered the writer sequence and row versions")
    return m


def check(path: str, m: Mapping, locked: bool, notes: list, problems: list, repaired: list,
          repair: bool) -> tuple[CheckReport, Mapping | None]:
    """Verify the invariants of ``m`` (see :meth:`CallTable.check`); with ``repair``, fix.

    ``locked``: the caller holds the writer lock (a read-only handle checks
    without it; counts a writer is changing are then notes, not problems).
    Returns the report and the rebuilt mapping if the repair rebuilt the table.
    """
    g = m.geometry
    q = m.q
    w = int(q[_W_WSEQ])
    crashed = bool(w & 1) and locked
    if crashed:
        notes.append("a writer died in the middle of an operation; the next writer "
                     "finishes its recovery automatically")
    # Versions against the writer sequence read before and after them: exact
    # with the lock held, and still certain without it (a read-only check).
    seq = m.seqcol.copy()
    w_after = int(q[_W_WSEQ])
    over = probe.overversioned(seq, w_after)
    n_over = int(np.count_nonzero(over))
    if n_over:
        first = int(np.flatnonzero(over)[0])
        problems.append(
            f"{n_over} rows versioned above the writer sequence {w_after} (first at slot "
            f"{first}, version {int(seq[first])}): no writer of this file wrote them, so the "
            "file was copied while a writer ran (cp of a live table) or is corrupt; readers "
            "take such rows as they are; `npcalls check --repair` rebuilds the table")
    odd_mask = ((seq & np.uint64(1)) != 0) & ~over
    odd = int(np.count_nonzero(odd_mask))
    # odd below the (even part of the) sequence read first: no operation in progress
    # can have left them; odd at it: the current (or a dead) writer's rows
    stuck = int(np.count_nonzero(odd_mask & (seq <= np.uint64(w & ~1))))
    if stuck:
        problems.append(f"{stuck} rows marked mid-write while no write is in progress")
    elif odd and not crashed:
        notes.append(f"{odd} rows marked mid-write by an operation in progress")
    tags = m.tags
    live = np.flatnonzero(tags >= 2)
    n_tomb = int(np.count_nonzero(tags == TOMBSTONE))
    if len(live) != int(q[_W_COUNT]) or n_tomb != int(q[_W_TOMB]):
        msg = (f"header counts {int(q[_W_COUNT])} calls / {int(q[_W_TOMB])} tombstones, "
               f"the slots hold {len(live)} / {n_tomb}")
        (notes if crashed or not locked else problems).append(msg)
    if len(live) > g.limit:
        problems.append(f"{len(live)} calls exceed the table's limit of {g.limit}")
    stale = stale_temp_files(path)
    if stale:
        notes.append(f"{len(stale)} temporary file(s) left by a dead rebuilder: "
                     + ", ".join(stale))
    # every row: a valid key, hashing to its tag, found at its own slot
    keyq = np.ascontiguousarray(np.take(m.rowq, live, axis=0)[:, 3:])
    fields = keyq.view(f"S{g.key_field}").reshape(len(live))
    enc = encode_keys(fields, g.key_width, g.key_field)
    if len(enc.bad):
        problems.append(f"{len(enc.bad)} rows hold an invalid key (first at slot "
                        f"{int(live[enc.bad[0]])}: {enc.reasons[0]})")
    want = tags_of(fields, g.seed)
    wrong_tag = np.flatnonzero(want != tags[live])
    if len(wrong_tag):
        problems.append(f"{len(wrong_tag)} rows whose tag is not their key's hash (first at "
                        f"slot {int(live[wrong_tag[0]])})")
    f = probe.lookup(m, tags[live], keyq, consistent=False, want_rows=False)
    lost = np.flatnonzero(f.slot != live)
    if len(lost):
        grp = group_sorted(tags[live], keyq)
        dups = len(live) - len(grp.first)
        what = f" ({dups} duplicate keys)" if dups else ""
        problems.append(f"{len(lost)} rows not findable by their own key from their home "
                        f"bucket{what} (first at slot {int(live[lost[0]])})")
    if q[_W_STATE] == STATE_REMOVED:
        problems.append("the table was removed (unlinked)")
    elif q[_W_STATE] == STATE_RETIRED and same_file(path, m.inode):
        # like a crashed writer's leftovers: the next writer fixes it on its own
        notes.append("the table file is marked retired but nothing replaced it (a rebuild "
                        "died between retiring it and renaming the new file into place); "
                        "readers answer from it, the next writer or `npcalls check --repair` "
                        "makes it live again")
    if repair and (crashed or stale or problems or (odd and not crashed)):
        if crashed or odd:
            protocol.recover(m, path)
            repaired.append("finished the recovery of a crashed writer")
        elif stale:
            for p in stale:
                try:
                    os.unlink(p)
                except OSError:
                    pass
            repaired.append(f"removed {len(stale)} stale temporary file(s)")
        new = None
        if problems:
            new, dropped = rebuild(path, m, g.capacity, rehash=True)
            m = new
            repaired.append("rebuilt the table from its keys" +
                            (": " + "; ".join(dropped) if dropped else ""))
        again, _ = check(path, m, locked, [], [], [], False)
        return CheckReport(again.ok, again.problems, notes + again.notes, repaired,
                           len(m.tags[m.tags >= 2])), new
    return CheckReport(not problems, problems, notes, repaired, len(live)), None


def grow(path: str, m: Mapping, capacity: int) -> Mapping:
    """Rebuild at ``capacity`` (the current one: compaction), if it holds the calls present."""
    g = m.geometry
    if capacity < int(m.q[_W_COUNT]) / g.max_load:
        raise ValueError(f"capacity {capacity} cannot hold the {int(m.q[_W_COUNT])} calls "
                         f"present at max load {g.max_load}")
    return rebuild(path, m, capacity)[0]


def make_room(path: str, m: Mapping, needed: int) -> Mapping | None:
    """Ensure ``needed`` more rows fit in ``m``: grow or compact it, or raise TableFullError.

    Lock held.  Returns the rebuilt mapping, or None if ``m`` takes the rows as it is.
    """
    g = m.geometry
    q = m.q
    count, tomb = int(q[_W_COUNT]), int(q[_W_TOMB])
    if count + needed > g.limit:
        if not g.auto_grow:
            raise TableFullError(count, needed, g.capacity, g.limit, path)
        refusal = rebuild_refusal(path, m)
        if refusal:
            raise NpcallsError(f"table {path} is full and cannot grow automatically: "
                               f"{refusal}")
        new_cap = g.capacity
        while (count + needed) > new_cap * g.max_load_ppm // 1_000_000:
            new_cap *= 2
        if new_cap > MAX_CAPACITY:          # as full as a table gets (or a corrupt count)
            raise TableFullError(count, needed, g.capacity, g.limit, path)
        return rebuild(path, m, new_cap)[0]
    if ((count + tomb + needed > (g.limit + g.capacity) // 2 or tomb > g.tomb_limit)
            and rebuild_refusal(path, m) is None):
        # Tombstones (only ever left in buckets that were once full) lengthen
        # the walks of lookups for absent keys; rebuild before they matter.
        # A writer that may not rebuild the file (another user's, see
        # rebuild_refusal) leaves that to its owner and inserts into a free slot.
        return rebuild(path, m, g.capacity)[0]
    return None


def expire(path: str, m: Mapping, w: int, ended_before: int | None, started_before: int | None,
           return_rows: bool) -> tuple[int | np.ndarray, Mapping | None]:
    """Remove the calls that ended before ``ended_before`` or started before ``started_before``
    without an end (see :meth:`CallTable.expire`); lock held, ``w`` the even writer sequence.

    Returns their number (or rows) and the rebuilt mapping if the tombstones
    they left made this writer compact the table.
    """
    g = m.geometry
    live = np.flatnonzero(m.tags >= 2)
    st = m.rowq[live, 1].view(np.int64)
    en = m.rowq[live, 2].view(np.int64)
    mask = np.zeros(len(live), bool)
    if ended_before is not None:
        mask |= (en != NOT_SET) & (en < ended_before)
    if started_before is not None:
        mask |= (en == NOT_SET) & (st != NOT_SET) & (st < started_before)
    slots = live[mask]
    out = None
    if return_rows:
        out = np.empty(len(slots), snapshot_dtype(g.key_width))
        out["start"], out["end"] = st[mask], en[mask]
        keys = np.ascontiguousarray(m.rowq[slots, 3:]).view(f"S{g.key_field}")
        out["key"] = keys.reshape(len(slots))
    new = None
    if len(slots):
        with protocol.Operation(m.q, w):
            protocol.free_slots(m, w, slots)
        crashpoint("expire-removed")
        if int(m.q[_W_TOMB]) > g.tomb_limit and rebuild_refusal(path, m) is None:
            new = rebuild(path, m, g.capacity)[0]
    return (out if out is not None else len(slots)), new
