"""Kamailio / OpenSIPS acc log lines: transaction lines and CDR lines, a chunk at a time.

What the acc module writes (Kamailio 5.x ``acc_log_request``, OpenSIPS alike)::

    <any prefix>ACC: transaction answered: timestamp=1795668428;t_ms=1795668428.565;
        method=INVITE;from_tag=..;to_tag=..;call_id=..;code=200;reason=OK[;extra=...]

The prefix is whatever the logger put there (stderr ``rank(pid) NOTICE: acc
[acc.c:268]: acc_log_request(): ``, an RFC 3164 or RFC 3339 syslog header, or
nothing), so lines are found by the module's own text ``ACC: <kind>: `` and
never by their prefix.  The time comes as ``timestamp=`` (seconds), plus with
``time_mode`` 1 ``time_exten=`` (microseconds of that second), with mode 2
``time_attr=`` / ``t_ms=`` (seconds.milliseconds), with modes 3/4 a date-time
string (to the second, in local time for mode 3: ``timestamp=`` is preferred,
it is the same second without a zone question).  The most precise one present
is used.

Kamailio's dialog CDRs (``log_write_cdr(): start_time=..; end_time=..;
duration=..; call_id=..``) and OpenSIPS's ``ACC: call ended: created=..;
call_start_time=..;duration=..;ms_duration=..`` lines describe whole calls.

How a chunk is parsed
---------------------
Two ``re.findall`` passes (the patterns start with a literal, which the regex
engine finds with a fast scan) capture the text after each marker; numpy's
string ufuncs (``np.strings.find``/``slice``/``partition``) then cut the fields
out of all those lines at once.  Rows the vectorized path cannot read with
certainty (an unusual layout, a missing field, odd bytes in the Call-ID, a
line longer than the capture) are handed to a careful per-line parser, which
is also the reference the tests compare the fast path with.  Bad lines are
reported with their line numbers, which are only computed for them.

Meaning of lines
----------------
* answered INVITE (2xx, not ``call missed``): the call starts; a later
  answered INVITE with the same Call-ID (re-INVITE) is ignored downstream,
  because the first start is kept;
* BYE with a 2xx: the call ends;
* ``ACC: call missed`` lines, INVITEs with 3xx-6xx (rejected, challenged with
  401/407, CANCELled with 487) start nothing;
* a CDR with ``duration=0`` belongs to a dialog that was never answered;
* every other acc line (ACK, CANCEL, OPTIONS, ...) is a good line with no event.

Lines cut short
---------------
A line cut in the middle (a crash, a full disk, a syslog size limit) must
never give a call: cut inside a Call-ID that ends the line, it would give a
phantom Call-ID, a prefix of the real one.  So a line of a kind (acc
transaction line, CDR line) whose field names are a strict prefix of the
field names the other lines of that kind carry in the same input is a bad
line, whatever the parsers would make of it.  The shape of a kind is taken
from the input's first chunk (its most common last field; a longer line of
the same shape replaces it); the check costs one backwards search per line,
and only lines whose last field differs are looked at closely.  A cut inside
the last field's value leaves every field there: that line is good (its
Call-ID, if it is the last field, cannot be told from a complete one).
"""

from __future__ import annotations

import os
import re
from typing import Callable, NamedTuple

import numpy as np

from ..layout import NOT_SET
from ._vec import (
    S,
    Template,
    decimal_ns,
    digits,
    field,
    find_in,
    gather,
    key_check,
    matrix,
    parse_iso,
    starts,
)
from .common import (
    ChunkLines,
    Parsed,
    Problem,
    call_id_problem,
    clean_eol,
    count_lines,
    count_problem,
    problem_text,
    show,
    too_long_reason,
)

try:
    from . import _scan
except ImportError:           # built without a C compiler: the numpy path does all the work
    _scan = None  # type: ignore[assignment]

USE_SCAN: bool = _scan is not None and os.environ.get("NPCALLS_INGEST_NUMPY", "") in ("", "0")
"""Whether acc chunks go through the compiled scanner (:mod:`npcalls.ingest._scan`).

False when the extension was not built, or with ``NPCALLS_INGEST_NUMPY=1`` in the
environment (which the tests use to run the numpy path, the reference, in
worker processes too).  Both paths give the same results."""

__all__ = ["AccParser", "Parsed", "Problem", "parse_acc_text", "parse_cdr_text", "clean_eol"]

_REST = 2048
"""Bytes captured after a marker; the fields we need sit well inside, longer lines go slow."""

# "." is "anything but \n" here (no DOTALL), and the engine runs it faster than [^\n]
_ACC_RX = re.compile(rb"ACC: (.{0,%d})" % _REST)
_CDR_RX = re.compile(rb" start_time=(.{0,%d})" % _REST)
# a CDR line without any prefix starts with the field itself; the pattern that
# allows this has no literal to scan for, so it is used only when needed
_CDR_RX_BOL = re.compile(rb"(?:^| )start_time=(.{0,%d})" % _REST, re.M)

_NS = 1_000_000_000
_I64_MAX = 2**63 - 1
_KNOWN_KINDS = frozenset({b"transaction answered", b"call missed", b"request acknowledged",
                          b"request accounted", b"call ended"})
_DEC_TIME_NAMES = (b"t_ms", b"time_attr")
_EXT_TIME_NAMES = (b"time_exten",)
_CID_NAMES = (b"call_id", b"callid", b"call-id", b"sip_call_id", b"sip_callid", b"ci")

# outcomes of the per-line parser
START, END, CDR, FAILED, NONE, IGNORED, BAD = range(7)


# ---------------------------------------------------------------------- per line (reference)

def _fields(body: bytes, sep: bytes = b";") -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    for part in body.split(sep):
        name, eq, val = part.partition(b"=")
        if eq:
            name = name.strip()
            if name not in out:          # the core fields come first; extras may repeat names
                out[name] = val.strip()
    return out


def _decimal(v: bytes) -> tuple[int, int] | None:
    """``digits[.digits]`` seconds -> (fraction digits, ns), exactly; None if unreadable."""
    ip, dot, fp = v.partition(b".")
    if not (ip.isdigit() and len(ip) <= 11) or (fp and not fp.isdigit()):
        return None
    frac = fp[:9].ljust(9, b"0") if fp else b"0"
    ns = int(ip) * _NS + int(frac)
    if ns > _I64_MAX:                   # past int64 nanoseconds (year 2262): no time
        return None
    return min(len(fp), 9), ns


def _iso(v: bytes) -> int | None:
    a, ok = parse_iso(np.array([v]))
    return int(a[0]) if ok[0] else None


def acc_time(f: dict[bytes, bytes]) -> tuple[int | None, str]:
    """The most precise time an acc line holds: (ns, "") or (None, why not)."""
    cands: list[tuple[int, int, int]] = []      # (fraction digits, rank, ns)
    ts = f.get(b"timestamp")
    ts_ns = None
    if ts is not None and ts.isdigit() and len(ts) <= 12 and int(ts) * _NS <= _I64_MAX:
        ts_ns = int(ts) * _NS
        cands.append((0, 1, ts_ns))
    for name in _DEC_TIME_NAMES:
        v = f.get(name)
        if v:
            d = _decimal(v)
            if d is not None:
                cands.append((d[0], 3, d[1]))
            else:
                t = _iso(v)                     # time_mode 3/4: a date-time string
                if t is not None:
                    cands.append((0, 0, t))
    for name in _EXT_TIME_NAMES:
        v = f.get(name)
        if v and ts_ns is not None and v.isdigit() and len(v) <= 6 and \
                ts_ns + int(v) * 1000 <= _I64_MAX:
            cands.append((6, 2, ts_ns + int(v) * 1000))
    if cands:
        return max(cands)[2], ""
    if ts is None:
        return None, "no time (timestamp=)"
    return None, f"unreadable timestamp {show(ts)}"


def _call_id(body: bytes, f: dict[bytes, bytes]) -> bytes | None:
    # The core fields are "...;call_id=<id>;code=...": taking what lies between
    # keeps the whole value even if it (illegally) holds a ';', as the fast path does.
    i = body.find(b"call_id=")
    if i >= 0 and (i == 0 or body[i - 1:i] == b";"):
        j = body.find(b";code=", i)
        if j >= 0:
            return body[i + 8:j]
    for name in _CID_NAMES:
        v = f.get(name)
        if v is not None:
            return v
    return None


def parse_acc_text(rest: bytes) -> tuple:
    """Parse one acc line from just after ``ACC: `` (the careful, per-line reference).

    Returns
    -------
    tuple
        ``(START, cid, ns)``, ``(END, cid, ns)``, ``(CDR, cid, start, end)``,
        ``(FAILED,)``, ``(NONE,)`` (a good line with no event),
        ``(IGNORED,)`` (not an acc line after all) or ``(BAD, reason)``.
    """
    rest = clean_eol(rest)
    kind, sep, body = rest.partition(b": ")
    kind = kind.strip()
    if not sep or not kind:
        return (IGNORED,)
    f = _fields(body)
    if kind not in _KNOWN_KINDS and not (b"timestamp" in f or b"method" in f):
        return (IGNORED,)
    if kind == b"call ended":
        return _opensips_cdr(f, body)
    method = f.get(b"method")
    if method is None:
        return (BAD, "no method")
    if not method.isalpha():
        return (BAD, f"unreadable method {show(method)}")
    code = f.get(b"code")
    if code is None:
        return (BAD, "no code")
    if not (code.isdigit() and len(code) == 3):
        return (BAD, f"unreadable code {show(code)}")
    cid = _call_id(body, f)
    if cid is None:
        return (BAD, "no call_id")
    t, why = acc_time(f)
    if t is None:
        return (BAD, why)
    bad_cid = call_id_problem(cid)
    if bad_cid:
        return (BAD, bad_cid)
    c = int(code)
    if kind == b"call missed":
        return (FAILED,)
    if 200 <= c < 300:
        if method == b"INVITE":
            return (START, cid, t)
        if method == b"BYE":
            return (END, cid, t)
    if method == b"INVITE":
        return (FAILED,)
    return (NONE,)


def field_names(kind: str, text: bytes) -> list[bytes]:
    """The names of a line's fields, in order (``kind`` "acc": the text after ``ACC: ``;
    "cdr": the text after `` start_time=``)."""
    text = clean_eol(text)
    if kind == "acc":
        _, sep, text = text.partition(b": ")
        if not sep:
            return []
    else:
        text = b"start_time=" + text
    out = []
    for part in text.split(b";"):
        name, eq, _ = part.partition(b"=")
        if eq:
            out.append(name.strip())
    return out


def _last_token(text: bytes) -> bytes:
    """What follows a line's last ';', up to and including the next '=' (b"" if none)."""
    tail = clean_eol(text).rpartition(b";")[2]
    name, eq, _ = tail.partition(b"=")
    return name + eq if eq else b""


def _opensips_cdr(f: dict[bytes, bytes], body: bytes) -> tuple:
    cid = _call_id(body, f)
    if cid is None:
        return (BAD, "no call_id")
    st = f.get(b"call_start_time")
    if st is None or not st.isdigit():
        return (BAD, "no readable call_start_time")
    start = int(st) * _NS
    if start > _I64_MAX:
        return (BAD, "no readable call_start_time")
    ms = f.get(b"ms_duration")
    du = f.get(b"duration")
    if ms is not None and ms.isdigit():
        end = start + int(ms) * 1_000_000
    elif du is not None and du.isdigit():
        end = start + int(du) * _NS
    else:
        return (BAD, "no readable duration")
    if end > _I64_MAX:
        return (BAD, "no readable duration")
    why = call_id_problem(cid)
    if why:
        return (BAD, why)
    code = f.get(b"code", b"200")
    if not code.startswith(b"2"):
        return (FAILED,)
    return (CDR, cid, start, end)


def _cdr_time(v: bytes | None) -> int | None:
    if v is None:
        return None
    d = _decimal(v)
    if d is not None:
        return d[1]
    return _iso(v)


def parse_cdr_text(rest: bytes) -> tuple:
    """Parse one Kamailio dialog CDR line from just after `` start_time=``.

    Returns the same outcomes as :func:`parse_acc_text` (``CDR``, ``FAILED``
    for a dialog never answered, ``IGNORED``, ``BAD``).
    """
    f = _fields(clean_eol(b"start_time=" + rest))
    if b"end_time" not in f:
        return (IGNORED,)
    st, en = _cdr_time(f.get(b"start_time")), _cdr_time(f.get(b"end_time"))
    if st is None:
        return (BAD, "unreadable start_time")
    if en is None:
        return (BAD, "unreadable end_time")
    cid = None
    for name in _CID_NAMES:
        cid = f.get(name)
        if cid is not None:
            break
    if cid is None:
        return (BAD, "no call_id in CDR")
    du = f.get(b"duration")
    if du is not None:
        d = _decimal(du)
        if d is None:
            return (BAD, f"unreadable duration {show(du)}")
        dur = d[1]
    else:
        dur = en - st
    why = call_id_problem(cid)
    if why:
        return (BAD, why)
    if dur == 0:
        return (FAILED,)         # set at dialog creation and never moved: not answered
    return (CDR, cid, st, en)


# ---------------------------------------------------------------------- per chunk (fast)

class _Rows:
    """The texts one pass captured and where each lies in its chunk (found only when asked).

    ``group``: the regex group whose start is a row's offset (what line numbers
    are taken from); ``skip``: bytes from that offset to the row's text.  The
    compiled scanner gives the offsets and lengths instead of the texts
    (``offsets``, ``lengths``); a row's text is then cut from the chunk when asked.
    """

    def __init__(self, rows: list[bytes] | None, chunk: bytes, rx: re.Pattern, group: int,
                 skip: int, offsets: np.ndarray | None = None,
                 lengths: np.ndarray | None = None) -> None:
        self.rows, self.chunk, self.rx, self.group, self.skip = rows, chunk, rx, group, skip
        self._offsets: list[int] | None = None if offsets is None else offsets.tolist()
        self._lengths = None if lengths is None else lengths.tolist()

    def offset(self, i: int) -> int:
        if self._offsets is None:
            self._offsets = [x.start(self.group) for x in self.rx.finditer(self.chunk)]
        return self._offsets[i]

    def row(self, i: int) -> bytes:
        """Row ``i`` as the pass captured it."""
        if self.rows is not None:
            return self.rows[i]
        assert self._lengths is not None
        off = self.offset(i) + self.skip
        return self.chunk[off:off + self._lengths[i]]

    def text(self, i: int) -> bytes:
        """Row ``i`` up to its line's end (a capture stops at :data:`_REST` bytes)."""
        row = self.row(i)
        if len(row) < _REST:
            return row
        off = self.offset(i) + self.skip
        return self.chunk[off:self.chunk.find(b"\n", off)]


class AccParser:
    """Parse chunks of acc logs into event arrays.

    Parameters
    ----------
    key_width : int or None
        The table's key width: longer Call-IDs are reported (``too_long``),
        never truncated.
    max_problems : int
        How many problems to keep with their text (all are counted).
    """

    def __init__(self, key_width: int | None = None, max_problems: int = 10) -> None:
        self.key_width = key_width
        self.max_problems = max_problems
        self.kept = 0
        self._in_pass = 0
        self._bol_cdr = False
        # whether the chunk has a line starting with "start_time=" (the scanner
        # answers it in passing; None: not asked, parse() searches itself)
        self._bol_seen: bool | None = None
        # per kind: the field names of a whole line, and its last field's "name="
        self._shape: dict[str, tuple[list[bytes], bytes] | None] = {"acc": None, "cdr": None}

    # one chunk -------------------------------------------------------------

    def parse(self, chunk: bytes, base_line: int = 0, source: str = "-") -> Parsed:
        """Parse a chunk of whole lines (it must end with a newline).

        Parameters
        ----------
        chunk : bytes
        base_line : int
            Lines of the source before this chunk (for line numbers).
        source : str
            The source's name, for problem reports.
        """
        p = self._parse(chunk, base_line, source)
        # CDR lines with no prefix at all start with the field: the fast pass
        # (which looks for " start_time=") took them for other lines.  Looking
        # for them costs a search of the whole chunk, so only when some lines
        # were not understood; once seen, the input is read that way.
        if p.ignored and not self._bol_cdr and (
                self._bol_seen if self._bol_seen is not None else
                chunk.startswith(b"start_time=") or b"\nstart_time=" in chunk):
            self._bol_cdr = True
            self.kept -= len(p.problems)
            p = self._parse(chunk, base_line, source)
        return p

    def _parse(self, chunk: bytes, base_line: int, source: str) -> Parsed:
        p = Parsed()
        self._bol_seen = None
        p.lines = count_lines(chunk)
        lines = ChunkLines(chunk, base_line)
        has_nul = b"\x00" in chunk
        # the compiled scanner assumes no NUL byte in the text, nor in the shape it compares
        # lines with; NULs are rare enough for the numpy path to take such chunks whole
        scan = USE_SCAN and not has_nul and b"\x00" not in (self._shape["acc"] or ((), b""))[1]
        acc_rows = [] if scan else _ACC_RX.findall(chunk)
        cdr_rx = _CDR_RX_BOL if self._bol_cdr else _CDR_RX
        scan_cdr = USE_SCAN and not has_nul and not self._bol_cdr and \
            b"\x00" not in (self._shape["cdr"] or ((), b""))[1]
        # (the substring search skips a chunk without CDRs faster than the regex)
        cdr_rows = cdr_rx.findall(chunk) if not scan_cdr and (
            self._bol_cdr or b" start_time=" in chunk) else []
        slow_events: list[tuple[int, int, bytes, int, int]] = []   # (kind, row, cid, t1, t2)
        if scan:
            self._acc_scanned(chunk, lines, p, slow_events, source)
        elif acc_rows:
            self._in_pass = 0
            self._acc(acc_rows, chunk, lines, has_nul, p, slow_events, source)
        if scan_cdr:
            self._cdr_scanned(chunk, lines, p, slow_events, source)
        elif cdr_rows:
            self._in_pass = 0
            self._cdr(cdr_rows, chunk, lines, has_nul, p, slow_events, source, cdr_rx)
        # OpenSIPS "ACC: call ended" CDRs and no Kamailio CDR row: a CDR pass that ran
        # merged (and cleared) them already
        if slow_events:
            p.cdr_keys, p.cdr_start, p.cdr_end = _merge(
                np.empty(0, np.int64), np.empty(0, "S1"), np.empty(0, np.int64),
                np.empty(0, np.int64), slow_events)
        p.ignored = max(0, p.lines - p.acc_lines - p.cdr_lines - p.bad - p.too_long)
        if p.problems:
            p.problems.sort(key=lambda q: q.line)
            del p.problems[max(0, self.max_problems - self.kept):]
            self.kept += len(p.problems)
        return p

    def _problem(self, p: Parsed, kind: str, reason: str, source: str, lines: ChunkLines,
                 off: int) -> None:
        count_problem(p, kind)
        # Each pass (acc lines, then CDR lines) meets its problems in line
        # order and keeps as many as are still wanted; parse() merges the
        # passes by line and keeps the first ones.
        if self._in_pass < self.max_problems - self.kept:
            self._in_pass += 1
            p.problems.append(Problem(source, lines.number(off), kind, reason,
                                      problem_text(lines.text(off))))

    def _cut_rows(self, kind: str, A: np.ndarray, m: np.ndarray, cand: np.ndarray,
                  text: "Callable[[int], bytes]") -> np.ndarray:
        """Rows lacking fields that the other lines of this kind carry (lines cut short).

        ``A`` must have a NUL after every row (an itemsize above the longest row).
        """
        if not cand.any():
            return np.zeros(len(A), bool)
        a = S.rfind(A, b";") + 1

        def tails(k: int, rows: np.ndarray | None = None) -> np.ndarray:
            return gather(m, a if rows is None else a[rows], None, k, rows)
        return self._cut_by_tails(kind, tails, cand, text)

    def _cut_by_tails(self, kind: str, tails: "Callable[..., np.ndarray]", cand: np.ndarray,
                      text: "Callable[[int], bytes]") -> np.ndarray:
        """:meth:`_cut_rows` given ``tails(k, rows=None)``: the ``k`` bytes after each
        row's last ';' (after its start if none), zeros past the row's end."""
        cut = np.zeros(len(cand), bool)
        if not cand.any():
            return cut
        shape = self._shape[kind]
        if shape is None:
            # the most common last field of the input's first lines gives the shape
            first = np.flatnonzero(cand)[:1000]
            g = tails(24, first)
            g *= np.cumprod((g != 61) & (g != 0), axis=1, dtype=np.uint8)   # up to "=" or the end
            keys = g.view("S24").reshape(-1)
            vals, counts = np.unique(keys, return_counts=True)
            i = int(first[np.flatnonzero(keys == vals[np.argmax(counts)])[0]])
            shape = self._shape[kind] = field_names(kind, text(i)), _last_token(text(i))
            if not shape[0] or not shape[1]:
                self._shape[kind] = None
                return cut
        names: dict[int, list[bytes]] = {}
        for _ in range(3):
            ref, token = shape
            pat = np.frombuffer(token, np.uint8)
            same = (tails(len(pat)) == pat).all(axis=1)
            sus = np.flatnonzero(cand & ~same).tolist()
            for i in sus:
                if i not in names:
                    names[i] = field_names(kind, text(i))
            longer = [i for i in sus if len(names[i]) > len(ref) and names[i][:len(ref)] == ref]
            if not longer:
                break
            # the shape seen so far was itself a line cut short
            i = max(longer, key=lambda j: len(names[j]))
            shape = self._shape[kind] = names[i], _last_token(text(i))
        for i in sus:
            nm = names[i]
            if len(nm) < len(ref) and nm == ref[:len(nm)]:
                cut[i] = True
        return cut

    def _cut_reason(self, kind: str, text: bytes) -> str:
        ref = (self._shape[kind] or ([], b""))[0]
        have = len(field_names(kind, text))
        missing = b", ".join(ref[have:have + 3]).decode("utf-8", "backslashreplace")
        more = ", ..." if len(ref) - have > 3 else ""
        what = "acc" if kind == "acc" else "CDR"
        return (f"{what} line cut short: it lacks {missing}{more}, which the other {what} "
                f"lines of this input carry")

    def _too_long_reason(self, n: int) -> str:
        return too_long_reason(n, self.key_width)

    def _acc(self, rows: list[bytes], chunk: bytes, lines: ChunkLines, has_nul: bool, p: Parsed,
             slow_events: list, source: str) -> None:
        f = _acc_fields(rows, has_nul, self.key_width)
        assert f.A is not None and f.m is not None
        rt = _Rows(rows, chunk, _ACC_RX, 0, 5)
        cut = self._cut_rows("acc", f.A, f.m, ~f.ended, rt.text)
        self._acc_finish(f, cut, rt, lines, p, slow_events, source)

    def _too_long(self, clen: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows whose Call-ID (of the scanner's lengths ``clen``) passes the key width, and the rest."""
        too_long = clen > self.key_width if self.key_width else np.zeros(n, bool)
        return too_long, ~too_long

    def _acc_scanned(self, chunk: bytes, lines: ChunkLines, p: Parsed, slow_events: list,
                     source: str) -> None:
        """:meth:`_acc` with the compiled scanner: it finds the rows and reads those of the
        common shape; the numpy path reads the others, as it would have (no NUL in chunk)."""
        r = self._scanned(chunk, False)
        if r is None:
            return
        n, fl, simple, sel, gen, rows, t, _, clen, craw, cids, tails, rt = r
        assert _scan is not None
        missed = (fl & _scan.MISSED) != 0
        ended = (fl & _scan.ENDED) != 0
        is_inv = (fl & _scan.INVITE) != 0
        is_bye = (fl & _scan.BYE) != 0
        two = ((fl & _scan.TWO) != 0) & ~missed
        ok = simple.copy()
        too_long, kok = self._too_long(clen, n)
        g = None
        if len(gen):
            g = _acc_fields(rows, False, self.key_width)
            ok[gen], t[gen], is_inv[gen], is_bye[gen] = g.ok, g.t, g.is_inv, g.is_bye
            two[gen], kok[gen], too_long[gen] = g.two, g.kok, g.too_long
        cid = _join_cids(n, sel, craw, cids, gen, None if g is None else g.cid)
        cut = self._cut_by_tails("acc", tails, ~ended, rt.text)
        self._acc_finish(_AccFields(None, None, ok, t, is_inv, is_bye, missed, ended, two, cid,
                                    kok, too_long), cut, rt, lines, p, slow_events, source)

    def _acc_finish(self, f: "_AccFields", cut: np.ndarray, rt: _Rows, lines: ChunkLines,
                    p: Parsed, slow_events: list, source: str) -> None:
        """Counts, problems and events of the acc rows, from their fields."""
        ok = f.ok & ~cut
        two, missed, is_inv, is_bye, too_long, t = f.two, f.missed, f.is_inv, f.is_bye, \
            f.too_long, f.t
        good = ok & f.kok
        start_row = good & two & is_inv
        end_row = good & two & is_bye
        p.failed += int(np.count_nonzero(good & (missed | (is_inv & ~two))))
        p.acc_lines += int(np.count_nonzero(good))
        # a Call-ID too long for the table matters only on a line that starts
        # or ends a call; other lines (failed calls, ACKs) are good lines
        tl = np.flatnonzero(ok & too_long & two & (is_inv | is_bye))
        p.acc_lines += int(np.count_nonzero(ok & too_long)) - len(tl)
        p.failed += int(np.count_nonzero(ok & too_long & (missed | (is_inv & ~two))))
        self._slow_rows("acc", p, f.cid, tl, np.flatnonzero(~ok), cut, rt, slow_events, source,
                        lines)
        ev = start_row | end_row
        keys = f.cid[ev]
        st = np.where(start_row, t, NOT_SET)[ev]
        en = np.where(end_row, t, NOT_SET)[ev]
        acc_ev = [e for e in slow_events if e[0] in (START, END)]
        if acc_ev:
            keys, st, en = _merge(np.flatnonzero(ev), keys, st, en, acc_ev)
        p.acc_keys, p.acc_start, p.acc_end = keys, st, en
        slow_events[:] = [e for e in slow_events if e[0] == CDR]

    def _slow_rows(self, what: str, p: Parsed, cid: np.ndarray, too_long: np.ndarray,
                   slow: np.ndarray, cut: np.ndarray, rt: _Rows, slow_events: list, source: str,
                   lines: ChunkLines) -> None:
        """Report the rows whose Call-ID is too long; read the rows the fast path left
        (``slow``) with the careful parser."""
        for i in too_long.tolist():
            self._problem(p, "too_long", self._too_long_reason(len(cid[i])), source, lines,
                          rt.offset(i))
        parse, keep = (parse_acc_text, (BAD, IGNORED)) if what == "acc" else \
            (parse_cdr_text, (BAD,))
        for i in slow.tolist():
            off = rt.offset(i)
            row = rt.text(i)
            r = parse(row)
            if cut[i] and r[0] not in keep:
                # a cut line whose outcome would be an event or a count: refused
                self._problem(p, "bad", self._cut_reason(what, row), source, lines, off)
                continue
            self._slow_outcome(r, i, p, slow_events, source, lines, off, what)

    def _slow_outcome(self, r: tuple, i: int, p: Parsed, slow_events: list, source: str,
                      lines: ChunkLines, off: int, what: str) -> None:
        kind = r[0]
        if kind == BAD:
            self._problem(p, "bad", f"{what} line: {r[1]}", source, lines, off)
            return
        if kind == IGNORED:
            return
        if kind in (START, END, CDR):
            cid = r[1]
            if self.key_width and len(cid) > self.key_width:
                self._problem(p, "too_long", self._too_long_reason(len(cid)), source, lines, off)
                return
            if kind == START:
                slow_events.append((START, i, cid, r[2], NOT_SET))
            elif kind == END:
                slow_events.append((END, i, cid, NOT_SET, r[2]))
            else:
                # OpenSIPS "call ended" lines are CDRs found by the acc pass:
                # their row numbers are offset so they sort after the CDR pass' rows
                slow_events.append((CDR, i if what == "cdr" else (1 << 40) + i, cid, r[2], r[3]))
        if kind == FAILED:
            p.failed += 1
        if what == "cdr":
            p.cdr_lines += 1
        else:
            p.acc_lines += 1

    def _cdr(self, rows: list[bytes], chunk: bytes, lines: ChunkLines, has_nul: bool, p: Parsed,
             slow_events: list, source: str, rx: re.Pattern = _CDR_RX) -> None:
        f = _cdr_fields(rows, has_nul, self.key_width)
        assert f.A is not None and f.m is not None
        rt = _Rows(rows, chunk, rx, 1, 0)
        cut = self._cut_rows("cdr", f.A, f.m, f.cand, rt.text)
        self._cdr_finish(f, cut, rt, lines, p, slow_events, source)

    def _cdr_finish(self, f: "_CdrFields", cut: np.ndarray, rt: _Rows, lines: ChunkLines,
                    p: Parsed, slow_events: list, source: str) -> None:
        """Counts, problems and CDRs of the CDR rows, from their fields."""
        ok = f.ok & ~cut
        answered_du = f.answered
        good = ok & f.kok
        answered = good & answered_du
        p.failed += int(np.count_nonzero(good & ~answered_du))
        p.cdr_lines += int(np.count_nonzero(good))
        tl = np.flatnonzero(ok & f.too_long & answered_du)
        p.cdr_lines += int(np.count_nonzero(ok & f.too_long)) - len(tl)
        p.failed += int(np.count_nonzero(ok & f.too_long & ~answered_du))
        self._slow_rows("cdr", p, f.cid, tl, np.flatnonzero(~ok & f.cand), cut, rt, slow_events,
                        source, lines)
        keys, s2, e2 = f.cid[answered], f.st[answered], f.en[answered]
        if slow_events:
            keys, s2, e2 = _merge(np.flatnonzero(answered), keys, s2, e2, slow_events)
        p.cdr_keys, p.cdr_start, p.cdr_end = keys, s2, e2
        slow_events.clear()

    def _scanned(self, chunk: bytes, cdr: bool) -> tuple | None:
        """The compiled scanner's rows of one kind (None if there are none), as arrays.

        The common rows are read by the scanner; ``gen`` lists the others, which
        the numpy path reads.
        """
        assert _scan is not None
        n, *cols, bol = _scan.rows(chunk, cdr)
        if cdr:
            self._bol_seen = bol
        if not n:
            return None
        self._in_pass = 0
        off, ln, t, t2, cat, clen, craw, tail = (np.frombuffer(c, np.int64) for c in cols[:8])
        fl = np.frombuffer(cols[8], np.uint8)
        simple = (fl & _scan.SIMPLE) != 0
        skip = 5 if not cdr else 0
        start = off + skip
        sel = np.flatnonzero(simple)
        gen = np.flatnonzero(~simple)
        rows = [chunk[a:a + b] for a, b in zip(start[gen].tolist(), ln[gen].tolist())] \
            if len(gen) else []
        a_abs = start + tail
        rend = start + ln

        def take(at: np.ndarray, length: np.ndarray, k: int) -> np.ndarray:
            assert _scan is not None
            b = _scan.take(chunk, np.ascontiguousarray(at, np.int64),
                           np.ascontiguousarray(length, np.int64), k)
            return np.frombuffer(bytearray(b), np.uint8).reshape(len(at), k)

        def tails(k: int, rows: np.ndarray | None = None) -> np.ndarray:
            aa, ee = (a_abs, rend) if rows is None else (a_abs[rows], rend[rows])
            return take(aa, ee - aa, k)

        def cids(k: int) -> np.ndarray:
            """The simple rows' Call-IDs, as an S``k`` array."""
            return take(start[sel] + cat[sel], clen[sel], k).view(f"S{k}").reshape(len(sel))

        rt = _Rows(None, chunk, _CDR_RX if cdr else _ACC_RX, 1 if cdr else 0, skip, off, ln)
        return (n, fl, simple, sel, gen, rows, t.copy(), t2.copy(), clen, craw, cids, tails,
                rt)

    def _cdr_scanned(self, chunk: bytes, lines: ChunkLines, p: Parsed, slow_events: list,
                     source: str) -> None:
        """:meth:`_cdr` with the compiled scanner (no NUL in chunk, CDR lines after a space)."""
        r = self._scanned(chunk, True)
        if r is None:
            return
        n, fl, simple, sel, gen, rows, st, en, clen, craw, cids, tails, rt = r
        assert _scan is not None
        ok = simple.copy()
        cand = simple.copy()
        answered = (fl & _scan.ANSWERED) != 0
        too_long, kok = self._too_long(clen, n)
        g = None
        if len(gen):
            g = _cdr_fields(rows, False, self.key_width)
            ok[gen], cand[gen], st[gen], en[gen] = g.ok, g.cand, g.st, g.en
            answered[gen], kok[gen], too_long[gen] = g.answered, g.kok, g.too_long
        cid = _join_cids(n, sel, craw, cids, gen, None if g is None else g.cid)
        cut = self._cut_by_tails("cdr", tails, cand, rt.text)
        self._cdr_finish(_CdrFields(None, None, ok, cand, st, en, answered, cid, kok, too_long),
                         cut, rt, lines, p, slow_events, source)


def _join_cids(n: int, sel: np.ndarray, craw: np.ndarray,
               cids: Callable[[int], np.ndarray], gen: np.ndarray,
               gen_cid: np.ndarray | None) -> np.ndarray:
    """The rows' Call-IDs in one ``S`` array: the scanner's (rows ``sel``, copied out by
    ``cids(width)``) and the numpy path's (rows ``gen``), at the width of the longest."""
    k = int(craw[sel].max()) if len(sel) else 0
    if gen_cid is not None:
        k = max(k, gen_cid.dtype.itemsize)
    k = max(k, 1)
    cid = np.zeros(n, f"S{k}")
    if len(sel):
        cid[sel] = cids(k)
    if gen_cid is not None:
        cid[gen] = gen_cid
    return cid


class _AccFields(NamedTuple):
    """What the acc rows' own texts say, before the cut-short check (one entry per row)."""

    A: np.ndarray | None
    m: np.ndarray | None
    ok: np.ndarray            # the numpy path may take the row (Call-ID length aside)
    t: np.ndarray
    is_inv: np.ndarray
    is_bye: np.ndarray
    missed: np.ndarray
    ended: np.ndarray
    two: np.ndarray           # a 2xx, not "call missed"
    cid: np.ndarray
    kok: np.ndarray
    too_long: np.ndarray


def _rows_array(rows: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """The rows as an ``S`` array one byte wider than the longest row (so every row
    ends with a NUL, see _cut_rows) and its byte matrix."""
    A = np.array(rows, f"S{max(map(len, rows)) + 1}")
    if A.dtype.itemsize == 0:
        A = A.astype("S1")
    return A, matrix(A)


def _acc_fields(rows: list[bytes], has_nul: bool, key_width: int | None) -> _AccFields:
    """Read the acc rows' fields with numpy (the reference fast path)."""
    A, m = _rows_array(rows)
    # "<kind>: timestamp=S[;name=value...];method=M;from_tag=..;to_tag=..;call_id=C;code=NNN"
    kpos = S.find(A, b": timestamp=")
    p_m = S.find(A, b";method=", starts(kpos))
    p_c = S.find(A, b";call_id=", starts(p_m))
    p_k = S.find(A, b";code=", starts(p_c))
    ok = (kpos > 0) & (p_m > kpos) & (p_c > p_m) & (p_k > p_c)
    missed = S.startswith(A, b"call missed: ")
    ended = S.startswith(A, b"call ended: ")
    ok &= ~ended
    t, tok = _acc_times(A, m, kpos, p_m, ok)
    ok &= tok
    # the method: INVITE and BYE at a glance, anything else checked as a token
    g = gather(m, p_m + 8, None, 7)
    is_inv = (g == _INVITE).all(axis=1)
    is_bye = (g[:, :4] == _BYE).all(axis=1)
    other = np.flatnonzero(ok & ~is_inv & ~is_bye)
    if len(other):
        sub = A[other]
        me = find_in(sub, b";", p_m[other] + 8, p_c[other] + 1)
        ok[other] &= S.isalpha(field(sub, p_m[other] + 8, me))
    # the code: three digits, then ';' or the end of the line
    g = gather(m, p_k + 6, None, 4)
    ok &= ((g[:, :3] >= 48) & (g[:, :3] <= 57)).all(axis=1) & ((g[:, 3] == 59) | (g[:, 3] == 0))
    c0 = g[:, 0]
    cid = field(A, p_c + 9, p_k, m)
    kok, too_long, odd = key_check(cid, key_width, has_nul)
    ok &= ~odd
    if has_nul:
        ok &= np.array([b"\x00" not in r for r in rows], bool)
    two = (c0 == 50) & ~missed                  # 2xx
    return _AccFields(A, m, ok, t, is_inv, is_bye, missed, ended, two, cid, kok, too_long)


class _CdrFields(NamedTuple):
    """What the CDR rows' own texts say, before the cut-short check (one entry per row)."""

    A: np.ndarray | None
    m: np.ndarray | None
    ok: np.ndarray            # the numpy path may take the row (Call-ID length aside)
    cand: np.ndarray          # a CDR row at all (has an end_time=)
    st: np.ndarray
    en: np.ndarray
    answered: np.ndarray      # the duration is not zero
    cid: np.ndarray
    kok: np.ndarray
    too_long: np.ndarray


def _cdr_fields(rows: list[bytes], has_nul: bool, key_width: int | None) -> _CdrFields:
    """Read the CDR rows' fields with numpy (the reference fast path)."""
    B, m = _rows_array(rows)
    st, en, dstart, ok, cand = _cdr_times(B, m)
    # the duration only matters as zero (a dialog never answered: Kamailio
    # writes "0") or not; its digits are checked, not converted
    du_end = S.find(B, b";", starts(dstart))
    p_c = S.find(B, b"; call_id=", starts(du_end))
    ok &= (dstart > 0) & (du_end > dstart) & (p_c >= du_end)
    du_f = field(B, dstart, du_end, m)
    du_digits = S.replace(du_f, b".", b"", 1)
    ok &= S.isdigit(du_digits)
    du = S.str_len(S.lstrip(du_digits, b"0"))          # 0 for a zero duration
    c_end = S.find(B, b";", starts(p_c + 10))
    c_end = np.where(c_end < 0, S.str_len(B), c_end)
    cid = S.rstrip(field(B, p_c + 10, c_end, m), b" \t\r")
    kok, too_long, odd = key_check(cid, key_width, has_nul)
    ok &= ~odd & (S.find(cid, b"#") < 0)      # rsyslog escapes: the careful parser strips them
    if has_nul:
        ok &= np.array([b"\x00" not in r for r in rows], bool)
    return _CdrFields(B, m, ok, cand, st, en, du != 0, cid, kok, too_long)


_INVITE = np.frombuffer(b"INVITE;", np.uint8)
_BYE = np.frombuffer(b"BYE;", np.uint8)

# (layout from ": timestamp=" to ";method=", digit run of the seconds, of the fraction)
_ACC_TIME_TEMPLATES = [
    (Template(b": timestamp=##########;t_ms=##########.###"), 1, 2),
    (Template(b": timestamp=##########;time_attr=##########.###"), 1, 2),
    (Template(b": timestamp=##########"), 0, None),
]
# (layout of a CDR line from after " start_time=" to the duration's value)
_CDR_TEMPLATES = [
    Template(b"##########.###; end_time=##########.###; duration="),
    Template(b"##########.######; end_time=##########.######; duration="),
]


def _acc_times(A: np.ndarray, m: np.ndarray, kpos: np.ndarray, p_m: np.ndarray,
               cand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The time of each acc row (ns) and whether the fast path may take it.

    Rows whose time section has one of the usual layouts are read by
    template; the rest by :func:`_acc_times_general`.
    """
    n = len(A)
    t = np.zeros(n, np.int64)
    ok = np.zeros(n, bool)
    todo = cand.copy()
    length = p_m - kpos
    for tpl, ri, rf in _ACC_TIME_TEMPLATES:
        sel = np.flatnonzero(todo & (length == tpl.size))
        if not len(sel):
            continue
        hit, vals = tpl.match(m, kpos[sel], sel)
        rows = sel[hit]
        v = vals[ri][hit] * _NS
        if rf is not None:
            flen = tpl.runs[rf][1]
            v += vals[rf][hit] * 10 ** (9 - flen)
        t[rows] = v
        ok[rows] = True
        todo[rows] = False
    rest = np.flatnonzero(todo)
    if len(rest):
        sub = A[rest]
        t[rest], ok[rest] = _acc_times_general(sub, matrix(sub), kpos[rest], p_m[rest])
    return t, ok


def _acc_times_general(A: np.ndarray, m: np.ndarray, kpos: np.ndarray, p_m: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Any "timestamp=S[;name=value...]" section, as :func:`acc_time` reads it."""
    n = len(A)
    ok = np.ones(n, bool)
    t0 = kpos + 12
    ts_end = find_in(A, b";", t0, p_m + 1)
    ts_end = np.where(ts_end < 0, p_m, ts_end)
    t = np.zeros(n, np.int64)
    have_t = np.zeros(n, bool)
    more = ts_end < p_m
    ext = None
    if more.any():
        eq = find_in(A, b"=", ts_end + 1, p_m)
        v_end = find_in(A, b";", eq + 1, p_m + 1)
        v_end = np.where(v_end < 0, p_m, v_end)
        named = more & (eq > 0)
        name = field(A, ts_end + 1, np.where(named, eq, ts_end + 1), m, 10)
        # a second precise time further on: let the careful parser choose
        tail = named & (v_end < p_m)
        if tail.any():
            ok &= ~(tail & ((find_in(A, b"t_ms=", v_end, p_m) >= 0)
                            | (find_in(A, b"time_", v_end, p_m) >= 0)))
        dec = named & ((name == _DEC_TIME_NAMES[0]) | (name == _DEC_TIME_NAMES[1]))
        if dec.any():
            d, dok = decimal_ns(A, eq + 1, v_end, _NS, 11, m)
            have_t = dec & dok
            t = np.where(have_t, d, t)
        ext = named & (name == _EXT_TIME_NAMES[0])
    # timestamp= (seconds) is only read where no more precise time was
    need = ~have_t
    if need.any():
        ts, tok = digits(m, t0, ts_end, 12)
        # seconds whose nanoseconds (and microseconds) pass int64 would wrap: the
        # careful parser decides those rows
        ok &= (tok & (ts <= _I64_MAX // _NS - 1)) | have_t
        ts_ns = ts * _NS
        if ext is not None and ext.any():
            u, uok = digits(m, eq + 1, v_end, 6)
            ts_ns = np.where(ext & uok, ts_ns + u * 1000, ts_ns)
        t = np.where(have_t, t, ts_ns)
    return t, ok


def _cdr_times(B: np.ndarray, m: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """start, end (ns), where the duration's value starts, ok, and which rows are CDRs."""
    n = len(B)
    st = np.zeros(n, np.int64)
    en = np.zeros(n, np.int64)
    dstart = np.full(n, -1, np.int64)
    ok = np.zeros(n, bool)
    todo = np.ones(n, bool)
    all_rows = np.arange(n)
    for tpl in _CDR_TEMPLATES:
        sel = all_rows[todo]
        if not len(sel):
            break
        hit, vals = tpl.match(m, np.zeros(len(sel), np.int64), sel)
        rows = sel[hit]
        f = 10 ** (9 - tpl.runs[1][1])
        st[rows] = vals[0][hit] * _NS + vals[1][hit] * f
        en[rows] = vals[2][hit] * _NS + vals[3][hit] * f
        dstart[rows] = tpl.size
        ok[rows] = True
        todo[rows] = False
    cand = ok.copy()
    rest = np.flatnonzero(todo)
    if len(rest):
        sub = B[rest]
        sm = matrix(sub)
        p_e = S.find(sub, b"; end_time=")
        c = p_e >= 0
        # "end_time=" without the usual "; " before it: the careful parser decides
        c |= S.find(sub, b"end_time=") >= 0
        p_d = S.find(sub, b"; duration=", starts(p_e))
        good = (p_e > 0) & (p_d > p_e)
        s1, ok1 = decimal_ns(sub, np.zeros(len(sub), np.int64), p_e, _NS, 11, sm)
        e1, ok2 = decimal_ns(sub, p_e + 11, find_in(sub, b";", p_e + 11, p_d + 1), _NS, 11, sm)
        good &= ok1 & ok2
        st[rest], en[rest], ok[rest], cand[rest] = s1, e1, good, c
        dstart[rest] = np.where(good, p_d + 11, -1)
    return st, en, dstart, ok, cand


def _merge(fast_rows: np.ndarray, keys: np.ndarray, st: np.ndarray, en: np.ndarray,
           slow: list[tuple[int, int, bytes, int, int]]
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge slow-path events into the fast arrays, in log (row) order."""
    rows = np.concatenate([fast_rows, np.array([e[1] for e in slow], np.int64)])
    k = np.concatenate([keys, np.array([e[2] for e in slow])]) if len(keys) else \
        np.array([e[2] for e in slow])
    s = np.concatenate([st, np.array([e[3] for e in slow], np.int64)])
    e = np.concatenate([en, np.array([e[4] for e in slow], np.int64)])
    o = np.argsort(rows, kind="stable")
    return k[o], s[o], e[o]


def parse_text(text: bytes, key_width: int | None = None) -> Parsed:
    """Parse a whole text at once (convenience for tests and small inputs)."""
    if text and not text.endswith(b"\n"):
        text += b"\n"
    return AccParser(key_width, max_problems=1 << 30).parse(text)
