"""XXH64 over fixed-width key fields: one key with the xxhash package, many with numpy.

The table hashes the whole zero-padded key field (``key_field`` bytes, a
multiple of 8), so every key of a table has the same length and a batch can be
hashed as a ``(n, key_field // 8)`` uint64 matrix, one lane per column.  numpy's
uint64 arithmetic wraps modulo 2**64, exactly like the C reference, so
:func:`xxh64_fields` is bit-for-bit XXH64 (tests compare it with
``xxhash.xxh64_intdigest`` for every length).

The batch is processed in chunks that fit in the L2 cache: XXH64 is ~100
elementwise operations per key, and with chunking each of them runs on
cache-resident temporaries instead of streaming megabytes through memory.
"""

from __future__ import annotations

import numpy as np
import xxhash

__all__ = ["xxh64_fields", "xxh64_one", "tags_of", "tag_of"]

_U = np.uint64
_M = (1 << 64) - 1
P1 = 0x9E3779B185EBCA87
P2 = 0xC2B2AE3D27D4EB4F
P3 = 0x165667B19E3779F9
P4 = 0x85EBCA77C2B2AE63
P5 = 0x27D4EB2F165667C5
_CHUNK = 32768


def xxh64_one(field: bytes, seed: int) -> int:
    """XXH64 of one already padded key field."""
    return xxhash.xxh64_intdigest(field, seed)


def tag_of(field: bytes, seed: int) -> int:
    """The tag stored for one padded key field (XXH64, with 0 and 1 reserved)."""
    h = xxhash.xxh64_intdigest(field, seed)
    return h if h > 1 else h + 2


def xxh64_fields(fields: np.ndarray, seed: int) -> np.ndarray:
    """XXH64 of each row of a fixed-width byte matrix.

    Parameters
    ----------
    fields : numpy.ndarray
        Either a 1-d array of dtype ``S{w}`` or a 2-d ``uint8`` array of shape
        ``(n, w)``; ``w`` must be a multiple of 8.  Each row is hashed as
        exactly ``w`` bytes (trailing NUL padding included).
    seed : int
        The XXH64 seed (0 <= seed < 2**64).

    Returns
    -------
    numpy.ndarray
        ``uint64`` array of shape ``(n,)``.
    """
    a = np.ascontiguousarray(fields)
    width = a.dtype.itemsize if a.ndim == 1 else a.shape[1] * a.dtype.itemsize
    if width % 8:
        raise ValueError(f"key field width must be a multiple of 8, got {width}")
    n = a.shape[0]
    lanes = a.view(np.uint8).reshape(n, width).view("<u8")
    out = np.empty(n, _U)
    for s in range(0, n, _CHUNK):
        _xxh64_lanes(lanes[s:s + _CHUNK], seed & _M, width, out[s:s + _CHUNK])
    return out


def tags_of(fields: np.ndarray, seed: int) -> np.ndarray:
    """Tags for a batch of padded key fields (see :func:`tag_of`)."""
    h = xxh64_fields(fields, seed)
    h[h < 2] += _U(2)
    return h


def _xxh64_lanes(lanes: np.ndarray, seed: int, nbytes: int, h: np.ndarray) -> None:
    """XXH64 of each row of ``lanes`` (uint64, shape (n, nbytes // 8)) into ``h``."""
    n, nlanes = lanes.shape
    tmp = np.empty(n, _U)
    tmp2 = np.empty(n, _U)

    def rotl(x: np.ndarray, r: int, out: np.ndarray) -> None:
        # out may not alias x: the right shift reads x after out is written
        np.left_shift(x, _U(r), out=out)
        np.right_shift(x, _U(64 - r), out=tmp2)
        out |= tmp2

    def xround(acc: np.ndarray, lane: np.ndarray) -> None:
        # acc = rotl(acc + lane * P2, 31) * P1, in place
        np.multiply(lane, _U(P2), out=tmp)
        acc += tmp
        rotl(acc, 31, tmp)
        np.multiply(tmp, _U(P1), out=acc)

    j = 0
    if nbytes >= 32:
        v = [np.full(n, (seed + P1 + P2) & _M, _U), np.full(n, (seed + P2) & _M, _U),
             np.full(n, seed, _U), np.full(n, (seed - P1) & _M, _U)]
        while j + 4 <= nlanes:
            for i in range(4):
                xround(v[i], lanes[:, j + i])
            j += 4
        r = np.empty(n, _U)
        rotl(v[0], 1, h)
        for i, s in ((1, 7), (2, 12), (3, 18)):
            rotl(v[i], s, r)
            h += r
        for i in range(4):
            # merge round: h = (h ^ round(0, v)) * P1 + P4
            v[i] *= _U(P2)
            rotl(v[i], 31, r)
            r *= _U(P1)
            h ^= r
            h *= _U(P1)
            h += _U(P4)
    else:
        h[...] = (seed + P5) & _M
    h += _U(nbytes)
    k = np.empty(n, _U)
    while j < nlanes:
        # h = rotl(h ^ round(0, lane), 27) * P1 + P4
        np.multiply(lanes[:, j], _U(P2), out=tmp)
        rotl(tmp, 31, k)
        k *= _U(P1)
        h ^= k
        rotl(h, 27, k)
        np.multiply(k, _U(P1), out=h)
        h += _U(P4)
        j += 1
    # avalanche
    np.right_shift(h, _U(33), out=tmp)
    h ^= tmp
    h *= _U(P2)
    np.right_shift(h, _U(29), out=tmp)
    h ^= tmp
    h *= _U(P3)
    np.right_shift(h, _U(32), out=tmp)
    h ^= tmp
