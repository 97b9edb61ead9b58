"""npcalls.protocol: the write protocol in one module, and the hot path's inlined copy of it.

``CallTable._write_one`` (start/stop; npcalls/single.py) keeps an inlined copy of
:func:`npcalls.protocol.set_field` and :func:`npcalls.protocol.publish_row`
for speed.  Here the same operations go once through the inlined path and
once through the reference (the general path, ``_write_one_locked``, built on
the protocol module) on two tables of the same seed, and the two files must
hold the same bytes: rows, tags and every counting word of the header.
"""

from __future__ import annotations

import ast
import inspect
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import xxhash

import npcalls
from npcalls import probe, protocol, single
from npcalls.keys import encode_key
from npcalls.layout import NOT_SET, W

_WORDS = ("count", "tombstones", "wseq", "n_started", "n_stopped", "n_removed",
          "dur_sum_us", "dur_bucket_0")


def _ops(n: int, seed: int) -> list[tuple[str, str, int]]:
    """A mixed sequence: starts, stops (some of unknown calls), repeats, removes."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = f"c{int(rng.integers(0, n // 3))}@h"
        r = rng.random()
        ts = int(rng.integers(1, 10**12))
        out.append(("start" if r < 0.45 else "stop" if r < 0.7 else "stop_ins" if r < 0.85
                    else "remove", k, ts))
    return out


def _reference_write(t: npcalls.CallTable, call_id: str, ts: int, col: int,
                     insert: bool) -> bool:
    field = encode_key(call_id, t.key_width, t._kf)
    tag = xxhash.xxh64_intdigest(field, t.seed)
    if tag < 2:
        tag += 2
    with t.locked():
        return t._write_one_locked(field, tag, ts, col, insert)


def _state(t: npcalls.CallTable) -> tuple:
    m = t._m
    return (m.tags.copy(), m.rowq.copy(), tuple(int(m.q[W[w]]) for w in _WORDS),
            tuple(int(x) for x in t.counters().duration_buckets))


@pytest.mark.parametrize("capacity", [64, 4096])
def test_inlined_single_write_writes_what_the_protocol_module_writes(make_table, capacity):
    # 64 slots: buckets fill, tombstones appear and get reused, the table is
    # rebuilt when they pile up (the fast path hands over to the general one)
    seed = 0x5EED5EED
    fast = make_table(capacity, key_width=16, seed=seed, auto_grow=True)
    ref = make_table(capacity, key_width=16, seed=seed, auto_grow=True)
    results = []
    for op, k, ts in _ops(3 * capacity, capacity):
        if op == "remove":
            results.append((fast.remove(k), ref.remove(k)))
            continue
        col = 1 if op == "start" else 2
        insert = op != "stop"
        a = fast.start(k, ts) if col == 1 else fast.stop(k, ts, insert_missing=insert)
        b = _reference_write(ref, k, ts, col, insert)
        results.append((a, b))
        assert a == b, (op, k)
    assert any(a for a, _ in results) and not all(a for a, _ in results)
    assert fast.capacity == ref.capacity
    sf, sr = _state(fast), _state(ref)
    assert np.array_equal(sf[0], sr[0])
    assert np.array_equal(sf[1], sr[1])
    assert sf[2:] == sr[2:]
    assert sf[2][0] > 0 and sf[2][4] > 0         # the comparison saw rows and ends


def test_hot_paths_unpack_the_single_key_view_by_its_field_names():
    """Every statement unpacking a SingleKeyView names its fields in order (``_`` to skip)."""
    fields = probe.SingleKeyView._fields
    checked = 0
    for mod in (single, probe):
        tree = ast.parse(inspect.getsource(mod))
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Tuple)):
                continue
            src = ast.unparse(node.value)
            if src not in ("self._fast", "fast"):
                continue
            names = [e.id for e in node.targets[0].elts]   # type: ignore[attr-defined]
            assert len(names) == len(fields), (mod.__name__, node.lineno)
            for got, want in zip(names, fields):
                assert got in ("_", want), (mod.__name__, node.lineno, got, want)
            checked += 1
    assert checked >= 3                 # _write_one, get, find_one


def test_operation_closes_only_a_completed_operation(make_table):
    t = make_table(64)
    t.start("a", 1)
    m = t._m
    w = int(m.q[W["wseq"]])
    with protocol.Operation(m.q, w) as seq_odd:
        assert seq_odd == w + 1 and m.q[W["wseq"]] == w + 1
    assert m.q[W["wseq"]] == w + 2
    with pytest.raises(RuntimeError):
        with protocol.Operation(m.q, w + 2):
            raise RuntimeError("mid-operation")
    assert m.q[W["wseq"]] == w + 3        # left odd: the next writer recovers
    before = t.counters().n_recoveries
    assert t.start("b", 2)
    assert t.counters().n_recoveries == before + 1
    assert t.get("a") == (1, NOT_SET) and t.get("b") == (2, NOT_SET)


def test_a_writer_dying_inside_an_operation_is_recovered_by_another_process(make_table):
    """The bracket left open by a process killed inside it: the next writer (this one) repairs."""
    t = make_table(64)
    t.start("kept", 5)
    code = textwrap.dedent(f"""
        import os, signal
        import npcalls
        from npcalls import protocol
        t = npcalls.CallTable.open({t.path!r})
        with t.locked():
            m, w = t._begin_locked()
            with protocol.Operation(m.q, w):
                slot = int(m.tags.argmax())          # the only live row
                m.q[protocol.row_word(m, slot)] = w + 1   # mid-row, as a crash leaves it
                os.kill(os.getpid(), signal.SIGKILL)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60,
                       env=dict(os.environ))
    assert r.returncode == -9, r.stderr
    assert t._m.q[W["wseq"]] & 1                   # the dead writer's operation is open
    assert t.stop("kept", 9)
    assert t.get("kept") == (5, 9)
    assert not t._m.q[W["wseq"]] & 1
    assert not (t._m.seqcol & np.uint64(1)).any()
    assert t.check().ok
