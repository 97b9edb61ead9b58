"""npcalls.kamailio.CallMonitor and the example routing script, without Kamailio.

A fake ``KSR`` stands in for Kamailio's module: these tests cover what the
end-to-end test cannot provoke on demand — failures of every kind (logged,
rate-limited, never raised), real forks (os.fork, and a raw libc fork that
skips Python's at-fork handlers, as an embedding C program may), and the
routing decisions of examples/kamailio/npcalls_routing.py.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
import types
import uuid
from pathlib import Path

import pytest

import npcalls.kamailio as nk
from npcalls import NOT_SET, CallTable
from npcalls.kamailio import CallMonitor

from helpers.kamailio_tests import FakeKSR, in_child, lock_held_by_a_thread, monitor, raw_fork, wait_child

REPO = Path(__file__).resolve().parent.parent
ROUTING_SCRIPT = REPO / "examples" / "kamailio" / "npcalls_routing.py"


# ---------------------------------------------------------------- basics


def test_importable_without_kamailio():
    assert "KSR" not in sys.modules
    assert nk._default_ksr() is nk._LoggingKSR
    nk._LoggingKSR.err("x")             # logs through `logging`, no KSR needed


def test_start_and_stop_from_the_message_call_id(tname):
    m, ksr = monitor(tname, "a84b4c76e66710@pc33.atlanta.com")
    t0 = time.time_ns()
    assert m.start_monitoring(object()) is True
    assert m.start_monitoring(object()) is False          # retransmitted 200: first start kept
    assert m.stop_monitoring(object()) is True
    assert m.stop_monitoring(object()) is False           # second BYE: first end kept
    start, end = CallTable.open(tname, readonly=True).get("a84b4c76e66710@pc33.atlanta.com")
    assert t0 <= start <= end <= time.time_ns()
    assert m.stats == {"started": 1, "already_started": 1, "stopped": 1, "already_stopped": 1,
                       "unknown_stop": 0, "errors": 0, "lock_busy": 0, "deferred": 0,
                       "dropped": 0}
    assert ksr.lines == []


def test_table_created_with_the_given_geometry(tname):
    m, _ = monitor(tname, capacity=4096, key_width=200)
    assert m.table.capacity == 4096 and m.table.key_width == 200
    assert m.table.stats().auto_grow


def test_explicit_call_id_and_bytes(tname):
    m, _ = monitor(tname)
    assert m.start_monitoring(call_id=b"bytes-id@host")
    assert m.stop_monitoring(call_id="bytes-id@host")
    assert NOT_SET not in m.table.get("bytes-id@host")


def test_stop_of_unknown_call_records_nothing_unless_asked(tname):
    m, ksr = monitor(tname, "never-started")
    assert m.stop_monitoring() is False
    assert m.table.get("never-started") is None
    assert m.stats["unknown_stop"] == 1 and ksr.lines == []
    m2, _ = monitor(tname, "never-started", stop_inserts_missing=True)
    assert m2.stop_monitoring() is True
    start, end = m2.table.get("never-started")
    assert start == NOT_SET and end != NOT_SET


def test_open_now_false_opens_at_first_use(tname):
    m, _ = monitor(tname, "lazy", open_now=False)
    assert m._table is None and not os.path.exists(os.path.join(os.environ["NPCALLS_DIR"],
                                                                f"npcalls.{tname}"))
    assert m.start_monitoring()
    assert m.table.get("lazy") is not None


def test_trace_lines(tname):
    m, ksr = monitor(tname, "traced", trace=True)
    m.start_monitoring()
    m.stop_monitoring()
    m.start_monitoring()                                  # not recorded: no line
    assert ksr.level("info") == [f"npcalls: start call_id=traced pid={os.getpid()}\n",
                                 f"npcalls: stop call_id=traced pid={os.getpid()}\n"]


def test_child_init_in_the_same_process_keeps_the_handle(tname):
    m, _ = monitor(tname)
    t = m.table
    assert m.child_init(0) == 0
    assert m.table is t


def test_close_detaches(tname):
    m, _ = monitor(tname, "c")
    t = m.table
    m.close()
    assert t.closed
    assert m.start_monitoring()                           # re-opened on demand


# ---------------------------------------------------------------- failures: logged, never raised


def test_no_call_id_is_a_warning(tname):
    m, ksr = monitor(tname, None)
    assert m.start_monitoring() is False
    assert m.stop_monitoring() is False
    assert len(ksr.level("warn")) == 2 and "no Call-ID" in ksr.level("warn")[0]
    assert m.stats["errors"] == 2 and len(m.table) == 0


def test_call_id_longer_than_key_width_is_logged_not_truncated(tname):
    long_id = "x" * 40 + "@host"
    m, ksr = monitor(tname, long_id, key_width=16)
    assert m.start_monitoring() is False
    assert m.stop_monitoring() is False
    assert len(m.table) == 0
    errs = ksr.level("err")
    assert len(errs) == 2 and "key width of 16" in errs[0] and "start_monitoring" in errs[0]


def test_full_table_is_logged(tname):
    m, ksr = monitor(tname, capacity=16, auto_grow=False)
    results = [m.start_monitoring(call_id=f"c{i}") for i in range(14)]
    assert results == [True] * 12 + [False] * 2
    assert len(ksr.level("err")) == 2 and "full" in ksr.level("err")[0]


def test_full_table_grows_by_default(tname):
    m, ksr = monitor(tname, capacity=16)
    assert all(m.start_monitoring(call_id=f"c{i}") for i in range(100))
    assert len(m.table) == 100 and ksr.lines == []


class Boom(Exception):
    pass


def test_failing_ksr_never_raises(tname):
    m, ksr = monitor(tname)

    def boom(*a):
        raise Boom("KSR broke")

    ksr.pv.get = boom
    ksr.err = ksr.warn = ksr.info = boom
    assert m.start_monitoring() is False
    assert m.stop_monitoring() is False
    assert m.stats["errors"] == 2


def test_base_exceptions_do_not_escape(tname, monkeypatch):
    m, ksr = monitor(tname, "k")

    def interrupt(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(m.table, "start", interrupt)
    assert m.start_monitoring() is False
    assert "start_monitoring failed: KeyboardInterrupt" in ksr.level("err")[0]


def test_errors_are_rate_limited(tname):
    m, ksr = monitor(tname, "y" * 300, key_width=16, log_interval=3600)
    for _ in range(1000):
        assert m.start_monitoring() is False
    assert m.stats["errors"] == 1000
    assert len(ksr.level("err")) == CallMonitor._BURST


def test_rate_limited_errors_report_the_suppressed_count(tname):
    m, ksr = monitor(tname, "y" * 300, key_width=16, log_interval=0.05)
    for _ in range(50):
        m.start_monitoring()
    time.sleep(0.06)
    m.start_monitoring()
    errs = ksr.level("err")
    assert any("similar messages suppressed" in e for e in errs)
    assert len(errs) < 50


def test_unopenable_table_is_logged_and_retried(tmp_path):
    where = tmp_path / "not-yet"
    path = str(where / "calls")
    ksr = FakeKSR("late@host")
    m = CallMonitor(path, capacity=64, ksr=ksr, retry_interval=3600)    # does not raise
    assert m.table is None
    assert len(ksr.level("err")) == 1 and "cannot open or create" in ksr.level("err")[0]
    where.mkdir()
    assert m.start_monitoring() is False                  # not retried before the interval
    assert len(ksr.level("err")) == 1
    m._next_open = 0.0                                    # the interval has passed
    assert m.start_monitoring() is True
    assert m.child_init(1) == 0
    CallTable.unlink(path)


def test_foreign_file_is_logged(tmp_path):
    path = tmp_path / "calls"
    path.write_bytes(b"GIF89a" + os.urandom(5000))
    ksr = FakeKSR("x@host")
    m = CallMonitor(str(path), ksr=ksr, retry_interval=0)
    assert m.start_monitoring() is False
    assert m.child_init(3) == 0
    errs = ksr.level("err")
    assert errs and all("cannot open or create" in e for e in errs)


def test_removed_table_is_logged(tname):
    m, ksr = monitor(tname, "gone")
    m.table                                               # attached
    CallTable.unlink(tname)
    assert m.start_monitoring() is False
    assert "removed" in ksr.level("err")[0]


# ---------------------------------------------------------------- fork safety


def test_forked_workers_write_one_table(tname):
    """Kamailio's model: built in the parent (table opened), used by forked workers."""
    # lock_timeout=None: this test is about forks; with the default bounded wait
    # (50 ms), a worker descheduled while holding the lock on a loaded machine
    # makes another defer its event (start_monitoring False), which the bounded-wait
    # tests of test_kamailio_native.py cover on purpose.
    m, _ = monitor(tname, capacity=8192, trace=False, lock_timeout=None)
    inherited = m.table
    r, w = os.pipe()
    per_child = 300

    def worker(rank: int) -> bool:
        os.close(r)
        if rank % 2:
            assert m.child_init(rank) == 0                 # half of them call child_init ...
        t = m.table                                       # ... the others rely on the pid check
        assert t is not inherited and not t.closed and inherited.closed
        assert m._pid == os.getpid() and m.stats["started"] == 0
        won = m.start_monitoring(call_id="shared-call")   # all race for one Call-ID
        ok = all(m.start_monitoring(call_id=f"{rank}-{i}") for i in range(per_child))
        ok &= all(m.stop_monitoring(call_id=f"{rank}-{i}") for i in range(0, per_child, 2))
        os.write(w, b"1" if won else b"0")
        return ok and m.stats["started"] == per_child + won

    pids = [in_child(lambda rank=rank: worker(rank)) for rank in range(1, 5)]
    os.close(w)
    codes = [wait_child(p, 60) for p in pids]
    wins = b""
    while chunk := os.read(r, 64):
        wins += chunk
    os.close(r)
    assert codes == [0, 0, 0, 0]
    assert sorted(wins) == sorted(b"1000")               # exactly one worker started it
    t = m.table                                           # the parent's handle still works
    assert t is inherited and not t.closed
    assert len(t) == 4 * per_child + 1
    for rank in range(1, 5):
        for i in range(per_child):
            start, end = t.get(f"{rank}-{i}")
            assert start != NOT_SET and (end != NOT_SET) == (i % 2 == 0)
    assert m.start_monitoring(call_id="parent-after")


def test_fork_while_a_parent_thread_holds_the_writer_lock(tname):
    """The child waits for the parent's POSIX lock, then writes (os.fork: hooks run)."""
    m, _ = monitor(tname, lock_timeout=None)            # waits as long as it takes
    with lock_held_by_a_thread(m.table):
        pid = in_child(lambda: m.start_monitoring(call_id="after-parent-lock"))
        time.sleep(0.2)
        assert m.table.get("after-parent-lock") is None   # the child is waiting for the lock
    assert wait_child(pid, 20) == 0
    assert m.table.get("after-parent-lock") is not None


def test_raw_fork_without_python_fork_handlers(tname):
    """An embedding program may fork from C without PyOS_AfterFork_Child.

    A parent thread holds the writer lock at the fork through a *second*
    CallTable object on the same file, so the lock-file state the child
    inherits (a thread lock held by a thread that does not exist there) is
    shared with objects the helper does not own.  The helper must still
    write once the parent releases its POSIX lock.
    """
    m, _ = monitor(tname, lock_timeout=None)
    other = CallTable.open(tname)
    with lock_held_by_a_thread(other):
        pid = raw_fork()
        if pid == 0:
            code = 1
            try:
                code = 0 if m.start_monitoring(call_id="raw-fork-child") else 1
            finally:
                os._exit(code)
        time.sleep(0.2)
    status = wait_child(pid, 20)
    other.close()
    assert status == 0, "the raw-forked child could not write (deadlock or error)"
    assert m.table.get("raw-fork-child") is not None


# ---------------------------------------------------------------- the example routing script


class FakeSipKSR(FakeKSR):
    """KSR for driving examples/kamailio/npcalls_routing.py: one message at a time."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []
        self.msg: dict = {}
        ns = types.SimpleNamespace
        self.maxfwd = ns(process_maxfwd=lambda n: self._ret("process_maxfwd", 1))
        self.siputils = ns(has_totag=lambda: 1 if self.msg.get("totag") else -1)
        self.tm = ns(t_check_trans=lambda: self._ret("t_check_trans", -1),
                     t_newtran=lambda: self._ret("t_newtran", 1),
                     t_relay=lambda: self._ret("t_relay", 1),
                     t_on_reply=lambda name: self._ret("t_on_reply", 1, name))
        self.rr = ns(record_route=lambda: self._ret("record_route", 1),
                     loose_route=lambda: self._ret("loose_route", 1))
        self.dialog = ns(dlg_manage=lambda: self._ret("dlg_manage", 1))
        self.sl = ns(sl_send_reply=lambda code, reason: self._ret("sl_send_reply", 1, code),
                     sl_reply_error=lambda: self._ret("sl_reply_error", 1))
        self.pv = ns(get=lambda name: self.msg.get(name))
        for m in ("INVITE", "ACK", "BYE", "CANCEL", "OPTIONS"):
            setattr(self, f"is_{m}", lambda m=m: self.msg.get("method") == m)

    def _ret(self, fn: str, default, *args):
        self.calls.append((fn, *args))
        return self.msg.get(fn, default)

    def setflag(self, n: int) -> int:
        self.calls.append(("setflag", n))
        return 1

    def is_myself_ruri(self) -> bool:
        return bool(self.msg.get("myself"))

    def new(self, **msg) -> "FakeSipKSR":
        self.msg = msg
        self.calls = []
        return self

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]


@pytest.fixture
def routing(tname, monkeypatch):
    """(script object, fake KSR, table) for the example routing script."""
    ksr = FakeSipKSR()
    monkeypatch.setitem(sys.modules, "KSR", ksr)
    monkeypatch.setenv("NPCALLS_TABLE", tname)
    monkeypatch.delenv("NPCALLS_SITE", raising=False)
    monkeypatch.delenv("NPCALLS_RECORD", raising=False)
    modname = f"npcalls_routing_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(modname, ROUTING_SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    script = mod.mod_init()
    assert script.child_init(1) == 0
    return script, ksr, CallTable.open(tname, readonly=True)


def test_routing_records_only_the_answered_invite(routing):
    script, ksr, t = routing
    cid = "call-1@host"
    ksr.new(method="INVITE", **{"$ci": cid})
    assert script.ksr_request_route(None) == 1
    names = ksr.names()
    # acc and dialog hook the transaction when t_newtran() creates it
    assert names.index("record_route") < names.index("t_newtran")
    assert names.index("setflag") < names.index("t_newtran")
    assert names.index("dlg_manage") < names.index("t_newtran")
    assert ("t_on_reply", "ksr_onreply_invite") in ksr.calls and "t_relay" in names
    assert t.get(cid) is None                             # not at the request
    for code in (100, 180, 183):
        ksr.new(**{"$ci": cid, "$rs": code})
        assert script.ksr_onreply_invite(None) == 1
    assert t.get(cid) is None
    ksr.new(**{"$ci": cid, "$rs": 200})
    assert script.ksr_onreply_invite(None) == 1
    start = t.get(cid)[0]
    assert start != NOT_SET
    ksr.new(**{"$ci": cid, "$rs": 200})                   # retransmitted 200
    script.ksr_onreply_invite(None)
    assert t.get(cid)[0] == start
    assert script.ksr_reply_route(None) == 1


def test_routing_never_records_a_rejected_call(routing):
    script, ksr, t = routing
    ksr.new(method="INVITE", **{"$ci": "busy@host"})
    script.ksr_request_route(None)
    for code in (100, 180, 486):
        ksr.new(**{"$ci": "busy@host", "$rs": code})
        script.ksr_onreply_invite(None)
    assert t.get("busy@host") is None
    # its hop-by-hop ACK (no Route header) is absorbed by tm
    ksr.new(method="ACK", totag=True, loose_route=-1, t_check_trans=0, **{"$ci": "busy@host"})
    script.ksr_request_route(None)
    assert "t_relay" not in ksr.names()


def test_routing_retransmitted_invite_is_not_a_new_transaction(routing):
    script, ksr, t = routing
    ksr.new(method="INVITE", t_check_trans=0, **{"$ci": "rtx@host"})
    script.ksr_request_route(None)
    assert "t_newtran" not in ksr.names() and "t_relay" not in ksr.names()
    ksr.new(method="INVITE", t_newtran=0, **{"$ci": "rtx@host"})
    script.ksr_request_route(None)
    assert "t_relay" not in ksr.names() and "t_on_reply" not in ksr.names()


def _answer(script, ksr, cid):
    ksr.new(method="INVITE", **{"$ci": cid})
    script.ksr_request_route(None)
    ksr.new(**{"$ci": cid, "$rs": 200})
    script.ksr_onreply_invite(None)


def test_routing_bye_stops_after_t_newtran(routing):
    script, ksr, t = routing
    _answer(script, ksr, "bye@host")
    ksr.new(method="BYE", totag=True, t_newtran=0, **{"$ci": "bye@host"})   # retransmission
    script.ksr_request_route(None)
    assert t.get("bye@host")[1] == NOT_SET and "t_relay" not in ksr.names()
    ksr.new(method="BYE", totag=True, **{"$ci": "bye@host"})
    script.ksr_request_route(None)
    names = ksr.names()
    assert t.get("bye@host")[1] != NOT_SET
    assert names.index("loose_route") < names.index("t_newtran") < names.index("t_relay")
    assert ("setflag", 1) in ksr.calls


def test_routing_handles_uas_that_ignore_record_route(routing):
    """sipp's built-in scenarios: in-dialog ACK/BYE without Route, R-URI = the peer."""
    script, ksr, t = routing
    _answer(script, ksr, "quirk@host")
    ksr.new(method="ACK", totag=True, loose_route=-1, t_check_trans=1, **{"$ci": "quirk@host"})
    script.ksr_request_route(None)
    assert {"dlg_manage", "t_relay"} <= set(ksr.names())
    ksr.new(method="BYE", totag=True, loose_route=-1, **{"$ci": "quirk@host"})
    script.ksr_request_route(None)
    assert {"dlg_manage", "t_newtran", "t_relay"} <= set(ksr.names())
    assert t.get("quirk@host")[1] != NOT_SET
    # an in-dialog request for the proxy itself that no Route explains: 404
    ksr.new(method="BYE", totag=True, loose_route=-1, myself=True, **{"$ci": "x@host"})
    script.ksr_request_route(None)
    assert ("sl_send_reply", 404) in ksr.calls and "t_relay" not in ksr.names()


def test_routing_without_recording_routes_the_same(routing, monkeypatch):
    script, ksr, t = routing
    monkeypatch.setenv("NPCALLS_RECORD", "0")
    spec = importlib.util.spec_from_file_location(f"r{uuid.uuid4().hex}", ROUTING_SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    plain = mod.mod_init()
    assert plain.calls is None and plain.child_init(2) == 0
    for msg in (dict(method="INVITE"), dict(method="BYE", totag=True),
                dict(method="ACK", totag=True)):
        ksr.new(**msg, **{"$ci": "p@host"})
        plain.ksr_request_route(None)
        without = ksr.calls
        ksr.new(**msg, **{"$ci": "r@host"})
        script.ksr_request_route(None)
        assert ksr.calls == without
    ksr.new(**{"$ci": "p@host", "$rs": 200})
    assert plain.ksr_onreply_invite(None) == 1
    assert t.get("p@host") is None


def test_routing_survives_a_broken_table(routing, tname):
    script, ksr, t = routing
    CallTable.unlink(tname)                               # every write now fails
    _answer(script, ksr, "lost@host")
    ksr.new(method="BYE", totag=True, **{"$ci": "lost@host"})
    assert script.ksr_request_route(None) == 1
    assert "t_relay" in ksr.names()                       # the BYE is still relayed
    assert any("removed" in e for e in ksr.level("err"))
