"""Frequency tables of the static rANS coder: construction, fitting and compact serialisation.

A table maps the integer indices ``imin .. imin+K-1`` of one tensor to symbols ``0 .. K-1`` and
gives each symbol a frequency ``f_s >= 0``, ``sum f_s == 2**P`` (``P``, the precision, 1..15).
Two kinds, chosen per tensor by whichever codes the tensor in fewer bits (table included):

* **explicit**: every frequency stored (Exp-Golomb codes; the largest one implied by the sum).
  Best for large tensors, where the table is a negligible part of the size.
* **param**: frequencies generated from two integers ``A, B`` by an exact integer rule (below),
  a discretised ``2^-(a|i| + b i^2)`` shape: Laplace (``b = 0``), Gaussian (``a = 0``), flat
  (``a = b = 0``) or flat-topped (``b < 0``). A few bytes whatever ``K`` is: best for the small
  tensors of small adapters, where an explicit table would cost 5-40 % of the tensor.

The serialised form and the param rule are specified in spec/sld-format.md part 2 (§13); everything in
this module that a decoder needs is integer arithmetic, so every implementation builds the same
frequencies. How the *encoder* picks a table (normalisation, fitting) is free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal, localcontext

import numpy as np

from .bitio import BitReader, BitstreamError, BitWriter, eg0_bits, zigzag

__all__ = [
    "FreqTable",
    "MAX_PRECISION",
    "MAX_SYMBOLS",
    "EXP2_TABLE",
    "explicit_table",
    "param_table",
    "fit_param_table",
    "PARAM_PRECISION",
    "best_table",
    "data_bits",
]

MAX_PRECISION = 15
MAX_SYMBOLS = 1 << 15
MAX_ABS_INDEX = (1 << 16) - 1  # |index| bound: keeps reconstruction exact in float32 (ecsq.py)
_PARAM_SHIFT_BITS = 4
_PARAM_MAX_ABS = 1 << 28  # |A|, |B| (after the shift): |E| < 2^28·(2^16 + 2^32) < 2^61, exact in int64


def _exp2_table() -> np.ndarray:
    """``T[j] = round(2^31 · 2^(-j/256))``, j = 0..255, computed to 60 digits (ties cannot occur:
    no entry is within 1e-20 of a half-integer; tests check this and the table's sum)."""
    out = []
    with localcontext() as ctx:
        ctx.prec = 60
        for j in range(256):
            v = Decimal(2) ** 31 * (Decimal(2) ** (Decimal(-j) / Decimal(256)))
            out.append(int(v.to_integral_value(rounding="ROUND_HALF_EVEN")))
    return np.array(out, dtype=np.int64)


EXP2_TABLE = _exp2_table()


@dataclass(frozen=True, eq=False)
class FreqTable:
    """A frequency table over indices ``imin .. imin + K - 1`` (see module docstring)."""

    kind: str  # "explicit" or "param"
    precision: int
    imin: int
    freqs: np.ndarray  # int64 (K,), sum == 2**precision
    a: int = 0  # param kind: A = a_mant << shift, B = b_mant << shift
    b: int = 0
    shift: int = 0

    @property
    def size(self) -> int:
        """K, the number of symbols."""
        return int(self.freqs.size)

    @property
    def imax(self) -> int:
        return self.imin + self.size - 1

    @property
    def cum(self) -> np.ndarray:
        c = np.zeros(self.size, dtype=np.int64)
        np.cumsum(self.freqs[:-1], out=c[1:])
        return c

    def write(self, bw: BitWriter) -> None:
        """Append the serialised table to ``bw`` (format in spec/sld-format.md part 2 (§13))."""
        bw.bits(1 if self.kind == "param" else 0, 1)
        bw.bits(self.precision - 1, 4)
        bw.seg0(self.imin)
        bw.seg0(self.imax + self.imin)  # asymmetry of the alphabet: small for ECSQ indices
        if self.kind == "param":
            bw.bits(self.shift, _PARAM_SHIFT_BITS)
            bw.seg0(self.a >> self.shift)
            bw.seg0(self.b >> self.shift)
            return
        z = _implied_symbol(self.freqs)
        bw.seg0(z - _anchor(self.imin, self.size))
        prev = 0
        for s in range(self.size):
            if s == z:
                continue
            v = int(self.freqs[s])
            _write_egk(bw, v, _adaptive_order(prev))
            prev = v

    def side_bits(self) -> int:
        """Length in bits of the serialised table."""
        bw = BitWriter()
        self.write(bw)
        return len(bw)

    @staticmethod
    def read(br: BitReader, max_symbols: int = MAX_SYMBOLS) -> "FreqTable":
        """Read a table written by :meth:`write`; raises :class:`BitstreamError` when invalid."""
        kind = "param" if br.bits(1) else "explicit"
        precision = br.bits(4) + 1
        if precision > MAX_PRECISION:
            raise BitstreamError(f"table precision {precision} exceeds {MAX_PRECISION}")
        imin = br.seg0(MAX_ABS_INDEX)
        imax = br.seg0(2 * MAX_ABS_INDEX) - imin
        k = imax - imin + 1
        if imax > MAX_ABS_INDEX or k < 1 or k > min(max_symbols, MAX_SYMBOLS):
            raise BitstreamError(f"table alphabet {imin}..{imax} is empty or too large")
        if kind == "param":
            if k > 1 << precision:
                raise BitstreamError(f"param table of {k} symbols needs precision > {precision}")
            shift = br.bits(_PARAM_SHIFT_BITS)
            a = br.seg0(_PARAM_MAX_ABS) << shift
            b = br.seg0(_PARAM_MAX_ABS) << shift
            if abs(a) > _PARAM_MAX_ABS or abs(b) > _PARAM_MAX_ABS:
                raise BitstreamError(f"param table A={a}, B={b} exceed ±2^28")
            return param_table(imin, k, precision, a, b, shift)
        z = br.seg0(MAX_SYMBOLS) + _anchor(imin, k)
        if not 0 <= z < k:
            raise BitstreamError(f"implied symbol {z} outside the alphabet of {k}")
        total = 1 << precision
        freqs = np.zeros(k, dtype=np.int64)
        fast = br.native_explicit(k, z, precision, freqs)
        if fast is not None:
            return FreqTable("explicit", precision, imin, freqs)
        prev = 0
        acc = 0
        for s in range(k):
            if s == z:
                continue
            v = _read_egk(br, _adaptive_order(prev), total)
            acc += v
            if acc >= total:
                raise BitstreamError(f"frequencies exceed 2^{precision} before the implied symbol")
            freqs[s] = v
            prev = v
        freqs[z] = total - acc
        return FreqTable("explicit", precision, imin, freqs)


def _anchor(imin: int, k: int) -> int:
    """The symbol of index 0 (clamped into the alphabet): where the implied peak usually is."""
    return min(max(-imin, 0), k - 1)


def _implied_symbol(freqs: np.ndarray) -> int:
    return int(np.argmax(freqs))  # first of the largest


def _adaptive_order(prev: int) -> int:
    """Exp-Golomb order for the next frequency: neighbouring frequencies are of similar size."""
    return max(0, prev.bit_length() - 2)


def _write_egk(bw: BitWriter, v: int, k: int) -> None:
    bw.eg0(v >> k)
    bw.bits(v & ((1 << k) - 1), k)


def _read_egk(br: BitReader, k: int, limit: int) -> int:
    hi = br.eg0(limit >> k)
    return (hi << k) | br.bits(k)


def _egk_bits(v: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Vectorised length of EGk codes."""
    q = (v >> k) + 1
    return 2 * np.floor(np.log2(q)).astype(np.int64) + 1 + k


# ------------------------------------------------------------------------------------------------
# Construction


def param_table(imin: int, k: int, precision: int, a: int, b: int, shift: int = 0) -> FreqTable:
    """The param table (exact integer rule of spec/sld-format.md §13.2).

    ``E_s = A·|i| + B·i²`` for ``i = imin + s``; ``e_s = (E_s - min E) >> 12`` (units of 1/256
    bit); ``w_s = T[e_s mod 256] >> (e_s div 256)`` (0 once the shift reaches 32);
    ``f_s = 1 + floor(w_s·(2^P-K)/W)`` with ``W = sum w``; the remaining ``R`` units go one each
    to the ``R`` symbols with the largest remainder ``w_s·(2^P-K) mod W`` (ties: lower s).
    """
    if not 1 <= precision <= MAX_PRECISION or not 1 <= k <= 1 << precision:
        raise ValueError(f"param table needs 1 <= K <= 2^P, P in 1..{MAX_PRECISION}; got K={k}, P={precision}")
    i = np.arange(imin, imin + k, dtype=np.int64)
    e_full = a * np.abs(i) + b * i * i
    e = (e_full - e_full.min()) >> 12
    sh = e >> 8
    w = np.where(sh < 32, EXP2_TABLE[e & 255] >> np.minimum(sh, 31), 0)
    total = 1 << precision
    spare = total - k
    wsum = int(w.sum())
    # w * spare <= 2^31 * 2^15 and wsum <= 2^15 * 2^31: exact in int64
    num = w * spare
    f = 1 + num // wsum
    rem = num % wsum
    r = total - int(f.sum())
    if r:
        order = np.lexsort((np.arange(k), -rem))
        f[order[:r]] += 1
    return FreqTable("param", precision, imin, f.astype(np.int64), a=a, b=b, shift=shift)


def explicit_table(counts: np.ndarray, imin: int, precision: int) -> FreqTable | None:
    """Explicit table for ``counts`` at ``precision``: every present symbol >= 1, near-optimal
    rounding of ``counts·2^P/n``; None if more symbols are present than ``2^P`` allows."""
    c = np.asarray(counts, dtype=np.int64)
    total = 1 << precision
    present = c > 0
    if int(present.sum()) > total or c.size > MAX_SYMBOLS:
        return None
    n = int(c.sum())
    f = np.where(present, np.maximum(1, np.rint(c * total / n)), 0).astype(np.int64)
    d = total - int(f.sum())
    if d:
        f = _fix_sum(c, f, d)
    return FreqTable("explicit", precision, imin, f)


def _fix_sum(c: np.ndarray, f: np.ndarray, d: int) -> np.ndarray:
    """Add (d > 0) or remove (d < 0) |d| units where each costs the fewest coded bits: in rounds
    of at most one unit per symbol, cheapest first (the marginal costs change little per unit)."""
    f = f.copy()
    cf = c.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return _fix_sum_loop(c, cf, f, d)


def _fix_sum_loop(c: np.ndarray, cf: np.ndarray, f: np.ndarray, d: int) -> np.ndarray:
    while d:
        if d > 0:
            gain = np.where(c > 0, cf * np.log2((f + 1) / np.maximum(f, 1)), -np.inf)
            m = min(d, int((c > 0).sum()))
            pick = np.argpartition(-gain, m - 1)[:m]
            f[pick] += 1
            d -= m
        else:
            loss = np.where((c > 0) & (f > 1), cf * np.log2(f / np.maximum(f - 1, 1)), np.inf)
            m = min(-d, int(np.isfinite(loss).sum()))
            pick = np.argpartition(loss, m - 1)[:m]
            f[pick] -= 1
            d += m
    return f


def data_bits(table: FreqTable, counts: np.ndarray) -> float:
    """Ideal code length (bits) of symbols with these ``counts`` under ``table``: the coded-index
    bound without side information. Infinite if a present symbol has frequency 0."""
    c = np.asarray(counts, dtype=np.float64)
    f = table.freqs
    if np.any((c > 0) & (f == 0)):
        return math.inf
    nz = c > 0
    return float(np.sum(c[nz] * (table.precision - np.log2(f[nz]))))


def _explicit_side_bits_fast(f: np.ndarray, imin: int) -> int:
    """side_bits() of an explicit table without building the bit string (vectorised)."""
    k = f.size
    z = _implied_symbol(f)
    rest = np.delete(f, z)
    prev = np.concatenate([[0], rest[:-1]])
    order = np.maximum(0, np.floor(np.log2(np.maximum(prev, 1))).astype(np.int64) + 1 - 2)
    order[prev == 0] = 0
    head = 1 + 4 + eg0_bits(zigzag(imin)) + eg0_bits(zigzag(2 * imin + k - 1))
    head += eg0_bits(zigzag(z - _anchor(imin, k)))
    return int(head + _egk_bits(rest, order).sum())


PRECISION_GAIN = 5e-4  # relative size gain a higher explicit-table precision must bring
PARAM_PRECISION = 14  # a param table's side bits do not depend on P: use a high one (decode
# speed and coding efficiency, ~1e-4 at 14, are what bound it)


def _param_side_bits(imin: int, k: int, a: int, b: int, shift: int) -> int:
    return (1 + 4 + eg0_bits(zigzag(imin)) + eg0_bits(zigzag(2 * imin + k - 1)) + _PARAM_SHIFT_BITS
            + eg0_bits(zigzag(a >> shift)) + eg0_bits(zigzag(b >> shift)))


def fit_param_table(counts: np.ndarray, imin: int, precision: int = PARAM_PRECISION) -> FreqTable | None:
    """The param table at ``precision`` that codes ``counts`` in the fewest bits (table included):
    a maximum-likelihood fit of (a, b), then the coarseness of A and B (a shared power-of-two
    unit) and ±1 unit around the rounded fit."""
    c = np.asarray(counts, dtype=np.float64)
    k = c.size
    if k > 1 << precision:
        return None
    i = np.arange(imin, imin + k, dtype=np.float64)
    a, b = _ml_fit(c, i)
    top = max(abs(a), abs(b)) * 2.0**20
    hi = max(0, min(15, int(math.log2(top)) if top >= 1 else 0))

    def build(ma: int, mb: int, shift: int) -> tuple[float, FreqTable | None]:
        if abs(ma) > _PARAM_MAX_ABS or abs(mb) > _PARAM_MAX_ABS:
            return math.inf, None
        t = param_table(imin, k, precision, ma, mb, shift)
        return data_bits(t, c) + _param_side_bits(imin, k, ma, mb, shift), t

    best_bits, best, best_shift = math.inf, None, 0
    for shift in range(max(0, hi - 8), hi + 1, 2):
        unit = float(1 << shift)
        bits, t = build(int(round(a * 2.0**20 / unit)) << shift, int(round(b * 2.0**20 / unit)) << shift, shift)
        if bits < best_bits:
            best_bits, best, best_shift = bits, t, shift
    for shift in (best_shift - 1, best_shift + 1):
        if 0 <= shift <= 15:
            unit = float(1 << shift)
            bits, t = build(int(round(a * 2.0**20 / unit)) << shift, int(round(b * 2.0**20 / unit)) << shift, shift)
            if bits < best_bits:
                best_bits, best, best_shift = bits, t, shift
    if best is None:
        return None
    am, bm = best.a >> best_shift, best.b >> best_shift
    for da, db in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        bits, t = build((am + da) << best_shift, (bm + db) << best_shift, best_shift)
        if bits < best_bits:
            best_bits, best = bits, t
    return best


def _ml_fit(c: np.ndarray, i: np.ndarray) -> tuple[float, float]:
    """Maximum-likelihood (a, b) of p(i) ∝ 2^-(a|i| + b i²) on the alphabet: Newton's method on
    the (convex) negative log-likelihood of this exponential family, with backtracking."""
    n = c.sum()
    feats = np.stack([np.abs(i), i * i])
    scale = np.maximum(feats.max(axis=1), 1.0)
    fs = feats / scale[:, None]
    ts = fs @ c / n

    def nll(th: np.ndarray) -> float:
        lp = -th @ fs
        m = lp.max()
        return float(th @ ts + m + np.log(np.exp(lp - m).sum()))

    th = np.zeros(2)
    cur = nll(th)
    for _ in range(100):
        lp = -th @ fs
        p = np.exp(lp - lp.max())
        p /= p.sum()
        mean = fs @ p
        cov = (fs * p) @ fs.T - np.outer(mean, mean)
        grad = ts - mean
        try:
            step = np.linalg.solve(cov + 1e-12 * np.eye(2), grad)
        except np.linalg.LinAlgError:
            break
        t = 1.0
        while t > 1e-6:
            cand = th - t * step
            val = nll(cand)
            if np.isfinite(val) and val <= cur:
                break
            t *= 0.5
        else:
            break
        done = cur - val < 1e-12 * max(1.0, abs(cur))
        th, cur = cand, val
        if done:
            break
    nat = th / scale / np.log(2)
    return float(nat[0]), float(nat[1])


def best_table(counts: np.ndarray, imin: int, kinds: tuple[str, ...] = ("explicit", "param")) -> FreqTable:
    """The table (kind and precision) that codes ``counts`` in the fewest bits, table included.

    ``counts``: occurrences of each index ``imin .. imin + len(counts) - 1``; the first and last
    must be non-zero (the alphabet is the indices' range).
    """
    c = np.asarray(counts, dtype=np.int64)
    if c.ndim != 1 or c.size == 0 or c.size > MAX_SYMBOLS or c[0] == 0 or c[-1] == 0:
        raise ValueError("counts must be a non-empty 1-D histogram whose first and last entries are non-zero")
    k = c.size
    if k == 1:
        # one symbol: f = 2^P codes it in 0 bits at any precision
        return FreqTable("explicit", 1, imin, np.array([2], dtype=np.int64))
    present = int((c > 0).sum())
    best: FreqTable | None = None
    best_bits = math.inf
    p_lo = max(1, math.ceil(math.log2(present)))
    if "explicit" in kinds:
        for p in range(p_lo, MAX_PRECISION + 1):
            t = explicit_table(c, imin, p)
            if t is None:
                continue
            bits = data_bits(t, c) + _explicit_side_bits_fast(t.freqs, imin)
            # a higher precision must pay for its bigger decoder table (2^P entries, cache
            # misses past 2^13): take it only for a gain of 0.05 % or more
            if bits < best_bits * (1.0 - PRECISION_GAIN) or best is None:
                best, best_bits = t, bits
    # a param table saves at most the explicit table's side bits: skip the fit when those are
    # already negligible (large tensors)
    cheap = best is not None and _explicit_side_bits_fast(best.freqs, imin) <= 0.002 * best_bits
    if "param" in kinds and k <= 1 << PARAM_PRECISION and not cheap:
        t = fit_param_table(c, imin)
        if t is not None:
            bits = data_bits(t, c) + _param_side_bits(imin, k, t.a, t.b, t.shift)
            if bits < best_bits:
                best, best_bits = t, bits
    if best is None:
        raise ValueError(f"no table kind in {kinds} can code {k} symbols")
    return best
