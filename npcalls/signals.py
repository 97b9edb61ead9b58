"""Stop a long-running service (exporter, periodic export) on SIGTERM or Ctrl-C."""

from __future__ import annotations

import signal
import threading
from typing import Any, Callable, Iterable

__all__ = ["stop_event"]


def stop_event(signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT)
               ) -> tuple[threading.Event, Callable[[], None]]:
    """An Event set when one of ``signals`` arrives, and a function restoring the old handlers.

    Call from the main thread (Python runs signal handlers there only).
    """
    ev = threading.Event()

    def handler(*_: Any) -> None:
        # Not ev.set() here: the handler runs in the main thread between two
        # bytecodes, possibly while that thread holds the Event's internal lock
        # (inside ev.wait(), before it blocks), and set() would then wait on that
        # lock forever (seen: `npcalls export --every 1s` hung on SIGTERM).  A
        # thread sets it as soon as the main thread lets go of the lock.
        threading.Thread(target=ev.set, daemon=True).start()

    old = {s: signal.signal(s, handler) for s in signals}

    def restore() -> None:
        for s, h in old.items():
            signal.signal(s, h)

    return ev, restore
