"""16-bit floats, then a lossless byte coder: fp16/bf16 + zstd, fp16/bf16 + zipnn.

The reconstruction is the tensor rounded to the 16-bit type (round to nearest even, as torch
and numpy do); the bytes are the coder's output for the 16-bit words. ``Coded.exact`` says
whether that output decodes back to the same 16-bit words (checked here, every time).
"""

from __future__ import annotations

import numpy as np
import zstandard

from . import Coded

__all__ = ["DTYPES", "to16", "from16", "code_zstd", "code_zipnn", "zipnn_version"]

DTYPES = ("fp16", "bf16")


def to16(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 → uint16 bit patterns of fp16 or bf16 (round to nearest, ties to even)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if dtype == "fp16":
        return x.astype(np.float16).view(np.uint16)
    if dtype == "bf16":
        u = x.view(np.uint32).astype(np.uint64)
        rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16  # finite inputs: adapters hold no NaN
        return rounded.astype(np.uint16).reshape(x.shape)
    raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")


def from16(bits: np.ndarray, dtype: str) -> np.ndarray:
    """uint16 bit patterns → float32 values."""
    b = np.ascontiguousarray(bits, dtype=np.uint16)
    if dtype == "fp16":
        return b.view(np.float16).astype(np.float32)
    if dtype == "bf16":
        return (b.astype(np.uint32) << 16).view(np.float32)
    raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")


def code_zstd(x: np.ndarray, dtype: str, level: int = 19) -> Coded:
    bits = to16(x, dtype)
    raw = bits.tobytes()
    out = zstandard.ZstdCompressor(level=level).compress(raw)
    exact = zstandard.ZstdDecompressor().decompress(out) == raw
    return Coded(x_hat=from16(bits, dtype), nbytes=len(out), exact=exact)


def zipnn_version() -> str | None:
    try:
        from importlib.metadata import version

        import zipnn  # noqa: F401

        return version("zipnn")
    except Exception:  # not installed, or its native part fails to load
        return None


def code_zipnn(x: np.ndarray, dtype: str) -> Coded:
    """fp16/bf16 words through ``zipnn.ZipNN`` (byte input, one thread)."""
    from zipnn import ZipNN

    bits = to16(x, dtype)
    raw = bits.tobytes()
    z = ZipNN(input_format="byte", bytearray_dtype={"fp16": "float16", "bf16": "bfloat16"}[dtype], threads=1)
    out = bytes(z.compress(raw))
    back = bytes(z.decompress(out))
    return Coded(x_hat=from16(bits, dtype), nbytes=len(out), exact=back == raw)
