"""Vectorized XXH64 agrees bit for bit with the xxhash package, and so do the table's two paths."""

from __future__ import annotations

import numpy as np
import pytest
import xxhash

from npcalls import NOT_SET
from npcalls.hashing import tag_of, tags_of, xxh64_fields, xxh64_one
from npcalls.layout import key_field_width

SEEDS = [0, 1, 0x9E3779B185EBCA87, 2**63, 2**64 - 1, 0x0123456789ABCDEF]


def random_keys(rng: np.random.Generator, kw: int, per_length: int) -> list[bytes]:
    """``per_length`` random non-NUL keys of every length 1..kw."""
    out = []
    for length in range(1, kw + 1):
        block = rng.integers(1, 256, size=(per_length, length), dtype=np.uint8)
        out.extend(bytes(row) for row in block)
    return out


def padded(keys: list[bytes], kf: int) -> np.ndarray:
    return np.array([k.ljust(kf, b"\0") for k in keys], dtype=f"S{kf}")


@pytest.mark.parametrize("kw,per_length", [(8, 400), (13, 250), (64, 50), (255, 12)])
@pytest.mark.parametrize("seed", SEEDS)
def test_vectorized_equals_xxhash_for_every_length(kw, per_length, seed):
    kf = key_field_width(kw)
    rng = np.random.default_rng([kw, seed % 2**32])
    keys = random_keys(rng, kw, per_length)
    assert len(keys) >= 3000
    got = xxh64_fields(padded(keys, kf), seed)
    want = np.array([xxhash.xxh64_intdigest(k.ljust(kf, b"\0"), seed) for k in keys], np.uint64)
    assert got.dtype == np.uint64
    mismatch = np.flatnonzero(got != want)
    assert not len(mismatch), f"{len(mismatch)} mismatches, first key {keys[mismatch[0]]!r}"


@pytest.mark.parametrize("kf", [8, 16, 24, 32, 40, 56, 64, 72, 96, 128, 256, 264])
def test_every_field_width_around_the_32_byte_stripe(kf):
    # XXH64 switches from the short path to four accumulators at 32 bytes, and
    # consumes trailing 8-byte lanes after the stripes: cover each split
    rng = np.random.default_rng(kf)
    raw = rng.integers(0, 256, size=(500, kf), dtype=np.uint8)
    for seed in (0, 2**64 - 1, 12345):
        got = xxh64_fields(raw, seed)
        want = [xxhash.xxh64_intdigest(row.tobytes(), seed) for row in raw]
        assert got.tolist() == want


def test_two_dimensional_uint8_input_equals_s_input():
    rng = np.random.default_rng(7)
    raw = rng.integers(1, 256, size=(300, 24), dtype=np.uint8)
    as_s = raw.view("S24").reshape(300)
    assert np.array_equal(xxh64_fields(raw, 99), xxh64_fields(as_s, 99))


def test_non_contiguous_input_is_hashed_by_value():
    rng = np.random.default_rng(8)
    raw = rng.integers(1, 256, size=(400, 16), dtype=np.uint8)
    strided = raw[::2]
    want = [xxhash.xxh64_intdigest(r.tobytes(), 5) for r in strided]
    assert xxh64_fields(strided, 5).tolist() == want


def test_batches_longer_than_one_chunk():
    # the vectorized hash works through the batch in cache-sized chunks
    rng = np.random.default_rng(9)
    n = 70_001
    raw = rng.integers(0, 256, size=(n, 16), dtype=np.uint8)
    got = xxh64_fields(raw, 77)
    idx = np.r_[0:50, 32_700:32_840, 65_500:65_600, n - 50:n]
    want = [xxhash.xxh64_intdigest(raw[i].tobytes(), 77) for i in idx]
    assert got[idx].tolist() == want


def test_empty_batch():
    assert xxh64_fields(np.empty(0, "S16"), 1).shape == (0,)


def test_seed_is_taken_modulo_2_64():
    f = padded([b"abc"], 8)
    assert xxh64_fields(f, -1).tolist() == [xxhash.xxh64_intdigest(b"abc\0\0\0\0\0", 2**64 - 1)]


def test_field_width_must_be_a_multiple_of_8():
    with pytest.raises(ValueError, match="multiple of 8"):
        xxh64_fields(np.array([b"abc"], "S12"), 0)


def test_single_key_helpers_match_batch():
    rng = np.random.default_rng(10)
    keys = random_keys(rng, 13, 20)
    f = padded(keys, 16)
    batch = tags_of(f, 31337)
    for i, k in enumerate(keys):
        field = k.ljust(16, b"\0")
        assert xxh64_one(field, 31337) == xxhash.xxh64_intdigest(field, 31337)
        assert tag_of(field, 31337) == int(batch[i])
    # tags 0 and 1 mean EMPTY and TOMBSTONE: no key may get them
    assert (batch >= 2).all()


@pytest.mark.parametrize("kw", [8, 13, 64, 255])
def test_table_batch_and_single_paths_find_each_other(make_table, kw):
    """Rows inserted by the vectorized hash are found by the single-key hash, and back."""
    t = make_table(capacity=4096, key_width=kw, seed=(kw * 0x9E3779B97F4A7C15) % 2**64)
    rng = np.random.default_rng(kw)
    keys = random_keys(rng, kw, max(1, 1200 // kw))[:1200]
    keys = list(dict.fromkeys(keys))
    half = len(keys) // 2
    batch_keys, single_keys = keys[:half], keys[half:]
    assert t.start_many(batch_keys, np.arange(half, dtype=np.int64)).all()
    for i, k in enumerate(single_keys):
        assert t.start(k, 10_000 + i)
    for i, k in enumerate(batch_keys):
        assert t.get(k) == (i, NOT_SET)
    r = t.get_many(single_keys)
    assert r.found.all()
    assert r.start.tolist() == list(range(10_000, 10_000 + len(single_keys)))
    assert len(t) == len(keys)
