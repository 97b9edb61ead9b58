"""Fleet queries over the Parquet snapshots of many hosts, on DuckDB or on Dask.

``npcalls export`` writes ``ROOT/host=<host>/date=<day>/<table>-<time>Z.parquet``
on every proxy (see :mod:`npcalls.snapshots`).  With ``ROOT`` a shared
directory or an object-store prefix, these functions answer the fleet's
questions on either engine, with the same answers:

``latest_calls``
    one row per call (host, table, Call-ID): a call appears in every snapshot
    taken while it was in its table, and the latest of those wins;
``active_now``
    active calls per host, from the latest snapshot of each of its tables;
``started_per_minute``
    calls started per minute (UTC) across the fleet, each call counted once;
``peak_concurrency``
    the most calls up at once across the fleet during one UTC day, and the
    first instant it was reached.  A call is up from its start (inclusive) to
    its end (exclusive); a call still active in its latest snapshot is up
    through that snapshot's time; end-only calls and calls whose end is not
    after their start are never up (as in :func:`npcalls.analysis.concurrency`).

DuckDB runs on one machine (:func:`duckdb_queries`); Dask runs the same
queries on a ``distributed`` cluster (:func:`dask_queries`): a
``LocalCluster`` of worker processes here, a real cluster reading the same
files from shared storage elsewhere.  Both return the same pandas objects.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["FleetAnswers", "duckdb_queries", "dask_queries", "snapshot_glob", "day_bounds"]

_NAT = np.iinfo(np.int64).min
_MIN = 60 * 1_000_000_000
_DAY = 86_400 * 1_000_000_000
_KEY = ["host", "table", "call_id"]


def snapshot_glob(root: str) -> str:
    """The glob matching every snapshot file under ``root`` (local path or URL)."""
    return f"{str(root).rstrip('/')}/host=*/date=*/*.parquet"


def day_bounds(day: str | _dt.date) -> tuple[int, int]:
    """``[start, end)`` of a UTC day in ns since the epoch."""
    if isinstance(day, str):
        day = _dt.date.fromisoformat(day)
    d0 = int(_dt.datetime(day.year, day.month, day.day, tzinfo=_dt.timezone.utc).timestamp())
    return d0 * 1_000_000_000, d0 * 1_000_000_000 + _DAY


@dataclass
class FleetAnswers:
    """The four answers, as pandas objects in a canonical order (comparable across engines)."""

    latest_calls: Any
    """DataFrame: host, table, call_id, start, end (ns, NaT as INT64_MIN), state, snapshot_time."""
    active_now: Any
    """Series: active calls per host (index host)."""
    started_per_minute: Any
    """Series: calls started per minute (index: minute start, UTC)."""
    peak: int
    peak_at: Any
    """pandas.Timestamp (UTC) of the first instant the peak was reached, or None."""


def _pd() -> Any:
    try:
        import pandas as pd
    except ImportError:
        raise ImportError("fleet queries need pandas: pip install 'npcalls[fleet]'") from None
    return pd


def _finish(latest: Any, active: Any, spm: Any, peak: int, peak_at: int | None) -> FleetAnswers:
    pd = _pd()
    latest = latest[["host", "table", "call_id", "start", "end", "state", "snapshot_time"]]
    latest = latest.astype({"host": object, "table": object, "call_id": object, "state": object,
                            "start": np.int64, "end": np.int64, "snapshot_time": np.int64})
    latest = latest.sort_values(_KEY, kind="stable").reset_index(drop=True)
    active = active.astype(np.int64).sort_index()
    active.index = active.index.astype(object)
    active.index.name, active.name = "host", "active"
    spm = spm.astype(np.int64).sort_index()
    spm.index = pd.to_datetime(np.asarray(spm.index, np.int64), unit="ns", utc=True)
    spm.index.name, spm.name = "minute", "started"
    at = None if peak_at is None else pd.Timestamp(int(peak_at), unit="ns", tz="UTC")
    return FleetAnswers(latest, active, spm, int(peak), at)


# ---------------------------------------------------------------------------- DuckDB

def duckdb_queries(root: str, day: str | _dt.date, con: Any = None) -> FleetAnswers:
    """Answer the fleet queries with DuckDB (one process, all cores).

    Parameters
    ----------
    root : str
        The snapshots' root directory (for object storage, a URL DuckDB's
        httpfs extension reads, such as ``s3://bucket/npcalls``).
    day : str or date
        The UTC day (``YYYY-MM-DD``) of the peak-concurrency question.
    con : duckdb.DuckDBPyConnection, optional
    """
    try:
        import duckdb
    except ImportError:
        raise ImportError("fleet queries on DuckDB need duckdb: "
                          "pip install 'npcalls[fleet]'") from None
    d0, d1 = day_bounds(day)
    con = con or duckdb.connect()
    src = snapshot_glob(root).replace("'", "''")
    con.execute(f"""
        CREATE OR REPLACE TEMP VIEW snaps AS
        SELECT host, "table", call_id, state,
               coalesce(epoch_ns("start"), {_NAT}) AS s,
               coalesce(epoch_ns("end"), {_NAT}) AS e,
               epoch_ns(snapshot_time) AS snap
        FROM read_parquet('{src}', hive_partitioning = false, union_by_name = true)""")
    # A call is in many snapshots: keep the row of its latest one.
    con.execute("""
        CREATE OR REPLACE TEMP VIEW calls AS
        SELECT * FROM snaps
        QUALIFY row_number() OVER (PARTITION BY host, "table", call_id ORDER BY snap DESC) = 1""")
    latest = con.execute("""
        SELECT host, "table", call_id, s AS "start", e AS "end", state, snap AS snapshot_time
        FROM calls""").df()
    active = con.execute("""
        WITH last AS (SELECT host, "table", max(snap) AS snap FROM snaps GROUP BY ALL)
        SELECT host, count(*) FILTER (WHERE state = 'active') AS active
        FROM snaps JOIN last USING (host, "table", snap)
        GROUP BY host""").df().set_index("host")["active"]
    spm = con.execute(f"""
        SELECT (s // {_MIN}) * {_MIN} AS minute, count(*) AS n
        FROM calls WHERE s <> {_NAT} GROUP BY ALL""").df().set_index("minute")["n"]
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE run AS
        WITH up AS (
            SELECT s, CASE WHEN e = {_NAT} THEN snap + 1 ELSE e END AS e
            FROM calls WHERE s <> {_NAT}),
        ev AS (  -- events before the day count at its first instant
            SELECT greatest(s, {d0}) AS t, 1 AS d FROM up WHERE e > s AND s < {d1}
            UNION ALL
            SELECT greatest(e, {d0}) AS t, -1 AS d FROM up WHERE e > s AND s < {d1} AND e < {d1}),
        net AS (SELECT t, sum(d) AS n FROM ev GROUP BY t)
        SELECT t, sum(n) OVER (ORDER BY t ROWS UNBOUNDED PRECEDING) AS v FROM net""")
    pk = int(con.execute("SELECT coalesce(max(v), 0) FROM run").fetchone()[0])
    at = con.execute(f"SELECT min(t) FROM run WHERE v = {pk}").fetchone()[0] if pk > 0 else None
    return _finish(latest, active, spm, pk, at)


# ---------------------------------------------------------------------------- Dask

def _ns(col: Any) -> np.ndarray:
    """int64 ns of a (tz-aware) datetime column, INT64_MIN for nulls."""
    pd = _pd()
    v = pd.to_datetime(col, utc=True)
    return np.asarray(v.dt.tz_convert("UTC").dt.tz_localize(None).to_numpy("datetime64[ns]")
                      .view(np.int64))


def _as_ns(part: Any) -> Any:
    pd = _pd()
    return pd.DataFrame({
        "host": part["host"].astype(object), "table": part["table"].astype(object),
        "call_id": part["call_id"].astype(object), "state": part["state"].astype(object),
        "start": _ns(part["start"]), "end": _ns(part["end"]),
        "snapshot_time": _ns(part["snapshot_time"])}, index=part.index)


def _events(part: Any, d0: int, d1: int) -> Any:
    pd = _pd()
    s = part["start"].to_numpy(np.int64)
    e = part["end"].to_numpy(np.int64).copy()
    act = e == _NAT
    e[act] = part["snapshot_time"].to_numpy(np.int64)[act] + 1
    up = (s != _NAT) & (e > s) & (s < d1)
    s, e = s[up], e[up]
    ends = e[e < d1]
    t = np.concatenate([np.maximum(s, d0), np.maximum(ends, d0)])
    d = np.concatenate([np.ones(len(s), np.int64), -np.ones(len(ends), np.int64)])
    return pd.DataFrame({"t": t, "d": d})


def dask_queries(root: str, day: str | _dt.date, client: Any = None, *,
                 shuffle: str = "tasks", partition_bytes: int = 64 << 20) -> FleetAnswers:
    """Answer the fleet queries with Dask (on ``client``'s cluster, or the current one).

    The same code runs on a ``distributed.LocalCluster`` and on a real
    cluster whose workers read ``root`` (shared directory, or an object-store
    URL with the matching fsspec package installed).  ``shuffle`` is Dask's
    shuffle method for the joins: "tasks" suits up to a few GB of snapshots,
    "p2p" larger ones.
    """
    try:
        import dask
        import dask.dataframe as dd
    except ImportError:
        raise ImportError("fleet queries on Dask need dask[dataframe] and distributed: "
                          "pip install 'npcalls[fleet]'") from None
    d0, d1 = day_bounds(day)
    cols = ["host", "table", "call_id", "state", "start", "end", "snapshot_time"]
    raw = dd.read_parquet(snapshot_glob(root), columns=cols)
    # A snapshot file is small (one table at one instant) and there are many
    # of them: one partition per file would make thousands of tiny tasks.
    # Group them into partitions of about `partition_bytes` of Parquet.
    import fsspec
    fs, _, paths = fsspec.core.get_fs_token_paths(snapshot_glob(root))
    total = sum(fs.sizes(paths)) if paths else 0
    want = max(1, min(raw.npartitions, -(-total // partition_bytes)))
    if want < raw.npartitions:
        raw = raw.repartition(npartitions=want)
    meta = {"host": object, "table": object, "call_id": object, "state": object,
            "start": np.int64, "end": np.int64, "snapshot_time": np.int64}
    snaps = raw.map_partitions(_as_ns, meta=meta)
    # latest wins: the newest snapshot time per call, joined back to its row
    newest = snaps.groupby(_KEY).snapshot_time.max().reset_index()
    calls = snaps.merge(newest, on=_KEY + ["snapshot_time"], how="inner")
    last = snaps.groupby(["host", "table"]).snapshot_time.max().reset_index()
    cur = snaps.merge(last, on=["host", "table", "snapshot_time"], how="inner")
    active = cur.assign(a=(cur.state == "active").astype(np.int64)).groupby("host").a.sum()
    started = calls[calls.start != _NAT]
    spm = (started.start // _MIN * _MIN).value_counts()
    ev = calls.map_partitions(_events, d0, d1, meta={"t": np.int64, "d": np.int64})
    net = ev.groupby("t").d.sum()
    # One compute for the four results: their shared steps (reading the
    # files, the latest-wins merge) run once, on the cluster's workers.
    kw = {} if client is None else {"scheduler": client}
    with dask.config.set({"dataframe.shuffle.method": shuffle}):
        latest, active_pd, spm_pd, net_pd = dask.compute(calls, active, spm, net, **kw)
    # net holds one row per distinct instant of the day that a call starts or
    # ends at: the running sum over it is small next to the calls themselves.
    net_pd = net_pd.sort_index()
    run_v = np.cumsum(net_pd.to_numpy(np.int64))
    pk = int(run_v.max()) if len(run_v) else 0
    at = int(net_pd.index[int(np.argmax(run_v == pk))]) if pk > 0 else None
    return _finish(latest, active_pd, spm_pd, pk, at)
