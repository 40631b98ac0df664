"""QLoRA's 4-bit NormalFloat (NF4), written from the paper's definition (Dettmers et al. 2023, §3
and appendix E), not from bitsandbytes.

Levels: quantiles of the standard normal, made asymmetric so that 0 is a level: 8 positive
levels at the quantiles of probabilities evenly spaced from ``1 - δ`` down to (not including)
1/2, 7 negative levels the same way, and 0; all divided by the largest so they span [-1, 1].
``δ = (1/32 + 1/30) / 2`` keeps the extreme quantile finite (half the spacing of 32 and of 30
evenly spaced probabilities, the paper's choice for the two halves).

Coding: the flattened tensor (storage order, as bitsandbytes quantizes any tensor) in blocks of
64; each block stores its absmax and one 4-bit level index per value (x / absmax to the nearest
level). Absmax: float32 (4.5 bits/param), or double-quantized (``dq``): the block absmaxes minus
their mean, in groups of 256, as int8 with one float32 scale per group, plus the float32 mean
(4 + 8/64 + 32/(64·256) bits/param). The paper stores the second level as FP8; a linear int8 is
used here (stated, not hidden: it only changes how the absmaxes round).
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

from . import Coded

__all__ = ["nf4_levels", "BLOCK", "DQ_GROUP", "code_nf4"]

BLOCK = 64
DQ_GROUP = 256


def nf4_levels() -> np.ndarray:
    """The 16 NF4 levels, ascending, float32: exactly one 0, ends at -1 and 1."""
    delta = 0.5 * (1 / 32 + 1 / 30)
    inv = NormalDist().inv_cdf
    pos = [inv(p) for p in np.linspace(1 - delta, 0.5, 9)[:-1]]  # 8 positive
    neg = [-inv(p) for p in np.linspace(1 - delta, 0.5, 8)[:-1]]  # 7 negative
    v = np.array(sorted(pos + neg + [0.0]), dtype=np.float64)
    return (v / v.max()).astype(np.float32)


def _nearest(u: np.ndarray, levels: np.ndarray) -> np.ndarray:
    mids = (levels[1:] + levels[:-1]) / 2
    return np.searchsorted(mids, u).astype(np.uint8)  # ties go to the upper level


def _double_quantize(absmax: np.ndarray) -> tuple[np.ndarray, int]:
    """(reconstructed absmaxes, their bytes) for the dq variant."""
    mean = np.float32(absmax.mean())
    d = (absmax - mean).astype(np.float32)
    pad = (-d.size) % DQ_GROUP
    g = np.concatenate([d, np.zeros(pad, np.float32)]).reshape(-1, DQ_GROUP)
    scale = (np.abs(g).max(axis=1) / 127).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1))
    q = np.clip(np.rint(g / safe[:, None]), -127, 127).astype(np.int8)
    rec = (q.astype(np.float32) * scale[:, None]).reshape(-1)[: d.size] + mean
    return rec.astype(np.float32), absmax.size + 4 * scale.size + 4


def code_nf4(x: np.ndarray, double_quant: bool = False) -> Coded:
    """NF4 of a float32 tensor of any shape; ``Coded.nbytes`` = packed 4-bit indices (two per
    byte, padding included) + absmax storage."""
    x = np.asarray(x, dtype=np.float32)
    flat = x.reshape(-1)
    pad = (-flat.size) % BLOCK
    blocks = np.concatenate([flat, np.zeros(pad, np.float32)]).reshape(-1, BLOCK)
    absmax = np.abs(blocks).max(axis=1).astype(np.float32)
    if double_quant:
        scale, side = _double_quantize(absmax)
    else:
        scale, side = absmax, 4 * absmax.size
    levels = nf4_levels()
    safe = np.where(scale > 0, scale, np.float32(1))
    idx = _nearest(blocks / safe[:, None], levels)
    x_hat = (levels[idx] * scale[:, None]).reshape(-1)[: flat.size].reshape(x.shape)
    nbytes = math.ceil(blocks.size / 2) + side
    return Coded(x_hat=x_hat.astype(np.float32), nbytes=int(nbytes), pad=pad)
