"""Large write batches run in slices (npcalls.batching.SLICE keys each): same results, bounded memory.

The slice size is lowered here so that small batches cross many slice
boundaries; the results must be exactly those of the unsliced batch and of
the single calls in order.
"""

from __future__ import annotations

import os
import random
import tracemalloc

import numpy as np
import pytest

from npcalls import NOT_SET, BatchKeyError, CallTable, TableFullError, batching


def rows(t: CallTable) -> dict[bytes, tuple[int, int]]:
    s = t.snapshot()
    return {bytes(k): (int(a), int(b)) for k, a, b in zip(s["key"], s["start"], s["end"])}


def _ops(seed: int, n: int) -> tuple[list, np.ndarray, np.ndarray]:
    rng = random.Random(seed)
    pool = [f"call-{i}@10.0.0.{i % 7}" for i in range(n // 3)]
    keys = [rng.choice(pool) for _ in range(n)]
    start = np.array([rng.choice([NOT_SET, rng.randrange(1, 10**6) * 1000]) for _ in range(n)])
    end = np.array([rng.choice([NOT_SET, rng.randrange(1, 10**6) * 1000]) for _ in range(n)])
    return keys, start, end


@pytest.mark.parametrize("size", [1, 7, 64])
def test_sliced_batches_equal_the_whole_batch_and_the_singles(make_table, monkeypatch, size):
    keys, start, end = _ops(size, 600)
    # a key whose first and second occurrence straddle a slice boundary
    keys[size - 1] = keys[size] = "straddles@host"
    whole, sliced = make_table(2048), make_table(2048)
    s1, e1 = whole.record_many(keys, start, end)
    monkeypatch.setattr(batching, "SLICE", size)
    s2, e2 = sliced.record_many(keys, start, end)
    assert np.array_equal(s1, s2) and np.array_equal(e1, e2)
    assert rows(whole) == rows(sliced)
    assert s2[size] == (start[size - 1] == NOT_SET and start[size] != NOT_SET)
    # start_many / stop_many against the single calls in order
    sliced2 = make_table(2048)
    got = sliced2.start_many(keys, np.where(start == NOT_SET, 5, start))
    ref = make_table(2048)
    assert got.tolist() == [ref.start(k, int(s) if s != NOT_SET else 5)
                            for k, s in zip(keys, start)]
    ends = np.where(end == NOT_SET, 9, end)
    assert sliced2.stop_many(keys, ends).tolist() == [ref.stop(k, int(e))
                                                      for k, e in zip(keys, ends)]
    assert rows(sliced2) == rows(ref)


@pytest.mark.parametrize("form", ["list", "S", "iter"])
def test_a_bad_key_in_a_later_slice_is_reported_at_its_batch_position(make_table, monkeypatch,
                                                                      form):
    monkeypatch.setattr(batching, "SLICE", 10)
    keys = [f"k{i}@h" for i in range(35)]
    keys[3] = ""                                # first slice
    keys[27] = "x" * 65                         # third slice: longer than key_width 64
    arg = {"list": keys, "S": np.array([k.encode() for k in keys], dtype="S70"),
           "iter": iter(keys)}[form]
    t = make_table(256)
    with pytest.raises(BatchKeyError) as ei:
        t.start_many(arg, 7)
    e = ei.value
    assert e.positions.tolist() == [3, 27]
    assert "empty" in e.reasons[0] and "65 bytes" in e.reasons[1]
    assert e.result.tolist() == [i not in (3, 27) for i in range(35)]
    assert len(t) == 33 and "k34@h" in t and "k26@h" in t
    assert ("#27" in str(e)) and (form == "iter" or "xxxxx" in str(e))
    # errors="ignore": the same rows, no exception
    t2 = make_table(256)
    assert t2.start_many(keys, 7, errors="ignore").tolist() == e.result.tolist()


def test_a_batch_that_may_overfill_the_table_is_not_sliced(make_table, monkeypatch):
    monkeypatch.setattr(batching, "SLICE", 4)
    t = make_table(64)                          # limit 48 live rows
    t.start_many([f"old-{i}" for i in range(40)], 1)
    before = rows(t)
    with pytest.raises(TableFullError):
        t.start_many([f"new-{i}" for i in range(20)], 2)
    assert rows(t) == before                    # nothing of the batch applied
    # duplicates keep a large batch within the limit: it fits, sliced or not
    assert t.start_many([f"new-{i % 8}" for i in range(60)], 3).sum() == 8
    assert len(t) == 48


def test_sliced_batches_grow_an_auto_grow_table(make_table, monkeypatch):
    monkeypatch.setattr(batching, "SLICE", 50)
    t = make_table(64, auto_grow=True)
    keys = [f"g-{i}" for i in range(1000)] * 2
    assert t.start_many(keys, 1).tolist() == [True] * 1000 + [False] * 1000
    assert len(t) == 1000 and t.capacity >= 1000 / 0.75
    assert t.check().ok


def _peak_of_start_many(n: int, where: str) -> int:
    keys = [f"{i:016x}-{i * 2654435761 % (1 << 32):08x}@10.0.{i % 250}.{i % 199}"
            for i in range(n)]
    ts = np.full(n, 1_700_000_000_000_000_000, np.int64)
    t = CallTable.create(os.path.join(where, f"peak-{n}"), capacity=2 * n)
    try:
        tracemalloc.start()
        try:
            assert t.start_many(keys, ts).all()
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    finally:
        t.close()
        CallTable.unlink(t.path)


def test_the_temporaries_of_a_batch_do_not_grow_with_the_batch(monkeypatch, table_dir):
    # numpy reports its buffers to tracemalloc: the peak is the batch's temporaries
    # plus its results (started: 1 byte/key, timestamps: 8 bytes/key)
    monkeypatch.setattr(batching, "SLICE", 8192)
    small, large = _peak_of_start_many(20_000, table_dir), _peak_of_start_many(160_000, table_dir)
    results = 160_000 * (1 + 1 + 8)
    assert large < small + results + (1 << 20), (small, large)
    # unsliced, the same batch keeps a few hundred bytes per key alive
    monkeypatch.setattr(batching, "SLICE", 1 << 30)
    assert _peak_of_start_many(160_000, table_dir) > 3 * large


@pytest.mark.parametrize("form", ["list", "U", "iter"])
def test_sliced_get_many_equals_the_whole_lookup(make_table, monkeypatch, form):
    t = make_table(1024)
    t.record_many([f"k{i}@h" for i in range(0, 300, 2)], 5, [NOT_SET, 9] * 75)
    keys = [f"k{i}@h" for i in range(300)]
    keys[5], keys[250] = "", "é" * 40               # bad: empty; 80 UTF-8 bytes > 64
    whole = t.get_many(keys, errors="ignore")
    monkeypatch.setattr(batching, "SLICE", 16)
    arg = {"list": keys, "U": np.array(keys), "iter": iter(keys)}[form]
    with pytest.raises(BatchKeyError) as ei:
        t.get_many(arg)
    e = ei.value
    assert e.positions.tolist() == [5, 250]
    sliced = e.result
    for a, b in zip(whole, sliced):
        assert np.array_equal(a, b)
    assert sliced.found.sum() == 149 and not sliced.found[250]
    assert t.contains_many(keys[:5] + keys[6:250]).tolist() == [i % 2 == 0 for i in
                                                                   list(range(5)) + list(range(6, 250))]


def test_sliced_remove_many_equals_the_single_removes(make_table, monkeypatch):
    keys = [f"r{i % 40}@h" for i in range(100)]       # every key removed once, then absent
    keys[33], keys[71] = "", "x" * 65
    sliced, ref = make_table(256), make_table(256)
    for t in (sliced, ref):
        t.start_many([f"r{i}@h" for i in range(0, 40, 3)], 1)
    want = [k not in ("", "x" * 65) and ref.remove(k) for k in keys]
    monkeypatch.setattr(batching, "SLICE", 9)
    with pytest.raises(BatchKeyError) as ei:
        sliced.remove_many(keys)
    assert ei.value.positions.tolist() == [33, 71]
    assert ei.value.result.tolist() == want
    assert rows(sliced) == rows(ref) == {}
