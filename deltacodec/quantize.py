"""Per-tensor scalar quantization to a stored codebook (spec/sld-format.md, "Codebooks").

A codebook tensor stores ``2**bits`` float16 values ``c16`` and one float32 ``scale``; its values
are ``float32(c16) * scale``. Storing centroids relative to the tensor's largest centroid keeps
full float16 precision however small the adapter's values are (a freshly trained lora_B holds
values near 1e-5, where plain float16 is subnormal).

The float16 entries carry 11 significant bits. On trained adapter tensors that costs well under
0.1% of SSE at 1-6 bits (tests/test_quantize.py). It costs more on tensors whose optimal
centroids are closer together than 2^-11 of their magnitude: a few isolated values 1000x the
bulk (+1-40% SSE at 7-8 bits, measured on 7k-20k values) or tight clusters far from zero (+1-10%
at 4-6 bits). Storing float32 entries would fix those at 2 more bytes per entry, which by the
high-rate rule dD/D = 2·ln2·dR only pays when the loss exceeds 2·ln2·16·2^bits/n (9% for a
65536-value tensor at 8 bits), so the format keeps float16.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import EncodeError
from .format import dequantize_codebook

__all__ = ["Quantized", "quantize", "QUANTIZERS"]

QUANTIZERS = ("kmeans", "uniform")


@dataclass(frozen=True)
class Quantized:
    """A quantized tensor: ``codebook[indices]`` is its reconstruction (float32, flat)."""

    indices: np.ndarray  # uint8, flat, row-major
    codebook_f16: bytes  # 2**bits little-endian float16
    codebook_scale: float  # a float32 value, >= 0
    bits: int
    quantizer: str

    @property
    def codebook(self) -> np.ndarray:
        return dequantize_codebook(self.codebook_f16, self.codebook_scale)


def _assign(values: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """Nearest codebook entry of each value; a value exactly between two goes to the lower one."""
    cb = codebook.astype(np.float64)
    mid = (cb[:-1] + cb[1:]) * 0.5
    return np.searchsorted(mid, values, side="left").astype(np.uint8)


def _store(centroids: np.ndarray) -> tuple[bytes, float, np.ndarray]:
    top = float(np.max(np.abs(centroids))) if centroids.size else 0.0
    scale = float(np.float32(top))
    if scale == 0.0:
        c16 = np.zeros(centroids.size, dtype="<f2")
    else:
        c16 = (centroids / scale).astype("<f2")
    # float16 rounding is monotone, so the stored codebook stays sorted.
    return c16.tobytes(), scale, dequantize_codebook(c16.tobytes(), scale)


def quantize(values: np.ndarray, bits: int, quantizer: str = "kmeans") -> Quantized:
    """Quantize a tensor (any shape, finite floats) to a ``2**bits``-entry codebook.

    ``kmeans``: Lloyd-optimal 1-D k-means centroids (near the exact optimum, see
    :mod:`deltacodec.kmeans`). ``uniform``: ``2**bits`` evenly spaced levels from min to max.
    After rounding the codebook to its stored form, values are re-assigned to the nearest stored
    entry and each entry is re-centred on its cell's mean, until stable, so the stored codebook
    itself is (to float16 precision) a Lloyd fixed point.
    """
    if not 1 <= bits <= 8:
        raise EncodeError(f"bits must be 1..8 for a codebook, got {bits}")
    if quantizer not in QUANTIZERS:
        raise EncodeError(f"unknown quantizer '{quantizer}', expected one of {', '.join(QUANTIZERS)}")
    x = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    k = 1 << bits
    if quantizer == "kmeans":
        from .kmeans import kmeans_1d

        cent = np.asarray(kmeans_1d(x, k), dtype=np.float64)
    else:
        lo, hi = float(x.min()), float(x.max())
        cent = np.linspace(lo, hi, k) if hi > lo else np.full(k, lo)
    cb_bytes, scale, cb = _store(cent)
    idx = _assign(x, cb)
    if quantizer == "kmeans" and scale > 0:
        x64 = x.astype(np.float64)
        for _ in range(4):
            cnt = np.bincount(idx, minlength=k)
            sums = np.bincount(idx, weights=x64, minlength=k)
            new = cent.copy()
            nz = cnt > 0
            new[nz] = sums[nz] / cnt[nz]
            new16 = (new / scale).astype("<f2")
            if new16.tobytes() == cb_bytes:
                break
            new16 = np.sort(new16)
            cb_bytes = new16.tobytes()
            cb = dequantize_codebook(cb_bytes, scale)
            cent = new
            new_idx = _assign(x, cb)
            if np.array_equal(new_idx, idx):
                break
            idx = new_idx
    return Quantized(idx, cb_bytes, scale, bits, quantizer)
