"""Bucket arithmetic shared by probing and the write protocol (docs/format.md, "Hashing and probing").

A tag's home bucket is ``(tag >> 32) * nbuckets >> 32``; a bucket's 8 slots
compared at once give an (m, 8) boolean matrix, seen as m 64-bit words.
"""

from __future__ import annotations

import numpy as np

__all__ = ["home_bucket", "home_bucket_one"]

_U = np.uint64


def home_bucket(tags: np.ndarray, nbuckets: int) -> np.ndarray:
    """Home bucket of each tag (int64 array)."""
    return ((tags >> _U(32)) * _U(nbuckets) >> _U(32)).astype(np.int64)


def home_bucket_one(tag: int, nbuckets: int) -> int:
    """Home bucket of one tag."""
    return ((tag >> 32) * nbuckets) >> 32


def _bool_words(mask8: np.ndarray) -> np.ndarray:
    """View an (m, 8) boolean matrix as m uint64 words (byte j = column j, 0x01 if True)."""
    return np.ascontiguousarray(mask8).view(_U).reshape(len(mask8))
