"""Side-information bit streams: LSB-first packing, Exp-Golomb codes, and bounded reads."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deltacodec.bitio import BitReader, BitstreamError, BitWriter, eg0_bits, unzigzag, zigzag


def reference_eg0(v: int) -> str:
    """EG0 as a bit string in write order, straight from the definition in bitio's docstring."""
    u = v + 1
    m = u.bit_length() - 1
    low = u - (1 << m)
    return "0" * m + "1" + "".join(str((low >> i) & 1) for i in range(m))


def bits_of(data: bytes, n: int) -> str:
    return "".join(str((data[j // 8] >> (j % 8)) & 1) for j in range(n))


@given(st.lists(st.integers(0, 2**40), max_size=30))
def test_eg0_matches_the_definition_bit_for_bit(values):
    bw = BitWriter()
    for v in values:
        bw.eg0(v)
    expect = "".join(reference_eg0(v) for v in values)
    assert len(bw) == len(expect) == sum(eg0_bits(v) for v in values)
    assert bits_of(bw.getvalue(), len(bw)) == expect
    # padding of the last byte is zero
    data = bw.getvalue()
    assert len(data) == (len(expect) + 7) // 8
    if len(expect) % 8:
        assert data[-1] >> (len(expect) % 8) == 0


@given(st.lists(st.one_of(
    st.tuples(st.just("bits"), st.integers(0, 40).flatmap(lambda k: st.tuples(st.just(k), st.integers(0, 2**k - 1)))),
    st.tuples(st.just("eg0"), st.integers(0, 2**39)),
    st.tuples(st.just("seg0"), st.integers(-(2**38), 2**38)),
), max_size=40))
def test_mixed_fields_round_trip(ops):
    bw = BitWriter()
    for kind, arg in ops:
        if kind == "bits":
            bw.bits(arg[1], arg[0])
        elif kind == "eg0":
            bw.eg0(arg)
        else:
            bw.seg0(arg)
    br = BitReader(bw.getvalue())
    for kind, arg in ops:
        if kind == "bits":
            assert br.bits(arg[0]) == arg[1]
        elif kind == "eg0":
            assert br.eg0() == arg
        else:
            assert br.seg0() == arg
    br.finish()


@pytest.mark.parametrize("v", [0, -1, 1, -2, 2, 12345, -12345, 2**40, -(2**40)])
def test_zigzag_is_a_bijection_onto_naturals(v):
    u = zigzag(v)
    assert u >= 0 and unzigzag(u) == v
    assert u == (2 * v if v >= 0 else -2 * v - 1)


@pytest.mark.parametrize("cut", range(0, 6))
def test_truncated_stream_raises_bitstream_error(cut):
    bw = BitWriter()
    for v in (1000, 5, 70000):
        bw.eg0(v)
    data = bw.getvalue()[:cut]
    br = BitReader(data)
    with pytest.raises(BitstreamError):
        for _ in range(3):
            br.eg0()
        br.finish()


def test_overlong_prefix_and_limits_are_refused():
    with pytest.raises(BitstreamError):
        BitReader(bytes(8)).eg0()  # 64 zero bits: no terminating one within the prefix limit
    bw = BitWriter()
    bw.eg0(300)
    with pytest.raises(BitstreamError):
        BitReader(bw.getvalue()).eg0(max_value=299)
    bw = BitWriter()
    bw.seg0(-50)
    with pytest.raises(BitstreamError):
        BitReader(bw.getvalue()).seg0(max_abs=49)


@pytest.mark.parametrize("data", [b"\x01\x00", b"\xff", b"\x00\x80"])
def test_finish_rejects_leftover_bytes_and_nonzero_padding(data):
    br = BitReader(data)
    br.bits(1)
    with pytest.raises(BitstreamError):
        br.finish()


@pytest.mark.parametrize("value,k", [(4, 2), (-1, 3), (1, 0)])
def test_writer_refuses_values_that_do_not_fit(value, k):
    with pytest.raises(ValueError):
        BitWriter().bits(value, k)
