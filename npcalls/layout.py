"""The on-memory format of an npcalls table, as code.

docs/format.md explains the format in prose; this module is its executable
definition (offsets, dtypes, validation).  Change either only together, and
bump :data:`FORMAT_VERSION` when a change makes old readers misread new files.

A table file is one mapping::

    [ header: 4096 bytes ][ tags: capacity x uint64 ][ rows: capacity x row ]

* ``tags[i]`` is 0 for an empty slot, 1 for a tombstone, otherwise the
  XXH64 hash of the key in ``rows[i]`` (raised to 2 if it was 0 or 1).
* slots are grouped in buckets of :data:`BUCKET` consecutive slots; the tags
  of one bucket fill exactly one 64-byte cache line.
* ``rows`` is a numpy structured array ``(seq, start, end, key)``; ``seq`` is
  the row's seqlock word (odd while a writer is changing the row).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from .errors import FormatError

MAGIC = b"NPCALLS\x00"
FORMAT_VERSION = 1
HEADER_SIZE = 4096
BUCKET = 8                      # slots per bucket: 8 x 8-byte tags = one cache line
EMPTY = 0                       # tag of a never-used (or reclaimed) slot
TOMBSTONE = 1                   # tag of a deleted slot a probe must walk past
NOT_SET = np.iinfo(np.int64).min  # start/end not recorded; NaT as datetime64[ns]
MAX_KEY_WIDTH = 4096
MAX_CAPACITY = 1 << 34          # bucket index = (tag >> 32) * nbuckets >> 32 needs nbuckets < 2**32
DEFAULT_MAX_LOAD = 0.75

# Table states (header field ``state``).
STATE_LIVE = 0
STATE_RETIRED = 1   # superseded by a rebuilt file at the same path: re-open the path
STATE_REMOVED = 2   # unlinked: the table is gone

FLAG_AUTO_GROW = 1

# Static part of the header: written once at creation, covered by a checksum.
_STATIC = struct.Struct("<8sIIIIIIQQQQQQQqQQ")
_STATIC_FIELDS = (
    "magic", "version", "header_size", "key_width", "key_field", "bucket", "row_size",
    "capacity", "nbuckets", "tags_offset", "rows_offset", "file_size", "seed",
    "max_load_ppm", "created_ns", "flags", "generation",
)
STATIC_CHECKSUM_OFFSET = _STATIC.size            # uint64 XXH64 of the static bytes
DYNAMIC_OFFSET = 192                              # dynamic words start on their own cache lines

# Dynamic header words, each a little-endian uint64 at DYNAMIC_OFFSET + 8 * index.
DYNAMIC_FIELDS = (
    "state",        # STATE_LIVE / STATE_RETIRED / STATE_REMOVED
    "wseq",         # writer sequence: odd while a write operation is in progress
    "count",        # live rows
    "tombstones",   # slots holding TOMBSTONE
    "n_started",    # start times ever recorded (monotonic; for calls/s)
    "n_stopped",    # end times ever recorded (monotonic)
    "n_removed",    # rows ever removed by remove() or expire() (monotonic)
    "n_rebuilds",   # grow/compact rebuilds in this table's lineage
    "n_recoveries",  # crashed writers recovered from
    "dur_sum_us",   # sum of the durations counted below, in microseconds (wraps at 2**64)
) + tuple(f"dur_bucket_{i}" for i in range(16))
"""The duration histogram words (``dur_sum_us`` and 16 ``dur_bucket_*``) were
added in npcalls 0.2 in space that version 1 files always held as zeros, so the
format version stays 1: older readers ignore them, and a file written by an
older npcalls simply has a histogram that starts counting later."""

DURATION_BOUNDS_S = (1, 5, 10, 15, 30, 60, 90, 120, 180, 300, 600, 900, 1800, 3600, 7200)
"""Upper bounds (seconds, inclusive) of the duration histogram's buckets; the
16th bucket holds everything longer.  Fixed by the format: writers count each
call once, in the bucket of ``end - start``, when it first has both times."""

DURATION_BOUNDS_NS = tuple(b * 1_000_000_000 for b in DURATION_BOUNDS_S)
DURATION_WORDS = ("dur_sum_us",) + tuple(f"dur_bucket_{i}" for i in range(16))
W = {name: (DYNAMIC_OFFSET + 8 * i) // 8 for i, name in enumerate(DYNAMIC_FIELDS)}
"""Index of each dynamic header word in a uint64 view of the mapping."""

LOCK_INO_OFFSET = 512
"""u64: inode number of the lock file the table's writers lock (0: not yet recorded).

On a cache line of its own, apart from the words above: writers read it on
every operation, it changes only when the lock file was removed or replaced.
"""
W["lock_ino"] = LOCK_INO_OFFSET // 8


def key_field_width(key_width: int) -> int:
    """Bytes a key occupies in a row: ``key_width`` rounded up to a multiple of 8."""
    return (key_width + 7) // 8 * 8


def row_dtype(key_field: int) -> np.dtype:
    """The structured dtype of one row for a given key field width."""
    return np.dtype([("seq", "<u8"), ("start", "<i8"), ("end", "<i8"), ("key", f"S{key_field}")])


def snapshot_dtype(key_width: int) -> np.dtype:
    """The dtype of rows returned by :meth:`CallTable.snapshot`."""
    return np.dtype([("key", f"S{key_width}"), ("start", "<i8"), ("end", "<i8")])


@dataclass(frozen=True)
class Geometry:
    """The static, validated description of a table file."""

    key_width: int
    key_field: int
    capacity: int
    nbuckets: int
    row_size: int
    tags_offset: int
    rows_offset: int
    file_size: int
    seed: int
    max_load_ppm: int
    created_ns: int
    flags: int
    generation: int

    @property
    def max_load(self) -> float:
        return self.max_load_ppm / 1e6

    @property
    def limit(self) -> int:
        """The most live rows the table accepts."""
        return self.capacity * self.max_load_ppm // 1_000_000

    @property
    def tomb_limit(self) -> int:
        """Tombstones the table tolerates before a writer rebuilds it (docs/format.md,
        "Hashing and probing": 1/16 of the slots, or half the headroom above the
        load limit if that is less, so that EMPTY slots remain for lookups to stop at)."""
        return min(self.capacity >> 4, (self.capacity - self.limit) // 2)

    @property
    def auto_grow(self) -> bool:
        return bool(self.flags & FLAG_AUTO_GROW)


def make_geometry(capacity: int, key_width: int, seed: int, max_load: float,
                  created_ns: int, flags: int = 0, generation: int = 0) -> Geometry:
    """Validate creation parameters and compute the layout they imply."""
    if isinstance(key_width, bool) or not isinstance(key_width, (int, np.integer)):
        raise TypeError(f"key_width must be an int, not {type(key_width).__name__}")
    if not 1 <= key_width <= MAX_KEY_WIDTH:
        raise ValueError(f"key_width must be in 1..{MAX_KEY_WIDTH}, got {key_width}")
    if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)):
        raise TypeError(f"capacity must be an int, not {type(capacity).__name__}")
    if not 1 <= capacity <= MAX_CAPACITY:
        raise ValueError(f"capacity must be in 1..{MAX_CAPACITY}, got {capacity}")
    if not 0.05 <= max_load <= 0.95:
        raise ValueError(f"max_load must be in 0.05..0.95, got {max_load}")
    capacity = int(capacity)
    key_width = int(key_width)
    nbuckets = (capacity + BUCKET - 1) // BUCKET
    capacity = nbuckets * BUCKET
    kf = key_field_width(key_width)
    row_size = row_dtype(kf).itemsize
    tags_offset = HEADER_SIZE
    rows_offset = tags_offset + 8 * capacity
    file_size = rows_offset + row_size * capacity
    return Geometry(key_width, kf, capacity, nbuckets, row_size, tags_offset, rows_offset,
                    file_size, seed & 0xFFFFFFFFFFFFFFFF, int(round(max_load * 1e6)),
                    created_ns, flags, generation)


def _checksum(static: bytes) -> int:
    import xxhash  # imported here so that layout has no import-time cost beyond numpy
    return xxhash.xxh64_intdigest(static, 0x6E7063616C6C73)  # "npcalls"


def pack_header(g: Geometry) -> bytes:
    """The first bytes of a new table file (static part, its checksum, zeroed dynamic words)."""
    static = _STATIC.pack(MAGIC, FORMAT_VERSION, HEADER_SIZE, g.key_width, g.key_field, BUCKET,
                          g.row_size, g.capacity, g.nbuckets, g.tags_offset, g.rows_offset,
                          g.file_size, g.seed, g.max_load_ppm, g.created_ns, g.flags, g.generation)
    return static + struct.pack("<Q", _checksum(static))


def parse_header(buf: bytes, file_size: int, where: str) -> Geometry:
    """Validate the static header of a table file and return its geometry.

    Every field is checked against the others and against the real file size,
    so that no later access can fall outside the mapping.

    Raises
    ------
    FormatError
        Naming the file and the first field that is wrong.
    """
    def bad(msg: str) -> FormatError:
        return FormatError(f"{where}: {msg}")

    if file_size < HEADER_SIZE:
        if file_size >= len(MAGIC) and buf[: len(MAGIC)] != MAGIC:
            raise bad(f"not an npcalls table (no magic number; {file_size} bytes)")
        raise bad(f"truncated: {file_size} bytes, an npcalls header alone is {HEADER_SIZE}")
    if buf[: len(MAGIC)] != MAGIC:
        raise bad(f"not an npcalls table (magic number is {buf[:8]!r}, expected {MAGIC!r})")
    f = dict(zip(_STATIC_FIELDS, _STATIC.unpack_from(buf, 0)))
    if f["version"] != FORMAT_VERSION:
        newer = "a newer" if f["version"] > FORMAT_VERSION else "an older"
        raise bad(f"written in {newer} format version {f['version']}; this npcalls reads "
                  f"version {FORMAT_VERSION} (upgrade npcalls, or reload the calls)")
    (stored,) = struct.unpack_from("<Q", buf, STATIC_CHECKSUM_OFFSET)
    if stored != _checksum(bytes(buf[: _STATIC.size])):
        raise bad("header checksum mismatch: the header is corrupt")
    if f["header_size"] != HEADER_SIZE or f["bucket"] != BUCKET:
        raise bad(f"unsupported header size {f['header_size']} / bucket size {f['bucket']}")
    try:
        g = make_geometry(f["capacity"], f["key_width"], f["seed"],
                          f["max_load_ppm"] / 1e6, f["created_ns"], f["flags"], f["generation"])
    except (ValueError, TypeError) as e:
        raise bad(f"header holds impossible values: {e}") from None
    for name in ("capacity", "nbuckets", "key_field", "row_size", "tags_offset", "rows_offset",
                 "file_size"):
        if getattr(g, name) != f[name]:
            raise bad(f"header field {name} is {f[name]}, inconsistent with the other fields "
                      f"(expected {getattr(g, name)})")
    if file_size != g.file_size:
        what = "truncated" if file_size < g.file_size else "has trailing bytes"
        raise bad(f"{what}: file is {file_size} bytes, its header says {g.file_size}")
    return g
