"""Display of a table: the HTML view Jupyter shows for a :class:`~npcalls.CallTable`.

numpy only, so the core's ``_repr_html_`` can use it without pulling in the
analysis layer (pandas, matplotlib); :mod:`npcalls.analysis` imports from here,
never the other way.
"""

from __future__ import annotations

import html
import time
from typing import TYPE_CHECKING

import numpy as np

from .layout import NOT_SET
from .timestamps import format_age

if TYPE_CHECKING:
    from .table import CallTable

__all__ = ["table_html"]


def _fmt_ns(ns: int) -> str:
    if ns == NOT_SET:
        return ""
    return str(np.datetime64(int(ns), "ns").astype("datetime64[ms]")).replace("T", " ")


def _key_str(k: bytes) -> str:
    return k.decode("utf-8", "backslashreplace")


_CSS = ("<style>.npc{font-family:var(--jp-ui-font-family,sans-serif);font-size:12px}"
        ".npc table{border-collapse:collapse;margin:4px 0}"
        ".npc td,.npc th{padding:2px 8px;text-align:left;border-bottom:1px solid #ddd}"
        ".npc .num{text-align:right;font-variant-numeric:tabular-nums}"
        ".npc .bar{display:inline-block;height:8px;background:#4c78a8;vertical-align:middle}"
        ".npc .track{display:inline-block;width:120px;height:8px;background:#e5e5e5;"
        "vertical-align:middle}</style>")


def table_html(table: "CallTable", rows: int = 5) -> str:
    """HTML summary of a table for Jupyter: size, load, state counts, a few rows.

    Shows capacity, calls (and the limit), load, active / ended / end-only
    counts, the lifetime counters, the longest active calls (an operator's
    first question) and the latest ends.  Needs neither pandas nor
    matplotlib; costs one stats pass and one snapshot (~0.1 s per million
    calls), taken without blocking writers.

    Parameters
    ----------
    table : CallTable
    rows : int, default 5
        Rows shown in each of the two lists.

    Returns
    -------
    str
    """
    esc = html.escape
    try:
        s = table.stats()
        snap = table.snapshot()
    except Exception as e:  # noqa: BLE001 - a repr must never raise (closed, removed table)
        return f"<div class='npc'>{_CSS}<b>CallTable</b> {esc(str(getattr(table, 'path', '')))}" \
               f": <i>{esc(type(e).__name__)}: {esc(str(e))}</i></div>"
    now = time.time_ns()
    ro = " (read-only)" if getattr(table, "readonly", False) else ""
    load = s.count / s.capacity if s.capacity else 0.0
    of_limit = s.count / s.limit if s.limit else 0.0
    bar = (f"<span class='track'><span class='bar' style='width:{min(of_limit, 1) * 120:.0f}px'>"
           "</span></span>")
    grid = [
        ("calls", f"{s.count:,} of {s.limit:,} allowed {bar} {of_limit:.0%}"),
        ("capacity", f"{s.capacity:,} slots (load {load:.1%}, max {getattr(table, 'max_load', 0):.0%})"),
        ("active", f"{s.active:,}"), ("ended", f"{s.ended:,}"), ("end-only", f"{s.end_only:,}"),
        ("started / stopped / removed (ever)",
         f"{s.n_started:,} / {s.n_stopped:,} / {s.n_removed:,}"),
        ("key width", f"{s.key_width} bytes"),
        ("probe length", f"mean {s.mean_probe:.2f}, max {s.max_probe}"),
        ("tombstones", f"{s.tombstones:,}"),
        ("writer", "idle" if s.writer_pid is None else f"pid {s.writer_pid} holds the lock"),
    ]
    parts = [f"<div class='npc'>{_CSS}<b>CallTable</b> <code>{esc(s.path)}</code>{ro}",
             "<table>"]
    parts += [f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in grid]
    parts.append("</table>")
    st, en, key = snap["start"], snap["end"], snap["key"]
    act = np.flatnonzero((st != NOT_SET) & (en == NOT_SET))
    if len(act) and rows > 0:
        k = min(rows, len(act))
        pick = act[np.argpartition(st[act], k - 1)[:k]] if len(act) > k else act
        pick = pick[np.argsort(st[pick], kind="stable")]
        parts.append(f"<b>Longest active calls</b> ({len(act):,} active)<table>"
                     "<tr><th>call_id</th><th>start (UTC)</th><th class='num'>up for</th></tr>")
        parts += [f"<tr><td><code>{esc(_key_str(key[i]))}</code></td><td>{_fmt_ns(st[i])}</td>"
                  f"<td class='num'>{format_age(now - int(st[i]), 120)}</td></tr>" for i in pick]
        parts.append("</table>")
    done = np.flatnonzero(en != NOT_SET)
    if len(done) and rows > 0:
        k = min(rows, len(done))
        pick = done[np.argpartition(-en[done], k - 1)[:k]] if len(done) > k else done
        pick = pick[np.argsort(-en[pick], kind="stable")]
        parts.append("<b>Latest ends</b><table><tr><th>call_id</th><th>start (UTC)</th>"
                     "<th>end (UTC)</th><th class='num'>duration</th></tr>")
        for i in pick:
            dur = "" if st[i] == NOT_SET else format_age(int(en[i]) - int(st[i]), 120)
            parts.append(f"<tr><td><code>{esc(_key_str(key[i]))}</code></td>"
                         f"<td>{_fmt_ns(st[i])}</td><td>{_fmt_ns(en[i])}</td>"
                         f"<td class='num'>{dur}</td></tr>")
        parts.append("</table>")
    if not len(snap):
        parts.append("<i>empty</i>")
    parts.append("</div>")
    return "".join(parts)
