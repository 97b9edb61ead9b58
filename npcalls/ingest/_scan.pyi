# Types of the compiled scanner (npcalls/ingest/_scan.c).
SIMPLE: int
INVITE: int
BYE: int
TWO: int
MISSED: int
ENDED: int
ANSWERED: int

def rows(chunk: bytes | bytearray | memoryview, cdr: bool, /
         ) -> tuple[int, bytes, bytes, bytes, bytes, bytes, bytes, bytes, bytes, bytes, bool]: ...
def take(chunk: bytes | bytearray | memoryview, start: object, length: object, k: int, /
         ) -> bytes: ...
