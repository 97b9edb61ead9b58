#!/usr/bin/env python3
"""Core benchmark of npcalls: CallTable against a Python dict, pandas and LMDB.

Everything is measured in one run, on one set of realistic Call-IDs, at load
factor 0.5 (table capacity = 2 x keys), with 50% misses in the lookup batch:

* batch insert of N new keys with "first start wins" semantics;
* batch lookup of N keys, half of them absent, shuffled;
* single-operation latency (start / stop / get) against LMDB and a dict;
* bytes per slot, probe rounds per batch, probe lengths;
* the targets of issue 2, each with PASS/MISS computed from this run.

Run from the repository root::

    .venv/bin/python bench/bench_core.py            # 1M keys, 1-2 minutes on 2 cores
    .venv/bin/python bench/bench_core.py --quick    # 100k keys, smoke run
    .venv/bin/python bench/bench_core.py --json results.json

See bench/README.md for how to read the output.
"""

from __future__ import annotations

import argparse
import gc
import glob
import json
import os
import platform
import shutil
import signal
import statistics
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import npcalls  # noqa: E402
from npcalls import NOT_SET  # noqa: E402

try:
    import pandas as pd
except ImportError:  # pragma: no cover - the peer is skipped
    pd = None
try:
    import lmdb
except ImportError:  # pragma: no cover - the peer is skipped
    lmdb = None

perf = time.perf_counter
TS0 = 1_700_000_000_000_000_000          # 2023-11-14, ns since the epoch
BATCH_REPS = 3                           # batch ops: best of 3 (warm)
SINGLE_RUNS = 5                          # single ops: median of 5 runs
SINGLE_OPS_MAX = 100_000                 # ops per single-op run


# ---------------------------------------------------------------------- Call-IDs

_DOMAINS = ["atlanta.com", "biloxi.com", "chicago.com", "example.com", "sip.example.org",
            "voip.carrier-one.net", "ims.mnc001.mcc208.3gppnetwork.org"]
_HOSTS = ["sbc1.carrier.net", "pbx.example.com", "gw-02.voip.example", "edge.sip.example.org",
          "proxy3.operator.de"]
_ALNUM = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz0123456789", np.uint8)
# kind -> share of the keys; see _gen_batch for what each looks like
_KINDS = [("hex@pcN.domain", 0.25), ("uuid", 0.20), ("digits@ip", 0.15), ("uuid@host", 0.10),
          ("hex32@ip:port", 0.15), ("hex8x4@ip", 0.10), ("alnum (JsSIP)", 0.05)]


def _ips(rng: np.random.Generator, n: int) -> list[str]:
    o = rng.integers(0, 256, size=(n, 3)).tolist()
    net = rng.integers(0, 3, size=n).tolist()
    pre = ("10.", "172.16.", "192.168.")
    return [f"{pre[p]}{a}.{b}" if p == 2 else f"{pre[p]}{a}.{b}.{c}" if p == 0
            else f"172.{16 + (a & 15)}.{b}.{c}" for p, (a, b, c) in zip(net, o)]


def _uuids(rng: np.random.Generator, n: int) -> list[str]:
    a = rng.integers(0, 2**63, size=n, dtype=np.int64).tolist()
    b = rng.integers(0, 2**63, size=n, dtype=np.int64).tolist()
    return [f"{x >> 31:08x}-{(x >> 15) & 0xffff:04x}-4{x & 0xfff:03x}-"
            f"{0x8000 | ((y >> 48) & 0x3fff):04x}-{y & 0xffffffffffff:012x}" for x, y in zip(a, b)]


def _gen_batch(rng: np.random.Generator, n: int) -> list[str]:
    kind = rng.choice(len(_KINDS), size=n, p=[w for _, w in _KINDS])
    out: list[str] = [""] * n
    for k in range(len(_KINDS)):
        idx = np.flatnonzero(kind == k).tolist()
        m = len(idx)
        if not m:
            continue
        if k == 0:      # a84b4c76e66710@pc33.atlanta.com (RFC 3261 examples)
            h = rng.integers(0, 2**56, size=m, dtype=np.int64).tolist()
            pc = rng.integers(1, 1000, size=m).tolist()
            dom = rng.integers(0, len(_DOMAINS), size=m).tolist()
            s = [f"{x:014x}@pc{p}.{_DOMAINS[d]}" for x, p, d in zip(h, pc, dom)]
        elif k == 1:    # f81d4fae-7dec-41d0-a765-00a0c91e6bf6
            s = _uuids(rng, m)
        elif k == 2:    # 123@10.1.2.3 with a long enough counter: 20..32 bytes
            num = rng.integers(10**10, 10**16, size=m, dtype=np.int64).tolist()
            s = [f"{x}@{ip}" for x, ip in zip(num, _ips(rng, m))]
        elif k == 3:    # uuid@host
            host = rng.integers(0, len(_HOSTS), size=m).tolist()
            s = [f"{u}@{_HOSTS[h]}" for u, h in zip(_uuids(rng, m), host)]
        elif k == 4:    # Asterisk: 32 hex digits @ ip:port
            a = rng.integers(0, 2**63, size=m, dtype=np.int64).tolist()
            b = rng.integers(0, 2**63, size=m, dtype=np.int64).tolist()
            s = [f"{x:016x}{y:016x}@{ip}:5060" for x, y, ip in zip(a, b, _ips(rng, m))]
        elif k == 5:    # Cisco-like: 4 x 8 hex @ ip
            a = rng.integers(0, 2**32, size=(m, 4), dtype=np.int64).tolist()
            s = [f"{w:08x}-{x:08x}-{y:08x}-{z:08x}@{ip}" for (w, x, y, z), ip in zip(a, _ips(rng, m))]
        else:           # JsSIP-like: 20..26 random lowercase alphanumerics
            lens = rng.integers(20, 27, size=m)
            chars = _ALNUM[rng.integers(0, len(_ALNUM), size=(m, 26))]
            s = [bytes(row[:ln]).decode() for row, ln in zip(chars, lens.tolist())]
        for i, v in zip(idx, s):
            out[i] = v
    return out


def make_call_ids(count: int, seed: int) -> list[str]:
    """``count`` distinct, realistic Call-IDs of 20..60 bytes, deterministic from ``seed``."""
    rng = np.random.default_rng(seed)
    seen: dict[str, None] = {}
    while len(seen) < count:
        need = count - len(seen)
        seen.update(dict.fromkeys(_gen_batch(rng, need + need // 100 + 16)))
    keys = list(seen)[:count]
    lens = np.fromiter(map(len, keys), np.int64, len(keys))
    assert lens.min() >= 20 and lens.max() <= 60, (lens.min(), lens.max())
    return keys


# ---------------------------------------------------------------------- resources

class Resources:
    """Every table and LMDB environment this run creates, removed on any exit."""

    def __init__(self) -> None:
        self.prefix = f"bench-core-{os.getpid()}"
        self.count = 0
        self.tables: dict[str, Any] = {}
        self.envs: list[Any] = []
        self.dirs: list[str] = []

    def new_table(self, capacity: int) -> tuple[Any, str, float]:
        self.count += 1
        name = f"{self.prefix}-{self.count}"
        self.tables[name] = None          # registered before it exists: cleaned even if half-made
        t0 = perf()
        t = npcalls.CallTable.create(name, capacity, key_width=64)
        dt = perf() - t0
        self.tables[name] = t
        return t, name, dt

    def drop_table(self, name: str) -> None:
        t = self.tables.pop(name, None)
        if t is not None:
            t.close()
        try:
            npcalls.CallTable.unlink(name)
        except Exception:
            pass

    def new_lmdb(self) -> Any:
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        d = tempfile.mkdtemp(prefix=f"npcalls-{self.prefix}-lmdb-", dir=base)
        self.dirs.append(d)
        env = lmdb.open(d, map_size=16 << 30, writemap=True, sync=False, metasync=False,
                        max_dbs=0, readahead=False)
        self.envs.append(env)
        return env

    def cleanup(self) -> None:
        for name in list(self.tables):
            self.drop_table(name)
        for env in self.envs:
            try:
                env.close()
            except Exception:
                pass
        self.envs.clear()
        for d in self.dirs:
            shutil.rmtree(d, ignore_errors=True)
        self.dirs.clear()
        # anything left by an interrupted create (our own pid-tagged names only)
        shm = os.environ.get("NPCALLS_DIR") or "/dev/shm"
        for p in glob.glob(os.path.join(shm, f"npcalls.{self.prefix}-*")) + \
                glob.glob(os.path.join(shm, f".npcalls.{self.prefix}-*")):
            try:
                os.unlink(p)
            except OSError:
                pass


# ---------------------------------------------------------------------- timing

_TIMED = {"wall": 0.0, "cpu": 0.0}


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Run ``fn`` once with the cyclic GC off (as timeit does); (seconds, result).

    Also adds up wall and CPU time of every timed region: if other processes
    take the CPU away from this one, CPU/wall drops below 1 and the report says so.
    """
    gc.collect()
    gc.disable()
    try:
        c0 = time.process_time()
        t0 = perf()
        r = fn()
        dt = perf() - t0
        _TIMED["cpu"] += time.process_time() - c0
        _TIMED["wall"] += dt
        return dt, r
    finally:
        gc.enable()


def cpu_snapshot() -> tuple[float, float, float, float] | None:
    """(wall s, this process's CPU s, whole machine's busy CPU s, steal s), or None."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    user, nice, system, idle, iowait, irq, softirq, steal = (v + [0] * 8)[:8]
    t = os.times()
    return (perf(), t.user + t.system, (user + nice + system + irq + softirq) / hz, steal / hz)


def other_load(a: Any, b: Any) -> tuple[float, float] | None:
    """CPUs that other processes kept busy, and CPUs stolen by the host, between two snapshots."""
    if a is None or b is None or b[0] <= a[0]:
        return None
    wall = b[0] - a[0]
    return (max(0.0, (b[2] - a[2]) - (b[1] - a[1])) / wall, (b[3] - a[3]) / wall)


def git_state() -> str:
    """Commit of the npcalls checkout, read-only (GIT_OPTIONAL_LOCKS=0: no index refresh)."""
    import subprocess
    repo = os.path.dirname(os.path.dirname(os.path.abspath(npcalls.__file__)))
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")
    try:
        head = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"], env=env,
                              capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no",
                                "--", "npcalls"], env=env, capture_output=True, text=True,
                               timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"
    return (head or "?") + (" + uncommitted changes in npcalls/" if dirty else "")


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


class Bench:
    """Collects results for printing and JSON."""

    def __init__(self) -> None:
        self.batch: dict[str, dict[str, Any]] = {}
        self.single: dict[str, dict[str, Any]] = {}
        self.info: dict[str, Any] = {}

    def add_batch(self, section: str, label: str, times: list[float], n: int,
                  note: str = "", rounds: list[int] | None = None) -> float:
        best = min(times)
        self.batch.setdefault(section, {})[label] = {
            "seconds_best": best, "seconds_all": times, "keys": n, "keys_per_s": n / best,
            "note": note, "rounds": rounds}
        return best

    def rate(self, section: str, label: str) -> float | None:
        r = self.batch.get(section, {}).get(label)
        return r["keys_per_s"] if r else None


def say(msg: str = "") -> None:
    print(msg, flush=True)


def progress(msg: str) -> None:
    if sys.stderr.isatty():
        sys.stderr.write(f"\r\x1b[K  ... {msg}")
        sys.stderr.flush()


def progress_done() -> None:
    if sys.stderr.isatty():
        sys.stderr.write("\r\x1b[K")
        sys.stderr.flush()


# ---------------------------------------------------------------------- the benchmark

NPL, NPS = "npcalls start_many(list of str)", "npcalls start_many(S64 array)"
GML, GMS = "npcalls get_many(list of str)", "npcalls get_many(S64 array)"
DICT_LOOP = "dict: loop, if k not in d: d[k]=[t,NOT_SET]"
DICT_COMP = "dict comprehension {k: t ...} (no first-wins)"
DICT_ZIP = "dict(zip(keys, ts)) (no first-wins)"
PD_BUILD = "pandas Index(list, object) + hash table"
LMDB_PUT = "LMDB putmulti, 1 write txn (overwrite=False)"
DICT_GET = "dict: [d.get(k) for k in keys]"
PD_GET_L = "pandas get_indexer(list of str)"
PD_GET_I = "pandas get_indexer(prebuilt Index)"
LMDB_GET = "LMDB getmulti, 1 read txn"


@dataclass
class Keys:
    """The run's Call-IDs and timestamps, in every form the contenders take them."""

    n: int
    n_hit: int
    ins_b: list[bytes]          # the N inserted keys, as bytes (LMDB)
    ins: list[str]              # the same, as fresh str objects (npcalls list, dict, pandas)
    ins_s: np.ndarray           # the same, as an S64 array
    look: list[str]             # the lookup batch: N/2 hits and N/2 misses, shuffled
    look_b: list[bytes]
    look_s: np.ndarray
    expect_found: np.ndarray    # position p of the lookup batch holds a hit
    spare: list[str]            # never inserted by the batch tests: the single ops' new keys
    ts: np.ndarray              # the inserted keys' start times
    ts_list: list[int]


def make_keys(n: int, seed: int, B: Bench) -> Keys:
    """Generate the Call-IDs (recorded in ``B.info["keys"]``) and print what they look like."""
    n_hit = n // 2
    n_miss = n - n_hit
    progress("generating Call-IDs")
    t0 = perf()
    pool = make_call_ids(2 * n, seed)
    ins_b = [k.encode() for k in pool[:n]]
    ins = [k.decode() for k in ins_b]                # inserted by the batch tests (fresh objects)
    rng = np.random.default_rng(seed + 1)
    hit_idx = rng.choice(n, size=n_hit, replace=False)
    look = [ins[i] for i in hit_idx.tolist()] + pool[n:n + n_miss]
    perm = rng.permutation(n)
    # Fresh str objects, allocated in batch order, as if just parsed from a log:
    # references in random order to the old objects would make every consumer
    # of the list (numpy's conversion, dict, pandas) chase pointers across the
    # heap (~2x slower conversion), and would hand dict and pandas cached hashes.
    look_b = [look[i].encode() for i in perm.tolist()]
    look = [k.decode() for k in look_b]
    ts = TS0 + np.arange(n, dtype=np.int64) * 1000
    k = Keys(n=n, n_hit=n_hit, ins_b=ins_b, ins=ins, ins_s=np.array(ins, dtype="S64"),
             look=look, look_b=look_b, look_s=np.array(look, dtype="S64"),
             expect_found=(perm < n_hit),            # position p holds a hit iff perm[p] < n_hit
             spare=pool[n + n_miss:], ts=ts, ts_list=ts.tolist())
    del pool
    lens = np.fromiter(map(len, ins), np.int64, n)
    B.info["keys"] = {"n": n, "seed": seed, "min_len": int(lens.min()), "max_len": int(lens.max()),
                      "mean_len": float(lens.mean()), "generate_s": perf() - t0,
                      "mix": {kind: w for kind, w in _KINDS}}
    progress_done()
    say(f"keys: {n:,} Call-IDs for insert + {n_miss:,} absent ones for lookups, "
        f"{lens.min()}-{lens.max()} bytes (mean {lens.mean():.1f}), seed {seed}")
    say("      e.g. " + ", ".join(ins[:4]))
    say("      mix: " + ", ".join(f"{kind} {w:.0%}" for kind, w in _KINDS))
    say()
    return k


# ---- batch insert: each contender builds its structure of the N keys

def insert_npcalls(K: Keys, res: Resources, B: Bench) -> tuple[Any, Any]:
    """start_many cold, then warm (list and S64); returns the table kept for the next sections
    and its stats() right after the insert."""
    sec = "insert"
    n, cap = K.n, 2 * K.n
    # Cold: the very first start_many of this process on a brand-new table, with
    # nothing touched before it (fresh table pages and fresh numpy temporaries).
    progress("npcalls start_many, cold")
    t, name, create_s = res.new_table(cap)
    cold_s, started = timed(lambda: t.start_many(K.ins, K.ts))
    assert started.all() and len(t) == n
    cold_rounds = t.last_rounds
    res.drop_table(name)
    B.info["cold"] = {"start_many_list_s": cold_s, "create_s": create_s, "rounds": cold_rounds}

    main_name = None
    for label, keys in ((NPL, K.ins), (NPS, K.ins_s)):
        times, rounds = [], []
        for rep in range(BATCH_REPS):
            progress(f"{label} #{rep + 1}")
            t, name, _ = res.new_table(cap)
            t.stats()                       # reads every page: the table is mapped (warm)
            dt, started = timed(lambda: t.start_many(keys, K.ts))
            assert started.all() and len(t) == n, "start_many lost keys"
            times.append(dt)
            rounds.append(t.last_rounds)
            if label == NPS and rep == BATCH_REPS - 1:
                main_name = name            # kept for the lookups and single ops
            else:
                res.drop_table(name)
        B.add_batch(sec, label, times, n, "warm, pre-faulted new table each rep", rounds)
    T = res.tables[main_name]
    # first start wins: a repeated batch changes nothing and reports False
    m = min(n, 10_000)
    again = T.start_many(K.ins_s[:m], K.ts[:m] + 1)
    assert not again.any()
    return T, T.stats()


def insert_dicts(K: Keys, B: Bench) -> dict:
    """The dict with start_many's semantics (returned), then the cheapest dict builds."""
    sec = "insert"
    D: dict = {}
    times = []
    for rep in range(BATCH_REPS):
        progress(f"dict loop #{rep + 1}")
        D = {}
        gc.collect()

        def build() -> dict:
            d: dict = {}
            for k, v in zip(K.ins, K.ts_list):
                if k not in d:
                    d[k] = [v, NOT_SET]
            return d
        dt, D = timed(build)
        times.append(dt)
    assert len(D) == K.n
    B.add_batch(sec, DICT_LOOP, times, K.n, "same semantics as start_many")

    for label, fn in ((DICT_COMP, lambda: {k: v for k, v in zip(K.ins, K.ts_list)}),
                      (DICT_ZIP, lambda: dict(zip(K.ins, K.ts_list)))):
        times = []
        for rep in range(BATCH_REPS):
            progress(f"{label} #{rep + 1}")
            dt, d = timed(fn)
            del d
            times.append(dt)
        B.add_batch(sec, label, times, K.n, "cheapest dict builds")
    return D


def insert_pandas(K: Keys, B: Bench) -> Any:
    """An object Index and its hash table (returned; None without pandas)."""
    if pd is None:
        return None
    P = None
    times = []
    for rep in range(BATCH_REPS):
        progress(f"pandas Index build #{rep + 1}")
        P = None
        gc.collect()

        def pbuild() -> Any:
            idx = pd.Index(K.ins, dtype=object)
            assert idx.is_unique            # builds the engine's hash table
            return idx
        dt, P = timed(pbuild)
        times.append(dt)
    B.add_batch("insert", PD_BUILD, times, K.n, "no duplicate handling")
    return P


def insert_lmdb(K: Keys, res: Resources, B: Bench) -> Any:
    """putmulti in one write transaction; returns the environment (None without lmdb)."""
    if lmdb is None:
        return None
    n = K.n
    progress("LMDB: preparing items")
    vals = np.empty((n, 2), np.int64)
    vals[:, 0] = K.ts
    vals[:, 1] = NOT_SET
    vb = vals.tobytes()
    items = [(k, vb[16 * i:16 * i + 16]) for i, k in enumerate(K.ins_b)]
    env = res.new_lmdb()
    db = env.open_db()
    times = []
    for rep in range(BATCH_REPS):
        progress(f"LMDB putmulti #{rep + 1}")
        if rep:
            with env.begin(write=True) as txn:
                txn.drop(db, delete=False)

        def lput() -> tuple[int, int]:
            with env.begin(write=True) as txn:
                return txn.cursor().putmulti(items, dupdata=False, overwrite=False)
        dt, (consumed, added) = timed(lput)
        assert added == n, (consumed, added)
        times.append(dt)
    B.add_batch("insert", LMDB_PUT, times, n, "keys/values pre-encoded (not timed)")
    return env


# ---- batch lookup of N keys, half of them absent, in every structure built above

def lookup_all(K: Keys, T: Any, D: dict, P: Any, env: Any, B: Bench) -> None:
    """get_many (list and S64), dict get, pandas get_indexer, LMDB getmulti; results checked."""
    sec, n, n_hit = "lookup", K.n, K.n_hit
    for label, keys in ((GML, K.look), (GMS, K.look_s)):
        times, rounds = [], []
        for rep in range(BATCH_REPS):
            progress(f"{label} #{rep + 1}")
            dt, r = timed(lambda: T.get_many(keys))
            assert np.array_equal(r.found, K.expect_found), "get_many: wrong found mask"
            times.append(dt)
            rounds.append(T.last_rounds)
        B.add_batch(sec, label, times, n, "lock-free", rounds)

    times = []
    get = D.get
    for rep in range(BATCH_REPS):
        progress(f"dict get #{rep + 1}")
        dt, r = timed(lambda: [get(k) for k in K.look])
        assert sum(x is not None for x in r) == n_hit
        times.append(dt)
    B.add_batch(sec, DICT_GET, times, n)

    if P is not None:
        look_idx = pd.Index(K.look, dtype=object)
        for label, target in ((PD_GET_L, K.look), (PD_GET_I, look_idx)):
            times = []
            for rep in range(BATCH_REPS):
                progress(f"{label} #{rep + 1}")
                dt, r = timed(lambda: P.get_indexer(target))
                assert int((r >= 0).sum()) == n_hit
                times.append(dt)
            B.add_batch(sec, label, times, n, "index built beforehand")
        del look_idx

    if env is not None:
        times = []
        for rep in range(BATCH_REPS):
            progress(f"LMDB getmulti #{rep + 1}")

            def lget() -> list:
                with env.begin() as txn:
                    return txn.cursor().getmulti(K.look_b, dupdata=False)
            dt, r = timed(lget)
            assert len(r) == n_hit
            times.append(dt)
        B.add_batch(sec, LMDB_GET, times, n, "keys pre-encoded; returns found pairs only")
    progress_done()


# ---- single operations, ns/op: one call per event, the way a proxy worker records calls

def single_op_loops(T: Any, D: dict, env: Any) -> dict[str, Callable[[list], None]]:
    """One loop per (contender, operation), each calling the operation once per key."""
    def noop(k: Any, ts: Any = None) -> None:
        return None

    def loop_call(keys: list) -> None:
        f = noop
        for k in keys:
            f(k, TS0)

    def np_start(keys: list) -> None:
        f = T.start
        for k in keys:
            f(k, TS0)

    def np_stop(keys: list) -> None:
        f = T.stop
        for k in keys:
            f(k, TS0 + 1)

    def np_get(keys: list) -> None:
        f = T.get
        for k in keys:
            f(k)

    def d_start(keys: list) -> None:
        d = D
        for k in keys:
            if k not in d:
                d[k] = [TS0, NOT_SET]

    def d_stop(keys: list) -> None:
        g = D.get
        for k in keys:
            v = g(k)
            if v is not None and v[1] == NOT_SET:
                v[1] = TS0 + 1

    def d_get(keys: list) -> None:
        g = D.get
        for k in keys:
            g(k)

    pack, unpack = struct.Struct("<qq").pack, struct.Struct("<qq").unpack
    V0 = pack(TS0, NOT_SET)

    def l_put(keys: list) -> None:
        begin = env.begin
        for k in keys:
            with begin(write=True) as txn:
                txn.put(k, V0, overwrite=False)

    def l_stop(keys: list) -> None:
        begin = env.begin
        for k in keys:
            with begin(write=True) as txn:
                v = txn.get(k)
                if v is not None:
                    st, en = unpack(v)
                    if en == NOT_SET:
                        txn.put(k, pack(st, TS0 + 1))

    def l_get(keys: list) -> None:
        begin = env.begin
        for k in keys:
            with begin() as txn:
                txn.get(k)

    return {"loop_call": loop_call, "np_start": np_start, "np_stop": np_stop, "np_get": np_get,
            "d_start": d_start, "d_stop": d_stop, "d_get": d_get,
            "l_put": l_put, "l_stop": l_stop, "l_get": l_get}


def single_ops(K: Keys, T: Any, D: dict, env: Any, seed: int, B: Bench) -> int:
    """SINGLE_RUNS runs of fresh keys, each undone afterwards (load back to 0.5);
    medians in ``B.single``.  Returns the number of operations per run."""
    n = K.n
    m_single = max(1, min(SINGLE_OPS_MAX, n // 10))
    runs: dict[str, list[float]] = {}
    f = single_op_loops(T, D, env)

    def per_op(label: str, fn: Callable[[list], Any], keys: list) -> None:
        dt, _ = timed(lambda: fn(keys))
        runs.setdefault(label, []).append(dt / len(keys) * 1e9)

    srng = np.random.default_rng(seed + 2)
    for r in range(SINGLE_RUNS):
        progress(f"single ops, run {r + 1}/{SINGLE_RUNS}")
        new = K.spare[r * m_single:(r + 1) * m_single]
        hits = [K.ins[i].encode().decode()            # fresh objects, like a parsed message
                for i in srng.choice(n, size=len(new), replace=False).tolist()]
        per_op("loop + call overhead (no-op function)", f["loop_call"], new)
        per_op("npcalls start (new key, writer lock)", f["np_start"], new)
        per_op("npcalls stop (end unset, writer lock)", f["np_stop"], new)
        per_op("npcalls get (hit)", f["np_get"], hits)
        T.remove_many(new)          # back to load 0.5 (not timed)
        per_op("npcalls get (miss)", f["np_get"], new)
        per_op("dict start (if k not in d: insert)", f["d_start"], new)
        per_op("dict stop (get, check, set)", f["d_stop"], new)
        per_op("dict get (hit)", f["d_get"], hits)
        for k in new:
            del D[k]
        if env is not None:
            new_b = [k.encode() for k in new]
            hits_b = [k.encode() for k in hits]
            per_op("LMDB put (new key, own write txn)", f["l_put"], new_b)
            per_op("LMDB stop (get+put, own write txn)", f["l_stop"], new_b)
            per_op("LMDB get (hit, own read txn)", f["l_get"], hits_b)
            with env.begin(write=True) as txn:
                for k in new_b:
                    txn.delete(k)
    progress_done()
    for label, v in runs.items():
        B.single[label] = {"ns_median": statistics.median(v), "ns_all": v, "ops_per_run": m_single}
    return m_single


def record_table_info(st_after_insert: Any, st_end: Any, env: Any, m_single: int, B: Bench) -> None:
    """The table's shape after the insert and after the single ops; LMDB's size."""
    B.info["table"] = {
        "capacity": st_after_insert.capacity, "count": st_after_insert.count,
        "load_factor": st_after_insert.load_factor, "bytes_per_slot": st_after_insert.bytes_per_slot,
        "file_bytes": st_after_insert.file_bytes, "max_probe": st_after_insert.max_probe,
        "mean_probe": st_after_insert.mean_probe, "key_width": st_after_insert.key_width,
        "after_single_ops": {"count": st_end.count, "tombstones": st_end.tombstones,
                             "n_rebuilds": st_end.n_rebuilds, "max_probe": st_end.max_probe,
                             "mean_probe": st_end.mean_probe},
    }
    if env is not None:
        info = env.info()
        B.info["lmdb_bytes"] = (info["last_pgno"] + 1) * env.stat()["psize"]
    B.info["m_single"] = m_single


def run(n: int, seed: int, res: Resources, B: Bench) -> None:
    """The whole benchmark, in this order: keys, batch inserts, batch lookups, single ops."""
    K = make_keys(n, seed, B)
    T, st_after_insert = insert_npcalls(K, res, B)
    D = insert_dicts(K, B)
    P = insert_pandas(K, B)
    env = insert_lmdb(K, res, B)
    progress_done()
    lookup_all(K, T, D, P, env, B)
    m_single = single_ops(K, T, D, env, seed, B)
    record_table_info(st_after_insert, T.stats(), env, m_single, B)


# ---------------------------------------------------------------------- report

def _fmt_rate(r: float) -> str:
    return f"{r / 1e6:8.2f} M"


def _ratio(a: float | None, b: float | None) -> str:
    if not a or not b:
        return "-"
    return f"{a / b:.2f}x"


def report(B: Bench, n: int, elapsed: float) -> dict[str, Any]:
    ins, look = B.batch.get("insert", {}), B.batch.get("lookup", {})
    tbl = B.info["table"]
    W = 48

    def batch_table(title: str, rows: dict, ref_list: str, ref_s64: str) -> None:
        rl, rs = rows[ref_list]["keys_per_s"], rows[ref_s64]["keys_per_s"]
        say(title)
        say(f"  {'':{W}} {'best s':>8} {'keys/s':>10}  {'list/peer':>9} {'S64/peer':>9}  all runs (s)")
        for label, r in rows.items():
            mine = label in (ref_list, ref_s64)
            a = "-" if mine else _ratio(rl, r["keys_per_s"])
            b = "-" if mine else _ratio(rs, r["keys_per_s"])
            runs = " ".join(f"{x:.3f}" for x in r["seconds_all"])
            say(f"  {label:{W}} {r['seconds_best']:8.3f} {_fmt_rate(r['keys_per_s']):>10}  "
                f"{a:>9} {b:>9}  {runs}")
        say()

    say("=" * 100)
    say(f"npcalls core benchmark: {n:,} keys, load factor {tbl['load_factor']:.2f} "
        f"(capacity {tbl['capacity']:,}), 50% misses in lookups")
    say("=" * 100)
    say(f"machine: {os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}, "
        f"numpy {np.__version__}, pandas {getattr(pd, '__version__', 'absent')}, "
        f"py-lmdb {getattr(lmdb, '__version__', 'absent')}"
        + (f" (LMDB {'.'.join(map(str, lmdb.version()))})" if lmdb else ""))
    say(f"npcalls {npcalls.__version__} from {os.path.dirname(npcalls.__file__)}, git {B.info['git']}")
    say(f"timing: batch ops = best of {BATCH_REPS} runs on warm memory (a new table per run, "
        f"pre-faulted by stats());")
    say(f"        single ops = median of {SINGLE_RUNS} runs x {B.info['m_single']:,} ops, "
        f"Python loop included; cyclic GC off while timing")
    say("        ratios = npcalls keys/s / peer keys/s (list: npcalls fed a list of str; "
        "S64: a numpy S64 array)")
    say("        LMDB: writemap, no sync, env on /dev/shm; pandas: object-dtype Index")
    say()
    batch_table(f"BATCH INSERT of {n:,} new keys (first start wins)", ins, NPL, NPS)
    cold = B.info["cold"]
    warm_list = ins[NPL]["seconds_best"]
    say(f"  cold: the first start_many(list) of the process on a new table took {cold['start_many_list_s']:.3f} s"
        f" ({n / cold['start_many_list_s'] / 1e6:.2f} M keys/s, {cold['start_many_list_s'] / warm_list:.1f}x"
        f" the warm best);")
    say("        the table's pages and numpy's temporaries touched for the first time (slow on this VM;"
        " paid once).")
    say(f"        create() of the {tbl['file_bytes'] / 2**20:.0f} MiB table itself: "
        f"{cold['create_s'] * 1e3:.0f} ms")
    say()
    batch_table(f"BATCH LOOKUP of {n:,} keys (50% misses, shuffled)", look, GML, GMS)

    say(f"SINGLE OPERATIONS (ns/op, median of {SINGLE_RUNS})")
    say(f"  {'':{W}} {'ns/op':>8}   all runs")
    for label, r in B.single.items():
        runs = " ".join(f"{x:.0f}" for x in r["ns_all"])
        say(f"  {label:{W}} {r['ns_median']:8.0f}   {runs}")
    s = {lbl: r["ns_median"] for lbl, r in B.single.items()}
    say()

    say("TABLE AND PROBES")
    a = tbl["after_single_ops"]
    say(f"  bytes per slot          {tbl['bytes_per_slot']} (8-byte tag + {tbl['bytes_per_slot'] - 8}-byte row;"
        f" {2 * tbl['bytes_per_slot']} bytes per key at load 0.5); file {tbl['file_bytes'] / 2**20:.1f} MiB")
    if "lmdb_bytes" in B.info:
        say(f"  LMDB data in use        {B.info['lmdb_bytes'] / 2**20:.1f} MiB "
            f"({B.info['lmdb_bytes'] / n:.0f} bytes per key)")
    say(f"  probe length at {tbl['load_factor']:.2f}    max {tbl['max_probe']} buckets, "
        f"mean {tbl['mean_probe']:.4f} (1 = home bucket of 8 slots)")
    say(f"  probe rounds per batch  start_many(list) {ins[NPL]['rounds']}, "
        f"start_many(S64) {ins[NPS]['rounds']}, cold {cold['rounds']}")
    say(f"                          get_many(list) {look[GML]['rounds']}, get_many(S64) {look[GMS]['rounds']}")
    say(f"  after the single ops    count {a['count']:,}, tombstones {a['tombstones']}, "
        f"rebuilds {a['n_rebuilds']}, max probe {a['max_probe']}, mean {a['mean_probe']:.4f}")
    say()

    # ---- targets (issue 2) ----
    targets: list[dict[str, Any]] = []

    def target(what: str, value: float | None, op: str, limit: float, unit: str) -> None:
        if value is None:
            targets.append({"target": what, "value": None, "ok": None})
            return
        ok = value >= limit if op == ">=" else value <= limit
        targets.append({"target": what, "value": value, "op": op, "limit": limit, "unit": unit,
                        "ok": ok})

    def rate(sec: str, label: str) -> float | None:
        return B.rate(sec, label)

    def div(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    for lab, key in (("list", GML), ("S64", GMS)):
        target(f"get_many({lab}) >= 5 M keys/s", div(rate("lookup", key), 1e6), ">=", 5, "M keys/s")
    target("get_many(list) >= 2x pandas get_indexer(list)",
           div(rate("lookup", GML), rate("lookup", PD_GET_L)), ">=", 2, "x")
    target("get_many(S64) >= 2x pandas get_indexer(prebuilt Index)",
           div(rate("lookup", GMS), rate("lookup", PD_GET_I)), ">=", 2, "x")
    for lab, key in (("list", NPL), ("S64", NPS)):
        target(f"start_many({lab}) >= 3 M keys/s", div(rate("insert", key), 1e6), ">=", 3, "M keys/s")
    for lab, key in (("list", NPL), ("S64", NPS)):
        target(f"start_many({lab}) >= 1.5x dict build (same semantics)",
               div(rate("insert", key), rate("insert", DICT_LOOP)), ">=", 1.5, "x")
    target("single start() with writer lock <= 2.5 us",
           s.get("npcalls start (new key, writer lock)", 0) / 1e3, "<=", 2.5, "us")
    target("single get() <= 1 us", s.get("npcalls get (hit)", 0) / 1e3, "<=", 1.0, "us")
    target("start() >= 3x faster than LMDB single put",
           div(s.get("LMDB put (new key, own write txn)"), s.get("npcalls start (new key, writer lock)")),
           ">=", 3, "x")
    target("get() >= 3x faster than LMDB single get",
           div(s.get("LMDB get (hit, own read txn)"), s.get("npcalls get (hit)")), ">=", 3, "x")
    target("[info] start_many(S64) >= 1.5x cheapest dict build (dict(zip))",
           div(rate("insert", NPS), rate("insert", DICT_ZIP)), ">=", 1.5, "x")

    say("TARGETS (issue 2), from this run")
    for t in targets:
        if t["value"] is None:
            say(f"  {'n/a ':6} {t['target']:60} (peer not available)")
            continue
        v = t["value"]
        unit = t["unit"]
        val = f"{v:.3f} {unit}" if unit != "x" else f"{v:.3f}x"
        say(f"  {'PASS' if t['ok'] else 'MISS':6} {t['target']:60} {val:>14}")
    say()
    share = _TIMED["cpu"] / _TIMED["wall"] if _TIMED["wall"] else 1.0
    B.info["cpu_share"] = share
    B.info["loadavg_end"] = loadavg()
    ol = other_load(B.info.pop("_cpu0", None), cpu_snapshot())
    B.info["other_cpus_busy"], B.info["steal_cpus"] = ol if ol else (None, None)
    say(f"total run time {elapsed:.0f} s; load average at start {B.info['loadavg_start']}, "
        f"at end {B.info['loadavg_end']}")
    quiet = share >= 0.9 and (ol is None or ol[0] + ol[1] < 0.25)
    say(f"CPU time / wall time of the timed regions: {share:.2f}"
        + (f"; other processes kept {ol[0]:.2f} of {os.cpu_count()} CPUs busy, host steal {ol[1]:.2f}"
           if ol else ""))
    if not quiet:
        say("WARNING: this run shared the machine with other busy processes (or the host); "
            "its figures are pessimistic and noisy. Rerun on a quiet machine.")
    return {"n": n, "info": B.info, "batch": B.batch, "single": B.single, "targets": targets,
            "elapsed_s": elapsed,
            "env": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "numpy": np.__version__, "pandas": getattr(pd, "__version__", None),
                    "lmdb": getattr(lmdb, "__version__", None), "npcalls": npcalls.__version__}}


# ---------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=None, help="number of keys (default 1_000_000)")
    ap.add_argument("--quick", action="store_true", help="100k keys: a fast smoke run")
    ap.add_argument("--seed", type=int, default=20240601, help="seed of the Call-IDs")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    a = ap.parse_args(argv)
    n = a.n if a.n is not None else (100_000 if a.quick else 1_000_000)
    if n < 20:
        ap.error("--n must be at least 20")
    res = Resources()

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt
    old = signal.signal(signal.SIGTERM, on_term)
    B = Bench()
    B.info["loadavg_start"] = loadavg()
    B.info["git"] = git_state()
    B.info["_cpu0"] = cpu_snapshot()
    t0 = perf()
    try:
        run(n, a.seed, res, B)
        out = report(B, n, perf() - t0)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(out, f, indent=2, default=float)
            say(f"results written to {a.json}")
        return 0
    except KeyboardInterrupt:
        progress_done()
        say("interrupted: cleaning up")
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)     # cleanup must not be cut short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        res.cleanup()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, old)


if __name__ == "__main__":
    sys.exit(main())
