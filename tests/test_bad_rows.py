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
    # the issue's case: the continuation of a quoted field must not become a call
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


# ---------------------------------------------------------------------- acc lines cut short

LOG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "kamailio-acc.log")


def _variant(lines: list[bytes], layout: str) -> list[bytes]:
    """The real log, or the same calls in a field order only the careful parser reads."""
    if layout == "fast":
        return lines
    out = []
    for ln in lines:
        ln = re.sub(rb"ACC: transaction answered: (timestamp=\d+;t_ms=[\d.]+);(method=\w+);",
                    rb"ACC: transaction answered: \2;\1;", ln)
        ln = re.sub(rb"(duration=[\d.]+); (call_id=[^;]+);", rb"\2; \1;", ln)
        out.append(ln)
    return out


def _table_of(make_table, tmp_path, lines: list[bytes], tag: str):
    f = tmp_path / f"{tag}.log"
    f.write_bytes(b"".join(ln + b"\n" for ln in lines))
    t = make_table(1024, table_name=f"cut-{tag}")
    s = ingest(t, [str(f)], jobs=1, show_bad=100)
    snap = t.snapshot()
    t.close()
    npcalls.CallTable.unlink(t.path)
    return s, {bytes(k): (int(a), int(b)) for k, a, b in
               zip(snap["key"], snap["start"], snap["end"])}


@pytest.mark.parametrize("layout", ["fast", "careful"])
@pytest.mark.parametrize("which", ["INVITE", "BYE", "CDR"])
def test_a_line_cut_anywhere_never_invents_a_call(make_table, tmp_path, layout, which):
    """Cut one line of the real log at every byte of its acc text, in the middle of the file.

    Whatever the cut, the table is the one the log without that line gives
    (no phantom Call-ID prefix, no wrong time), except when only the last
    field's value lost its end (every field is still there: a good line).
    Once the cut reaches into the fields, the line is a bad line, shown with
    its line number.
    """
    lines = _variant(open(LOG, "rb").read().splitlines()[1500:1740], layout)
    marker = b" start_time=" if which == "CDR" else b"method=" + which.encode() + b";"
    idx = next(i for i in range(100, 240) if marker in lines[i])
    line = lines[idx]
    if which == "CDR":      # a call known by its CDR alone (its acc lines predate the log)
        cid = re.search(rb"call_id=([^;]+)", line).group(1)
        lines = [ln for ln in lines if b";call_id=" + cid + b";" not in ln]
        idx = lines.index(line)
    # the loader's result without the line, and with it whole
    s_without, without = _table_of(make_table, tmp_path, lines[:idx] + lines[idx + 1:], "w")
    s_whole, whole = _table_of(make_table, tmp_path, lines, "whole")
    assert s_without.bad == s_whole.bad == 0 and without != whole
    body = line.index(b"ACC: ") + 5 if which != "CDR" else line.index(b" start_time=") + 1
    # from here on the line is recognisably of its kind (an acc line's kind
    # text is whole; a CDR has start_time and end_time, as other daemons' lines do not)
    fields_from = (line.index(b": ", body) + 2 if which != "CDR"
                   else line.index(b"end_time=") + 9)
    last_value = line.rindex(b"=") + 1
    for cut in range(body, len(line)):
        cut_lines = lines[:idx] + [line[:cut]] + lines[idx + 1:]
        s, got = _table_of(make_table, tmp_path, cut_lines, "cut")
        if cut >= last_value:           # inside the last value: every field is there
            assert got == whole and s.bad == 0, (cut, line[:cut])
            continue
        assert got == without, (cut, line[:cut])
        if cut >= fields_from:
            assert s.bad == 1 and [p.line for p in s.problems] == [idx + 1], \
                (cut, line[:cut], s.problems)


def test_the_issue_case_a_cdr_cut_inside_its_call_id(cli_env, tmp_path):
    lines = open(LOG, "rb").read().splitlines()
    idx = next(i for i in range(1500, 3000) if b" start_time=" in lines[i])
    cid = re.search(rb"call_id=([^;]+);", lines[idx]).group(1)
    cut = lines[idx][:lines[idx].index(cid) + len(cid) - 3]        # "...; call_id=1234-137"
    f = tmp_path / "kam.log"
    f.write_bytes(b"\n".join(lines[:idx] + [cut] + lines[idx + 1:]) + b"\n")
    r, calls = ingest_cli(cli_env, f)
    assert r.returncode == 1, r.stderr
    assert list(bad_lines(r, "kam.log")) == [idx + 1]
    assert cid[:-3] not in calls and cid in calls and len(calls) == 1000


@pytest.mark.parametrize("missing", [b"method", b"call_id", b"code", b"timestamp"])
def test_acc_lines_missing_a_mandatory_field_are_bad(make_table, tmp_path, missing):
    lines = open(LOG, "rb").read().splitlines()[:240]
    idx = next(i for i in range(100, 240) if b"method=INVITE;" in lines[i])
    ln = re.sub(rb";?" + missing + rb"=[^;]*", b"", lines[idx])
    if missing == b"timestamp":
        ln = re.sub(rb"t_ms=[^;]*;", b"", ln)
    s, got = _table_of(make_table, tmp_path, lines[:idx] + [ln] + lines[idx + 1:], "m")
    assert s.bad == 1 and s.problems[0].line == idx + 1, (ln, s.problems)
