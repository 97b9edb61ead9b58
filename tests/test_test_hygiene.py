"""The test suite itself: what ``make test`` leaves behind (issue 10)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_passing_tests_leave_no_files_in_pytest_tmp(tmp_path):
    """With the project's pytest settings, only a failing test's tmp_path survives the run."""
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "test_sample.py").write_text(textwrap.dedent("""\
        import npcalls

        def test_pass(tmp_path):
            t = npcalls.CallTable.create(str(tmp_path / "big"), capacity=1 << 16)
            t.close()

        def test_fail(tmp_path):
            (tmp_path / "evidence").write_text("look at me")
            assert False
        """))
    base = tmp_path / "base"
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "-c", os.path.join(ROOT, "pyproject.toml"), "--rootdir", str(tmp_path),
                        f"--basetemp={base}", str(tmp_path / "t")],
                       capture_output=True, timeout=300, cwd=tmp_path)
    assert b"1 failed, 1 passed" in r.stdout, r.stdout + r.stderr
    left = sorted(p.name for p in base.rglob("*") if p.is_file())
    assert left == ["evidence"]
