"""Tensors for container version 2: quantized (ECSQ or k-means, rANS-coded) and lossless float
field streams (16-bit, and float32 under the extension ``f32_fields``).

Each function returns a tensor dict for :func:`deltacodec.format.build_container` (version 2):
``encoding`` ``"q"`` or ``"f"``, ``side`` (the side information bytes, sideinfo.py) and
``section`` (the rANS stream, plus stored field streams for ``"f"``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import bytegroup, rans
from .bitio import BitWriter
from .errors import EncodeError
from .freqtable import best_table
from .quantize import quantize
from .ratecontrol import CodedTensor
from .sideinfo import MAX_SYMBOLS_Q, write_fields

__all__ = ["coded_tensor", "kmeans_tensor", "lossless_tensor", "lossless_dtype", "exact_dtypes", "f16_tensor",
           "smallest_exact_tensor"]

_F16_MAX = 65504.0


def coded_tensor(t: CodedTensor, lanes: int, stream: bytes | None = None) -> dict[str, Any]:
    """A rate-controlled tensor (ratecontrol.CodedTensor) as a version-2 quantized tensor
    (``stream``: its indices already coded with ``lanes`` lanes)."""
    if t.table.size > MAX_SYMBOLS_Q:
        raise EncodeError(f"tensor '{t.name}': {t.table.size} quantizer levels, over the cap of {MAX_SYMBOLS_Q}")
    bw = BitWriter()
    t.write_side_info(bw)
    section = stream if stream is not None else rans.encode([(np.asarray(t.indices, dtype=np.int32), t.table)],
                                                             lanes=lanes)
    return {"shape": t.shape, "encoding": "q", "side": bw.getvalue(), "section": section,
            "method": t.method, "values": t.values}


def kmeans_tensor(values: np.ndarray, name: str, bits: int, quantizer: str, lanes: int) -> dict[str, Any]:
    """k-means (or uniform) at ``bits`` exactly as :func:`deltacodec.quantize.quantize` makes it,
    the indices rANS-coded under their own table; ``values``: float32, any shape."""
    q = quantize(values, bits, quantizer)
    idx = q.indices.astype(np.int32).reshape(-1)
    c = np.bincount(idx, minlength=1 << bits)
    nz = np.flatnonzero(c)
    lo, hi = int(nz[0]), int(nz[-1])
    table = best_table(c[lo:hi + 1], lo)
    t = CodedTensor(name, tuple(values.shape), "kmeans", idx, table, q.codebook[idx].astype(np.float32),
                    codebook_f16=q.codebook_f16, codebook_scale=q.codebook_scale)
    return coded_tensor(t, lanes)


def lossless_dtype(values: np.ndarray) -> str | None:
    """``"BF16"`` when every float32 value is exactly a bfloat16 (a bf16 source widened), else
    ``"F16"`` when every value is exactly a float16, else None (an fp32 source)."""
    exact = exact_dtypes(values)
    return exact[0] if exact else None


def exact_dtypes(values: np.ndarray) -> list[str]:
    """The 16-bit dtypes that hold every float32 value of ``values`` exactly, bit for bit (±0 and
    subnormals included): ``"BF16"`` and/or ``"F16"``, in that order; empty for a tensor that
    needs float32."""
    x = np.ascontiguousarray(values, dtype=np.float32)
    out = []
    if not (x.view(np.uint32) & np.uint32(0xFFFF)).any():
        out.append("BF16")
    with np.errstate(over="ignore"):
        back = x.astype(np.float16).astype(np.float32)
    if np.array_equal(back.view(np.uint32), x.view(np.uint32)):
        out.append("F16")
    return out


def lossless_tensor(values: np.ndarray, dtype: str, lanes: int) -> dict[str, Any]:
    """A float32 tensor whose values are exactly ``dtype`` (F16/BF16; F32 always), stored
    bit-exact as field streams (bytegroup): rANS-coded fields first, then the stored ones."""
    x = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    if dtype == "BF16":
        bits = (x.view(np.uint32) >> np.uint32(16)).astype(np.uint16)
    elif dtype == "F32":
        bits = x.view(np.uint32)
    else:
        bits = x.astype(np.float16).view(np.uint16)
    g = bytegroup.encode_fields(bits, dtype, lanes=lanes)
    return {"shape": tuple(values.shape), "encoding": "f", "side": write_fields(dtype, list(g.tables)),
            "section": g.stream + b"".join(g.raw), "dtype": dtype}


def smallest_exact_tensor(values: np.ndarray, lanes: int) -> dict[str, Any]:
    """``values`` (float32, any shape, finite) bit-exact in their smallest exact form (what
    ``bits=32`` stores): BF16 or F16 fields when every value is exactly one of them (the smaller
    coded size when both are; ties: BF16), otherwise F32 fields (extension ``f32_fields``)."""
    cands = [lossless_tensor(values, dt, lanes) for dt in exact_dtypes(values)]
    if not cands:
        return lossless_tensor(values, "F32", lanes)
    return min(cands, key=lambda t: len(t["section"]) + len(t["side"]))  # min keeps the first of equals


def f16_tensor(values: np.ndarray, name: str, lanes: int) -> dict[str, Any]:
    """float32 values rounded to float16 (what version 1's ``--bits 16`` stores), field-coded."""
    peak = float(np.max(np.abs(values))) if values.size else 0.0
    if peak > _F16_MAX:
        raise EncodeError(f"tensor '{name}': |value| up to {peak:g} does not fit float16 (--bits 16)")
    return lossless_tensor(np.asarray(values, dtype=np.float32).astype(np.float16).astype(np.float32), "F16", lanes)
