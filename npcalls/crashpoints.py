"""Test hooks for the crash-safety tests: named points where a writer can be made to die.

``$NPCALLS_CRASH_AT`` (or the module attribute :data:`CRASH_AT`, which the
tests set in their writer processes) names the points; at one of them the
process SIGKILLs itself.  They sit only on paths that are not per-call hot
(batches, rebuilds, expiry); the tests kill single operations at random
lines with a trace function instead.  Empty in production: a set lookup.
"""

from __future__ import annotations

import os

__all__ = ["crashpoint", "CRASH_AT"]


def crashpoint(name: str) -> None:
    """Test hook: die here if $NPCALLS_CRASH_AT names this point (crash-safety tests).

    Only on paths that are not per-call hot (batches, rebuilds, expiry); the
    tests kill single operations at random lines with a trace function instead.
    """
    if CRASH_AT and name in CRASH_AT:
        import signal
        os.kill(os.getpid(), signal.SIGKILL)


CRASH_AT = frozenset(filter(None, os.environ.get("NPCALLS_CRASH_AT", "").split(",")))
