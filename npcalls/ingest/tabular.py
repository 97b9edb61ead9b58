"""CDRs as CSV (with a header row) and as JSON lines.

The Call-ID, start and end columns are chosen by name (``--call-id-col``
etc.; by default the usual names: ``call_id``/``callid``/``call-id``,
``start``/``start_time``/..., ``end``/``end_time``/``stop``/...).  Times are
epoch seconds, milliseconds, microseconds or nanoseconds (decimals allowed),
or ISO 8601; the unit is guessed per column from the first rows unless given.
An empty time means "not known" (``npcalls dump`` writes active calls with an
empty end), so a row needs a Call-ID and at least one time.

A row is bad (counted, shown with ``file:line``, never stored) when its end is
before its start, or when a time lies outside :data:`TIME_WINDOW`
(2000-01-01 to 2100-01-01 UTC): such times come from a wrong column, a wrong
unit or a damaged line, never from a real CDR.  Quoted fields may hold
newlines, as RFC 4180 allows: the record runs on to the closing quote (and
is numbered by its first line); a quote never closed makes the rest of the
input one bad record.

CSV chunks without quotes are cut into fields by numpy (``np.strings.find``
for the commas, one gather per column), which reads millions of rows per
second; chunks with quotes go through the :mod:`csv` module.  JSON lines are
read with :func:`json.loads`, line by line, since every line may order its
keys differently.
"""

from __future__ import annotations

import csv
import json
from typing import Any, Sequence

import numpy as np

from ..layout import NOT_SET
from ._vec import (
    UNIT_NS,
    S,
    decimal_ns,
    field,
    guess_unit,
    key_check,
    parse_column,
    parse_iso,
    strip_if_needed,
)
from .common import (
    ChunkLines,
    Parsed,
    Problem,
    call_id_problem,
    count_lines,
    count_problem,
    problem_text,
    too_long_reason,
)

__all__ = ["TabularParser", "CALL_ID_NAMES", "START_NAMES", "END_NAMES", "TIME_UNITS",
           "TIME_WINDOW", "looks_like_csv_header"]

CALL_ID_NAMES = ("call_id", "callid", "call-id", "sip_call_id", "sip_callid", "key")
START_NAMES = ("start", "start_time", "starttime", "start_ts", "time_start", "call_start_time",
               "setup_time", "created")
END_NAMES = ("end", "end_time", "endtime", "end_ts", "time_end", "stop", "stop_time",
             "call_end_time")
TIME_UNITS = ("auto", "s", "ms", "us", "ns", "iso")
TIME_WINDOW = (946_684_800 * 10**9, 4_102_444_800 * 10**9)
"""Times a CSV/JSON row may hold, in ns: [2000-01-01T00:00Z, 2100-01-01T00:00Z)."""


def _day(ns: int) -> str:
    return str(np.datetime64(int(ns), "ns").astype("datetime64[s]")) + "Z"


def _norm(name: str) -> str:
    return name.strip().strip('"').strip().lower()


def _pick(header: Sequence[str], wanted: str | None, defaults: Sequence[str],
          what: str) -> int | None:
    names = [_norm(h) for h in header]
    if wanted is not None:
        w = _norm(wanted)
        if w in names:
            return names.index(w)
        if wanted.isdigit() and int(wanted) < len(names):
            return int(wanted)
        raise ValueError(f"no {what} column {wanted!r} in the header "
                         f"(columns: {', '.join(h.strip() for h in header)})")
    for d in defaults:
        if d in names:
            return names.index(d)
    return None


def looks_like_csv_header(line: bytes, call_id_col: str | None = None) -> bool:
    """Is this line a CSV header naming a Call-ID column?"""
    line = line.lstrip(b"\xef\xbb\xbf").strip()
    if b"," not in line:
        return False
    try:
        names = [_norm(h) for h in next(csv.reader([line.decode("utf-8", "replace")]))]
    except (csv.Error, StopIteration):
        return False
    wanted = [_norm(call_id_col)] if call_id_col else list(CALL_ID_NAMES)
    return any(w in names for w in wanted)


class TabularParser:
    """Parse a CSV or JSON-lines source, chunk by chunk (one parser per source).

    Parameters
    ----------
    fmt : {"csv", "jsonl"}
    call_id_col, start_col, end_col : str or None
        Column (or JSON key) names; None picks the usual names.
    time_unit : {"auto", "s", "ms", "us", "ns", "iso"}
    key_width : int or None
        The table's key width (longer Call-IDs are reported, not truncated).
    max_problems : int
        Problems kept with their text.
    """

    def __init__(self, fmt: str, call_id_col: str | None = None, start_col: str | None = None,
                 end_col: str | None = None, time_unit: str = "auto",
                 key_width: int | None = None, max_problems: int = 10) -> None:
        if fmt not in ("csv", "jsonl"):
            raise ValueError(f"unknown tabular format {fmt!r}")
        if time_unit not in TIME_UNITS:
            raise ValueError(f"time unit must be one of {', '.join(TIME_UNITS)}")
        self.fmt = fmt
        self.names = (call_id_col, start_col, end_col)
        self.time_unit = time_unit
        self.key_width = key_width
        self.max_problems = max_problems
        self.kept = 0
        self._cols: tuple[int, int | None, int | None] | None = None
        self._ncols = 0
        self._units: list[str | None] = [None, None]
        self._header_seen = False
        self._carry: tuple[bytes, int] | None = None    # a quoted record open at a chunk's end

    # ------------------------------------------------------------------ common

    def _problem(self, p: Parsed, kind: str, reason: str, source: str, line: int,
                 text: bytes) -> None:
        count_problem(p, kind)
        if self.kept < self.max_problems:
            self.kept += 1
            p.problems.append(Problem(source, line, kind, reason,
                                      problem_text(text, log_escapes=False)))

    def _too_long(self, n: int) -> str:
        return too_long_reason(n, self.key_width)

    def _unit(self, i: int, values: np.ndarray) -> str | None:
        if self.time_unit != "auto":
            return self.time_unit
        if self._units[i] is None:
            self._units[i] = guess_unit(values)
        return self._units[i]

    def parse(self, chunk: bytes, base_line: int = 0, source: str = "-") -> Parsed:
        """Parse a chunk of whole lines; the first chunk of a CSV source holds the header."""
        if self.fmt == "csv":
            return self._csv(chunk, base_line, source)
        return self._jsonl(chunk, base_line, source)

    def _finish(self, p: Parsed, keys: np.ndarray, st: np.ndarray, en: np.ndarray,
                ok: np.ndarray, lines: Any, first_line: int, source: str,
                reasons: dict[int, str], numbers: list[int] | None = None) -> Parsed:
        """Key checks, problems and the event arrays from per-row columns.

        Row ``i`` is line ``first_line + i``, or ``numbers[i]`` when given
        (CSV records may span lines).
        """
        lo, hi = TIME_WINDOW
        for col, what in ((st, "start"), (en, "end")):
            out = ok & (col != NOT_SET) & ((col < lo) | (col >= hi))
            for i in np.flatnonzero(out).tolist():
                reasons[i] = (f"{what} time {_day(col[i])} outside the accepted window "
                              f"2000-01-01..2100-01-01 (wrong column or unit?)")
            ok &= ~out
        rev = ok & (st != NOT_SET) & (en != NOT_SET) & (en < st)
        for i in np.flatnonzero(rev).tolist():
            reasons[i] = (f"end {_day(en[i])} before start {_day(st[i])} "
                          f"({(int(en[i]) - int(st[i])) / 1e9:g} s)")
        ok &= ~rev
        kok, too_long, odd = key_check(keys, self.key_width)
        for i in np.flatnonzero(ok & odd).tolist():
            why = call_id_problem(bytes(keys[i]))
            if why:
                ok[i] = False
                reasons[i] = why
            else:
                kok[i] = True
        for i in np.flatnonzero(ok & too_long).tolist():
            self._problem(p, "too_long", self._too_long(len(keys[i])), source,
                          numbers[i] if numbers else first_line + i, lines[i])
        for i in sorted(reasons):
            self._problem(p, "bad", reasons[i], source,
                          numbers[i] if numbers else first_line + i, lines[i])
        good = ok & kok
        p.fold = False                    # one row per call, as a rule
        p.records = int(np.count_nonzero(good))
        p.acc_keys, p.acc_start, p.acc_end = keys[good], st[good], en[good]
        return p

    # ------------------------------------------------------------------ CSV

    def _header(self, line: bytes) -> None:
        text = line.lstrip(b"\xef\xbb\xbf").rstrip(b"\r\n").decode("utf-8", "replace")
        try:
            header = next(csv.reader([text]))
        except (csv.Error, StopIteration) as e:
            # a binary file, a header field over the csv module's limit, ...
            raise ValueError(f"unreadable CSV header (line 1): {e}") from None
        cid = _pick(header, self.names[0], CALL_ID_NAMES, "Call-ID")
        if cid is None:
            raise ValueError(f"no Call-ID column in the header (columns: {', '.join(header)}); "
                             "name it with --call-id-col")
        st = _pick(header, self.names[1], START_NAMES, "start")
        en = _pick(header, self.names[2], END_NAMES, "end")
        if st is None and en is None:
            raise ValueError(f"no start or end column in the header (columns: "
                             f"{', '.join(header)}); name them with --start-col / --end-col")
        self._cols = (cid, st, en)
        self._ncols = len(header)

    def _csv(self, chunk: bytes, base_line: int, source: str) -> Parsed:
        p = Parsed()
        p.lines = count_lines(chunk)
        body = chunk
        first = base_line + 1
        if not self._header_seen:
            hdr_end = chunk.find(b"\n")
            self._header(chunk[:hdr_end])
            self._header_seen = True
            body = chunk[hdr_end + 1:]
            first += 1
        if self._carry is not None:
            # a quoted record left open by the previous chunk goes on here
            body = self._carry[0] + body
            first = self._carry[1]
            self._carry = None
        if not body:
            return p
        if b'"' in body:
            lines = body.split(b"\n")
            lines.pop()                               # the chunk ends with a newline
            return self._csv_quoted(p, lines, first, source)
        # No quotes: the chunk is cut by numpy, on the bytes themselves -- the
        # positions of its newlines and commas say where every field is.
        buf = np.frombuffer(body, np.uint8)
        sep = np.flatnonzero((buf == 44) | (buf == 10))       # commas and newlines, in order
        nl_at = np.flatnonzero(buf[sep] == 10)                 # which of them end a line
        nl = sep[nl_at]
        n = len(nl)
        first_sep = np.empty(n, np.int64)                      # a line's first separator
        first_sep[0] = 0
        first_sep[1:] = nl_at[:-1] + 1
        ncomma = nl_at - first_sep
        starts = np.empty(n, np.int64)
        starts[0] = 0
        starts[1:] = nl[:-1] + 1
        ends = nl.copy()
        if b"\r" in body:
            cr = buf[np.maximum(ends - 1, 0)] == 13
            ends -= cr & (ends > starts)
        blank = ends == starts
        ok = (ncomma == self._ncols - 1) & ~blank
        cl = ChunkLines(body, 0, starts, ends)
        reasons: dict[int, str] = {}
        for i in np.flatnonzero(~ok & ~blank).tolist():
            if not cl[i].strip():
                blank[i] = True                       # spaces only: a blank line
                continue
            reasons[i] = f"expected {self._ncols} fields, found {int(ncomma[i]) + 1}"
        p.ignored = int(np.count_nonzero(blank))
        cid_c, st_c, en_c = self._cols  # type: ignore[misc]

        def span(c: int) -> tuple[np.ndarray, np.ndarray]:
            # field c runs from after separator c-1 of its line (or the line's
            # start) to separator c; rows with the wrong number of fields are not ok
            a = starts if c == 0 else sep[np.where(ok, first_sep + c - 1, 0)] + 1
            z = ends if c == self._ncols - 1 else sep[np.where(ok, first_sep + c, 0)]
            a = np.where(ok, a, starts)
            return a, np.where(ok, z, a)

        m = buf.reshape(1, -1)
        zero = np.zeros(n, np.int64)

        def get(sp: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
            return field(None, sp[0], sp[1], m, rows=zero)

        keys = strip_if_needed(get(span(cid_c)))
        st, en = self._times(get, span(st_c) if st_c is not None else None,
                             span(en_c) if en_c is not None else None, ok, reasons)
        return self._finish(p, keys, st, en, ok, cl, first, source, reasons)

    def _times(self, get: Any, sspan: Any, espan: Any, ok: np.ndarray,
               reasons: dict[int, str]) -> tuple[np.ndarray, np.ndarray]:
        n = len(ok)
        out = []
        raw: list[np.ndarray | None] = []
        for i, sp in enumerate((sspan, espan)):
            if sp is None:
                raw.append(None)
                continue
            raw.append(strip_if_needed(get(sp)))
        for i, f in enumerate(raw):
            col = np.full(n, NOT_SET, np.int64)
            if f is not None:
                present = S.str_len(f) > 0
                unit = self._units[i] if self.time_unit == "auto" else self.time_unit
                if unit is None:
                    unit = self._unit(i, f[present & ok])
                other = raw[1 - i]
                if unit is None and other is not None:
                    unit = self._unit(1 - i, other[ok])
                if unit is not None and present.any():
                    v, vok = parse_column(f, unit)
                    col = np.where(present & vok, v, NOT_SET)
                    badt = present & ~vok & ok
                    for j in np.flatnonzero(badt).tolist():
                        reasons[j] = (f"unreadable {'start' if i == 0 else 'end'} time "
                                      f"{bytes(f[j]).decode('utf-8', 'backslashreplace')!r} "
                                      f"(unit {unit})")
                    ok &= ~badt
                elif present.any():
                    for j in np.flatnonzero(present & ok).tolist():
                        reasons[j] = "unreadable time"
                    ok &= ~present
            out.append(col)
        none = ok & (out[0] == NOT_SET) & (out[1] == NOT_SET)
        for j in np.flatnonzero(none).tolist():
            reasons[j] = "no start or end time"
        ok &= ~none
        return out[0], out[1]

    def _csv_quoted(self, p: Parsed, lines: list[bytes], first: int, source: str) -> Parsed:
        # Records, as the csv module reads them (strict: a stray quote is an
        # error, not a guess); a quoted field may run over several lines.
        cid_c, st_c, en_c = self._cols  # type: ignore[misc]
        reader = csv.reader([ln.decode("utf-8", "surrogateescape") + "\n" for ln in lines],
                            strict=True)
        recs: list[tuple[int, list[str] | None, str | None]] = []   # (first line index, row, why)
        prev = 0
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                if reader.line_num >= len(lines) and "unexpected end of data" in str(e):
                    # the chunk ends inside a quoted field: the record goes on in the next
                    self._carry = (b"".join(ln + b"\n" for ln in lines[prev:]), first + prev)
                    break
                recs.append((prev, None, f"unreadable CSV: {e}"))
                prev = reader.line_num
                continue
            recs.append((prev, row, None))
            prev = reader.line_num
        keys: list[bytes] = []
        cols: list[list[bytes]] = [[], []]
        ok_l: list[bool] = []
        numbers: list[int] = []
        texts: list[bytes] = []
        reasons: dict[int, str] = {}
        for li, rec, why in recs:
            if rec is not None and not "".join(rec).strip():
                p.ignored += 1                          # a blank line
                continue
            i = len(keys)
            numbers.append(first + li)
            texts.append(lines[li])
            keys.append(b"")
            cols[0].append(b"")
            cols[1].append(b"")
            ok_l.append(False)
            if rec is None:
                reasons[i] = why or "unreadable CSV"
                continue
            if len(rec) != self._ncols:
                reasons[i] = f"expected {self._ncols} fields, found {len(rec)}"
                continue
            ok_l[i] = True
            keys[i] = rec[cid_c].strip().encode("utf-8", "surrogateescape")
            for j, c in enumerate((st_c, en_c)):
                if c is not None:
                    cols[j][i] = rec[c].strip().encode("utf-8", "surrogateescape")
        n = len(keys)
        ok = np.array(ok_l, bool)
        K = np.array(keys) if n else np.empty(0, "S1")
        if K.dtype.itemsize == 0:
            K = K.astype("S1")
        T = [np.array(c) if n else np.empty(0, "S1") for c in cols]
        T = [t.astype("S1") if t.dtype.itemsize == 0 else t for t in T]
        st, en = self._times(lambda col: col, T[0] if st_c is not None else None,
                             T[1] if en_c is not None else None, ok, reasons)
        return self._finish(p, K, st, en, ok, texts, first, source, reasons, numbers)

    def finish(self, source: str = "-") -> Parsed | None:
        """The end of the input: a quoted record still open is a bad record."""
        if self._carry is None:
            return None
        text, line = self._carry
        self._carry = None
        p = Parsed()
        self._problem(p, "bad", "a quote opened here is never closed (the rest of the input "
                      "is inside it)", source, line, text.split(b"\n", 1)[0])
        return p

    # ------------------------------------------------------------------ JSON lines

    def _jsonl(self, chunk: bytes, base_line: int, source: str) -> Parsed:
        p = Parsed()
        p.lines = count_lines(chunk)
        lines = chunk.split(b"\n")
        lines.pop()
        n = len(lines)
        try:
            objs = list(map(json.loads, lines))
        except ValueError:
            objs = []
            for line in lines:
                try:
                    objs.append(json.loads(line))
                except ValueError:
                    objs.append(None if line.strip() else ...)
        cid_n, st_n, en_n = self.names
        keys: list[bytes] = [b""] * n
        tv: list[list[Any]] = [[None] * n, [None] * n]
        ok = np.ones(n, bool)
        reasons: dict[int, str] = {}
        for i, o in enumerate(objs):
            if o is ... or (o is None and not lines[i].strip()):
                ok[i] = False
                p.ignored += 1
                continue
            if not isinstance(o, dict):
                ok[i] = False
                reasons[i] = "not a JSON object"
                continue
            k = _get(o, cid_n, CALL_ID_NAMES)
            if k is None:
                ok[i] = False
                reasons[i] = "no Call-ID"
                continue
            if isinstance(k, str):
                k = k.encode("utf-8", "surrogateescape")
            elif not isinstance(k, bytes):
                ok[i] = False
                reasons[i] = f"Call-ID is not a string: {k!r}"[:100]
                continue
            keys[i] = k
            tv[0][i] = _get(o, st_n, START_NAMES)
            tv[1][i] = _get(o, en_n, END_NAMES)
        K = np.array(keys) if n else np.empty(0, "S1")
        if K.dtype.itemsize == 0:
            K = K.astype("S1")
        cols = []
        for j in (0, 1):
            col = np.full(n, NOT_SET, np.int64)
            vals = tv[j]
            strs = np.zeros(n, bool)
            svals: list[bytes] = [b""] * n
            nums: dict[int, Any] = {}
            for i, v in enumerate(vals):
                if v is None or not ok[i]:
                    continue
                if isinstance(v, bool):
                    ok[i] = False
                    reasons[i] = f"unreadable {'start' if j == 0 else 'end'} time {v!r}"
                elif isinstance(v, (int, float)):
                    nums[i] = v
                elif isinstance(v, str):
                    if v.strip():
                        strs[i] = True
                        svals[i] = v.strip().encode("utf-8", "replace")
                else:
                    ok[i] = False
                    reasons[i] = f"unreadable {'start' if j == 0 else 'end'} time {v!r}"[:100]
            if strs.any():
                # JSON strings may mix ISO dates and numbers: decide per value
                A = np.array(svals)
                iso = strs & (S.find(A, b"-") == 4)
                num = strs & ~iso
                v_ = np.zeros(n, np.int64)
                vok = np.zeros(n, bool)
                if iso.any():
                    vi, oki = parse_iso(A)
                    v_, vok = np.where(iso, vi, v_), np.where(iso, oki, vok)
                if num.any():
                    unit = self.time_unit if self.time_unit not in ("auto", "iso") else \
                        (self._unit(j, A[num]) if self.time_unit == "auto" else "s")
                    if unit is None or unit == "iso":
                        unit = "s"
                    vn, okn = decimal_ns(A, np.zeros(n, np.int64), S.str_len(A),
                                         UNIT_NS[unit], 19)
                    v_, vok = np.where(num, vn, v_), np.where(num, okn, vok)
                col = np.where(strs & vok, v_, col)
                for i in np.flatnonzero(strs & ~vok & ok).tolist():
                    reasons[i] = (f"unreadable {'start' if j == 0 else 'end'} time "
                                  f"{vals[i]!r}")[:120]
                    ok[i] = False
            if nums:
                idx = list(nums)
                unit = self.time_unit if self.time_unit != "auto" else self._units[j]
                if unit is None or unit == "iso":
                    unit = guess_unit(np.array([b"%d" % abs(int(nums[i])) for i in idx[:1000]]))
                    if self.time_unit == "auto" and self._units[j] is None:
                        self._units[j] = unit
                scale = UNIT_NS[unit or "s"]
                for i in idx:
                    v = nums[i]
                    try:
                        if isinstance(v, float):
                            # floats carry ~16 digits: round to the microsecond
                            # (like npcalls.from_seconds) before scaling further
                            t = (int(round(v * scale / 1000)) * 1000 if scale >= 1000
                                 else int(round(v * scale)))
                        else:
                            t = v * scale
                    except (OverflowError, ValueError):      # inf, nan
                        t = -1
                    if 0 <= t < (1 << 63):
                        col[i] = t
                    else:
                        ok[i] = False
                        reasons[i] = f"time out of range: {v!r}"
            cols.append(col)
        none = ok & (cols[0] == NOT_SET) & (cols[1] == NOT_SET)
        for i in np.flatnonzero(none).tolist():
            reasons[i] = "no start or end time"
        ok &= ~none
        return self._finish(p, K, cols[0], cols[1], ok, lines, base_line + 1, source, reasons)


def _get(o: dict, wanted: str | None, defaults: Sequence[str]) -> Any:
    if wanted is not None:
        if wanted in o:
            return o[wanted]
        lw = wanted.lower()
        for k, v in o.items():
            if k.lower() == lw:
                return v
        return None
    for d in defaults:
        if d in o:
            return o[d]
    return None
