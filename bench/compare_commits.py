"""Two versions of npcalls in one process, op against op: is a change faster or slower?

On a shared 2-CPU machine two benchmark runs minutes apart differ by more
than the few percent a refactoring may cost.  This script imports two
versions of the package side by side (each exported from git, or copied
from a directory, under its own module name) and times them in alternating
chunks of the same operations on the same keys, in thread CPU time, so that
the machine's load hits both alike.  It prints the median ns per operation
(per key for the batch rows) and the ratio B/A.

Usage::

    .venv/bin/python bench/compare_commits.py 225b44a HEAD
    .venv/bin/python bench/compare_commits.py main /path/to/other/checkout --rounds 200

A and B are git revisions of this repository or directories holding an
``npcalls`` package.  Tables are created in /dev/shm and removed at the end.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from types import ModuleType
from typing import Any, Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ct = time.thread_time_ns


def _export(spec: str, dest: str, name: str) -> str:
    """Put ``spec``'s npcalls package at ``dest/name``; returns a label for it."""
    target = os.path.join(dest, name)
    if os.path.isdir(os.path.join(spec, "npcalls")):
        shutil.copytree(os.path.join(spec, "npcalls"), target)
        return spec
    rev = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", spec], check=True,
                         capture_output=True, text=True).stdout.strip()
    tmp = os.path.join(dest, f"{name}-src")
    os.makedirs(tmp)
    tar = subprocess.run(["git", "-C", REPO, "archive", rev, "npcalls"], check=True,
                         capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", tmp], input=tar, check=True)
    os.rename(os.path.join(tmp, "npcalls"), target)
    return f"{spec} ({rev})" if rev != spec else rev


def _load(specs: list[str], dest: str) -> list[tuple[str, ModuleType]]:
    """Import each version under its own name (the core imports itself relatively)."""
    sys.path.insert(0, dest)
    out = []
    for i, spec in enumerate(specs):
        name = f"npcalls_cmp{i}"
        label = _export(spec, dest, name)
        out.append((label, importlib.import_module(name)))
    return out


def _ops(t: Any, keys: list[str], miss: list[str]) -> dict[str, Callable[[], int]]:
    """The timed operations on table ``t``, in the order they run; each returns its count."""
    def start() -> int:
        for k in keys:
            t.start(k)
        return len(keys)

    def stop() -> int:
        for k in keys:
            t.stop(k)
        return len(keys)

    def get_hit() -> int:
        for k in keys:
            t.get(k)
        return len(keys)

    def get_miss() -> int:
        for k in miss:
            t.get(k)
        return len(miss)

    def remove() -> int:
        for k in keys:
            t.remove(k)
        return len(keys)

    def start_many() -> int:
        t.start_many(keys)
        return len(keys)

    def stop_many() -> int:
        t.stop_many(keys)
        return len(keys)

    def get_many() -> int:
        t.get_many(keys + miss)
        return 2 * len(keys)

    def remove_many() -> int:
        t.remove_many(keys)
        return len(keys)

    return {f.__name__: f for f in (start, stop, get_hit, get_miss, remove, start_many,
                                    stop_many, get_many, remove_many)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", help="git revision or directory holding npcalls/ (the baseline)")
    ap.add_argument("b", help="git revision or directory holding npcalls/")
    ap.add_argument("--rounds", type=int, default=80, help="alternations (default 80)")
    ap.add_argument("--chunk", type=int, default=2000, help="keys per chunk (default 2000)")
    ap.add_argument("--fill", type=int, default=60_000,
                    help="calls in each table before timing (default 60,000)")
    args = ap.parse_args(argv)

    dest = tempfile.mkdtemp(prefix="npcalls-compare-")
    tables: list[tuple[Any, str]] = []
    try:
        versions = _load([args.a, args.b], dest)
        fill = [f"pre{j:09d}@fill.example.com" for j in range(args.fill)]
        for i, (_, mod) in enumerate(versions):
            name = f"compare-{os.getpid()}-{i}"
            t = mod.CallTable.create(name, capacity=max(1 << 16, 4 * (args.fill + 2 * args.chunk)))
            t.start_many(fill)
            tables.append((t, name))
        times: list[dict[str, list[float]]] = [{}, {}]
        for r in range(args.rounds):
            keys = [f"{r:05d}{j:012x}@bench.example.com" for j in range(args.chunk)]
            miss = [f"{r:05d}{j:012x}@other.example.com" for j in range(args.chunk)]
            order = (0, 1) if r % 2 == 0 else (1, 0)
            for i in order:
                for op, f in _ops(tables[i][0], keys, miss).items():
                    c = _ct()
                    n = f()
                    times[i].setdefault(op, []).append((_ct() - c) / n)
        a_label, b_label = versions[0][0], versions[1][0]
        print(f"A = {a_label}\nB = {b_label}\n{args.rounds} alternations of {args.chunk} keys, "
              f"tables of {args.fill:,} calls; load average {os.getloadavg()[0]:.2f}")
        print(f"{'operation':<12} {'A ns':>9} {'B ns':>9} {'B/A':>7}")
        for op in times[0]:
            a = statistics.median(times[0][op])
            b = statistics.median(times[1][op])
            print(f"{op:<12} {a:>9.0f} {b:>9.0f} {b / a:>7.3f}")
        print("(single operations: ns per call; *_many: ns per key)")
    finally:
        for t, name in tables:
            t.close()
            type(t).unlink(name)
        shutil.rmtree(dest, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
