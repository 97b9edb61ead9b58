"""npcalls.probe on its own: home buckets, placement, lookups (batch and single key), removal.

The tests work on a raw table file (storage + layout, no CallTable) and choose
the tags themselves, so that every situation of docs/format.md, "Hashing and
probing", happens for certain instead of with probability 2**-32: keys that
share a home bucket (equal 32-bit tag prefixes) ranked into its free slots and
pushed on to the next buckets, walks that wrap around, misses that stop at the
first bucket holding an EMPTY slot, tombstones walked past and reused, slots
made EMPTY again by ``remove_slots`` when no walk passes their bucket, and two
keys with the same 64-bit tag.  The batch lookup and the single-key probe
(``find_one``, the writers' front door) must agree everywhere.
"""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest

from npcalls import buckets, probe, protocol
from npcalls.layout import BUCKET, EMPTY, TOMBSTONE, W, make_geometry
from npcalls.storage import build_temp, open_mapping

_U = np.uint64
KW = 16                       # key width = key field: two uint64 lanes per key


class Raw:
    """A table file mapped without CallTable; writes bracket ``wseq`` like a writer."""

    def __init__(self, path: str, capacity: int) -> None:
        g = make_geometry(capacity, KW, seed=1, max_load=0.95, created_ns=0)
        tmp = build_temp(path, g, 0o600)
        os.rename(tmp, path)
        self.m = open_mapping(path, readonly=False)
        self.nb = g.nbuckets
        row = struct.Struct(f"<Qqq{g.key_field}s")
        self.view = probe.SingleKeyView(
            mm=self.m.mm, mv=self.m.mv, q=self.m.q, qi=self.m.qi, nb=g.nbuckets,
            tags_off=g.tags_offset, rows_off=g.rows_offset, rs=g.row_size,
            unpack_row=row.unpack_from, pack_row=row.pack_into, kw=g.key_width,
            kf=g.key_field, seed=g.seed)

    def _begin(self) -> int:
        w = int(self.m.q[W["wseq"]])
        self.m.q[W["wseq"]] = w + 1
        return w + 1

    def _end(self, odd: int) -> None:
        self.m.q[W["wseq"]] = odd + 1

    def place(self, keys: list[bytes], tags: list[int]) -> tuple[dict[bytes, int], int, int]:
        """Insert distinct absent keys; returns key -> slot, rounds, tombstones reused."""
        tag = np.array(tags, _U)
        order = np.argsort(tag >> _U(32), kind="stable")      # bucket order, as batches give it
        odd = self._begin()
        slots, rounds, reused = probe.place(
            self.m, tag[order], fields(keys), order, np.arange(len(keys), dtype=np.int64)[order] + 1,
            np.full(len(keys), -5, np.int64), odd)
        self._end(odd)
        got = {keys[int(i)]: int(s) for i, s in zip(order, slots)}
        return got, rounds, reused

    def remove(self, slots: list[int]) -> int:
        odd = self._begin()
        d = protocol.remove_slots(self.m, np.array(slots, np.int64), odd)
        self._end(odd)
        return d

    def lookup(self, keys: list[bytes], tags: list[int], consistent: bool = True) -> probe.Found:
        return probe.lookup(self.m, np.array(tags, _U), lanes(keys), consistent=consistent,
                            want_rows=True)

    def find_one(self, key: bytes, tag: int) -> tuple[int, int]:
        return probe.find_one(tuple(self.view), key.ljust(KW, b"\0"), tag)

    def tags(self) -> np.ndarray:
        return self.m.tags.copy()

    def close(self) -> None:
        self.m.close()


def fields(keys: list[bytes]) -> np.ndarray:
    return np.array(keys, f"S{KW}")


def lanes(keys: list[bytes]) -> np.ndarray:
    return fields(keys).view(_U).reshape(len(keys), KW // 8)


def tag_in(bucket: int, nb: int, low: int) -> int:
    """A tag whose home bucket is ``bucket`` (of ``nb``); ``low`` sets its low 32 bits."""
    hi = -(-(bucket << 32) // nb)                 # smallest prefix with (hi * nb) >> 32 == bucket
    assert ((hi * nb) >> 32) == bucket
    return (hi << 32) | (low & 0xFFFFFFFF) | (2 if low == 0 else 0)


@pytest.fixture
def raw(table_dir, name):
    made: list[Raw] = []

    def make(capacity: int) -> Raw:
        r = Raw(os.path.join(table_dir, f"{name}-{len(made)}"), capacity)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()
        os.unlink(r.m.path)


def agree(r: Raw, keys: list[bytes], tags: list[int]) -> np.ndarray:
    """Batch lookup (lock-free and writer flavours) and find_one agree; returns the slots."""
    f = r.lookup(keys, tags)
    w = r.lookup(keys, tags, consistent=False)
    assert np.array_equal(f.slot, w.slot)
    for k, t, s in zip(keys, tags, f.slot.tolist()):
        assert r.find_one(k, t)[0] == s, (k, t, s)
    return f.slot


# ---------------------------------------------------------------- home bucket

def test_home_bucket_is_the_multiply_shift_of_the_high_32_bits():
    rng = np.random.default_rng(3)
    tags = rng.integers(0, 1 << 63, 4000, dtype=np.int64).astype(_U) * _U(2) + _U(1)
    tags[:4] = [2, (1 << 32) - 1, 1 << 32, (1 << 64) - 1]
    for nb in (1, 3, 8, 1000, (1 << 31) + 11):
        b = buckets.home_bucket(tags, nb)
        assert b.dtype == np.int64 and b.min() >= 0 and b.max() < nb
        want = [((int(t) >> 32) * nb) >> 32 for t in tags.tolist()]
        assert b.tolist() == want
        assert [buckets.home_bucket_one(int(t), nb) for t in tags[:200].tolist()] == want[:200]
        o = np.argsort(tags)
        assert (np.diff(b[o]) >= 0).all()             # monotonic in the tag (batch placement relies on it)
    assert buckets.home_bucket(np.array([(1 << 64) - 1], _U), 1000)[0] == 999
    assert buckets.home_bucket(np.array([(1 << 32) - 1], _U), 1000)[0] == 0   # low bits do not count


# ---------------------------------------------------------------- placement and lookup

def test_keys_sharing_a_home_bucket_fill_it_in_batch_order_then_walk_on(raw):
    r = raw(64)                                        # 8 buckets
    nb = r.nb
    keys = [f"k{i:02d}".encode() for i in range(20)]
    tags = [tag_in(3, nb, 1000 + i) for i in range(20)]   # one 32-bit prefix for all
    got, rounds, reused = r.place(keys, tags)
    assert reused == 0
    assert rounds == 3                                 # 8 at home, 8 one bucket on, 4 two on
    assert [got[k] for k in keys] == list(range(24, 44))  # r-th key, r-th free slot, in order
    t = r.tags()
    assert t[24:44].tolist() == tags
    assert (t[:24] == EMPTY).all() and (t[44:] == EMPTY).all()
    slots = agree(r, keys, tags)
    assert slots.tolist() == list(range(24, 44))
    f = r.lookup(keys, tags)
    assert f.rounds == 3
    assert f.start.tolist() == list(range(1, 21)) and (f.end == -5).all()
    lengths = np.sort(probe.probe_lengths(r.m))
    assert lengths.tolist() == [1] * 8 + [2] * 8 + [3] * 4


def test_a_walk_wraps_from_the_last_bucket_to_the_first(raw):
    r = raw(32)                                        # 4 buckets
    nb = r.nb
    keys = [f"w{i}".encode() for i in range(11)]
    tags = [tag_in(nb - 1, nb, 7 + i) for i in range(11)]
    got, rounds, _ = r.place(keys, tags)
    assert rounds == 2
    assert [got[k] for k in keys] == list(range(24, 32)) + [0, 1, 2]
    assert agree(r, keys, tags).tolist() == [got[k] for k in keys]
    assert sorted(probe.probe_lengths(r.m).tolist()) == [1] * 8 + [2] * 3


def test_a_miss_stops_at_the_first_bucket_with_an_empty_slot(raw):
    r = raw(64)
    nb = r.nb
    keys = [f"m{i:02d}".encode() for i in range(12)]
    r.place(keys, [tag_in(2, nb, 50 + i) for i in range(12)])   # bucket 2 full, 4 in bucket 3
    home_has_room = tag_in(5, nb, 9)
    f = r.lookup([b"absent-a"], [home_has_room])
    assert f.slot[0] == -1 and f.rounds == 1
    assert r.find_one(b"absent-a", home_has_room) == (-1, 5 * BUCKET)
    # home bucket full: the walk goes one bucket on, where an EMPTY slot ends it
    t2 = tag_in(2, nb, 9999)
    f = r.lookup([b"absent-b"], [t2])
    assert f.slot[0] == -1 and f.rounds == 2
    assert r.find_one(b"absent-b", t2) == (-1, 3 * BUCKET + 4)
    # the same tag as a stored key, another key: a tag hit is not a key hit
    f = r.lookup([b"m99"], [r.tags()[2 * BUCKET]])
    assert f.slot[0] == -1


def test_a_miss_in_a_table_without_any_empty_slot_ends(raw):
    r = raw(16)                                        # 2 buckets, both filled
    nb = r.nb
    keys = [f"f{i:02d}".encode() for i in range(16)]
    r.place(keys, [tag_in(i % nb, nb, i + 3) for i in range(16)])
    assert (r.tags() >= 2).all()
    f = r.lookup([b"nowhere"], [tag_in(1, nb, 77)])
    assert f.slot[0] == -1 and f.rounds == nb
    assert r.find_one(b"nowhere", tag_in(1, nb, 77)) == (-1, -1)


def test_two_keys_with_the_same_64_bit_tag_are_told_apart_by_their_keys(raw):
    r = raw(64)
    nb = r.nb
    tag = tag_in(4, nb, 12345)
    keys = [b"same-tag-1", b"same-tag-2", b"same-tag-3"]
    got, _, _ = r.place(keys, [tag] * 3)
    assert len(set(got.values())) == 3
    assert agree(r, keys, [tag] * 3).tolist() == [got[k] for k in keys]
    assert r.lookup([b"same-tag-4"], [tag]).slot[0] == -1
    assert r.find_one(b"same-tag-4", tag)[0] == -1


# ---------------------------------------------------------------- removal: EMPTY or TOMBSTONE

def test_removal_in_a_bucket_with_an_empty_slot_leaves_it_empty(raw):
    r = raw(64)
    nb = r.nb
    keys = [b"a1", b"a2", b"a3"]
    tags = [tag_in(1, nb, i + 5) for i in range(3)]
    got, _, _ = r.place(keys, tags)
    assert r.remove([got[b"a2"]]) == 0
    assert r.tags()[got[b"a2"]] == EMPTY
    assert agree(r, keys, tags).tolist() == [got[b"a1"], -1, got[b"a3"]]


def test_removal_from_a_full_bucket_that_walks_pass_leaves_a_tombstone_walked_past_and_reused(raw):
    r = raw(64)
    nb = r.nb
    keys = [f"t{i:02d}".encode() for i in range(10)]
    tags = [tag_in(2, nb, 100 + i) for i in range(10)]
    got, _, _ = r.place(keys, tags)             # t08, t09 displaced into bucket 3
    victim = got[b"t03"]
    assert r.remove([victim]) == 1
    assert r.tags()[victim] == TOMBSTONE
    # the displaced keys are still found: lookups walk past the tombstone
    slots = agree(r, keys, tags)
    assert slots[3] == -1
    assert slots[8] == got[b"t08"] and slots[8] // BUCKET == 3
    # a writer looking for a new key of that bucket is offered the tombstone first
    new_tag = tag_in(2, nb, 999)
    assert r.find_one(b"t-new", new_tag) == (-1, victim)
    got2, rounds, reused = r.place([b"t-new"], [new_tag])
    assert got2[b"t-new"] == victim and reused == 1 and rounds == 1
    assert agree(r, [b"t-new"], [new_tag])[0] == victim


@pytest.mark.parametrize("front_door", ["remove_slots", "free_one"])
def test_a_full_bucket_no_walk_passes_is_reclaimed(raw, front_door):
    r = raw(64)
    nb = r.nb
    keys = [f"r{i}".encode() for i in range(8)]
    tags = [tag_in(5, nb, 40 + i) for i in range(8)]
    got, _, _ = r.place(keys, tags)             # bucket 5 full, bucket 6 empty
    # make an old tombstone in bucket 5 (as if left while bucket 6 held a displaced key)
    r.m.tags[got[b"r1"]] = TOMBSTONE
    r.m.q[W["tombstones"]] = 1
    # bucket 5 is full (7 live + 1 tombstone); bucket 6 has EMPTY slots and no
    # displaced keys, so no walk passes bucket 5: both slots become EMPTY
    if front_door == "remove_slots":
        d = r.remove([got[b"r4"]])
    else:
        odd = r._begin()
        d = protocol.free_one(r.m, got[b"r4"])
        r._end(odd)
    assert d == -1                               # one tombstone cleared, none left
    t = r.tags()
    assert t[got[b"r4"]] == EMPTY and t[got[b"r1"]] == EMPTY
    live = [k for k in keys if k not in (b"r1", b"r4")]
    assert agree(r, live, [tags[keys.index(k)] for k in live]).tolist() == [got[k] for k in live]


def test_a_writer_is_offered_the_first_free_slot_of_the_walk(raw):
    r = raw(64)
    nb = r.nb
    keys = [f"o{i}".encode() for i in range(6)]
    tags = [tag_in(2, nb, 70 + i) for i in range(6)]
    got, _, _ = r.place(keys, tags)             # slots 16..21 live, 22 and 23 EMPTY
    r.m.tags[got[b"o3"]] = TOMBSTONE            # a tombstone before the EMPTY slots
    new = tag_in(2, nb, 5)
    assert r.find_one(b"o-new", new) == (-1, got[b"o3"])
    g2, _, reused = r.place([b"o-new"], [new])
    assert g2[b"o-new"] == got[b"o3"] and reused == 1


def test_remove_slots_keeps_a_tombstone_when_the_next_bucket_holds_a_displaced_key(raw):
    r = raw(64)
    nb = r.nb
    keys = [f"d{i}".encode() for i in range(9)]
    tags = [tag_in(5, nb, 60 + i) for i in range(9)]
    got, _, _ = r.place(keys, tags)              # d8 displaced into bucket 6
    assert r.remove([got[b"d2"]]) == 1
    assert r.tags()[got[b"d2"]] == TOMBSTONE
    assert agree(r, [b"d8"], [tags[8]])[0] == got[b"d8"]


def test_free_one_decides_like_remove_slots(raw):
    """The single-key removal and the batch removal leave the same tags, case by case."""
    rng = np.random.default_rng(11)
    for trial in range(40):
        a, b = raw(64), raw(64)
        nb = a.nb
        n = int(rng.integers(1, 40))
        keys = [f"x{trial}-{i}".encode() for i in range(n)]
        tags = [tag_in(int(rng.integers(0, 3)), nb, int(rng.integers(2, 1 << 30))) for _ in range(n)]
        ga, _, _ = a.place(keys, tags)
        gb, _, _ = b.place(keys, tags)
        assert ga == gb
        for k in rng.permutation(n)[: max(1, n // 2)].tolist():
            s = ga[keys[k]]
            d1 = a.remove([s])
            odd = b._begin()
            d2 = protocol.free_one(b.m, s)
            b._end(odd)
            assert d1 == d2, (trial, k)
            assert np.array_equal(a.tags(), b.tags()), (trial, k)


# ---------------------------------------------------------------- against a model

def _walk_invariant(t: np.ndarray, nb: int) -> None:
    """docs/format.md: no live key's walk from home to its bucket passes a bucket with an EMPTY slot."""
    tb = t.reshape(nb, BUCKET)
    has_empty = (tb == EMPTY).any(axis=1)
    for s in np.flatnonzero(t >= 2).tolist():
        b = s // BUCKET
        h = buckets.home_bucket_one(int(t[s]), nb)
        while h != b:
            assert not has_empty[h], (s, h, b)
            h = (h + 1) % nb


def test_random_inserts_and_removes_agree_with_a_dict(raw):
    r = raw(128)                                      # 16 buckets, tags crowded into 5 of them
    nb = r.nb
    rng = np.random.default_rng(5)
    model: dict[bytes, int] = {}
    tag_of: dict[bytes, int] = {}
    universe = [f"u{i:03d}".encode() for i in range(160)]
    for k in universe:
        tag_of[k] = tag_in(int(rng.integers(0, 5)) * 3, nb, int(rng.integers(2, 1 << 31)))
    for step in range(150):
        absent = [k for k in universe if k not in model]
        if len(model) < 100 and absent and rng.random() < 0.6:
            batch = [absent[i] for i in rng.choice(len(absent), min(len(absent), 8), replace=False)]
            got, _, _ = r.place(batch, [tag_of[k] for k in batch])
            model.update(got)
        elif model:
            ks = list(model)
            batch = [ks[i] for i in rng.choice(len(ks), min(len(ks), 6), replace=False)]
            r.remove([model.pop(k) for k in batch])
        t = r.tags()
        assert int((t >= 2).sum()) == len(model)
        _walk_invariant(t, nb)
        slots = agree(r, universe, [tag_of[k] for k in universe])
        assert {k: s for k, s in zip(universe, slots.tolist()) if s >= 0} == model, step
