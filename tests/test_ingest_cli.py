"""``npcalls ingest`` and ``npcalls demo`` as Unix tools, run as separate processes."""

from __future__ import annotations

import gzip
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

import npcalls
from npcalls import NOT_SET

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
LOG = os.path.join(DATA, "kamailio-acc.log")
MS = 1_000_000


def run(env, *args, stdin: bytes | None = None, timeout: float = 60):
    return subprocess.run([sys.executable, "-m", "npcalls", *args], env=env, input=stdin,
                          capture_output=True, timeout=timeout)


def open_table(env, name: str) -> npcalls.CallTable:
    return npcalls.CallTable.open(os.path.join(env["NPCALLS_DIR"], f"npcalls.{name}"),
                                  readonly=True)


def table_dict(t: npcalls.CallTable) -> dict[bytes, tuple[int, int]]:
    snap = t.snapshot()
    return {bytes(k): (int(s), int(e)) for k, s, e in
            zip(snap["key"], snap["start"], snap["end"])}


_REF = re.compile(rb"t_ms=(\d+)\.(\d{3});method=(\w+);.*?;call_id=([^;]+);code=200;")


def reference(lines: list[bytes]) -> dict[bytes, tuple[int, int]]:
    """Each call's INVITE/BYE times from the acc lines (CDR times as a fallback)."""
    calls: dict[bytes, list] = {}
    cdrs: dict[bytes, tuple] = {}
    for line in lines:
        m = _REF.search(line)
        if m and b"ACC: transaction answered" in line:
            t = int(m.group(1)) * 1000 * MS + int(m.group(2)) * MS
            calls.setdefault(m.group(4), [NOT_SET, NOT_SET])[m.group(3) == b"BYE"] = t
            continue
        m = re.search(rb"start_time=(\d+)\.(\d{3}); end_time=(\d+)\.(\d{3});.*call_id=([^;]+);",
                      line)
        if m:
            cdrs[m.group(5)] = (int(m.group(1)) * 1000 * MS + int(m.group(2)) * MS,
                                int(m.group(3)) * 1000 * MS + int(m.group(4)) * MS)
    for k, (s, e) in cdrs.items():
        c = calls.setdefault(k, [NOT_SET, NOT_SET])
        c[0] = s if c[0] == NOT_SET else c[0]
        c[1] = e if c[1] == NOT_SET else c[1]
    return {k: tuple(v) for k, v in calls.items()}


# ---------------------------------------------------------------------- help and errors

@pytest.mark.parametrize("verb", ["ingest", "demo"])
def test_help(cli_env, verb):
    r = run(cli_env, verb, "--help")
    assert r.returncode == 0
    out = r.stdout.decode()
    assert f"usage: npcalls {verb}" in out
    if verb == "ingest":
        assert "exit status" in out and "--follow" in out and "--key-width" in out


def test_missing_table_is_an_error_without_traceback(cli_env):
    r = run(cli_env, "ingest", "nosuch", LOG)
    assert r.returncode == 2
    err = r.stderr.decode()
    assert "no table 'nosuch'" in err and "--create" in err and "Traceback" not in err


def test_missing_input_is_an_error_but_the_others_load(cli_env, tmp_path):
    r = run(cli_env, "ingest", "t", str(tmp_path / "nope.log"), LOG, "--create")
    assert r.returncode == 2
    err = r.stderr.decode()
    assert "nope.log" in err and "Traceback" not in err
    assert "1,000 started" in err
    with open_table(cli_env, "t") as t:
        assert len(t) == 1000


def test_bad_usage(cli_env):
    r = run(cli_env, "ingest", "t")
    assert r.returncode == 2 and b"usage" in r.stderr


# ---------------------------------------------------------------------- loading

def test_ingest_the_real_log(cli_env):
    r = run(cli_env, "ingest", "calls", LOG, "--create", "--capacity", "4096")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b""                        # data to stdout only when asked
    err = r.stderr.decode()
    assert "3,000 lines" in err and "1,000 started, 1,000 ended, 0 end-only" in err
    with open_table(cli_env, "calls") as t:
        assert table_dict(t) == reference(open(LOG, "rb").read().splitlines())
    # and `npcalls get` sees the same call
    g = run(cli_env, "get", "calls", "3-13786@127.0.0.1", "--epoch-ns")
    assert g.returncode == 0
    fields = g.stdout.decode().split("\t")
    ref = reference(open(LOG, "rb").read().splitlines())[b"3-13786@127.0.0.1"]
    assert (int(fields[1]), int(fields[2])) == ref


def test_stdin_gzip_and_json_summary(cli_env):
    data = open(LOG, "rb").read()
    r = run(cli_env, "ingest", "s", "-", "--create", "--json", "--quiet",
            stdin=gzip.compress(data))
    assert r.returncode == 0, r.stderr
    summ = json.loads(r.stdout)
    assert (summ["lines"], summ["started"], summ["ended"], summ["bad"]) == (3000, 1000, 1000, 0)
    assert summ["sources"] == ["<stdin>"]
    assert r.stderr == b""                         # --quiet


def test_bad_lines_exit_1_with_file_and_line(cli_env, tmp_path):
    lines = open(LOG, "rb").read().splitlines(keepends=True)[:30]
    lines.insert(10, b" 1(1) NOTICE: acc [acc.c:268]: acc_log_request(): ACC: transaction "
                     b"answered: timestamp=1795668428;method=BYE;from_tag=a;to_tag=b;"
                     b"call_id=zz;code=2OO;reason=OK\n")
    lines.insert(20, b" 1(1) NOTICE: acc [acc.c:268]: acc_log_request(): ACC: transaction "
                     b"answered: timestamp=1795668428;t_ms=1795668428.1;method=INVITE\n")
    p = tmp_path / "bad.log"
    p.write_bytes(b"".join(lines))
    r = run(cli_env, "ingest", "b", str(p), "--create", "--show-bad", "1")
    assert r.returncode == 1
    err = r.stderr.decode()
    assert f"{p}:11: acc line: unreadable code '2OO'" in err
    assert ":21:" not in err and "bad lines: 2" in err and "and 1 more" in err
    with open_table(cli_env, "b") as t:
        good = [ln for i, ln in enumerate(lines) if i not in (10, 20)]
        assert table_dict(t) == reference(good)


def test_too_long_call_ids_exit_1_with_hint(cli_env, tmp_path):
    long = b"x" * 100 + b"@h"
    p = tmp_path / "long.log"
    p.write_bytes(b"ACC: transaction answered: timestamp=1795668428;t_ms=1795668428.500;"
                  b"method=INVITE;from_tag=a;to_tag=b;call_id=" + long + b";code=200;reason=OK\n"
                  b"ACC: transaction answered: timestamp=1795668429;t_ms=1795668429.500;"
                  b"method=INVITE;from_tag=a;to_tag=b;call_id=short@h;code=200;reason=OK\n")
    r = run(cli_env, "ingest", "k", str(p), "--create", "--key-width", "64")
    assert r.returncode == 1
    err = r.stderr.decode()
    assert "long.log:1: Call-ID is 102 bytes" in err and "--key-width" in err
    with open_table(cli_env, "k") as t:
        assert table_dict(t) == {b"short@h": (1795668429_500 * MS, NOT_SET)}
    r = run(cli_env, "ingest", "k2", str(p), "--create", "--key-width", "128")
    assert r.returncode == 0
    with open_table(cli_env, "k2") as t:
        assert t.get(long) == (1795668428_500 * MS, NOT_SET)


def test_input_with_no_calls_exits_1(cli_env, tmp_path):
    p = tmp_path / "other.log"
    p.write_text("Nov 26 04:51:55 vm sshd[1]: Accepted publickey for root\n" * 5)
    r = run(cli_env, "ingest", "o", str(p), "--create")
    assert r.returncode == 1
    assert b"5 other lines ignored" in r.stderr and b"no acc" in r.stderr


def test_csv_columns_from_the_command_line(cli_env, tmp_path):
    p = tmp_path / "cdr.csv"
    p.write_text("Setup,Hangup,Session\n1795668428000,1795668430500,a@h\n"
                 "1795668429000,,b@h\n")
    r = run(cli_env, "ingest", "c", str(p), "--create", "--call-id-col", "session",
            "--start-col", "setup", "--end-col", "hangup", "--time-unit", "ms")
    assert r.returncode == 0, r.stderr
    with open_table(cli_env, "c") as t:
        assert table_dict(t) == {b"a@h": (1795668428 * 10**9, 1795668430_500 * MS),
                                 b"b@h": (1795668429 * 10**9, NOT_SET)}


def test_dump_then_ingest_round_trip(cli_env, tmp_path):
    assert run(cli_env, "ingest", "a", LOG, "--create", "-q").returncode == 0
    d = run(cli_env, "dump", "a", "-f", "jsonl")
    assert d.returncode == 0
    r = run(cli_env, "ingest", "b", "-", "--create", "-q", stdin=d.stdout)
    assert r.returncode == 0, r.stderr
    with open_table(cli_env, "a") as ta, open_table(cli_env, "b") as tb:
        assert table_dict(ta) == table_dict(tb)


# ---------------------------------------------------------------------- demo

def test_demo_with_only_the_core_dependencies(cli_env):
    """`npcalls demo` needs numpy and xxhash only: rich, pandas & co are made unimportable."""
    code = ("import sys\n"
            "for m in ('rich', 'pandas', 'pyarrow', 'matplotlib', 'duckdb'):\n"
            "    sys.modules[m] = None\n"
            "from npcalls.cli import main\n"
            "sys.exit(main(['demo', '--table', 'mydemo']))\n")
    r = subprocess.run([sys.executable, "-c", code], env=cli_env, capture_output=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    assert "1,000 started, 1,000 ended" in out and "1000 calls: 0 active, 1000 ended" in out
    assert "1-13786@127.0.0.1" in out
    with open_table(cli_env, "mydemo") as t:
        assert table_dict(t) == reference(open(LOG, "rb").read().splitlines())
    # run again: the table is recreated, not added to
    r = run(cli_env, "demo", "--table", "mydemo")
    assert r.returncode == 0 and b"1,000 started" in r.stdout


# ---------------------------------------------------------------------- follow

def wait_for(pred, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.1)
    return pred()


def test_follow_survives_appends_rotation_and_truncation(cli_env, tmp_path):
    lines = open(LOG, "rb").read().splitlines(keepends=True)
    parts = [lines[:300], lines[300:600], lines[600:900], lines[900:1200]]
    log = tmp_path / "kamailio.log"
    log.write_bytes(b"".join(parts[0]))
    p = subprocess.Popen([sys.executable, "-m", "npcalls", "ingest", "live", str(log),
                          "--follow", "--create", "--capacity", "4096"],
                         env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        def table_is(want):
            def check():
                try:
                    with open_table(cli_env, "live") as t:
                        return table_dict(t) == want
                except npcalls.TableNotFoundError:
                    return False
            return check

        # the CDR lines of calls whose BYE has not been read yet wait up to 2 s
        assert wait_for(table_is(reference(parts[0])), 15)
        with open(log, "ab") as f:                          # the proxy writes on
            f.write(b"".join(parts[1]))
        assert wait_for(table_is(reference(parts[0] + parts[1])), 15)
        os.rename(log, str(log) + ".1")                     # logrotate: rename, new file
        with open(str(log) + ".1", "ab") as f:              # a late write to the old file
            f.write(parts[2][0])
        log.write_bytes(b"".join(parts[2][1:]))
        assert wait_for(table_is(reference(parts[0] + parts[1] + parts[2])), 15)
        with open(log, "r+b") as f:                         # copytruncate
            f.truncate(0)
        time.sleep(0.6)
        with open(log, "ab") as f:
            f.write(b"".join(parts[3]))
        assert wait_for(table_is(reference(lines[:1200])), 15)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=15)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err
    assert b"read 1,200 lines" in err and b"Traceback" not in err
