"""P1-P3 (docs/properties.md) with real processes: forked, spawned, and separately started programs.

Every test bounds its children in time (they are killed at the deadline and
the test fails), and every assertion is about an outcome that does not depend
on how the processes interleave.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time

import numpy as np
import pytest

from npcalls import NOT_SET, CallTable

from helpers import mp_workers as H
from helpers.children import Children, alive

pytestmark = pytest.mark.timeout(120)


def table_name(t: CallTable) -> str:
    """The bare name a table was created under (its file is npcalls.<name> in NPCALLS_DIR)."""
    base = os.path.basename(t.path)
    assert base.startswith("npcalls.")
    return base[len("npcalls."):]


@pytest.fixture
def children(tmp_path):
    c = Children(str(tmp_path))
    yield c
    c.kill()


# ---------------------------------------------------------------- writers and readers


SCENARIOS = {
    # writers' kinds, readers' kinds, overrides of mp_workers.DEFAULTS
    "fork": (["fork", "fork", "fork"], ["fork", "fork"], dict(compact_every=2)),
    "spawn": (["spawn", "spawn"], ["spawn", "spawn"], {}),
    "programs": (["program", "program", "fork"], ["program", "spawn"], {}),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_concurrent_writers_and_readers(make_table, children, scenario):
    writers, readers, overrides = SCENARIOS[scenario]
    cfg = {**H.DEFAULTS, **overrides}
    t = make_table(1 << 15, key_width=H.KEY_WIDTH)
    n_perm = H.insert_permanent(t, cfg)
    name = table_name(t)
    nw, nr = len(writers), len(readers)
    for i, kind in enumerate(writers):
        # by name and by path: both must reach the same table
        children.start(kind, f"w{i}", "writer", name if i % 2 == 0 else t.path, i, nw, nr,
                       children.sync_dir, overrides)
    for i, kind in enumerate(readers):
        children.start(kind, f"r{i}", "reader", t.path if i % 2 == 0 else name, i, nw,
                       children.sync_dir, overrides, readonly=(i % 2 == 0))
    children.wait_ready(nw + nr)
    res = children.results(timeout=75)
    ws = [res[f"w{i}"] for i in range(nw)]
    rs = [res[f"r{i}"] for i in range(nr)]

    assert len({r["pid"] for r in rs + ws} | {os.getpid()}) == nw + nr + 1

    # writers: every shared key started and ended exactly once across all writers
    assert all(w["own_all_new"] for w in ws), ws
    assert all(w["churn_rounds"] >= 3 for w in ws), ws
    assert sum(w["shared_r_started"] for w in ws) == cfg["n_shared"]
    assert sum(w["shared_r_ended"] for w in ws) == cfg["n_shared"]
    assert sum(w["shared_s_started"] for w in ws) == cfg["n_shared_single"]
    assert sum(w["shared_s_stopped"] for w in ws) == cfg["n_shared_single"]
    if cfg["compact_every"]:
        # writer 0 rebuilt the table under the others' feet at least once
        assert ws[0]["compactions"] >= 1
        assert t.stats().n_rebuilds >= ws[0]["compactions"]

    # the table: exactly the expected rows, once each, all complete
    snap = t.snapshot()
    keys = snap["key"].tolist()
    expected = H.expected_keys(cfg, nw)
    assert len(keys) == len(set(keys)), "duplicate rows"
    assert set(keys) == expected
    assert len(t) == t.stats().count == len(expected)
    assert H.violations(snap["key"], snap["start"], snap["end"]) == 0
    assert (snap["end"] == snap["start"] + 1).all()
    r = t.get_many(np.array(sorted(expected), dtype="S10"))
    assert r.found.all()

    # the counters add up to what the writers were told they did: no write lost or doubled
    st = t.stats()
    assert st.n_started == n_perm + sum(w["started"] for w in ws)
    assert st.n_stopped == n_perm + sum(w["stopped"] for w in ws)
    assert st.n_removed == sum(w["removed"] for w in ws)
    assert st.n_recoveries == 0

    # readers did real work while keys came and went ...
    for r in rs:
        assert r["iterations"] >= cfg["min_reads"] and r["snapshots"] > 0, r
        assert r["churn_rows_seen"] > 0, r
    # ... and saw no torn row, never missed a key present throughout, and (last, since
    # it needs a whole snapshot to be consistent, not just each row) no Call-ID twice
    bad = [{k: r[k] for k in ("violations", "missed_permanent", "duplicates")} for r in rs]
    assert bad == [dict(violations=0, missed_permanent=0, duplicates=0)] * nr


def test_snapshot_never_holds_a_call_twice_while_calls_move(make_table, children):
    # one bucket (8 slots), so where a call lands depends on the free-slot rule alone,
    # not on the hash seed; another process keeps moving calls between its slots:
    # a snapshot must still hold each Call-ID at most once, and every read must find
    # the call that stays put
    t = make_table(8, key_width=H.KEY_WIDTH, max_load=0.95)
    moving = [f"m{i}" for i in range(5)]
    steady = ["s0"]
    t.start_many(steady + moving, 1)
    children.start("fork", "mover", "mover", t.path, moving, children.sync_dir, 20.0)
    children.wait_ready(1)
    snaps = dup_snaps = missing = torn = 0
    example = None
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline and not (dup_snaps or missing):
        keys = t.snapshot()["key"].tolist()
        snaps += 1
        if len(keys) != len(set(keys)):
            dup_snaps += 1
            example = keys
        missing += sum(k.encode() not in keys for k in steady)
        r = t.get_many(steady + moving)
        missing += int(np.count_nonzero(~r.found[:len(steady)]))
        missing += t.get(steady[0]) is None
        torn += int(np.count_nonzero(r.found & ((r.start != 1) | (r.end != NOT_SET))))
    H.touch(os.path.join(children.sync_dir, "stop"))
    moves = children.results(timeout=30)["mover"]["moves"]
    assert missing == 0 and torn == 0
    assert dup_snaps == 0, f"snapshot #{snaps} held a Call-ID twice: {example}"
    assert moves > 1000 and snaps > 1000, (moves, snaps)
    assert sorted(t.snapshot()["key"].tolist()) == sorted(k.encode() for k in steady + moving)


# ---------------------------------------------------------------- P1: seen at once


@pytest.mark.parametrize("by", ["name", "path"])
def test_separate_program_sees_writes_at_once(make_table, children, by):
    t = make_table(256)
    ref = t.path if by == "path" else table_name(t)
    rounds = 40
    children.start("program", "echo", "echo_client", ref, rounds, 30.0)
    deadline = time.monotonic() + 45
    for i in range(rounds):
        t.start(f"ping-{i}", 1000 * i)
        # the other program answers only after it saw the ping: each pong proves one write
        # crossed from here to there, and the pong's arrival one from there to here
        while t.get(f"pong-{i}") is None:
            assert time.monotonic() < deadline, f"no pong-{i}"
            time.sleep(0.0005)
        assert t.get(f"pong-{i}") == (1000 * i + 1, NOT_SET)
    res = children.results(timeout=30)
    assert res["echo"]["rounds"] == rounds and res["echo"]["pid"] != os.getpid()
    assert len(t) == 2 * rounds


def test_grow_by_another_process_is_followed(make_table, children):
    t = make_table(256)
    ro = CallTable.open(t.path, readonly=True)
    try:
        t.start_many([f"old{i}" for i in range(150)], 7)
        new = [f"new{i}" for i in range(2000)]
        children.start("spawn", "grow", "grow_table", table_name(t), 8192, new)
        assert children.results(timeout=60)["grow"]["capacity"] == 8192
        for h in (t, ro):
            assert h.capacity == 8192 and len(h) == 2150
            assert h.get("old3") == (7, NOT_SET) and h.get("new1999") == (42, NOT_SET)
            assert h.get_many(new).found.all()
        assert t.start("after", 1) and ro.get("after") == (1, NOT_SET)
    finally:
        ro.close()


# ---------------------------------------------------------------- the writer lock and fork


def test_forked_child_does_not_hold_the_parents_lock(table, children):
    if "fork" not in mp.get_all_start_methods():
        pytest.fail("fork start method unavailable on this platform")
    with table.locked():
        # the child gets this very CallTable object, lock handle included
        children.start("fork", "child", "write_under_parent_lock", table, children.sync_dir)
        H.wait_for(os.path.join(children.sync_dir, "child-writing"), 30)
        time.sleep(0.3)
        assert "child-key" not in table, "the child wrote while the parent held the lock"
        assert all(alive(p) for _, _, p in children.procs)
        released_at = time.monotonic()
    res = children.results(timeout=30)["child"]
    assert res["pid"] != os.getpid()
    assert res["timed_out"], "the child could take the lock its parent held"
    assert res["holder"] == os.getpid()
    assert res["wrote_at"] >= released_at      # CLOCK_MONOTONIC is system-wide
    assert res["holder_after"] is None
    assert table.get("child-key") == (1, NOT_SET)
    assert table.stats().writer_pid is None


def test_closing_another_handle_keeps_the_lock(table, children):
    # POSIX locks drop when the process closes any descriptor of the file: a second
    # handle closing inside locked() must not release the first one's lock
    name = table_name(table)
    with table.locked():
        CallTable.open(table.path).close()
        CallTable.open(table.path, readonly=True).close()
        with CallTable.open(name) as t3:
            t3.start("inner", 1)
        children.start("spawn", "probe", "try_lock", name, 0.3)
        res = children.results(timeout=60)["probe"]
        assert res["acquired"] is False
        assert res["holder"] == os.getpid()
    after = Children(children.sync_dir + "/after")
    os.mkdir(after.sync_dir)
    after.start("fork", "probe2", "try_lock", name, 5.0)
    assert after.results(timeout=30)["probe2"]["acquired"] is True


def test_readers_never_wait_for_the_writer_lock(make_table, children):
    t = make_table(1024)
    keys = [f"k{i}" for i in range(300)]
    t.record_many(keys, np.arange(300), np.arange(300) + 5)
    probe = keys[:50] + ["absent"]
    want_got = [[i, i + 5] for i in range(50)] + [None]
    name = table_name(t)
    with t.locked():
        children.start("fork", "fork-inherited", "read_while_locked", None, t, probe)
        children.start("spawn", "spawn-readonly", "read_while_locked", name, None, probe)
        children.start("program", "program-readonly", "read_while_locked", t.path, None, probe)
        children.start("fork", "lock-probe", "try_lock", name, 0.3)
        res = children.results(timeout=60)
        # the lock was held the whole time: the readers finished under it
        assert t.stats().writer_pid == os.getpid()
    assert res.pop("lock-probe")["acquired"] is False
    for tag, r in res.items():
        assert r["got"] == want_got, tag
        assert r["found"] == [True] * 50 + [False], tag
        assert r["contains"] == [True] * 50 + [False], tag
        assert r["snapshot_rows"] == 300 and r["length"] == 300, tag
        assert r["listed"] == sorted(keys), tag
        assert r["holder"] == os.getpid(), tag
        assert r["seconds"] < 10, tag
