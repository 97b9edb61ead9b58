"""Subprocess worker for the hostile-file tests.

Reads one JSON request per line on stdin ({"path": ..., "ops": bool}), tries
to open the file (and, if that works, to use it), and answers one JSON line:
{"result": "opened" | "error", "error": class name, "message": ...}.  If npcalls
ever crashed the interpreter (SIGBUS, SIGSEGV), the parent sees the process
die instead of an answer.
"""

import json
import sys

import numpy as np

import npcalls
from npcalls import CallTable


def attempt(path: str, ops: bool) -> dict:
    try:
        t = CallTable.open(path, readonly=not ops)
    except npcalls.NpcallsError as e:
        return {"result": "error", "error": type(e).__name__, "message": str(e)}
    out = {"result": "opened"}
    try:
        t.get("x")
        t.get_many(["a", "b", "c"] * 5)
        t.snapshot()
        t.stats()
        if ops:
            t.start_many([f"k{i}" for i in range(50)], np.arange(50))
            t.start("single", 1)
            t.check(repair=True)
    except npcalls.NpcallsError as e:
        out = {"result": "error-after-open", "error": type(e).__name__, "message": str(e)}
    finally:
        t.close()
    return out


for line in sys.stdin:
    req = json.loads(line)
    print(json.dumps(attempt(req["path"], req.get("ops", False))), flush=True)
