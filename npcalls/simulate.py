"""A traffic simulator: live calls for demos and tests, without a SIP proxy.

``npcalls simulate NAME --cps 200 --mean-hold 90s`` runs ``--workers``
processes that write to the table through the public API (``start`` and
``stop``, exactly as proxy workers do).  Together they produce Poisson
arrivals at ``cps`` calls per second, each call held for an exponential or
lognormal time of mean ``mean_hold``.

Time
----
Timestamps are the wall-clock instants at which the events are due (not the
instant a busy worker got round to them), so the table's durations follow
the chosen distribution even when a worker lags; the lag is reported.
``speedup`` F runs the simulated clock F times faster than the wall clock:
``cps`` and ``mean_hold`` are in simulated seconds, so the table sees
``cps * F`` calls per wall second, each lasting ``hold / F``.  The number of
calls up at once (``cps * mean_hold``, Little's law) is the same at any F;
F only shortens the wait for it.  Recorded times stay real wall-clock times,
so "now" keeps its meaning for the analysis.

Shutdown
--------
The run ends after ``duration`` (wall clock), on SIGINT (Ctrl-C) or on
SIGTERM.  Workers then hang up their calls in progress (``on_exit="hangup"``,
the default: a table left full of calls that stay "active" forever would
raise long-running alarms in every later analysis) or leave them
(``on_exit="leave"``).
"""

from __future__ import annotations

import heapq
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import secrets
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["SimConfig", "SimResult", "run", "default_capacity", "churn"]

_S = 1_000_000_000


@dataclass
class SimConfig:
    """What to simulate.  Times are int nanoseconds."""

    table: str
    cps: float = 200.0
    mean_hold_ns: int = 90 * _S
    hold_dist: str = "exp"
    hold_sigma: float = 1.0
    duration_ns: int | None = 60 * _S
    speedup: float = 1.0
    workers: int = 2
    seed: int | None = None
    on_exit: str = "hangup"
    expire_after_ns: int | None = None

    def check(self) -> None:
        if not self.cps > 0:
            raise ValueError(f"cps must be positive, not {self.cps}")
        if self.mean_hold_ns <= 0:
            raise ValueError("mean hold time must be positive")
        if self.hold_dist not in ("exp", "lognormal"):
            raise ValueError(f"hold distribution must be 'exp' or 'lognormal', "
                             f"not {self.hold_dist!r}")
        if not self.hold_sigma > 0:
            raise ValueError("hold sigma must be positive")
        if not self.speedup > 0:
            raise ValueError(f"speedup must be positive, not {self.speedup}")
        if self.workers < 1:
            raise ValueError("workers must be at least 1")
        if self.on_exit not in ("hangup", "leave"):
            raise ValueError(f"on_exit must be 'hangup' or 'leave', not {self.on_exit!r}")


@dataclass
class SimResult:
    """What a run did (sums over the workers)."""

    started: int = 0
    stopped: int = 0
    hung_up: int = 0
    left_active: int = 0
    rejected: int = 0
    expired: int = 0
    elapsed_s: float = 0.0
    max_lag_ms: float = 0.0
    errors: list[str] = field(default_factory=list)
    """What went wrong: a worker that crashed or never reported."""
    warnings: list[str] = field(default_factory=list)
    """What a live proxy also meets: a full table (calls rejected)."""

    def summary(self) -> str:
        rate = self.started / self.elapsed_s if self.elapsed_s > 0 else 0.0
        s = (f"{self.started:,} calls started, {self.stopped:,} ended, "
             f"{self.hung_up:,} hung up at exit, {self.left_active:,} left active, "
             f"{self.rejected:,} rejected (table full) in {self.elapsed_s:.1f} s "
             f"({rate:,.0f} calls/s); worst worker lag {self.max_lag_ms:.0f} ms")
        if self.expired:
            s += f"; {self.expired:,} ended calls expired"
        return s


def default_capacity(cfg: SimConfig) -> int:
    """Slots for a table that holds a whole run without expiry, at load <= 0.6.

    Expected calls: cps * F * duration started, plus headroom of six
    standard deviations of the Poisson count.
    """
    dur = (cfg.duration_ns or 3600 * _S) / _S
    expected = cfg.cps * cfg.speedup * dur
    if cfg.expire_after_ns is not None:
        # with expiry, only calls up plus the ones ended within the window stay
        window = cfg.mean_hold_ns / _S + cfg.expire_after_ns / _S * cfg.speedup
        expected = min(expected, cfg.cps * window * 1.5)
    n = expected + 6 * expected ** 0.5 + 64
    return int(max(1024, n / 0.6))


def _hold_sampler(cfg: SimConfig, rng: np.random.Generator) -> Any:
    mean = cfg.mean_hold_ns / _S
    if cfg.hold_dist == "exp":
        return lambda n: rng.exponential(mean, n)
    # A lognormal with the requested mean: E = exp(mu + sigma^2 / 2).
    sigma = cfg.hold_sigma
    mu = np.log(mean) - sigma * sigma / 2
    return lambda n: rng.lognormal(mu, sigma, n)


def _worker(cfg: SimConfig, index: int, seed: Any, deadline_wall_ns: int | None,
            stop_r: Any, result_w: Any, run_id: str) -> None:
    """One writer process: a Poisson stream of cps / workers, with its own calls.

    ``stop_r`` is the read end of a pipe whose only write end the parent
    holds: it becomes readable (EOF) when the parent closes it to stop the
    run, and also when the parent dies, so a worker never outlives it.  (A
    multiprocessing Event would not do: its lock, held by a parent killed at
    the wrong instant, wedges every waiter.)  ``result_w`` carries this
    worker's SimResult back.
    """
    from .errors import NpcallsError, TableFullError
    from .table import CallTable

    stopping = False

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True

    # Ctrl-C reaches the whole process group; each worker winds down on its
    # own (hanging up its calls) instead of dying with a traceback.
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    res = SimResult()
    try:
        table = CallTable.open(cfg.table)
    except NpcallsError as e:
        res.errors.append(f"worker {index}: {e}")
        result_w.send(res)
        return
    rng = np.random.default_rng(seed)
    holds = _hold_sampler(cfg, rng)
    f = cfg.speedup
    rate_w = cfg.cps / cfg.workers               # this worker's share, per simulated s
    # Monotonic clock for scheduling, mapped to the wall clock once, so that
    # a wall-clock step does not make the whole schedule jump.
    mono0 = time.monotonic_ns()
    wall0 = time.time_ns()
    deadline = None if deadline_wall_ns is None else mono0 + (deadline_wall_ns - wall0)
    chunk = 4096
    pending: list[tuple[int, int]] = []          # (end time, call number) heap
    prefix = f"sim{run_id}-{index}-"
    suffix = f"@192.0.2.{index % 250 + 1}"        # TEST-NET-1: never a real host
    nxt = mono0
    arr = np.empty(0, np.int64)
    hold = np.empty(0, np.int64)
    ai = 0
    seq = 0
    full_noted = False
    try:
        while not stopping:
            now = time.monotonic_ns()
            if deadline is not None and now >= deadline:
                break
            # Ends due by now, in time order.
            while pending and pending[0][0] <= now:
                t_end, n = heapq.heappop(pending)
                res.max_lag_ms = max(res.max_lag_ms, (now - t_end) / 1e6)
                if table.stop(f"{prefix}{n}{suffix}", ts=wall0 + (t_end - mono0)):
                    res.stopped += 1
            # Arrivals due by now.
            while True:
                if ai == len(arr):
                    gaps = rng.exponential(_S / (rate_w * f), chunk)
                    arr = nxt + np.cumsum(gaps).astype(np.int64)
                    hold = (holds(chunk) * (_S / f)).astype(np.int64)
                    nxt = int(arr[-1])
                    ai = 0
                t_arr = int(arr[ai])
                if t_arr > now or (deadline is not None and t_arr >= deadline):
                    break
                res.max_lag_ms = max(res.max_lag_ms, (now - t_arr) / 1e6)
                n = seq
                seq += 1
                try:
                    if table.start(f"{prefix}{n}{suffix}", ts=wall0 + (t_arr - mono0)):
                        res.started += 1
                        heapq.heappush(pending, (t_arr + int(hold[ai]), n))
                except TableFullError as e:
                    # A full proxy rejects calls (503) and keeps serving the rest.
                    res.rejected += 1
                    if not full_noted:
                        res.warnings.append(f"worker {index}: {e}")
                        full_noted = True
                ai += 1
            wake = int(arr[ai]) if ai < len(arr) else nxt
            if pending:
                wake = min(wake, pending[0][0])
            if deadline is not None:
                wake = min(wake, deadline)
            delay = (wake - time.monotonic_ns()) / 1e9
            if delay > 0 and stop_r.poll(min(delay, 0.25)):
                break                       # the parent closed the pipe (or died)
        if pending:
            if cfg.on_exit == "hangup":
                keys = [f"{prefix}{n}{suffix}" for _, n in pending]
                res.hung_up = int(np.count_nonzero(table.stop_many(keys)))
            else:
                res.left_active = len(pending)
    except Exception as e:  # noqa: BLE001 - report to the parent rather than die silently
        res.errors.append(f"worker {index}: {type(e).__name__}: {e}")
    finally:
        table.close()
        try:
            result_w.send(res)
        except OSError:
            pass                            # the parent is gone: nobody to tell


def run(cfg: SimConfig, *, install_signals: bool = True, progress: Any = None) -> SimResult:
    """Run a simulation until ``duration``, SIGINT or SIGTERM; return what it did.

    Parameters
    ----------
    cfg : SimConfig
        The table must exist (the CLI's ``--create`` makes it).
    install_signals : bool, default True
        Handle SIGINT/SIGTERM in this process by stopping the workers
        cleanly (only possible in the main thread; elsewhere ignored).  In
        Jupyter, interrupting the kernel then ends the run cleanly.
    progress : callable, optional
        Called about once per second with (table stats, elapsed seconds).

    Returns
    -------
    SimResult
    """
    cfg.check()
    from .table import CallTable
    with CallTable.open(cfg.table) as t:          # fail early, in the parent
        t_path = t.path
    cfg.table = t_path
    # spawn: safe from any parent (a Jupyter kernel has threads; fork there
    # can deadlock), at ~0.3 s of start-up per worker.
    ctx = mp.get_context("spawn")
    stop_r, stop_w = ctx.Pipe(duplex=False)
    seeds = np.random.SeedSequence(cfg.seed).spawn(cfg.workers)
    run_id = secrets.token_hex(3)
    start_wall = time.time_ns()
    deadline = None if cfg.duration_ns is None else start_wall + cfg.duration_ns
    stopping: dict[str, int | None] = {"signal": None}

    def on_signal(signum: int, frame: Any) -> None:
        # Only a flag: a handler that took a lock could deadlock with the
        # main thread it interrupted.
        stopping["signal"] = signum

    old = {}
    if install_signals and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, on_signal)
    procs = []
    conns = []
    t0 = time.monotonic()
    try:
        for i in range(cfg.workers):
            res_r, res_w = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_worker, name=f"npcalls-sim-{i}",
                            args=(cfg, i, seeds[i], deadline, stop_r, res_w, run_id),
                            daemon=True)
            p.start()
            res_w.close()           # the worker holds the only write end: EOF if it dies
            procs.append(p)
            conns.append(res_r)
        stop_r.close()
        expire_t = time.monotonic()
        progress_t = expire_t
        res_expired = 0
        writer = None
        while any(p.is_alive() for p in procs):
            time.sleep(0.1)
            if stopping["signal"] is not None:
                break
            if deadline is not None and time.time_ns() >= deadline:
                break
            now = time.monotonic()
            if cfg.expire_after_ns is not None and now - expire_t >= 1.0:
                expire_t = now
                if writer is None:
                    writer = CallTable.open(cfg.table)
                res_expired += int(writer.expire(ended_before=time.time_ns()
                                                 - cfg.expire_after_ns))
            if progress is not None and now - progress_t >= 1.0:
                progress_t = now
                with CallTable.open(cfg.table, readonly=True) as reader:
                    progress(reader.stats(), now - t0)
        stop_w.close()
        res = SimResult(expired=res_expired)
        got = 0
        limit = time.monotonic() + 10 + cfg.workers
        waiting = list(conns)
        while waiting and time.monotonic() < limit:
            # only our Connections come back (wait() is typed for sockets too)
            ready: list[Any] = mp_connection.wait(waiting, timeout=0.5)
            for c in ready:
                waiting.remove(c)
                try:
                    r = c.recv()
                except (EOFError, OSError):
                    continue            # died without reporting: counted below
                got += 1
                res.started += r.started
                res.stopped += r.stopped
                res.hung_up += r.hung_up
                res.left_active += r.left_active
                res.rejected += r.rejected
                res.max_lag_ms = max(res.max_lag_ms, r.max_lag_ms)
                res.errors += r.errors
                res.warnings += r.warnings
        if got < len(procs):
            res.errors.append(f"{len(procs) - got} worker(s) did not report")
        if writer is not None:
            writer.close()
        res.elapsed_s = time.monotonic() - t0
        return res
    finally:
        stop_w.close()
        for c in conns:
            c.close()
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():            # wedged: do not leave it behind
                p.terminate()
                p.join(timeout=2)
        for sig, h in old.items():
            signal.signal(sig, h)


def churn(table: Any, cycles: int, active: int, batch: int = 50_000, seed: int = 0) -> None:
    """Drive ``cycles`` calls through a table in batches: start, stop, expire.

    Each call (``c0``, ``c1``, ...) starts, ends ``active`` calls later and is
    expired one batch after it ended, so the table holds about ``active``
    calls in progress plus up to one batch of ended ones: the months-long
    churn of a production table, compressed.  Used by the churn test (P5)
    and by bench/bench_lifecycle.py.
    """
    rng = np.random.default_rng(seed)
    serial = 0
    while serial < cycles:
        n = min(batch, cycles - serial)
        keys = np.char.add(b"c", np.arange(serial, serial + n).astype("S12"))
        table.start_many(keys, serial + np.arange(n))
        old = serial - active
        if old >= 0:
            ended = np.char.add(b"c", np.arange(old, old + n).astype("S12"))
            table.stop_many(ended, serial + rng.integers(0, n, n))
        serial += n
        table.expire(ended_before=serial - n)
