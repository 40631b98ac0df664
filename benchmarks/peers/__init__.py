"""Peers of deltacodec for ``benchmarks/bench_peers.py``: what a user would ship instead.

One module per family, each turning a float32 tensor into (its reconstruction, its bytes):
``gguf_quants`` (GGUF Q2_K..Q8_0 blocks), ``nf4`` (QLoRA's 4-bit NormalFloat), ``lossless``
(fp16/bf16 + zstd or zipnn); ``compare`` holds the curve arithmetic (Pareto fronts, equal-error
byte ratios).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Coded"]


@dataclass
class Coded:
    """One tensor through a peer: ``x_hat`` the float32 reconstruction (same shape as the input),
    ``nbytes`` the serialized payload (blocks, scales, compressed stream: no container),
    ``pad`` how many of the coded values were padding (block alignment), ``exact`` whether the
    stored values decode back bit for bit (lossless coders; ``None`` for lossy ones)."""

    x_hat: np.ndarray
    nbytes: int
    pad: int = 0
    exact: bool | None = None
    payload: np.ndarray | None = None  # the serialized bytes where a container is measured (GGUF)
