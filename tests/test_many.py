"""npcalls.many on its own: the batch operations over a bare mapping, without CallTable.

A :class:`~npcalls.many.WriterSide` is built here from the lower layers (a
mapped file, a WriterLock, the protocol's take-over), which is what makes the
batch layer independent of the facade.  Batch semantics through CallTable
are in test_batch_semantics.py and test_batch_slices.py.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from npcalls import batching, many, probe, protocol
from npcalls.errors import BatchKeyError, ReadOnlyError
from npcalls.layout import NOT_SET, W, make_geometry
from npcalls.locking import WriterLock
from npcalls.storage import build_temp, open_mapping


class Bare:
    """A table file and its lock, with the writer side and reader lookup of a handle."""

    def __init__(self, path: str, capacity: int = 4096, key_width: int = 24) -> None:
        g = make_geometry(capacity, key_width, seed=7, max_load=0.9, created_ns=0)
        os.rename(build_temp(path, g, 0o600), path)
        self.path = path
        self.m = open_mapping(path, readonly=False)
        self.lock = WriterLock(path + ".lock")
        self.codec = many.KeyCodec(g.key_width, g.key_field, g.seed)
        self.rooms: list[int] = []

    def begin(self) -> tuple:
        self.lock.settle(self.m.q, W["lock_ino"])
        return self.m, protocol.settle_sequence(self.m, self.path)

    def make_room(self, m, needed: int) -> tuple:
        self.rooms.append(needed)
        return m, int(m.q[W["wseq"]])

    def side(self, lock=None) -> many.WriterSide:
        return many.WriterSide(self.codec, lock or (lambda: self.lock), self.begin,
                               self.make_room)

    def lookup(self, tag: np.ndarray, keyq: np.ndarray) -> probe.Found:
        return probe.lookup(self.m, tag, keyq, consistent=True, want_rows=True)

    def rows(self) -> bytes:
        return bytes(self.m.tags.tobytes()) + bytes(self.m.rowq.tobytes())

    def calls(self) -> list[tuple[bytes, int, int]]:
        """The live rows as (key, start, end), sorted: the content, whatever the slots."""
        live = np.flatnonzero(self.m.tags >= 2)
        r = self.m.rowq[live]
        return sorted((r[i, 3:].tobytes().rstrip(b"\0"), int(r[i, 1].view(np.int64)),
                       int(r[i, 2].view(np.int64))) for i in range(len(live)))

    def close(self) -> None:
        self.m.close()
        self.lock.close()


@pytest.fixture
def bare(table_dir, name):
    made: list[Bare] = []

    def make(**kw) -> Bare:
        b = Bare(os.path.join(table_dir, f"{name}-{len(made)}"), **kw)
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()
        os.unlink(b.path)
        os.unlink(b.path + ".lock")


def test_a_batch_write_then_read_over_a_bare_mapping_follows_first_start_wins(bare):
    b = bare()
    keys = ["a", "b", "a", "", "c", "b", "x" * 25]
    out = many.record(keys, np.arange(10, 17), None, b.side(), insert=True, errors="raise",
                      want="start")
    assert out.result.tolist() == [True, True, False, False, True, False, False]
    assert out.bad.tolist() == [3, 6] and len(out.reasons) == 2
    assert out.rounds >= 1
    assert b.rooms == [3]                       # room asked once, for the three new keys
    got = many.get_many(["c", "a", "zz", "b"], b.codec, b.lookup, "raise")
    assert got.result.start.tolist() == [14, 10, NOT_SET, 11]
    assert got.result.found.tolist() == [True, True, False, True]
    assert int(b.m.q[W["count"]]) == 3


def test_finish_raises_with_the_result_and_names_keys_of_an_iterator(bare):
    b = bare()
    keys = iter(["ok", "", "fine"])
    out = many.record(keys, 5, None, b.side(), insert=True, errors="raise", want="start")
    with pytest.raises(BatchKeyError) as e:
        many.finish(out, keys, "raise")
    assert e.value.result.tolist() == [True, False, True]
    assert e.value.positions.tolist() == [1]
    assert "<key #1>" in str(e.value)
    assert many.finish(out, keys, "ignore") is out.result


def test_the_errors_argument_is_checked_before_the_lock_and_nothing_is_written(bare):
    b = bare()

    def refused():
        raise ReadOnlyError("read-only handle")

    before = b.rows()
    with pytest.raises(ValueError, match="errors must be"):
        many.record(["a"], 1, None, b.side(refused), insert=True, errors="bogus", want="start")
    with pytest.raises(ReadOnlyError):
        many.record(["a"], 1, None, b.side(refused), insert=True, errors="raise", want="start")
    with pytest.raises(ReadOnlyError):
        many.remove_many(["a"], b.side(refused), "raise")
    assert b.rows() == before


def test_sliced_batches_leave_the_same_calls_as_whole_ones(bare, monkeypatch):
    rng = np.random.default_rng(3)
    keys = [f"k{i}" for i in rng.integers(0, 300, 1000)] + ["", "y" * 30]
    start = rng.integers(1, 1 << 40, len(keys))
    end = np.where(rng.random(len(keys)) < 0.5, NOT_SET, start + 5)
    gone = [f"k{i}" for i in range(0, 300, 3)] + [""]
    whole, sliced = bare(), bare()
    outs = []
    for b in (whole, sliced):
        if b is sliced:
            monkeypatch.setattr(batching, "SLICE", 64)
        w = many.record(keys, start, end, b.side(), insert=True, errors="ignore", want="both",
                        allow_unset=True)
        r = many.remove_many(gone, b.side(), "ignore")
        g = many.get_many(keys, b.codec, b.lookup, "ignore")
        outs.append((w, r, g))
    (w1, r1, g1), (w2, r2, g2) = outs
    assert np.array_equal(w1.result[0], w2.result[0]) and np.array_equal(w1.result[1],
                                                                          w2.result[1])
    assert w1.bad.tolist() == w2.bad.tolist() == [1000, 1001]
    assert w1.reasons == w2.reasons
    assert np.array_equal(r1.result, r2.result) and r1.bad.tolist() == r2.bad.tolist()
    for a, c in zip(g1.result, g2.result):
        assert np.array_equal(a, c)
    assert whole.calls() == sliced.calls()             # slots may differ, the calls may not
    present = set(keys[:1000]) - set(gone)
    assert [c[0].decode() for c in whole.calls()] == sorted(present)
    assert int(whole.m.q[W["count"]]) == int(sliced.m.q[W["count"]]) == len(present)
