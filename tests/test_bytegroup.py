"""Lossless 16-bit: field splitting against a bit-level reference, bit-exact round trips of every
class of value (subnormals, infinities, NaN payloads, signed zeros), and that grouping pays."""

from __future__ import annotations

import numpy as np
import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from deltacodec import bytegroup, rans

pytestmark = pytest.mark.skipif(not rans.native_available(), reason="compiled coder unavailable")


def reference_fields(word: int, dtype: str) -> tuple[int, ...]:
    s = word >> 15
    if dtype == "BF16":
        e, m = (word >> 7) & 0xFF, word & 0x7F
        return e, (s << 7) | m
    e, m = (word >> 10) & 0x1F, word & 0x3FF
    return e, (s << 2) | (m >> 8), m & 0xFF


@given(st.lists(st.integers(0, 0xFFFF), max_size=64), st.sampled_from(bytegroup.DTYPES))
def test_split_matches_the_bit_layout_and_joins_back(words, dtype):
    bits = np.array(words, dtype=np.uint16)
    fields = bytegroup.split_fields(bits, dtype)
    for k, w in enumerate(words):
        assert tuple(int(f[k]) for f in fields) == reference_fields(w, dtype)
    assert np.array_equal(bytegroup.join_fields(fields, dtype), bits)


SPECIALS = {
    "F16": [0x0000, 0x8000, 0x0001, 0x03FF, 0x7C00, 0xFC00, 0x7E00, 0x7C01, 0xFFFF, 0x3C00],
    "BF16": [0x0000, 0x8000, 0x0001, 0x007F, 0x7F80, 0xFF80, 0x7FC0, 0x7F81, 0xFFFF, 0x3F80],
}


@pytest.mark.parametrize("dtype", bytegroup.DTYPES)
@pytest.mark.parametrize("n", [0, 1, 5, 4099])
def test_round_trip_is_bit_exact_for_every_class_of_value(dtype, n, rng):
    vals = rng.laplace(0, 1e-3, n).astype(np.float32)
    if dtype == "F16":
        bits = vals.astype(np.float16).view(np.uint16)
    else:
        bits = (vals.view(np.uint32) >> 16).astype(np.uint16)
    bits = bits.copy()
    specials = np.array(SPECIALS[dtype], dtype=np.uint16)
    bits[: min(n, specials.size)] = specials[: min(n, specials.size)]
    g = bytegroup.encode16(bits, dtype)
    back = bytegroup.decode16(g)
    assert back.dtype == np.uint16 and np.array_equal(back, bits)


@pytest.mark.parametrize("dtype,at_most", [("F16", 1.75), ("BF16", 1.40)])
def test_grouped_fields_beat_zstd_on_the_raw_words(dtype, at_most, rng):
    # Laplace-like weights (the planning measurement): grouped ~1.71 / 1.35 bytes per value,
    # zstd on the interleaved words ~1.86 / 1.59
    vals = rng.laplace(0, 1e-3, 1 << 18).astype(np.float32)
    bits = vals.astype(np.float16).view(np.uint16) if dtype == "F16" else (vals.view(np.uint32) >> 16).astype(np.uint16)
    g = bytegroup.encode16(bits, dtype)
    z = len(zstandard.ZstdCompressor(level=3).compress(bits.tobytes()))
    assert g.nbytes / bits.size <= at_most
    assert g.nbytes < 0.93 * z


def test_incompressible_streams_are_stored_raw(rng):
    bits = rng.integers(0, 1 << 16, 5000).astype(np.uint16)
    g = bytegroup.encode16(bits, "BF16")
    assert all(t is None for t in g.tables)
    assert np.array_equal(bytegroup.decode16(g), bits)


def test_raw_stream_of_the_wrong_length_is_refused(rng):
    bits = rng.integers(0, 1 << 16, 100).astype(np.uint16)
    g = bytegroup.encode16(bits, "BF16")
    g.raw[0] = g.raw[0][:-1]
    with pytest.raises(rans.RansError):
        bytegroup.decode16(g)


def test_unknown_dtype_is_refused():
    with pytest.raises(ValueError):  # F32 is a field dtype since the extension f32_fields
        bytegroup.split_fields(np.zeros(3, np.uint16), "F64")
    with pytest.raises(ValueError):
        bytegroup.join_fields([np.zeros(3, np.uint8)] * 4, "F64")
