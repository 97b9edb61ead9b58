"""The ``npcalls`` command as a new user and a careless input meet it (issue 10).

Every test runs the real command in a subprocess: exit status, stdout,
stderr, what is left on disk.
"""

from __future__ import annotations

import gzip
import os
import stat
import subprocess
import sys
import textwrap

import pytest

import npcalls

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
LOG = os.path.join(DATA, "kamailio-acc.log")

# What `make demo` installs: numpy and xxhash only.  A sitecustomize on
# PYTHONPATH makes the analysis extra's modules unimportable in the child, as
# in a core-only venv (importing any of them raises ModuleNotFoundError).
EXTRA_MODULES = ("pandas", "pyarrow", "matplotlib", "rich", "IPython", "duckdb")
_BLOCKER = textwrap.dedent(f"""\
    import sys
    for _m in {EXTRA_MODULES!r}:
        sys.modules[_m] = None
""")


@pytest.fixture
def core_env(cli_env, tmp_path):
    site = tmp_path / "core-only"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_BLOCKER)
    env = dict(cli_env)
    env["PYTHONPATH"] = str(site) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run(env, *args, stdin: bytes | None = None, timeout: float = 120, **kw):
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    return subprocess.run([sys.executable, "-m", "npcalls", *args], env=env, input=stdin,
                          timeout=timeout, **kw)


def make_demo(env, name="demo"):
    r = run(env, "demo", "--table", name)
    assert r.returncode == 0, r.stderr
    return r


def one_line_error(r, *needles):
    err = r.stderr.decode()
    assert r.returncode == 2, (r.returncode, err)
    assert "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    return err


# ---------------------------------------------------------------------- 1. dump to stdout

def test_dump_parquet_to_stdout_exits_0_and_is_complete(cli_env, tmp_path):
    make_demo(cli_env)
    out = tmp_path / "f.parquet"
    with open(out, "wb") as f:
        r = run(cli_env, "dump", "demo", "--format", "parquet", stdout=f, stderr=subprocess.PIPE)
    assert r.returncode == 0, r.stderr
    assert r.stderr == b""
    import pyarrow.parquet as pq
    assert pq.read_table(out).num_rows == 1000
    r2 = run(cli_env, "dump", "demo", "--format", "parquet", "-o", "-")
    assert r2.returncode == 0 and r2.stderr == b"", r2.stderr
    assert r2.stdout == out.read_bytes()[:4] + r2.stdout[4:] and r2.stdout[:4] == b"PAR1"


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_dump_into_a_closed_pipe_is_quiet(cli_env, fmt):
    make_demo(cli_env)
    # `npcalls dump demo | head -c 10`, in a shell as cron would run it
    cmd = (f"{sys.executable} -m npcalls dump demo --format {fmt} | head -c 10 >/dev/null; "
           "echo \"${PIPESTATUS[0]}\"")
    r = subprocess.run(["bash", "-c", cmd], env=cli_env, capture_output=True, timeout=120)
    assert r.stdout.strip() == b"0", r.stderr
    assert r.stderr == b""


@pytest.mark.parametrize("verb", [["info", "demo"], ["info", "demo", "--json"],
                                  ["get", "demo", "1-13786@127.0.0.1"],
                                  ["dump", "demo"], ["dump", "demo", "--format", "jsonl"],
                                  ["check", "demo"]])
def test_verbs_writing_to_stdout_exit_0(cli_env, verb, tmp_path):
    make_demo(cli_env)
    with open(tmp_path / "out", "wb") as f:
        r = run(cli_env, *verb, stdout=f, stderr=subprocess.PIPE)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out").stat().st_size > 0


# ---------------------------------------------------------------------- 4. core-only install

def test_the_blocker_reproduces_a_core_only_install(core_env):
    code = "import pyarrow"
    r = subprocess.run([sys.executable, "-c", code], env=core_env, capture_output=True)
    assert r.returncode == 1 and b"ModuleNotFoundError" in r.stderr


@pytest.mark.parametrize("args", [["top", "demo", "--once"],
                                  ["dump", "demo", "--format", "parquet", "-o", "OUT"],
                                  ["dump", "demo", "--format", "parquet", "-o", "-"]])
def test_a_verb_needing_the_analysis_extra_says_so(core_env, tmp_path, args):
    make_demo(core_env)
    out = tmp_path / "f.parquet"
    args = [str(out) if a == "OUT" else a for a in args]
    r = run(core_env, *args)
    err = one_line_error(r, "analysis", "pip install 'npcalls[analysis]'")
    assert r.stdout == b""
    assert not out.exists()                  # nothing created, not even a 0-byte file
    assert err.startswith(f"npcalls {args[0]}: ")


def test_unexpected_exceptions_are_one_line_unless_debugging(cli_env, tmp_path):
    # a bug in a verb (here: a sitecustomize makes `info` raise what no verb expects)
    site = tmp_path / "buggy"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent("""\
        import npcalls.cli.table_cmds as tc
        def boom(a):
            raise KeyError("no such thing")
        tc.cmd_info = boom
        """))
    make_demo(cli_env)
    env = dict(cli_env, PYTHONPATH=str(site))
    r = run(env, "info", "demo")
    one_line_error(r, "npcalls info:", "KeyError", "no such thing", "--debug",
                         "NPCALLS_DEBUG=1")
    r = run(env, "--debug", "info", "demo")
    assert r.returncode == 2 and b"Traceback" in r.stderr and b"boom" in r.stderr
    r = run(dict(env, NPCALLS_DEBUG="1"), "info", "demo")
    assert r.returncode == 2 and b"Traceback" in r.stderr


# ---------------------------------------------------------------------- 5. tracebacks from ingest

def test_ingest_csv_on_a_binary_file_is_a_clear_error(cli_env, tmp_path):
    f = tmp_path / "bin.dat"
    f.write_bytes(open(sys.executable, "rb").read(4096))
    r = run(cli_env, "ingest", "t", str(f), "--format", "csv", "--create", "--capacity", "64")
    err = r.stderr.decode()
    assert r.returncode == 2 and "Traceback" not in err, err
    assert "bin.dat" in err and "CSV header" in err


def test_ingest_csv_with_a_huge_header_field_is_a_clear_error(cli_env, tmp_path):
    f = tmp_path / "big.csv"
    f.write_text("call_id,start,end," + "x" * 200_000 + "\na,1795668428,1795668430,y\n")
    r = run(cli_env, "ingest", "t", str(f), "--format", "csv", "--create", "--capacity", "64")
    err = r.stderr.decode()
    assert r.returncode == 2 and "Traceback" not in err, err
    assert "big.csv" in err and "CSV header" in err


# ---------------------------------------------------------------------- make demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_make_demo_hints_work_as_printed(cli_env):
    """`make demo`, then every command of its 'explore it:' line, pasted into a shell."""
    bindir = os.path.dirname(sys.executable)       # the venv the suite runs in
    env = dict(cli_env, PATH="/usr/bin:/bin")      # the venv is not on PATH, as after a clone
    r = subprocess.run(["make", "-s", "-o", ".venv/.installed-core",
                        f"BIN={os.path.relpath(bindir, ROOT)}", "demo"],
                       cwd=ROOT, env=env, capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr
    hint = [ln for ln in r.stdout.decode().splitlines() if ln.startswith("explore it: ")]
    assert len(hint) == 1
    cmds = [c.strip() for c in hint[0][len("explore it: "):].split(";")]
    assert len(cmds) == 3
    for c in cmds:
        h = subprocess.run(["bash", "-c", "set -o pipefail; " + c], cwd=ROOT, env=env,
                           capture_output=True, timeout=120)
        assert h.returncode == 0, (c, h.stderr)
        assert h.stdout.strip() and h.stderr == b"", (c, h.stderr)


def test_demo_hint_names_the_command_as_invoked(cli_env, tmp_path):
    # run through a path that is not on PATH: the hint must repeat that path
    exe = os.path.join(os.path.dirname(sys.executable), "npcalls")
    env = dict(cli_env, PATH="/usr/bin:/bin")
    r = subprocess.run([exe, "demo", "--table", "d2"], env=env, capture_output=True,
                       timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"explore it: {os.path.relpath(exe, tmp_path)} info d2;" in r.stdout.decode() or \
        f"explore it: {exe} info d2;" in r.stdout.decode()


# ---------------------------------------------------------------------- ingest: rough edges

def _ingest(env, *args, stdin=None):
    return run(env, "ingest", "t", *args, "--create", "--capacity", "4096", stdin=stdin)


@pytest.mark.parametrize("what", ["empty", "blank", "ls"])
def test_an_input_without_calls_exits_1_whatever_it_is(cli_env, tmp_path, what):
    f = tmp_path / what
    f.write_bytes({"empty": b"", "blank": b"\n\n", "ls": open("/bin/ls", "rb").read()}[what])
    r = _ingest(cli_env, str(f))
    assert r.returncode == 1, r.stderr
    assert b"no acc, CDR or CSV/JSON call lines" in r.stderr and b"Traceback" not in r.stderr


def test_truncated_gzip_loads_its_readable_prefix_then_exits_1(cli_env, tmp_path):
    data = open(LOG, "rb").read()
    z = gzip.compress(data)
    f = tmp_path / "acc.log.gz"
    f.write_bytes(z[:len(z) // 2])
    r = _ingest(cli_env, str(f))
    err = r.stderr.decode()
    assert r.returncode == 1, err
    assert "acc.log.gz" in err and "truncated" in err and "Traceback" not in err
    # the calls of the readable half are there (the whole log holds 1000)
    with npcalls.CallTable.open(os.path.join(cli_env["NPCALLS_DIR"], "npcalls.t"),
                                readonly=True) as t:
        assert 300 < len(t) < 1000
    m = __import__("re").search(r"read ([\d,]+) lines", err)
    assert 1000 < int(m.group(1).replace(",", "")) < 3000


def test_a_call_id_too_long_for_any_table_says_line_too_long(cli_env, tmp_path):
    lines = open(LOG, "rb").read().splitlines(keepends=True)[:30]
    big = b"x" * 10_000_000
    lines[10] = lines[10].replace(b"call_id=", b"call_id=" + big)
    lines[12] = lines[12].replace(b"call_id=", b"call_id=" + b"y" * 100)
    f = tmp_path / "long.log"
    f.write_bytes(b"".join(lines))
    r = _ingest(cli_env, str(f))
    err = r.stderr.decode()
    assert r.returncode == 1, err
    assert "--key-width 10000" not in err
    assert "line too long" in err and "4096" in err
    assert "--key-width 128" in err                   # a width that fits is still suggested


def test_read_1_line_not_1_lines(cli_env, tmp_path):
    f = tmp_path / "one.log"
    f.write_bytes(open(LOG, "rb").read().splitlines(keepends=True)[0])
    r = _ingest(cli_env, str(f))
    assert r.returncode == 0, r.stderr
    assert b"read 1 line from 1 input" in r.stderr


# ---------------------------------------------------------------------- tables: rough edges

@pytest.mark.parametrize("verb", [["info"], ["get", "x"], ["check"], ["dump"], ["grow", "-c", "64"]])
def test_no_table_names_the_directory_searched(cli_env, verb):
    r = run(cli_env, verb[0], "nosuch", *verb[1:])
    one_line_error(r, "no table 'nosuch'", cli_env["NPCALLS_DIR"])


def _without_root_powers(cmd: list[str]) -> list[str]:
    # root ignores file modes: drop the capabilities that let it (util-linux setpriv)
    if os.geteuid() == 0:
        return ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--", *cmd]
    return cmd


def test_check_runs_read_only_when_it_can_only_read(cli_env):
    make_demo(cli_env)
    path = os.path.join(cli_env["NPCALLS_DIR"], "npcalls.demo")
    for p in (path, path + ".lock"):
        if os.path.exists(p):
            os.chmod(p, 0o444)
    cmd = [sys.executable, "-m", "npcalls", "check", "demo"]
    probe = subprocess.run(_without_root_powers([sys.executable, "-c",
                                                 f"open({path!r}, 'r+b')"]),
                           env=cli_env, capture_output=True)
    assert probe.returncode != 0 and b"PermissionError" in probe.stderr   # truly read-only
    r = subprocess.run(_without_root_powers(cmd), env=cli_env, capture_output=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert b"demo: ok (1000 calls)" in r.stdout and b"read-only" in r.stdout
    r = subprocess.run(_without_root_powers(cmd + ["--repair"]), env=cli_env,
                       capture_output=True, timeout=120)
    one_line_error(r, "--repair", "write")


def test_a_world_writable_mode_is_warned_about(cli_env):
    r = run(cli_env, "create", "ww", "--capacity", "64", "--mode", "0666")
    assert r.returncode == 0, r.stderr
    err = r.stderr.decode()
    assert "warning" in err and "world-writable" in err and "0666" in err
    path = os.path.join(cli_env["NPCALLS_DIR"], "npcalls.ww")
    assert stat.S_IMODE(os.stat(path).st_mode) & 0o002
    # check warns about it too, for tables made elsewhere
    r = run(cli_env, "check", "ww")
    assert r.returncode == 0 and b"world-writable" in r.stdout, r.stdout + r.stderr
    r = run(cli_env, "create", "priv", "--capacity", "64", "--mode", "0640")
    assert r.returncode == 0 and b"warning" not in r.stderr


def test_simulate_into_a_full_table_exits_1_and_names_the_verb(cli_env):
    r = run(cli_env, "create", "small", "--capacity", "16")
    assert r.returncode == 0
    r = run(cli_env, "simulate", "small", "--cps", "200", "--duration", "2s",
            "--mean-hold", "60s", "--workers", "1", "--seed", "1", "-q")
    err = r.stderr.decode()
    assert r.returncode == 1, err
    assert "rejected" in err and "npcalls grow small" in err and "grow()" not in err
