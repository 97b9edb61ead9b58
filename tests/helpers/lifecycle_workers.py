"""Process bodies for the lifecycle tests (importable by spawned children)."""

from __future__ import annotations

import time

import numpy as np

from npcalls import NOT_SET, CallTable


def key(w: int, i: int) -> str:
    return f"w{w}-{i:06d}@grow.example.org"


def writer(path: str, w: int, n: int, done: "object", batch: int) -> None:
    """Insert keys w-0..n-1 (end = start + 1), alternating batches and single ops.

    ``done.value`` is raised after each batch: every key below it is in the table.
    """
    t = CallTable.open(path)
    i = 0
    while i < n:
        ks = [key(w, j) for j in range(i, min(n, i + batch))]
        starts = np.array([w * 10_000_000 + j for j in range(i, i + len(ks))], np.int64)
        if (i // batch) % 2:
            for k, s in zip(ks, starts.tolist()):
                t.start(k, s)
                t.stop(k, s + 1)
        else:
            t.record_many(ks, starts, starts + 1)
        i += len(ks)
        done.value = i
    t.close()


def grower(path: str, capacities: list[int], wait_for: "object", at: list[int]) -> None:
    """Grow the table to each capacity once the writers have inserted ``at[i]`` keys."""
    t = CallTable.open(path)
    for cap, threshold in zip(capacities, at):
        while wait_for() < threshold:
            time.sleep(0.001)
        t.grow(cap)
    t.close()


def reader(path: str, writers: int, dones: list, stop: "object", result: "object") -> None:
    """Check, until told to stop, that every key a writer has finished is found whole."""
    t = CallTable.open(path, readonly=True)
    rng = np.random.default_rng()
    reads = bad = 0
    seen_generations = set()
    while not stop.value:
        w = int(rng.integers(writers))
        n = dones[w].value
        if n == 0:
            continue
        idx = rng.integers(0, n, 200)
        ks = [key(w, int(j)) for j in idx]
        r = t.get_many(ks)
        want = w * 10_000_000 + idx
        # found, start right, and end either not yet written or start + 1
        ok = r.found & (r.start == want) & ((r.end == NOT_SET) | (r.end == want + 1))
        bad += int(np.count_nonzero(~ok))
        one = ks[0]
        got = t.get(one)
        if got is None or got[0] != want[0]:
            bad += 1
        snap = t.snapshot()
        both = snap["end"] != NOT_SET
        bad += int(np.count_nonzero(snap["end"][both] != snap["start"][both] + 1))
        reads += 1
        seen_generations.add(t.stats().generation)
    result.put((reads, bad, sorted(seen_generations)))
    t.close()
