"""What a load did: counts, the first problems, and how to say it on a terminal."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Summary"]


@dataclass
class Summary:
    """The result of a load (:func:`npcalls.ingest.ingest`).

    Attributes
    ----------
    sources : list of str
        The inputs read, in order.
    lines : int
        Lines read (CSV header rows included).
    acc_lines, cdr_lines : int
        Good acc transaction lines and CDR lines (acc logs).
    records : int
        Good rows of CSV / JSON-lines inputs.
    failed : int
        Good lines that start no call: ``call missed``, INVITEs answered with
        3xx-6xx (rejected, challenged, cancelled), CDRs of unanswered dialogs.
    ignored : int
        Lines that are not acc module lines (script logs, other daemons).
    started, ended : int
        Calls whose start / end this load recorded (a time already in the
        table is kept, so a second load of the same log records nothing).
    end_only : int
        Calls this load ended whose start is unknown (a BYE whose INVITE
        predates the log), counted once the load is complete.
    bad : int
        Lines that could not be loaded: an acc or CDR line (or a CSV/JSON row)
        whose method, code, time or Call-ID is missing or unreadable.
    too_long : int
        Lines whose Call-ID is longer than the table's key width.
    problems : list of Problem
        The first ``bad`` and ``too_long`` lines, with file and line number.
    errors : list of str
        Inputs that could not be read at all.
    truncated : list of str
        Compressed inputs that end early (a .gz cut short): the lines before
        the damage were loaded.
    seconds : float
        Wall-clock time of the load.
    key_width : int or None
        The table's key width (for the hint about long Call-IDs).
    interrupted : bool
        The load was cut short (Ctrl-C); what was read before is in the table.
    """

    sources: list = field(default_factory=list)
    lines: int = 0
    acc_lines: int = 0
    cdr_lines: int = 0
    records: int = 0
    failed: int = 0
    ignored: int = 0
    started: int = 0
    ended: int = 0
    end_only: int = 0
    bad: int = 0
    too_long: int = 0
    problems: list = field(default_factory=list)
    errors: list = field(default_factory=list)
    truncated: list = field(default_factory=list)
    seconds: float = 0.0
    key_width: int | None = None
    interrupted: bool = False

    @property
    def lines_per_second(self) -> float:
        return self.lines / self.seconds if self.seconds > 0 else 0.0

    @property
    def ok(self) -> bool:
        """True when every line was loaded or deliberately ignored, and every input read."""
        return not (self.bad or self.too_long or self.errors or self.truncated)

    def as_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["problems"] = [p._asdict() for p in self.problems]
        d["lines_per_second"] = self.lines_per_second
        return d

    def format(self, show: int | None = None) -> str:
        """A few lines for a terminal (what ``npcalls ingest`` prints on stderr)."""
        n_src = len(self.sources)
        rate = f"{self.lines_per_second:,.0f} lines/s" if self.seconds > 0 else ""
        out = [f"read {self.lines:,} line{'s' if self.lines != 1 else ''} from {n_src} "
               f"input{'s' if n_src != 1 else ''} "
               f"in {self.seconds:.2f} s" + (f" ({rate})" if rate else "")]
        kinds = []
        if self.acc_lines or self.cdr_lines or not self.records:
            kinds.append(f"{self.acc_lines:,} acc lines, {self.cdr_lines:,} CDR lines")
        if self.records:
            kinds.append(f"{self.records:,} CSV/JSON rows")
        kinds.append(f"{self.failed:,} failed/missed/unanswered")
        kinds.append(f"{self.ignored:,} other lines ignored")
        out.append("  " + ", ".join(kinds))
        out.append(f"  calls: {self.started:,} started, {self.ended:,} ended, "
                   f"{self.end_only:,} end-only (no INVITE in the input)")
        out.append(f"  bad lines: {self.bad:,}"
                   + (f"; Call-IDs too long for the table: {self.too_long:,}"
                      if self.too_long else ""))
        shown = self.problems if show is None else self.problems[:show]
        for p in shown:
            out.append(f"  {p.source}:{p.line}: {p.reason}")
            out.append(f"      {p.text}")
        more = self.bad + self.too_long - len(shown)
        if shown and more > 0:
            out.append(f"  ... and {more:,} more")
        if self.too_long:
            kw = f" (now {self.key_width})" if self.key_width else ""
            out.append(f"  hint: Call-IDs are never truncated; create the table with a larger "
                       f"key width{kw}: npcalls create NAME --capacity N --key-width W "
                       f"(W at most 4096)")
        for e in self.truncated:
            out.append(f"  truncated: {e} (the lines before were loaded)")
        for e in self.errors:
            out.append(f"  error: {e}")
        return "\n".join(out)
