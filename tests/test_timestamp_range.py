"""Timestamps outside what int64 nanoseconds can hold are refused, never wrapped (issue 9, item 8).

numpy converts ``datetime64`` values of coarse units to nanoseconds with
wrapping int64 arithmetic: ``np.datetime64('3000-01-01', 's')`` becomes
1830-11-23.  Every form npcalls accepts (int ns, datetime, pandas Timestamp,
datetime64 scalars and arrays of any unit, lists, object arrays) must either
be stored exactly or raise :class:`InvalidTimestampError` naming the value
and the valid range; ``NaT`` where "not set" is not allowed is an error too.
"""

from __future__ import annotations

import datetime as dt
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npcalls import NOT_SET, InvalidTimestampError, NpcallsError
from npcalls.timestamps import to_ns, to_ns_array

I64_MAX = 2**63 - 1
FIRST = "1677-09-21T00:12:43.145224193"     # -I64_MAX ns (INT64_MIN is 'not set')
LAST = "2262-04-11T23:47:16.854775807"      # I64_MAX ns

# Values numpy would wrap silently, in every form that reaches the library.
OUT_OF_RANGE = [
    pytest.param(np.datetime64("3000-01-01T00:00:00", "s"), id="dt64-s-3000"),
    pytest.param(np.datetime64("1000-01-01", "D"), id="dt64-D-1000"),
    pytest.param(np.datetime64("2262-04-11T23:47:17", "s"), id="dt64-s-just-after"),
    pytest.param(np.datetime64("1677-09-21T00:12:43", "s"), id="dt64-s-just-before"),
    pytest.param(np.datetime64("2263", "Y"), id="dt64-Y"),
    pytest.param(np.datetime64("1600-01", "M"), id="dt64-M"),
    pytest.param(np.datetime64(10**18, "W"), id="dt64-W-huge"),
    pytest.param(np.datetime64(-(2**62), "h"), id="dt64-h-huge-negative"),
    pytest.param(np.datetime64(3, "100Y"), id="dt64-100Y"),
    pytest.param(dt.datetime(3000, 1, 1), id="datetime-3000"),
    pytest.param(dt.datetime(1000, 1, 1, tzinfo=dt.timezone.utc), id="datetime-1000"),
    pytest.param(pd.Timestamp(np.datetime64("3000-01-01", "s")), id="pandas-Timestamp-3000"),
    pytest.param(2**63, id="int-2**63"),
    pytest.param(-(2**63) - 5, id="int-below"),
]


def _good_like(ts):
    """An in-range timestamp of the same form as ``ts``."""
    if isinstance(ts, np.datetime64):
        return np.datetime64(0, np.datetime_data(ts.dtype))
    if isinstance(ts, dt.datetime):
        return type(ts)(2000, 1, 1, tzinfo=ts.tzinfo)
    return 1


def rows(t):
    s = t.snapshot()
    return {bytes(k): (int(a), int(b)) for k, a, b in zip(s["key"], s["start"], s["end"])}


def _names_value_and_range(e: BaseException) -> None:
    msg = str(e)
    assert "1677-09-21" in msg and "2262-04-11" in msg, msg


@pytest.mark.parametrize("ts", OUT_OF_RANGE)
def test_out_of_range_single_timestamps_are_refused_not_wrapped(table, ts):
    table.start("present", 1)
    before = rows(table)
    for call in (lambda: table.start("new", ts),
                 lambda: table.stop("present", ts),
                 lambda: table.stop("new", ts, insert_missing=True),
                 lambda: table.expire(ended_before=ts)):
        with pytest.raises(InvalidTimestampError) as ei:
            call()
        assert isinstance(ei.value, NpcallsError) and isinstance(ei.value, ValueError)
        _names_value_and_range(ei.value)
        shown = str(ts) if not isinstance(ts, np.datetime64) else np.datetime_as_string(ts)
        assert shown.split(" ")[0].split("T")[0] in str(ei.value), str(ei.value)
    assert rows(table) == before


@pytest.mark.parametrize("ts,form", [
    pytest.param(p.values[0], form, id=f"{form}-{p.id}") for p in OUT_OF_RANGE
    for form in ("scalar", "list", "object-array", "typed-array")
    if not (form == "typed-array" and isinstance(p.values[0], int))   # no int64 array holds them
])
def test_out_of_range_batch_timestamps_are_refused_not_wrapped(table, ts, form):
    table.start("k1", 1)
    before = rows(table)
    if form == "scalar":
        arg = ts
    elif form == "list":
        arg = [_good_like(ts), ts]
    elif form == "object-array":
        arg = np.array([5, ts], dtype=object)
    else:
        if isinstance(ts, np.datetime64):
            arg = np.array([_good_like(ts), ts])
        else:
            arg = np.array([_good_like(ts), ts], dtype=object)
    for call in (lambda: table.start_many(["k1", "k2"], arg),
                 lambda: table.stop_many(["k1", "k2"], arg),
                 lambda: table.stop_many(["k1", "k2"], arg, insert_missing=True),
                 lambda: table.record_many(["k1", "k2"], arg, None),
                 lambda: table.record_many(["k1", "k2"], None, arg)):
        with pytest.raises(InvalidTimestampError) as ei:
            call()
        _names_value_and_range(ei.value)
        if form != "scalar":
            assert "#1" in str(ei.value), str(ei.value)      # the bad position
    assert rows(table) == before


@pytest.mark.parametrize("nat", [pd.NaT, np.datetime64("NaT"), np.datetime64("NaT", "s")],
                         ids=["pd.NaT", "np.NaT", "np.NaT-s"])
def test_nat_is_refused_where_a_time_is_required_and_unset_where_allowed(table, nat):
    table.start("present", 1)
    for call in (lambda: table.start("new", nat), lambda: table.stop("present", nat),
                 lambda: table.start_many(["a", "b"], nat),
                 lambda: table.start_many(["a", "b"], [1, nat]),
                 lambda: table.stop_many(["a", "b"], np.array([nat, 2], dtype=object)),
                 lambda: table.expire(ended_before=nat)):
        with pytest.raises(InvalidTimestampError, match="NaT") as ei:
            call()
        assert isinstance(ei.value, NpcallsError)
    assert rows(table) == {b"present": (1, NOT_SET)}
    # record_many: NaT means "this row does not know"
    s, e = table.record_many(["r1", "r2"], [nat, 5], np.array([7, nat], dtype=object))
    assert rows(table)[b"r1"] == (NOT_SET, 7) and rows(table)[b"r2"] == (5, NOT_SET)


@pytest.mark.parametrize("ts,ns", [
    (np.datetime64(LAST, "ns"), I64_MAX),
    (np.datetime64(FIRST, "ns"), -I64_MAX),
    (np.datetime64("2262-04-11T23:47:16", "s"), 9223372036 * 10**9),
    (np.datetime64("1677-09-21T00:12:44", "s"), -9223372036 * 10**9),
    (np.datetime64("2262-04-11", "D"), 106751 * 86400 * 10**9),
    (np.datetime64("2262", "Y"), int(np.datetime64("2262-01-01", "ns").astype(np.int64))),
    (np.datetime64("1678", "Y"), int(np.datetime64("1678-01-01", "ns").astype(np.int64))),
    (np.datetime64(1, "10s"), 10 * 10**9),
    (np.datetime64(1500, "ps"), 1),
    (pd.Timestamp("2024-01-01T00:00:00.000000001"), 1704067200000000001),
    (pd.Timestamp(np.datetime64("2262-04-11T23:47:16", "s")), 9223372036 * 10**9),
])
def test_boundary_values_are_stored_exactly(table, ts, ns):
    assert to_ns(ts) == ns
    assert table.start("s", ts) and table.get("s") == (ns, NOT_SET)
    assert table.start_many(["m"], [ts])[0] and table.get("m") == (ns, NOT_SET)
    if isinstance(ts, np.datetime64):
        assert table.stop_many(["m"], np.array([ts]))[0] and table.get("m") == (ns, ns)


_UNITS = ["Y", "M", "W", "D", "h", "m", "s", "ms", "us", "ns"]
_NS = {"W": 7 * 86400 * 10**9, "D": 86400 * 10**9, "h": 3600 * 10**9, "m": 60 * 10**9,
       "s": 10**9, "ms": 10**6, "us": 10**3, "ns": 1}


def _exact_ns(v: int, unit: str) -> int:
    """The exact nanoseconds of v units since the epoch, in Python integers."""
    if unit == "Y":
        d = dt.date(1970 + v, 1, 1) if 1 <= 1970 + v <= 9999 else None
    elif unit == "M":
        y, mo = divmod(v, 12)
        d = dt.date(1970 + y, mo + 1, 1) if 1 <= 1970 + y <= 9999 else None
    else:
        return v * _NS[unit]
    if d is None:
        return 2**70                            # far outside any valid range
    return (d - dt.date(1970, 1, 1)).days * 86400 * 10**9


@settings(max_examples=400, deadline=None)
@given(unit=st.sampled_from(_UNITS),
       v=st.one_of(st.integers(-(2**63) + 1, 2**63 - 1), st.integers(-(10**6), 10**6),
                   st.integers(-(10**12), 10**12)))
def test_datetime64_conversion_is_exact_or_refused(unit, v):
    x = np.datetime64(v, unit)
    want = _exact_ns(v, unit)
    ok = -I64_MAX <= want <= I64_MAX
    arr = np.array([np.datetime64(0, unit), x])
    if ok:
        assert to_ns(x) == want
        assert to_ns_array(arr, 2).tolist() == [0, want]
        assert to_ns_array([x, x], 2).tolist() == [want, want]
    else:
        for conv in (lambda: to_ns(x), lambda: to_ns_array(arr, 2),
                     lambda: to_ns_array(np.array([x], dtype=object), 1)):
            with pytest.raises(InvalidTimestampError, match="2262-04-11"):
                conv()


def test_cli_refuses_out_of_range_times(name):
    """`npcalls start/stop/expire` read times with the same guard (no wrap to 1830)."""
    run = lambda *a: subprocess.run([sys.executable, "-m", "npcalls", *a],
                                    capture_output=True, text=True, timeout=60)
    assert run("create", name, "--capacity", "64").returncode == 0
    try:
        r = run("start", name, "c1", "--ts", "3000-01-01T00:00:00Z")
        assert r.returncode == 2, (r.stdout, r.stderr)
        assert "2262-04-11" in r.stderr and "Traceback" not in r.stderr
        r = run("get", name, "c1")
        assert r.returncode == 1            # nothing was stored
    finally:
        run("unlink", name)


@pytest.mark.parametrize("when", ["3000-01-01T00:00:00Z", "3000-01-01 00:00:00.5",
                                  "1000-06-01T00:00:00+02:00", "2262-04-11T23:47:16.854775808Z"])
def test_ingest_counts_out_of_range_dates_as_bad_lines(make_table, tmp_path, when):
    """A log or CDR date that int64 ns cannot hold is a bad line, never another date."""
    from npcalls.ingest import ingest
    p = tmp_path / "cdr.csv"
    p.write_text("call_id,start,end\n"
                 f"far@h,{when},\n"
                 "ok@h,2024-01-01T00:00:00Z,2024-01-01T00:01:00Z\n")
    t = make_table(256)
    s = ingest(t, [str(p)])
    assert s.bad == 1 and s.records == 1, s
    assert set(rows(t)) == {b"ok@h"}
