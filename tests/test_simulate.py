"""The traffic simulator, with real writer processes: rates, holds, speed-up, clean shutdown."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

import npcalls
from npcalls import NOT_SET
from npcalls.simulate import SimConfig, default_capacity, run

S = 1_000_000_000


def npcalls_cmd(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "npcalls", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def by_worker(snap):
    """Start times per worker, from the Call-IDs sim<run>-<worker>-<n>@..."""
    out = {}
    for k, s in zip(snap["key"].tolist(), snap["start"].tolist()):
        m = re.fullmatch(rb"sim[0-9a-f]+-(\d+)-(\d+)@192\.0\.2\.\d+", k)
        assert m, k
        out.setdefault(int(m.group(1)), []).append(s)
    return {w: np.sort(np.array(v, np.int64)) for w, v in out.items()}


@pytest.mark.parametrize("dist", ["exp", "lognormal"])
def test_simulate_rates_and_holds_with_speedup(tdir, dist):
    """cps 100 and 5 s holds, 10 times faster: 1000 calls/s of 0.5 s (wall) each."""
    name = f"sim-{uuid.uuid4().hex[:8]}"
    dur = 3.0
    r = npcalls_cmd("simulate", name, "--cps", 100, "--mean-hold", "5s", "--hold-dist", dist,
                    "--speedup", 10, "--duration", f"{dur}s", "--workers", 2, "--create",
                    "--seed", 7, "--json", "--quiet")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["errors"] == [] and res["rejected"] == 0, res
    assert "calls started" in r.stderr
    t = npcalls.CallTable.open(name, readonly=True)
    try:
        s = t.stats()
        snap = t.snapshot()
    finally:
        t.close()
        npcalls.CallTable.unlink(name)
    # Every call the workers report is in the table, and hung up at the end.
    assert s.n_started == res["started"] == len(snap)
    assert s.n_stopped == res["stopped"] + res["hung_up"] == res["started"]
    assert s.active == 0 and res["left_active"] == 0
    # Poisson arrivals: each worker ~500 calls/s, exponential gaps (CV ~ 1).
    per = by_worker(snap)
    assert set(per) == {0, 1}
    for w, st in per.items():
        span = (st[-1] - st[0]) / S
        assert span > 1.0, (w, span)
        rate = (len(st) - 1) / span
        assert 400 < rate < 600, (w, rate)
        gaps = np.diff(st).astype(float)
        assert 0.85 < gaps.std() / gaps.mean() < 1.15, (w, gaps.std() / gaps.mean())
    # Holds: 5 s / 10 = 0.5 s of wall time.  Calls that started early enough
    # to end on their own (not hung up at the end) follow the distribution.
    end_of_run = snap["end"].max()
    early = snap[snap["start"] < end_of_run - int(1.5 * S)]      # 3 mean holds
    d = (early["end"] - early["start"]) / S
    assert len(d) > 200
    if dist == "exp":
        assert 0.42 < d.mean() < 0.58, d.mean()
        assert 0.8 < d.std() / d.mean() < 1.2
    else:                               # mean 0.5 s, sigma 1: median 0.5 / e^0.5
        assert 0.38 < d.mean() < 0.62, d.mean()
        assert 0.25 < np.median(d) < 0.36, np.median(d)


def test_simulate_python_api_leave_active_calls(tdir):
    name = f"sim-{uuid.uuid4().hex[:8]}"
    cfg = SimConfig(table=name, cps=300, mean_hold_ns=60 * S, duration_ns=int(2.0 * S),
                    workers=2, seed=3, on_exit="leave")
    npcalls.CallTable.create(name, default_capacity(cfg)).close()
    res = run(cfg, install_signals=False)
    assert res.errors == [] and res.started > 200, res
    with npcalls.CallTable.open(name, readonly=True) as t:
        s = t.stats()
    npcalls.CallTable.unlink(name)
    # 60 s holds in a 2 s run: nearly every call is still up, and left so.
    assert res.left_active == s.active > 0.9 * res.started
    assert res.hung_up == 0 and s.n_started == res.started


def _children(pid):
    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                kids.append(int(d))
    return kids


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("how", ["SIGTERM", "Ctrl-C"])
def test_simulate_stops_cleanly_on_a_signal(tdir, how):
    name = f"sim-{uuid.uuid4().hex[:8]}"
    p = subprocess.Popen([sys.executable, "-m", "npcalls", "simulate", name, "--cps", "300",
                          "--mean-hold", "30s", "--duration", "0", "--workers", "2",
                          "--create", "--capacity", "65536", "--quiet"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        active = 0
        while time.monotonic() < deadline and active < 100:
            time.sleep(0.2)
            try:
                with npcalls.CallTable.open(name, readonly=True) as t:
                    active = t.stats().active
            except npcalls.TableNotFoundError:
                pass
        assert active >= 100, "the simulator did not get going"
        kids = [k for k in _children(p.pid) if _alive(k)]
        assert len(kids) >= 2
        if how == "SIGTERM":
            p.send_signal(signal.SIGTERM)
        else:
            os.killpg(p.pid, signal.SIGINT)     # what a terminal's Ctrl-C does
        out, err = p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert p.returncode == 0, err
    assert "Traceback" not in err and "hung up at exit" in err
    deadline = time.monotonic() + 5
    while any(_alive(k) for k in kids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(k) for k in kids), "worker processes left behind"
    with npcalls.CallTable.open(name, readonly=True) as t:
        s = t.stats()
        snap = t.snapshot()
    npcalls.CallTable.unlink(name)
    assert s.active == 0 and s.n_started == s.n_stopped > 100   # every call hung up
    assert (snap["end"] != NOT_SET).all()


def _started(name: str) -> int:
    """Calls the simulator started so far (0 while its table does not exist yet)."""
    try:
        with npcalls.CallTable.open(name, readonly=True) as t:
            return t.counters().n_started
    except npcalls.NpcallsError:
        return 0


def test_workers_do_not_outlive_a_killed_simulator(tdir):
    """SIGKILL of the parent: the workers see their stop pipe close and wind down."""
    name = f"sim-{uuid.uuid4().hex[:8]}"
    kids = []
    p = subprocess.Popen([sys.executable, "-m", "npcalls", "simulate", name, "--cps", "200",
                          "--mean-hold", "30s", "--duration", "0", "--workers", "2",
                          "--create", "--capacity", "65536", "--quiet"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(kids) < 2:
            time.sleep(0.2)
            kids = [k for k in _children(p.pid) if _alive(k)]
        # running, with calls up: wait for the first starts rather than a fixed
        # time (worker start-up can take seconds on a loaded machine)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _started(name) < 20:
            time.sleep(0.1)
        p.kill()
        p.wait()
        deadline = time.monotonic() + 10
        while any(_alive(k) for k in kids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(kids) >= 2 and not any(_alive(k) for k in kids)
    finally:
        for k in kids:                         # do not leave them behind if the test failed
            if _alive(k):
                os.kill(k, signal.SIGKILL)
    with npcalls.CallTable.open(name, readonly=True) as t:
        s = t.stats()
    npcalls.CallTable.unlink(name)
    assert s.n_started > 0 and s.active == 0     # they hung up on their way out


def test_simulate_full_table_rejects_and_goes_on(tdir):
    name = f"sim-{uuid.uuid4().hex[:8]}"
    r = npcalls_cmd("simulate", name, "--cps", 400, "--mean-hold", "60s", "--duration", "1.5s",
                    "--workers", 1, "--create", "--capacity", 64, "--json", "--quiet")
    with npcalls.CallTable.open(name, readonly=True) as t:
        s = t.stats()
    npcalls.CallTable.unlink(name)
    assert r.returncode == 1, r.stderr          # calls were rejected: a negative answer
    res = json.loads(r.stdout)
    assert res["rejected"] > 0 and res["started"] == s.count == s.limit
    assert "full" in r.stderr and f"npcalls grow {name}" in r.stderr


def test_simulate_errors(tdir):
    r = npcalls_cmd("simulate", "nosuch", "--duration", "1s")
    assert r.returncode == 2 and "no table" in r.stderr and "--create" in r.stderr
    r = npcalls_cmd("simulate", "x", "--cps", "0")
    assert r.returncode == 2 and "positive" in r.stderr
    r = npcalls_cmd("simulate", "x", "--hold-dist", "pareto")
    assert r.returncode == 2
    with pytest.raises(ValueError, match="speedup"):
        SimConfig(table="x", speedup=0).check()
