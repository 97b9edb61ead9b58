"""End to end: the proxy never stalls on the table.

While sipp places calls through a real Kamailio (the KEMI example and both
native variants), a separate process takes the table's writer lock and keeps
it for STALL seconds, as a writer stopped inside the table (SIGSTOP, a long
rebuild, a full disk) would.  The helper waits for the lock at most
WAIT_MS (NPCALLS_LOCK_WAIT_MS), keeps the events in each worker's backlog
and writes them, with their own times, once the lock is free.

Checked: no call fails and none is lost by sipp (the answered-call count is
not lowered); the call setup time (INVITE sent -> 200 received, per call, at
the caller) of calls answered during the stall exceeds that of the other
calls by less than the wait limit; afterwards every answered call is in the
table with start < end and in order with sipp's clock; the stall is logged as
a warning (not an error) and no ERROR line appears.
"""

from __future__ import annotations

import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

from helpers import kamailio_harness as harness
from helpers.kamailio_tests import new_table_dir, read_table, require_programs

# Half the rate of the other end-to-end tests: this one measures latency, and on
# a 2-core machine shared with other work the KEMI proxy at 200+ calls/s can
# fall behind for reasons of its own, hiding what the stall does.
CALLS = 800
RATE = 100
CALL_MS = 1000
BUSY_EVERY = 8
WAIT_MS = 50            # the helper's wait limit for the writer lock
STALL_AFTER = 2.0       # seconds into the run when the other process takes the lock
STALL = 3.0             # seconds it keeps it
WORKERS = 4
WAKEUP = 0.05           # the OS's delay in running a worker again once its wait ends (loaded machine)

pytestmark = pytest.mark.timeout(240)

_HOLDER = r"""
import sys, time
import npcalls
t = npcalls.CallTable.open(sys.argv[1])
with t.locked():
    print("held", time.time(), flush=True)
    time.sleep(float(sys.argv[2]))
    print("released", time.time(), flush=True)
"""

@dataclass
class Run:
    config: str
    uac: object
    held: float
    released: float
    holder_pid: int
    rows: dict[str, tuple[int, int]]
    log: str


@pytest.fixture(scope="module", params=["kemi", "native", "native-dialog"])
def run(request, tmp_path_factory) -> Run:
    require_programs()
    config = request.param
    wd = tmp_path_factory.mktemp(f"kamailio-stall-{config}")
    tables = new_table_dir(f"kamailio-stall-{config}-")
    stack = harness.Stack(wd, workers=WORKERS, table="stall-calls", table_dir=tables,
                          config=config, lock_wait_ms=WAIT_MS)
    holder = None
    try:
        stack.start()
        env, path = stack.env(), str(stack.table_path)
        p = stack.start_uac(CALLS, RATE, CALL_MS, busy_every=BUSY_EVERY, limit=4 * RATE)
        time.sleep(STALL_AFTER)
        holder = subprocess.Popen([sys.executable, "-c", _HOLDER, path, str(STALL)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        uac = stack.finish_uac(p, timeout=120)
        out, err = holder.communicate(timeout=60)
        assert holder.returncode == 0, err
        lines = dict(ln.split() for ln in out.splitlines())
        time.sleep(1.0)         # let the last BYEs through
        rows = read_table(path, env)["rows"]
    finally:
        if holder is not None and holder.poll() is None:
            holder.kill()
            holder.wait(10)
        stack.close()
    yield Run(config=config, uac=uac, held=float(lines["held"]), released=float(lines["released"]),
              holder_pid=holder.pid, rows=rows,
              log=stack.log())


def _setup_times(run: Run) -> tuple[list[float], list[float]]:
    """Call setup times (s) of calls answered during the stall, and of the others."""
    u = run.uac
    during, other = [], []
    for cid, t200 in u.answered.items():
        setup = t200 - u.invite[cid]
        (during if run.held <= t200 <= run.released + WAIT_MS / 1e3 else other).append(setup)
    return during, other


def test_the_stall_happened_during_the_calls(run):
    u = run.uac
    first, last = min(u.invite.values()), max(u.answered.values())
    assert first < run.held and run.released < last
    assert run.released - run.held >= STALL
    # The helper found the lock busy: one warning per process, naming the holder.
    # (Right after the stall, workers writing their backlogs may keep the lock
    # busy for a moment on a loaded machine: such warnings name a Kamailio
    # process and are followed by that worker's "free again".)
    warns = [ln for ln in run.log.splitlines() if "busy for more than" in ln]
    assert all("WARNING" in ln for ln in warns)
    by_holder = [ln for ln in warns if f"held by pid {run.holder_pid})" in ln]
    assert 1 <= len(by_holder) <= WORKERS + 1, "\n".join(by_holder)  # + the dialog timer
    # (None: the lock was free again by the time the helper asked who held it)
    others = {re.search(r"held by pid (\w+)\)", ln).group(1) for ln in warns if ln not in by_holder}
    kamailio = set(re.findall(r"^ *\d+\((\d+)\)", run.log, re.M))
    assert others <= kamailio | {"None"}, others
    deferred = [ln for ln in run.log.splitlines() if "free again" in ln]
    assert sum(int(ln.split("writing ")[1].split()[0]) for ln in deferred) > 0


def test_no_call_lost_or_failed(run):
    u = run.uac
    busy = CALLS // BUSY_EVERY
    assert u.returncode == 0, u.output[-2000:]
    assert u.created == CALLS and u.successful == CALLS and u.failed == 0, u.stats
    assert len(u.answered) == CALLS - busy and len(u.completed_answered()) == CALLS - busy


def _q(xs: list[float], q: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))]


def test_call_setup_time_not_raised_beyond_the_wait_limit(run):
    """A worker waits once per stall, at most the limit; a blocked proxy would show the
    stall itself (STALL seconds) in the setup time of every call answered meanwhile."""
    during, other = _setup_times(run)
    assert len(during) > 100 and len(other) > 100
    limit = WAIT_MS / 1e3
    msg = (f"setup during the stall: median {statistics.median(during) * 1e3:.1f} ms, "
           f"p90 {_q(during, 0.9) * 1e3:.1f} ms, max {max(during) * 1e3:.1f} ms; otherwise "
           f"{statistics.median(other) * 1e3:.1f} / {_q(other, 0.9) * 1e3:.1f} / "
           f"{max(other) * 1e3:.1f} ms (wait limit {WAIT_MS} ms)")
    assert statistics.median(during) < statistics.median(other) + limit, msg
    assert _q(during, 0.9) < _q(other, 0.9) + limit, msg
    # The few calls that met a worker's one wait: the wait ends at the limit,
    # and the worker then runs again when the OS gives it a core, which on a
    # loaded 2-core machine takes up to tens of ms more (WAKEUP).  Nothing
    # here comes near the stall's own length.
    assert max(during) < max(other) + limit + WAKEUP, msg


def test_every_answered_call_recorded_afterwards(run):
    from npcalls import NOT_SET
    u = run.uac
    answered = u.completed_answered()
    assert set(run.rows) == answered
    bad = {c: v for c, v in run.rows.items() if NOT_SET in v or not v[1] > v[0]}
    assert not bad, f"{len(bad)} calls without start/end: {list(bad.items())[:5]}"
    # deferred events keep the time they happened, not the time they were written
    order = [c for c, (s, e) in run.rows.items()
             if not (u.invite[c] < s / 1e9 < u.answered[c] and e / 1e9 > u.bye[c])]
    assert not order, f"{len(order)} calls out of order with sipp: {order[:3]}"
    stalled = [c for c, t in u.answered.items() if run.held < t < run.released]
    assert stalled and set(stalled) <= set(run.rows)


def test_no_error_in_kamailio_log(run):
    assert not harness.python_errors(run.log), harness.python_errors(run.log)[:10]
    races, other = harness.error_lines(run.log)
    assert not other, "\n".join(other[:20])
    assert len(races) <= max(1, len(run.uac.answered) // 100)
