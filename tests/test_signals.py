"""npcalls.signals.stop_event: a signal never deadlocks the service it stops.

`npcalls export --every` once hung for good on SIGTERM: its handler called
Event.set() while the interrupted main thread held the Event's internal lock
(inside Event.wait(), before blocking).  The child below holds that lock
exactly when the signal arrives, so the old handler deadlocks it every time.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

CHILD = textwrap.dedent("""
    import os, signal, sys, time
    from npcalls.signals import stop_event

    ev, restore = stop_event()
    with ev._cond:          # where Event.wait() holds it, before it blocks
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)    # the handler has run by now
    ok = ev.wait(10)
    restore()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    sys.exit(0 if ok else 3)
""")


def test_a_signal_arriving_inside_event_wait_still_stops_the_service():
    r = subprocess.run([sys.executable, "-c", CHILD], timeout=30, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
