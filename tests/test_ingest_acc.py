"""Loading Kamailio/OpenSIPS acc logs: the real logs, and generated harder variants.

Expectations never come from the code under test: for the real logs a tiny
regex reader written here finds each call's INVITE and BYE lines; for the
generated logs the generator itself records which calls it wrote and with
which times (integer milliseconds, so the expected nanoseconds are exact).
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import random
import re
from typing import Any

import numpy as np
import pytest

import npcalls
from npcalls import NOT_SET
from npcalls.ingest import AccParser, Loader, aggregate, ingest, parse_acc_text, parse_cdr_text
from npcalls.ingest import parallel as par

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
REAL = [os.path.join(DATA, "kamailio-acc.log"), os.path.join(DATA, "kamailio-acc-syslog.log")]
MS = 1_000_000


def table_dict(t: npcalls.CallTable) -> dict[bytes, tuple[int, int]]:
    snap = t.snapshot()
    return {bytes(k): (int(s), int(e)) for k, s, e in
            zip(snap["key"], snap["start"], snap["end"])}


def expected_dict(calls: dict[str, list]) -> dict[bytes, tuple[int, int]]:
    return {k.encode(): (NOT_SET if v[0] is None else v[0], NOT_SET if v[1] is None else v[1])
            for k, v in calls.items()}


# ---------------------------------------------------------------------- real logs

_REF_ACC = re.compile(r"ACC: transaction answered: timestamp=\d+;t_ms=(\d+)\.(\d{3});"
                      r"method=(\w+);.*?;call_id=([^;]+);code=(\d+);")
_REF_CDR = re.compile(r"start_time=(\d+)\.(\d{3}); end_time=(\d+)\.(\d{3}); duration=[\d.]+; "
                      r"call_id=([^;]+);")


def reference(path: str) -> tuple[dict, dict]:
    """Each call's (INVITE 200 time, BYE 200 time) and (CDR start, CDR end), by regex."""
    acc: dict[str, list] = {}
    cdr: dict[str, tuple] = {}
    with open(path) as f:
        for line in f:
            m = _REF_ACC.search(line)
            if m:
                t = int(m.group(1)) * 1000 * MS + int(m.group(2)) * MS
                c = acc.setdefault(m.group(4), [None, None])
                assert m.group(5) == "200"
                c[0 if m.group(3) == "INVITE" else 1] = t
                continue
            m = _REF_CDR.search(line)
            if m:
                cdr[m.group(5)] = (int(m.group(1)) * 1000 * MS + int(m.group(2)) * MS,
                                   int(m.group(3)) * 1000 * MS + int(m.group(4)) * MS)
    return acc, cdr


@pytest.mark.parametrize("path", REAL, ids=["stderr", "syslog"])
def test_real_log_exact_calls_and_times(make_table, path):
    acc, cdr = reference(path)
    assert len(acc) == 1000 and len(cdr) == 1000
    t = make_table(8192)
    s = ingest(t, [path])
    assert (s.lines, s.acc_lines, s.cdr_lines) == (3000, 2000, 1000)
    assert (s.started, s.ended, s.end_only, s.bad, s.too_long, s.ignored) == \
        (1000, 1000, 0, 0, 0, 0)
    assert table_dict(t) == expected_dict(acc)
    # the acc lines, not the CDRs, gave the times (they differ by a few ms)
    differ = sum(1 for k in acc if tuple(acc[k]) != cdr[k])
    assert differ > 900
    st = t.stats()
    assert (st.count, st.ended, st.active, st.end_only) == (1000, 1000, 0, 0)


@pytest.mark.parametrize("path", REAL, ids=["stderr", "syslog"])
def test_real_log_cdr_lines_alone_give_the_calls(make_table, tmp_path, path):
    acc, cdr = reference(path)
    only = tmp_path / "cdr.log"
    with open(path) as f, open(only, "w") as g:
        g.writelines(line for line in f if "log_write_cdr" in line)
    t = make_table(8192)
    s = ingest(t, [str(only)])
    assert (s.lines, s.cdr_lines, s.acc_lines, s.started, s.ended) == (1000, 1000, 0, 1000, 1000)
    assert table_dict(t) == {k.encode(): v for k, v in cdr.items()}


@pytest.mark.parametrize("cdr_lines", [12, 10_000])
def test_real_log_in_tiny_chunks_and_batches_keeps_the_acc_times(make_table, cdr_lines):
    """CDRs and BYEs land in different chunks and batches: still no CDR time wins."""
    path = REAL[0]
    acc, _ = reference(path)
    t = make_table(8192)
    loader = Loader(t, batch_rows=1, cdr_lines=cdr_lines)
    parser = AccParser(t.key_width)
    lines = open(path, "rb").read().splitlines(keepends=True)
    base = 0
    for i in range(0, len(lines), 5):
        p = parser.parse(b"".join(lines[i:i + 5]), base, "x")
        base += p.lines
        loader.add(p)
    s = loader.close()
    assert loader.writes > 100
    assert (s.started, s.ended, s.end_only) == (1000, 1000, 0)
    assert table_dict(t) == expected_dict(acc)


def test_loading_twice_changes_nothing(make_table):
    t = make_table(8192)
    ingest(t, [REAL[0]])
    before = table_dict(t)
    s = ingest(t, [REAL[0]])
    assert (s.started, s.ended) == (0, 0)
    assert table_dict(t) == before


def test_both_real_logs_in_one_run(make_table):
    t = make_table(8192)
    s = ingest(t, REAL)
    assert s.sources == REAL
    assert (s.lines, s.started, s.ended) == (6000, 2000, 2000)
    assert len(t) == 2000


# ---------------------------------------------------------------------- generated logs

_PIDS = [16768 + i for i in range(8)]
_MONTHS = "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split()


class LogBuilder:
    """Writes acc logs the way Kamailio does, and remembers what each call should be.

    Times are integer milliseconds since the epoch.  ``expected`` maps each
    Call-ID that must be in the table to ``[start_ns or None, end_ns or None]``.
    """

    def __init__(self, style: str = "stderr", time_mode: int = 2, time_name: str = "t_ms",
                 eol: str = "\n", seed: int = 1) -> None:
        self.style = style
        self.time_mode = time_mode
        self.time_name = time_name
        self.eol = eol
        self.rnd = random.Random(seed)
        self.lines: list[tuple[float, int, bytes]] = []
        self.expected: dict[str, list] = {}
        self.bad_lines: list[bytes] = []
        self._n = 0

    # -- formatting
    def _prefix(self, ms: int, cdr: bool = False) -> str:
        r = self.rnd.randrange(8)
        where = ("acc [acc_cdr.c:395]: log_write_cdr(): " if cdr
                 else "acc [acc.c:268]: acc_log_request(): ")
        if self.style == "stderr":
            return f" {r + 1}({_PIDS[r]}) NOTICE: {where}"
        tm = np.datetime64(ms, "ms").astype("datetime64[us]").astype(object)
        if self.style == "syslog3339":
            return (f"{tm.strftime('%Y-%m-%dT%H:%M:%S')}.{tm.microsecond:06d}+00:00 vm "
                    f"kamailio[{_PIDS[r]}]: NOTICE: {where}")
        if self.style == "syslog3164":
            return (f"{_MONTHS[tm.month - 1]} {tm.day:2d} {tm.strftime('%H:%M:%S')} vm "
                    f"kamailio[{_PIDS[r]}]: NOTICE: {where}")
        return ""

    def _time(self, ms: int, us_extra: int = 0) -> tuple[str, int]:
        """The time fields of an acc line and the time the loader must take from them."""
        sec = ms // 1000
        if self.time_mode == 0:
            return f"timestamp={sec}", sec * 1000 * MS
        if self.time_mode == 1:
            us = (ms % 1000) * 1000 + us_extra
            return f"timestamp={sec};time_exten={us}", sec * 1000 * MS + us * 1000
        if self.time_mode == 2:
            return (f"timestamp={sec};{self.time_name}={sec}.{ms % 1000:03d}",
                    ms * MS)
        dt = np.datetime64(sec, "s").astype(object).strftime("%Y-%m-%d %H:%M:%S")
        return f"timestamp={sec};{self.time_name}={dt}", sec * 1000 * MS

    def add(self, ms: float, text: str | bytes, cdr: bool = False, raw: bool = False) -> None:
        if isinstance(text, str):
            text = text.encode()
        line = text if raw else self._prefix(int(ms), cdr).encode() + text
        self._n += 1
        self.lines.append((ms, self._n, line))

    def acc(self, ms: int, method: str, cid: str, code: int, reason: str = "OK",
            kind: str = "transaction answered", ft: str = "a1", tt: str = "b1",
            extra: bytes = b"") -> int:
        us_extra = self.rnd.randrange(1000) if self.time_mode == 1 else 0
        tf, t = self._time(ms, us_extra)
        line = (f"ACC: {kind}: {tf};method={method};from_tag={ft};to_tag={tt};call_id={cid};"
                f"code={code};reason={reason};src_user=alice;src_domain=example.com;"
                f"src_ip=10.0.0.1;dst_ouser=bob;dst_user=bob;dst_domain=example.com;ua=").encode()
        self.add(ms, line + (extra or b"Phone/1.0") + f";pid={_PIDS[0]}".encode())
        return t

    def cdr(self, st_ms: int, en_ms: int, cid: str, duration: str | None = None) -> None:
        d = duration if duration is not None else (
            "0" if st_ms == en_ms else f"{(en_ms - st_ms) // 1000}.{(en_ms - st_ms) % 1000:03d}")
        self.add(en_ms, f"start_time={st_ms // 1000}.{st_ms % 1000:03d}; "
                        f"end_time={en_ms // 1000}.{en_ms % 1000:03d}; duration={d}; "
                        f"call_id={cid}; src_user=alice", cdr=True)

    # -- calls
    def answered(self, cid: str, t0: int, dur: int, *, invite: bool = True, bye: bool = True,
                 cdr: bool = True, reinvite: bool = False, callee_bye: bool = False,
                 bye_first: bool = False, extra: bytes = b"") -> None:
        start = end = None
        ft, tt = f"f{t0}", f"t{t0}"
        if invite:
            start = self.acc(t0, "INVITE", cid, 200, ft=ft, tt=tt, extra=extra)
        if reinvite:
            self.acc(t0 + dur // 2, "INVITE", cid, 200, ft=tt, tt=ft)
        if bye:
            end = self.acc(t0 + dur, "BYE", cid, 200, ft=tt if callee_bye else ft,
                           tt=ft if callee_bye else tt)
            if bye_first:
                # the BYE's line is written (by another worker) before the INVITE's
                _, n, line = self.lines.pop()
                self.lines.append((t0 - 1, n, line))
        if cdr:
            # the dialog's own times: confirmed by the ACK a few ms after the
            # INVITE's 200, ended by the BYE request a few ms before its 200
            self.cdr(t0 + 4, t0 + dur - 3, cid)
            if not invite:
                start = (t0 + 4) * MS
            if not bye:
                end = (t0 + dur - 3) * MS
        if not invite and not bye and not cdr:
            return
        self.expected[cid] = [start, end]

    def failed(self, cid: str, t0: int, code: int = 486, reason: str = "Busy Here",
               cdr: bool = True) -> None:
        self.acc(t0, "INVITE", cid, code, reason, kind="call missed", tt="")
        self.acc(t0, "INVITE", cid, code, reason, tt="")
        if cdr:
            self.cdr(t0, t0, cid)

    def cancelled(self, cid: str, t0: int, ring: int = 3000) -> None:
        self.acc(t0 + ring, "INVITE", cid, 487, "Request Terminated", kind="call missed", tt="")
        self.acc(t0 + ring, "INVITE", cid, 487, "Request Terminated", tt="")
        self.acc(t0 + ring, "CANCEL", cid, 200, "OK", tt="")
        self.cdr(t0, t0, cid)

    def challenged(self, cid: str, t0: int, dur: int) -> None:
        self.acc(t0, "INVITE", cid, 407, "Proxy Authentication Required", kind="call missed",
                 tt="")
        self.acc(t0, "INVITE", cid, 407, "Proxy Authentication Required", tt="")
        self.cdr(t0, t0, cid)
        self.answered(cid, t0 + 30, dur)

    def noise(self, cid: str, t0: int) -> None:
        self.add(t0, f" 3(16771) INFO: <script>: call_id={cid} method=INVITE code=200 "
                     f"t_ms={t0 // 1000}.{t0 % 1000:03d}", raw=True)
        self.add(t0, f" 2(16770) ERROR: tm [t_reply.c:641]: bad reply: Call-ID: {cid}; "
                     f"CSeq: 1 BYE;code=200;", raw=True)
        self.add(t0, " 1(16769) WARNING: <core> [core/parser/msg_parser.c:749]: raw packet "
                     "[INVITE sip:bob@example.com SIP/2.0#015#012Call-ID: x@y#015#012]", raw=True)

    def bad(self, t0: int, text: str | bytes) -> None:
        b = text.encode() if isinstance(text, str) else text
        self.add(t0, b)
        self.bad_lines.append(self.lines[-1][2])

    def text(self, shuffle_ms: int = 0) -> bytes:
        """The log, in time order (+- ``shuffle_ms``: workers log concurrently)."""
        rnd = random.Random(self._n)
        order = sorted(self.lines, key=lambda x: (x[0] + rnd.uniform(-shuffle_ms, shuffle_ms),
                                                  x[1]))
        out = []
        for _, _, line in order:
            if self.eol == "#015#012":
                out.append(line + b"#015#012\n")
            else:
                out.append(line + self.eol.encode())
        return b"".join(out)

    def line_numbers_of_bad(self, text: bytes) -> list[int]:
        lines = text.split(b"\n")
        want = set(self.bad_lines)
        return [i + 1 for i, line in enumerate(lines)
                if line.rstrip(b"\r").removesuffix(b"#015#012") in want]


def callid(i: int, rnd: random.Random, long: bool = False) -> str:
    # legal RFC 3261 word characters, including the unusual ones
    unusual = "-.!%*_+`'~()<>:\\\"/[]?{}"
    if long:
        n = rnd.randrange(70, 131)
        body = "".join(rnd.choice("abcdef0123456789" + unusual) for _ in range(n - 12))
        return f"{body}{i:06d}@h.xyz"[:n]
    if i % 7 == 0:
        return f"{i}{rnd.choice(unusual)}{rnd.getrandbits(40):x}@[2001:db8::{i % 9}]"
    return f"{i}-{_PIDS[i % 8]}@10.0.{i % 250}.1"


def build_mix(b: LogBuilder, n: int, seed: int = 5, long_ids: bool = False) -> None:
    rnd = random.Random(seed)
    t = 1_795_668_428_000
    for i in range(n):
        t += rnd.randrange(1, 40)
        cid = callid(i, rnd, long=long_ids and i % 5 == 0)
        r = i % 20
        dur = rnd.randrange(500, 200_000)
        if r < 8:
            b.answered(cid, t, dur, reinvite=(r == 1), callee_bye=(r == 2), bye_first=(r == 3),
                       extra=b"Caf\xe9 \xff\xfe phone" if r == 4 else b"")
        elif r == 8:
            b.answered(cid, t, dur, invite=False)            # the log starts mid-call (CDR)
        elif r == 9:
            b.answered(cid, t, dur, invite=False, cdr=False)  # BYE alone: end-only
        elif r == 10:
            b.answered(cid, t, dur, bye=False, cdr=False)     # still active
        elif r == 11:
            b.answered(cid, t, dur, cdr=False)
        elif r == 12:
            b.answered(cid, t, dur, invite=False, bye=False)  # CDR alone
        elif r == 13:
            b.failed(cid, t)
        elif r == 14:
            b.failed(cid, t, 603, "Decline", cdr=False)
        elif r == 15:
            b.cancelled(cid, t)
        elif r == 16:
            b.challenged(cid, t, dur)
        elif r == 17:
            b.noise(cid, t)
        elif r == 18:
            b.answered(cid, t, dur)
            b.noise(cid, t + 1)
        else:
            b.failed(cid, t, 480, "Temporarily Unavailable")


def _load_bytes(t: npcalls.CallTable, data: bytes, tmp_path, name: str = "acc.log",
                **kw: Any):
    p = tmp_path / name
    p.write_bytes(data)
    return ingest(t, [str(p)], **kw)


STYLES = ["stderr", "syslog3339", "syslog3164", "none"]


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("time_mode,time_name", [(0, ""), (1, "time_exten"), (2, "t_ms"),
                                                 (2, "time_attr"), (4, "time_attr")])
def test_generated_mix_exact(make_table, tmp_path, style, time_mode, time_name):
    b = LogBuilder(style, time_mode, time_name, seed=hash((style, time_mode)) & 0xFFFF)
    build_mix(b, 400)
    data = b.text(shuffle_ms=3)
    t = make_table(8192, key_width=64)
    s = _load_bytes(t, data, tmp_path)
    assert (s.bad, s.too_long) == (0, 0), s.problems
    assert table_dict(t) == expected_dict(b.expected)
    n_end_only = sum(1 for v in b.expected.values() if v[0] is None)
    assert s.end_only == n_end_only > 0
    assert s.started == sum(1 for v in b.expected.values() if v[0] is not None)
    assert s.ended == sum(1 for v in b.expected.values() if v[1] is not None)
    # noise lines (3 per noise call) are ignored, never calls
    assert s.ignored == data.count(b"<script>") + data.count(b"ERROR: tm") + \
        data.count(b"raw packet")


@pytest.mark.parametrize("eol", ["\r\n", "#015#012"])
def test_crlf_and_rsyslog_escapes(make_table, tmp_path, eol):
    b = LogBuilder("syslog3339", eol=eol)
    build_mix(b, 200)
    t = make_table(8192)
    s = _load_bytes(t, b.text(), tmp_path)
    assert (s.bad, s.too_long) == (0, 0), s.problems
    assert table_dict(t) == expected_dict(b.expected)


def test_long_call_ids_and_unusual_characters(make_table, tmp_path):
    b = LogBuilder()
    build_mix(b, 300, long_ids=True)
    data = b.text(shuffle_ms=2)
    assert max(len(k) for k in b.expected) >= 120
    t = make_table(8192, key_width=160)
    s = _load_bytes(t, data, tmp_path)
    assert (s.bad, s.too_long) == (0, 0), s.problems
    assert table_dict(t) == expected_dict(b.expected)


def test_call_ids_longer_than_the_key_width_are_reported_never_truncated(make_table, tmp_path):
    b = LogBuilder()
    build_mix(b, 300, long_ids=True)
    data = b.text()
    t = make_table(8192, key_width=64)
    s = _load_bytes(t, data, tmp_path, show_bad=1000)
    # the lines that would start or end a call (not those of failed calls)
    lines = data.split(b"\n")
    event = re.compile(rb"ACC: transaction answered: .*method=(INVITE|BYE);.*code=2\d\d;"
                       rb"|start_time=.*duration=[1-9]")
    long_lines = [i + 1 for i, ln in enumerate(lines)
                  if (m := re.search(rb"call_id=([^;]+)[;\n]", ln + b"\n")) and len(m.group(1)) > 64
                  and event.search(ln)]
    assert s.too_long == len(long_lines) > 0
    assert sorted(p.line for p in s.problems if p.kind == "too_long") == long_lines
    assert all("key width" in p.reason for p in s.problems)
    assert "larger key width" in s.format()
    want = {k: v for k, v in expected_dict(b.expected).items() if len(k) <= 64}
    got = table_dict(t)
    assert got == want
    # nothing was stored under a prefix of a long Call-ID
    for k in b.expected:
        if len(k) > 64:
            assert k.encode()[:64] not in got


def test_bad_lines_are_counted_reported_and_harmless(make_table, tmp_path):
    b = LogBuilder()
    build_mix(b, 100)
    t0 = 1_795_668_500_000
    b.bad(t0, "ACC: transaction answered: timestamp=1795668500;t_ms=1795668500.1;method=INVITE;"
              "from_tag=x;to_tag=y;call_id=trunc")                         # truncated
    b.bad(t0 + 1, "ACC: transaction answered: timestamp=1795668500;method=INVITE;from_tag=x;"
                  "to_tag=y;call_id=c1@x;code=2x0;reason=OK")             # unreadable code
    b.bad(t0 + 2, "ACC: transaction answered: timestamp=17956x8500;method=BYE;from_tag=x;"
                  "to_tag=y;call_id=c2@x;code=200;reason=OK")              # unreadable time
    b.bad(t0 + 3, "ACC: transaction answered: timestamp=1795668500;from_tag=x;to_tag=y;"
                  "call_id=c3@x;code=200;reason=OK")                       # no method
    b.bad(t0 + 4, "ACC: transaction answered: timestamp=1795668500;method=INVITE;from_tag=x;"
                  "to_tag=y;code=200;reason=OK")                           # no Call-ID
    b.bad(t0 + 5, b"ACC: transaction answered: timestamp=1795668500;method=INVITE;from_tag=x;"
                  b"to_tag=y;call_id=c\xff\xfe@x;code=200;reason=OK")     # Call-ID not UTF-8
    b.bad(t0 + 6, "start_time=1795668500.000; end_time=17956x8501.000; duration=1.000; "
                  "call_id=c4@x")                                          # unreadable CDR time
    b.bad(t0 + 7, "ACC: transaction answered: timestamp=1795668500;method=INVITE;from_tag=x;"
                  "to_tag=y;call_id=c 5@x;code=200;reason=OK")            # space in Call-ID
    data = b.text()
    t = make_table(8192)
    s = _load_bytes(t, data, tmp_path, show_bad=3)
    assert s.bad == 8
    assert len(s.problems) == 3
    want_lines = b.line_numbers_of_bad(data)
    assert len(want_lines) == 8
    assert [p.line for p in s.problems] == want_lines[:3]
    assert all(p.source.endswith("acc.log") for p in s.problems)
    text = s.format()
    assert f"acc.log:{want_lines[0]}:" in text and "and 5 more" in text
    # the good lines all loaded, the bad ones changed nothing
    assert table_dict(t) == expected_dict(b.expected)
    # every problem is reported when asked
    t2 = make_table(8192)
    s2 = _load_bytes(t2, data, tmp_path, name="again.log", show_bad=100)
    assert [p.line for p in s2.problems] == want_lines


def test_non_utf8_extras_do_not_make_a_line_bad(make_table, tmp_path):
    b = LogBuilder()
    b.answered("nonutf@x", 1_795_668_428_000, 1500, extra=b"\xc3\x28\xff\xfe\x80 Phone")
    b.answered("utf8@x", 1_795_668_429_000, 1500, extra="Téléphone ☎".encode())
    t = make_table(8192)
    s = _load_bytes(t, b.text(), tmp_path)
    assert (s.bad, s.started, s.ended) == (0, 2, 2)
    assert table_dict(t) == expected_dict(b.expected)


def test_failed_missed_cancelled_and_challenged_calls(make_table, tmp_path):
    b = LogBuilder()
    t0 = 1_795_668_428_000
    b.failed("busy@x", t0)
    b.failed("decline@x", t0 + 10, 603, "Decline", cdr=False)
    b.cancelled("cancel@x", t0 + 20)
    b.challenged("auth@x", t0 + 30, 2500)
    b.answered("ok@x", t0 + 40, 1000)
    t = make_table(8192)
    s = _load_bytes(t, b.text(), tmp_path)
    assert table_dict(t) == expected_dict(b.expected)
    assert set(table_dict(t)) == {b"auth@x", b"ok@x"}
    # busy: missed + 486 + CDR0; decline: 2; cancel: missed + 487 + CDR0; auth: 407 x2 + CDR0
    assert s.failed == 3 + 2 + 3 + 3
    assert (s.started, s.ended, s.end_only) == (2, 2, 0)


def test_reinvite_does_not_move_the_start(make_table, tmp_path):
    b = LogBuilder()
    b.answered("re@x", 1_795_668_428_000, 60_000, reinvite=True)
    t = make_table(8192)
    _load_bytes(t, b.text(), tmp_path)
    assert t.get("re@x") == (1_795_668_428_000 * MS, 1_795_668_488_000 * MS)


def test_cdr_before_and_after_its_bye_line(make_table, tmp_path):
    """Whichever of a call's BYE and CDR lines comes first, the acc time wins."""
    b = LogBuilder()
    b.answered("x1@h", 1_795_668_428_000, 5000)
    text = b.text()
    lines = text.splitlines(keepends=True)
    assert b"log_write_cdr" in lines[1] and b"method=BYE" in lines[2]
    swapped = lines[0] + lines[2] + lines[1]
    for i, data in enumerate([text, swapped]):
        t = make_table(8192)
        _load_bytes(t, data, tmp_path, name=f"o{i}.log")
        assert t.get("x1@h") == (1_795_668_428_000 * MS, 1_795_668_433_000 * MS)


def test_opensips_lines(make_table, tmp_path):
    lines = [
        "Nov 26 04:51:55 host opensips[100]: ACC: transaction answered: timestamp=1795668715;"
        "created=1795668714;setuptime=1;method=INVITE;from_tag=a;to_tag=b;call_id=os1@h;"
        "code=200;reason=OK",
        "Nov 26 04:52:55 host opensips[100]: ACC: call ended: created=1795668714;"
        "call_start_time=1795668715;duration=60;ms_duration=60250;setuptime=1;method=INVITE;"
        "from_tag=a;to_tag=b;call_id=os1@h;code=200;reason=OK",
        "Nov 26 04:52:55 host opensips[100]: ACC: call ended: created=1795668700;"
        "call_start_time=1795668701;duration=9;ms_duration=9500;setuptime=1;method=INVITE;"
        "from_tag=c;to_tag=d;call_id=os2@h;code=200;reason=OK",
    ]
    t = make_table(8192)
    s = _load_bytes(t, ("\n".join(lines) + "\n").encode(), tmp_path)
    assert (s.bad, s.acc_lines) == (0, 3)
    assert table_dict(t) == {
        b"os1@h": (1795668715 * 10**9, 1795668715 * 10**9 + 60250 * MS),
        b"os2@h": (1795668701 * 10**9, 1795668701 * 10**9 + 9500 * MS)}


@pytest.mark.parametrize("comp", ["gzip", "bz2", "xz"])
def test_compressed_inputs(make_table, tmp_path, comp):
    b = LogBuilder()
    build_mix(b, 150)
    data = b.text()
    packed = {"gzip": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress}[comp](data)
    t = make_table(8192)
    # the name says nothing: the content is recognised
    s = _load_bytes(t, packed, tmp_path, name="acc.data")
    assert s.bad == 0 and s.lines == data.count(b"\n")
    assert table_dict(t) == expected_dict(b.expected)


def test_stdin_and_a_last_line_without_newline(make_table):
    b = LogBuilder()
    build_mix(b, 150)
    data = b.text().rstrip(b"\n")
    t = make_table(8192)
    s = ingest(t, ["-"], stdin=io.BytesIO(gzip.compress(data)))
    assert s.sources == ["<stdin>"] and s.lines == data.count(b"\n") + 1
    assert table_dict(t) == expected_dict(b.expected)


def test_truncated_gzip_is_an_input_error_not_a_crash(make_table, tmp_path):
    b = LogBuilder()
    build_mix(b, 100)
    packed = gzip.compress(b.text())
    t = make_table(8192)
    s = _load_bytes(t, packed[:len(packed) // 2], tmp_path)
    assert s.truncated and "acc.log" in s.truncated[0] and not s.ok
    assert 0 < s.lines < b.text().count(b"\n")        # the readable prefix was loaded


def test_parallel_parsing_matches_one_process(make_table, tmp_path, monkeypatch):
    b = LogBuilder()
    build_mix(b, 1500, long_ids=True)
    t0 = 1_795_669_000_000
    for i in range(5):
        b.bad(t0 + i, f"ACC: transaction answered: timestamp=1795669000;method=INVITE;"
                      f"call_id=bad{i}")
    data = b.text(shuffle_ms=2)
    path = tmp_path / "big.log"
    path.write_bytes(data)
    t1 = make_table(8192, key_width=96)
    s1 = ingest(t1, [str(path)], jobs=1, show_bad=10_000)
    monkeypatch.setattr(par, "PARALLEL_MIN", 0)
    monkeypatch.setattr(par, "TASK_BYTES", 20_000)          # dozens of ranges
    monkeypatch.setattr("npcalls.ingest.sources.CHUNK", 7_000)
    t2 = make_table(8192, key_width=96)
    s2 = ingest(t2, [str(path)], jobs=2, show_bad=10_000)
    assert table_dict(t1) == table_dict(t2)
    assert (s1.lines, s1.bad, s1.too_long, s1.started, s1.ended, s1.end_only) == \
        (s2.lines, s2.bad, s2.too_long, s2.started, s2.ended, s2.end_only)
    assert [(p.line, p.reason) for p in s1.problems] == [(p.line, p.reason) for p in s2.problems]
    assert [p.line for p in s1.problems if p.kind == "bad"] == b.line_numbers_of_bad(data)
    want = {k: v for k, v in expected_dict(b.expected).items() if len(k) <= 96}
    assert table_dict(t2) == want


def test_parse_range_splits_files_at_line_boundaries(tmp_path):
    data = b"".join(b"line %d ACC: x\n" % i for i in range(1000)) + b"last line"
    p = tmp_path / "f"
    p.write_bytes(data)

    class Count:
        def parse(self, chunk, base, name):
            class R:
                lines = chunk.count(b"\n")
                problems: list = []
                body = chunk
            return R

    got = b""
    for a, z in par.ranges(0, len(data), 333):
        for r in par.parse_range(str(p), a, z, Count()):
            got += r.body
    assert got == data + b"\n"


# ---------------------------------------------------------------------- fast path vs reference

def test_vectorized_path_agrees_with_the_per_line_reference():
    """Every line, parsed in a chunk and alone by the careful parser, gives the same events."""
    b = LogBuilder("syslog3164")
    build_mix(b, 300, long_ids=True)
    b2 = LogBuilder("none", time_mode=1, time_name="time_exten", seed=3)
    build_mix(b2, 100)
    data = b.text() + b2.text()
    p = AccParser(key_width=200, max_problems=10**6).parse(data)
    ref_acc: list[tuple] = []
    ref_cdr: list[tuple] = []
    for line in data.split(b"\n"):
        i = line.find(b"ACC: ")
        j = line.find(b"start_time=")
        if j > 0 and line[j - 1:j] != b" ":
            j = -1
        if i >= 0:
            r = parse_acc_text(line[i + 5:])
            if r[0] in (0, 1):
                ref_acc.append((r[1], r[2] if r[0] == 0 else NOT_SET,
                                r[2] if r[0] == 1 else NOT_SET))
        elif j >= 0:
            r = parse_cdr_text(line[j + 11:])
            if r[0] == 2:
                ref_cdr.append((r[1], r[2], r[3]))
    got_acc = list(zip(p.acc_keys.tolist(), p.acc_start.tolist(), p.acc_end.tolist()))
    got_cdr = list(zip(p.cdr_keys.tolist(), p.cdr_start.tolist(), p.cdr_end.tolist()))
    assert got_acc == ref_acc
    assert got_cdr == ref_cdr
    assert p.bad == 0


@pytest.mark.parametrize("line,outcome", [
    (b"transaction answered: timestamp=1795668428;t_ms=1795668428.565;method=INVITE;"
     b"from_tag=a;to_tag=b;call_id=c@h;code=200;reason=OK", (0, b"c@h", 1795668428565 * MS)),
    # timestamp unreadable, t_ms fine: the line is good
    (b"transaction answered: timestamp=x;t_ms=1795668428.565;method=BYE;"
     b"from_tag=a;to_tag=b;call_id=c@h;code=202;reason=OK", (1, b"c@h", 1795668428565 * MS)),
    # time_mode 1: microseconds of the second
    (b"transaction answered: timestamp=1795668428;time_exten=7;method=BYE;"
     b"from_tag=a;to_tag=b;call_id=c@h;code=200;reason=OK", (1, b"c@h", 1795668428000007000)),
    (b"call missed: timestamp=1795668428;method=INVITE;from_tag=a;to_tag=;call_id=c@h;"
     b"code=200;reason=OK", (3,)),
    (b"transaction answered: timestamp=1795668428;method=INVITE;from_tag=a;to_tag=;call_id=c@h;"
     b"code=487;reason=Request Terminated", (3,)),
    (b"transaction answered: timestamp=1795668428;method=ACK;from_tag=a;to_tag=b;call_id=c@h;"
     b"code=200;reason=OK", (4,)),
    (b"something else entirely", (5,)),
    (b"transaction answered: timestamp=1795668428;method=INVITE;call_id=c@h;code=20",
     (6, "unreadable code '20'")),
])
def test_reference_parser_outcomes(line, outcome):
    r = parse_acc_text(line)
    assert r == outcome
    # and the chunk parser agrees
    p = AccParser(64).parse(b"pfx ACC: " + line + b"\n")
    if outcome[0] == 0:
        assert (p.acc_keys.tolist(), p.acc_start.tolist()) == ([outcome[1]], [outcome[2]])
    elif outcome[0] == 1:
        assert (p.acc_keys.tolist(), p.acc_end.tolist()) == ([outcome[1]], [outcome[2]])
    else:
        assert len(p.acc_keys) == 0
        assert p.bad == (outcome[0] == 6)
        assert p.failed == (outcome[0] == 3)
        assert p.ignored == (outcome[0] == 5)


def test_a_cdr_of_an_unanswered_dialog_is_no_call():
    assert parse_cdr_text(b"1795668428.565; end_time=1795668428.565; duration=0; call_id=c@h")[0] \
        == 3
    assert parse_cdr_text(b"1795668428.565; end_time=1795668429.565; duration=1.000; "
                          b"call_id=c@h") == (2, b"c@h", 1795668428565 * MS, 1795668429565 * MS)


# ---------------------------------------------------------------------- batching

def test_aggregate_is_what_record_many_would_keep(make_table):
    rnd = np.random.default_rng(3)
    n = 5000
    keys = np.array([b"k%d" % v for v in rnd.integers(0, 800, n)])
    start = np.where(rnd.random(n) < 0.5, rnd.integers(1, 10**12, n), NOT_SET)
    end = np.where(rnd.random(n) < 0.5, rnd.integers(1, 10**12, n), NOT_SET)
    k2, s2, e2 = aggregate(keys, start, end)
    assert len(k2) == len(set(keys.tolist()))
    t1, t2 = make_table(8192), make_table(8192)
    t1.record_many(keys, start, end)
    t2.record_many(k2, s2, e2)
    assert table_dict(t1) == table_dict(t2)


def test_a_full_table_is_an_error_that_stops_the_load(make_table, tmp_path):
    b = LogBuilder()
    build_mix(b, 400)
    t = make_table(capacity=64)
    with pytest.raises(npcalls.TableFullError):
        _load_bytes(t, b.text(), tmp_path)


def test_aggregate_falls_back_on_hash_collisions(make_table, monkeypatch):
    """Every key hashing alike must not merge calls: the batch is then written unfolded."""
    import npcalls.ingest.loader as loader_mod
    keys = np.array([b"a", b"b", b"a", b"c"])
    start = np.array([1, 2, 3, NOT_SET])
    end = np.array([NOT_SET, 5, 6, 7])
    monkeypatch.setattr(loader_mod, "_row_hash", lambda k: np.zeros(len(k), np.uint64))
    k2, s2, e2 = aggregate(keys, start, end)
    assert k2 is keys                                   # not folded
    t = make_table(8192)
    b = LogBuilder()
    build_mix(b, 60)
    s = Loader(t)
    s.add(AccParser(64).parse(b.text()))
    s.close()
    assert table_dict(t) == expected_dict(b.expected)
