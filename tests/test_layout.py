"""npcalls.layout on its own, against docs/format.md.

docs/format.md is the one description of the file; layout.py its executable
counterpart.  The tables of the document (static header, dynamic words, rows)
are parsed here and compared with layout's structs, word indices and dtypes,
so that neither can change without the other.  Then the geometry a creation
implies, and the refusals of ``parse_header``: truncated, foreign, other
version, big-endian, corrupt, inconsistent or mis-sized files.
"""

from __future__ import annotations

import os
import re
import struct

import numpy as np
import pytest

from npcalls import FormatError, layout
from npcalls.layout import (
    BUCKET,
    DURATION_BOUNDS_S,
    DYNAMIC_OFFSET,
    FORMAT_VERSION,
    HEADER_SIZE,
    MAGIC,
    STATIC_CHECKSUM_OFFSET,
    W,
    make_geometry,
    pack_header,
    parse_header,
    row_dtype,
)

from helpers import REPO_DIR

FORMAT_MD = os.path.join(REPO_DIR, "docs", "format.md")


def _doc() -> str:
    with open(FORMAT_MD, encoding="utf-8") as f:
        return f.read()


def _section(title: str) -> str:
    """The text of one ``###``/``##`` section of docs/format.md."""
    doc = _doc()
    m = re.search(rf"^#+ {re.escape(title)}\s*$", doc, re.M)
    assert m, f"docs/format.md has no section {title!r}"
    nxt = re.search(r"^#+ ", doc[m.end():], re.M)
    return doc[m.end(): m.end() + nxt.start() if nxt else len(doc)]


def _table(title: str) -> list[list[str]]:
    """The rows of the first markdown table of a section, cells stripped, header row dropped."""
    rows = [ln for ln in _section(title).splitlines() if ln.startswith("|")]
    cells = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in rows]
    return [c for c in cells[2:]]                  # drop the header and the |---| line


def _static_fields() -> list[tuple[int, str, str]]:
    """(offset, struct code, name) of every field of layout's static header struct."""
    fmt = layout._STATIC.format
    assert fmt.startswith("<")
    out, off = [], 0
    for (count, code), name in zip(re.findall(r"(\d*)([a-zA-Z])", fmt[1:]), layout._STATIC_FIELDS):
        code = (count or "") + code
        out.append((off, code, name))
        off += struct.calcsize("<" + code)
    assert off == layout._STATIC.size
    return out


_DOC_TYPES = {"8 bytes": "8s", "u32": "I", "u64": "Q", "i64": "q"}


# ---------------------------------------------------------------- the document's tables

def test_static_header_table_matches_the_struct():
    doc = [(int(o), t, f) for o, t, f, _ in _table("Header, static part (written once, covered by a checksum)")]
    code = [(o, c, n) for o, c, n in _static_fields()]
    assert [(o, _DOC_TYPES[t], f) for o, t, f in doc[:-1]] == code
    # the last row is the checksum, right after the static fields
    off, typ, name = doc[-1]
    assert (off, typ, name) == (STATIC_CHECKSUM_OFFSET, "u64", "checksum")
    assert STATIC_CHECKSUM_OFFSET == layout._STATIC.size
    meaning = dict((f, m) for _, _, f, m in _table("Header, static part (written once, covered by a checksum)"))
    assert f"bytes 0..{STATIC_CHECKSUM_OFFSET - 1}" in meaning["checksum"]
    seed = int(re.search(r"seed `(0x[0-9A-Fa-f]+)`", meaning["checksum"]).group(1), 16)
    buf = pack_header(make_geometry(64, 16, 1, 0.75, 0))
    import xxhash
    assert struct.unpack_from("<Q", buf, STATIC_CHECKSUM_OFFSET)[0] == xxhash.xxh64_intdigest(
        buf[:STATIC_CHECKSUM_OFFSET], seed)
    assert meaning["magic"] == "`NPCALLS\\0`" and MAGIC == b"NPCALLS\0"
    assert meaning["version"] == f"format version, {FORMAT_VERSION}"
    assert meaning["header_size"] == str(HEADER_SIZE) and meaning["bucket"] == f"slots per bucket: {BUCKET}"
    assert _doc().startswith(f"# The npcalls table format (version {FORMAT_VERSION})")


def test_dynamic_words_table_matches_the_word_indices():
    doc: dict[str, int] = {}
    for off, word, _ in _table("Header, dynamic words (u64 each, from offset 192)"):
        m = re.fullmatch(r"(\d+) \+ 8·i", off)
        if m:
            base = int(m.group(1))
            name, lo, hi = re.fullmatch(r"(\w+)_i \(i = (\d+)\.\.(\d+)\)", word).groups()
            for i in range(int(lo), int(hi) + 1):
                doc[f"{name}_{i}"] = base + 8 * i
        else:
            doc[word] = int(off)
    assert doc == {name: 8 * i for name, i in W.items()}
    assert min(doc.values()) == DYNAMIC_OFFSET == 192
    assert DYNAMIC_OFFSET >= STATIC_CHECKSUM_OFFSET + 8
    assert max(doc.values()) + 8 <= HEADER_SIZE
    # lock_ino alone on its cache line
    line = W["lock_ino"] * 8 // 64
    assert [n for n, i in W.items() if i * 8 // 64 == line] == ["lock_ino"]


def test_rows_table_matches_the_row_dtype():
    for kf in (8, 16, 64, 4096):
        dt = row_dtype(kf)
        doc = [(int(o), d.strip("`"), f) for o, d, f, _ in _table("Rows")]
        got = [(dt.fields[f][1], dt.fields[f][0].str, f) for f in dt.names]
        assert [(o, d.replace("{key_field}", str(kf)).replace("S", "|S"), f) for o, d, f in doc] == got
        assert dt.itemsize == 24 + kf


def test_duration_bounds_match_the_document():
    m = re.search(r"bounds are fixed by the format, in\s+seconds: ([\d,\s]+?),\s+and a 16th", _doc())
    assert m, "docs/format.md no longer states the histogram bounds"
    assert tuple(int(x) for x in m.group(1).replace("\n", " ").split(",")) == DURATION_BOUNDS_S
    assert len(DURATION_BOUNDS_S) == 15 and list(DURATION_BOUNDS_S) == sorted(DURATION_BOUNDS_S)
    assert [f"dur_bucket_{i}" for i in range(16)] == [n for n in W if n.startswith("dur_bucket_")]


# ---------------------------------------------------------------- geometry

@pytest.mark.parametrize("capacity,key_width", [(1, 1), (8, 8), (9, 7), (1000, 64), (1 << 20, 4096)])
def test_geometry_follows_the_documented_formulas(capacity, key_width):
    g = make_geometry(capacity, key_width, seed=-1, max_load=0.75, created_ns=5)
    assert g.capacity % BUCKET == 0 and capacity <= g.capacity < capacity + BUCKET
    assert g.nbuckets == g.capacity // BUCKET
    assert g.key_field == (key_width + 7) // 8 * 8 and g.key_field % 8 == 0
    assert g.row_size == 24 + g.key_field == row_dtype(g.key_field).itemsize
    assert g.tags_offset == HEADER_SIZE
    assert g.rows_offset == HEADER_SIZE + 8 * g.capacity
    assert g.file_size == g.rows_offset + g.capacity * g.row_size
    assert g.seed == (1 << 64) - 1                       # stored as u64
    assert g.max_load_ppm == 750_000 and g.limit == g.capacity * 3 // 4
    # "a writer rebuilds the table when tombstones pass 1/16 of the slots (or
    # half the headroom between the load limit and the capacity, if less)"
    assert g.tomb_limit == min(g.capacity // 16, (g.capacity - g.limit) // 2)
    tight = make_geometry(capacity, key_width, seed=1, max_load=0.95, created_ns=5)
    assert tight.tomb_limit == min(tight.capacity // 16, (tight.capacity - tight.limit) // 2)
    assert tight.limit + 2 * tight.tomb_limit <= tight.capacity


@pytest.mark.parametrize("kw", [
    dict(capacity=0), dict(capacity=layout.MAX_CAPACITY + 1), dict(capacity=True),
    dict(capacity=8.0), dict(key_width=0), dict(key_width=layout.MAX_KEY_WIDTH + 1),
    dict(key_width=True), dict(max_load=0.04), dict(max_load=0.96),
])
def test_impossible_geometries_are_refused_by_name(kw):
    args = dict(capacity=64, key_width=16, seed=0, max_load=0.75, created_ns=0) | kw
    with pytest.raises((ValueError, TypeError), match=next(iter(kw))):
        make_geometry(**args)


# ---------------------------------------------------------------- headers

def _header(g=None) -> bytearray:
    g = g or make_geometry(64, 16, 7, 0.75, 123, flags=1, generation=4)
    return bytearray(pack_header(g).ljust(HEADER_SIZE, b"\0"))


def _reseal(buf: bytearray) -> bytearray:
    """Recompute the checksum after editing a static field (a consistent forgery)."""
    struct.pack_into("<Q", buf, STATIC_CHECKSUM_OFFSET, layout._checksum(bytes(buf[:STATIC_CHECKSUM_OFFSET])))
    return buf


def test_a_packed_header_parses_back_to_the_same_geometry():
    g = make_geometry(1000, 33, 0xDEADBEEF, 0.5, 1_700_000_000_000_000_000, flags=1, generation=9)
    assert parse_header(_header(g), g.file_size, "t") == g
    assert len(pack_header(g)) == STATIC_CHECKSUM_OFFSET + 8 <= DYNAMIC_OFFSET


def test_truncated_and_foreign_files_are_refused():
    g = make_geometry(64, 16, 7, 0.75, 0)
    buf = _header(g)
    with pytest.raises(FormatError, match=r"where: truncated: 100 bytes"):
        parse_header(buf[:100], 100, "where")
    with pytest.raises(FormatError, match="not an npcalls table"):
        parse_header(b"GIF89a" + bytes(100), 106, "where")
    other = bytearray(buf)
    other[:8] = b"SQLite f"
    with pytest.raises(FormatError, match="not an npcalls table .magic number"):
        parse_header(other, g.file_size, "where")
    with pytest.raises(FormatError, match=rf"truncated: file is {g.file_size - 1} bytes"):
        parse_header(buf, g.file_size - 1, "where")
    with pytest.raises(FormatError, match="has trailing bytes"):
        parse_header(buf, g.file_size + 8, "where")


@pytest.mark.parametrize("version,word", [(FORMAT_VERSION + 1, "newer"), (0, "older")])
def test_other_format_versions_are_refused_naming_both(version, word):
    g = make_geometry(64, 16, 7, 0.75, 0)
    buf = _reseal(bytearray(_header(g)))
    struct.pack_into("<I", buf, 8, version)
    _reseal(buf)
    with pytest.raises(FormatError, match=rf"{word} format version {version}; this npcalls reads version "
                                          rf"{FORMAT_VERSION}"):
        parse_header(buf, g.file_size, "where")


def test_a_big_endian_header_is_refused():
    """A header written big-endian (by a port of the format that got it wrong) never parses."""
    g = make_geometry(64, 16, 7, 0.75, 0)
    vals = struct.unpack_from(layout._STATIC.format, _header(g))
    big = bytearray(struct.pack(">" + layout._STATIC.format[1:], *vals))
    big += struct.pack(">Q", layout._checksum(bytes(big)))
    big = big.ljust(HEADER_SIZE, b"\0")
    with pytest.raises(FormatError, match="format version 16777216"):
        parse_header(big, g.file_size, "where")


def test_every_static_byte_is_covered_by_the_checksum():
    g = make_geometry(64, 16, 7, 0.75, 0)
    good = _header(g)
    for i in range(len(MAGIC) + 4, STATIC_CHECKSUM_OFFSET + 8):   # past magic and version
        bad = bytearray(good)
        bad[i] ^= 0x10
        with pytest.raises(FormatError):
            parse_header(bad, g.file_size, "where")
    # the dynamic words are not: a writer changes them all the time
    dyn = bytearray(good)
    dyn[DYNAMIC_OFFSET:DYNAMIC_OFFSET + 8] = b"\xff" * 8
    assert parse_header(dyn, g.file_size, "where") == g


@pytest.mark.parametrize("field,value,named", [
    ("capacity", 72, "nbuckets is 8"),         # the geometry follows capacity: the others disagree
    ("nbuckets", 9, None), ("key_field", 24, None), ("row_size", 48, None),
    ("tags_offset", 8192, None), ("rows_offset", 4096, None), ("file_size", 1 << 40, None),
])
def test_a_resealed_header_with_an_inconsistent_field_is_refused_naming_it(field, value, named):
    g = make_geometry(64, 16, 7, 0.75, 0)
    buf = _header(g)
    off, code, _ = next(f for f in _static_fields() if f[2] == field)
    struct.pack_into("<" + code, buf, off, value)
    _reseal(buf)
    with pytest.raises(FormatError, match=rf"header field {named or f'{field} is {value}'}, inconsistent"):
        parse_header(buf, g.file_size, "where")


def test_absurd_sizes_are_refused_before_anything_is_mapped():
    g = make_geometry(64, 16, 7, 0.75, 0)
    for field, value in (("key_width", 0), ("capacity", 1 << 40), ("max_load_ppm", 990_000)):
        buf = _header(g)
        off, code, _ = next(f for f in _static_fields() if f[2] == field)
        struct.pack_into("<" + code, buf, off, value)
        _reseal(buf)
        with pytest.raises(FormatError, match="impossible values"):
            parse_header(buf, g.file_size, "where")
    buf = _header(g)
    struct.pack_into("<I", buf, 24, 16)                   # bucket
    _reseal(buf)
    with pytest.raises(FormatError, match="bucket size 16"):
        parse_header(buf, g.file_size, "where")


def test_row_and_snapshot_dtypes_are_little_endian_and_packed():
    dt = row_dtype(64)
    assert dt.isalignedstruct is False and dt.itemsize == 88
    for name in ("seq", "start", "end"):
        assert dt.fields[name][0].byteorder in ("<", "=") and dt.fields[name][0].itemsize == 8
    sd = layout.snapshot_dtype(61)
    assert sd.names == ("key", "start", "end") and sd.fields["key"][0] == np.dtype("S61")
    assert layout.NOT_SET == np.iinfo(np.int64).min
    assert np.array([layout.NOT_SET], np.int64).view("M8[ns]")[0] != np.array([0], "M8[ns]")[0]
    assert np.isnat(np.array([layout.NOT_SET], np.int64).view("M8[ns]")[0])
