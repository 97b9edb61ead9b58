"""Code the tests share that is not itself a test: worker bodies, harnesses, fixtures' machinery.

The package is imported as ``helpers`` (pytest puts ``tests/`` on ``sys.path``,
since ``tests/`` itself is not a package).  Children inherit that: spawned and
forkserver children receive the parent's ``sys.path``, so they can unpickle
``helpers.<module>.<function>`` targets; a ``python -c`` child inserts
:data:`TESTS_DIR` itself.  Modules run as scripts (``python
tests/helpers/attack_workers.py ...``) import only npcalls.

* :mod:`helpers.crashlib`: the crash harness (writers SIGKILLed, checked against a model).
* :mod:`helpers.mp_workers`: bodies of the multi-process tests' children (fork, spawn, programs).
* :mod:`helpers.children`: starting those children and collecting their results.
* :mod:`helpers.lifecycle_workers`: bodies of the lifecycle tests' children.
* :mod:`helpers.attack_workers`, :mod:`helpers.hostile_worker`: scripts for the attack tests.
"""

from __future__ import annotations

import os

HELPERS_DIR = os.path.dirname(os.path.abspath(__file__))
TESTS_DIR = os.path.dirname(HELPERS_DIR)
REPO_DIR = os.path.dirname(TESTS_DIR)
