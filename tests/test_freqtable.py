"""Frequency tables: the param rule against a plain re-implementation of its text, serialisation
round trips (compiled and Python readers), table choice, and refusal of invalid tables."""

from __future__ import annotations

import math
from decimal import Decimal, localcontext

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deltacodec import _native
from deltacodec import freqtable as ft
from deltacodec.bitio import BitReader, BitstreamError, BitWriter


def test_exp2_table_is_correctly_rounded_and_has_no_near_ties():
    with localcontext() as ctx:
        ctx.prec = 80
        for j in range(256):
            exact = Decimal(2) ** 31 * Decimal(2) ** (Decimal(-j) / 256)
            frac = exact - int(exact)
            assert abs(frac - Decimal("0.5")) > Decimal("1e-20")
            assert ft.EXP2_TABLE[j] == int(exact + Decimal("0.5"))
    assert ft.EXP2_TABLE[0] == 2**31
    # a checksum an implementer can compare against
    assert int(ft.EXP2_TABLE.sum()) == 397_102_106_376


def plain_param_freqs(imin: int, k: int, p: int, a: int, b: int) -> list[int]:
    """The param rule, read off spec/sld-format.md part 2 (§13) and written with Python integers only."""
    table = [int(v) for v in ft.EXP2_TABLE]
    es = [a * abs(i) + b * i * i for i in range(imin, imin + k)]
    emin = min(es)
    w = []
    for e in es:
        e2 = (e - emin) >> 12
        w.append(table[e2 % 256] >> (e2 // 256) if e2 // 256 < 32 else 0)
    total, spare, wsum = 1 << p, (1 << p) - k, sum(w)
    f = [1 + wi * spare // wsum for wi in w]
    rem = [wi * spare % wsum for wi in w]
    r = total - sum(f)
    for s in sorted(range(k), key=lambda s: (-rem[s], s))[:r]:
        f[s] += 1
    return f


@settings(max_examples=200)
@given(st.integers(-300, 50), st.integers(1, 400), st.integers(9, 15),
       st.integers(-(2**22), 2**22), st.integers(-(2**18), 2**20))
def test_param_table_follows_the_integer_rule(imin, k, p, a, b):
    if k > 1 << p:
        return
    t = ft.param_table(imin, k, p, a, b)
    assert t.freqs.tolist() == plain_param_freqs(imin, k, p, a, b)
    assert int(t.freqs.sum()) == 1 << p and t.freqs.min() >= 1


def laplace_counts(rng, n, scale):
    q = np.round(rng.laplace(0, scale, n)).astype(np.int64)
    lo = int(q.min())
    return np.bincount(q - lo), lo


@pytest.mark.parametrize("kind", ["explicit", "param"])
@pytest.mark.parametrize("n,scale", [(300, 0.4), (5000, 3.0), (100_000, 40.0)])
@pytest.mark.parametrize("native", [True, False])
def test_tables_round_trip_through_their_bits(kind, n, scale, native, rng, monkeypatch):
    c, lo = laplace_counts(rng, n, scale)
    t = ft.best_table(c, lo, kinds=(kind,))
    bw = BitWriter()
    t.write(bw)
    bw.bits(0b101, 3)  # whatever follows must be left alone
    assert t.side_bits() == len(bw) - 3
    if kind == "explicit":
        assert ft._explicit_side_bits_fast(t.freqs, t.imin) == t.side_bits()
    if not native:
        monkeypatch.setattr(_native, "library", lambda: None)
    br = BitReader(bw.getvalue())
    back = ft.FreqTable.read(br)
    assert br.bits(3) == 0b101
    assert back.kind == t.kind and back.precision == t.precision and back.imin == t.imin
    assert np.array_equal(back.freqs, t.freqs)


def test_best_table_is_within_the_precision_rule_of_any_single_kind_or_precision(rng):
    # best_table trades up to PRECISION_GAIN (0.05 %) of size for a smaller decoder table
    for n, scale in ((200, 1.0), (2000, 5.0), (60000, 0.7)):
        c, lo = laplace_counts(rng, n, scale)
        best = ft.best_table(c, lo)
        cost = ft.data_bits(best, c) + best.side_bits()
        for p in range(max(1, math.ceil(math.log2(c.size))), 16):
            t = ft.explicit_table(c, lo, p)
            if t is not None:
                assert cost <= (ft.data_bits(t, c) + t.side_bits()) * (1 + ft.PRECISION_GAIN) + 1e-6
        # the param fit is skipped when the explicit table's side bits are <= 0.2 % of the total,
        # so a param table can be better by at most that much
        t = ft.fit_param_table(c, lo)
        assert cost <= (ft.data_bits(t, c) + t.side_bits()) * 1.002 + 1e-6


def test_small_smooth_tensors_get_param_tables_and_large_skewed_ones_explicit(rng):
    c, lo = laplace_counts(rng, 512, 6.0)
    assert ft.best_table(c, lo).kind == "param"
    # a large tensor whose shape no two-parameter curve follows: two bumps
    q = np.concatenate([np.round(rng.normal(-8, 1, 100_000)), np.round(rng.normal(8, 1, 100_000))]).astype(np.int64)
    lo = int(q.min())
    assert ft.best_table(np.bincount(q - lo), lo).kind == "explicit"


def test_explicit_table_gives_every_present_symbol_a_frequency(rng):
    c = np.array([1, 0, 0, 5000, 1, 0, 3])
    for p in range(3, 16):
        t = ft.explicit_table(c, -3, p)
        assert int(t.freqs.sum()) == 1 << p
        assert np.all(t.freqs[c > 0] >= 1) and np.all(t.freqs[c == 0] == 0)
    assert ft.explicit_table(c, -3, 1) is None  # 4 present symbols do not fit in 2 slots


def _bits(*fields):
    bw = BitWriter()
    for kind, v, *k in fields:
        if kind == "bits":
            bw.bits(v, k[0])
        elif kind == "seg0":
            bw.seg0(v)
        else:
            bw.eg0(v)
    return bw.getvalue()


@pytest.mark.parametrize("data,what", [
    (_bits(("bits", 0, 1), ("bits", 15, 4)), "precision 16"),
    (_bits(("bits", 0, 1), ("bits", 3, 4), ("seg0", -70000)), "imin beyond ±65535"),
    (_bits(("bits", 0, 1), ("bits", 3, 4), ("seg0", 0), ("seg0", -1)), "empty alphabet"),
    (_bits(("bits", 0, 1), ("bits", 3, 4), ("seg0", 0), ("seg0", 40000)), "alphabet > 2^15"),
    (_bits(("bits", 1, 1), ("bits", 1, 4), ("seg0", 0), ("seg0", 7)), "param: K > 2^P"),
    (_bits(("bits", 0, 1), ("bits", 1, 4), ("seg0", 0), ("seg0", 1), ("seg0", 5)), "implied symbol outside"),
    (_bits(("bits", 0, 1), ("bits", 1, 4), ("seg0", 0), ("seg0", 1), ("seg0", 0), ("eg0", 4)), "f reaches 2^P"),
    (_bits(("bits", 0, 1), ("bits", 3, 4), ("seg0", 0), ("seg0", 3), ("seg0", 0)), "truncated"),
    (_bits(("bits", 1, 1), ("bits", 9, 4), ("seg0", -3), ("seg0", 0), ("bits", 15, 4), ("seg0", 2**14)),
     "param A beyond 2^28"),
])
@pytest.mark.parametrize("native", [True, False])
def test_invalid_tables_are_refused(data, what, native, monkeypatch):
    if not native:
        monkeypatch.setattr(_native, "library", lambda: None)
    with pytest.raises(BitstreamError):
        ft.FreqTable.read(BitReader(data))
