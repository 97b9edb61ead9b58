# Types of the compiled scanner (npcalls/ingest/_scan.c).
SIMPLE: int
INVITE: int
BYE: int
TWO: int
MISSED: int
ENDED: int

def acc_rows(chunk: bytes, /) -> tuple[int, bytes, bytes, bytes, bytes, bytes, bytes, bytes]: ...
