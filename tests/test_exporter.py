"""The Prometheus exporter over real HTTP: metrics against the tables, restarts, expire, CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

import npcalls
from npcalls.exporter import TableCollector, serve

S = 1_000_000_000


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of one GET /metrics."""
    with urllib.request.urlopen(url, timeout=30) as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def val(m: dict, name: str, table: str, host: str = "h1", **extra: str) -> float:
    return m[(name, tuple(sorted({"host": host, "table": table, **extra}.items())))]


def lab(path: str) -> str:
    """The table label: the file name without npcalls' "npcalls." prefix."""
    base = os.path.basename(path)
    assert base.startswith("npcalls.")
    return base[len("npcalls."):]


def fill(t: npcalls.CallTable, now: int) -> dict:
    """Known calls: 5 active (one up 5 hours: stuck), 4 ended with known durations, 1 end-only."""
    for i in range(4):
        t.start(f"active-{i}", now - (i + 1) * S)
    t.start("lost-bye", now - 5 * 3600 * S)
    durations = [0.5, 3, 45, 9000]
    for i, d in enumerate(durations):
        t.start(f"ended-{i}", now - 20_000 * S)
        t.stop(f"ended-{i}", now - 20_000 * S + int(d * S))
    t.stop("end-only", now, insert_missing=True)
    return {"active": 5, "durations": durations}


def test_metrics_match_the_tables_and_survive_expire_and_exporter_restarts(make_table):
    a = make_table(1024)
    b = make_table(4096)
    now = time.time_ns()
    fa = fill(a, now)
    b.start_many([f"b{i}" for i in range(30)], np.full(30, now - 10 * S))
    srv = serve([a.path, b.path, "no-such-table"], "127.0.0.1:0", host="h1",
                stuck_after_s=3600)
    la, lb = lab(a.path), lab(b.path)
    try:
        m = scrape(srv.url)
        assert val(m, "npcalls_table_up", la) == 1 and val(m, "npcalls_table_up", lb) == 1
        assert val(m, "npcalls_table_up", "no-such-table") == 0
        assert val(m, "npcalls_active_calls", la) == fa["active"]
        assert val(m, "npcalls_active_calls", lb) == 30
        assert val(m, "npcalls_calls_started_total", la) == 9
        assert val(m, "npcalls_calls_ended_total", la) == 5
        assert val(m, "npcalls_stuck_calls", la) == 1          # the 5-hour call
        assert val(m, "npcalls_stuck_calls", lb) == 0
        assert 5 * 3600 <= val(m, "npcalls_longest_active_call_seconds", la) < 5 * 3600 + 60
        assert val(m, "npcalls_table_calls", la) == len(a) == 10
        assert val(m, "npcalls_table_capacity_slots", lb) == b.capacity
        assert val(m, "npcalls_table_load_ratio", la) == pytest.approx(10 / a.capacity)
        # cumulative buckets: 0.5 -> le=1, 3 -> le=5, 45 -> le=60, 9000 -> +Inf
        assert val(m, "npcalls_call_duration_seconds_bucket", la, le="1") == 1
        assert val(m, "npcalls_call_duration_seconds_bucket", la, le="5") == 2
        assert val(m, "npcalls_call_duration_seconds_bucket", la, le="30") == 2
        assert val(m, "npcalls_call_duration_seconds_bucket", la, le="60") == 3
        assert val(m, "npcalls_call_duration_seconds_bucket", la, le="7200") == 3
        assert val(m, "npcalls_call_duration_seconds_bucket", la, le="+Inf") == 4
        assert val(m, "npcalls_call_duration_seconds_count", la) == 4
        assert val(m, "npcalls_call_duration_seconds_sum", la) == pytest.approx(sum(fa["durations"]))
        before = m
        # expire the ended calls between two scrapes: counters and histogram keep them
        assert a.expire(ended_before=now + S) == 5
        m = scrape(srv.url)
        for name in ("npcalls_calls_started_total", "npcalls_calls_ended_total",
                     "npcalls_call_duration_seconds_count", "npcalls_call_duration_seconds_sum"):
            assert val(m, name, la) == val(before, name, la)
        assert val(m, "npcalls_calls_removed_total", la) == 5
        assert val(m, "npcalls_table_calls", la) == 5
    finally:
        srv.close()
    # a new exporter process-state reads the same totals: they live in the table
    srv = serve([a.path], "127.0.0.1:0", host="h1")
    try:
        m2 = scrape(srv.url)
        for name in ("npcalls_calls_started_total", "npcalls_calls_ended_total",
                     "npcalls_call_duration_seconds_count"):
            assert val(m2, name, la) == val(m, name, la)
    finally:
        srv.close()


def test_exporter_follows_grow_and_reports_a_removed_table_then_its_successor(make_table, name):
    t = make_table(64, table_name=name)
    t.start("x", time.time_ns())
    col = TableCollector([name], host="h1")
    try:
        fams = {f.name: f for f in col.collect()}
        assert fams["npcalls_active_calls"].samples[0].value == 1
        t.grow(1024)
        fams = {f.name: f for f in col.collect()}
        assert fams["npcalls_table_capacity_slots"].samples[0].value == 1024
        assert fams["npcalls_table_rebuilds"].samples[0].value == 1
        t.close()
        npcalls.CallTable.unlink(name)
        fams = {f.name: f for f in col.collect()}
        assert fams["npcalls_table_up"].samples[0].value == 0
        assert "npcalls_active_calls" not in fams or not fams["npcalls_active_calls"].samples
        t2 = make_table(64, table_name=name)
        t2.start("y", time.time_ns())
        t2.start("z", time.time_ns())
        fams = {f.name: f for f in col.collect()}
        assert fams["npcalls_table_up"].samples[0].value == 1
        assert fams["npcalls_active_calls"].samples[0].value == 2
    finally:
        col.close()


def _start_cli(*args: str) -> tuple[subprocess.Popen, str]:
    p = subprocess.Popen([sys.executable, "-m", "npcalls", "exporter", *args],
                         stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = p.stderr.readline()
    assert "serving" in line, line + p.stderr.read()
    return p, line.rsplit(" on ", 1)[1].strip()


def test_cli_exporter_serves_until_sigterm(make_table):
    t = make_table(1024)
    t.start("a", time.time_ns())
    p, url = _start_cli(t.path, "--listen", "127.0.0.1:0", "--host", "cli-host")
    try:
        m = scrape(url)
        assert val(m, "npcalls_active_calls", lab(t.path), host="cli-host") == 1
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 0
        assert p.stdout.read() == ""
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.parametrize("args, msg", [
    (["--listen", "nonsense"], "HOST:PORT"),
    (["--listen", "127.0.0.1:99999"], "0..65535"),
    (["--stuck-after", "-5s"], "stuck-after"),
])
def test_cli_exporter_bad_arguments_exit_2_with_one_line(make_table, args, msg):
    t = make_table(64)
    r = subprocess.run([sys.executable, "-m", "npcalls", "exporter", t.path, *args],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert msg in r.stderr and "Traceback" not in r.stderr


def test_cli_exporter_port_in_use_is_a_one_line_error(make_table):
    t = make_table(64)
    p, url = _start_cli(t.path, "--listen", "127.0.0.1:0")
    try:
        port = url.split(":")[2].split("/")[0]
        r = subprocess.run([sys.executable, "-m", "npcalls", "exporter", t.path, "--listen",
                            f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2
        assert "cannot listen on" in r.stderr and "Traceback" not in r.stderr
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(30)


def test_importing_the_ops_modules_imports_no_heavy_dependency():
    code = ("import sys, npcalls, npcalls.exporter, npcalls.snapshots, npcalls.fleet, "
            "npcalls.cli.ops_cmds\n"
            "from npcalls.cli import build_parser; build_parser()\n"
            "bad = [m for m in ('prometheus_client', 'pyarrow', 'pandas', 'dask', 'distributed',"
            " 'duckdb') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("verb, module, extra", [
    ("exporter", "prometheus_client", "npcalls[exporter]"),
    ("export", "pyarrow", "npcalls[fleet]"),
])
def test_a_verb_whose_extra_is_missing_says_so_in_one_line(make_table, tmp_path, verb, module,
                                                           extra):
    t = make_table(64)
    code = (f"import sys\nsys.modules[{module!r}] = None\n"
            "from npcalls.cli import main\n"
            f"sys.exit(main([{verb!r}, {t.path!r}, '--to' if {verb!r} == 'export' else "
            f"'--listen', {str(tmp_path)!r} if {verb!r} == 'export' else '127.0.0.1:0']))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert extra in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def _hold_lock(path: str, ready, release) -> None:
    t = npcalls.CallTable.open(path)
    with t.locked():
        ready.set()
        release.wait(60)
    t.close()


def test_a_scrape_takes_no_lock_while_a_writer_holds_it(make_table):
    import multiprocessing as mp
    t = make_table(1024)
    t.start("a", time.time_ns())
    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold_lock, args=(t.path, ready, release))
    p.start()
    srv = serve([t.path], "127.0.0.1:0", host="h1")
    try:
        assert ready.wait(60)
        t0 = time.monotonic()
        m = scrape(srv.url)                     # would block if the scrape took the lock
        assert time.monotonic() - t0 < 10
        assert val(m, "npcalls_active_calls", lab(t.path)) == 1
        assert p.is_alive()                     # the writer still holds the lock
    finally:
        release.set()
        p.join(60)
        srv.close()
    assert p.exitcode == 0
