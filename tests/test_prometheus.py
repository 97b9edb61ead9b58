"""The exporter scraped by a real Prometheus server while `npcalls simulate` drives calls.

Prometheus is Debian's ``prometheus`` package (scripts/install-system-deps.sh
installs it; this test fails if it is missing).  It runs with a temporary
config and storage, scraping the exporter every second.  The test then asks
Prometheus's HTTP API for what it stored and compares with the table: active
calls and counters exactly (once the table is still), a rate() of starts
against the simulated rate, counters unbroken by an exporter restart and by
expire, and every query of the Grafana dashboard in examples/grafana/.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import npcalls
from npcalls.layout import NOT_SET

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "examples" / "grafana" / "npcalls-dashboard.json"
CPS = 40.0
SIM_S = 24
HOST = "prom-test-host"
S = 1_000_000_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, pred, timeout: float = 30.0, every: float = 0.25):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = pred()
            if last:
                return last
        except (OSError, ValueError, KeyError, IndexError) as e:
            last = e
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


class Prom:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path: str, **params) -> dict:
        url = f"{self.base}{path}?{urllib.parse.urlencode(params, doseq=True)}"
        with urllib.request.urlopen(url, timeout=30) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list:
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self.get("/api/v1/query", **params)
        assert data["resultType"] == "vector", data
        return data["result"]

    def scalar(self, expr: str, at: float | None = None) -> float:
        res = self.query(expr, at)
        assert len(res) == 1, (expr, res)
        return float(res[0]["value"][1])


def start_exporter(table: str, port: int) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-m", "npcalls", "exporter", table, "--listen",
                          f"127.0.0.1:{port}", "--host", HOST, "--stuck-after", "1h"],
                         stderr=subprocess.PIPE, text=True)
    line = p.stderr.readline()
    assert "serving" in line, line + p.stderr.read()
    return p


def stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def test_real_prometheus_scrapes_the_exporter_and_evaluates_the_dashboard(tdir, tmp_path):
    prom_bin = shutil.which("prometheus")
    assert prom_bin, ("Debian's prometheus package is not installed: run "
                      "scripts/install-system-deps.sh (make test does)")
    name = "promtest"
    t = npcalls.CallTable.create(name, capacity=1 << 17)
    procs: list[subprocess.Popen] = []
    try:
        # One call whose BYE was lost: up for 5 hours, stuck at a 1-hour threshold.
        t.start("lost-bye@example.org", time.time_ns() - 5 * 3600 * S)
        exp_port, prom_port = free_port(), free_port()
        exporter = start_exporter(name, exp_port)
        procs.append(exporter)
        cfg = tmp_path / "prometheus.yml"
        cfg.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: npcalls\n    static_configs:\n"
            f"      - targets: ['127.0.0.1:{exp_port}']\n")
        prom_log = open(tmp_path / "prometheus.log", "w")
        prom = subprocess.Popen(
            [prom_bin, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
            stdout=prom_log, stderr=subprocess.STDOUT)
        procs.append(prom)
        api = Prom(prom_port)
        wait_for("Prometheus ready", lambda: urllib.request.urlopen(
            f"{api.base}/-/ready", timeout=5).status == 200, timeout=60)
        wait_for("the exporter scraped", lambda: api.query('up{job="npcalls"} == 1'), timeout=30)

        sim = subprocess.Popen(
            [sys.executable, "-m", "npcalls", "simulate", name, "--cps", str(CPS),
             "--mean-hold", "3s", "--duration", f"{SIM_S}s", "--workers", "1", "--seed", "12",
             "--on-exit", "leave", "--expire-after", "2s", "--quiet", "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(sim)
        sim_t0 = time.time()
        # Restart the exporter mid-run: its counters come from the table, so
        # Prometheus must see no counter reset.
        time.sleep(8)
        stop(exporter)
        exporter = start_exporter(name, exp_port)
        procs.append(exporter)
        out, err = sim.communicate(timeout=SIM_S + 120)
        assert sim.returncode == 0, err
        sim_t1 = time.time()

        # The table is still now (calls left up, no expiry): wait for a scrape of it.
        c = t.counters()
        snap = t.snapshot()
        active = int(np.count_nonzero((snap["start"] != NOT_SET) & (snap["end"] == NOT_SET)))
        sel = f'{{host="{HOST}", table="{name}"}}'
        wait_for("Prometheus to hold the final counters", lambda: api.query(
            f"npcalls_calls_ended_total{sel} == {c.n_stopped}"), timeout=30)
        time.sleep(1.5)                 # one more scrape: every series at its final value
        now = time.time()

        assert api.scalar(f"npcalls_active_calls{sel}", now) == active
        assert api.scalar(f"npcalls_calls_started_total{sel}", now) == c.n_started
        assert api.scalar(f"npcalls_calls_ended_total{sel}", now) == c.n_stopped
        assert api.scalar(f"npcalls_calls_removed_total{sel}", now) == c.n_removed
        assert c.n_removed > 0.5 * c.n_stopped          # expire really removed calls
        # every call that ended is in the histogram once, although most were expired
        assert api.scalar(f"npcalls_call_duration_seconds_count{sel}", now) == c.n_stopped
        assert api.scalar(f'npcalls_call_duration_seconds_bucket{{host="{HOST}", '
                          f'table="{name}", le="+Inf"}}', now) == c.n_stopped
        assert api.scalar(f"npcalls_stuck_calls{sel}", now) == 1
        assert api.scalar(f"npcalls_longest_active_call_seconds{sel}", now) >= 5 * 3600
        assert api.scalar(f"npcalls_table_capacity_slots{sel}", now) == t.capacity
        assert api.scalar(f"npcalls_table_calls{sel}", now) == len(t)
        span = f"{int(now - sim_t0) + 10}s"
        assert api.scalar(f"resets(npcalls_calls_started_total{sel}[{span}])", now) == 0
        assert api.scalar(f"resets(npcalls_call_duration_seconds_count{sel}[{span}])", now) == 0
        assert api.scalar(f"changes(npcalls_calls_started_total{sel}[{span}])", now) > 10

        # rate() of starts against the simulated rate, over 15 s inside the run
        at = sim_t1 - 2
        rate = api.scalar(f"rate(npcalls_calls_started_total{sel}[15s])", at)
        assert 0.7 * CPS <= rate <= 1.3 * CPS, rate

        check_dashboard(api, name, at, now, active, t)
    finally:
        for p in reversed(procs):
            stop(p)
        t.close()
        npcalls.CallTable.unlink(name)


def check_dashboard(api: Prom, table: str, during: float, end: float, active: int,
                    t: npcalls.CallTable) -> None:
    dash = json.loads(DASHBOARD.read_text())

    def expand(expr: str, host: str, tab: str) -> str:
        return (expr.replace("$host", host).replace("$table", tab)
                .replace("$__rate_interval", "10s"))

    # the template variables' label_values() queries find this host and table
    for var in dash["templating"]["list"]:
        if var["type"] != "query":
            continue
        metric, label = var["query"][len("label_values("):-1].split(", ")
        values = api.get(f"/api/v1/label/{label}/values", **{"match[]": metric})
        assert (HOST if label == "host" else table) in values, (var["query"], values)

    results: dict[str, dict[str, float]] = {}
    n = 0
    for panel in dash["panels"]:
        for target in panel["targets"]:
            for host, tab in ((HOST, table), (".*", ".*")):
                expr = expand(target["expr"], host, tab)
                res = api.query(expr, during)
                assert res, f"panel {panel['title']!r}: {expr} returned nothing"
                for r in res:
                    v = float(r["value"][1])
                    assert math.isfinite(v), (expr, r)
                results.setdefault(panel["title"], {})[target["refId"]] = float(
                    res[0]["value"][1])
                n += 1
    assert n >= 2 * 12

    def first(title: str, ref: str = "A", at: float | None = end) -> float:
        panel = next(p for p in dash["panels"] if p["title"].startswith(title))
        expr = expand(next(x for x in panel["targets"] if x["refId"] == ref)["expr"],
                      HOST, table)
        return api.scalar(expr, at)

    assert first("Active calls") == active
    assert 0.6 * CPS <= results["Calls per second"]["A"] <= 1.4 * CPS
    assert 0.6 * CPS <= results["Calls per second"]["B"] <= 1.4 * CPS
    q = results["Call duration quantiles"]
    # hold times are exponential with mean 3 s: median 2.1 s (28% of calls <= 1 s,
    # 81% <= 5 s), p90 6.9 s (96% <= 10 s), p99 13.8 s (99.3% <= 15 s: too close to
    # 99% for a 10 s window of ~400 calls, so p99 may land in the 15-30 s bucket)
    assert 1 <= q["A"] <= 5 and 5 <= q["B"] <= 10 and 10 <= q["C"] <= 30, q
    assert 1.5 <= results["Mean call duration"]["A"] <= 4.5
    assert first("Stuck calls") == 1
    assert first("Longest active call") >= 5 * 3600
    assert first("Table load") == pytest.approx(len(t) / t.capacity)
    assert first("Tables up") == 1
