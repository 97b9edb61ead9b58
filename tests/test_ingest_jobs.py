"""``--jobs`` defaults to the CPUs the process may use (its affinity), whatever the load."""

from __future__ import annotations

import os
import subprocess
import sys

_SCRIPT = ("import os, sys\n"
           "os.sched_setaffinity(0, {int(c) for c in sys.argv[1].split(',')})\n"
           "from npcalls.ingest.parallel import default_jobs\n"
           "print(default_jobs())\n")


def _jobs_with(cpus: set[int]) -> int:
    out = subprocess.run([sys.executable, "-c", _SCRIPT, ",".join(map(str, sorted(cpus)))],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return int(out.stdout)


def test_default_jobs_follow_the_affinity_mask():
    mine = os.sched_getaffinity(0)
    assert _jobs_with({min(mine)}) == 1
    # every allowed CPU counts, even on a machine busy with other work
    assert _jobs_with(mine) == len(mine)
