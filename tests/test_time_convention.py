"""One time convention everywhere: tz-aware UTC (issue 10).

``to_pandas``, the analysis functions built on it and the Parquet export
give the same instants with the same type: ``datetime64[ns, UTC]``, what
DuckDB and Arrow users get from the Parquet files.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from npcalls import NOT_SET, analysis

S = 1_000_000_000
T0 = 1_795_668_428 * S


def _fill(t):
    t.record_many(["a@h", "b@h", "c@h", "d@h"],
                  np.array([T0, T0 + S, T0 + 2 * S, NOT_SET]),
                  np.array([T0 + 60 * S, NOT_SET, T0 + 3 * S, T0 + 9 * S]))


def test_to_pandas_is_tz_aware_utc_like_the_parquet_export(table, cli_env, tmp_path):
    _fill(table)
    df = analysis.to_pandas(table).sort_values("call_id").reset_index(drop=True)
    for col in ("start", "end"):
        assert str(df[col].dtype) == "datetime64[ns, UTC]"
    assert df.attrs["now"].tz is not None and str(df.attrs["now"].tz) == "UTC"
    assert df.loc[0, "start"] == pd.Timestamp(T0, tz="UTC")
    assert df.loc[0, "start"] == pd.Timestamp("2026-11-26T04:47:08Z")
    assert pd.isna(df.loc[1, "end"]) and pd.isna(df.loc[3, "start"])
    # the Parquet export of the same table, read back by Arrow
    out = tmp_path / "calls.parquet"
    r = subprocess.run([sys.executable, "-m", "npcalls", "dump", table.path, "--format",
                        "parquet", "-o", str(out)], capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    pdf = pq.read_table(out).to_pandas().sort_values("call_id").reset_index(drop=True)
    for col in ("start", "end"):
        assert pdf[col].dtype == df[col].dtype
        pd.testing.assert_series_equal(pdf[col], df[col], check_names=False)


def test_analysis_results_are_tz_aware_and_accept_either_kind_of_time(table):
    _fill(table)
    df = analysis.to_pandas(table, now=pd.Timestamp(T0 + 30 * S, tz="UTC"))
    conc = analysis.concurrency(df, "1s")
    assert str(conc.index.tz) == "UTC"
    assert str(conc.attrs["peak_at"].tz) == "UTC"
    arr = analysis.arrivals(df, "1s")
    assert str(arr.index.tz) == "UTC"
    # a naive time is read as UTC, an aware one converted: the same instant
    lr_naive = analysis.long_running(df, "10s", now=np.datetime64(T0 + 30 * S, "ns"))
    lr_aware = analysis.long_running(df, "10s",
                                     now=pd.Timestamp(T0 + 30 * S, tz="UTC").tz_convert("Asia/Tokyo"))
    assert list(lr_naive["call_id"]) == list(lr_aware["call_id"]) == ["b@h"]
    st = analysis.duration_stats(df)
    assert st["count"] == 2
