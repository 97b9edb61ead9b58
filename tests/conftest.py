"""Shared fixtures: every table of the run lives in one private directory under /dev/shm.

NPCALLS_DIR is set at import time, before any test runs, so that tables
given by bare name land in that directory and so that child processes
(forked, spawned, or started with ``python -c``) inherit it and find the
same tables by the same names.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import uuid

import pytest

import npcalls

SHM_ROOT = "/dev/shm" if os.path.isdir("/dev/shm") else None
TABLE_DIR = tempfile.mkdtemp(prefix="npcalls-tests-", dir=SHM_ROOT)
os.environ["NPCALLS_DIR"] = TABLE_DIR
_OWNER_PID = os.getpid()

_names = itertools.count()


def pytest_unconfigure(config):
    # A hook rather than a session fixture: it also runs after --collect-only or an
    # interrupted run.  The pid check keeps a forked child that exits normally from
    # removing the directory under the parent's feet.
    if os.getpid() == _OWNER_PID:
        shutil.rmtree(TABLE_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def table_dir() -> str:
    """The run's table directory (removed with everything in it when the run ends)."""
    return TABLE_DIR


@pytest.fixture
def tdir(monkeypatch) -> str:
    """A directory of this test's own as $NPCALLS_DIR, inherited by the processes it starts.

    For tests that start servers, simulators or kernels whose tables must not
    meet any other test's; removed afterwards.
    """
    d = tempfile.mkdtemp(prefix="npcalls-test-", dir=SHM_ROOT)
    monkeypatch.setenv("NPCALLS_DIR", d)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def cli_env(tdir) -> dict:
    """Environment for ``npcalls`` subprocesses: this test's own $NPCALLS_DIR (see ``tdir``).

    Tables are large (a default ``--create`` is 96 MB): they live under
    /dev/shm and are removed when the test ends, never left in pytest's
    temporary directory.
    """
    env = dict(os.environ, NPCALLS_DIR=tdir)
    env.pop("TERM", None)
    env.pop("NPCALLS_DEBUG", None)
    return env


@pytest.fixture
def name() -> str:
    """A table name no other test uses (a name, not a path: resolved via NPCALLS_DIR)."""
    return f"t{next(_names)}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def make_table(name):
    """Factory for tables that are closed and unlinked after the test, whatever happens."""
    made: list[npcalls.CallTable] = []
    paths: list[str] = []

    def make(capacity: int = 1024, key_width: int = 64, *, table_name: str | None = None,
             **kw) -> npcalls.CallTable:
        t = npcalls.CallTable.create(table_name or (name if not paths else f"{name}-{len(paths)}"),
                                     capacity, key_width, **kw)
        made.append(t)
        paths.append(t.path)
        return t

    yield make
    for t in made:
        t.close()
    for p in paths:
        npcalls.CallTable.unlink(p)


@pytest.fixture
def table(make_table) -> npcalls.CallTable:
    """A fresh writable table: 1024 slots, key_width 64."""
    return make_table()


@pytest.fixture
def tname(name):
    """A table name (see ``name``) whose table is unlinked after the test, for code that
    creates the table itself (the Kamailio helpers)."""
    yield name
    npcalls.CallTable.unlink(name)
