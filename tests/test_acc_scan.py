"""The compiled acc scanner (npcalls/ingest/_scan.c) against the numpy path it speeds up.

The numpy path is the reference: on any input, parsed in any chunks, the two
must give the same events (same dtypes), counts and problem reports.  The
scanner must also survive any bytes: no crash, no read outside the chunk
(checked under AddressSanitizer by building the C file with
``-fsanitize=address,undefined``).
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import sysconfig
import textwrap

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_ingest_acc import LogBuilder, build_mix

import npcalls
from npcalls import NOT_SET
from npcalls.ingest import acc

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
C_FILE = os.path.join(ROOT, "npcalls", "ingest", "_scan.c")


def test_the_extension_is_built_and_used():
    """CI installs with ``pip install -e .``, which builds it (gcc and Python headers are there)."""
    from npcalls.ingest import _scan
    assert acc._scan is _scan
    assert acc.USE_SCAN, "the compiled scanner is off (NPCALLS_INGEST_NUMPY set?)"


def test_the_env_var_selects_the_numpy_path_in_new_processes():
    code = "from npcalls.ingest import acc; print(acc.USE_SCAN)"
    for val, want in (("1", "False"), ("0", "True"), ("", "True")):
        env = dict(os.environ, NPCALLS_INGEST_NUMPY=val)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True).stdout.strip()
        assert out == want, val


def test_without_the_extension_the_numpy_path_loads_the_same(tmp_path):
    """An install without a C compiler has no _scan module: acc.py imports, uses numpy."""
    code = textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "npcalls.ingest._scan":
                    raise ImportError("no compiled scanner (a machine without a compiler)")
        sys.meta_path.insert(0, Block())
        from npcalls.ingest import acc
        assert acc._scan is None and not acc.USE_SCAN
        p = acc.parse_text(open(sys.argv[1], "rb").read(), 64)
        print(len(p.acc_keys), len(p.cdr_keys), p.acc_lines, p.cdr_lines, p.bad)
    """)
    log = os.path.join(DATA, "kamailio-acc.log")
    out = subprocess.run([sys.executable, "-c", code, log], capture_output=True, text=True,
                         check=True).stdout.split()
    with open(log, "rb") as f:
        p = acc.parse_text(f.read(), 64)
    assert acc.USE_SCAN
    assert [int(x) for x in out] == [len(p.acc_keys), len(p.cdr_keys), p.acc_lines,
                                     p.cdr_lines, p.bad]
    assert p.acc_lines > 1000


# ---------------------------------------------------------------------- both paths

def _outcome(p: acc.Parsed) -> tuple:
    return (p.acc_keys.dtype.str, p.acc_keys.tolist(), p.acc_start.tolist(), p.acc_end.tolist(),
            p.cdr_keys.dtype.str, p.cdr_keys.tolist(), p.cdr_start.tolist(), p.cdr_end.tolist(),
            p.lines, p.acc_lines, p.cdr_lines, p.failed, p.ignored, p.bad, p.too_long,
            p.problems)


def _parse_all(data: bytes, key_width: int | None, chunk_lines: int, scan: bool,
               max_problems: int = 5) -> list[tuple]:
    """Parse ``data`` in chunks of ``chunk_lines`` lines with one parser (its state carries)."""
    saved = acc.USE_SCAN
    acc.USE_SCAN = scan
    try:
        if data and not data.endswith(b"\n"):
            data += b"\n"
        lines = data.split(b"\n")[:-1]
        p = acc.AccParser(key_width, max_problems=max_problems)
        out = []
        for i in range(0, len(lines), chunk_lines):
            chunk = b"\n".join(lines[i:i + chunk_lines]) + b"\n"
            out.append(_outcome(p.parse(chunk, i, "in")))
        return out
    finally:
        acc.USE_SCAN = saved


def assert_same(data: bytes, key_width: int | None = 64, chunk_lines: int = 10**9,
                max_problems: int = 5) -> list[tuple]:
    c = _parse_all(data, key_width, chunk_lines, True, max_problems)
    n = _parse_all(data, key_width, chunk_lines, False, max_problems)
    assert c == n
    return c


def test_scanner_takes_the_common_lines_itself():
    """The generated lines of the usual shapes are read by the scanner, not handed back."""
    from npcalls.ingest import _scan
    b = LogBuilder("stderr", seed=2)
    build_mix(b, 100)
    n, *cols = _scan.rows(b.text(), False)
    flags = np.frombuffer(cols[8], np.uint8)
    assert n > 100
    # the usual INVITE/BYE/ACK lines are simple; OpenSIPS-like and odd ones are not
    assert np.count_nonzero(flags & _scan.SIMPLE) >= 0.8 * n
    n, *cols = _scan.rows(b.text(), True)
    flags = np.frombuffer(cols[8], np.uint8)
    assert n > 50
    assert np.count_nonzero(flags & _scan.SIMPLE) >= 0.8 * n
    assert np.count_nonzero(flags & _scan.ANSWERED) >= 0.3 * n


@pytest.mark.parametrize("name", ["kamailio-acc.log", "kamailio-acc-syslog.log"])
@pytest.mark.parametrize("chunk_lines", [10**9, 97, 5])
def test_real_logs_same_results(name, chunk_lines):
    with open(os.path.join(DATA, name), "rb") as f:
        data = f.read()
    out = assert_same(data, 64, chunk_lines)
    assert sum(len(o[1]) for o in out) > 1000          # the log's starts and ends are there


@pytest.mark.parametrize("style", ["stderr", "syslog3164", "syslog3339", "none"])
@pytest.mark.parametrize("time_mode,time_name", [(2, "t_ms"), (2, "time_attr"), (0, "t_ms"),
                                                 (1, "time_exten"), (3, "t_ms")])
@pytest.mark.parametrize("key_width", [None, 24, 64])
def test_generated_logs_same_results(style, time_mode, time_name, key_width):
    b = LogBuilder(style, time_mode=time_mode, time_name=time_name, seed=11)
    build_mix(b, 120, long_ids=True)
    assert_same(b.text(), key_width, 10**9)
    assert_same(b.text(), key_width, 37, max_problems=3)


# Lines a hostile or broken log holds: a valid line, then mutations of it
_GOOD = (b"Nov 26 05:51:55 vm kamailio[16768]: NOTICE: acc [acc.c:268]: acc_log_request(): "
         b"ACC: transaction answered: timestamp=1795668428;t_ms=1795668428.565;method=INVITE;"
         b"from_tag=a;to_tag=b;call_id=c1@h;code=200;reason=OK")
_CDR = (b"Nov 26 05:51:55 vm kamailio[16768]: NOTICE: acc [acc_cdr.c:395]: log_write_cdr(): "
        b"start_time=1795668428.565; end_time=1795668430.123; duration=1.558; call_id=c1@h; "
        b"from_tag=a; to_tag=b")
_PIECES = [b"ACC: ", b": timestamp=", b";t_ms=", b";time_attr=", b";method=", b"INVITE", b"BYE",
           b";call_id=", b";code=", b"200", b"487", b";reason=OK", b"call missed: ",
           b"call ended: ", b"transaction answered", b" start_time=", b"; end_time=",
           b"; duration=", b"1795668428", b".565", b";", b"=", b":", b" ", b"\x00", b"\r",
           b"\n", b"\xff\xfe", b"\xc3\xa9", b"#015#012", b"x" * 70, b"9" * 13]


@st.composite
def hostile_logs(draw) -> bytes:
    lines = []
    for _ in range(draw(st.integers(1, 12))):
        line = bytearray(draw(st.sampled_from([_GOOD, _GOOD.replace(b"INVITE", b"BYE"),
                                               _GOOD.replace(b"t_ms", b"time_attr"),
                                               _GOOD.replace(b";t_ms=1795668428.565", b""),
                                               _CDR, _CDR.replace(b"1.558", b"0"),
                                               _CDR.replace(b".565", b".565123")
                                               .replace(b".123", b".123456"),
                                               b"junk line", b""])))
        for _ in range(draw(st.integers(0, 4))):
            op = draw(st.integers(0, 3))
            i = draw(st.integers(0, len(line)))
            if op == 0:                                 # insert a piece
                line[i:i] = draw(st.sampled_from(_PIECES))
            elif op == 1:                               # cut the line here
                del line[i:]
            elif op == 2 and line:                      # delete a few bytes
                del line[i:i + draw(st.integers(1, 12))]
            else:                                       # overwrite one byte
                line[i:i + 1] = bytes([draw(st.integers(0, 255))])
        lines.append(bytes(line))
    return b"\n".join(lines)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_logs(), st.sampled_from([None, 8, 64]), st.sampled_from([10**9, 3, 1]))
@example(_GOOD + b"\n" + _GOOD[:-20], 64, 10**9)                # cut inside the Call-ID
@example(_GOOD.replace(b"c1@h", b""), 64, 10**9)                # empty Call-ID
@example(_GOOD.replace(b"c1@h", b"c\x00@h"), 64, 10**9)         # NUL in the Call-ID
@example(_GOOD.replace(b"c1@h", b"c\xe9@h"), 64, 10**9)         # not UTF-8
@example(_GOOD.replace(b"c1@h", b"x" * 70), 64, 10**9)          # too long for the table
@example(_CDR + b"\n" + _CDR[:-20], 64, 10**9)
@example(_CDR.replace(b"c1@h", b"c1@h #015"), 64, 10**9)
@example(_CDR.replace(b"; from_tag=a; to_tag=b", b" \t\r"), 64, 10**9)
def test_hypothesis_hostile_logs_same_results(data, key_width, chunk_lines):
    assert_same(data, key_width, chunk_lines)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(_PIECES + [b"a", b"0", b"start_time="]), max_size=40),
       st.binary(max_size=40),
       st.booleans())
def test_hypothesis_rows_are_what_the_regex_finds(pieces, tail, cdr):
    """On any bytes (no newline at the end, NULs, cut markers) the scanner finds the rows
    ``ACC: (.{0,2048})`` finds, and never reads outside them."""
    from npcalls.ingest import _scan
    data = b"".join(pieces) + tail
    n, off, ln, *_ = _scan.rows(data, cdr)
    rx = acc._CDR_RX if cdr else acc._ACC_RX
    want = [(m.start(1 if cdr else 0), len(m.group(1))) for m in rx.finditer(data)]
    got = list(zip(np.frombuffer(off, np.int64).tolist(), np.frombuffer(ln, np.int64).tolist()))
    assert n == len(want) and got == want
    if cdr:
        bol = data.startswith(b"start_time=") or b"\nstart_time=" in data
        assert _scan.rows(data, True)[-1] == bol


def _long_line_cases() -> list[bytes]:
    g = _GOOD
    pad = b"x" * (2048 - len(g.split(b"ACC: ", 1)[1]))
    return [
        g + pad[:-1],                 # a row of 2047 bytes
        g + pad,                      # exactly the capture's 2048 bytes
        g + pad + b"y",               # one more: the capture stops short of the line's end
        g + b";extra=" + b"z" * 5000 + b"ACC: " + g.split(b"ACC: ", 1)[1],   # two rows in a line
        b"ACC: " * 1000,
        g.replace(b";reason=OK", b""),                       # the code ends the row
        g.replace(b"code=200;reason=OK", b"code=20"),        # a truncated code
        g.replace(b"timestamp=1795668428;", b"timestamp=;"),
        g.replace(b"method=INVITE", b"method="),
        g.replace(b"method=INVITE", b"method=INV1TE"),
    ]


@pytest.mark.parametrize("i", range(len(_long_line_cases())))
def test_odd_and_long_lines_same_results(i):
    line = _long_line_cases()[i]
    assert_same(_GOOD + b"\n" + line + b"\n" + _GOOD.replace(b"c1@h", b"c2@h"), 64)


def test_huge_line_and_no_final_newline():
    from npcalls.ingest import _scan
    big = b"ACC: " + b"a" * (8 << 20)                  # 8 MB, no newline anywhere
    n, off, ln, *_ = _scan.rows(big, False)
    assert n == len(acc._ACC_RX.findall(big))
    big = b" start_time=" + b"1" * (8 << 20)
    assert _scan.rows(big, True)[0] == len(acc._CDR_RX.findall(big))
    assert _scan.rows(b"", False)[0] == 0
    assert _scan.rows(b"ACC:", False)[0] == 0
    assert _scan.rows(b"ACC: ", False)[0] == 1
    assert _scan.rows(b" start_time=", True)[0] == 1
    assert _scan.rows(memoryview(_GOOD), False)[0] == 1   # any buffer, not only bytes
    with pytest.raises(TypeError):
        _scan.rows("a str", False)


def test_the_cli_gives_the_same_table_and_report_with_either_path(cli_env, tmp_path):
    """Real processes: ``npcalls ingest`` with the scanner and with NPCALLS_INGEST_NUMPY=1."""
    rnd = random.Random(5)
    with open(os.path.join(DATA, "kamailio-acc.log"), "rb") as f:
        lines = f.read().split(b"\n")
    for i in rnd.sample(range(len(lines)), 40):         # break some lines
        j = rnd.randrange(len(lines[i]) + 1)
        lines[i] = lines[i][:j] + rnd.choice(_PIECES) + lines[i][j + rnd.randrange(5):]
    log = tmp_path / "acc.log"
    log.write_bytes(b"\n".join(lines))                  # no newline at the end
    results = []
    for numpy_only, name in (("0", "c"), ("1", "n")):
        env = dict(cli_env, NPCALLS_INGEST_NUMPY=numpy_only)
        r = subprocess.run([sys.executable, "-m", "npcalls", "ingest", name, str(log), "--create",
                            "--jobs", "1"], env=env, capture_output=True, timeout=120)
        assert r.returncode in (0, 1), r.stderr.decode()
        assert b"Traceback" not in r.stderr
        with npcalls.CallTable.open(os.path.join(cli_env["NPCALLS_DIR"], f"npcalls.{name}"),
                                    readonly=True) as t:
            snap = t.snapshot()
            rows = sorted(zip(snap["key"].tolist(), snap["start"].tolist(),
                              snap["end"].tolist()))
        # the report, without its timing figures and the table's name
        report = re.sub(r"in [0-9.]+ s \([0-9,]+ lines/s\)", "", r.stderr.decode())
        results.append((rows, r.returncode, report.replace(f"'{name}'", "T")
                        .replace(f" {name} ", " T ")))
    assert len(results[0][0]) > 500
    assert results[0] == results[1]


# ---------------------------------------------------------------------- AddressSanitizer

_ASAN_DRIVER = textwrap.dedent("""
    import importlib.machinery, importlib.util, random, sys
    spec = importlib.util.spec_from_file_location(
        "npcalls.ingest._scan", sys.argv[1],
        loader=importlib.machinery.ExtensionFileLoader("npcalls.ingest._scan", sys.argv[1]))
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    good = (b"x ACC: transaction answered: timestamp=1795668428;t_ms=1795668428.565;"
            b"method=INVITE;from_tag=a;to_tag=b;call_id=c1@h;code=200;reason=OK")
    rnd = random.Random(1)
    cdr = (b"x log_write_cdr(): start_time=1795668428.565; end_time=1795668430.123; "
           b"duration=1.558; call_id=c1@h; from_tag=a")
    cases = [b"", b"A", b"ACC: ", b" start_time=", good, good + b"\\n", b"ACC: " + b"a" * 5000]
    for i in range(len(good) + 1):
        cases.append(good[:i])                 # cut everywhere, no newline
    for i in range(len(cdr) + 1):
        cases.append(cdr[:i])
    for _ in range(3000):
        b = bytearray(rnd.choice([good, cdr]))
        for _ in range(rnd.randrange(1, 6)):
            j = rnd.randrange(len(b) + 1)
            b[j:j + rnd.randrange(4)] = bytes(rnd.randrange(256) for _ in range(rnd.randrange(3)))
        cases.append(bytes(b))
    import numpy as np
    for c in cases:
        # a copy in a buffer of exactly its length (numpy's data is one malloc of nbytes;
        # bytes and bytearray keep a NUL after the data), so that ASan's red zone
        # follows the last byte
        for cdr in (False, True):
            m.rows(np.frombuffer(c, np.uint8).copy(), cdr)
    print("ok", len(cases))
""")


def test_scanner_under_address_and_undefined_behaviour_sanitizers(tmp_path):
    """Build _scan.c with -fsanitize=address,undefined and feed it cut and mutated lines:
    any read past a buffer or undefined behaviour aborts the process."""
    cc = os.environ.get("CC", "gcc")
    libasan = subprocess.run([cc, "-print-file-name=libasan.so"], capture_output=True,
                             text=True, check=True).stdout.strip()
    assert os.path.isabs(libasan), f"{cc} has no AddressSanitizer runtime"
    so = tmp_path / ("_scan" + sysconfig.get_config_var("EXT_SUFFIX"))
    subprocess.run([cc, "-shared", "-fPIC", "-g", "-O1", "-fsanitize=address,undefined",
                    "-fno-sanitize-recover=all", "-fno-omit-frame-pointer",
                    f"-I{sysconfig.get_paths()['include']}", C_FILE, "-o", str(so)],
                   check=True, capture_output=True)
    env = dict(os.environ, LD_PRELOAD=libasan, PYTHONMALLOC="malloc",
               ASAN_OPTIONS="detect_leaks=0:abort_on_error=1")
    r = subprocess.run([sys.executable, "-c", _ASAN_DRIVER, str(so)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr[-3000:]
    assert "runtime error" not in r.stderr


# ---------------------------------------------------------------------- times past int64

# t_ms of 11 digits: past int64 nanoseconds (crashed the load: "internal error"); unreadable,
# so the line's time is its timestamp= (as for any unreadable t_ms)
_T_MS_PAST_INT64 = [
    b"x ACC: transaction answered: timestamp=1795668428;t_ms=17956684565;method=BYE;"
    b"from_tag=a;to_tag=b;call_id=c1@h;code=200;reason=OK",
    b"x ACC: transaction answered: timestamp=1795668428;t_ms=17956684565.1;method=BYE;"
    b"from_tag=a;to_tag=b;call_id=c2@h;code=200;reason=OK",
    # the last second int64 holds, plus microseconds that pass it: the second is the time
    b"x ACC: transaction answered: timestamp=9223372036;time_exten=999999;method=INVITE;"
    b"from_tag=a;to_tag=b;call_id=c4@h;code=200;reason=OK",
]
_PAST_INT64 = [
    # a 12-digit timestamp (was stored wrapped, as a date in 2092)
    b"x ACC: transaction answered: timestamp=999999999999;method=INVITE;from_tag=a;to_tag=b;"
    b"call_id=c3@h;code=200;reason=OK",
    b"x log_write_cdr(): start_time=17956684565.1; end_time=17956684566.1; duration=1; "
    b"call_id=c5@h",
    b"x ACC: call ended: created=1;call_start_time=99999999999;duration=5;ms_duration=5000;"
    b"setuptime=1;method=INVITE;from_tag=a;to_tag=b;call_id=c6@h;code=200;reason=OK",
]


@pytest.mark.parametrize("numpy_only", ["0", "1"])
def test_times_past_int64_are_bad_lines_not_a_crash_nor_a_wrapped_date(cli_env, tmp_path,
                                                                        numpy_only):
    good = (b"x ACC: transaction answered: timestamp=1795668428;t_ms=1795668428.565;"
            b"method=INVITE;from_tag=a;to_tag=b;call_id=ok@h;code=200;reason=OK")
    log = tmp_path / "acc.log"
    log.write_bytes(b"\n".join([good] + _T_MS_PAST_INT64 + _PAST_INT64) + b"\n")
    env = dict(cli_env, NPCALLS_INGEST_NUMPY=numpy_only)
    r = subprocess.run([sys.executable, "-m", "npcalls", "ingest", "t", str(log), "--create"],
                       env=env, capture_output=True, timeout=120)
    err = r.stderr.decode()
    assert "internal error" not in err and "Traceback" not in err, err
    assert f"bad lines: {len(_PAST_INT64)}" in err, err
    with npcalls.CallTable.open(os.path.join(cli_env["NPCALLS_DIR"], "npcalls.t"),
                                readonly=True) as t:
        snap = t.snapshot()
        got = sorted(zip(snap["key"].tolist(), snap["start"].tolist(), snap["end"].tolist()))
    sec = 1795668428 * 1_000_000_000
    assert got == [(b"c1@h", NOT_SET, sec), (b"c2@h", NOT_SET, sec),
                   (b"c4@h", 9223372036 * 1_000_000_000, NOT_SET),
                   (b"ok@h", sec + 565_000_000, NOT_SET)]
    for line in _PAST_INT64:
        i = line.find(b"ACC: ")
        r2 = acc.parse_acc_text(line[i + 5:]) if i >= 0 else \
            acc.parse_cdr_text(line[line.find(b" start_time=") + 12:])
        assert r2[0] == acc.BAD, (line, r2)
