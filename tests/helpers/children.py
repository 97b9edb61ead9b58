"""Starting the multi-process tests' children (fork, spawn, separate programs) and collecting results.

A child runs a function of :mod:`helpers.mp_workers` by name; it reports through
files in the sync directory (see that module), which works the same for all
three kinds of child.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
import time

import pytest

from helpers import TESTS_DIR
from helpers import mp_workers as H


class Children:
    """Starts child processes of any kind and collects what they report."""

    def __init__(self, sync_dir: str) -> None:
        self.sync_dir = sync_dir
        self.procs: list[tuple[str, str, object]] = []

    def start(self, kind: str, tag: str, fn: str, *args, **kw) -> None:
        if kind in ("fork", "spawn"):
            ctx = mp.get_context(kind)
            p = ctx.Process(target=H.run_to_file, args=(self.sync_dir, tag, fn) + args,
                            kwargs=kw, daemon=True)
            p.start()
        elif kind == "program":
            spec = json.dumps(dict(sync_dir=self.sync_dir, tag=tag, fn=fn, args=list(args), kw=kw))
            code = (f"import sys; sys.path.insert(0, {TESTS_DIR!r}); "
                    "from helpers import mp_workers; mp_workers.main_json()")
            err = open(os.path.join(self.sync_dir, f"stderr-{tag}"), "wb")
            p = subprocess.Popen([sys.executable, "-c", code, spec], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=err, env=dict(os.environ))
            err.close()
        else:
            raise ValueError(kind)
        self.procs.append((tag, kind, p))

    def wait_ready(self, n: int, timeout: float = 60) -> None:
        """Wait until ``n`` children are set up, then let them all go at once."""
        deadline = time.monotonic() + timeout
        while H.count_files(self.sync_dir, "ready-") < n:
            dead = [tag for tag, _, p in self.procs if not alive(p)]
            if dead or time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"children not ready (exited: {dead}): {self._errors()}")
            time.sleep(0.005)
        H.touch(os.path.join(self.sync_dir, "go"))

    def results(self, timeout: float) -> dict:
        """Every child's result by tag; fails the test if one failed or overran ``timeout``."""
        deadline = time.monotonic() + timeout
        for _, _, p in self.procs:
            _join(p, max(0.0, deadline - time.monotonic()))
        late = [tag for tag, _, p in self.procs if alive(p)]
        self.kill()
        out, errors = {}, {}
        for tag, _, _ in self.procs:
            path = os.path.join(self.sync_dir, f"result-{tag}.json")
            if not os.path.exists(path):
                errors[tag] = "no result" + self._stderr(tag)
                continue
            with open(path) as f:
                r = json.load(f)
            if r["ok"]:
                out[tag] = r["value"]
            else:
                errors[tag] = r["error"]
        assert not late, f"children still running after {timeout}s: {late}"
        assert not errors, "children failed:\n" + "\n".join(f"[{k}] {v}" for k, v in errors.items())
        return out

    def kill(self) -> None:
        for _, _, p in self.procs:
            if alive(p):
                p.kill()
                _join(p, 5)

    def _stderr(self, tag: str) -> str:
        path = os.path.join(self.sync_dir, f"stderr-{tag}")
        if os.path.exists(path):
            with open(path, "rb") as f:
                return ": " + f.read().decode(errors="replace")[-2000:]
        return ""

    def _errors(self) -> str:
        return "; ".join(f"{tag}{self._stderr(tag)}" for tag, _, _ in self.procs)


def alive(p) -> bool:
    return p.is_alive() if hasattr(p, "is_alive") else p.poll() is None


def _join(p, timeout: float) -> None:
    if hasattr(p, "join"):
        p.join(timeout)
    else:
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
