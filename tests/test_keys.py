"""Key validation: one key and batches of every input form must give the same verdict."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npcalls.errors import InvalidKeyError
from npcalls.keys import encode_key, encode_keys
from npcalls.layout import key_field_width

WIDTHS = [1, 7, 8, 13, 16, 64, 255]


def single_verdict(key, kw: int):
    """The padded field encode_key gives, or None if it refuses the key."""
    try:
        return encode_key(key, kw, key_field_width(kw))
    except InvalidKeyError:
        return None


def batch_verdicts(keys, kw: int) -> list:
    kf = key_field_width(kw)
    enc = encode_keys(keys, kw, kf)
    assert enc.fields.dtype == np.dtype(f"S{kf}")
    assert len(enc.fields) == len(keys)
    assert list(enc.bad) == sorted(enc.bad)
    assert len(enc.reasons) == len(enc.bad)
    bad = set(enc.bad.tolist())
    # numpy strips trailing NULs from S items: pad back to the stored width to compare
    return [None if i in bad else bytes(enc.fields[i]).ljust(kf, b"\0") for i in range(len(keys))]


def random_raw_keys(rng: random.Random, kw: int, n: int, nul_rate: float = 0.05) -> list[bytes]:
    """Keys around every boundary of ``kw``: empty, kw-1, kw, kw+1, the padded width, longer."""
    kf = key_field_width(kw)
    out = []
    for _ in range(n):
        length = rng.choice([0, 1, max(kw - 1, 0), kw, kw + 1, kf, kf + 1, rng.randint(1, kw + 9)])
        out.append(bytes(0 if rng.random() < nul_rate else rng.randint(1, 127)
                         for _ in range(length)))
    return out


# ---------------------------------------------------------------- one key


@pytest.mark.parametrize("kw", WIDTHS)
def test_valid_keys_are_zero_padded_to_the_key_field(kw):
    kf = key_field_width(kw)
    assert kf % 8 == 0 and kw <= kf < kw + 8
    for length in range(1, kw + 1):
        k = "x" * length
        assert encode_key(k, kw, kf) == k.encode() + b"\0" * (kf - length)
        assert encode_key(k.encode(), kw, kf) == k.encode().ljust(kf, b"\0")


def test_str_and_bytes_like_inputs_give_the_same_field():
    kw, kf = 13, 16
    want = b"abc@host".ljust(kf, b"\0")
    for k in ("abc@host", b"abc@host", bytearray(b"abc@host"), memoryview(b"abc@host"),
              np.str_("abc@host"), np.bytes_(b"abc@host")):
        assert encode_key(k, kw, kf) == want, k


def test_str_subclass_is_accepted():
    class CallId(str):
        pass
    assert encode_key(CallId("a@b"), 8, 8) == b"a@b".ljust(8, b"\0")


def test_non_ascii_str_is_stored_as_utf8_and_measured_in_bytes():
    # 4 x 'é' is 8 UTF-8 bytes: fits a width of 8; 5 of them (10 bytes) do not,
    # although 5 characters would
    assert encode_key("é" * 4, 8, 8) == ("é" * 4).encode()
    with pytest.raises(InvalidKeyError, match="10 bytes long.*key width of 8 bytes"):
        encode_key("é" * 5, 8, 8)


def test_surrogateescape_str_round_trips_to_its_bytes():
    # iteration decodes stored bytes with surrogateescape; such a str must find the same row
    raw = b"\xffcall\xfe"
    assert encode_key(raw.decode("utf-8", "surrogateescape"), 8, 8) == raw.ljust(8, b"\0")


def test_lone_surrogate_is_refused():
    with pytest.raises(InvalidKeyError, match="UTF-8"):
        encode_key("a\ud800b", 8, 8)


def test_empty_key_is_refused_naming_the_limit():
    for k in ("", b""):
        with pytest.raises(InvalidKeyError, match=r"empty.*1 to 13 bytes") as ei:
            encode_key(k, 13, 16)
        assert ei.value.key == k
        assert ei.value.reason.startswith("empty")


@pytest.mark.parametrize("kw", [8, 13, 64])
def test_too_long_key_is_refused_naming_key_and_limit(kw):
    kf = key_field_width(kw)
    key = "L" * (kw + 1)
    with pytest.raises(InvalidKeyError) as ei:
        encode_key(key, kw, kf)
    msg = str(ei.value)
    assert repr(key) in msg
    assert f"{kw + 1} bytes long" in msg
    assert f"key width of {kw} bytes" in msg
    assert ei.value.key == key


def test_too_long_key_message_is_shortened_but_still_names_the_limit():
    key = "x" * 5000
    with pytest.raises(InvalidKeyError) as ei:
        encode_key(key, 64, 64)
    msg = str(ei.value)
    assert "'xxxxxxxx" in msg and len(msg) < 400
    assert "5000 bytes long" in msg and "key width of 64 bytes" in msg
    assert ei.value.key == key


def test_keys_between_key_width_and_padded_width_are_refused():
    # width 13 is stored in 16 bytes: 14..16-byte keys would fit the field but not the limit
    for n in (14, 15, 16):
        with pytest.raises(InvalidKeyError, match=f"{n} bytes long"):
            encode_key(b"k" * n, 13, 16)


@pytest.mark.parametrize("key", [b"a\0b", b"\0ab", b"ab\0", "a\0b", "ab\0", b"\0"])
def test_nul_anywhere_is_refused(key):
    with pytest.raises(InvalidKeyError, match="NUL"):
        encode_key(key, 8, 8)


@pytest.mark.parametrize("key", [5, 5.0, None, ["a"], ("a",), object(), np.int64(3)])
def test_wrong_type_is_refused_naming_the_type(key):
    with pytest.raises(InvalidKeyError, match=f"must be str or bytes, not {type(key).__name__}"):
        encode_key(key, 8, 8)


def test_invalid_key_error_is_a_value_error():
    with pytest.raises(ValueError):
        encode_key("", 8, 8)


# ---------------------------------------------------------------- batches


def test_single_str_or_bytes_is_not_a_batch():
    for keys in ("abc", b"abc"):
        with pytest.raises(TypeError, match="sequence of Call-IDs"):
            encode_keys(keys, 8, 8)


def test_empty_batches_of_every_form():
    for keys in ([], (), np.array([], "S8"), np.array([], "U8"), np.array([], object)):
        enc = encode_keys(keys, 8, 8)
        assert len(enc.fields) == 0 and len(enc.bad) == 0 and enc.reasons == []


def test_iterators_are_accepted():
    enc = encode_keys((k for k in ["a", "", "b"]), 8, 8)
    assert list(enc.bad) == [1]
    assert list(enc.fields) == [b"a", b"", b"b"]


def test_two_dimensional_arrays_are_flattened():
    enc = encode_keys(np.array([["ab", "cd"], ["ef", "gh"]]), 8, 8)
    assert list(enc.fields) == [b"ab", b"cd", b"ef", b"gh"]


def test_batch_reasons_name_each_problem():
    enc = encode_keys(["ok", "", "x" * 9, "a\0b", 7], 8, 8)
    assert list(enc.bad) == [1, 2, 3, 4]
    assert "empty" in enc.reasons[0]
    assert "9 bytes long" in enc.reasons[1] and "key width of 8" in enc.reasons[1]
    assert "NUL" in enc.reasons[2]
    assert "not int" in enc.reasons[3]
    # refused keys hold the all-zero field, which no valid key can have
    assert list(enc.fields[1:]) == [b"", b"", b"", b""]


@pytest.mark.parametrize("kw", WIDTHS)
def test_every_batch_form_agrees_with_single_keys(kw):
    """Lists of bytes / str / mixed, S, wide S, U and object arrays: same verdict as encode_key."""
    rng = random.Random(kw)
    for _ in range(60):
        raw = random_raw_keys(rng, kw, rng.randint(1, 24))
        want = [single_verdict(k, kw) for k in raw]
        text = [k.decode() for k in raw]
        forms = {
            "bytes": raw,
            "str": text,
            "mixed": [k if i % 2 else k.decode() for i, k in enumerate(raw)],
            "object": np.array(raw + [None], dtype=object)[:-1],
            "tuple": tuple(raw),
        }
        # S and U items cannot end in NUL (numpy treats trailing NULs as padding)
        if not any(k.endswith(b"\0") for k in raw):
            width = max(1, max(len(k) for k in raw))
            forms["S"] = np.array(raw, dtype=f"S{width}")
            forms["S-wide"] = np.array(raw, dtype=f"S{key_field_width(kw) + 11}")
            forms["S-strided"] = np.array(raw, dtype=f"S{width}").repeat(2)[::2]
            forms["U"] = np.array(text, dtype=f"U{width}")
        for form, keys in forms.items():
            assert batch_verdicts(keys, kw) == want, (form, raw)


@pytest.mark.parametrize("kw", [8, 13, 64])
def test_non_ascii_batches_agree_with_single_keys(kw):
    rng = random.Random(100 + kw)
    alphabet = "aé€😀"       # 1, 2, 3 and 4 UTF-8 bytes
    for _ in range(40):
        keys = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, kw // 2 + 3)))
                for _ in range(rng.randint(1, 16))]
        want = [single_verdict(k, kw) for k in keys]
        assert batch_verdicts(keys, kw) == want
        if all(keys):
            assert batch_verdicts(np.array(keys), kw) == want
        assert batch_verdicts([k.encode() for k in keys], kw) == want


def test_fast_path_does_not_truncate_long_keys():
    # numpy would silently cut these to the field width: two long Call-IDs sharing a
    # prefix must never become the same key
    kw = 13
    shared = "p" * 16
    keys = [shared + "A", shared + "B", "short"]
    for form in (keys, [k.encode() for k in keys], np.array(keys), np.array(keys, "S")):
        enc = encode_keys(form, kw, 16)
        assert list(enc.bad) == [0, 1]
        assert enc.fields[2] == b"short"


@settings(max_examples=150, deadline=None)
@given(keys=st.lists(st.binary(min_size=0, max_size=20), min_size=1, max_size=12),
       kw=st.sampled_from([1, 5, 8, 13, 16]))
def test_hypothesis_bytes_batches_agree_with_single_keys(keys, kw):
    want = [single_verdict(k, kw) for k in keys]
    assert batch_verdicts(keys, kw) == want
    if not any(k.endswith(b"\0") for k in keys):
        assert batch_verdicts(np.array(keys, dtype=f"S{max(1, max(map(len, keys)))}"), kw) == want


@settings(max_examples=150, deadline=None)
@given(keys=st.lists(st.text(max_size=12), min_size=1, max_size=12),
       kw=st.sampled_from([1, 5, 8, 13, 16]))
def test_hypothesis_str_batches_agree_with_single_keys(keys, kw):
    want = [single_verdict(k, kw) for k in keys]
    assert batch_verdicts(keys, kw) == want
    if not any(k.endswith("\0") for k in keys):
        arr = np.array(keys, dtype=f"U{max(1, max(map(len, keys)))}")
        assert batch_verdicts(arr, kw) == want
