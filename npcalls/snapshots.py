"""Periodic Parquet snapshots in a hive layout, for fleet-wide queries.

``npcalls export calls --to /srv/npcalls --every 60s --keep 7d`` writes::

    /srv/npcalls/host=<host>/date=<YYYY-MM-DD>/<table>-<YYYYMMDDTHHMMSS.ffffff>Z.parquet

(``date`` and the time in the name are the snapshot's, in UTC).  Every row
carries ``call_id``, ``start``, ``end`` (``timestamp[ns, UTC]``, null when
unset), ``duration_s``, ``state`` (active / ended / end-only / empty), and the
``host``, ``table``, ``date`` and ``snapshot_time`` it came from, so a file
means the same thing wherever it is copied, and engines that read the
directory as a hive dataset find the partition columns in the files too.

Each file is written under a hidden temporary name in its final directory,
flushed to disk, then renamed into place: readers globbing ``*.parquet`` see
whole files or nothing, on a local disk or a shared (NFS) mount alike.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from .layout import NOT_SET
from .storage import pid_alive

__all__ = ["write_snapshot", "prune", "snapshot_path", "run_periodic", "SnapshotResult",
           "arrow_table", "FILE_RE"]

FILE_RE = re.compile(r"^(?P<table>.+)-(?P<ts>\d{8}T\d{6}\.\d{6})Z\.parquet$")
_TMP_RE = re.compile(r"^\..+\.parquet\.tmp-(?P<pid>\d+)$")
_STATES = np.array(["empty", "active", "end-only", "ended"])


def _pyarrow() -> tuple[Any, Any]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("Parquet snapshots need pyarrow: pip install 'npcalls[fleet]'") from None
    return pa, pq


def _check_label(what: str, value: str) -> str:
    # Host and table names become directory and file names: nothing that
    # could climb out of the directory or break the hive layout.
    if not value or value in (".", "..") or "/" in value or "=" in value or "\0" in value:
        raise ValueError(f"{what} {value!r} cannot name a snapshot directory or file "
                         "(empty, '/', '=' or NUL)")
    return value


def snapshot_path(root: str, host: str, table: str, when_ns: int) -> str:
    """Where the snapshot of ``table`` on ``host`` taken at ``when_ns`` goes."""
    _check_label("host", host)
    _check_label("table", table)
    dt = _utc(when_ns)
    return os.path.join(root, f"host={host}", f"date={dt:%Y-%m-%d}",
                        f"{table}-{dt:%Y%m%dT%H%M%S.%f}Z.parquet")


def _utc(ns: int) -> _dt.datetime:
    return _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc) + _dt.timedelta(
        microseconds=ns // 1000)


def arrow_table(snap: np.ndarray, host: str, table: str, when_ns: int) -> Any:
    """The rows of a snapshot as a pyarrow Table (see the module docstring for the columns)."""
    pa, _ = _pyarrow()
    st, en = snap["start"], snap["end"]
    st_null, en_null = st == NOT_SET, en == NOT_SET
    n = len(snap)
    both = ~st_null & ~en_null
    state = (~st_null).astype(np.int8) + 2 * (~en_null).astype(np.int8)
    dur = np.where(both, (en - st) / 1e9, 0.0)
    ts = pa.timestamp("ns", tz="UTC")
    date = f"{_utc(when_ns):%Y-%m-%d}"
    keys = [k.decode("utf-8", "surrogateescape") for k in snap["key"].tolist()]
    return pa.table({
        "call_id": pa.array(keys, pa.string()),
        "start": pa.array(st, ts, mask=st_null),
        "end": pa.array(en, ts, mask=en_null),
        "duration_s": pa.array(dur, pa.float64(), mask=~both),
        "state": pa.DictionaryArray.from_arrays(pa.array(state.astype(np.int32)),
                                                pa.array(_STATES.tolist())).cast(pa.string()),
        "host": pa.array(np.full(n, host, dtype=object), pa.string()),
        "table": pa.array(np.full(n, table, dtype=object), pa.string()),
        "date": pa.array(np.full(n, date, dtype=object), pa.string()),
        "snapshot_time": pa.array(np.full(n, when_ns, np.int64), ts),
    })


@dataclass(frozen=True)
class SnapshotResult:
    """One snapshot written: where, how many rows, and when it was taken."""

    path: str
    rows: int
    when_ns: int


def write_snapshot(table: Any, root: str, *, host: str | None = None, name: str | None = None,
                   now_ns: int | None = None) -> SnapshotResult:
    """Snapshot ``table`` (a :class:`CallTable`) into ``root`` atomically.

    Parameters
    ----------
    table : CallTable
        Read lock-free with :meth:`CallTable.snapshot`.
    root : str
        The dataset's root directory (created if missing).
    host, name : str, optional
        The ``host`` and ``table`` labels (default: this host's name, the
        table's file name without its ``npcalls.`` prefix).
    now_ns : int, optional
        The snapshot time (default: the wall clock just before the snapshot).
    """
    _, pq = _pyarrow()
    host = host or socket.gethostname()
    name = name or table_label(table.path)
    when = time.time_ns() if now_ns is None else int(now_ns)
    when -= when % 1000         # to the µs, like the time in the file's name
    path = snapshot_path(root, host, name, when)
    d = os.path.dirname(path)
    os.makedirs(d, exist_ok=True)
    snap = table.snapshot()
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            pq.write_table(arrow_table(snap, host, name, when), f, compression="zstd")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(d)
    return SnapshotResult(path, len(snap), when)


def table_label(path: str) -> str:
    base = os.path.basename(path)
    return base[len("npcalls."):] if base.startswith("npcalls.") else base


def _fsync_dir(d: str) -> None:
    try:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass                # some network file systems refuse fsync on directories
    finally:
        os.close(fd)


def prune(root: str, keep_ns: int, *, host: str, tables: Sequence[str] | None = None,
          now_ns: int | None = None) -> list[str]:
    """Remove this host's snapshots older than ``keep_ns`` (by the time in their name).

    Only files under ``root/host=<host>/`` whose names this module writes are
    considered (another host's files on a shared mount are left to that host),
    and only those of ``tables`` if given.  Temporary files left by a process
    that died are removed too; date directories left empty are removed.
    Returns the paths removed.
    """
    now = time.time_ns() if now_ns is None else now_ns
    cutoff = now - keep_ns
    hdir = os.path.join(root, f"host={_check_label('host', host)}")
    removed: list[str] = []
    try:
        dates = sorted(os.listdir(hdir))
    except FileNotFoundError:
        return removed
    for dd in dates:
        if not dd.startswith("date="):
            continue
        d = os.path.join(hdir, dd)
        try:
            names = os.listdir(d)
        except (FileNotFoundError, NotADirectoryError):
            continue
        for fn in names:
            p = os.path.join(d, fn)
            m = FILE_RE.match(fn)
            if m:
                if tables is not None and m["table"] not in tables:
                    continue
                t = _dt.datetime.strptime(m["ts"], "%Y%m%dT%H%M%S.%f").replace(
                    tzinfo=_dt.timezone.utc)
                t_ns = int(t.timestamp()) * 10**9 + t.microsecond * 1000
                if t_ns < cutoff:
                    _unlink(p, removed)
            else:
                tm = _TMP_RE.match(fn)
                if tm and int(tm["pid"]) != os.getpid() and not pid_alive(int(tm["pid"])):
                    _unlink(p, removed)
        try:
            os.rmdir(d)         # only succeeds when empty
        except OSError:
            pass
    return removed


def _unlink(p: str, removed: list[str]) -> None:
    try:
        os.unlink(p)
        removed.append(p)
    except FileNotFoundError:
        pass


def run_periodic(tables: Sequence[str], root: str, every_s: float, *, keep_ns: int | None = None,
                 host: str | None = None, count: int | None = None,
                 stop: threading.Event | None = None,
                 report: Callable[[str], None] | None = None,
                 on_error: Callable[[str], None] | None = None) -> int:
    """Snapshot ``tables`` every ``every_s`` seconds until ``stop`` is set (or ``count`` rounds).

    A stop request is honoured between snapshots, never in the middle of one
    (the CLI sets ``stop`` on SIGTERM and SIGINT), so a service manager can
    stop it at any time without leaving a partial file.  Rounds are aligned
    on the clock (every 60 s: at :00 of each minute).  A table that cannot
    be read is reported and retried at the next round.  Returns the number
    of files written.  ``report`` gets a line per file written or pruned,
    ``on_error`` (default: ``report``) a line per table that could not be read.
    """
    from .errors import NpcallsError
    from .table import CallTable
    if not every_s > 0:
        raise ValueError(f"the interval must be positive, not {every_s}")
    host = _check_label("host", host or socket.gethostname())
    stop = stop or threading.Event()
    say = report or (lambda s: None)
    err = on_error or say
    handles: dict[str, Any] = {}
    written = rounds = 0
    try:
        while not stop.is_set():
            for name in tables:
                try:
                    t = handles.get(name)
                    if t is None:
                        t = handles[name] = CallTable.open(name, readonly=True)
                    r = write_snapshot(t, root, host=host, name=table_label(t.path))
                    written += 1
                    say(f"{r.path}: {r.rows} calls")
                except (NpcallsError, OSError) as e:
                    t = handles.pop(name, None)
                    if t is not None:
                        t.close()
                    err(f"{name}: {e}")
            if keep_ns is not None:
                for p in prune(root, keep_ns, host=host,
                               tables=[table_label(h.path) for h in handles.values()]):
                    say(f"pruned {p}")
            rounds += 1
            if count is not None and rounds >= count:
                break
            now = time.time()
            stop.wait(every_s - (now % every_s))
    finally:
        for t in handles.values():
            t.close()
    return written
