"""npcalls.analysis: every metric against a brute-force computation on random tables."""

from __future__ import annotations

import subprocess
import sys
import uuid

import numpy as np
import pandas as pd
import pytest

import npcalls
from npcalls import NOT_SET
from npcalls import analysis as A

S = 1_000_000_000
BASE = 1_795_668_428 * S          # the bundled Kamailio log's epoch: 2026-11-26


@pytest.fixture
def new_table(tdir):
    made = []

    def make(capacity=4096, key_width=64):
        t = npcalls.CallTable.create(f"a-{uuid.uuid4().hex[:8]}", capacity, key_width)
        made.append(t)
        return t

    yield make
    for t in made:
        p = t.path
        t.close()
        npcalls.CallTable.unlink(p)


def random_rows(rng, n, span_s=300, quantum=S):
    """Starts/ends on a coarse grid (so that ties are common), in every state.

    About 55% ended, 25% active, 10% end-only, 5% with the end before the
    start (clock skew between hosts), 5% empty.
    """
    st = BASE + rng.integers(0, span_s * S // quantum, n) * quantum
    hold = rng.integers(0, 60 * S // quantum, n) * quantum
    en = st + hold
    kind = rng.random(n)
    en[(kind >= 0.55) & (kind < 0.80)] = NOT_SET                 # active
    st[(kind >= 0.80) & (kind < 0.90)] = NOT_SET                 # end-only
    skew = (kind >= 0.90) & (kind < 0.95)
    en[skew] = st[skew] - rng.integers(1, 5, skew.sum()) * quantum
    empty = kind >= 0.95
    st[empty] = NOT_SET
    en[empty] = NOT_SET
    keys = np.array([f"call-{i}-{uuid.uuid4().hex[:6]}@10.0.0.{i % 7}" for i in range(n)])
    return keys, st, en


def filled(new_table, rng, n=600, **kw):
    keys, st, en = random_rows(rng, n, **kw)
    t = new_table(capacity=max(1024, 2 * n))
    t.record_many(keys, st, en)
    return t, keys, st, en


def brute_count(st, en, now, t):
    """Calls up at instant t, straight from the definition."""
    n = 0
    for s, e in zip(st.tolist(), en.tolist()):
        if s == NOT_SET:
            continue
        end = now + 1 if e == NOT_SET else e
        if s <= t < end:
            n += 1
    return n


def brute_peak(st, en, now):
    """(max count, first instant) by counting at every instant where the count can change."""
    has = st != NOT_SET
    inst = np.unique(np.concatenate([st[has], en[en != NOT_SET], [now + 1]]))
    counts = [brute_count(st, en, now, int(t)) for t in inst]
    if not counts or max(counts) == 0:
        return 0, None
    m = max(counts)
    return m, int(inst[counts.index(m)])


# --------------------------------------------------------------------------- import hygiene

def test_import_npcalls_does_not_import_pandas_or_matplotlib():
    code = ("import sys, npcalls, npcalls.analysis, npcalls.top, npcalls.simulate, "
            "npcalls.cli.analysis_cmds\n"
            "bad = [m for m in ('pandas', 'matplotlib', 'pyarrow', 'rich', 'IPython') "
            "if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- to_pandas

def test_to_pandas_matches_the_table_row_by_row(new_table):
    rng = np.random.default_rng(1)
    t, keys, st, en = filled(new_table, rng)
    df = A.to_pandas(t)
    assert list(df.columns) == ["call_id", "start", "end", "duration", "state"]
    # tz-aware UTC, as the Parquet export (README, "Jupyter and analysis")
    assert df["start"].dtype == "datetime64[ns, UTC]" and df["end"].dtype == "datetime64[ns, UTC]"
    assert df["duration"].dtype == "timedelta64[ns]"
    assert list(df["state"].cat.categories) == list(A.STATES)
    assert len(df) == len(t) == len(keys)
    assert df["call_id"].is_unique
    assert isinstance(df.attrs["now"], pd.Timestamp) and df.attrs["table"] == t.path
    by_key = dict(zip(keys.tolist(), zip(st.tolist(), en.tolist())))
    for row in df.itertuples(index=False):
        s, e = by_key[row.call_id]
        assert (row.start is pd.NaT) == (s == NOT_SET)
        assert (row.end is pd.NaT) == (e == NOT_SET)
        if s != NOT_SET:
            assert row.start.value == s
        if e != NOT_SET:
            assert row.end.value == e
        if s != NOT_SET and e != NOT_SET:
            assert row.duration.value == e - s
            assert row.state == "ended"
        else:
            assert row.duration is pd.NaT
            assert row.state == {(True, False): "active", (False, True): "end-only",
                                 (False, False): "empty"}[(s != NOT_SET, e != NOT_SET)]


def test_to_pandas_from_a_snapshot_and_an_explicit_now(new_table):
    rng = np.random.default_rng(2)
    t, keys, st, en = filled(new_table, rng, n=50)
    snap = t.snapshot()
    df = A.to_pandas(snap, now=BASE)
    assert df.attrs["now"] == pd.Timestamp(BASE, tz="UTC")
    assert "table" not in df.attrs
    assert sorted(df["call_id"]) == sorted(keys.tolist())
    # A frame passes through (with a new now if asked).
    assert A.to_pandas(df) is df
    assert A.to_pandas(df, now=BASE + S).attrs["now"] == pd.Timestamp(BASE + S, tz="UTC")


def test_to_pandas_of_keys_that_are_not_utf8_keeps_every_key(new_table):
    t = new_table(key_width=16)
    t.start(b"\xff\xfebad@x", ts=BASE)
    t.start("gut-ü@x", ts=BASE + 1)
    t.start(b"x" * 16, ts=BASE + 2)          # a key filling the whole field: no padding
    df = A.to_pandas(t)
    assert len(df) == 3
    ids = set(df["call_id"])
    assert "gut-ü@x" in ids and "x" * 16 in ids
    assert b"\xff\xfebad@x".decode("utf-8", "surrogateescape") in ids


def test_to_pandas_of_an_empty_table(new_table):
    t = new_table()
    df = A.to_pandas(t)
    assert len(df) == 0 and list(df.columns) == ["call_id", "start", "end", "duration", "state"]
    assert A.duration_stats(df)["count"] == 0
    assert len(A.arrivals(df)) == 0
    c = A.concurrency(df)
    assert len(c) == 0 and c.attrs["peak"] == 0 and c.attrs["peak_at"] is pd.NaT
    assert A.peak_concurrency(df) == (0, pd.NaT)
    assert len(A.long_running(df, "0s")) == 0


def test_to_pandas_a_million_rows_is_fast():
    """The benchmark's figure, loosely (the machine is shared): well under a second."""
    n = 1_000_000
    rng = np.random.default_rng(3)
    snap = np.zeros(n, [("key", "S64"), ("start", "<i8"), ("end", "<i8")])
    snap["key"] = np.char.add(b"call-", np.arange(n).astype("S8"))
    snap["start"] = BASE + rng.integers(0, 3600 * S, n)
    snap["end"] = np.where(rng.random(n) < 0.8, snap["start"] + S, NOT_SET)
    best = min(_timed(lambda: A.to_pandas(snap)) for _ in range(3))
    assert best < 1.0, f"to_pandas of 1M rows took {best:.2f} s"


def _timed(f):
    import time
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- selections

@pytest.mark.parametrize("seed", [4, 5])
def test_active_ended_end_only_long_running(new_table, seed):
    rng = np.random.default_rng(seed)
    t, keys, st, en = filled(new_table, rng)
    now = BASE + 200 * S
    df = A.to_pandas(t, now=now)
    act = set(keys[(st != NOT_SET) & (en == NOT_SET)].tolist())
    assert set(A.active(df)["call_id"]) == act
    assert set(A.ended(df)["call_id"]) == set(keys[(st != NOT_SET) & (en != NOT_SET)].tolist())
    assert set(A.end_only(df)["call_id"]) == set(keys[(st == NOT_SET) & (en != NOT_SET)].tolist())
    for lim in (0, 30 * S, 120 * S, 10_000 * S):
        lr = A.long_running(df, pd.Timedelta(lim, "ns"))
        want = {k for k, s, e in zip(keys.tolist(), st.tolist(), en.tolist())
                if s != NOT_SET and e == NOT_SET and now - s >= lim}
        assert set(lr["call_id"]) == want
        ages = lr["age"].to_numpy().view(np.int64)
        assert (np.diff(ages) <= 0).all()                # longest first
        assert (ages == now - lr["start"].array.asi8).all()
        lr2 = A.long_running(df, pd.Timedelta(lim, "ns"), include_ended=True)
        want |= {k for k, s, e in zip(keys.tolist(), st.tolist(), en.tolist())
                 if s != NOT_SET and e != NOT_SET and e - s >= lim}
        assert set(lr2["call_id"]) == want
    # now defaults to the snapshot's instant; a string duration works
    assert len(A.long_running(df, "1h", now=BASE + 10_000 * S)) == len(act)


# --------------------------------------------------------------------------- durations

@pytest.mark.parametrize("seed", [6, 7, 8])
def test_duration_stats_against_numpy(new_table, seed):
    rng = np.random.default_rng(seed)
    t, keys, st, en = filled(new_table, rng, quantum=1_000_003)   # odd ns: no round numbers
    both = (st != NOT_SET) & (en != NOT_SET)
    d = (en[both] - st[both]).astype(np.int64)
    pcts = (1, 25, 50, 90, 99, 99.9)
    ds = A.duration_stats(A.to_pandas(t), pcts)
    assert ds.name == "duration_s"
    assert ds["count"] == len(d)
    assert ds["mean"] == pytest.approx(d.mean() / S, rel=1e-12)
    assert ds["std"] == pytest.approx(d.std(ddof=1) / S, rel=1e-9)
    assert ds["min"] == d.min() / S and ds["max"] == d.max() / S
    for p, want in zip(pcts, np.percentile(d, pcts)):
        assert ds[f"p{p:g}"] == pytest.approx(want / S, rel=1e-12, abs=1e-12)
    # the same from the table and from the snapshot
    assert A.duration_stats(t, pcts).equals(ds)
    assert A.duration_stats(t.snapshot(), pcts).equals(ds)


# --------------------------------------------------------------------------- arrivals

@pytest.mark.parametrize("freq", ["1s", "7s", "1min", 2_500_000_000])
def test_arrivals_against_direct_counting(new_table, freq):
    rng = np.random.default_rng(9)
    t, keys, st, en = filled(new_table, rng, quantum=123_456_789)
    a = A.arrivals(A.to_pandas(t), freq)
    step = A._step_ns(freq)
    assert a.attrs["freq_ns"] == step
    starts = st[st != NOT_SET]
    assert a.sum() == len(starts)
    idx = a.index.asi8
    assert (np.diff(idx) == step).all() and (idx % step == 0).all()
    assert idx[0] <= starts.min() < idx[0] + step
    assert idx[-1] <= starts.max() < idx[-1] + step
    for b, n in zip(idx.tolist(), a.tolist()):
        assert n == int(((starts >= b) & (starts < b + step)).sum())


def test_arrivals_with_a_range_and_automatic_freq(new_table):
    rng = np.random.default_rng(10)
    t, keys, st, en = filled(new_table, rng)
    lo, hi = BASE + 50 * S, BASE + 100 * S
    a = A.arrivals(t, "10s", start=pd.Timestamp(lo), end=pd.Timestamp(hi))
    step = 10 * S
    first, last = lo // step * step, hi // step * step      # bins aligned on the epoch
    assert a.index[0].value == first and a.index[-1].value == last
    starts = st[st != NOT_SET]
    assert a.sum() == int(((starts >= first) & (starts < last + step)).sum())
    auto = A.arrivals(t)
    assert 1 <= len(auto) <= 601 and auto.sum() == len(starts)


# --------------------------------------------------------------------------- concurrency

@pytest.mark.parametrize("seed", [11, 12, 13, 14])
def test_concurrency_at_random_instants_against_direct_counting(new_table, seed):
    rng = np.random.default_rng(seed)
    t, keys, st, en = filled(new_table, rng, n=400)
    now = BASE + 250 * S
    df = A.to_pandas(t, now=now)
    events = np.concatenate([st[st != NOT_SET], en[en != NOT_SET], [now, now + 1]])
    # random instants, and every event instant exactly and 1 ns either side (the edges)
    times = np.concatenate([
        BASE + rng.integers(-10 * S, 400 * S, 200),
        rng.choice(events, 100), rng.choice(events, 50) - 1, rng.choice(events, 50) + 1])
    c = A.concurrency(df, times=times.view("datetime64[ns]"))
    assert c.name == "concurrency" and len(c) == len(times)
    assert (c.index.asi8 == times).all()                     # input order kept
    for ti, v in zip(times.tolist(), c.tolist()):
        assert v == brute_count(st, en, now, ti), ti


@pytest.mark.parametrize("seed", [15, 16, 17])
def test_concurrency_grid_peak_and_bin_max_against_brute_force(new_table, seed):
    rng = np.random.default_rng(seed)
    t, keys, st, en = filled(new_table, rng, n=300, quantum=S // 4)
    now = BASE + 320 * S
    df = A.to_pandas(t, now=now)
    c = A.concurrency(df, "5s")
    step = 5 * S
    idx = c.index.asi8
    assert (np.diff(idx) == step).all()
    for ti, v in zip(idx.tolist(), c.tolist()):
        assert v == brute_count(st, en, now, ti)
    # the grid runs from the first start to the last instant a call is up
    # (now, for the active calls, unless a call ends later)
    up = st != NOT_SET
    last_up = max(now, int(en[up & (en != NOT_SET) & (en > st)].max()) - 1)
    assert idx[0] <= st[up].min() < idx[0] + step
    assert idx[-1] <= last_up < idx[-1] + step
    peak, at = brute_peak(st, en, now)
    assert c.attrs["peak"] == peak and c.attrs["peak_at"].value == at
    assert A.peak_concurrency(df) == (peak, pd.Timestamp(at, tz="UTC"))
    # how="max": the highest count anywhere in [t, t + step)
    cm = A.concurrency(df, "5s", how="max")
    inst = np.unique(np.concatenate([st[st != NOT_SET], en[en != NOT_SET]]))
    for ti, v in zip(idx.tolist(), cm.tolist()):
        inside = [ti] + [int(x) for x in inst if ti < x < ti + step]
        assert v == max(brute_count(st, en, now, x) for x in inside)
    assert cm.max() == peak


def test_concurrency_edges_start_inclusive_end_exclusive_active_through_now(new_table):
    t = new_table()
    t.record_many(["a", "b", "c"], [BASE, BASE + 10, BASE + 10], [BASE + 10, BASE + 20, NOT_SET])
    now = BASE + 30
    at = lambda x: int(A.concurrency(t, times=[np.datetime64(x, "ns")], now=now).iloc[0])  # noqa
    assert at(BASE - 1) == 0
    assert at(BASE) == 1              # start inclusive
    assert at(BASE + 9) == 1
    assert at(BASE + 10) == 2         # a ends (exclusive) as b and c start
    assert at(BASE + 20) == 1         # b ended
    assert at(now) == 1               # c is up through now ...
    assert at(now + 1) == 0           # ... and not after
    assert A.peak_concurrency(t, now=now) == (2, pd.Timestamp(BASE + 10, tz="UTC"))


def test_concurrency_all_ended_grid_ends_at_the_last_call(new_table):
    t = new_table()
    t.record_many(["a", "b"], [BASE, BASE + 3 * S], [BASE + 5 * S, BASE + 9 * S])
    c = A.concurrency(t, "1s", now=BASE + 3600 * S)
    assert c.index[0].value == BASE and c.index[-1].value == BASE + 8 * S
    assert c.tolist() == [1, 1, 1, 2, 2, 1, 1, 1, 1]


@pytest.mark.parametrize("shape", ["steady", "ramp", "burst", "ties"])
def test_peak_on_large_tables_against_a_full_sort(shape):
    """The bounded sweep (internal grid + candidate bins) against a plain sort of every event."""
    rng = np.random.default_rng(hash(shape) % 2**32)
    n = 60_000
    if shape == "steady":
        st = BASE + rng.integers(0, 3600 * S, n)
        en = st + rng.exponential(30 * S, n).astype(np.int64)
    elif shape == "ramp":
        st = BASE + rng.integers(0, 3600 * S, n)
        en = np.where(rng.random(n) < 0.5, st + S, NOT_SET)
    elif shape == "burst":
        st = BASE + np.concatenate([rng.integers(0, 3600 * S, n - 5000),
                                    1800 * S + rng.integers(0, S, 5000)])
        en = st + rng.integers(1, 20 * S, n)
    else:
        st = BASE + rng.integers(0, 50, n) * S
        en = st + rng.integers(0, 5, n) * S
    now = BASE + 3700 * S
    s, e = A._up_intervals(st, en, now)
    t_all = np.concatenate([e, s])
    d_all = np.concatenate([-np.ones(len(e), np.int64), np.ones(len(s), np.int64)])
    order = np.argsort(t_all, kind="stable")            # ends before starts at ties
    cum = np.cumsum(d_all[order])
    ts = t_all[order]
    last = np.append(ts[1:] != ts[:-1], True)           # the count at an instant: after its last event
    vals = np.where(last, cum, -1)
    i = int(np.argmax(vals))
    assert A._peak(s, e) == (int(vals[i]), int(ts[i]))


def test_concurrency_over_a_million_calls_is_fast():
    n = 1_000_000
    rng = np.random.default_rng(18)
    st = BASE + rng.integers(0, 3600 * S, n)
    en = np.where(rng.random(n) < 0.8, st + rng.exponential(90 * S, n).astype(np.int64),
                  NOT_SET)
    snap = np.zeros(n, [("key", "S8"), ("start", "<i8"), ("end", "<i8")])
    snap["start"], snap["end"] = st, en
    df = A.to_pandas(snap, now=BASE + 3600 * S)
    best = min(_timed(lambda: A.concurrency(df, "1s")) for _ in range(3))
    assert best < 0.6, f"concurrency over 1M calls took {best:.2f} s"  # target 0.2 s; shared box


def test_bad_arguments():
    df = A.to_pandas(np.zeros(0, [("key", "S8"), ("start", "<i8"), ("end", "<i8")]))
    with pytest.raises(ValueError, match="how"):
        A.concurrency(df, how="mean")
    with pytest.raises(ValueError, match="freq"):
        A.arrivals(df, "1M")           # a month is not a fixed duration
    with pytest.raises(ValueError, match="coarser"):
        A.concurrency(df, 1, start=BASE, end=BASE + 3600 * S)
    with pytest.raises(TypeError):
        A.to_pandas([1, 2, 3])


# --------------------------------------------------------------------------- html repr

def test_table_html(new_table):
    t = new_table()
    t.record_many(["old<script>@x", "young@x", "done@x"],
                  [BASE, BASE + 100 * S, BASE + 5 * S], [NOT_SET, NOT_SET, BASE + 65 * S])
    h = A.table_html(t, rows=5)
    assert t.path in h and "<script>" not in h and "old&lt;script&gt;@x" in h
    for word in ("capacity", "active", "ended", "end-only", "Longest active calls",
                 "Latest ends", "60.0 s"):
        assert word in h, word
    assert h.index("old&lt;script&gt;@x") < h.index("young@x")    # longest first
    ro = npcalls.CallTable.open(t.path, readonly=True)
    assert "read-only" in A.table_html(ro)
    ro.close()
    assert "closed" in A.table_html(ro).lower()                   # never raises


def test_live_view_outside_a_notebook(new_table, capsys):
    """The live view runs its loop (display calls print plain reprs outside Jupyter)."""
    t = new_table()
    t.record_many(["a", "b"], [BASE, BASE + S], [BASE + 2 * S, NOT_SET])
    df = A.live(t, every=0.1, iterations=2, window="1h")
    assert len(df) == 2


def test_metrics_accept_frames_with_naive_utc_times(new_table):
    """Frames of naive times (made by hand, older exports) are read as UTC."""
    rng = np.random.default_rng(19)
    t, keys, st, en = filled(new_table, rng, n=200)
    now = BASE + 250 * S
    df = A.to_pandas(t, now=now)
    aware = df.assign(start=df["start"].dt.tz_convert(None),
                      end=df["end"].dt.tz_convert(None))
    aware.attrs["now"] = pd.Timestamp(now)
    assert A.concurrency(aware, "10s").equals(A.concurrency(df, "10s"))
    assert A.peak_concurrency(aware) == A.peak_concurrency(df)
    assert A.arrivals(aware, "1min").equals(A.arrivals(df, "1min"))
    assert A.duration_stats(aware).equals(A.duration_stats(df))
