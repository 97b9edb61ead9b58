"""A new table's file is mapped in whole at creation (one madvise), not page by page."""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import textwrap


def _kernel_populates() -> bool:
    """Whether this kernel takes MADV_POPULATE_WRITE on a shared file mapping."""
    with open(os.path.join("/dev/shm", f"npcalls-probe-{os.getpid()}"), "w+b") as f:
        try:
            f.truncate(1 << 16)
            mm = mmap.mmap(f.fileno(), 1 << 16)
            try:
                mm.madvise(getattr(mmap, "MADV_POPULATE_WRITE", 23))
                return True
            except OSError:
                return False
            finally:
                mm.close()
        finally:
            os.unlink(f.name)


_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import npcalls
    def rss_of(path):
        # the resident size of this process's mapping of the table file (smaps)
        ino = os.stat(path).st_ino
        rss, inside = 0, False
        with open("/proc/self/smaps") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and "-" in parts[0] and parts[4].isdigit():
                    inside = int(parts[4]) == ino and parts[5] == path
                elif inside and parts[0] == "Rss:":
                    rss += int(parts[1]) * 1024
        return rss
    name, mode = sys.argv[1], sys.argv[2]
    if mode == "create":
        t = npcalls.CallTable.create(name, capacity=1_000_000, key_width=32)
    else:
        t = npcalls.CallTable.open(name)
    path = t.path
    print(json.dumps({"rss": rss_of(path), "size": os.path.getsize(path)}))
    t.close()
""")


def _run(name: str, mode: str, env: dict) -> dict:
    import json
    out = subprocess.run([sys.executable, "-c", _SCRIPT, name, mode], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_a_created_table_is_resident_and_an_opened_one_is_not(tmp_path):
    env = dict(os.environ, NPCALLS_DIR=str(tmp_path))
    made = _run("fresh", "create", env)
    opened = _run("fresh", "open", env)
    if _kernel_populates():
        # the creating process holds the whole file mapped before its first write
        assert made["rss"] >= 0.95 * made["size"], made
    else:
        assert made["rss"] < made["size"], made      # the kernel refused: fault on touch
    # a process that only opens the table pays for the pages it touches, not the file
    assert opened["rss"] < 0.5 * opened["size"], opened
