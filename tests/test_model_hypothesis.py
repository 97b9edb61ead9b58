"""Property tests: random sequences of single and batch operations match a plain dict."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from npcalls import NOT_SET, BatchKeyError, CallTable, TableFullError

KW = 13
POOL = [f"c{i}@h" for i in range(36)] + ["é@x", "x" * KW, "y" * (KW - 1) + "z"]
BAD_KEYS = ["", "x" * (KW + 1), "a\0b", "é" * 7]       # "é" * 7 is 14 UTF-8 bytes

valid_keys = st.sampled_from(POOL).flatmap(lambda k: st.sampled_from([k, k.encode()]))
batch_keys = st.lists(st.one_of(valid_keys, valid_keys, valid_keys, valid_keys, valid_keys,
                                valid_keys, valid_keys, st.sampled_from(BAD_KEYS)),
                      max_size=30)
times = st.integers(min_value=-10**9, max_value=10**15)
maybe_times = st.one_of(st.just(NOT_SET), times)
forms = st.sampled_from(["list", "S", "U", "object"])


def as_form(keys: list, form: str):
    if form == "S":
        return np.array([k.encode() if isinstance(k, str) else k for k in keys] or [b""],
                        dtype="S40")[:len(keys)]
    if form == "U":
        return np.array([k if isinstance(k, str) else k.decode() for k in keys] or [""],
                        dtype="U40")[:len(keys)]
    if form == "object":
        return np.array(keys + [None], dtype=object)[:-1]
    return list(keys)


def kb(k) -> bytes:
    return k.encode() if isinstance(k, str) else bytes(k)


def is_bad(k) -> bool:
    b = kb(k)
    return not 0 < len(b) <= KW or b"\0" in b


def limit_of(capacity: int, max_load: float = 0.75) -> int:
    cap = (capacity + 7) // 8 * 8
    return cap * int(round(max_load * 1e6)) // 1_000_000


class TableMachine(RuleBasedStateMachine):
    """The table under random operations, checked against ``model`` after every step."""

    CAPACITY = 32
    AUTO_GROW = False

    def __init__(self) -> None:
        super().__init__()
        self.name = f"hyp-{uuid.uuid4().hex[:12]}"
        self.t = CallTable.create(self.name, self.CAPACITY, KW, auto_grow=self.AUTO_GROW)
        self.ro = CallTable.open(self.name, readonly=True)
        self.model: dict[bytes, tuple[int, int]] = {}
        self.capacity = (self.CAPACITY + 7) // 8 * 8
        self.started = 0
        self.stopped = 0

    def teardown(self) -> None:
        self.t.close()
        self.ro.close()
        CallTable.unlink(self.name)

    # -- helpers

    @property
    def limit(self) -> int:
        return limit_of(self.capacity)

    def would_overflow(self, new_keys: set[bytes]) -> bool:
        if self.AUTO_GROW:
            return False
        return len(self.model) + len(new_keys) > self.limit

    def expect_full(self, call) -> None:
        before = dict(self.model)
        with pytest.raises(TableFullError) as ei:
            call()
        assert ei.value.count == len(before) and ei.value.capacity == self.capacity
        assert self.snapshot(self.t) == before

    @staticmethod
    def snapshot(t: CallTable) -> dict:
        s = t.snapshot()
        out = {bytes(k): (int(a), int(b)) for k, a, b in zip(s["key"], s["start"], s["end"])}
        assert len(out) == len(s), "duplicate rows in snapshot"
        return out

    def run_batch(self, call, keys: list):
        """Run a batch call; check the bad positions it reports; return its result."""
        bad = [i for i, k in enumerate(keys) if is_bad(k)]
        if bad:
            with pytest.raises(BatchKeyError) as ei:
                call()
            assert ei.value.positions.tolist() == bad
            return ei.value.result
        return call()

    # -- single operations

    @rule(k=valid_keys, ts=times)
    def start(self, k, ts):
        b = kb(k)
        if b not in self.model and self.would_overflow({b}):
            return self.expect_full(lambda: self.t.start(k, ts))
        cur = self.model.get(b, (NOT_SET, NOT_SET))
        want = cur[0] == NOT_SET
        if want:
            self.model[b] = (ts, cur[1])
            self.started += 1
        assert self.t.start(k, ts) is want

    @rule(k=valid_keys, ts=times, insert=st.booleans())
    def stop(self, k, ts, insert):
        b = kb(k)
        if b not in self.model and insert and self.would_overflow({b}):
            return self.expect_full(lambda: self.t.stop(k, ts, insert_missing=True))
        if b in self.model:
            want = self.model[b][1] == NOT_SET
            if want:
                self.model[b] = (self.model[b][0], ts)
        else:
            want = insert
            if insert:
                self.model[b] = (NOT_SET, ts)
        self.stopped += want
        assert self.t.stop(k, ts, insert_missing=insert) is want

    @rule(k=valid_keys)
    def remove(self, k):
        want = self.model.pop(kb(k), None) is not None
        assert self.t.remove(k) is want

    @rule(k=valid_keys)
    def get(self, k):
        want = self.model.get(kb(k))
        assert self.t.get(k) == want
        assert self.ro.get(k) == want
        assert (k in self.t) is (want is not None)
        if want is None:
            with pytest.raises(KeyError):
                self.t[k]
        else:
            assert self.t[k] == want

    # -- batches

    @rule(keys=batch_keys, form=forms, data=st.data())
    def start_many(self, keys, form, data):
        ts = data.draw(st.lists(times, min_size=len(keys), max_size=len(keys)))
        new = {kb(k) for k in keys if not is_bad(k) and kb(k) not in self.model}
        call = lambda: self.t.start_many(as_form(keys, form), np.array(ts, np.int64))  # noqa: E731
        if self.would_overflow(new):
            return self.expect_full(call)
        want = []
        for k, t in zip(keys, ts):
            if is_bad(k):
                want.append(False)
                continue
            cur = self.model.get(kb(k), (NOT_SET, NOT_SET))
            ok = cur[0] == NOT_SET
            if ok:
                self.model[kb(k)] = (t, cur[1])
            want.append(ok)
        self.started += sum(want)
        assert self.run_batch(call, keys).tolist() == want

    @rule(keys=batch_keys, form=forms, insert=st.booleans(), data=st.data())
    def stop_many(self, keys, form, insert, data):
        ts = data.draw(st.lists(times, min_size=len(keys), max_size=len(keys)))
        new = {kb(k) for k in keys if not is_bad(k) and kb(k) not in self.model}
        call = lambda: self.t.stop_many(as_form(keys, form), ts,  # noqa: E731
                                        insert_missing=insert)
        if insert and self.would_overflow(new):
            return self.expect_full(call)
        want = []
        for k, t in zip(keys, ts):
            b = kb(k)
            if is_bad(k) or (b not in self.model and not insert):
                want.append(False)
                continue
            cur = self.model.get(b, (NOT_SET, NOT_SET))
            ok = cur[1] == NOT_SET
            if ok:
                self.model[b] = (cur[0], t)
            want.append(ok)
        self.stopped += sum(want)
        assert self.run_batch(call, keys).tolist() == want

    @rule(keys=batch_keys, form=forms, insert=st.booleans(), data=st.data())
    def record_many(self, keys, form, insert, data):
        n = len(keys)
        start = data.draw(st.lists(maybe_times, min_size=n, max_size=n))
        end = data.draw(st.lists(maybe_times, min_size=n, max_size=n))
        new = {kb(k) for k in keys if not is_bad(k) and kb(k) not in self.model}
        call = lambda: self.t.record_many(as_form(keys, form), np.array(start, np.int64),  # noqa
                                          np.array(end, np.int64), insert=insert)
        if insert and self.would_overflow(new):
            return self.expect_full(call)
        ws, we = [], []
        for k, s, e in zip(keys, start, end):
            b = kb(k)
            if is_bad(k) or (b not in self.model and not insert):
                ws.append(False)
                we.append(False)
                continue
            cs, ce = self.model.get(b, (NOT_SET, NOT_SET))
            ok_s, ok_e = s != NOT_SET and cs == NOT_SET, e != NOT_SET and ce == NOT_SET
            self.model[b] = (s if ok_s else cs, e if ok_e else ce)
            ws.append(ok_s)
            we.append(ok_e)
        self.started += sum(ws)
        self.stopped += sum(we)
        got_s, got_e = self.run_batch(call, keys)
        assert got_s.tolist() == ws and got_e.tolist() == we

    @rule(keys=batch_keys, form=forms)
    def remove_many(self, keys, form):
        want = [False if is_bad(k) else self.model.pop(kb(k), None) is not None for k in keys]
        got = self.run_batch(lambda: self.t.remove_many(as_form(keys, form)), keys)
        assert got.tolist() == want

    @rule(keys=batch_keys, form=forms, reader=st.booleans())
    def get_many(self, keys, form, reader):
        t = self.ro if reader else self.t
        r = self.run_batch(lambda: t.get_many(as_form(keys, form)), keys)
        want = [None if is_bad(k) else self.model.get(kb(k)) for k in keys]
        assert r.found.tolist() == [w is not None for w in want]
        assert r.start.tolist() == [w[0] if w else NOT_SET for w in want]
        assert r.end.tolist() == [w[1] if w else NOT_SET for w in want]
        # bad keys in contains_many have their own test (test_batch_semantics)
        got = t.contains_many(as_form(keys, form), errors="ignore")
        assert got.tolist() == [w is not None for w in want]

    # -- whole table

    @rule(capacity=st.integers(min_value=8, max_value=400))
    def grow(self, capacity):
        if capacity < len(self.model) / 0.75:
            with pytest.raises(ValueError):
                self.t.grow(capacity)
            return
        self.t.grow(capacity)
        self.capacity = (capacity + 7) // 8 * 8

    @rule()
    def compact(self):
        self.t.compact()
        assert self.t.stats().tombstones == 0

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def remove_many_present(self, data):
        # random batches seldom hit present keys once the table is sparse; emptying
        # several at once leaves the EMPTY/TOMBSTONE mixes that later probes must walk
        keys = sorted(self.model)
        i = data.draw(st.integers(0, len(keys) - 1))
        gone = keys[i:i + 8]
        assert self.t.remove_many(gone).all()
        for b in gone:
            del self.model[b]

    @invariant()
    def matches_model(self):
        assert len(self.t) == len(self.model)
        assert len(self.ro) == len(self.model)
        assert self.snapshot(self.t) == self.model
        assert self.snapshot(self.ro) == self.model
        s = self.t.stats()
        if self.AUTO_GROW:
            self.capacity = s.capacity
        assert s.capacity == self.capacity and self.t.capacity == self.capacity
        assert s.count == len(self.model)
        assert (s.n_started, s.n_stopped) == (self.started, self.stopped)
        assert s.count <= s.limit


class AutoGrowMachine(TableMachine):
    CAPACITY = 8
    AUTO_GROW = True


SETTINGS = settings(max_examples=40, stateful_step_count=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

TestFixedCapacity = TableMachine.TestCase
TestFixedCapacity.settings = SETTINGS
TestAutoGrow = AutoGrowMachine.TestCase
TestAutoGrow.settings = SETTINGS
