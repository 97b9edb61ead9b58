"""README.md's Python blocks run as written (issue 10).

Every ```python block of README.md is run as its own script, in a fresh
``python`` subprocess, in README order, with a private $NPCALLS_DIR and a
temporary working directory; it must exit 0.  Each block is run twice, since
a reader runs examples again: a block must clean up after itself or use
``open_or_create``.  Blocks are therefore self-contained (no variable
carries over from one block to the next).

A block may opt out only with the marker comment ``# readme-test: skip`` on
its first line (for code that needs a running Kamailio, say); use it
sparingly.  The Quick start may never opt out.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
SKIP_MARKER = "# readme-test: skip"


def python_blocks() -> list[tuple[str, int, str]]:
    """(section heading, line number, code) of every ```python block, in order."""
    out = []
    section = ""
    lines = open(README, encoding="utf-8").read().split("\n")
    i = 0
    while i < len(lines):
        ln = lines[i]
        if ln.startswith("#"):
            section = ln.lstrip("#").strip()
        if re.match(r"^```python\s*$", ln):
            start = i + 1
            j = start
            while not lines[j].startswith("```"):
                j += 1
            out.append((section, start + 1, "\n".join(lines[start:j]) + "\n"))
            i = j
        i += 1
    return out


BLOCKS = python_blocks()


def test_the_readme_has_a_quick_start_block_that_does_not_opt_out():
    qs = [b for b in BLOCKS if b[0] == "Quick start"]
    assert qs, "README.md has no ```python block under 'Quick start'"
    assert all(not code.startswith(SKIP_MARKER) for _, _, code in qs)


@pytest.mark.parametrize("section,line,code", BLOCKS,
                         ids=[f"{s or 'top'}:{n}" for s, n, _ in BLOCKS])
def test_readme_block_runs(section, line, code, tdir, tmp_path):
    if code.startswith(SKIP_MARKER):
        assert section != "Quick start"
        pytest.skip(f"README.md:{line} opts out ({SKIP_MARKER})")
    script = tmp_path / "block.py"
    script.write_text(code)
    env = dict(os.environ, NPCALLS_DIR=tdir, MPLBACKEND="Agg")
    for attempt in (1, 2):
        r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                           capture_output=True, timeout=300)
        assert r.returncode == 0, (f"README.md:{line} ({section}), run {attempt}:\n"
                                   + r.stderr.decode(errors="replace"))
