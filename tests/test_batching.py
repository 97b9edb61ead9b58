"""npcalls.batching on its own: bucket order and the grouping of repeated Call-IDs.

The batch semantics as seen through CallTable are in test_batch_semantics.py;
here the grouping itself, including the rare regrouping when distinct keys
share the 32 high bits of their tags (chosen tags make it happen every time).
"""

from __future__ import annotations

import numpy as np

from npcalls.batching import bucket_order, group_sorted

_U = np.uint64


def _keyq(keys: list[bytes], width: int = 16) -> np.ndarray:
    a = np.array([k.ljust(width, b"\0") for k in keys], f"S{width}")
    return a.view(np.uint64).reshape(len(keys), width // 8)


def _check_groups(tags: np.ndarray, keys: list[bytes]) -> None:
    """The properties batch semantics relies on, from the definition of Groups."""
    g = group_sorted(tags, _keyq(keys))
    n = len(keys)
    assert sorted(g.order.tolist()) == list(range(n))                 # a permutation
    assert np.array_equal(g.tags, tags[g.order])                       # the tags in that order
    hi = tags[g.order] >> _U(32)
    assert (hi[1:] >= hi[:-1]).all()                                   # bucket order
    ks = [keys[i] for i in g.order]
    for grp in range(int(g.group.max()) + 1 if n else 0):
        rows = np.flatnonzero(g.group == grp)
        assert (np.diff(rows) == 1).all()                              # contiguous
        assert len({ks[r] for r in rows}) == 1                         # one key per group
        assert (np.diff(g.order[rows]) > 0).all()                      # batch order kept
        assert g.first[grp] == rows[0]
    assert len(set(keys)) == len(g.first)                              # one group per key


def test_bucket_order_is_stable_and_sorts_by_the_high_32_bits():
    rng = np.random.default_rng(1)
    tags = rng.integers(0, 1 << 63, 5000, dtype=np.int64).astype(_U)
    tags[::7] = tags[0]                                                # ties
    o = bucket_order(tags)
    hi = tags[o] >> _U(32)
    assert (hi[1:] >= hi[:-1]).all()
    ties = np.flatnonzero(tags[o] == tags[0])
    assert (np.diff(o[ties]) > 0).all()                                # stable
    assert np.array_equal(o, np.argsort(tags >> _U(32), kind="stable"))


def test_repeated_keys_group_in_batch_order():
    keys = [b"a", b"b", b"a", b"c", b"b", b"a"]
    tags = np.array([10 << 32, 20 << 32, 10 << 32, 5 << 32, 20 << 32, 10 << 32], _U)
    _check_groups(tags, keys)
    g = group_sorted(tags, _keyq(keys))
    assert [keys[i] for i in g.order] == [b"c", b"a", b"a", b"a", b"b", b"b"]
    assert g.order.tolist() == [3, 0, 2, 5, 1, 4]


def test_distinct_keys_sharing_the_high_32_bits_are_regrouped():
    # three distinct keys whose tags differ only in the low 32 bits, interleaved,
    # so that the radix sort leaves equal keys apart: the regrouping must join them
    keys = [b"x", b"y", b"x", b"z", b"y", b"x", b"z"]
    low = {b"x": 3, b"y": 1, b"z": 2}
    tags = np.array([(7 << 32) | low[k] for k in keys], _U)
    _check_groups(tags, keys)
    g = group_sorted(tags, _keyq(keys))
    ks = [keys[i] for i in g.order]
    assert ks == [b"x", b"x", b"x", b"y", b"y", b"z", b"z"]            # first seen first
    assert g.order.tolist() == [0, 2, 5, 1, 4, 3, 6]


def test_equal_tags_of_different_keys_are_different_groups():
    # a full 64-bit tag collision (2**-64 rare in practice): the keys decide
    keys = [b"p", b"q", b"p", b"q"]
    tags = np.full(4, (9 << 32) | 9, _U)
    _check_groups(tags, keys)


def test_random_batches_with_many_prefix_collisions():
    rng = np.random.default_rng(7)
    for _ in range(30):
        n = int(rng.integers(1, 300))
        names = [f"k{i}".encode() for i in range(int(rng.integers(1, 40)))]
        keys = [names[int(i)] for i in rng.integers(0, len(names), n)]
        # few distinct high halves: most runs mix keys
        his = {k: int(rng.integers(0, 4)) for k in names}
        tags = np.array([(his[k] << 32) | (hash(k) & 0xFFFF) for k in keys], _U)
        _check_groups(tags, keys)


def test_empty_and_single_batches():
    _check_groups(np.empty(0, _U), [])
    _check_groups(np.array([5 << 32], _U), [b"only"])
