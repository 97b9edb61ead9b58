"""Loaders: Kamailio/OpenSIPS acc logs, CDR CSV and JSON-lines files into a CallTable.

>>> import npcalls
>>> from npcalls.ingest import ingest
>>> t = npcalls.CallTable.create("calls", capacity=1 << 20)          # doctest: +SKIP
>>> summary = ingest(t, ["/var/log/kamailio/acc.log", "old.log.gz"])  # doctest: +SKIP
>>> print(summary.format())                                           # doctest: +SKIP

Modules: :mod:`.sources` (files, compression, stdin, ``tail -F``),
:mod:`.acc` (acc transaction and CDR lines), :mod:`.tabular` (CSV and JSON
lines), :mod:`.loader` (batches into the table, acc/CDR reconciliation),
:mod:`.run` (the whole load), :mod:`.summary` (what it did).
"""

from .acc import AccParser, parse_acc_text, parse_cdr_text
from .common import Parsed, Problem
from .loader import DEFAULT_BATCH, Loader, aggregate
from .run import FORMATS, detect_format, ingest
from .sources import Source, SourceError, Tail, open_source
from .summary import Summary
from .tabular import TabularParser

__all__ = ["ingest", "detect_format", "FORMATS", "Summary", "Loader", "aggregate",
           "DEFAULT_BATCH", "AccParser", "TabularParser", "Parsed", "Problem",
           "parse_acc_text", "parse_cdr_text", "Source", "SourceError", "Tail", "open_source"]
