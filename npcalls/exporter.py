"""A Prometheus exporter for npcalls tables (``pip install 'npcalls[exporter]'``).

``npcalls exporter calls [other ...] --listen 127.0.0.1:9464`` serves
``/metrics``; :func:`serve` does the same from Python, and
:class:`TableCollector` plugs into any ``prometheus_client`` registry.

Every scrape reads each table lock-free, like any reader: the header's
counters (:meth:`CallTable.counters`, a few dozen words) and one pass over
the rows' times (:meth:`CallTable.times`, a snapshot without the keys) for
what only the rows know (active calls, the longest one, stuck calls).
Writers are never blocked.

Counters come from the table itself, not from the exporter's memory:

* ``npcalls_calls_started_total`` / ``npcalls_calls_ended_total`` are the
  header's monotonic ``n_started`` / ``n_stopped``, which ``expire`` and
  rebuilds keep, so they survive exporter restarts and expiry;
* ``npcalls_call_duration_seconds`` is the header's duration histogram: the
  writer that gives a call its second time (usually the BYE's ``stop``)
  counts it, once, in the same locked operation (docs/format.md).  A call
  expired between two scrapes is therefore already counted, and a restarted
  exporter reads the same totals.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from .errors import NpcallsError
from .layout import NOT_SET
from .signals import stop_event

__all__ = ["TableCollector", "ExporterServer", "serve", "parse_listen", "DEFAULT_LISTEN",
           "DEFAULT_STUCK_AFTER_S"]

DEFAULT_LISTEN = "127.0.0.1:9464"
DEFAULT_STUCK_AFTER_S = 4 * 3600.0
"""Calls up longer than this count as stuck (a lost BYE): 4 hours by default."""


def _prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError:
        raise ImportError("the exporter needs prometheus_client: "
                          "pip install 'npcalls[exporter]'") from None
    return prometheus_client


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6, ``:PORT`` for all addresses) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        raise ValueError(f"listen address must be HOST:PORT, not {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        p = int(port)
    except ValueError:
        raise ValueError(f"listen address {text!r}: port {port!r} is not a number") from None
    if not 0 <= p <= 65535:
        raise ValueError(f"listen address {text!r}: port must be in 0..65535")
    return host or "0.0.0.0", p


@dataclass
class _Source:
    name: str
    label: str
    table: Any = None
    error: str = ""


@dataclass(eq=False)
class TableCollector:
    """A ``prometheus_client`` collector for one or more npcalls tables.

    Parameters
    ----------
    tables : sequence of str
        Table names or paths.  Each is opened read-only at the first scrape
        and re-opened after it disappears (``npcalls_table_up`` is 0 meanwhile).
    host : str, optional
        Value of the ``host`` label (default: this machine's host name).
    stuck_after_s : float
        Calls up longer than this are counted by ``npcalls_stuck_calls``.
    """

    tables: Sequence[str]
    host: str | None = None
    stuck_after_s: float = DEFAULT_STUCK_AFTER_S
    _sources: list[_Source] = field(init=False, repr=False)
    _lock: threading.Lock = field(init=False, repr=False, default_factory=threading.Lock)

    def __post_init__(self) -> None:
        if not self.tables:
            raise ValueError("the exporter needs at least one table")
        if not self.stuck_after_s > 0:
            raise ValueError(f"stuck_after_s must be positive, not {self.stuck_after_s}")
        self.host = self.host or socket.gethostname()
        self._sources = [_Source(t, _label(t)) for t in self.tables]
        labels = [s.label for s in self._sources]
        if len(set(labels)) != len(labels):
            raise ValueError(f"two tables would have the same table label: {labels}")

    def describe(self) -> list:
        # An empty description keeps registration from running a full scrape.
        return []

    def close(self) -> None:
        """Detach from every table."""
        with self._lock:
            for s in self._sources:
                if s.table is not None:
                    s.table.close()
                    s.table = None

    def _attach(self, s: _Source) -> Any:
        from .table import CallTable
        if s.table is not None and s.table.closed:
            s.table = None
        if s.table is None:
            s.table = CallTable.open(s.name, readonly=True)
        return s.table

    def collect(self) -> Iterator[Any]:
        """Read every table once and yield the metric families (one scrape)."""
        _prometheus()                   # a clear ImportError if the extra is missing
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
        lab = ["host", "table"]

        def g(name: str, doc: str, unit: str = "") -> Any:
            return GaugeMetricFamily(name, doc, labels=lab, unit=unit)

        def c(name: str, doc: str) -> Any:
            return CounterMetricFamily(name, doc, labels=lab)

        up = g("npcalls_table_up", "1 if the table could be read at this scrape, else 0")
        active = g("npcalls_active_calls", "Calls started and not ended")
        started = c("npcalls_calls_started", "Call starts recorded (the table's monotonic "
                    "counter: survives expire and exporter restarts)")
        ended = c("npcalls_calls_ended", "Call ends recorded (the table's monotonic counter)")
        removed = c("npcalls_calls_removed", "Calls removed by expire or remove")
        hist = HistogramMetricFamily(
            "npcalls_call_duration_seconds",
            "Durations of calls that ended, each counted once by the writer that ended it",
            labels=lab, unit="seconds")
        longest = g("npcalls_longest_active_call_seconds",
                    "Age of the oldest call still up (0 when none)")
        stuck = g("npcalls_stuck_calls", f"Calls up for longer than the stuck threshold "
                  f"(--stuck-after, here {self.stuck_after_s:g} s): a lost BYE?")
        stuck_thr = g("npcalls_stuck_threshold_seconds", "The stuck-call threshold in use")
        rows = g("npcalls_table_calls", "Rows in the table (active, ended and end-only calls)")
        cap = g("npcalls_table_capacity_slots", "Slots in the table")
        limit = g("npcalls_table_limit_calls", "Most rows the table accepts (load limit)")
        load = g("npcalls_table_load_ratio", "Rows / slots")
        tomb = g("npcalls_table_tombstones", "Tombstone slots (reclaimed by rebuilds)")
        recov = c("npcalls_writer_recoveries", "Crashed writers the table recovered from")
        rebuilds = c("npcalls_table_rebuilds", "Grow/compact rebuilds of the table")
        with self._lock:
            now = time.time_ns()
            for s in self._sources:
                lv: list[str] = [self.host, s.label]  # type: ignore[list-item]  # set in __post_init__
                try:
                    t = self._attach(s)
                    cn = t.counters()
                    st, en = t.times()
                except (NpcallsError, OSError) as e:
                    # Gone, not created yet, or replaced: report and retry at the next scrape.
                    if s.table is not None:
                        s.table.close()
                        s.table = None
                    s.error = str(e)
                    up.add_metric(lv, 0)
                    continue
                s.error = ""
                up.add_metric(lv, 1)
                act = st[(st != NOT_SET) & (en == NOT_SET)]
                active.add_metric(lv, len(act))
                oldest = int(act.min()) if len(act) else now
                longest.add_metric(lv, max(0, now - oldest) / 1e9)
                stuck.add_metric(lv, int(np.count_nonzero(act < now - int(self.stuck_after_s
                                                                            * 1e9))))
                stuck_thr.add_metric(lv, self.stuck_after_s)
                started.add_metric(lv, cn.n_started)
                ended.add_metric(lv, cn.n_stopped)
                removed.add_metric(lv, cn.n_removed)
                cum = np.cumsum(cn.duration_buckets).tolist()
                bks = [(f"{b:g}", v) for b, v in zip(map(float, cn.duration_bounds_s), cum)]
                bks.append(("+Inf", cum[-1]))
                hist.add_metric(lv, bks, cn.duration_sum_s)
                rows.add_metric(lv, cn.count)
                cap.add_metric(lv, cn.capacity)
                limit.add_metric(lv, cn.limit)
                load.add_metric(lv, cn.count / cn.capacity)
                tomb.add_metric(lv, cn.tombstones)
                recov.add_metric(lv, cn.n_recoveries)
                rebuilds.add_metric(lv, cn.n_rebuilds)
        yield from (up, active, started, ended, removed, hist, longest, stuck, stuck_thr, rows,
                    cap, limit, load, tomb, recov, rebuilds)


def _label(name: str) -> str:
    """The ``table`` label of a table: its name (a path's file name without ``npcalls.``)."""
    base = os.path.basename(os.fspath(name).rstrip("/"))
    return base[len("npcalls."):] if base.startswith("npcalls.") and "/" in name else base


class ExporterServer(contextlib.AbstractContextManager):
    """An HTTP server for ``/metrics`` on a thread; :meth:`close` stops it.

    Use :func:`serve` to make one.
    """

    def __init__(self, collector: TableCollector, host: str, port: int) -> None:
        pc = _prometheus()
        from wsgiref.simple_server import WSGIRequestHandler, make_server

        from prometheus_client.exposition import ThreadingWSGIServer

        class _Quiet(WSGIRequestHandler):
            def log_message(self, *args: Any) -> None:     # no line per scrape on stderr
                pass

        self.collector = collector
        self.registry = pc.CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        app = pc.make_wsgi_app(self.registry)
        server_cls = ThreadingWSGIServer
        if ":" in host:
            class _V6(ThreadingWSGIServer):
                address_family = socket.AF_INET6
            server_cls = _V6
        self._httpd = make_server(host, port, app, server_class=server_cls,
                                  handler_class=_Quiet)
        self.host = host
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="npcalls-exporter",
                                        daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        h = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{h}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and detach from the tables."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()
        self.collector.close()

    def __exit__(self, *exc: Any) -> None:       # __enter__ (returns self): the base class
        self.close()


def serve(tables: Sequence[str], listen: str = DEFAULT_LISTEN, *, host: str | None = None,
          stuck_after_s: float = DEFAULT_STUCK_AFTER_S) -> ExporterServer:
    """Serve the metrics of ``tables`` on ``listen`` (``HOST:PORT``; port 0 picks a free one).

    Returns at once with the server running on a thread.

    Examples
    --------
    >>> srv = serve(["calls"], "127.0.0.1:0")          # doctest: +SKIP
    >>> srv.url                                          # doctest: +SKIP
    'http://127.0.0.1:40123/metrics'
    >>> srv.close()                                      # doctest: +SKIP
    """
    addr, port = parse_listen(listen)
    return ExporterServer(TableCollector(list(tables), host, stuck_after_s), addr, port)


def run_forever(server: ExporterServer, stop_signals: Iterable[int] = (signal.SIGTERM,
                                                                      signal.SIGINT)) -> None:
    """Block until one of ``stop_signals`` arrives, then close the server."""
    done, restore = stop_event(stop_signals)
    try:
        while not done.wait(3600):
            pass
    finally:
        restore()
        server.close()
