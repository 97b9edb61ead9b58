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


# ---------------------------------------------------------------------- the notebook

def _extra_requirements(extra: str) -> set[str]:
    """Distribution names an extra of the installed npcalls brings, its own extras expanded."""
    import importlib.metadata as md
    reqs = md.requires("npcalls") or []
    out: set[str] = set()
    todo = [extra]
    seen = set()
    while todo:
        e = todo.pop()
        if e in seen:
            continue
        seen.add(e)
        for r in reqs:
            name, _, marker = r.partition(";")
            if f'extra == "{e}"' not in marker:
                continue
            m = re.match(r"\s*([A-Za-z0-9_.-]+)(\[([^\]]+)\])?", name)
            if m.group(1) == "npcalls":
                todo += [x.strip() for x in m.group(3).split(",")]
            else:
                out.add(re.sub(r"[-_.]+", "-", m.group(1)).lower())
    return out


def test_the_notebook_extra_provides_every_import_of_the_notebook():
    import ast
    import importlib.metadata as md
    import json
    nb = json.load(open(os.path.join(ROOT, "notebooks", "live_calls.ipynb"), encoding="utf-8"))
    mods: set[str] = set()
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        src = "".join(cell["source"])
        src = "\n".join(ln for ln in src.splitlines() if not ln.lstrip().startswith(("%", "!")))
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.Import):
                mods |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                mods.add(node.module.split(".")[0])
    extra = _extra_requirements("notebook")
    dists = md.packages_distributions()
    third_party = sorted(m for m in mods if m not in sys.stdlib_module_names and m != "npcalls")
    assert "duckdb" in third_party
    for m in third_party:
        names = {re.sub(r"[-_.]+", "-", d).lower() for d in dists.get(m, [])}
        assert names & extra, f"the notebook imports {m}, which npcalls[notebook] does not install"
    assert "notebook" in extra and "ipykernel" in extra


def test_the_readme_command_that_opens_the_notebook_exists():
    text = open(README, encoding="utf-8").read()
    assert "pip install -e '.[notebook]'" in text
    assert "jupyter notebook notebooks/live_calls.ipynb" in text
    jupyter = os.path.join(os.path.dirname(sys.executable), "jupyter")
    r = subprocess.run([jupyter, "notebook", "--version"], capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
