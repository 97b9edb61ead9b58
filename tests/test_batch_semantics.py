"""A batch must give exactly what the same single calls in order give, duplicates included."""

from __future__ import annotations

import datetime as dt
import random
import time

import numpy as np
import pytest

from npcalls import NOT_SET, BatchKeyError, CallTable, GetManyResult, InvalidTimestampError

POOL = ([f"call-{i}@10.0.0.{i % 7}" for i in range(24)]
        + ["é-call@h", "€uro-call", "a", "Z" * 40])


def rows(t: CallTable) -> dict[bytes, tuple[int, int]]:
    s = t.snapshot()
    return {bytes(k): (int(a), int(b)) for k, a, b in zip(s["key"], s["start"], s["end"])}


def key_forms(keys: list[str], rng: random.Random):
    """The same batch as one of the accepted input forms (all carry the same Call-IDs)."""
    form = rng.choice(["str", "bytes", "mixed", "S", "U", "object", "tuple", "iter"])
    if form == "str":
        return form, list(keys)
    if form == "bytes":
        return form, [k.encode() for k in keys]
    if form == "mixed":
        return form, [k.encode() if i % 2 else k for i, k in enumerate(keys)]
    if form == "S":
        return form, np.array([k.encode() for k in keys] or [b""], dtype="S64")[:len(keys)]
    if form == "U":
        return form, np.array(keys, dtype="U64")
    if form == "object":
        return form, np.array(keys + [None], dtype=object)[:-1]
    if form == "tuple":
        return form, tuple(keys)
    return form, iter(list(keys))


def ts_forms(values: list[int], rng: random.Random):
    """The same timestamps as int list, int64 array, datetime64 (ns/us), or datetime objects.

    ``values`` are multiples of 1000 so that microsecond units represent them exactly.
    """
    form = rng.choice(["list", "int64", "M8ns", "M8us", "datetime", "int32"])
    if form == "list":
        return list(values)
    if form == "int64":
        return np.array(values, dtype=np.int64)
    if form == "int32":
        return np.array([v // 1000 for v in values], dtype=np.int32) * np.int64(1000)
    if form == "M8ns":
        return np.array(values, dtype="datetime64[ns]")
    if form == "M8us":
        return np.array(values, dtype=np.int64).astype("datetime64[ns]").astype("datetime64[us]")
    return [dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(microseconds=v // 1000)
            for v in values]


def record_model(d: dict, keys: list[str], start: list[int], end: list[int], insert: bool):
    """record_many as documented: per row, insert if absent (if allowed), then fill unset fields."""
    started, ended = [], []
    for k, s, e in zip(keys, start, end):
        kb = k.encode()
        if kb not in d:
            if not insert:
                started.append(False)
                ended.append(False)
                continue
            d[kb] = (NOT_SET, NOT_SET)
        cs, ce = d[kb]
        ok_s = s != NOT_SET and cs == NOT_SET
        ok_e = e != NOT_SET and ce == NOT_SET
        d[kb] = (s if ok_s else cs, e if ok_e else ce)
        started.append(ok_s)
        ended.append(ok_e)
    return started, ended


@pytest.fixture
def pair(make_table):
    """Two empty tables: one driven by batches, one by the equivalent single calls."""
    return make_table(4096, key_width=64), make_table(4096, key_width=64)


# ---------------------------------------------------------------- hand-written duplicates


def test_start_many_duplicates_keep_the_first(table):
    r = table.start_many(["a", "b", "a", "a"], [1, 2, 3, 4])
    assert r.dtype == bool and r.tolist() == [True, True, False, False]
    assert rows(table) == {b"a": (1, NOT_SET), b"b": (2, NOT_SET)}
    assert table.start_many(["a", "c"], [9, 9]).tolist() == [False, True]
    assert table.get("a") == (1, NOT_SET)


def test_stop_many_duplicates_keep_the_first(table):
    table.start_many(["a", "b"], 1)
    r = table.stop_many(["a", "a", "nobody", "b", "nobody"], [5, 6, 7, 8, 9])
    assert r.tolist() == [True, False, False, True, False]
    assert rows(table) == {b"a": (1, 5), b"b": (1, 8)}


def test_stop_many_insert_missing_duplicates(table):
    r = table.stop_many(["x", "x", "y"], [5, 6, 7], insert_missing=True)
    assert r.tolist() == [True, False, True]
    assert rows(table) == {b"x": (NOT_SET, 5), b"y": (NOT_SET, 7)}
    assert table.start_many(["x", "x"], [1, 2]).tolist() == [True, False]
    assert table.get("x") == (1, 5)


def test_record_many_duplicates_fill_each_field_from_its_first_value(table):
    started, ended = table.record_many(["r", "r", "r", "q"], [NOT_SET, 3, 4, 10],
                                       [7, NOT_SET, 8, NOT_SET])
    assert started.tolist() == [False, True, False, True]
    assert ended.tolist() == [True, False, False, False]
    assert rows(table) == {b"r": (3, 7), b"q": (10, NOT_SET)}


def test_record_many_bye_before_invite_gives_the_same_row(make_table):
    a, b = make_table(64), make_table(64)
    a.record_many(["c", "c"], [100, NOT_SET], [NOT_SET, 200])
    b.record_many(["c", "c"], [NOT_SET, 100], [200, NOT_SET])
    assert rows(a) == rows(b) == {b"c": (100, 200)}


def test_record_many_without_insert_only_updates(table):
    table.start("known", 1)
    started, ended = table.record_many(["known", "unknown", "known"], [5, 5, 6], [9, 9, 10],
                                       insert=False)
    assert started.tolist() == [False, False, False]
    assert ended.tolist() == [True, False, False]
    assert rows(table) == {b"known": (1, 9)}


def test_record_many_inserts_a_row_that_knows_nothing_yet(table):
    started, ended = table.record_many(["blank"], [NOT_SET], [NOT_SET])
    assert started.tolist() == [False] and ended.tolist() == [False]
    assert table.get("blank") == (NOT_SET, NOT_SET)
    assert table.start("blank", 4)
    assert table.stop("blank", 5)


def test_record_many_nat_means_not_known(table):
    s = np.array(["2024-01-01T00:00:00", "NaT"], dtype="datetime64[s]")
    e = np.array(["NaT", "2024-01-01T00:01:00"], dtype="datetime64[s]")
    started, ended = table.record_many(["a", "b"], s, e)
    base = 1704067200 * 10**9
    assert started.tolist() == [True, False] and ended.tolist() == [False, True]
    assert rows(table) == {b"a": (base, NOT_SET), b"b": (NOT_SET, base + 60 * 10**9)}


def test_remove_many_duplicates(table):
    table.start_many(["a", "b"], 1)
    r = table.remove_many(["a", "a", "zz", "b", "b"])
    assert r.tolist() == [True, False, False, True, False]
    assert len(table) == 0


def test_get_many_and_contains_many(table):
    table.start("a", 1)
    table.stop("a", 2)
    table.stop("e", 3, insert_missing=True)
    r = table.get_many(["a", "nope", "e", "a"])
    assert isinstance(r, GetManyResult)
    assert r.start.dtype == np.int64 and r.end.dtype == np.int64 and r.found.dtype == bool
    assert r.start.tolist() == [1, NOT_SET, NOT_SET, 1]
    assert r.end.tolist() == [2, NOT_SET, 3, 2]
    assert r.found.tolist() == [True, False, True, True]
    start, end, found = r                   # unpacks like the documented tuple
    assert found is r.found
    assert table.contains_many(np.array(["e", "x"])).tolist() == [True, False]


def test_empty_batches(table):
    assert table.start_many([], []).shape == (0,)
    assert table.start_many(np.array([], "S8")).shape == (0,)
    assert table.stop_many([], insert_missing=True).shape == (0,)
    s, e = table.record_many([], [], [])
    assert s.shape == e.shape == (0,)
    assert table.remove_many([]).shape == (0,)
    r = table.get_many([])
    assert r.start.shape == r.end.shape == r.found.shape == (0,)
    assert len(table) == 0


def test_scalar_and_default_timestamps(table):
    assert table.start_many(["a", "b"], 5).all()
    assert table.start_many(["c"], np.datetime64(10, "ns")).all()
    assert table.start_many(["d"], dt.datetime(1970, 1, 1, 0, 0, 1)).all()
    before = time.time_ns()
    table.start_many(["n1", "n2"])
    table.stop_many(["n1", "n2"])
    after = time.time_ns()
    r = table.get_many(["a", "b", "c", "d", "n1", "n2"])
    assert r.start[:4].tolist() == [5, 5, 10, 10**9]
    # one reading of the clock for the whole batch
    assert r.start[4] == r.start[5] and r.end[4] == r.end[5]
    assert before <= r.start[4] <= r.end[4] <= after


def test_single_string_is_not_a_batch(table):
    with pytest.raises(TypeError):
        table.start_many("abc", 1)
    with pytest.raises(TypeError):
        table.get_many(b"abc")
    assert len(table) == 0


def test_errors_argument_is_checked(table):
    calls = {
        "start_many": lambda: table.start_many(["a"], 1, errors="skip"),
        "stop_many": lambda: table.stop_many(["a"], 1, errors="warn"),
        "record_many": lambda: table.record_many(["a"], [1], [2], errors="x"),
        "remove_many": lambda: table.remove_many([""], errors="x"),
        "get_many": lambda: table.get_many([""], errors="x"),
        "contains_many": lambda: table.contains_many([""], errors="x"),
    }
    unchecked = []
    for what, call in calls.items():
        try:
            call()
        except ValueError as e:
            if "errors must be" not in str(e):
                unchecked.append(f"{what}: {e!r}")
        else:
            unchecked.append(what)
    assert not unchecked, f"an unknown errors= value is silently accepted by {unchecked}"
    assert len(table) == 0


# ---------------------------------------------------------------- batch == single calls


@pytest.mark.parametrize("seed", range(6))
def test_random_batches_equal_single_calls_in_order(pair, seed):
    batch_t, single_t = pair
    rng = random.Random(seed)
    model: dict = {}
    for step in range(120):
        n = rng.choice([0, 1, 2, 5, 17, 40])
        keys = [rng.choice(POOL) for _ in range(n)]
        form, kin = key_forms(keys, rng)
        ts = [rng.randrange(1, 10**6) * 1000 for _ in range(n)]
        op = rng.choice(["start", "stop", "stop-insert", "record", "record-noinsert",
                         "remove", "get", "contains"])
        where = (seed, step, op, form)
        if op == "start":
            got = batch_t.start_many(kin, ts_forms(ts, rng))
            want = [single_t.start(k, t) for k, t in zip(keys, ts)]
            assert got.tolist() == want, where
        elif op in ("stop", "stop-insert"):
            ins = op == "stop-insert"
            got = batch_t.stop_many(kin, ts_forms(ts, rng), insert_missing=ins)
            want = [single_t.stop(k, t, insert_missing=ins) for k, t in zip(keys, ts)]
            assert got.tolist() == want, where
        elif op.startswith("record"):
            ins = op == "record"
            start = [t if rng.random() < 0.6 else NOT_SET for t in ts]
            end = [t + 1000 if rng.random() < 0.5 else NOT_SET for t in ts]
            sform = np.array(start, np.int64) if rng.random() < 0.5 else start
            got_s, got_e = batch_t.record_many(kin, sform, np.array(end, np.int64), insert=ins)
            want_s, want_e = record_model(model, keys, start, end, ins)
            assert (got_s.tolist(), got_e.tolist()) == (want_s, want_e), where
            # no single call inserts a row that knows neither time: one-row batches stand in
            one = [single_t.record_many([k], [s], [e], insert=ins)
                   for k, s, e in zip(keys, start, end)]
            assert [bool(x[0][0]) for x in one] == want_s, where
            assert [bool(x[1][0]) for x in one] == want_e, where
            assert rows(single_t) == model, where
        elif op == "remove":
            got = batch_t.remove_many(kin)
            want = [single_t.remove(k) for k in keys]
            assert got.tolist() == want, where
        elif op == "get":
            r = batch_t.get_many(kin)
            want = [single_t.get(k) for k in keys]
            assert r.found.tolist() == [w is not None for w in want], where
            assert [(int(a), int(b)) for a, b, f in zip(r.start, r.end, r.found) if f] == \
                [w for w in want if w is not None], where
            assert all(a == b == NOT_SET for a, b, f in zip(r.start, r.end, r.found) if not f)
        else:
            got = batch_t.contains_many(kin)
            assert got.tolist() == [k in single_t for k in keys], where
        assert rows(batch_t) == rows(single_t), where
        assert counted(batch_t) == counted(single_t), where
        model = rows(batch_t)
        assert len(batch_t) == len(single_t) == len(model)


def counted(t: CallTable) -> tuple:
    """The header's call counters and duration histogram (what monitors read)."""
    c = t.counters()
    return c.n_started, c.n_stopped, c.n_removed, c.duration_buckets, c.duration_sum_s


@pytest.mark.parametrize("insert", [True, False])
def test_record_many_equals_start_then_stop_when_every_row_has_a_start(pair, insert):
    a, b = pair
    rng = random.Random(int(insert))
    a.start_many(POOL[::3], 7)
    b.start_many(POOL[::3], 7)
    for _ in range(30):
        keys = [rng.choice(POOL) for _ in range(12)]
        start = [rng.randrange(1, 1000) for _ in keys]
        end = [s + rng.randrange(1, 1000) if rng.random() < 0.7 else NOT_SET for s in start]
        if not insert:
            # without insert, start() would add a call record_many must leave out
            known = [k in b for k in keys]
        got_s, got_e = a.record_many(keys, start, end, insert=insert)
        want_s, want_e = [], []
        for k, s, e in zip(keys, start, end):
            if not insert and k not in b:
                want_s.append(False)
                want_e.append(False)
                continue
            want_s.append(b.start(k, s))
            want_e.append(b.stop(k, e, insert_missing=insert) if e != NOT_SET else False)
        assert got_s.tolist() == want_s
        assert got_e.tolist() == want_e
        assert rows(a) == rows(b)
        if not insert:
            assert [k in a for k in keys] == known


def test_large_batch_with_heavy_duplication_equals_single_calls(pair):
    a, b = pair
    rng = np.random.default_rng(5)
    keys = [f"k{int(i)}" for i in rng.integers(0, 500, size=3000)]
    ts = rng.integers(1, 10**12, size=3000)
    assert a.start_many(keys, ts).tolist() == [b.start(k, int(t)) for k, t in zip(keys, ts)]
    ends = ts + 5
    assert a.stop_many(keys[::-1], ends[::-1], insert_missing=True).tolist() == \
        [b.stop(k, int(t), insert_missing=True) for k, t in zip(keys[::-1], ends[::-1])]
    rem = keys[:1000]
    assert a.remove_many(rem).tolist() == [b.remove(k) for k in rem]
    assert rows(a) == rows(b)
    assert a.stats().n_started == b.stats().n_started == len(set(keys))


# ---------------------------------------------------------------- bad keys in a batch


BAD = {1: "", 3: "x" * 65, 4: "a\0b", 6: "é" * 33}


def _batch_with_bad_keys(form: str):
    good = ["g0", "g2", "g5", "g2", "g7"]
    keys, gi = [], iter(good)
    for i in range(8):
        keys.append(BAD[i] if i in BAD else next(gi))
    if form == "bytes":
        return keys, [k.encode() for k in keys]
    if form == "S":
        return keys, np.array([k.encode() for k in keys], dtype="S80")
    if form == "U":
        return keys, np.array(keys, dtype="U80")
    if form == "typed":           # a wrong type at a bad position
        mixed = list(keys)
        mixed[4] = 12345
        return keys, mixed
    return keys, list(keys)


BATCH_FORMS = ["str", "bytes", "S", "U", "typed"]


@pytest.mark.parametrize("form", BATCH_FORMS)
def test_start_many_reports_bad_keys_and_applies_the_rest(pair, form):
    a, b = pair
    keys, kin = _batch_with_bad_keys(form)
    ts = list(range(100, 108))
    with pytest.raises(BatchKeyError) as ei:
        a.start_many(kin, ts)
    e = ei.value
    assert e.positions.tolist() == sorted(BAD)
    assert len(e.reasons) == len(BAD)
    assert "empty" in e.reasons[0] and "65 bytes long" in e.reasons[1]
    assert "#1 " in str(e) and "#6 " in str(e) and "rest applied" in str(e)
    want = [False if i in BAD else b.start(k, t) for i, (k, t) in enumerate(zip(keys, ts))]
    assert e.result.tolist() == want
    assert rows(a) == rows(b) and len(a) == 3
    # errors="ignore": same effect, no exception
    r = a.start_many(kin, ts, errors="ignore")
    assert r.tolist() == [False] * 8


@pytest.mark.parametrize("form", BATCH_FORMS)
@pytest.mark.parametrize("insert_missing", [True, False])
def test_stop_many_reports_bad_keys_and_applies_the_rest(pair, form, insert_missing):
    a, b = pair
    a.start_many(["g0", "g5"], 1)
    b.start_many(["g0", "g5"], 1)
    keys, kin = _batch_with_bad_keys(form)
    ts = list(range(200, 208))
    with pytest.raises(BatchKeyError) as ei:
        a.stop_many(kin, ts, insert_missing=insert_missing)
    want = [False if i in BAD else b.stop(k, t, insert_missing=insert_missing)
            for i, (k, t) in enumerate(zip(keys, ts))]
    assert ei.value.positions.tolist() == sorted(BAD)
    assert ei.value.result.tolist() == want
    assert rows(a) == rows(b)
    assert a.stop_many(kin, ts, insert_missing=insert_missing, errors="ignore").tolist() == \
        [False] * 8


@pytest.mark.parametrize("form", BATCH_FORMS)
def test_record_many_reports_bad_keys_and_applies_the_rest(table, form):
    keys, kin = _batch_with_bad_keys(form)
    start = [10 + i for i in range(8)]
    end = [NOT_SET if i % 2 else 50 + i for i in range(8)]
    with pytest.raises(BatchKeyError) as ei:
        table.record_many(kin, start, end)
    model: dict = {}
    good_rows = [i for i in range(8) if i not in BAD]
    ws, we = record_model(model, [keys[i] for i in good_rows], [start[i] for i in good_rows],
                          [end[i] for i in good_rows], True)
    got_s, got_e = ei.value.result
    assert ei.value.positions.tolist() == sorted(BAD)
    assert got_s[good_rows].tolist() == ws and got_e[good_rows].tolist() == we
    assert not got_s[sorted(BAD)].any() and not got_e[sorted(BAD)].any()
    assert rows(table) == model


@pytest.mark.parametrize("form", BATCH_FORMS)
def test_get_many_reports_bad_keys(pair, form):
    a, b = pair
    for t in pair:
        t.start_many(["g0", "g2", "g7"], 3)
    keys, kin = _batch_with_bad_keys(form)
    with pytest.raises(BatchKeyError) as ei:
        a.get_many(kin)
    r = ei.value.result
    want = [None if i in BAD else b.get(k) for i, k in enumerate(keys)]
    assert ei.value.positions.tolist() == sorted(BAD)
    assert r.found.tolist() == [w is not None for w in want]
    assert r.start.tolist() == [w[0] if w else NOT_SET for w in want]
    assert r.end.tolist() == [w[1] if w else NOT_SET for w in want]
    r2 = a.get_many(kin, errors="ignore")
    assert r2.found.tolist() == r.found.tolist() and r2.start.tolist() == r.start.tolist()
    assert a.contains_many(kin, errors="ignore").tolist() == [w is not None for w in want]


@pytest.mark.parametrize("form", BATCH_FORMS)
def test_contains_many_reports_bad_keys_with_its_own_result(table, form):
    table.start_many(["g0", "g7"], 3)
    keys, kin = _batch_with_bad_keys(form)
    with pytest.raises(BatchKeyError) as ei:
        table.contains_many(kin)
    assert ei.value.positions.tolist() == sorted(BAD)
    # BatchKeyError.result is documented as what the call would have returned: a bool array
    assert isinstance(ei.value.result, np.ndarray), type(ei.value.result)
    assert ei.value.result.tolist() == [k == "g0" for k in keys]


@pytest.mark.parametrize("form", BATCH_FORMS)
def test_remove_many_reports_bad_keys_and_applies_the_rest(pair, form):
    a, b = pair
    for t in pair:
        t.start_many(["g0", "g2", "g7"], 3)
    keys, kin = _batch_with_bad_keys(form)
    with pytest.raises(BatchKeyError) as ei:
        a.remove_many(kin)
    assert ei.value.positions.tolist() == sorted(BAD)
    assert ei.value.result.tolist() == [False if i in BAD else b.remove(k)
                                        for i, k in enumerate(keys)]
    assert rows(a) == rows(b) == {b"g7": (3, NOT_SET)}
    assert a.remove_many(kin, errors="ignore").tolist() == [False] * 8


def test_batch_of_only_bad_keys_applies_nothing(table):
    with pytest.raises(BatchKeyError) as ei:
        table.start_many(["", "a\0", "x" * 100], 1)
    assert ei.value.positions.tolist() == [0, 1, 2]
    assert ei.value.result.tolist() == [False, False, False]
    assert len(table) == 0


def test_bad_keys_from_an_iterator_are_still_reported_by_position(table):
    with pytest.raises(BatchKeyError) as ei:
        table.start_many((k for k in ["ok", "", "ok2"]), 1)
    assert ei.value.positions.tolist() == [1]
    assert "#1" in str(ei.value)
    assert rows(table) == {b"ok": (1, NOT_SET), b"ok2": (1, NOT_SET)}


def test_many_bad_keys_message_is_bounded(table):
    keys = [""] * 50 + ["fine"]
    with pytest.raises(BatchKeyError) as ei:
        table.start_many(keys, 1)
    assert len(ei.value.positions) == 50
    assert "and 45 more" in str(ei.value) and len(str(ei.value)) < 1000
    assert table.get("fine") == (1, NOT_SET)


# ---------------------------------------------------------------- bad timestamps in a batch


@pytest.mark.parametrize("ts", [
    [1.0, 2.0],
    np.array([1.5, 2.5]),
    [1, 2.5],
    np.array([1, NOT_SET], np.int64),
    np.array(["2024-01-01", "NaT"], dtype="datetime64[s]"),
    np.array([1, 2**64 - 1], np.uint64),
    np.array([True, False]),
    [1, 2, 3],
    np.array([1], np.int64),
    np.array(["a", "b"]),
    1.5,
    np.datetime64("NaT"),
])
def test_start_and_stop_many_refuse_bad_timestamps_and_change_nothing(table, ts):
    table.start("k1", 1)
    before = rows(table)
    for call in (lambda: table.start_many(["k1", "k2"], ts),
                 lambda: table.stop_many(["k1", "k2"], ts),
                 lambda: table.stop_many(["k1", "k2"], ts, insert_missing=True)):
        with pytest.raises(InvalidTimestampError):
            call()
    assert rows(table) == before


@pytest.mark.parametrize("ts", [
    pytest.param(np.array([1.5, 2.5]), id="float-array"),
    pytest.param([1.0, 2.0], id="float-list"),
    pytest.param(np.array([1, 2**64 - 1], np.uint64), id="uint64-beyond-int64"),
    pytest.param(np.array([1, 2, 3], np.int64), id="int-too-many"),
    pytest.param(np.array(["2024-01-01", "2024-01-02", "2024-01-03"], dtype="datetime64[s]"),
                 id="datetime64-too-many"),
    pytest.param(np.array(["2024-01-01"], dtype="datetime64[s]"), id="datetime64-too-few"),
    pytest.param(np.array([True, False]), id="bool"),
])
@pytest.mark.parametrize("column", ["start", "end"])
def test_record_many_refuses_bad_timestamps_and_changes_nothing(table, ts, column):
    table.start("k1", 1)
    before = rows(table)
    kw = {column: ts}
    with pytest.raises(InvalidTimestampError):
        table.record_many(["k1", "k2"], **kw)
    assert rows(table) == before
    # a refused call must not leave the table looking as if its writer had crashed
    table.start("k3", 3)
    assert table.stats().n_recoveries == 0


def test_datetime64_of_any_unit_equals_int_nanoseconds(make_table):
    a, b = make_table(256), make_table(256)
    keys = [f"k{i}" for i in range(10)]
    secs = np.arange(10, dtype=np.int64) + 1_700_000_000
    a.start_many(keys, secs.astype("datetime64[s]"))
    b.start_many(keys, secs * 10**9)
    a.stop_many(keys, (secs * 1000 + 5).astype("datetime64[ms]"))
    b.stop_many(keys, secs * 10**9 + 5 * 10**6)
    a.record_many(["r"], np.array(["2024-01-01T00:00:00.000001"], "datetime64[us]"),
                  np.array([1704067200000001001], "datetime64[ns]"))
    b.record_many(["r"], [1704067200000001000], [1704067200000001001])
    assert rows(a) == rows(b)
