"""Least-squares refit of B against the quantized A.

The receiver uses the product, not the factors: once A is quantized to Â, the B that best
reproduces B·A is ``argmin_X ‖X·Â - B·A‖_F = B·(AÂᵀ)·(ÂÂᵀ)⁺``, an r×r solve (O((out+in)·r²)).
For sine modules the same fit is made on the pre-activation product B·A, which the sine is
applied to. B is refitted *before* it is quantized, so its quantization error is not undone.

``ÂÂᵀ`` is singular when Â has a zero row (every value of a rank component rounded to 0) or
rows in proportion; the pseudo-inverse drops directions whose eigenvalue is below ``rcond``
times the largest, so B gets no weight along them (nothing in Â to reproduce there).
"""

from __future__ import annotations

import numpy as np

__all__ = ["refit_b"]


def refit_b(A: np.ndarray, B: np.ndarray, A_hat: np.ndarray, rcond: float = 1e-10) -> np.ndarray:
    """B_fit (out×r, float32) minimising ‖B_fit·Â - B·A‖_F. Shapes: A, Â r×in; B out×r."""
    A64 = np.asarray(A, dtype=np.float64)
    Ah = np.asarray(A_hat, dtype=np.float64)
    B64 = np.asarray(B, dtype=np.float64)
    gram = Ah @ Ah.T  # r×r, symmetric PSD
    cross = A64 @ Ah.T  # r×r
    w, v = np.linalg.eigh(gram)
    top = float(w.max()) if w.size else 0.0
    if top <= 0.0:
        return np.zeros_like(np.asarray(B, dtype=np.float32))
    keep = w > rcond * top
    inv = (v[:, keep] / w[keep]) @ v[:, keep].T
    return (B64 @ (cross @ inv)).astype(np.float32)
