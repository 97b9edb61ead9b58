"""Loading CDRs from CSV (with a header) and JSON lines: columns by name, every time unit."""

from __future__ import annotations

import datetime as dt
import gzip
import io
import json
import random
from typing import Any

import numpy as np
import pytest

import npcalls
from npcalls import NOT_SET
from npcalls.export import write_csv, write_jsonl
from npcalls.ingest import TabularParser, ingest
from npcalls.ingest.sources import open_source

T0 = 1_795_668_428_000_000_000         # 2026-11-26T04:47:08Z in ns


def table_dict(t: npcalls.CallTable) -> dict[bytes, tuple[int, int]]:
    snap = t.snapshot()
    return {bytes(k): (int(s), int(e)) for k, s, e in
            zip(snap["key"], snap["start"], snap["end"])}


def make_calls(n: int, seed: int = 1, unit_ns: int = 1) -> dict[str, tuple[int, int]]:
    """Calls with times that are whole multiples of ``unit_ns`` (exact in that unit)."""
    rnd = random.Random(seed)
    out = {}
    for i in range(n):
        st = T0 + rnd.randrange(0, 10**12)
        st -= st % unit_ns
        en = st + rnd.randrange(1, 10**11)
        en -= en % unit_ns
        en = max(en, st + unit_ns)
        cid = f"{i}-{rnd.getrandbits(32):08x}@h{i % 5}.example.com"
        if i % 9 == 0:
            en = NOT_SET                                    # still active: empty end
        out[cid] = (st, en)
    return out


def fmt(ns: int, unit: str) -> str:
    if ns == NOT_SET:
        return ""
    if unit == "ns":
        return str(ns)
    if unit == "us":
        return str(ns // 1000)
    if unit == "ms":
        return str(ns // 1_000_000)
    if unit == "s":
        return str(ns // 1_000_000_000)
    if unit == "s.frac":
        return f"{ns // 10**9}.{ns % 10**9:09d}".rstrip("0").rstrip(".")
    if unit == "iso":                                        # as datetime writes it
        d = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(microseconds=ns // 1000)
        return d.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    if unit == "iso+02":
        d = (dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(microseconds=ns // 1000)
             ).astimezone(dt.timezone(dt.timedelta(hours=2)))
        return d.isoformat()
    if unit == "iso-space":
        d = dt.datetime(1970, 1, 1) + dt.timedelta(microseconds=ns // 1000)
        return d.strftime("%Y-%m-%d %H:%M:%S.%f")
    raise ValueError(unit)


UNITS = {"ns": 1, "us": 1000, "ms": 10**6, "s": 10**9, "s.frac": 1, "iso": 1000,
         "iso+02": 1000, "iso-space": 1000}


def load(t: npcalls.CallTable, text: str | bytes, tmp_path, name: str = "cdr.csv", **kw: Any):
    p = tmp_path / name
    p.write_bytes(text.encode() if isinstance(text, str) else text)
    return ingest(t, [str(p)], **kw)


@pytest.mark.parametrize("unit", list(UNITS))
def test_csv_every_time_unit_exact(make_table, tmp_path, unit):
    calls = make_calls(300, unit_ns=UNITS[unit])
    rows = ["uuid,caller,call_id,end_time,start_time,note"]
    for i, (cid, (st, en)) in enumerate(calls.items()):
        rows.append(f"{i},alice,{cid},{fmt(en, unit)},{fmt(st, unit)},x")
    t = make_table(8192)
    s = load(t, "\n".join(rows) + "\n", tmp_path)
    assert (s.records, s.bad, s.lines) == (300, 0, 301)
    assert table_dict(t) == {k.encode(): v for k, v in calls.items()}
    assert (s.started, s.ended) == (300, sum(1 for v in calls.values() if v[1] != NOT_SET))


@pytest.mark.parametrize("unit", ["s", "ms", "us", "ns", "iso"])
def test_csv_explicit_unit_and_column_names(make_table, tmp_path, unit):
    calls = make_calls(50, seed=2, unit_ns=UNITS[unit])
    rows = ["Setup;ignored,ID,Hangup"]
    rows = ["setup,id,hangup"]
    for cid, (st, en) in calls.items():
        rows.append(f"{fmt(st, unit)},{cid},{fmt(en, unit)}")
    t = make_table(8192)
    s = load(t, "\n".join(rows) + "\n", tmp_path, call_id_col="ID", start_col="Setup",
             end_col="hangup", time_unit=unit)
    assert s.records == 50 and s.bad == 0
    assert table_dict(t) == {k.encode(): v for k, v in calls.items()}


def test_csv_quotes_crlf_bom_blank_lines_and_bad_rows(make_table, tmp_path):
    text = ("\ufeffcall_id,start,end,comment\r\n"
            'a1@h,1795668428.5,1795668430.25,"hello, world"\r\n'
            '"b,2@h",1795668429,,"active"\r\n'
            "\r\n"
            "c3@h,1795668429,1795668431\r\n"                          # 3 fields: bad
            "d4@h,17956684x9,1795668431,x\r\n"                         # unreadable start: bad
            "e5@h,,,nothing\r\n"                                       # no time: bad
            '"f 6@h",1795668429,1795668431,x\r\n'                      # space in the Call-ID
            "g7@h,1795668432,1795668433,x\r\n")
    t = make_table(8192)
    s = load(t, text.encode("utf-8"), tmp_path, show_bad=10)
    assert table_dict(t) == {b"a1@h": (1795668428_500_000_000, 1795668430_250_000_000),
                             b"b,2@h": (1795668429_000_000_000, NOT_SET),
                             b"g7@h": (1795668432_000_000_000, 1795668433_000_000_000)}
    assert (s.records, s.bad, s.ignored) == (3, 4, 1)
    assert [p.line for p in s.problems] == [5, 6, 7, 8]
    assert "expected 4 fields" in s.problems[0].reason
    assert "unreadable start time" in s.problems[1].reason
    assert "no start or end" in s.problems[2].reason


def test_csv_without_quotes_uses_the_same_rules(make_table, tmp_path):
    """The vectorized CSV path and the csv-module path give the same result."""
    calls = make_calls(200, seed=4, unit_ns=1000)
    plain = ["call_id,start,end"] + [f"{k},{fmt(s, 'iso')},{fmt(e, 'iso')}"
                                     for k, (s, e) in calls.items()]
    quoted = ["call_id,start,end"] + [f'"{k}",{fmt(s, "iso")},"{fmt(e, "iso")}"'
                                      for k, (s, e) in calls.items()]
    t1, t2 = make_table(8192), make_table(8192)
    load(t1, "\n".join(plain) + "\n", tmp_path, name="p.csv")
    load(t2, "\n".join(quoted) + "\n", tmp_path, name="q.csv")
    assert table_dict(t1) == table_dict(t2) == {k.encode(): v for k, v in calls.items()}


def test_csv_header_without_a_call_id_column_is_an_error(make_table, tmp_path):
    t = make_table(8192)
    s = load(t, "who,when\nx,1\n", tmp_path, format="csv")
    assert s.errors and "Call-ID column" in s.errors[0]
    s = load(t, "call_id,start\nx,1\n", tmp_path, name="b.csv", start_col="setup")
    assert s.errors and "no start column 'setup'" in s.errors[0]


def test_csv_long_call_ids_are_reported(make_table, tmp_path):
    long = "L" * 90 + "@h"
    t = make_table(8192, key_width=64)
    s = load(t, f"call_id,start,end\nok@h,1795668421,1795668422\n{long},1795668423,1795668424\n",
             tmp_path, time_unit="s")
    assert s.too_long == 1 and s.problems[0].line == 3
    assert table_dict(t) == {b"ok@h": (1795668421 * 10**9, 1795668422 * 10**9)}


@pytest.mark.parametrize("epoch_ns", [False, True])
@pytest.mark.parametrize("fmt_name", ["csv", "jsonl"])
def test_dump_round_trip(make_table, tmp_path, epoch_ns, fmt_name):
    src = make_table(8192)
    calls = make_calls(500, seed=7, unit_ns=1000 if not epoch_ns else 1)
    keys = list(calls)
    src.record_many(keys, [calls[k][0] for k in keys], [calls[k][1] for k in keys])
    src.stop("ended-only@h", T0, insert_missing=True)
    buf = io.StringIO()
    (write_csv if fmt_name == "csv" else write_jsonl)(src.snapshot(), buf, epoch_ns=epoch_ns)
    t = make_table(8192)
    s = load(t, gzip.compress(buf.getvalue().encode()), tmp_path, name="dump.gz")
    assert s.bad == 0 and s.records == 501
    assert table_dict(t) == table_dict(src)


def test_jsonl_units_nulls_and_bad_lines(make_table, tmp_path):
    lines = [
        {"call_id": "a@h", "start": 1795668428.5, "end": 1795668430},           # s, float
        {"callid": "b@h", "start_time": "2026-11-26T04:47:08.25Z", "end_time": None},
        {"call_id": "c@h", "start": "1795668428", "end": "1795668429.125"},      # numeric strings
        "not json at all",
        [1, 2, 3],
        {"call_id": "d@h"},                                                       # no time
        {"call_id": 12, "start": 1},                                              # not a string
        {"call_id": "e@h", "start": True},
        {"call_id": "f@h", "end": 1795668431},
    ]
    text = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n\n"
    t = make_table(8192)
    s = load(t, text, tmp_path, name="x.jsonl")
    assert table_dict(t) == {
        b"a@h": (1795668428_500_000_000, 1795668430_000_000_000),
        b"b@h": (1795668428_250_000_000, NOT_SET),
        b"c@h": (1795668428_000_000_000, 1795668429_125_000_000),
        b"f@h": (NOT_SET, 1795668431_000_000_000)}
    assert s.records == 4 and s.bad == 5
    assert [p.line for p in s.problems] == [4, 5, 6, 7, 8]
    assert s.end_only == 1


@pytest.mark.parametrize("unit,scale", [("ms", 10**6), ("ns", 1), ("us", 1000)])
def test_jsonl_integer_units(make_table, tmp_path, unit, scale):
    calls = make_calls(100, seed=9, unit_ns=scale)
    text = "".join(json.dumps({"id": k, "a": s // scale, "b": None if e == NOT_SET else e // scale})
                   + "\n" for k, (s, e) in calls.items())
    t = make_table(8192)
    s = load(t, text, tmp_path, name="u.jsonl", call_id_col="id", start_col="a", end_col="b",
             time_unit="auto")
    assert s.bad == 0
    assert table_dict(t) == {k.encode(): v for k, v in calls.items()}


def test_csv_parser_alone_and_in_chunks():
    """Header in the first chunk only; units guessed once per column."""
    calls = make_calls(1000, seed=11, unit_ns=10**6)
    text = ("call_id,start,end\n" + "".join(f"{k},{fmt(s, 'ms')},{fmt(e, 'ms')}\n"
                                            for k, (s, e) in calls.items())).encode()
    p = TabularParser("csv")
    lines = text.splitlines(keepends=True)
    got = {}
    base = 0
    for i in range(0, len(lines), 97):
        r = p.parse(b"".join(lines[i:i + 97]), base, "x")
        base += r.lines
        got.update(zip(r.acc_keys.tolist(), zip(r.acc_start.tolist(), r.acc_end.tolist())))
    assert got == {k.encode(): v for k, v in calls.items()}


def test_format_auto_detection(make_table, tmp_path):
    t = make_table(8192)
    s = load(t, "call_id,start,end\nx@h,1795668428,1795668429\n", tmp_path, name="noext")
    assert s.records == 1
    s = load(t, '{"call_id": "y@h", "start": 1795668428}\n', tmp_path, name="noext2")
    assert s.records == 1
    assert set(table_dict(t)) == {b"x@h", b"y@h"}


def test_stdin_chunks_are_whole_lines():
    r = open_source("-", io.BytesIO(b"a\nb\nc"))
    chunks = list(r.chunks())
    assert b"".join(chunks) == b"a\nb\nc\n" and all(c.endswith(b"\n") for c in chunks)


def test_a_live_pipe_is_read_without_waiting_for_a_full_chunk():
    """`tail -f log | npcalls ingest t -`: lines load as they come, not per 4 MB."""
    import os
    import threading
    rfd, wfd = os.pipe()
    os.write(wfd, b"x\ny\n")            # (opening peeks at the first bytes: compressed?)
    src = open_source("-", os.fdopen(rfd, "rb"))
    got: list = []
    th = threading.Thread(target=lambda: got.append(next(src.chunks())), daemon=True)
    th.start()
    th.join(5)
    try:
        assert got == [b"x\ny\n"]
    finally:
        os.close(wfd)


def test_epoch_column_of_mixed_widths_and_empty_cells_is_read_exactly():
    """Most cells of one width are read digit column by digit column, the others
    by numpy's conversion: both give Python's int() of the text, and cells that
    are empty, not digits or past int64 are refused."""
    from npcalls.ingest._vec import parse_column
    cells = [b"1795668428123456789", b"", b"1795668428000000001", b"17", b"x1",
             b"9223372036854775808", b"1795668428999999999", b"0000000000000000042",
             b"1795668428123456789"] * 3
    for unit, scale in (("ns", 1), ("s", 10**9)):
        v, ok = parse_column(np.array(cells, "S19"), unit)
        for c, got, good in zip(cells, v.tolist(), ok.tolist()):
            want = int(c) * scale if c.isdigit() and int(c) * scale < 2**63 else None
            assert (got if good else None) == want, (unit, c)
