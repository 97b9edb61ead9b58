"""Crash-safety harness: writers killed at random instants, checked against a model.

A writer process applies random operations to a table and logs each one
twice, ``B`` (begun) before calling npcalls and ``E`` (ended) after the call
returned.  The parent SIGKILLs it, then replays the log into a dict model:
every operation with an ``E`` must be in the table; the one operation that
was in flight may have been applied to each key's fields or not (it never
returned), and nothing else may differ.  The model is then re-synchronised
with the table for the keys of that operation, and the next writer goes on.

Kills land two ways: at a random Python line inside npcalls (a trace
function counts line events in the package and kills the process itself;
this reaches every step between two stores of an operation), and on a timer
from the parent (which also lands inside numpy calls, mid-scatter).
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from typing import Any

import numpy as np

import npcalls
from npcalls import NOT_SET, CallTable

PKG_DIR = os.path.dirname(npcalls.__file__)
ABSENT = (NOT_SET, NOT_SET)


# ----------------------------------------------------------------------------- the writer

def random_op(rng: random.Random, pool: list[str], clock: int, capacity: int,
              mix: str = "mixed") -> list:
    """One random operation, as a JSON-able list (``mix="rebuild"``: mostly grow/compact)."""
    r = rng.random()
    if mix == "rebuild" and r < 0.6:
        return ["grow", capacity * 2] if capacity < 16384 and r < 0.3 else ["compact"]
    k = rng.choice(pool)
    n = rng.randint(1, 40)
    ks = [rng.choice(pool) for _ in range(n)]
    tss = [clock + i for i in range(n)]
    if r < 0.18:
        return ["start", k, clock]
    if r < 0.34:
        return ["stop", k, clock, rng.random() < 0.5]
    if r < 0.46:
        return ["start_many", ks, tss]
    if r < 0.58:
        return ["stop_many", ks, tss, rng.random() < 0.5]
    if r < 0.68:
        starts = [t if rng.random() < 0.7 else int(NOT_SET) for t in tss]
        ends = [t + 1 if rng.random() < 0.5 else int(NOT_SET) for t in tss]
        return ["record_many", ks, starts, ends]
    if r < 0.78:
        return ["remove", k]
    if r < 0.88:
        return ["remove_many", ks]
    if r < 0.97:
        cut = clock - rng.randint(0, 20_000)
        return ["expire", cut, cut if rng.random() < 0.3 else None]
    if r < 0.985 and capacity < 16384:
        return ["grow", capacity * 2]
    return ["compact"]


def apply_op(t: CallTable, op: list) -> None:
    name = op[0]
    if name == "start":
        t.start(op[1], op[2])
    elif name == "stop":
        t.stop(op[1], op[2], insert_missing=op[3])
    elif name == "start_many":
        t.start_many(op[1], np.array(op[2], np.int64))
    elif name == "stop_many":
        t.stop_many(op[1], np.array(op[2], np.int64), insert_missing=op[3])
    elif name == "record_many":
        t.record_many(op[1], np.array(op[2], np.int64), np.array(op[3], np.int64))
    elif name == "remove":
        t.remove(op[1])
    elif name == "remove_many":
        t.remove_many(op[1])
    elif name == "expire":
        t.expire(ended_before=op[1], started_before=op[2])
    elif name == "grow":
        t.grow(op[1])
    elif name == "compact":
        t.compact()
    else:
        raise ValueError(op)


def _install_line_killer(countdown: int) -> None:
    """SIGKILL this process at the countdown-th line executed inside npcalls."""
    left = [countdown]

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if not frame.f_code.co_filename.startswith(PKG_DIR):
            return None                     # do not trace frames outside npcalls
        if event == "line":
            left[0] -= 1
            if left[0] <= 0:
                os.kill(os.getpid(), signal.SIGKILL)
        return tracer

    sys.settrace(tracer)


def writer(path: str, log_path: str, gen: int, seed: int, line_kill: int | None,
           clock0: int, pool: list[str], crash_at: frozenset = frozenset(),
           mix: str = "mixed") -> None:
    """Body of a forked writer: random ops forever (until killed)."""
    import npcalls.crashpoints
    npcalls.crashpoints.CRASH_AT = crash_at
    rng = random.Random(seed)
    t = CallTable.open(path)
    log = open(log_path, "a", buffering=1)
    clock = clock0
    if line_kill:
        _install_line_killer(line_kill)
    for opid in range(1_000_000):
        op = random_op(rng, pool, clock, t.capacity, mix)
        clock += 100
        log.write(f"B {gen} {opid} {json.dumps(op)}\n")
        apply_op(t, op)
        log.write(f"E {gen} {opid}\n")


_CTX = None


def _context():
    """Writers are forked by a forkserver: a single-threaded parent by construction.

    Forking the test process itself would copy whatever threads earlier tests
    left running, and a lock one of them held would hang the child forever.
    """
    global _CTX
    if _CTX is None:
        import multiprocessing as mp
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(["numpy", "npcalls", "helpers.crashlib"])
    return _CTX


def fork_writer(*args: Any, **kw: Any) -> Any:
    p = _context().Process(target=writer, args=args, kwargs=kw, daemon=True)
    p.start()
    return p


def wait_dead(p: Any, timeout: float, what: str) -> bool:
    """Wait for a writer; True if it was killed, False if it exited normally."""
    p.join(timeout)
    if p.exitcode is None:
        p.kill()
        p.join()
        raise AssertionError(f"{what} neither died nor finished in {timeout} s")
    if p.exitcode == -signal.SIGKILL:
        return True
    if p.exitcode == 0:
        return False
    raise AssertionError(f"{what} exited with status {p.exitcode} instead of being killed "
                         "(an exception in the writer? see its traceback above)")


# ----------------------------------------------------------------------------- the model

def model_apply(model: dict, op: list) -> None:
    """Apply one operation to a dict Call-ID -> (start, end) with npcalls' semantics."""
    name = op[0]

    def set_fields(k: str, s: int, e: int, insert: bool) -> None:
        cur = model.get(k)
        if cur is None:
            if not insert:
                return
            cur = ABSENT
        ns = s if (s != NOT_SET and cur[0] == NOT_SET) else cur[0]
        ne = e if (e != NOT_SET and cur[1] == NOT_SET) else cur[1]
        model[k] = (ns, ne)

    if name == "start":
        set_fields(op[1], op[2], NOT_SET, True)
    elif name == "stop":
        set_fields(op[1], NOT_SET, op[2], op[3])
    elif name == "start_many":
        for k, s in zip(op[1], op[2]):
            set_fields(k, s, NOT_SET, True)
    elif name == "stop_many":
        for k, e in zip(op[1], op[2]):
            set_fields(k, NOT_SET, e, op[3])
    elif name == "record_many":
        for k, s, e in zip(op[1], op[2], op[3]):
            set_fields(k, s, e, True)
    elif name in ("remove", "remove_many"):
        for k in ([op[1]] if name == "remove" else op[1]):
            model.pop(k, None)
    elif name == "expire":
        eb, sb = op[1], op[2]
        for k, (s, e) in list(model.items()):
            if (e != NOT_SET and e < eb) or (sb is not None and e == NOT_SET
                                              and s != NOT_SET and s < sb):
                del model[k]


def cut_partial_line(log_path: str) -> None:
    """Drop a log line the killed writer did not finish, before the next writer appends."""
    with open(log_path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        back = min(size, 1 << 20)                  # a log line is far shorter than 1 MiB
        f.seek(size - back)
        tail = f.read()
        if tail and not tail.endswith(b"\n"):
            f.truncate(size - back + tail.rfind(b"\n") + 1)


def read_log(log_path: str, offset: int = 0) -> tuple[list[tuple[list, bool]], int]:
    """Operations logged from byte ``offset`` on, in order, each with whether it ended.

    Returns them and the offset after the last complete line, so that each
    kill's verification reads only what its writer wrote (the log grows to
    hundreds of MB over 10,000 kills).
    """
    ops: dict[tuple[int, int], list] = {}
    order: list[tuple[int, int]] = []
    ended: set[tuple[int, int]] = set()
    with open(log_path, "rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1                      # ignore a line cut by the kill
    for line in data[:end].decode().splitlines():
        parts = line.split(" ", 3)
        key = (int(parts[1]), int(parts[2]))
        if parts[0] == "B":
            ops[key] = json.loads(parts[3])
            order.append(key)
        else:
            ended.add(key)
    return [(ops[k], k in ended) for k in order], offset + end


def table_dict(t: CallTable) -> dict:
    snap = t.snapshot()
    return {k.decode(): (int(s), int(e)) for k, s, e in snap.tolist()}


def verify_after_kill(path: str, model: dict, new_ops: list[tuple[list, bool]]) -> dict:
    """Check a killed writer's table against the model; return the resynchronised model.

    Raises AssertionError naming the first difference.
    """
    in_flight = [op for op, done in new_ops if not done]
    assert len(in_flight) <= 1, f"more than one unfinished op: {in_flight}"
    for op, done in new_ops:
        if done:
            model_apply(model, op)
    after = dict(model)
    if in_flight:
        model_apply(after, in_flight[0])
    with CallTable.open(path) as t:
        # The lock must be free at once (the kernel dropped the dead writer's lock).
        with t.locked(timeout=10):
            report = t.check()
        assert report.ok, f"check found problems after a kill: {report}"
        actual = table_dict(t)
    for k in set(model) | set(after) | set(actual):
        b, a, got = model.get(k, ABSENT), after.get(k, ABSENT), actual.get(k, ABSENT)
        present_ok = (k in actual) in ((k in model), (k in after))
        fields_ok = got[0] in (b[0], a[0]) and got[1] in (b[1], a[1])
        assert present_ok and fields_ok, (
            f"key {k!r}: table has {got if k in actual else 'nothing'}, a completed history "
            f"gives {b if k in model else 'nothing'}"
            + (f" or, with the unfinished {in_flight[0][0]}, "
               f"{a if k in after else 'nothing'}" if in_flight else ""))
    return actual


def run_kills(path: str, log_path: str, kills: int, seed: int, pool_size: int = 1500,
              crash_points: tuple[str, ...] = (), mix: str = "mixed",
              max_line: int = 4000) -> dict:
    """Start writer after writer, kill each, verify each; returns counts of kill kinds."""
    rng = random.Random(seed)
    pool = [f"{i:x}-{rng.getrandbits(40):x}@10.0.{i % 250}.{i % 7}" for i in range(pool_size)]
    model: dict = {}
    consumed = 0
    stats = {"line": 0, "timer": 0, "point": 0, "exited": 0}
    clock = 10_000_000
    for gen in range(kills):
        how = rng.choice(("line", "timer")) if not crash_points else "point"
        line_kill = rng.randint(1, max_line) if how == "line" else None
        crash_at = frozenset([crash_points[gen % len(crash_points)]]) if crash_points else frozenset()
        p = fork_writer(path, log_path, gen, rng.getrandbits(32), line_kill, clock, pool,
                        crash_at, mix)
        clock += 100_000_000
        if how == "timer":
            time.sleep(rng.uniform(0.002, 0.06))
            p.kill()
        if not wait_dead(p, 60, f"writer {gen} ({how})"):
            raise AssertionError(f"writer {gen} ({how}) finished a million operations unkilled")
        stats[how] += 1
        if not os.path.exists(log_path):
            # a timer kill on a loaded machine can come before the first writer
            # even opened the log: it wrote nothing, the table must be as before
            open(log_path, "ab").close()
        cut_partial_line(log_path)
        new_ops, consumed = read_log(log_path, consumed)
        model = verify_after_kill(path, model, new_ops)
    return stats


# ----------------------------------------------------------------------------- line sweeps

def _sweep_child(path: str, log_path: str, gen: int, setup: list, op: list, kill_line: int) -> None:
    t = CallTable.open(path)
    log = open(log_path, "a", buffering=1)
    for i, s in enumerate(setup):
        log.write(f"B {gen} {i} {json.dumps(s)}\n")
        apply_op(t, s)
        log.write(f"E {gen} {i}\n")
    # Finish the previous victim's recovery untraced, so that the traced op runs
    # its normal path and the sweep walks that path's lines (random kills cover
    # kills during recovery).
    t.check(repair=True)
    log.write(f"B {gen} {len(setup)} {json.dumps(op)}\n")
    _install_line_killer(kill_line)
    apply_op(t, op)
    sys.settrace(None)
    log.write(f"E {gen} {len(setup)}\n")


def sweep(path: str, log_path: str, make_op: Any, stride: int = 1, max_kills: int = 2000,
          model: dict | None = None, consumed: int = 0, gen0: int = 0) -> tuple[int, dict, int]:
    """Kill ``make_op(k)``'s operation at its 1st, (1+stride)-th, ... line until it completes.

    ``make_op(k)`` returns ``(setup_ops, op)``; setup runs untraced.  Returns
    (kills, model, log bytes consumed) so sweeps can be chained on one table.
    """
    model = {} if model is None else model
    kills = 0
    line = 1
    gen = gen0
    while kills < max_kills:
        setup, op = make_op(line)
        p = _context().Process(target=_sweep_child, args=(path, log_path, gen, setup, op, line),
                               daemon=True)
        p.start()
        killed = wait_dead(p, 60, f"sweep writer for {op[0]} at line {line}")
        gen += 1
        cut_partial_line(log_path)
        new_ops, consumed = read_log(log_path, consumed)
        model = verify_after_kill(path, model, new_ops)
        if not killed:
            return kills, model, consumed               # ran to the end: every line was hit
        kills += 1
        line += stride
    raise AssertionError(f"{op[0]} still running after {max_kills} kill lines")
