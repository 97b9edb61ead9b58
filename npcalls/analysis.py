"""Analysis of call tables: pandas frames, the metrics operators ask for, plots, live views.

Needs the ``analysis`` extra (``pip install 'npcalls[analysis]'``: pandas,
matplotlib, pyarrow).  pandas and matplotlib are imported inside the functions
that need them.  The Jupyter view of a table (:func:`table_html`) lives in
:mod:`npcalls.display`, which needs numpy only; it is re-exported here.

Every metric takes *calls*: a :class:`~npcalls.CallTable` (a snapshot is
taken), a snapshot (the structured array of :meth:`CallTable.snapshot`) or a
DataFrame from :func:`to_pandas`.  Passing the DataFrame avoids taking a new
snapshot for each metric and keeps all answers about one instant.

Time semantics
--------------
* Times are tz-aware UTC, ``datetime64[ns, UTC]`` (as in the Parquet export,
  and what DuckDB and Arrow give); unset times are ``NaT``.  Functions taking a
  time accept aware ones (converted) and naive ones (read as UTC).
* A call is *up* from its start (inclusive) to its end (exclusive).  An active
  call (started, not ended) is up through *now*: the instant its snapshot was
  taken (``df.attrs["now"]``), or the ``now`` a function is given.
* End-only calls (a BYE whose INVITE predates the log) have no known start:
  they count in the state totals, never in durations or concurrency.

>>> from npcalls import analysis                                 # doctest: +SKIP
>>> df = analysis.to_pandas(table)                               # doctest: +SKIP
>>> analysis.concurrency(df, "1s").max()                         # doctest: +SKIP
"""

from __future__ import annotations

import html
import io
import time
from typing import TYPE_CHECKING, Any, NamedTuple, Sequence

import numpy as np

from .display import _CSS, table_html
from .layout import NOT_SET
from .timestamps import format_age

if TYPE_CHECKING:  # pragma: no cover - only for annotations
    import pandas as pd
    from matplotlib.axes import Axes

    from .table import CallTable

__all__ = [
    "STATES", "Peak", "to_pandas", "active", "ended", "end_only", "long_running",
    "duration_stats", "arrivals", "concurrency", "peak_concurrency", "plot_concurrency",
    "plot_arrivals", "plot_durations", "table_html", "live",
]

STATES = ("empty", "active", "end-only", "ended")
"""State names; a row's code is ``has_start + 2 * has_end`` (as :func:`npcalls.export.states`)."""

_S = 1_000_000_000
# Grid steps :func:`concurrency` and :func:`arrivals` pick from when no freq is
# given: round numbers an operator reads at a glance.
_NICE_STEPS = [(1_000_000, "1ms"), (10_000_000, "10ms"), (100_000_000, "100ms"), (_S, "1s"),
               (5 * _S, "5s"), (10 * _S, "10s"), (30 * _S, "30s"), (60 * _S, "1min"),
               (300 * _S, "5min"), (900 * _S, "15min"), (3600 * _S, "1h"),
               (6 * 3600 * _S, "6h"), (86400 * _S, "1D"), (7 * 86400 * _S, "7D")]
_MAX_POINTS = 20_000_000       # a grid larger than this is a mistake (freq="1ns" over a day)


class Peak(NamedTuple):
    """Highest concurrency and the first instant it was reached (NaT if no call was up)."""

    count: int  # type: ignore[assignment]  # public field name; shadows tuple.count
    at: Any  # pandas.Timestamp


# --------------------------------------------------------------------------- conversion

def _pandas() -> Any:
    try:
        import pandas as pd
    except ImportError:
        raise ImportError("npcalls.analysis needs pandas: pip install 'npcalls[analysis]'") \
            from None
    return pd


def _is_table(obj: Any) -> bool:
    return hasattr(obj, "snapshot") and hasattr(obj, "stats")


def _ns(value: Any, what: str) -> int:
    """One point in time (int ns, str, datetime, Timestamp, datetime64) as int ns, UTC."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return int(value)
    pd = _pandas()
    ts = pd.Timestamp(value)
    if ts is pd.NaT:
        raise ValueError(f"{what} is NaT")
    if ts.tzinfo is not None:
        ts = ts.tz_convert("UTC").tz_localize(None)
    return int(ts.as_unit("ns").value)


def _utc(ns: np.ndarray) -> Any:
    """int64 ns (NOT_SET = NaT) as a tz-aware UTC DatetimeIndex."""
    pd = _pandas()
    return pd.DatetimeIndex(np.asarray(ns, np.int64).view("datetime64[ns]")).tz_localize("UTC")


def _utc_ts(ns: int) -> Any:
    pd = _pandas()
    return pd.NaT if ns == NOT_SET else pd.Timestamp(int(ns), tz="UTC")


def _step_ns(freq: Any) -> int:
    """A fixed frequency ("1s", "5min", Timedelta, int ns) as int nanoseconds."""
    if isinstance(freq, (int, np.integer)) and not isinstance(freq, (bool, np.bool_)):
        step = int(freq)
    else:
        pd = _pandas()
        try:
            step = int(pd.Timedelta(freq).as_unit("ns").value)
        except (ValueError, TypeError):
            raise ValueError(f"freq must be a fixed duration such as '1s', '5min' or '1h', "
                             f"not {freq!r}") from None
    if step <= 0:
        raise ValueError(f"freq must be positive, not {freq!r}")
    return step


def _dur_ns(value: Any) -> int:
    """A duration ("90s", Timedelta, timedelta64, int ns) as int nanoseconds (may be 0)."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return int(value)
    return int(_pandas().Timedelta(value).as_unit("ns").value)


def _decode_keys(keys: np.ndarray) -> Any:
    """Decode a fixed-width bytes column to strings without a Python loop.

    pyarrow turns the ``S`` array into variable-length binary (dropping the
    NUL padding) and validates UTF-8 in C++: ~30 ms per million keys, against
    ~0.5 s for ``np.char.decode``.  Call-IDs that are not UTF-8 (keys may be
    any bytes) fall back to Python strings with surrogate escapes, so that
    no key is lost or merged.
    """
    pd = _pandas()
    try:
        import pyarrow as pa
    except ImportError:
        pa = None
    if pa is not None:
        try:
            return pd.Series(pa.array(keys, pa.binary()).cast(pa.string()).to_pandas(),
                             copy=False).array
        except (pa.ArrowInvalid, pa.ArrowTypeError, UnicodeDecodeError):
            pass
    # object dtype: pandas' string dtype cannot hold the surrogates
    return pd.Series([k.decode("utf-8", "surrogateescape") for k in keys.tolist()], dtype=object)


def to_pandas(calls: Any, *, now: Any = None) -> "pd.DataFrame":
    """A DataFrame of calls: ``call_id, start, end, duration, state``.

    Parameters
    ----------
    calls : CallTable, numpy structured array or DataFrame
        A table (a snapshot is taken, without blocking its writers), a
        snapshot from :meth:`CallTable.snapshot`, or a DataFrame from this
        function (returned as it is).
    now : timestamp, optional
        The instant active calls are up to (stored in ``df.attrs["now"]``).
        Default: the time the snapshot was taken (for a table), or the time
        of this call (for a snapshot array).

    Returns
    -------
    pandas.DataFrame
        ``call_id`` (str), ``start`` and ``end`` (datetime64[ns, UTC], NaT
        when unset), ``duration`` (timedelta64[ns], NaT unless both times are
        set), ``state`` (categorical: empty, active, end-only, ended).
        ``attrs`` holds ``now`` (pandas.Timestamp) and ``table`` (the path,
        for a table).

    Notes
    -----
    Everything is vectorized: a million rows take ~0.15 s, snapshot included (see
    bench/bench_analysis.py).
    """
    pd = _pandas()
    if isinstance(calls, pd.DataFrame):
        if now is not None:
            calls = calls.copy(deep=False)
            calls.attrs["now"] = _utc_ts(_ns(now, "now"))
        return calls
    table = None
    if _is_table(calls):
        table = calls.path
        snap = calls.snapshot()
        taken = time.time_ns()
    else:
        snap = np.asarray(calls)
        taken = time.time_ns()
        if snap.dtype.names is None or not {"key", "start", "end"} <= set(snap.dtype.names):
            raise TypeError("expected a CallTable, a snapshot array (key, start, end) or a "
                            f"DataFrame, not {type(calls).__name__}")
    now_ns = taken if now is None else _ns(now, "now")
    st = np.ascontiguousarray(snap["start"], dtype=np.int64)
    en = np.ascontiguousarray(snap["end"], dtype=np.int64)
    has_s = st != NOT_SET
    has_e = en != NOT_SET
    both = has_s & has_e
    # NOT_SET is INT64_MIN, which is exactly NaT for datetime64/timedelta64.
    dur = np.where(both, en - st, NOT_SET)
    codes = has_s.view(np.int8) + 2 * has_e.view(np.int8)
    df = pd.DataFrame({
        "call_id": _decode_keys(snap["key"]),
        "start": _utc(st).array,
        "end": _utc(en).array,
        "duration": dur.view("timedelta64[ns]"),
        "state": pd.Categorical.from_codes(codes, categories=list(STATES)),
    }, copy=False)
    df.attrs["now"] = _utc_ts(now_ns)
    if table is not None:
        df.attrs["table"] = table
    return df


def _frame(calls: Any, now: Any = None) -> "pd.DataFrame":
    return to_pandas(calls, now=now)


def _now_of(calls: Any, now: Any) -> int:
    if now is not None:
        return _ns(now, "now")
    attrs = getattr(calls, "attrs", None)
    if attrs and attrs.get("now") is not None:
        return _ns(attrs["now"], "now")
    return time.time_ns()


def _times(calls: Any, now: Any = None) -> tuple[np.ndarray, np.ndarray, int]:
    """(start ns, end ns, now ns) of any accepted input, without building a DataFrame."""
    pd = _pandas() if not isinstance(calls, np.ndarray) and not _is_table(calls) else None
    if _is_table(calls):
        snap = calls.snapshot()
        now_ns = time.time_ns() if now is None else _ns(now, "now")
        return snap["start"].astype(np.int64), snap["end"].astype(np.int64), now_ns
    if isinstance(calls, np.ndarray):
        now_ns = time.time_ns() if now is None else _ns(now, "now")
        return (np.asarray(calls["start"], np.int64), np.asarray(calls["end"], np.int64), now_ns)
    assert pd is not None
    if not isinstance(calls, pd.DataFrame):
        raise TypeError(f"expected a CallTable, a snapshot array or a DataFrame, not "
                        f"{type(calls).__name__}")
    return _col_ns(calls["start"]), _col_ns(calls["end"]), _now_of(calls, now)


def _col_ns(col: Any) -> np.ndarray:
    """A datetime column (naive UTC or tz-aware) as int64 ns with NOT_SET for NaT."""
    pd = _pandas()
    dt = col.dtype
    if isinstance(dt, pd.DatetimeTZDtype):
        col = col.dt.tz_convert("UTC").dt.tz_localize(None)
    elif not pd.api.types.is_datetime64_dtype(dt):
        col = pd.to_datetime(col, utc=True).dt.tz_localize(None)
    return col.to_numpy("datetime64[ns]").view(np.int64)


# --------------------------------------------------------------------------- selections

def active(calls: Any) -> "pd.DataFrame":
    """Calls that started and have not ended."""
    df = _frame(calls)
    return df[df["state"] == "active"]


def ended(calls: Any) -> "pd.DataFrame":
    """Calls with both a start and an end."""
    df = _frame(calls)
    return df[df["state"] == "ended"]


def end_only(calls: Any) -> "pd.DataFrame":
    """Calls known only by their end (a BYE whose INVITE predates the log)."""
    df = _frame(calls)
    return df[df["state"] == "end-only"]


def long_running(calls: Any, min_duration: Any = "1h", *, now: Any = None,
                 include_ended: bool = False) -> "pd.DataFrame":
    """Calls up for at least ``min_duration``, longest first.

    Calls up for hours are the billing and fraud alarms: a lost BYE that
    keeps a call "open" on the bill, or toll fraud holding trunks.

    Parameters
    ----------
    min_duration : str, Timedelta or int ns, default "1h"
    now : timestamp, optional
        Default: the instant of the snapshot (``df.attrs["now"]``).
    include_ended : bool, default False
        Also list ended calls whose duration reached ``min_duration``.

    Returns
    -------
    pandas.DataFrame
        The rows of :func:`to_pandas` plus ``age`` (timedelta64: now - start
        for active calls, the duration for ended ones), sorted by age,
        longest first.
    """
    df = _frame(calls)
    now_ns = _now_of(df, now)
    lim = _dur_ns(min_duration)
    st = _col_ns(df["start"])
    dur = df["duration"].to_numpy("timedelta64[ns]").view(np.int64)
    code = df["state"].cat.codes.to_numpy()
    age = np.full(len(df), NOT_SET, np.int64)
    is_active = code == STATES.index("active")
    age[is_active] = now_ns - st[is_active]
    keep = is_active & (age >= lim)
    if include_ended:
        is_ended = code == STATES.index("ended")
        age[is_ended] = dur[is_ended]
        keep |= is_ended & (age >= lim)
    idx = np.flatnonzero(keep)
    idx = idx[np.argsort(-age[idx], kind="stable")]
    out = df.iloc[idx].copy()
    out["age"] = age[idx].view("timedelta64[ns]")
    return out


# --------------------------------------------------------------------------- metrics

def duration_stats(calls: Any, percentiles: Sequence[float] = (50, 90, 95, 99)) -> "pd.Series":
    """Count, mean, spread and percentiles of the durations of ended calls, in seconds.

    Parameters
    ----------
    percentiles : sequence of float, default (50, 90, 95, 99)
        In percent; computed by numpy's default (linear) method.

    Returns
    -------
    pandas.Series
        Index ``count, mean, std, min, p50, ..., max`` (``p99.9`` style for
        fractional percentiles), float seconds except ``count``; NaN when no
        call has ended.  Named ``duration_s``.
    """
    pd = _pandas()
    st, en, _ = _times(calls)
    both = (st != NOT_SET) & (en != NOT_SET)
    d = (en[both] - st[both])
    names = [f"p{p:g}" for p in percentiles]
    if len(d):
        pct = np.percentile(d, list(percentiles)) / _S if len(percentiles) else []
        vals = [float(len(d)), float(d.mean()) / _S, float(d.std(ddof=1)) / _S if len(d) > 1
                else float("nan"), float(d.min()) / _S, *map(float, pct), float(d.max()) / _S]
    else:
        vals = [0.0] + [float("nan")] * (4 + len(names))
    return pd.Series(vals, index=["count", "mean", "std", "min", *names, "max"],
                     name="duration_s")


def _grid_bounds(lo: int, hi: int, step: int) -> tuple[int, int]:
    first = lo // step * step      # aligned to the epoch, like resample(origin="epoch")
    n = (hi - first) // step + 1
    if n > _MAX_POINTS:
        raise ValueError(f"{n} intervals of {step} ns: choose a coarser freq")
    return first, int(n)


def _auto_step(span: int, target: int = 600) -> tuple[int, str]:
    for step, name in _NICE_STEPS:
        if span // step <= target:
            return step, name
    return _NICE_STEPS[-1]


def arrivals(calls: Any, freq: Any = None, *, start: Any = None,
             end: Any = None) -> "pd.Series":
    """Calls started per interval (empty intervals included).

    Parameters
    ----------
    freq : str, Timedelta or int ns, optional
        Interval length (fixed: "1s", "10s", "1min" ...).  Default: a round
        value giving at most ~600 intervals.  Intervals are aligned on
        multiples of ``freq`` since the epoch and labelled by their start.
    start, end : timestamp, optional
        Range to cover (default: first to last start).

    Returns
    -------
    pandas.Series
        int64 counts on a DatetimeIndex; ``attrs["freq_ns"]`` holds the
        interval in ns.  Named ``arrivals``.
    """
    pd = _pandas()
    st, _, _ = _times(calls)
    st = st[st != NOT_SET]
    if not len(st) and (start is None or end is None):
        s = pd.Series([], index=_utc(np.empty(0, np.int64)), dtype=np.int64, name="arrivals")
        s.attrs["freq_ns"] = _step_ns(freq) if freq is not None else _S
        return s
    lo = _ns(start, "start") if start is not None else int(st.min())
    hi = _ns(end, "end") if end is not None else int(st.max())
    step = _step_ns(freq) if freq is not None else _auto_step(hi - lo)[0]
    first, n = _grid_bounds(lo, hi, step)
    st = st[(st >= first) & (st < first + n * step)]
    counts = np.bincount((st - first) // step, minlength=n)[:n].astype(np.int64)
    idx = _utc(first + step * np.arange(n, dtype=np.int64))
    s = pd.Series(counts, index=idx, name="arrivals")
    s.attrs["freq_ns"] = step
    return s


def _up_intervals(st: np.ndarray, en: np.ndarray, now_ns: int) -> tuple[np.ndarray, np.ndarray]:
    """Starts and (effective, exclusive) ends of the calls that are ever up, unsorted.

    Active calls end at now + 1 ns: they are up through now.  A call whose
    end precedes its start (clocks of different hosts) is never up rather
    than up "negatively"; end-only calls have no known start and are left out.
    """
    has_s = st != NOT_SET
    s = st[has_s]
    e = en[has_s]
    e[e == NOT_SET] = now_ns + 1
    real = e > s
    if not real.all():
        s, e = s[real], e[real]
    return s, e


def _cum_le(x: np.ndarray, first: int, step: int, n: int) -> np.ndarray:
    """For each grid instant t_k = first + k*step: how many values of x are <= t_k.

    x <= t_k  <=>  k >= ceil((x - first) / step): one bincount of those
    indices and a cumulative sum count them all, in O(len(x) + n), without
    sorting x.
    """
    k = -((first - x) // step)              # ceil((x - first) / step)
    np.clip(k, 0, n, out=k)                 # n: after the grid, never counted
    return np.cumsum(np.bincount(k, minlength=n + 1)[:n])


def _grid_counts(s: np.ndarray, e: np.ndarray, first: int, step: int, n: int) -> np.ndarray:
    # Up at t <=> start <= t < end, and every end is after its start, so
    # #(start <= t) - #(end <= t) is exactly the number of calls up at t.
    return (_cum_le(s, first, step, n) - _cum_le(e, first, step, n)).astype(np.int64)


def _times_counts(s: np.ndarray, e: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Counts at arbitrary instants (any order, repeats allowed)."""
    order = np.argsort(t, kind="stable")
    ts = t[order]
    m = len(ts)
    # x <= ts[k]  <=>  k >= (index of the first ts >= x)
    cs = np.cumsum(np.bincount(np.searchsorted(ts, s, "left"), minlength=m + 1)[:m])
    ce = np.cumsum(np.bincount(np.searchsorted(ts, e, "left"), minlength=m + 1)[:m])
    out = np.empty(m, np.int64)
    out[order] = cs - ce
    return out


def _sweep(s: np.ndarray, e: np.ndarray, first: int, step: int, at_start: np.ndarray,
           cand: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The count right after each start or end strictly inside the candidate bins.

    Sorts only the events of the bins in ``cand`` (a bool per bin).  Returns
    (event times, counts after them, bin of each), in time order; ends come
    before starts at equal times, so that the count after the last event of
    an instant is the count at that instant and no intermediate value
    exceeds it.  Events exactly on a bin's first instant are already in
    ``at_start`` and are skipped.
    """
    n = len(at_start)
    parts = []
    for x, bit in ((e, 0), (s, 1)):
        off = x - first
        b = off // step
        keep = (b >= 0) & (b < n)
        keep[keep] = cand[b[keep]] & (off[keep] % step != 0)
        # One int64 per event: offset from the grid start, shifted left, with
        # the low bit 0 for an end and 1 for a start.  A plain (SIMD) sort of
        # these puts events in time order with ends first at equal times,
        # 2-3 times faster than a stable argsort of the times.
        parts.append((off[keep] << 1) | bit)
    ev = np.concatenate(parts)
    if not len(ev):
        return ev, ev.copy(), ev.copy()
    ev.sort()
    cum = np.cumsum((ev & 1) * 2 - 1)
    off = ev >> 1
    t = off + first
    b = off // step
    # Each bin's running count restarts from its first instant's count:
    # subtract the running sum reached before the bin's first event.
    seg = np.flatnonzero(np.diff(b)) + 1
    seg = np.concatenate(([0], seg))
    before = np.concatenate(([0], cum[seg[1:] - 1]))
    lengths = np.diff(np.append(seg, len(t)))
    v = at_start[b] + cum - np.repeat(before, lengths)
    return t, v, b


def _peak(s: np.ndarray, e: np.ndarray) -> tuple[int, int]:
    """(peak count, first instant it is reached), exactly, without sorting every event.

    A coarse internal grid gives the count at each bin's first instant and
    an upper bound per bin (that count plus the starts in the bin).  Only
    bins whose bound reaches the best grid count can hold the peak; their
    events alone are sorted and swept.  On typical traffic that is a few
    bins; at worst (flat load) it is every event, as a full sort would be.
    """
    if not len(s):
        return 0, NOT_SET
    lo, hi = int(s.min()), int(e.max())
    nb = max(1, min(8192, len(s) // 64))
    step = max(1, -(-(hi - lo) // nb))
    nb = max(1, -(-(hi - lo) // step))
    c = _grid_counts(s, e, lo, step, nb)
    ub = c + np.bincount((s - lo) // step, minlength=nb)[:nb]
    best = int(c.max())
    at = lo + int(np.argmax(c)) * step
    t, v, _ = _sweep(s, e, lo, step, c, ub >= best)
    if len(v):
        i = int(np.argmax(v))
        if v[i] > best or (v[i] == best and t[i] < at):
            best, at = int(v[i]), int(t[i])
    return best, at


def peak_concurrency(calls: Any, *, now: Any = None) -> Peak:
    """The highest number of calls up at once, and the first instant it happened."""
    _pandas()               # a clear error without the extra (the Peak holds a Timestamp)
    st, en, now_ns = _times(calls, now)
    s, e = _up_intervals(st, en, now_ns)
    c, at = _peak(s, e)
    return Peak(c, _utc_ts(at))


def concurrency(calls: Any, freq: Any = None, *, times: Any = None, start: Any = None,
                end: Any = None, now: Any = None, how: str = "at") -> "pd.Series":
    """Exact number of calls up at each instant of a grid (or of given instants).

    A call is up from its start (inclusive) to its end (exclusive); active
    calls are up through ``now``.  Computed vectorized: the count at ``t`` is
    ``#(start <= t) - #(end <= t)``; starts and ends are bucketed onto the
    grid once (a bincount, no sort) and a cumulative sum gives every count.
    The exact peak over all time comes from the same bucketing plus a sort
    of the few intervals that can hold it.

    Parameters
    ----------
    freq : str, Timedelta or int ns, optional
        Grid step.  Default: a round value giving at most ~600 points.
    times : array-like of timestamps, optional
        Instants to evaluate instead of a grid (any order).
    start, end : timestamp, optional
        Grid range.  Default: from the first start (rounded down to a
        multiple of ``freq``) to ``now`` if calls are active, else to the
        last instant a call is up.
    now : timestamp, optional
        The instant active calls are up to (default: the snapshot's).
    how : {"at", "max"}, default "at"
        "at": the count at each grid instant.  "max": the highest count
        within ``[t, t + freq)`` (catches spikes between grid points; sorts
        the events in the grid, so slower; grids only).

    Returns
    -------
    pandas.Series
        int64 counts on a DatetimeIndex, named ``concurrency``.  ``attrs``
        holds ``peak`` and ``peak_at`` (over all time, not only the grid),
        ``now`` and ``freq_ns``.
    """
    pd = _pandas()
    if how not in ("at", "max"):
        raise ValueError(f"how must be 'at' or 'max', not {how!r}")
    st, en, now_ns = _times(calls, now)
    s, e = _up_intervals(st, en, now_ns)
    peak, peak_at = _peak(s, e)
    step = None
    if times is not None:
        if how != "at":
            raise ValueError("how='max' needs a grid (freq), not explicit times")
        t = pd.DatetimeIndex(times if isinstance(times, pd.Index) else
                             pd.to_datetime(np.asarray(times)))
        if t.tz is not None:
            t = t.tz_convert("UTC").tz_localize(None)
        t_ns = np.asarray(t.as_unit("ns").asi8, np.int64)
        vals = _times_counts(s, e, t_ns)
    elif not len(s) and (start is None or end is None):
        t_ns = np.empty(0, np.int64)
        vals = np.empty(0, np.int64)
        step = _step_ns(freq) if freq is not None else _S
    else:
        lo = _ns(start, "start") if start is not None else int(s.min())
        hi = _ns(end, "end") if end is not None else max(int(e.max()) - 1, lo)
        step = _step_ns(freq) if freq is not None else _auto_step(hi - lo)[0]
        first = lo if start is not None else lo // step * step
        n = (hi - first) // step + 1
        if n > _MAX_POINTS:
            raise ValueError(f"{n} grid points of {step} ns: choose a coarser freq")
        t_ns = first + step * np.arange(n, dtype=np.int64)
        vals = _grid_counts(s, e, first, step, int(n))
        if how == "max" and len(s):
            _, v, b = _sweep(s, e, first, step, vals, np.ones(len(vals), bool))
            if len(v):
                seg = np.flatnonzero(np.concatenate(([True], b[1:] != b[:-1])))
                bb = b[seg]
                vals[bb] = np.maximum(vals[bb], np.maximum.reduceat(v, seg))
    out = pd.Series(vals, index=_utc(t_ns), name="concurrency")
    out.attrs.update(peak=peak, peak_at=_utc_ts(peak_at), now=_utc_ts(now_ns), freq_ns=step)
    return out


# --------------------------------------------------------------------------- plots

def _axes(ax: Any, figsize: tuple[float, float] = (9, 3.5)) -> "Axes":
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt
    _, ax = plt.subplots(figsize=figsize, layout="constrained")
    return ax


def _date_axis(ax: "Axes") -> None:
    import matplotlib.dates as mdates
    loc = mdates.AutoDateLocator(minticks=3, maxticks=8)
    ax.xaxis.set_major_locator(loc)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(loc))
    ax.set_xlabel("time (UTC)")


def _freq_label(step: int) -> str:
    """A step in ns as an operator writes it: "1 s", "10 s", "5 min", "1 h", "100 ms"."""
    for unit, name in ((86400 * _S, "d"), (3600 * _S, "h"), (60 * _S, "min"), (_S, "s"),
                       (1_000_000, "ms"), (1_000, "us")):
        if step >= unit and step % unit == 0:
            return f"{step // unit} {name}"
    return f"{step / _S:g} s"


def plot_concurrency(calls: Any, freq: Any = None, *, how: str = "max", start: Any = None,
                     end: Any = None, now: Any = None, ax: Any = None,
                     mark_peak: bool = True) -> "Axes":
    """Concurrent calls over time, as a step plot, with the peak marked.

    Parameters
    ----------
    freq, start, end, now, how
        As :func:`concurrency`; ``how="max"`` (default) shows the highest
        count within each interval, so that no spike hides between points.
    ax : matplotlib.axes.Axes, optional
        Where to draw (default: a new figure).

    Returns
    -------
    matplotlib.axes.Axes
    """
    c = concurrency(calls, freq, start=start, end=end, now=now, how=how)
    ax = _axes(ax)
    ax.step(c.index.to_numpy(), c.to_numpy(), where="post", color="C0", lw=1.2)
    if len(c):
        ax.fill_between(c.index.to_numpy(), c.to_numpy(), step="post", alpha=0.15, color="C0")
    peak, at = c.attrs["peak"], c.attrs["peak_at"]
    title = "Concurrent calls"
    if mark_peak and peak and len(c) and c.index[0] <= at <= c.index[-1] + \
            np.timedelta64(c.attrs["freq_ns"] or 0, "ns"):
        ax.plot([at.to_datetime64()], [peak], "v", color="C3", ms=7,
                label=f"peak {peak:,} at {at:%H:%M:%S}")
        ax.legend(loc="upper left", frameon=False)
    if c.attrs["freq_ns"]:
        title += f" ({'max' if how == 'max' else 'at start'} per {_freq_label(c.attrs['freq_ns'])})"
    ax.set_title(title)
    ax.set_ylabel("calls up (count)")
    # headroom above the peak for the legend
    ax.set_ylim(0, max(float(c.max()) if len(c) else 0.0, 1.0) * 1.2)
    ax.grid(True, alpha=0.3)
    _date_axis(ax)
    return ax


def plot_arrivals(calls: Any, freq: Any = None, *, start: Any = None, end: Any = None,
                  ax: Any = None) -> "Axes":
    """Arrival rate over time: calls started per second, averaged over each interval.

    Returns
    -------
    matplotlib.axes.Axes
    """
    a = arrivals(calls, freq, start=start, end=end)
    step = a.attrs["freq_ns"]
    ax = _axes(ax)
    rate = a.to_numpy() / (step / _S)
    x = a.index.to_numpy()
    ax.step(x, rate, where="post", color="C2", lw=1.2)
    if len(a):
        ax.fill_between(x, rate, step="post", alpha=0.2, color="C2")
        ax.axhline(float(rate.mean()), color="0.4", ls="--", lw=0.8,
                   label=f"mean {rate.mean():,.1f} calls/s")
        ax.legend(loc="upper left", frameon=False)
    ax.set_title(f"Call arrivals (per {_freq_label(step)} interval)")
    ax.set_ylabel("arrival rate (calls/s)")
    ax.set_ylim(0, max(float(rate.max()) if len(rate) else 0.0, 1.0) * 1.2)
    ax.grid(True, alpha=0.3)
    _date_axis(ax)
    return ax


def plot_durations(calls: Any, bins: int = 50, *, log: bool = False, ax: Any = None,
                   percentiles: Sequence[float] = (50, 95)) -> "Axes":
    """Histogram of the durations of ended calls, with percentile markers.

    Parameters
    ----------
    bins : int, default 50
    log : bool, default False
        Log-spaced bins on a log duration axis: call durations span
        milliseconds (failed set-ups) to hours, and a linear axis squeezes
        everything but the bulk into one bar.
    percentiles : sequence of float, default (50, 95)
        Drawn as dashed vertical lines.

    Returns
    -------
    matplotlib.axes.Axes
    """
    st, en, _ = _times(calls)
    both = (st != NOT_SET) & (en != NOT_SET)
    d = (en[both] - st[both]) / _S
    ax = _axes(ax)
    if len(d):
        if log:
            pos = d[d > 0]
            lo = max(float(pos.min()) if len(pos) else 1e-3, 1e-6)
            hi = max(float(d.max()), lo * 10)
            edges = np.geomspace(lo, hi, bins + 1)
            ax.hist(np.clip(d, lo, None), bins=edges, color="C1", alpha=0.8)
            ax.set_xscale("log")
        else:
            ax.hist(d, bins=bins, color="C1", alpha=0.8)
        for p, q in zip(percentiles, np.percentile(d, list(percentiles)) if percentiles else []):
            ax.axvline(q, color="0.25", ls="--", lw=0.9, label=f"p{p:g} = {q:,.1f} s")
        if percentiles:
            ax.legend(frameon=False)
    ax.set_title(f"Call durations ({len(d):,} ended calls{', log scale' if log else ''})")
    ax.set_xlabel("duration (s)")
    ax.set_ylabel("calls (count)")
    ax.grid(True, alpha=0.3)
    return ax


# --------------------------------------------------------------------------- live view

def _live_stats_html(table: "CallTable", df: "pd.DataFrame", prev: Any, cur: Any,
                     dt: float, peak: Peak) -> str:
    esc = html.escape
    rate_s = rate_e = "…"
    if prev is not None and dt > 0:
        rate_s = f"{(cur.n_started - prev.n_started) / dt:,.1f}"
        rate_e = f"{(cur.n_stopped - prev.n_stopped) / dt:,.1f}"
    counts = df["state"].value_counts()
    ds = duration_stats(df, (50, 95))
    lr = long_running(df, "0s").head(3)
    rows = "".join(f"<tr><td><code>{esc(str(r.call_id))}</code></td>"
                   f"<td class='num'>{format_age(int(r.age.value), 120)}</td></tr>"
                   for r in lr.itertuples())
    now = df.attrs["now"]
    fmt = (lambda v: "–" if v != v else f"{v:,.1f} s")  # noqa: E731 - NaN check
    return (f"<div class='npc'>{_CSS}<b>{esc(table.path)}</b> at {now:%H:%M:%S} UTC"
            f"<table><tr><th>calls</th><th>active</th><th>ended</th><th>end-only</th>"
            f"<th>starts/s</th><th>ends/s</th><th>peak up</th><th>median hold</th>"
            f"<th>p95 hold</th></tr><tr>"
            f"<td class='num'>{len(df):,}</td><td class='num'>{counts.get('active', 0):,}</td>"
            f"<td class='num'>{counts.get('ended', 0):,}</td>"
            f"<td class='num'>{counts.get('end-only', 0):,}</td>"
            f"<td class='num'>{rate_s}</td><td class='num'>{rate_e}</td>"
            f"<td class='num'>{peak.count:,}</td><td class='num'>{fmt(ds['p50'])}</td>"
            f"<td class='num'>{fmt(ds['p95'])}</td></tr></table>"
            f"<b>Longest active</b><table>{rows}</table></div>")


def _figure_png(draw: Any, figsize: tuple[float, float], dpi: int = 90) -> bytes:
    """Draw on a pyplot-free Figure and return PNG bytes.

    The live view renders its own PNG instead of handing a Figure to
    IPython, so it neither depends on the notebook's matplotlib backend nor
    leaves figures open in pyplot (one per refresh).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    draw(fig.add_subplot())
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def live(table: "CallTable", every: float = 2.0, iterations: int | None = None, *,
         window: Any = "10min", freq: Any = None,
         figsize: tuple[float, float] = (9, 3)) -> "pd.DataFrame | None":
    """Refresh stats and the concurrency plot in a notebook cell until interrupted.

    Each refresh takes a snapshot (writers are never blocked), updates a
    stats panel (counts, starts/s and ends/s from the table's lifetime
    counters, peak, median and p95 hold, longest active calls) and the
    concurrency plot over the last ``window``, in place, through IPython
    display handles.  Interrupt the kernel (Stop button, ``I, I``) to end
    it; that is not an error.

    Parameters
    ----------
    table : CallTable
        Usually opened with ``readonly=True``.
    every : float, default 2.0
        Seconds between refreshes.
    iterations : int, optional
        Stop after this many refreshes (default: run until interrupted).
    window : str or Timedelta, default "10min"
        How far back the plot goes.
    freq : str, optional
        Plot step (default: automatic).
    figsize : (float, float)

    Returns
    -------
    pandas.DataFrame or None
        The last snapshot's frame (None if interrupted before the first).
    """
    from IPython.display import HTML, DisplayHandle, Image
    pd = _pandas()
    win = _step_ns(window)
    # Handles made first: display(..., display_id=True) returns None outside
    # a kernel, a handle works in both (outside, it prints plain reprs).
    h_stats, h_plot = DisplayHandle(), DisplayHandle()
    h_stats.display(HTML("<i>starting…</i>"))
    h_plot.display(HTML(""))
    prev, prev_t, df = None, 0.0, None
    n = 0
    try:
        while iterations is None or n < iterations:
            t0 = time.monotonic()
            cur = table.stats()
            df = to_pandas(table)
            now_ns = int(df.attrs["now"].value)
            peak = peak_concurrency(df)
            h_stats.update(HTML(_live_stats_html(table, df, prev, cur, t0 - prev_t, peak)))
            # The window, but not before the first call: no flat line of zeros.
            first = df["start"].min()
            lo = now_ns - win if first is pd.NaT else max(now_ns - win, int(first.value))
            png = _figure_png(lambda ax: plot_concurrency(df, freq, start=lo, end=now_ns,
                                                          ax=ax), figsize)
            h_plot.update(Image(data=png, format="png"))
            prev, prev_t = cur, t0
            n += 1
            if iterations is not None and n >= iterations:
                break
            time.sleep(max(0.0, every - (time.monotonic() - t0)))
    except KeyboardInterrupt:
        pass        # the Stop button is how a live view ends
    return df
