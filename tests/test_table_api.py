"""Unit tests of every CallTable call and every error it documents."""

from __future__ import annotations

import datetime as dt
import os
import pathlib
import stat
import threading
import time

import numpy as np
import pytest

import npcalls
from npcalls import (
    NOT_SET,
    CallTable,
    FormatError,
    InvalidKeyError,
    InvalidTimestampError,
    NpcallsError,
    ReadOnlyError,
    TableClosedError,
    TableExistsError,
    TableFullError,
    TableNotFoundError,
    TableRemovedError,
)

TABLE_DIR = os.environ["NPCALLS_DIR"]       # conftest's private directory for this run


def shm_path(name: str) -> str:
    return os.path.join(TABLE_DIR, f"npcalls.{name}")


def listing() -> set[str]:
    return set(os.listdir(TABLE_DIR))


def rows(t: CallTable) -> dict[bytes, tuple[int, int]]:
    s = t.snapshot()
    return {bytes(k): (int(a), int(b)) for k, a, b in zip(s["key"], s["start"], s["end"])}


# ---------------------------------------------------------------- create / open / close


def test_bare_name_lives_in_npcalls_dir(name):
    with CallTable.create(name, 100) as t:
        assert t.path == shm_path(name)
        assert t.lock_path == shm_path(name) + ".lock"
        assert os.path.isfile(t.path) and os.path.isfile(t.lock_path)
    assert CallTable.unlink(name)


def test_properties_and_repr(make_table):
    t = make_table(capacity=100, key_width=13, seed=42)
    assert t.capacity == 104                # rounded up to whole 8-slot buckets
    assert t.key_width == 13
    assert t.max_load == 0.75
    assert t.limit == 78
    assert t.seed == 42
    assert not t.readonly and not t.closed
    t.start("a", 1)
    r = repr(t)
    assert t.path in r and "1 calls" in r and "capacity 104" in r and "key_width 13" in r


def test_path_with_slash_is_a_file_path_and_persists(tmp_path):
    p = tmp_path / "calls.npc"
    with CallTable.create(str(p), 64) as t:
        assert t.path == str(p)
        t.start("persisted", 7)
    with CallTable.open(p) as t:                    # os.PathLike works too
        assert t.get("persisted") == (7, NOT_SET)
    assert CallTable.unlink(pathlib.Path(p))
    assert not p.exists() and not (tmp_path / "calls.npc.lock").exists()


@pytest.mark.parametrize("bad", ["", ".hidden", "-x", "a b", "x" * 300, "a\0b"])
def test_invalid_bare_names_are_refused(bad):
    with pytest.raises(ValueError):
        CallTable.create(bad, 64)


@pytest.mark.parametrize("kw,err", [
    (dict(capacity=0), ValueError),
    (dict(capacity=-5), ValueError),
    (dict(capacity=2**40), ValueError),
    (dict(capacity="64"), TypeError),
    (dict(capacity=64.0), TypeError),
    (dict(capacity=64, key_width=0), ValueError),
    (dict(capacity=64, key_width=4097), ValueError),
    (dict(capacity=64, key_width=True), TypeError),
    (dict(capacity=64, max_load=1.0), ValueError),
    (dict(capacity=64, max_load=0.01), ValueError),
])
def test_bad_create_parameters_leave_nothing_behind(name, kw, err):
    before = listing()
    with pytest.raises(err):
        CallTable.create(name, **kw)
    assert listing() == before


def test_create_refuses_an_existing_table_and_keeps_it(name):
    with CallTable.create(name, 64) as t:
        t.start("kept", 5)
        with pytest.raises(TableExistsError, match="already exists") as ei:
            CallTable.create(name, 1024)
        assert isinstance(ei.value, FileExistsError)
        assert t.get("kept") == (5, NOT_SET)
        assert t.capacity == 64
    CallTable.unlink(name)


def test_open_missing_table(name, tmp_path):
    with pytest.raises(TableNotFoundError) as ei:
        CallTable.open(name)
    assert isinstance(ei.value, FileNotFoundError)
    assert name in str(ei.value)
    with pytest.raises(TableNotFoundError):
        CallTable.open(str(tmp_path / "nope" / "t"))
    with pytest.raises(TableNotFoundError):
        CallTable.open(name, readonly=True)


def test_create_in_missing_directory(tmp_path):
    with pytest.raises(TableNotFoundError):
        CallTable.create(str(tmp_path / "no" / "such" / "t"), 64)


def test_create_refuses_a_symlink_to_a_missing_target(name):
    target = os.path.join(TABLE_DIR, f"target-{name}")
    os.symlink(target, shm_path(name))
    try:
        before = listing()
        with pytest.raises(NpcallsError, match="symbolic link"):
            CallTable.create(name, 64)
        assert not os.path.exists(target)
        assert listing() == before, "a refused create must leave no file behind"
    finally:
        for p in (shm_path(name), shm_path(name) + ".lock"):
            if os.path.lexists(p):
                os.unlink(p)


def test_create_and_open_refuse_a_symlink_to_an_existing_file(name):
    target = os.path.join(TABLE_DIR, f"target-{name}")
    with open(target, "wb") as f:
        f.write(b"precious")
    os.symlink(target, shm_path(name))
    try:
        with pytest.raises(NpcallsError, match="symbolic link"):
            CallTable.create(name, 64)
        with pytest.raises(NpcallsError, match="symbolic link"):
            CallTable.open(name)
        with pytest.raises(NpcallsError, match="symbolic link"):
            CallTable.open(name, readonly=True)
        with open(target, "rb") as f:
            assert f.read() == b"precious"
    finally:
        for p in (shm_path(name), shm_path(name) + ".lock", target):
            if os.path.lexists(p):
                os.unlink(p)


def test_create_refuses_a_symlinked_lock_file_and_leaves_nothing_behind(name):
    target = os.path.join(TABLE_DIR, f"lock-target-{name}")
    os.symlink(target, shm_path(name) + ".lock")
    try:
        before = listing()
        with pytest.raises(NpcallsError, match="symbolic link"):
            CallTable.create(name, 64)
        assert not os.path.exists(target)
        assert not os.path.exists(shm_path(name))
        assert listing() == before, "a refused create must leave no file behind"
    finally:
        for p in os.listdir(TABLE_DIR):
            if name in p:
                os.unlink(os.path.join(TABLE_DIR, p))


def _mode(p: str) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_created_files_are_0600_by_default(make_table):
    old = os.umask(0)       # even a permissive umask must not widen the default
    try:
        t = make_table(64)
    finally:
        os.umask(old)
    assert _mode(t.path) == 0o600
    assert _mode(t.lock_path) == 0o600


@pytest.mark.parametrize("mode,umask", [(0o640, 0o077), (0o660, 0o022), (0o644, 0o000)])
def test_caller_mode_is_applied_exactly(make_table, mode, umask):
    old = os.umask(umask)
    try:
        t = make_table(64, mode=mode)
    finally:
        os.umask(old)
    assert _mode(t.path) == mode
    assert _mode(t.lock_path) == mode
    t.start_many([f"k{i}" for i in range(40)], 1)
    t.grow(256)                         # the rebuilt file replaces the old one: same mode
    assert _mode(t.path) == mode


def test_close_is_idempotent_and_every_call_then_fails(table):
    table.start("a", 1)
    table.close()
    table.close()
    assert table.closed
    assert "(closed)" in repr(table)
    calls = {
        "start": lambda: table.start("a", 1),
        "stop": lambda: table.stop("a", 1),
        "get": lambda: table.get("a"),
        "remove": lambda: table.remove("a"),
        "contains": lambda: "a" in table,
        "getitem": lambda: table["a"],
        "len": lambda: len(table),
        "iter": lambda: list(table),
        "start_many": lambda: table.start_many(["a"], 1),
        "stop_many": lambda: table.stop_many(["a"], 1),
        "record_many": lambda: table.record_many(["a"], 1, 2),
        "get_many": lambda: table.get_many(["a"]),
        "contains_many": lambda: table.contains_many(["a"]),
        "remove_many": lambda: table.remove_many(["a"]),
        "snapshot": lambda: table.snapshot(),
        "stats": lambda: table.stats(),
        "grow": lambda: table.grow(4096),
        "compact": lambda: table.compact(),
        "capacity": lambda: table.capacity,
        "locked": lambda: table.locked().__enter__(),
    }
    wrong = {}
    for what, call in calls.items():
        try:
            call()
        except TableClosedError as e:
            if table.path not in str(e):        # the message names the table
                wrong[what] = repr(e)
            continue
        except Exception as e:          # noqa: BLE001 - collected to report every call at once
            wrong[what] = repr(e)
        else:
            wrong[what] = "no error"
    assert not wrong, f"expected TableClosedError from: {wrong}"
    # a bad key is still a bad key for this table's width
    with pytest.raises(InvalidKeyError, match="key width of 64 bytes"):
        table.start("x" * 65)


def test_closing_one_handle_leaves_others_working(table):
    other = CallTable.open(table.path)
    ro = CallTable.open(table.path, readonly=True)
    other.close()
    assert table.start("a", 1)
    assert ro.get("a") == (1, NOT_SET)
    ro.close()
    assert table.stop("a", 2)


def test_context_manager_closes_even_on_error(name):
    with pytest.raises(RuntimeError):
        with CallTable.create(name, 64) as t:
            t.start("a", 1)
            raise RuntimeError("boom")
    assert t.closed
    with CallTable.open(name) as t2:
        assert t2.get("a") == (1, NOT_SET)
    CallTable.unlink(name)


def test_open_or_create(name):
    with CallTable.open_or_create(name, 64, key_width=16) as t:
        assert t.capacity == 64 and t.key_width == 16
        t.start("a", 1)
    with CallTable.open_or_create(name, 4096, key_width=64) as t:
        assert t.capacity == 64 and t.key_width == 16    # the existing table wins
        assert t.get("a") == (1, NOT_SET)
    CallTable.unlink(name)


def test_foreign_and_truncated_files_are_format_errors(name):
    p = shm_path(name)
    with open(p, "wb") as f:
        f.write(b"GIF89a" + b"\0" * 5000)
    try:
        with pytest.raises(FormatError, match="not an npcalls table") as ei:
            CallTable.open(name)
        assert p in str(ei.value)
    finally:
        os.unlink(p)
    with CallTable.create(name, 64) as t:
        size = os.path.getsize(t.path)
    os.truncate(p, size - 8)
    with pytest.raises(FormatError, match="truncated"):
        CallTable.open(name)
    CallTable.unlink(name)


# ---------------------------------------------------------------- unlink


def test_unlink_removes_both_files_and_reports_existence(name):
    CallTable.create(name, 64).close()
    assert os.path.exists(shm_path(name)) and os.path.exists(shm_path(name) + ".lock")
    assert CallTable.unlink(name) is True
    assert not os.path.exists(shm_path(name))
    assert not os.path.exists(shm_path(name) + ".lock")
    assert CallTable.unlink(name) is False
    with pytest.raises(TableNotFoundError):
        CallTable.open(name)


def test_attached_handles_learn_of_unlink_and_name_can_be_reused(name):
    w = CallTable.create(name, 64)
    ro = CallTable.open(name, readonly=True)
    w.start("old", 1)
    assert CallTable.unlink(name)
    for call in (lambda: w.start("x", 1), lambda: w.get("old"), lambda: len(w),
                 lambda: w.get_many(["old"]), lambda: w.snapshot(), lambda: w.remove("old"),
                 lambda: w.start_many(["x"], 1), lambda: ro.get("old"), lambda: len(ro),
                 lambda: ro.snapshot(), lambda: ro.get_many(["old"])):
        with pytest.raises(TableRemovedError):
            call()
    with CallTable.create(name, 64) as fresh:
        assert len(fresh) == 0 and fresh.get("old") is None
        fresh.start("new", 2)
        with pytest.raises(TableRemovedError):
            w.get("new")        # the old handle never silently switches to the new table
    w.close()
    ro.close()
    CallTable.unlink(name)


# ---------------------------------------------------------------- read-only


def test_readonly_handle_sees_writes_and_cannot_write(table):
    ro = CallTable.open(table.path, readonly=True)
    try:
        assert ro.readonly
        table.start("a", 10)
        assert ro.get("a") == (10, NOT_SET)        # visible at once, no re-open
        table.stop("a", 11)
        assert ro["a"] == (10, 11)
        writes = {
            "start": lambda: ro.start("b", 1),
            "stop": lambda: ro.stop("a", 1),
            "stop-insert": lambda: ro.stop("b", 1, insert_missing=True),
            "remove": lambda: ro.remove("a"),
            "start_many": lambda: ro.start_many(["b"], 1),
            "stop_many": lambda: ro.stop_many(["a"], 1),
            "record_many": lambda: ro.record_many(["b"], 1, 2),
            "remove_many": lambda: ro.remove_many(["a"]),
            "grow": lambda: ro.grow(4096),
            "compact": lambda: ro.compact(),
            "locked": lambda: ro.locked().__enter__(),
        }
        for what, call in writes.items():
            with pytest.raises(ReadOnlyError) as ei:
                call()
            assert isinstance(ei.value, PermissionError), what
        assert rows(table) == {b"a": (10, 11)}
        assert len(ro) == 1 and list(ro) == ["a"]
        assert ro.get_many(["a", "b"]).found.tolist() == [True, False]
        assert ro.stats().count == 1
    finally:
        ro.close()


def test_readonly_open_needs_no_lock_file(table):
    table.start("a", 1)
    os.unlink(table.lock_path)
    with CallTable.open(table.path, readonly=True) as ro:
        assert ro.get("a") == (1, NOT_SET)
    assert not os.path.exists(table.lock_path)


def test_readonly_handle_follows_grow(table):
    ro = CallTable.open(table.path, readonly=True)
    try:
        table.start_many([f"k{i}" for i in range(300)], 5)
        table.grow(8192)
        assert ro.capacity == 8192
        assert len(ro) == 300
        assert ro.get_many([f"k{i}" for i in range(300)]).found.all()
    finally:
        ro.close()


# ---------------------------------------------------------------- single operations


def test_start_keeps_the_first_start(table):
    assert table.start("c1", 100) is True
    assert table.get("c1") == (100, NOT_SET)
    assert table.start("c1", 200) is False
    assert table.get("c1") == (100, NOT_SET)
    assert len(table) == 1


def test_stop_keeps_the_first_end(table):
    table.start("c1", 100)
    assert table.stop("c1", 150) is True
    assert table.stop("c1", 170) is False
    assert table.get("c1") == (100, 150)


def test_stop_of_unknown_call_records_nothing_unless_asked(table):
    assert table.stop("ghost", 5) is False
    assert table.get("ghost") is None and len(table) == 0
    assert table.stop("ghost", 5, insert_missing=True) is True
    assert table.get("ghost") == (NOT_SET, 5)
    assert table.stop("ghost", 6, insert_missing=True) is False
    # the INVITE that predates the log is found later: its start is still recorded
    assert table.start("ghost", 1) is True
    assert table.start("ghost", 2) is False
    assert table.get("ghost") == (1, 5)


def test_get_contains_getitem_len(table):
    assert table.get("x") is None
    assert "x" not in table
    with pytest.raises(KeyError) as ei:
        table["x"]
    assert ei.value.args == ("x",)
    table.start("x", 3)
    assert "x" in table and b"x" in table
    assert table["x"] == (3, NOT_SET)
    assert len(table) == 1


def test_str_and_bytes_are_the_same_call(table):
    assert table.start("abc@host", 1)
    assert not table.start(b"abc@host", 2)
    assert table.stop(bytearray(b"abc@host"), 3)
    assert table.get(b"abc@host") == (1, 3)
    assert len(table) == 1


def test_remove(table):
    table.start("a", 1)
    table.stop("a", 2)
    assert table.remove("a") is True
    assert table.get("a") is None and len(table) == 0
    assert table.remove("a") is False
    assert table.start("a", 7) is True             # a new call under the old Call-ID
    assert table.get("a") == (7, NOT_SET)


def test_default_timestamp_is_now(table):
    before = time.time_ns()
    table.start("a")
    table.stop("a")
    after = time.time_ns()
    s, e = table.get("a")
    assert before <= s <= e <= after


def test_iteration_yields_str_keys_that_find_their_rows(table):
    keys = ["a@h", "b", "c" * 64]
    for i, k in enumerate(keys):
        table.start(k, i)
    table.start(b"\xffraw\xfe", 9)                 # not UTF-8: decoded with surrogateescape
    got = list(table)
    assert sorted(got) == sorted(keys + [b"\xffraw\xfe".decode("utf-8", "surrogateescape")])
    for k in got:
        assert k in table
    assert table.get(b"\xffraw\xfe".decode("utf-8", "surrogateescape")) == (9, NOT_SET)


def test_long_call_ids_sharing_a_prefix_never_merge(make_table):
    t = make_table(64, key_width=16)
    a, b = "p" * 15 + "A", "p" * 15 + "B"
    assert t.start(a, 1) and t.start(b, 2)
    assert t.get(a) == (1, NOT_SET) and t.get(b) == (2, NOT_SET)
    for long in ("p" * 16 + "A", "p" * 16 + "B"):
        with pytest.raises(InvalidKeyError, match="17 bytes long.*key width of 16"):
            t.start(long, 3)
    assert len(t) == 2


@pytest.mark.parametrize("key,match", [
    ("", "empty"),
    (b"", "empty"),
    ("x" * 65, "65 bytes long.*key width of 64 bytes"),
    ("é" * 33, "66 bytes long.*key width of 64 bytes"),
    ("a\0b", "NUL"),
    (b"ab\0", "NUL"),
    (42, "must be str or bytes, not int"),
    (None, "must be str or bytes, not NoneType"),
    (4.2, "must be str or bytes, not float"),
])
def test_bad_keys_are_refused_by_every_single_call(table, key, match):
    table.start("present", 1)
    calls = [lambda: table.start(key, 1), lambda: table.stop(key, 1),
             lambda: table.stop(key, 1, insert_missing=True), lambda: table.get(key),
             lambda: table.remove(key), lambda: table[key], lambda: key in table]
    for call in calls:
        with pytest.raises(InvalidKeyError, match=match) as ei:
            call()
        assert repr(key)[:60] in str(ei.value)
    assert rows(table) == {b"present": (1, NOT_SET)}


def test_key_exactly_key_width_long_is_accepted(make_table):
    for kw in (1, 8, 13, 64, 255):
        t = make_table(64, key_width=kw)
        k = "k" * kw
        assert t.start(k, 1)
        assert t.get(k) == (1, NOT_SET)
        assert t.snapshot()["key"].tolist() == [k.encode()]


# ---------------------------------------------------------------- timestamps


@pytest.mark.parametrize("ts,ns", [
    (0, 0),
    (-1_000, -1_000),                                   # before 1970 is a time too
    (2**63 - 1, 2**63 - 1),
    (np.int64(12345), 12345),
    (np.uint32(7), 7),
    (np.datetime64("2024-03-01T12:00:00", "s"), 1709294400 * 10**9),
    (np.datetime64("2024-03-01T12:00:00.123456789", "ns"), 1709294400123456789),
    (dt.datetime(2024, 3, 1, 12, 0, 0), 1709294400 * 10**9),          # naive = UTC
    (dt.datetime(2024, 3, 1, 13, 0, 0, 5, tzinfo=dt.timezone(dt.timedelta(hours=1))),
     1709294400 * 10**9 + 5000),
])
def test_accepted_timestamps(table, ts, ns):
    assert table.start("s", ts)
    assert table.stop("s", ts)
    assert table.get("s") == (ns, ns)


@pytest.mark.parametrize("ts", [
    1.5, 1709294400.0, np.float64(1e18), float("nan"), True, np.bool_(False), "2024-01-01",
    2**63, -(2**63), NOT_SET, np.datetime64("NaT"), [1], dt.date(2024, 1, 1),
])
def test_bad_timestamps_are_refused_and_change_nothing(table, ts):
    table.start("present", 1)
    for call in (lambda: table.start("new", ts), lambda: table.stop("present", ts),
                 lambda: table.stop("new", ts, insert_missing=True)):
        with pytest.raises(InvalidTimestampError) as ei:
            call()
        assert isinstance(ei.value, ValueError)
    assert rows(table) == {b"present": (1, NOT_SET)}


def test_float_error_points_to_from_seconds(table):
    with pytest.raises(InvalidTimestampError, match="from_seconds"):
        table.start("a", 1795668428.565)
    ns = npcalls.from_seconds(1795668428.565)
    assert ns == 1795668428565000000
    assert table.start("a", ns) and table.get("a") == (ns, NOT_SET)
    assert npcalls.from_seconds(np.array([1.5, 2.25])).tolist() == [1_500_000_000, 2_250_000_000]


# ---------------------------------------------------------------- snapshot, stats


def test_snapshot_dtype_contents_and_copy(make_table):
    t = make_table(64, key_width=13)
    snap = t.snapshot()
    assert snap.dtype == np.dtype([("key", "S13"), ("start", "<i8"), ("end", "<i8")])
    assert len(snap) == 0
    t.start("a", 1)
    t.stop("a", 2)
    t.start("b", 3)
    t.stop("end-only", 4, insert_missing=True)
    snap = t.snapshot()
    assert rows(t) == {b"a": (1, 2), b"b": (3, NOT_SET), b"end-only": (NOT_SET, 4)}
    t.remove("a")
    t.start("later", 5)
    assert len(snap) == 3 and b"later" not in snap["key"].tolist()   # a copy, not a view
    starts = snap["start"].view("datetime64[ns]")
    assert np.isnat(starts).sum() == 1             # NOT_SET reads as NaT


def test_stats(make_table):
    t = make_table(100, key_width=24)
    t.start_many(["a", "b", "c", "d"], 10)
    t.stop_many(["a", "b"], 20)
    t.stop("e", 30, insert_missing=True)
    t.remove("d")
    s = t.stats()
    assert (s.capacity, s.count, s.limit, s.key_width) == (104, 4, 78, 24)
    assert s.load_factor == pytest.approx(4 / 104)
    assert (s.active, s.ended, s.end_only) == (1, 2, 1)
    assert (s.n_started, s.n_stopped, s.n_removed) == (4, 3, 1)
    assert s.max_probe >= 1 and s.mean_probe >= 1.0
    assert s.path == t.path and s.file_bytes == os.path.getsize(t.path)
    assert s.auto_grow is False and s.writer_pid is None
    assert s.generation == 0 and s.n_rebuilds == 0
    with t.locked():
        assert t.stats().writer_pid == os.getpid()
    t.grow(400)
    s = t.stats()
    assert (s.capacity, s.count, s.generation, s.n_rebuilds) == (400, 4, 1, 1)
    assert (s.n_started, s.n_stopped, s.n_removed) == (4, 3, 1)


# ---------------------------------------------------------------- full, grow, compact


def test_table_full_is_a_clear_error(make_table):
    """P7 (docs/properties.md): past the load limit, a clear error with count and capacity."""
    t = make_table(64, key_width=16)
    assert t.limit == 48
    for i in range(48):
        assert t.start(f"k{i}", i)
    with pytest.raises(TableFullError) as ei:
        t.start("one-more", 1)
    e = ei.value
    assert (e.count, e.capacity, e.limit) == (48, 64, 48)
    msg = str(e)
    assert "48 calls stored" in msg and "capacity 64" in msg and t.path in msg
    with pytest.raises(TableFullError):
        t.stop("one-more", 1, insert_missing=True)
    with pytest.raises(TableFullError):
        t.start_many(["k0", "new-a", "new-b"], 1)
    with pytest.raises(TableFullError):
        t.record_many(["new-a"], [5], [NOT_SET])
    # nothing of a refused batch is applied, and present calls stay writable
    assert len(t) == 48 and "new-a" not in t
    assert t.start("k0", 99) is False
    assert t.stop("k0", 100) is True
    assert t.stop_many(["k1", "nobody"], 5).tolist() == [True, False]
    assert t.stop("nobody", 1) is False
    assert t.remove("k2")
    assert t.start("one-more", 1)


def test_max_load_sets_the_limit(make_table):
    t = make_table(64, max_load=0.5)
    assert t.limit == 32
    t.start_many([f"k{i}" for i in range(32)], 1)
    with pytest.raises(TableFullError):
        t.start("x", 1)


def test_auto_grow_instead_of_full(make_table):
    t = make_table(64, auto_grow=True)
    other = CallTable.open(t.path)
    ro = CallTable.open(t.path, readonly=True)
    try:
        for i in range(100):
            assert t.start(f"s{i}", i)
        assert t.start_many([f"b{i}" for i in range(400)], 7).all()
        assert t.capacity >= 1024 and len(t) == 500
        for h in (other, ro):
            assert len(h) == 500
            assert h.get("s99") == (99, NOT_SET)
            assert h.get_many([f"b{i}" for i in range(400)]).found.all()
        assert other.start("via-other", 1)
        assert t.get("via-other") == (1, NOT_SET)
        assert t.stats().auto_grow
    finally:
        other.close()
        ro.close()


def test_grow_keeps_every_call_and_every_handle(table):
    other = CallTable.open(table.path)
    try:
        keys = [f"g{i}" for i in range(500)]
        table.record_many(keys, np.arange(500), np.arange(500) + 1)
        before = rows(table)
        with pytest.raises(ValueError, match="cannot hold"):
            table.grow(600)                 # 500 calls need 667 slots at load 0.75
        assert rows(table) == before and table.capacity == 1024
        table.grow(4096)
        assert table.capacity == 4096 and rows(table) == before
        assert other.capacity == 4096 and rows(other) == before
        assert other.start("after-grow", 1)
        assert table.get("after-grow") == (1, NOT_SET)
        table.grow(700)                     # shrinking is growing to a smaller size
        assert table.capacity == 704 and len(other) == 501
    finally:
        other.close()


def test_compact_drops_tombstones_and_keeps_calls(make_table):
    t = make_table(64, max_load=0.95, seed=1)
    keys = [f"k{i}" for i in range(60)]         # nearly every bucket full
    t.start_many(keys, 1)
    t.remove_many(keys[::2])
    assert t.stats().tombstones > 0
    kept = rows(t)
    assert set(kept) == {k.encode() for k in keys[1::2]}
    t.compact()
    s = t.stats()
    assert s.tombstones == 0 and s.count == 30 and s.capacity == 64
    assert rows(t) == kept


def test_many_insert_remove_cycles_stay_correct(make_table):
    # churn through a small table: tombstones must be reclaimed, never lose a call
    t = make_table(64, seed=3)
    live = {}
    for cycle in range(60):
        batch = [f"c{cycle}-{i}" for i in range(20)]
        assert t.start_many(batch, cycle).all()
        live.update({k.encode(): (cycle, NOT_SET) for k in batch})
        gone = batch[::3] + [f"c{cycle - 1}-{i}" for i in range(20)]
        removed = t.remove_many(gone)
        assert removed.tolist() == [k.encode() in live for k in gone]
        for k in gone:
            live.pop(k.encode(), None)
        assert rows(t) == live and len(t) == len(live) == t.stats().count
    assert t.stats().n_removed == 60 * 20 - len(live)


# ---------------------------------------------------------------- the writer lock


def test_locked_is_reentrant_and_allows_writes(table):
    with table.locked() as t:
        assert t is table
        with table.locked():
            assert table.start("a", 1)
            table.start_many(["b", "c"], 2)
        assert table.stop("a", 3)
        assert table.stats().writer_pid == os.getpid()
    assert table.stats().writer_pid is None
    assert len(table) == 3


def test_lock_excludes_other_threads(table):
    other = CallTable.open(table.path)      # a second handle in the same process
    held, release, wrote = threading.Event(), threading.Event(), threading.Event()

    def holder():
        with table.locked():
            held.set()
            release.wait(10)

    def writer():
        other.start("from-thread", 1)
        wrote.set()

    th = threading.Thread(target=holder)
    th.start()
    try:
        assert held.wait(5)
        with pytest.raises(TimeoutError):
            with other.locked(timeout=0.2):
                pass
        tw = threading.Thread(target=writer)
        tw.start()
        assert not wrote.wait(0.3), "a write went through while another thread held the lock"
        assert "from-thread" not in table
        release.set()
        assert wrote.wait(5)
        tw.join(5)
        assert table.get("from-thread") == (1, NOT_SET)
    finally:
        release.set()
        th.join(5)
        other.close()


def test_error_hierarchy():
    for cls in (InvalidKeyError, InvalidTimestampError, TableFullError, FormatError,
                TableNotFoundError, TableExistsError, ReadOnlyError, TableClosedError,
                TableRemovedError, npcalls.BatchKeyError):
        assert issubclass(cls, NpcallsError)
    assert issubclass(npcalls.BatchKeyError, InvalidKeyError)
    assert issubclass(InvalidKeyError, ValueError)
    assert issubclass(InvalidTimestampError, ValueError)
