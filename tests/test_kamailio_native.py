"""The native-config helper (npcalls.kamailio.KamailioScript, the shipped script) and the
bounded wait for the writer lock shared with the KEMI CallMonitor, without Kamailio.

The lock is held by a real separate process (``python -c``), as a stalled
writer would hold it; the end-to-end tests (test_kamailio_native_e2e.py) run
the same code inside Kamailio.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

import npcalls.kamailio as nk
from npcalls import NOT_SET, CallTable
from npcalls.kamailio import CallMonitor, KamailioScript, read_settings, script_from_environ

from helpers.kamailio_tests import FakeKSR, Holder, lock_held_by_a_thread, monitor, raw_fork, wait_child


@pytest.fixture
def holder(tname):
    hs = []

    def hold(path=None):
        CallTable.open_or_create(path or tname, 1024, 128).close()
        h = Holder(str(CallTable.open(path or tname, readonly=True).path))
        hs.append(h)
        return h
    yield hold
    for h in hs:
        h.close()


# ---------------------------------------------------------------- bounded wait


def test_busy_lock_defers_after_the_wait_limit_then_writes_the_backlog(tname, holder):
    m, ksr = monitor(tname, lock_timeout=0.3, trace=True)
    m.table
    h = holder()
    t0 = time.time_ns()
    w0 = time.monotonic()
    assert m.start_monitoring(call_id="stalled-1") is False
    first = time.monotonic() - w0
    assert 0.3 <= first < 0.3 + 2.0, f"waited {first:.3f}s with a 0.3s limit"
    warns = ksr.level("warn")
    assert len(warns) == 1 and "busy for more than 300 ms" in warns[0]
    assert "held by pid" in warns[0] and str(h.p.pid) in warns[0]
    # Until the lock is free again, no more waiting: one try per call.
    w0 = time.monotonic()
    assert m.stop_monitoring(call_id="stalled-1") is False
    assert m.start_monitoring(call_id="stalled-2") is False
    assert time.monotonic() - w0 < 0.3, "waited again while the lock was known busy"
    assert len(ksr.level("warn")) == 1                    # one warning per stall
    assert m.pending == 3 and m.stats["lock_busy"] == 3
    t1 = time.time_ns()
    assert CallTable.open(tname, readonly=True).get("stalled-1") is None
    h.release()
    assert m.start_monitoring(call_id="after") is True    # writes the backlog first
    assert m.pending == 0 and m.stats["deferred"] == 3
    t = CallTable.open(tname, readonly=True)
    s1, e1 = t.get("stalled-1")
    s2, e2 = t.get("stalled-2")
    # written later, with the times of the events themselves
    assert t0 <= s1 <= e1 <= s2 <= t1 and e2 == NOT_SET
    assert t.get("after")[0] > t1
    assert any("free again" in x and "3 deferred" in x for x in ksr.level("info"))
    assert m.stats["started"] == 3 and m.stats["stopped"] == 1


def test_lock_wait_forever_blocks_like_before(tname, holder):
    m, _ = monitor(tname, lock_timeout=None)
    m.table
    h = holder()
    import threading
    done = []
    th = threading.Thread(target=lambda: done.append(m.start_monitoring(call_id="w")))
    th.start()
    th.join(0.5)
    assert th.is_alive() and not done                     # still waiting
    h.release()
    th.join(10)
    assert done == [True]


def test_deferred_stop_of_an_unknown_call_inserts_an_end_only_row(tname, holder):
    """Its start may sit in another worker's backlog: the row waits for it."""
    m, _ = monitor(tname, lock_timeout=0.05)
    m.table
    h = holder()
    assert m.stop_monitoring(call_id="bye-first") is False
    h.release()
    assert m.flush() == 0
    t = CallTable.open(tname, readonly=True)
    assert t.get("bye-first")[0] == NOT_SET and t.get("bye-first")[1] != NOT_SET
    # Shortly after a stall even a direct stop inserts (another worker may
    # still hold the start); the start, written later, completes the row.
    assert m.stop_monitoring(call_id="late-start") is True
    assert m.start_monitoring(call_id="late-start") is True
    s, e = t.get("late-start")
    assert s != NOT_SET and e != NOT_SET and s > e        # times as they were recorded
    # A monitor that never saw the lock busy keeps the default: unknown stops record nothing.
    other, _ = monitor(tname, lock_timeout=0.05)
    assert other.stop_monitoring(call_id="never-started") is False
    assert t.get("never-started") is None and other.stats["unknown_stop"] == 1


def test_backlog_is_bounded_and_counts_what_it_drops(tname, holder):
    m, ksr = monitor(tname, lock_timeout=0.0, max_pending=5)
    m.table
    h = holder()
    for i in range(8):
        assert m.start_monitoring(call_id=f"c{i}") is False
    assert m.pending == 5 and m.stats["dropped"] == 3
    errs = ksr.level("err")
    assert len(errs) == 3 and all("backlog full" in e for e in errs)
    assert "c5" in errs[0]
    h.release()
    assert m.flush() == 0
    t = CallTable.open(tname, readonly=True)
    assert [t.get(f"c{i}") is not None for i in range(8)] == [True] * 5 + [False] * 3


def test_flush_while_still_busy_keeps_the_backlog(tname, holder):
    m, _ = monitor(tname, lock_timeout=0.05)
    m.table
    h = holder()
    m.start_monitoring(call_id="x")
    assert m.flush() == 1
    h.release()
    assert m.flush() == 0


def test_bad_lock_timeout_is_refused(tname):
    with pytest.raises(ValueError, match="lock_timeout"):
        CallMonitor(tname, lock_timeout=-1, ksr=FakeKSR())


def test_forked_worker_waits_boundedly_for_a_lock_held_elsewhere(tname, holder):
    """The worker's own state (not the parent's) counts the stall."""
    m, _ = monitor(tname, lock_timeout=0.05)
    m.table
    h = holder()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            t0 = time.monotonic()
            ok = m.start_monitoring(call_id="child") is False
            ok &= time.monotonic() - t0 < 5 and m.pending == 1 and m._pid == os.getpid()
            code = 0 if ok else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    h.release()
    assert os.waitstatus_to_exitcode(status) == 0
    assert m.pending == 0


# ---------------------------------------------------------------- the native-config object


def _script(tname, **env) -> tuple[KamailioScript, FakeKSR]:
    ksr = FakeKSR("native-call@host")
    environ = {"NPCALLS_TABLE": tname, "NPCALLS_CAPACITY": "1024", **env}
    return script_from_environ(environ, ksr=ksr), ksr


def _is_kamailio_int(v) -> bool:
    return type(v) is int and v != 0


def test_native_methods_return_nonzero_ints(tname):
    s, ksr = _script(tname)
    assert s.child_init(1) == 0 and type(s.child_init(2)) is int
    results = [s.start_monitoring(object()), s.start_monitoring(object()),
               s.stop_monitoring(object()), s.stop_monitoring(object()),
               s.start_monitoring(object(), "arg-call@host"),
               s.stop_monitoring(object(), "arg-call@host"),
               s.stop_monitoring(object(), "unknown@host"),
               s.flush_monitoring(object())]
    assert all(_is_kamailio_int(v) for v in results), results
    assert results == [1, -1, 1, -1, 1, 1, -1, 1]
    t = CallTable.open(tname, readonly=True)
    assert t.get("native-call@host")[1] != NOT_SET and t.get("arg-call@host")[1] != NOT_SET


@pytest.mark.parametrize("arg", ["", "<null>"])
def test_native_empty_pseudo_variable_is_a_warning_not_a_record(tname, arg):
    s, ksr = _script(tname)
    assert s.start_monitoring(object(), arg) == -1
    assert "not a Call-ID" in ksr.level("warn")[0]
    assert len(CallTable.open(tname, readonly=True)) == 0


def test_native_never_raises_and_never_returns_zero(tname, monkeypatch):
    s, ksr = _script(tname)

    def boom(*a, **k):
        raise SystemExit("in the worst place")
    monkeypatch.setattr(s.monitor, "start_monitoring", boom)
    monkeypatch.setattr(s.monitor, "child_init", boom)
    assert s.start_monitoring(object()) == -1
    assert s.child_init(3) == 0
    ksr.pv.get = boom                                     # KSR itself failing
    assert s.stop_monitoring(object()) == -1


def test_native_without_recording_accepts_everything(tname):
    s, _ = _script(tname, NPCALLS_RECORD="0")
    assert s.monitor is None
    assert (s.child_init(1), s.start_monitoring(None), s.stop_monitoring(None, "x")) == (0, 1, 1)
    assert not (Path(os.environ["NPCALLS_DIR"]) / f"npcalls.{tname}").exists()


def test_native_unopenable_table_does_not_stop_kamailio(tmp_path):
    ksr = FakeKSR("x@host")
    s = script_from_environ({"NPCALLS_TABLE": str(tmp_path / "no" / "such" / "dir" / "t")}, ksr=ksr)
    assert "cannot open or create" in ksr.level("err")[0]
    assert s.child_init(1) == 0 and s.start_monitoring(None) == -1


# ---------------------------------------------------------------- settings


def test_settings_defaults_file_then_environment(tmp_path):
    cfg = tmp_path / "npcalls.conf"
    cfg.write_text("# npcalls for kamailio\nNPCALLS_TABLE = from-file\n"
                   "NPCALLS_CAPACITY=0x1000\nNPCALLS_LOCK_WAIT_MS=20\n\nNPCALLS_TRACE=yes\n")
    s = read_settings({"NPCALLS_CONFIG": str(cfg), "NPCALLS_CAPACITY": "2048"})
    assert s["NPCALLS_TABLE"] == "from-file"
    assert s["NPCALLS_CAPACITY"] == 2048                  # the environment wins
    assert s["NPCALLS_LOCK_WAIT_MS"] == 0.02 and s["NPCALLS_TRACE"] is True
    assert s["NPCALLS_KEY_WIDTH"] == 128 and s["NPCALLS_MODE"] == 0o600
    assert read_settings({"NPCALLS_LOCK_WAIT_MS": "forever"})["NPCALLS_LOCK_WAIT_MS"] is None


@pytest.mark.parametrize("env, msg", [
    ({"NPCALLS_CAPACITY": "lots"}, "NPCALLS_CAPACITY='lots' (from the environment)"),
    ({"NPCALLS_LOCK_WAIT_MS": "-5"}, "NPCALLS_LOCK_WAIT_MS"),
    ({"NPCALLS_TRACE": "maybe"}, "NPCALLS_TRACE='maybe'"),
    ({"NPCALLS_MODE": "rw"}, "NPCALLS_MODE"),
    ({"NPCALLS_KEY_WIDTH": "0"}, "must be positive"),
])
def test_bad_settings_name_the_variable(env, msg):
    with pytest.raises(ValueError) as e:
        read_settings(env)
    assert msg in str(e.value)


def test_bad_config_file_line_names_file_and_line(tmp_path):
    cfg = tmp_path / "c.conf"
    cfg.write_text("NPCALLS_TABLE=x\nNPCALS_TABLE=typo\n")
    with pytest.raises(ValueError, match=r"c\.conf:2: expected NAME=value"):
        read_settings({"NPCALLS_CONFIG": str(cfg)})
    with pytest.raises(OSError):
        read_settings({"NPCALLS_CONFIG": str(tmp_path / "missing.conf")})


# ---------------------------------------------------------------- the shipped script and CLI


def test_shipped_script_builds_the_object_app_python3_needs(tname, monkeypatch):
    ksr = FakeKSR("shipped@host")
    monkeypatch.setitem(sys.modules, "KSR", ksr)
    monkeypatch.setenv("NPCALLS_TABLE", tname)
    monkeypatch.delenv("NPCALLS_SITE", raising=False)
    spec = importlib.util.spec_from_file_location(f"npcalls_native_{uuid.uuid4().hex}",
                                                  nk.script_path())
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    obj = mod.mod_init()
    assert isinstance(obj, KamailioScript)
    assert obj.child_init(0) == 0
    assert obj.start_monitoring(None) == 1 and obj.stop_monitoring(None, "shipped@host") == 1


def test_shipped_script_finds_npcalls_from_its_own_location(tmp_path, tname):
    """Kamailio imports the file by path, with its directory on sys.path.

    Here npcalls itself is not importable (no site processing: the editable
    install's .pth is not read), only its dependencies are: the script must
    find the package it belongs to from its own location.
    """
    import site
    deps = next(d for d in site.getsitepackages() if d.endswith("site-packages"))
    probe = ("import sys, types\n"
             "sys.modules['KSR'] = types.SimpleNamespace()\n"
             f"sys.path[:0] = [{os.path.dirname(nk.script_path())!r}, {deps!r}]\n"
             "try:\n    import npcalls\n    print('npcalls importable before')\n"
             "except ImportError:\n    pass\n"
             "import npcalls_native\n"
             "print(type(npcalls_native.mod_init()).__name__)\n")
    env = dict(os.environ, NPCALLS_TABLE=tname)
    for k in ("PYTHONPATH", "NPCALLS_SITE"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, "-S", "-c", probe], env=env, capture_output=True,
                       text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "KamailioScript"


def test_cli_prints_the_script_path_and_checks_settings(tmp_path):
    r = subprocess.run([sys.executable, "-m", "npcalls", "kamailio-script"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout.strip() == nk.script_path() and os.path.isfile(r.stdout.strip())
    env = dict(os.environ, NPCALLS_LOCK_WAIT_MS="soon")
    r = subprocess.run([sys.executable, "-m", "npcalls", "kamailio-script", "--settings"],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2 and r.stdout == ""
    assert "NPCALLS_LOCK_WAIT_MS='soon'" in r.stderr and "Traceback" not in r.stderr
    env = dict(os.environ, NPCALLS_LOCK_WAIT_MS="20", NPCALLS_TABLE="t1")
    r = subprocess.run([sys.executable, "-m", "npcalls", "kamailio-script", "--settings"],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0
    assert "NPCALLS_LOCK_WAIT_MS=20" in r.stdout and "NPCALLS_TABLE=t1" in r.stdout
    assert "NPCALLS_MODE=0600" in r.stdout


def test_a_bad_deferred_event_does_not_take_the_others_with_it(tname, holder):
    m, ksr = monitor(tname, lock_timeout=0.0, key_width=16)
    m.table
    h = holder()
    for cid in ("ok-1", "x" * 40, "ok-2"):            # the middle one is too long for the table
        assert m.start_monitoring(call_id=cid) is False
    h.release()
    assert m.start_monitoring(call_id="ok-3") is True
    t = CallTable.open(tname, readonly=True)
    assert all(t.get(c) is not None for c in ("ok-1", "ok-2", "ok-3"))
    errs = ksr.level("err")
    assert len(errs) == 1 and "(deferred) failed" in errs[0] and "x" * 40 in errs[0]


def test_raw_fork_with_an_inherited_held_thread_lock_defers_then_writes(tname):
    """fork(2) from C while a parent thread holds the writer lock: the child neither
    deadlocks on the inherited thread lock nor waits past the limit."""
    m, _ = monitor(tname, lock_timeout=0.05)
    m.table
    other = CallTable.open(tname)
    with lock_held_by_a_thread(other):
        r, w = os.pipe()
        pid = raw_fork()
        if pid == 0:
            code = 1
            try:
                os.close(w)
                t0 = time.monotonic()
                ok = m.start_monitoring(call_id="raw-bounded") is False and m.pending == 1
                ok &= time.monotonic() - t0 < 5
                os.read(r, 1)                                 # the parent released its lock
                ok &= m.start_monitoring(call_id="raw-bounded-2") is True and m.pending == 0
                code = 0 if ok else 1
            finally:
                os._exit(code)
        os.close(r)
        time.sleep(0.3)
    os.write(w, b"x")
    os.close(w)
    status = wait_child(pid, 20)
    other.close()
    assert status == 0, "the raw-forked child deadlocked or misbehaved"
    t = CallTable.open(tname, readonly=True)
    assert t.get("raw-bounded") is not None and t.get("raw-bounded-2") is not None
