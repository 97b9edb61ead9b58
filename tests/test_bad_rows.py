"""Bad CSV / JSON rows and lines cut short never become calls (issue 10, items 2 and 3).

Loads go through the real ``npcalls ingest`` command in a subprocess (exit
status, the ``file:line`` it prints) and the table is read back; a few tests
call the library with a tiny chunk size to put records across chunk ends.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

import npcalls
from npcalls import NOT_SET
from npcalls.ingest import ingest

NS = 1_000_000_000
T0 = 1_795_668_428          # 2026-11-26, inside the accepted window


@pytest.fixture
def cli_env(tmp_path):
    d = tmp_path / "tables"
    d.mkdir()
    env = dict(os.environ, NPCALLS_DIR=str(d))
    env.pop("TERM", None)
    yield env
    for f in d.iterdir():
        f.unlink()


def ingest_cli(env, path, *args):
    r = subprocess.run([sys.executable, "-m", "npcalls", "ingest", "t", str(path), "--create",
                        "--capacity", "4096", "--show-bad", "100", *args], env=env,
                       capture_output=True, timeout=120)
    with npcalls.CallTable.open(os.path.join(env["NPCALLS_DIR"], "npcalls.t"),
                                readonly=True) as t:
        snap = t.snapshot()
    calls = {bytes(k): (int(s), int(e)) for k, s, e in zip(snap["key"], snap["start"],
                                                           snap["end"])}
    return r, calls


def bad_lines(r, name):
    """``{line: reason}`` of the bad lines the command printed for file ``name``."""
    out = {}
    for m in re.finditer(rf"{re.escape(name)}:(\d+): (.*)", r.stderr.decode()):
        out[int(m.group(1))] = m.group(2)
    return out


def good_rows(n, first=0):
    return [f"ok{i}@h,{T0 + i},{T0 + i + 30}" for i in range(first, first + n)]


def good_calls(n, first=0):
    return {f"ok{i}@h".encode(): ((T0 + i) * NS, (T0 + i + 30) * NS)
            for i in range(first, first + n)}


# ---------------------------------------------------------------------- CSV times

def test_csv_end_before_start_and_times_outside_the_window_are_bad(cli_env, tmp_path):
    rows = (["call_id,start,end"] + good_rows(3)
            + [f"neg@h,{T0 + 715},{T0}",                    # line 5: end before start
               f"epoch@h,{T0},1",                            # line 6: ends in 1970
               f"future@h,{T0},7258118400",                  # line 7: ends in 2200
               f"old@h,946684799,{T0}"]                      # line 8: starts in 1999
            + good_rows(3, 3) + [f"active@h,{T0},"])
    f = tmp_path / "cdr.csv"
    f.write_text("\n".join(rows) + "\n")
    r, calls = ingest_cli(cli_env, f)
    assert r.returncode == 1, r.stderr
    bad = bad_lines(r, "cdr.csv")
    assert sorted(bad) == [5, 6, 7, 8]
    assert "end" in bad[5] and "before" in bad[5] and "start" in bad[5]
    for ln in (6, 7, 8):
        assert "2000-01-01" in bad[ln] and "2100-01-01" in bad[ln]
    want = good_calls(6)
    want[b"active@h"] = (T0 * NS, NOT_SET)
    assert calls == want
    assert "bad lines: 4" in r.stderr.decode()


def test_a_call_of_zero_length_is_fine(cli_env, tmp_path):
    f = tmp_path / "z.csv"
    f.write_text(f"call_id,start,end\nz@h,{T0},{T0}\n")
    r, calls = ingest_cli(cli_env, f)
    assert r.returncode == 0, r.stderr
    assert calls == {b"z@h": (T0 * NS, T0 * NS)}


def test_jsonl_end_before_start_and_times_outside_the_window_are_bad(cli_env, tmp_path):
    lines = [json.dumps({"call_id": f"ok{i}@h", "start": T0 + i, "end": T0 + i + 30})
             for i in range(3)]
    lines += [json.dumps({"call_id": "neg@h", "start": T0 + 715, "end": T0}),        # 4
              json.dumps({"call_id": "epoch@h", "start": T0, "end": "1970-01-01T00:00:01Z"}),
              json.dumps({"call_id": "old@h", "start": 12, "end": None}),            # 6
              json.dumps({"call_id": "ok3@h", "start": T0 + 3, "end": T0 + 33})]
    f = tmp_path / "cdr.jsonl"
    f.write_text("\n".join(lines) + "\n")
    r, calls = ingest_cli(cli_env, f, "--time-unit", "s")
    assert r.returncode == 1, r.stderr
    assert sorted(bad_lines(r, "cdr.jsonl")) == [4, 5, 6]
    assert calls == good_calls(4)


# ---------------------------------------------------------------------- CSV quoting

def test_a_quoted_field_holding_newlines_is_read_as_csv_defines_it(cli_env, tmp_path):
    text = ("call_id,start,end,note\n"
            + "".join(r + ",x\n" for r in good_rows(2))
            + f'multi@h,{T0},{T0 + 60},"first line\nsecond, line\n""third"""\n'   # lines 4-6
            + "".join(r + ",y\n" for r in good_rows(2, 2)))
    f = tmp_path / "notes.csv"
    f.write_text(text)
    r, calls = ingest_cli(cli_env, f)
    assert r.returncode == 0, r.stderr
    want = good_calls(4)
    want[b"multi@h"] = (T0 * NS, (T0 + 60) * NS)
    assert calls == want
    assert "read 8 lines" in r.stderr.decode()


def test_a_newline_inside_a_quoted_call_id_or_time_is_one_bad_row_not_a_call(cli_env, tmp_path):
    # the case: the continuation of a quoted field must not become a call
    text = ("call_id,start,end\n"
            + "".join(r + "\n" for r in good_rows(2))
            + f'"b\nx",{T0},{T0 + 100}\n'                    # lines 4-5: Call-ID with a newline
            + f'c@h,"17956\n68428",{T0 + 100}\n'             # lines 6-7: time with a newline
            + "".join(r + "\n" for r in good_rows(2, 2)))
    f = tmp_path / "q.csv"
    f.write_text(text)
    r, calls = ingest_cli(cli_env, f)
    assert r.returncode == 1, r.stderr
    assert sorted(bad_lines(r, "q.csv")) == [4, 6]
    assert calls == good_calls(4)


def test_an_unterminated_quote_is_counted_bad_and_loses_nothing_before(cli_env, tmp_path):
    text = ("call_id,start,end\n" + "".join(r + "\n" for r in good_rows(3))
            + f'"open@h,{T0},{T0 + 1}\n' + "".join(r + "\n" for r in good_rows(2, 3)))
    f = tmp_path / "open.csv"
    f.write_text(text)
    r, calls = ingest_cli(cli_env, f)
    assert r.returncode == 1, r.stderr
    bad = bad_lines(r, "open.csv")
    assert list(bad) == [5] and "quote" in bad[5]
    assert calls == good_calls(3)       # the rest of the file is inside the open quote


@pytest.mark.parametrize("chunk", [40, 97, 1000])
def test_quoted_records_across_chunk_ends_read_as_in_one_piece(make_table, tmp_path,
                                                                monkeypatch, chunk):
    text = ["call_id,start,end,note\n"]
    want = {}
    for i in range(60):
        note = '"a\nb, ""c""\n"' if i % 3 == 0 else "plain"
        text.append(f"m{i}@h,{T0 + i},{T0 + 2 * i},{note}\n")
        want[f"m{i}@h".encode()] = ((T0 + i) * NS, (T0 + 2 * i) * NS)
    f = tmp_path / "m.csv"
    f.write_text("".join(text))
    monkeypatch.setattr("npcalls.ingest.sources.CHUNK", chunk)
    t = make_table(1024)
    s = ingest(t, [str(f)], jobs=1)
    assert (s.bad, s.records, s.lines) == (0, 60, 1 + 60 + 2 * 20)
    snap = t.snapshot()
    assert {bytes(k): (int(a), int(b)) for k, a, b in
            zip(snap["key"], snap["start"], snap["end"])} == want
