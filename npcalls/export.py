"""Writing snapshots out: CSV, JSON lines and Parquet, with derived columns.

Columns (every format): ``call_id``, ``start``, ``end`` (ISO 8601 UTC, or
int64 ns with ``epoch_ns=True``; empty / null when not set), ``duration_s``
(end - start in seconds, empty while active) and ``state``:

* ``active``   - started, not ended;
* ``ended``    - started and ended;
* ``end-only`` - an end with no known start (a BYE whose INVITE predates the log);
* ``empty``    - neither (a row inserted without times).

Parquet files also carry ``host`` and ``table`` columns so that snapshots of
many proxies can be queried together (DuckDB, Dask, Spark).
"""

from __future__ import annotations

import json
import socket
from typing import IO, Any

import numpy as np

from .layout import NOT_SET

__all__ = ["states", "STATE_NAMES", "write_csv", "write_jsonl", "write_parquet", "active_mask"]

STATE_NAMES = np.array(["empty", "active", "end-only", "ended"])


def states(snap: np.ndarray) -> np.ndarray:
    """State code per row: 0 empty, 1 active, 2 end-only, 3 ended (index into STATE_NAMES)."""
    has_start = snap["start"] != NOT_SET
    has_end = snap["end"] != NOT_SET
    return has_start.astype(np.int8) + 2 * has_end.astype(np.int8)


def active_mask(snap: np.ndarray) -> np.ndarray:
    """Rows of calls that started and have not ended."""
    return (snap["start"] != NOT_SET) & (snap["end"] == NOT_SET)


def _iso(ns: np.ndarray) -> list[str]:
    out = np.datetime_as_string(ns.view("datetime64[ns]").astype("datetime64[us]"), unit="us")
    res = (np.char.add(out.astype("U32"), "Z")).tolist()
    unset = np.flatnonzero(ns == NOT_SET)
    for i in unset:
        res[i] = ""
    return res


def _columns(snap: np.ndarray, epoch_ns: bool) -> tuple[list, list, list, list, list]:
    keys = [k.decode("utf-8", "surrogateescape") for k in snap["key"].tolist()]
    st, en = snap["start"], snap["end"]
    both = (st != NOT_SET) & (en != NOT_SET)
    dur = np.where(both, (en - st) / 1e9, np.nan)
    dur_l = ["" if np.isnan(d) else f"{d:.6f}" for d in dur.tolist()]
    state_l = STATE_NAMES[states(snap)].tolist()
    if epoch_ns:
        start_l = ["" if v == NOT_SET else str(v) for v in st.tolist()]
        end_l = ["" if v == NOT_SET else str(v) for v in en.tolist()]
    else:
        start_l, end_l = _iso(st), _iso(en)
    return keys, start_l, end_l, dur_l, state_l


def write_csv(snap: np.ndarray, stream: IO[str], *, epoch_ns: bool = False,
              header: bool = True) -> int:
    """Write rows as CSV (RFC 4180 quoting); returns the number of rows."""
    import csv
    w = csv.writer(stream, lineterminator="\n")
    if header:
        w.writerow(["call_id", "start", "end", "duration_s", "state"])
    cols = _columns(snap, epoch_ns)
    w.writerows(zip(*cols))
    return len(snap)


def write_jsonl(snap: np.ndarray, stream: IO[str], *, epoch_ns: bool = False) -> int:
    """Write rows as JSON lines; unset times and durations are null."""
    keys, start_l, end_l, dur_l, state_l = _columns(snap, epoch_ns)
    conv = int if epoch_ns else str
    for k, s, e, d, st in zip(keys, start_l, end_l, dur_l, state_l):
        stream.write(json.dumps({
            "call_id": k, "start": conv(s) if s else None, "end": conv(e) if e else None,
            "duration_s": float(d) if d else None, "state": st}) + "\n")
    return len(snap)


def write_parquet(snap: np.ndarray, path_or_stream: Any, *, table: str,
                  host: str | None = None) -> int:
    """Write rows as Parquet (needs pyarrow: ``pip install npcalls[analysis]``).

    Times are ``timestamp[ns, UTC]`` (null when unset), ``duration`` is
    ``duration[ns]`` and ``duration_s`` the same in float seconds (simpler in
    SQL), plus ``host`` and ``table`` string columns.
    """
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("Parquet output needs pyarrow: pip install 'npcalls[analysis]'") from None
    host = host or socket.gethostname()
    st, en = snap["start"], snap["end"]
    st_null, en_null = st == NOT_SET, en == NOT_SET
    n = len(snap)
    t = pa.table({
        "call_id": pa.array([k.decode("utf-8", "surrogateescape") for k in snap["key"].tolist()],
                            pa.string()),
        "start": pa.array(st, pa.timestamp("ns", tz="UTC"), mask=st_null),
        "end": pa.array(en, pa.timestamp("ns", tz="UTC"), mask=en_null),
        "duration": pa.array(en - st, pa.duration("ns"), mask=st_null | en_null),
        "duration_s": pa.array((en - st) / 1e9, pa.float64(), mask=st_null | en_null),
        "state": pa.array(STATE_NAMES[states(snap)].tolist(), pa.string()),
        "host": pa.array([host] * n, pa.string()),
        "table": pa.array([table] * n, pa.string()),
    })
    pq.write_table(t, path_or_stream)
    return n
