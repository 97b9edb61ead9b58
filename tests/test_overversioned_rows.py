"""Rows versioned above the header's writer sequence (issue 9, item 6).

A plain ``cp`` of a live table copies the header before the rows, so rows
written during the copy carry versions the copied header never reached; a
hostile file can do the same on purpose.  Lock-free readers accept a row only
when its version proves no writer was changing it, so such a row used to make
``get_many``, ``snapshot`` and iteration spin forever, and ``check`` said ok.

Every reader runs in a subprocess with a timeout: a hang fails the test
instead of hanging the suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from npcalls import NOT_SET, CallTable
from npcalls.layout import W

HERE = os.path.dirname(__file__)
READER_TIMEOUT = float(os.environ.get("NPCALLS_TEST_READER_TIMEOUT", 60))  # a hang is forever

# Runs every reader API on a table and prints one JSON line per API, so that a
# hang shows which API hung.
READERS = r"""
import json, sys, time
import numpy as np
import npcalls
from npcalls import analysis
jobs, keys = json.loads(sys.argv[1]), json.loads(sys.argv[2])
for n, (path, mode) in enumerate(jobs):
    def out(api, value):
        print(json.dumps({"job": n, "api": api, "value": value}), flush=True)
    t = npcalls.CallTable.open(path, readonly=mode == "ro")
    if mode == "repair":
        out("repair", t.check(repair=True).ok)
    out("get", [list(t.get(k)) if t.get(k) else None for k in keys])
    out("in", [k in t for k in keys])
    s, e, f = t.get_many(keys)
    out("get_many", [[int(a), int(b), bool(c)] for a, b, c in zip(s, e, f)])
    big = keys * 3000                      # several CHUNKs of the vectorized path
    s, e, f = t.get_many(big)
    out("get_many_big", bool(f.all()) if len(keys) else True)
    out("contains_many", t.contains_many(keys).tolist())
    snap = t.snapshot()
    out("snapshot", sorted([k.decode(), int(a), int(b)] for k, a, b in
                           zip(snap["key"], snap["start"], snap["end"])))
    out("iter", sorted(t))
    out("stats", t.stats().count)
    out("to_pandas", len(analysis.to_pandas(t)))
    r = t.check()
    out("check", {"ok": r.ok, "problems": r.problems})
    out("done", True)
    t.close()
"""


def run_readers_jobs(jobs: list[tuple[str, str]], keys: list[str]) -> list[dict]:
    """Run every reader API on each (path, mode) job in one subprocess; mode ro, rw or repair."""
    try:
        p = subprocess.run([sys.executable, "-c", READERS, json.dumps(jobs), json.dumps(keys)],
                           capture_output=True, text=True, timeout=READER_TIMEOUT * len(jobs))
    except subprocess.TimeoutExpired as e:
        seen = [(json.loads(x)["job"], json.loads(x)["api"])
                for x in (e.stdout or b"").decode().splitlines() if x]
        raise AssertionError(f"a reader hung; (job, API) finished before the hang: "
                             f"{seen[-3:]} of jobs {jobs}") from None
    assert p.returncode == 0, p.stderr
    res: list[dict] = [{} for _ in jobs]
    for line in p.stdout.splitlines():
        d = json.loads(line)
        res[d["job"]][d["api"]] = d["value"]
    assert all(r.get("done") for r in res), (p.stdout, p.stderr)
    return res


def run_readers(path: str, readonly: bool, keys: list[str]) -> dict:
    return run_readers_jobs([(path, "ro" if readonly else "rw")], keys)[0]


def words(path: str) -> np.memmap:
    return np.memmap(path, np.uint64, "r+")


def live_seq_words(path: str, t: CallTable) -> tuple[np.memmap, np.ndarray]:
    """The mapped file as uint64 words, and the word index of each live row's seq."""
    g = t._g
    q = words(path)
    tags = q[g.tags_offset // 8: g.tags_offset // 8 + g.capacity]
    live = np.flatnonzero(tags >= 2)
    return q, (g.rows_offset + live * g.row_size) // 8


CALLS = {f"call-{i}@example.org": (1000 + i, 2000 + i if i % 2 else NOT_SET) for i in range(40)}


@pytest.fixture
def crafted(tmp_path):
    """A closed table file holding CALLS, and a function that versions some rows above wseq."""
    path = str(tmp_path / "hostile.npcalls")
    t = CallTable.create(path, 256)
    for k, (s, e) in CALLS.items():
        t.start(k, s)
        if e != NOT_SET:
            t.stop(k, e)
    t.close()

    def craft(case: str) -> None:
        with CallTable.open(path, readonly=True) as ro:
            q, seqw = live_seq_words(path, ro)
        w = int(q[W["wseq"]])
        assert w % 2 == 0
        pick = seqw[::3]
        if case == "even":
            q[pick] = w + 10
        elif case == "odd":
            q[pick] = w + 11
        elif case == "huge":
            q[pick] = np.uint64(2**64 - 2)
        elif case == "stuck-odd-below":        # odd, below an even wseq: no writer did this
            q[pick] = max(w - 1, 1) | 1
        elif case == "wseq-odd-rows-above":    # a copied header caught mid-operation
            q[W["wseq"]] = w + 1
            q[pick] = w + 7
        q.flush()
        del q

    return path, craft


CASES = ["even", "odd", "huge", "stuck-odd-below", "wseq-odd-rows-above"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("readonly", [True, False], ids=["ro", "rw"])
def test_readers_answer_from_overversioned_rows_and_never_hang(crafted, case, readonly):
    path, craft = crafted
    craft(case)
    keys = list(CALLS) + ["absent@example.org"]
    r = run_readers(path, readonly, keys)
    want = [list(v) for v in CALLS.values()] + [None]
    assert r["get"] == want
    assert r["in"] == [True] * len(CALLS) + [False]
    assert r["get_many"] == [[s, e, True] for s, e in CALLS.values()] + [[NOT_SET, NOT_SET, False]]
    assert r["get_many_big"] is False          # the absent key is in there
    assert r["contains_many"] == [True] * len(CALLS) + [False]
    assert r["snapshot"] == sorted([k, s, e] for k, (s, e) in CALLS.items())
    assert r["iter"] == sorted(CALLS)
    assert r["to_pandas"] == len(CALLS)
    # check reports them, read-only and writable, even and odd
    assert not r["check"]["ok"], r["check"]
    assert any("above the writer sequence" in p or "mid-write" in p
               for p in r["check"]["problems"]), r["check"]


@pytest.mark.parametrize("case", CASES)
def test_check_repair_fixes_overversioned_rows(crafted, case):
    path, craft = crafted
    craft(case)
    cli = [sys.executable, "-m", "npcalls", "check"]
    p = subprocess.run(cli + [path], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert "above the writer sequence" in p.stdout + p.stderr or "mid-write" in p.stdout + p.stderr
    p = subprocess.run(cli + ["--repair", path], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, (p.stdout, p.stderr)
    p = subprocess.run(cli + [path], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, (p.stdout, p.stderr)
    with CallTable.open(path, readonly=True) as ro:
        q, seqw = live_seq_words(path, ro)
        w = int(q[W["wseq"]])
        assert w % 2 == 0 and (q[seqw] <= w).all() and not (q[seqw] & np.uint64(1)).any()
        del q
        assert ro.check().ok
        snap = ro.snapshot()
        assert {k.decode(): (int(a), int(b)) for k, a, b in
                zip(snap["key"], snap["start"], snap["end"])} == CALLS
    # the repaired table keeps working for writers and lock-free readers
    with CallTable.open(path) as t:
        assert t.start("after-repair", 5)
        assert t.get_many(["after-repair"] + list(CALLS)).found.all()


WRITER = r"""
import sys, time
import numpy as np
import npcalls
t = npcalls.CallTable.open(sys.argv[1])
print("ready", flush=True)
i = 0
keys = np.array([f"w-{j}@h".encode() for j in range(20000)])
while True:
    k = keys[(np.arange(2000) + i * 2000) % len(keys)]
    t.start_many(k, np.full(len(k), i + 1, np.int64))
    t.stop_many(k, np.full(len(k), i + 2, np.int64))
    t.remove_many(k[::2])
    i += 1
"""


N_COPIES = 12


def test_cp_of_a_live_table_never_hangs_readers_and_check_sees_what_the_copy_holds(
        make_table, tmp_path):
    """`cp` of a table while a writer process runs, N_COPIES times: every copy is readable in
    bounded time, and check reports exactly the copies whose rows outran their header."""
    t = make_table(65536)
    t.start_many([f"w-{j}@h" for j in range(20000)], 1)
    w = subprocess.Popen([sys.executable, "-c", WRITER, t.path], stdout=subprocess.PIPE,
                         text=True)
    try:
        assert w.stdout.readline().strip() == "ready"
        time.sleep(0.3)
        copies = []
        for i in range(N_COPIES):
            c = str(tmp_path / f"copy-{i}.npcalls")
            subprocess.run(["cp", t.path, c], check=True, timeout=60)
            copies.append(c)
        assert w.poll() is None, "the writer died"
    finally:
        w.kill()
        w.wait(10)
    sample = [f"w-{j}@h" for j in range(0, 20000, 97)]
    g = t._g
    over = []
    for c in copies:
        q = np.fromfile(c, np.uint64)
        wseq = int(q[W["wseq"]])
        seq = q[g.rows_offset // 8:].reshape(g.capacity, g.row_size // 8)[:, 0]
        over.append(int(np.count_nonzero(seq > wseq + (wseq & 1))))
    jobs = [(c, "ro") for c in copies] + [(c, "repair") for c in copies]
    res = run_readers_jobs(jobs, sample)
    for c, n_over, r in zip(copies, over, res):
        if n_over:
            assert not r["check"]["ok"], (c, r["check"])
            assert any("above the writer sequence" in p for p in r["check"]["problems"]), r
        else:
            assert not any("above the writer sequence" in p for p in r["check"]["problems"])
    for c, r in zip(copies, res[len(copies):]):
        assert r["repair"] and r["check"]["ok"], (c, r["check"])
    print(f"{sum(x > 0 for x in over)} of {len(copies)} copies held rows versioned above "
          "their header")
