"""P4 (docs/properties.md): a writer SIGKILLed at any instant leaves a table the next writer uses at once.

See tests/helpers/crashlib.py for the harness.  The default run kills 200+ writers;
``pytest -m stress`` runs 10,000 (about 15 minutes).
"""

from __future__ import annotations

import os

import pytest

from npcalls import CallTable

from helpers.crashlib import run_kills, sweep


@pytest.fixture
def crash_table(tmp_path):
    path = str(tmp_path / "crash.npcalls")
    CallTable.create(path, 4096, key_width=40).close()
    yield path, str(tmp_path / "ops.log")
    CallTable.unlink(path)


@pytest.fixture
def sweep_table(tmp_path):
    # room for every key a sweep leaves behind (a few thousand per batch sweep)
    path = str(tmp_path / "sweep.npcalls")
    CallTable.create(path, 1 << 16, key_width=40).close()
    yield path, str(tmp_path / "ops.log")
    CallTable.unlink(path)


def test_random_kills(crash_table):
    path, log = crash_table
    stats = run_kills(path, log, kills=200, seed=1)
    # both ways of killing must really have been exercised
    assert stats["line"] >= 60 and stats["timer"] >= 60, stats


def test_kills_mid_growth_and_compaction(crash_table):
    # mostly grow/compact, killed within the first ~150 lines of npcalls code an op runs
    path, log = crash_table
    stats = run_kills(path, log, kills=40, seed=2, mix="rebuild", max_line=150)
    assert stats["line"] + stats["timer"] == 40
    with CallTable.open(path) as t:
        assert t.stats().n_rebuilds > 0       # rebuilds did complete between the kills


@pytest.mark.parametrize("point", ["batch-fields-set", "batch-placed", "expire-removed",
                                   "rebuild-built", "rebuild-retired"])
def test_kill_at_named_point(crash_table, point):
    # the windows that matter most, hit deterministically
    path, log = crash_table
    stats = run_kills(path, log, kills=4, seed=3, crash_points=(point,))
    assert stats["point"] == 4


def test_retired_but_not_renamed_file_is_revived(crash_table):
    # A rebuilder killed between retiring the old file and renaming the new one
    # leaves the path on a RETIRED file: the next writer must adopt it again.
    path, log = crash_table
    run_kills(path, log, kills=1, seed=4, crash_points=("rebuild-retired",))
    with CallTable.open(path) as t:
        t.start("after-the-crash", 1)
        assert t.get("after-the-crash") == (1, t.get("after-the-crash")[1])
        assert t.check().ok
        assert not [n for n in os.listdir(os.path.dirname(path)) if ".new-" in n]


@pytest.mark.stress
@pytest.mark.timeout(3600)
def test_ten_thousand_kills(crash_table):
    path, log = crash_table
    stats = run_kills(path, log, kills=10_000, seed=5)
    assert stats["line"] + stats["timer"] == 10_000


def _single_ops(kind):
    def make(k):
        key = f"{kind}-{k}@sweep"
        if kind == "start-new":
            return [], ["start", key, 1000 + k]
        if kind == "start-end-only":
            return [["stop", key, 5000, True]], ["start", key, 1000 + k]
        if kind == "stop":
            return [["start", key, 1000]], ["stop", key, 2000 + k, False]
        if kind == "stop-insert":
            return [], ["stop", key, 2000 + k, True]
        if kind == "remove":
            return [["start", key, 1000]], ["remove", key]
        raise ValueError(kind)
    return make


def _batch_ops(kind):
    keys = [f"b{i}@sweep" for i in range(60)]
    def make(k):
        ks = [f"{x}-{k}" for x in keys]
        if kind == "start_many":
            return [["start_many", ks[:20], list(range(20))]], \
                ["start_many", ks + ks[:5], list(range(1000, 1065))]
        if kind == "stop_many":
            return [["start_many", ks, list(range(60))]], \
                ["stop_many", ks[:40] + [f"new-{k}"], list(range(2000, 2041)), True]
        if kind == "record_many":
            return [["start_many", ks[:30], list(range(30))]], \
                ["record_many", ks, list(range(3000, 3060)), list(range(4000, 4060))]
        if kind == "remove_many":
            return [["start_many", ks, list(range(60))]], ["remove_many", ks[10:50] + ks[:3]]
        if kind == "expire":
            return [["record_many", ks, list(range(60)), list(range(100, 160))]], \
                ["expire", 130, None]
        if kind == "grow":
            return [["start_many", ks, list(range(60))]], ["compact"]
        raise ValueError(kind)
    return make


@pytest.mark.parametrize("kind", ["start-new", "start-end-only", "stop", "stop-insert",
                                  "remove"])
def test_kill_at_every_line_of_single_ops(sweep_table, kind):
    path, log = sweep_table
    kills, _, _ = sweep(path, log, _single_ops(kind))
    assert kills >= 10          # the sweep really walked the operation's lines


@pytest.mark.parametrize("kind", ["start_many", "stop_many", "record_many", "remove_many",
                                  "expire", "grow"])
def test_kill_along_batch_ops(sweep_table, kind):
    path, log = sweep_table
    kills, _, _ = sweep(path, log, _batch_ops(kind), stride=3)
    assert kills >= 10
