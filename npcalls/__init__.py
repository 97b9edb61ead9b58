"""npcalls: a live table of SIP calls in shared memory, for every process on a host.

>>> import npcalls
>>> t = npcalls.CallTable.create("calls", capacity=1_000_000)   # /dev/shm/npcalls.calls
>>> t.start("a84b4c76e66710@pc33.atlanta.com")                  # doctest: +SKIP

See README.md for the tour and docs/format.md for the on-memory format.
"""

from .errors import (
                     BatchKeyError,
                     FormatError,
                     InvalidKeyError,
                     InvalidTimestampError,
                     NpcallsError,
                     ReadOnlyError,
                     TableClosedError,
                     TableExistsError,
                     TableFullError,
                     TableNotFoundError,
                     TableRemovedError,
)
from .layout import FORMAT_VERSION, NOT_SET
from .table import CallTable, GetManyResult, Stats
from .timestamps import from_seconds

__version__ = "0.1.0"

__all__ = [
    "CallTable", "GetManyResult", "Stats", "NOT_SET", "FORMAT_VERSION", "from_seconds",
    "NpcallsError", "InvalidKeyError", "BatchKeyError", "InvalidTimestampError",
    "TableFullError", "FormatError", "TableNotFoundError", "TableExistsError",
    "ReadOnlyError", "TableClosedError", "TableRemovedError",
]
