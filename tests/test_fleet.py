"""Periodic Parquet snapshots (npcalls export) and the fleet queries on DuckDB and on Dask.

Three "hosts" (four tables) change between export runs of the real CLI, one
of them a periodic run ended by SIGTERM.  The expected answers are computed
from the tables themselves (their state at each export, latest wins), with
plain numpy; DuckDB and a distributed LocalCluster of worker processes must
both give exactly those answers.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

import npcalls
from npcalls import fleet
from npcalls.layout import NOT_SET
from npcalls.snapshots import FILE_RE, prune, snapshot_path

S = 1_000_000_000
MIN = 60 * S
HOSTS = {"pbx-a": ["calls"], "pbx-b": ["calls"], "pbx-c": ["calls", "trunk"]}
PATH_RE = re.compile(r"npcalls export: (\S+\.parquet): (\d+) calls")


def export_cli(tables: list[str], root: str, host: str, *extra: str) -> list[tuple[str, int]]:
    r = subprocess.run([sys.executable, "-m", "npcalls", "export", *tables, "--to", root,
                        "--host", host, *extra], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return [(m[1], int(m[2])) for m in PATH_RE.finditer(r.stderr)]


def snap_time(path: str) -> int:
    m = FILE_RE.match(os.path.basename(path))
    t = dt.datetime.strptime(m["ts"], "%Y%m%dT%H%M%S.%f").replace(tzinfo=dt.timezone.utc)
    return int(t.timestamp()) * S + t.microsecond * 1000


class Fleet:
    """The hosts' tables, and the expected latest row of every call that was exported."""

    def __init__(self, tdir: str) -> None:
        self.tables = {(h, n): npcalls.CallTable.create(f"{h}.{n}", capacity=1 << 14)
                       for h, names in HOSTS.items() for n in names}
        self.expected: dict[tuple[str, str, bytes], tuple[int, int, int]] = {}
        self.rng = np.random.default_rng(3)
        self.serial = 0

    def close(self) -> None:
        for t in self.tables.values():
            t.close()
            npcalls.CallTable.unlink(t.path)

    def traffic(self, now: int, n: int) -> None:
        """n new calls per table over the last 2 hours; end about half of those active."""
        for t in self.tables.values():
            keys = [f"call-{self.serial + i}@{os.path.basename(t.path)}" for i in range(n)]
            self.serial += n
            start = now - self.rng.integers(0, 7200 * S, n)
            t.start_many(keys, start)
            snap = t.snapshot()
            act = snap[(snap["start"] != NOT_SET) & (snap["end"] == NOT_SET)]
            ending = act[self.rng.random(len(act)) < 0.5]
            end = np.minimum(ending["start"] + self.rng.integers(S, 1800 * S, len(ending)), now)
            t.stop_many(ending["key"], end)
            t.stop_many([f"orphan-{self.serial}"], [now - 5 * S], insert_missing=True)
            self.serial += 1

    def exported(self, host: str, name: str, when: int) -> None:
        """Record the table's state as exported at ``when`` (the table did not change since)."""
        for row in self.tables[(host, name)].snapshot():
            self.expected[(host, name, row["key"])] = (int(row["start"]), int(row["end"]), when)

    def export_all(self, root: str, *extra: str) -> None:
        for host, names in HOSTS.items():
            out = export_cli([f"{host}.{n}" for n in names], root, host, *extra)
            assert len(out) >= len(names)
            for path, rows in out:
                name = FILE_RE.match(os.path.basename(path))["table"]
                tname = name.split(".", 1)[1]
                assert rows == len(self.tables[(host, tname)])
                self.exported(host, tname, snap_time(path))


def expected_answers(f: Fleet, day: str) -> dict:
    rows = sorted(f.expected.items())
    keys = [k for k, _ in rows]
    st = np.array([v[0] for _, v in rows], np.int64)
    en = np.array([v[1] for _, v in rows], np.int64)
    snap = np.array([v[2] for _, v in rows], np.int64)
    # active calls per host now: the final state of each table
    active = {}
    for (h, _), t in f.tables.items():
        s = t.snapshot()
        active[h] = active.get(h, 0) + int(np.count_nonzero((s["start"] != NOT_SET)
                                                            & (s["end"] == NOT_SET)))
    has = st != NOT_SET
    minutes, counts = np.unique(st[has] // MIN * MIN, return_counts=True)
    # peak: brute force over every instant a call starts or ends in the day
    d0, d1 = fleet.day_bounds(day)
    e_eff = np.where(en == NOT_SET, snap + 1, en)
    up = has & (e_eff > st)
    s_up, e_up = np.sort(st[up]), np.sort(e_eff[up])
    cand = np.unique(np.concatenate([[d0], s_up, e_up]))
    cand = cand[(cand >= d0) & (cand < d1)]
    value = (np.searchsorted(s_up, cand, side="right")
             - np.searchsorted(e_up, cand, side="right"))
    peak = int(value.max()) if len(value) else 0
    peak_at = int(cand[np.argmax(value == peak)]) if peak else None
    return {"keys": keys, "start": st, "end": en, "snap": snap, "active": active,
            "spm": dict(zip(minutes.tolist(), counts.tolist())), "peak": peak,
            "peak_at": peak_at}


def check(ans: fleet.FleetAnswers, exp: dict) -> None:
    lc = ans.latest_calls
    got_keys = list(zip(lc["host"], lc["table"].str.split(".", n=1).str[1],
                        lc["call_id"].str.encode("utf-8")))
    assert got_keys == exp["keys"]
    assert (lc["start"].to_numpy() == exp["start"]).all()
    assert (lc["end"].to_numpy() == exp["end"]).all()
    assert (lc["snapshot_time"].to_numpy() == exp["snap"]).all()
    assert ans.active_now.to_dict() == exp["active"]
    spm = {int(k.value): v for k, v in ans.started_per_minute.items()}
    assert spm == exp["spm"]
    assert ans.peak == exp["peak"] > 0
    assert ans.peak_at == pd.Timestamp(exp["peak_at"], unit="ns", tz="UTC")


@pytest.fixture
def fleet_dir(tdir, tmp_path):
    f = Fleet(tdir)
    root = str(tmp_path / "snapshots")
    try:
        now = time.time_ns()
        f.traffic(now - 60 * S, 300)
        f.export_all(root)
        f.traffic(time.time_ns(), 200)
        # Expire some ended calls: they stay in the fleet's answers with the
        # state of the last snapshot that held them.
        for t in f.tables.values():
            t.expire(ended_before=time.time_ns() - 1800 * S)
        # A periodic run (the service), ended by SIGTERM between snapshots.
        for host, names in HOSTS.items():
            p = subprocess.Popen([sys.executable, "-m", "npcalls", "export",
                                  *[f"{host}.{n}" for n in names], "--to", root, "--host", host,
                                  "--every", "1s", "--keep", "7d"],
                                 stderr=subprocess.PIPE, text=True)
            seen = []
            while len(seen) < 2 * len(names):
                line = p.stderr.readline()
                assert line, "npcalls export --every stopped early"
                m = PATH_RE.search(line)
                if m:
                    seen.append(m[1])
            p.send_signal(signal.SIGTERM)
            rest = p.stderr.read()
            assert p.wait(60) == 0, rest
            seen += [m[1] for m in PATH_RE.finditer(rest)]
            for path in seen:
                assert os.path.exists(path)
                tname = FILE_RE.match(os.path.basename(path))["table"].split(".", 1)[1]
                f.exported(host, tname, snap_time(path))
        f.traffic(time.time_ns(), 100)
        f.export_all(root)
        yield f, root
    finally:
        f.close()


def check_files(root: str) -> None:
    """Hive layout, columns and types, no temporary file left behind."""
    files = []
    for dirpath, _, names in os.walk(root):
        for n in names:
            assert not n.startswith("."), f"temporary file left behind: {n}"
            files.append(os.path.join(dirpath, n))
    assert len(files) >= 3 * 4
    for p in files:
        rel = os.path.relpath(p, root).split(os.sep)
        assert rel[0].startswith("host=") and rel[1].startswith("date=")
        t = pq.read_table(p)
        assert str(t.schema.field("start").type) == "timestamp[ns, tz=UTC]"
        assert str(t.schema.field("snapshot_time").type) == "timestamp[ns, tz=UTC]"
        df = t.to_pandas()
        assert set(df["host"]) == {rel[0][len("host="):]}
        assert set(df["date"]) == {rel[1][len("date="):]}
        assert (df["snapshot_time"] == df["snapshot_time"].iloc[0]).all()
        assert df["snapshot_time"].iloc[0].strftime("%Y-%m-%d") == rel[1][len("date="):]
        assert set(df["state"]) <= {"active", "ended", "end-only", "empty"}


def test_export_runs_then_duckdb_and_dask_cluster_agree_with_each_other_and_the_tables(
        fleet_dir):
    from distributed import Client, LocalCluster
    f, root = fleet_dir
    check_files(root)
    day = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    exp = expected_answers(f, day)
    if exp["peak"] == 0:            # run just after midnight UTC: all calls were yesterday
        day = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=1)).strftime("%Y-%m-%d")
        exp = expected_answers(f, day)
    t0 = time.perf_counter()
    duck = fleet.duckdb_queries(root, day)
    t_duck = time.perf_counter() - t0
    check(duck, exp)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        pids = set(client.run(os.getpid).values())
        assert len(pids) == 2 and os.getpid() not in pids      # real worker processes
        t0 = time.perf_counter()
        dsk = fleet.dask_queries(root, day, client)
        t_dask = time.perf_counter() - t0
    check(dsk, exp)
    pd.testing.assert_frame_equal(duck.latest_calls, dsk.latest_calls)
    pd.testing.assert_series_equal(duck.active_now, dsk.active_now)
    pd.testing.assert_series_equal(duck.started_per_minute, dsk.started_per_minute)
    print(f"fleet queries: DuckDB {t_duck:.2f} s, Dask (2 worker processes) {t_dask:.2f} s")


def test_prune_keeps_recent_files_and_other_hosts_files(tmp_path):
    root = str(tmp_path)
    now = time.time_ns()
    old = snapshot_path(root, "h1", "calls", now - 8 * 86400 * S)
    new = snapshot_path(root, "h1", "calls", now - 3600 * S)
    other = snapshot_path(root, "h2", "calls", now - 30 * 86400 * S)
    dead_tmp = os.path.join(os.path.dirname(new), ".x.parquet.tmp-999999999")
    for p in (old, new, other, dead_tmp):
        os.makedirs(os.path.dirname(p), exist_ok=True)
        open(p, "wb").close()
    removed = prune(root, 7 * 86400 * S, host="h1", now_ns=now)
    assert sorted(removed) == sorted([old, dead_tmp])
    assert os.path.exists(new) and os.path.exists(other)
    assert not os.path.exists(os.path.dirname(old))       # empty date directory removed


@pytest.mark.parametrize("args, msg", [
    (["--every", "0s"], "must be positive"),
    (["--keep", "soon"], "cannot read duration"),
    (["--host", "a/b"], "cannot name"),
])
def test_export_cli_bad_arguments_exit_2(tdir, tmp_path, args, msg):
    npcalls.CallTable.create("x", capacity=64).close()
    r = subprocess.run([sys.executable, "-m", "npcalls", "export", "x", "--to",
                        str(tmp_path), *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert msg in r.stderr and "Traceback" not in r.stderr


def test_export_cli_missing_table_is_an_error_once_and_retried_as_a_service(tdir, tmp_path):
    r = subprocess.run([sys.executable, "-m", "npcalls", "export", "nope", "--to",
                        str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "nope" in r.stderr and "Traceback" not in r.stderr
    p = subprocess.Popen([sys.executable, "-m", "npcalls", "export", "later", "--to",
                          str(tmp_path), "--every", "0.3s", "--host", "h"],
                         stderr=subprocess.PIPE, text=True)
    try:
        assert "later" in p.stderr.readline()          # not there yet: reported, kept going
        t = npcalls.CallTable.create("later", capacity=64)
        t.start("c1")
        while True:
            line = p.stderr.readline()
            assert line
            if PATH_RE.search(line):
                break
        t.close()
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(60) == 0


def test_fleet_example_runs_and_both_engines_agree(tmp_path):
    ex = os.path.join(os.path.dirname(__file__), "..", "examples", "fleet", "fleet_example.py")
    r = subprocess.run([sys.executable, ex, "--hours", "0.5", "--out", str(tmp_path / "s")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "DuckDB and Dask agree on all four answers" in r.stdout
    m = re.search(r"3 hosts, ([\d,]+) calls .* ([\d,]+) rows", r.stdout)
    calls, rows = int(m[1].replace(",", "")), int(m[2].replace(",", ""))
    assert calls > 5000 and rows > calls        # calls appear in several snapshots
    m = re.search(r"latest row per call: ([\d,]+) calls", r.stdout)
    assert int(m[1].replace(",", "")) == calls  # every call was caught by some snapshot


def test_sigterm_at_random_instants_never_leaves_a_partial_or_temporary_file(tdir, tmp_path):
    t = npcalls.CallTable.create("big", capacity=1 << 18)
    try:
        now = time.time_ns()
        t.start_many([f"c{i}" for i in range(60_000)], np.full(60_000, now - 60 * S))
        rng = np.random.default_rng(5)
        root = str(tmp_path / "s")
        for run in range(3):
            p = subprocess.Popen([sys.executable, "-m", "npcalls", "export", "big", "--to", root,
                                  "--every", "0.2s", "--host", "h"],
                                 stderr=subprocess.PIPE, text=True)
            assert PATH_RE.search(p.stderr.readline())     # at least one snapshot is done
            time.sleep(float(rng.uniform(0, 0.6)))         # then anywhere in a later one
            p.send_signal(signal.SIGTERM)
            p.stderr.read()
            assert p.wait(120) == 0
        files = [os.path.join(dp, f) for dp, _, fs in os.walk(root) for f in fs]
        assert files and not [f for f in files if os.path.basename(f).startswith(".")]
        for f in files:
            assert pq.read_metadata(f).num_rows == 60_000
    finally:
        t.close()
        npcalls.CallTable.unlink("big")
