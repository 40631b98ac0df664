"""Bit packing against the plain bit-by-bit reference in sldtools (spec section 5)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from deltacodec.pack import default_width, pack_indices, packed_nbytes, padding_is_zero, unpack_indices

from sldtools import ref_pack, ref_unpack


@pytest.mark.parametrize("width", range(1, 9))
@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 63, 64, 65, 1001])
def test_pack_matches_reference_for_every_width_and_length(width, n):
    rng = np.random.default_rng(width * 1000 + n)
    idx = rng.integers(0, 1 << width, n).astype(np.uint8)
    packed = pack_indices(idx, width)
    assert packed.tobytes() == ref_pack(idx.tolist(), width)
    assert packed.size == packed_nbytes(n, width)
    np.testing.assert_array_equal(unpack_indices(packed, n, width), idx)
    assert padding_is_zero(packed, n, width)


@given(st.integers(1, 8).flatmap(lambda w: st.tuples(st.just(w), st.lists(st.integers(0, (1 << w) - 1), max_size=300))))
def test_pack_unpack_round_trip_property(case):
    width, values = case
    idx = np.array(values, dtype=np.uint8)
    packed = pack_indices(idx, width)
    assert ref_unpack(packed.tobytes(), len(values), width) == values
    np.testing.assert_array_equal(unpack_indices(packed, len(values), width), idx)


def test_padding_check_sees_a_stray_high_bit():
    packed = pack_indices(np.array([1, 2, 3], np.uint8), 3)  # 9 bits: 7 padding bits
    assert padding_is_zero(packed, 3, 3)
    packed[-1] |= 0x80
    assert not padding_is_zero(packed, 3, 3)


def test_unpack_rejects_a_short_stream():
    with pytest.raises(ValueError, match="3 needed"):
        unpack_indices(np.zeros(2, np.uint8), 8, 3)


def test_default_width_is_byte_aligned_with_entropy_and_dense_without():
    assert [default_width(b, True) for b in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]
    assert [default_width(b, False) for b in range(1, 9)] == list(range(1, 9))
