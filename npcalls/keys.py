"""Turning Call-IDs into the fixed-width key fields the table stores.

A key is ``str`` (stored as UTF-8) or ``bytes``, 1..key_width bytes, without
NUL.  It is stored zero-padded to ``key_field`` bytes (key_width rounded up to
a multiple of 8).  NUL is refused because the padding is NUL: ``b"ab"`` and
``b"ab\\0"`` would otherwise be the same field, and no Call-ID holds NUL
(RFC 3261 allows only printable ASCII in a Call-ID).  Keys are never
truncated: a key that does not fit is an error naming the key and the limit.

Batches take fast vectorized paths for the common inputs (lists of ASCII
``str``, lists of ``bytes``, numpy ``S`` and ``U`` arrays) and fall back to
key-by-key checks only when a batch holds something unusual; both paths give
the same verdict for every key.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from .errors import InvalidKeyError

__all__ = ["encode_key", "encode_keys", "EncodedKeys"]


def _reason(b: bytes, key_width: int) -> str | None:
    n = len(b)
    if n == 0:
        return "empty (a Call-ID needs 1 to {} bytes)".format(key_width)
    if n > key_width:
        return (f"{n} bytes long, longer than the table's key width of {key_width} bytes "
                f"(create the table with a larger key_width)")
    if b"\x00" in b:
        return "contains a NUL byte"
    return None


def encode_key(key: Any, key_width: int, key_field: int) -> bytes:
    """Validate one key and return its zero-padded field.

    Raises
    ------
    InvalidKeyError
        If the key is not str/bytes, is empty, holds NUL, or is longer than
        ``key_width`` bytes once UTF-8 encoded.
    """
    t = type(key)
    if t is str:
        try:
            b = key.encode()        # the argument-free call is CPython's fast path
        except UnicodeEncodeError:
            try:
                # a key decoded from bytes with surrogateescape round-trips
                b = key.encode("utf-8", "surrogateescape")
            except UnicodeEncodeError:
                raise InvalidKeyError(key, "not encodable as UTF-8 (lone surrogate)") from None
    elif t is bytes:
        b = key
    elif isinstance(key, str):
        return encode_key(str(key), key_width, key_field)
    elif isinstance(key, (bytes, bytearray, memoryview)):
        b = bytes(key)
    else:
        raise InvalidKeyError(key, f"must be str or bytes, not {t.__name__}")
    if 0 < len(b) <= key_width and 0 not in b:    # `0 in b` is a memchr; b"\0" in b is not
        return b.ljust(key_field, b"\x00")
    raise InvalidKeyError(key, _reason(b, key_width) or "invalid")


class EncodedKeys(NamedTuple):
    """A batch of keys as stored fields, plus the keys that were refused.

    Attributes
    ----------
    fields : numpy.ndarray
        ``S{key_field}`` array, one field per input key; refused keys hold an
        all-zero field (which no valid key has).
    bad : numpy.ndarray
        Positions (intp, ascending) of refused keys.
    reasons : list of str
        Why each refused key was refused.
    """

    fields: np.ndarray
    bad: np.ndarray
    reasons: list


_NO_BAD = np.empty(0, np.intp)


def encode_keys(keys: Any, key_width: int, key_field: int) -> EncodedKeys:
    """Validate a batch of keys and return their fields and the refused positions.

    Parameters
    ----------
    keys : sequence or numpy.ndarray
        str, bytes, or a numpy ``S`` / ``U`` / object array of them.
    key_width, key_field : int
        The table's limit and its stored field width.
    """
    dt = f"S{key_field}"
    if isinstance(keys, np.ndarray):
        if keys.ndim != 1:
            keys = keys.reshape(-1)
        if keys.dtype.kind == "S":
            return _from_s_array(keys, key_width, key_field)
        if keys.dtype.kind == "U":
            return _from_u_array(keys, key_width, key_field)
        keys = keys.tolist()
    elif isinstance(keys, (str, bytes)):
        raise TypeError("keys must be a sequence of Call-IDs, not a single "
                        f"{type(keys).__name__} (use start()/stop()/get() for one key)")
    elif not isinstance(keys, list):
        keys = list(keys)
    n = len(keys)
    if n == 0:
        return EncodedKeys(np.empty(0, dt), _NO_BAD, [])
    # Fast path: all str and ASCII, or all bytes, with no NUL anywhere.  numpy
    # converts them in one pass but would silently truncate a long key, so the
    # joined length (one more pass) is compared with the converted lengths.
    try:
        first = keys[0]
        joined: str | bytes = ""
        if type(first) is str:
            joined = "".join(keys)
            ok = joined.isascii() and "\x00" not in joined
        elif type(first) is bytes:
            joined = b"".join(keys)
            ok = 0 not in joined
        else:
            ok = False
        if ok and len(joined) <= n * key_width:
            # Every key is a str here (the join said so): fromiter converts them
            # as np.array would, without its pass discovering the shape (~30% less).
            fields = (np.fromiter(keys, dtype=dt, count=n) if type(joined) is str
                      else np.array(keys, dtype=dt))
            # No key holds a NUL, so a field is its key's bytes then NUL padding:
            # its nonzero bytes are its length (a count, 4x cheaper than str_len).
            raw = fields.view(np.uint8).reshape(-1, key_field)
            if fields.shape == (n,) and int(np.count_nonzero(raw)) == len(joined):
                bad_mask = raw[:, 0] == 0
                if key_width < key_field:
                    bad_mask |= raw[:, key_width] != 0
                if not bad_mask.any():
                    return EncodedKeys(fields, _NO_BAD, [])
                bad = np.flatnonzero(bad_mask)
                reasons = [_reason(fields[i], key_width) or "invalid" for i in bad]
                fields[bad] = b""
                return EncodedKeys(fields, bad, reasons)
    except (TypeError, UnicodeError, ValueError):
        pass  # mixed types or an odd element: the careful path decides
    return _one_by_one(keys, key_width, key_field)


def _one_by_one(keys: list, key_width: int, key_field: int) -> EncodedKeys:
    n = len(keys)
    padded = [b""] * n
    bad: list[int] = []
    reasons: list[str] = []
    for i, k in enumerate(keys):
        try:
            padded[i] = encode_key(k, key_width, key_field)
        except InvalidKeyError as e:
            bad.append(i)
            reasons.append(e.reason)
    return EncodedKeys(np.array(padded, dtype=f"S{key_field}"), np.array(bad, np.intp), reasons)


_CHUNK = 16384
_LO7 = np.uint64(0x7F7F7F7F7F7F7F7F)
_HI = np.uint64(0x8080808080808080)
_B0 = np.uint64(0x80)
_EIGHT = np.uint64(8)


def _nul_inside(lanes: np.ndarray) -> np.ndarray:
    """True for each padded field whose bytes are not "non-NUL bytes, then only NULs".

    Works on 8-byte lanes: for each lane, ``nz`` has 0x80 in every nonzero
    byte; a nonzero byte must follow a nonzero byte within its lane, and a
    lane may hold a nonzero byte only if the lane before it is full.  About
    ten word operations per lane instead of a pass over every byte, in chunks
    that stay in the CPU cache.
    """
    n, nlanes = lanes.shape
    bad = np.zeros(n, bool)
    for c in range(0, n, _CHUNK):
        block = lanes[c:c + _CHUNK]
        out = bad[c:c + _CHUNK]
        prev_full = None
        for j in range(nlanes):
            v = block[:, j]
            nz = v & _LO7
            nz += _LO7
            nz |= v
            nz &= _HI
            out |= (nz & ~((nz << _EIGHT) | _B0)) != 0
            if prev_full is not None:
                out |= (nz != 0) & ~prev_full
            prev_full = nz == _HI
    return bad


def _from_s_array(a: np.ndarray, key_width: int, key_field: int) -> EncodedKeys:
    n = len(a)
    w = a.dtype.itemsize
    if w == key_field and a.flags.c_contiguous:
        fields = a
    else:
        fields = np.zeros(n, f"S{key_field}")
        cols = min(w, key_field)
        if n:
            fields.view(np.uint8).reshape(n, key_field)[:, :cols] = \
                np.ascontiguousarray(a).view(np.uint8).reshape(n, w)[:, :cols]
    if n == 0:
        return EncodedKeys(fields, _NO_BAD, [])
    raw = np.ascontiguousarray(a).view(np.uint8).reshape(n, w)
    bad_mask = raw[:, 0] == 0                         # empty (or a leading NUL)
    long_mask = raw[:, key_width] != 0 if w > key_width else None
    if long_mask is not None:
        bad_mask |= long_mask
    lanes = fields.view(np.uint64).reshape(n, key_field // 8)
    bad_mask |= _nul_inside(lanes)
    if w > key_field:
        # bytes beyond the stored field that _nul_inside could not see
        bad_mask |= (raw[:, key_field:] != 0).any(axis=1) & ~bad_mask
    if not bad_mask.any():
        return EncodedKeys(fields, _NO_BAD, [])
    bad = np.flatnonzero(bad_mask)
    if fields is a:
        fields = fields.copy()
    reasons = [_reason(raw[i].tobytes().rstrip(b"\x00"), key_width) or "contains a NUL byte"
               for i in bad]
    fields[bad] = b""
    return EncodedKeys(fields, bad, reasons)


def _from_u_array(a: np.ndarray, key_width: int, key_field: int) -> EncodedKeys:
    n = len(a)
    if n == 0:
        return EncodedKeys(np.empty(0, f"S{key_field}"), _NO_BAD, [])
    codes = np.ascontiguousarray(a).view(np.uint32).reshape(n, -1)
    if codes.shape[1] and int(codes.max()) >= 128:
        return _one_by_one(a.tolist(), key_width, key_field)  # non-ASCII: UTF-8 lengths differ
    width = codes.shape[1]
    fields = np.zeros(n, f"S{key_field}")
    cols = min(width, key_field)
    fields.view(np.uint8).reshape(n, key_field)[:, :cols] = codes[:, :cols]
    bad_mask = codes[:, 0] == 0 if width else np.ones(n, bool)
    if width > key_width:
        bad_mask |= codes[:, key_width] != 0
    bad_mask |= _nul_inside(fields.view(np.uint64).reshape(n, key_field // 8))
    if width > key_field:
        bad_mask |= (codes[:, key_field:] != 0).any(axis=1)
    if not bad_mask.any():
        return EncodedKeys(fields, _NO_BAD, [])
    bad = np.flatnonzero(bad_mask)
    reasons = [_reason(str(a[i]).encode(), key_width) or "contains a NUL byte" for i in bad]
    fields[bad] = b""
    return EncodedKeys(fields, bad, reasons)
