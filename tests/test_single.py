"""npcalls.single: the single-key front doors agree with their references.

``key_tag`` is :func:`npcalls.keys.encode_key` plus :func:`npcalls.hashing.tag_of`
with the common case first; ``remove`` takes the writer lock like the hot
write path.  tests/test_protocol.py checks the inlined row writes.
"""

from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npcalls import InvalidKeyError
from npcalls.hashing import tag_of
from npcalls.keys import encode_key
from npcalls.single import key_tag

_KEYS = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(max_codepoint=127), max_size=40),
    st.binary(max_size=40),
    st.sampled_from(["", "\x00", "a\x00b", "x" * 32, "x" * 33, "é" * 16, "é" * 17,
                     "\udcff", b"", b"\x00", b"y" * 32, b"y" * 33, 7, None, 1.5,
                     bytearray(b"ba"), memoryview(b"mv")]),
)


def _reference(key: object, kw: int, kf: int, seed: int) -> tuple[bytes, int] | str:
    try:
        field = encode_key(key, kw, kf)
    except InvalidKeyError as e:
        return str(e)
    return field, tag_of(field, seed)


@settings(max_examples=400, deadline=None)
@given(key=_KEYS, seed=st.integers(0, 2**64 - 1))
def test_key_tag_is_encode_key_and_tag_of(key, seed):
    kw, kf = 32, 32
    try:
        got: tuple[bytes, int] | str = key_tag(key, kw, kf, seed)
    except InvalidKeyError as e:
        got = str(e)
    assert got == _reference(key, kw, kf, seed)


def test_key_tag_reserves_the_empty_and_tombstone_tags():
    # the seeds under which these fields hash to 0 or 1 are unknown, so check
    # the arithmetic on every key: the tag is never 0 or 1
    for i in range(20_000):
        _, tag = key_tag(f"k{i}", 32, 32, i)
        assert tag > 1


def test_remove_takes_the_same_lock_as_start_across_threads(make_table):
    """start() and remove() from threads sharing one handle: no row is lost or left."""
    t = make_table(4096)
    n = 500
    errors: list[BaseException] = []

    def churn(tid: int) -> None:
        try:
            for i in range(n):
                k = f"t{tid}-{i}"
                assert t.start(k, i + 1)
                assert t.remove(k)
                assert not t.remove(k)
        except BaseException as e:          # reported below
            errors.append(e)

    threads = [threading.Thread(target=churn, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert len(t) == 0
    assert t.counters().n_removed == 4 * n


def test_remove_follows_a_rebuild_by_another_handle(make_table):
    t = make_table(64, auto_grow=True)
    other = type(t).open(t.path)
    try:
        assert t.start("kept", 1) and t.start("gone", 2)
        other.grow(1024)                    # t's mapping is now retired
        assert t.remove("gone")
        assert t.capacity == 1024
        assert other.get("gone") is None and other.get("kept") == (1, -2**63)
    finally:
        other.close()


@pytest.mark.parametrize("bad", ["", "a\x00", "z" * 65])
def test_remove_refuses_an_invalid_key_before_locking(make_table, bad):
    t = make_table(64)
    with pytest.raises(InvalidKeyError):
        t.remove(bad)
    assert t._lockfile.depth == 0


@settings(max_examples=200, deadline=None)
@given(key=_KEYS)
def test_get_encodes_like_the_writers(tmp_path_factory, key):
    """get()'s inlined copy of key_tag's common case: same field, same errors."""
    import npcalls
    path = str(tmp_path_factory.mktemp("single") / "t")
    t = npcalls.CallTable.create(path, 256, key_width=32)
    try:
        ref = _reference(key, 32, t._kf, t.seed)
        if isinstance(ref, str):
            with pytest.raises(InvalidKeyError) as e:
                t.get(key)                       # type: ignore[arg-type]
            assert str(e.value) == ref
            return
        assert t.get(key) is None                # type: ignore[arg-type]
        assert t.start(key, 5)                   # type: ignore[arg-type]
        assert t.get(key) == (5, npcalls.NOT_SET)   # type: ignore[arg-type]
        assert t.get_many([key]).found[0]
    finally:
        t.close()
        npcalls.CallTable.unlink(path)


@pytest.mark.parametrize("n", [3, 20])
def test_keys_sharing_one_tag_are_kept_apart(make_table, monkeypatch, n):
    """A 64-bit tag collision (forced): the home-bucket shortcut of start/stop sees the
    tag, finds another key's row, and must fall back to the full walk; 20 keys overflow
    the home bucket, so the walk crosses buckets too."""
    from npcalls import single
    t = make_table(256)
    monkeypatch.setattr(single, "_xxh", lambda field, seed: 0xDEADBEEF12345678)
    keys = [f"collide-{i}" for i in range(n)]
    for i, k in enumerate(keys):
        assert t.start(k, 100 + i)
        assert not t.start(k, 999)
    for i, k in enumerate(keys[::2]):
        assert t.stop(k, 500 + i)
    for i, k in enumerate(keys):
        want_end = 500 + i // 2 if i % 2 == 0 else -2**63
        assert t.get(k) == (100 + i, want_end), k
    monkeypatch.undo()
    # the batch lookup hashes for real, so it sees the rows under the forced tag as absent;
    # the rows themselves must be intact: compare the snapshot's keys and times
    snap = t.snapshot()
    got = {bytes(r["key"]).rstrip(b"\0").decode(): (int(r["start"]), int(r["end"])) for r in snap}
    assert got == {k: (100 + i, 500 + i // 2 if i % 2 == 0 else -2**63)
                   for i, k in enumerate(keys)}
    monkeypatch.setattr(single, "_xxh", lambda field, seed: 0xDEADBEEF12345678)
    for k in keys[1::2]:
        assert t.remove(k)
    assert [t.get(k) is not None for k in keys] == [i % 2 == 0 for i in range(n)]
    # check() hashes for real: it must report the forced tags, not crash on a bucket
    # holding one tag twice (it did: the lookup without rows wrote into its no-rows array)
    monkeypatch.undo()
    report = t.check()
    assert not report.ok and any("tag" in p for p in report.problems), report


_HOLDER = """
import sys, time
import npcalls
t = npcalls.CallTable.open(sys.argv[1])
with t.locked():
    t.start("from-the-other-process", 1)     # takes over the (new) lock file
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
t.close()
"""


def test_remove_waits_for_a_writer_of_another_process_after_the_lock_file_was_replaced(
        make_table):
    """The lock file is deleted under a handle; another process re-creates it and holds
    the lock. remove()'s fast path must notice that its lock is not the table's and wait,
    not remove under the other writer's feet."""
    import os
    import subprocess
    import sys
    import time
    t = make_table(256)
    assert t.start("victim", 5)
    os.unlink(t.lock_path)
    hold = 1.5
    p = subprocess.Popen([sys.executable, "-c", _HOLDER, t.path, str(hold)],
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        assert t.remove("victim")
        waited = time.monotonic() - t0
    finally:
        assert p.wait(timeout=60) == 0
    assert waited > hold / 2, waited
    assert t.get("victim") is None and t.get("from-the-other-process") == (1, -2**63)
    assert t.check().ok
