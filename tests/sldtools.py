"""Test helpers: an independent bit packer and a raw container builder for crafting bad files.

Written plainly and separately from deltacodec's own code so the tests check the code against
the spec, not against itself.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

import msgpack
import numpy as np
import zstandard

MAGIC = b"\x89SLD\r\n\x1a\n"


def ref_pack(indices: list[int], width: int) -> bytes:
    """Spec section 5, bit by bit: stream bit j is bit j%8 of byte j//8; field i LSB-first."""
    nbits = len(indices) * width
    out = bytearray((nbits + 7) // 8)
    for i, v in enumerate(indices):
        for t in range(width):
            if (v >> t) & 1:
                j = i * width + t
                out[j // 8] |= 1 << (j % 8)
    return bytes(out)


def ref_unpack(data: bytes, n: int, width: int) -> list[int]:
    vals = []
    for i in range(n):
        v = 0
        for t in range(width):
            j = i * width + t
            v |= ((data[j // 8] >> (j % 8)) & 1) << t
        vals.append(v)
    return vals


def f16_codebook(values: list[float]) -> bytes:
    return np.asarray(values, dtype="<f2").tobytes()


def codebook_tensor(shape, bits, width, indices, codebook16, scale=1.0, compression="none", level=3):
    payload = ref_pack(list(indices), width)
    section = payload
    if compression == "zstd":
        section = zstandard.ZstdCompressor(level=level).compress(payload)
    t = {
        "shape": list(shape),
        "encoding": "codebook",
        "bits": bits,
        "width": width,
        "quantizer": "kmeans",
        "codebook": codebook16,
        "codebook_scale": float(scale),
        "compression": compression,
    }
    return t, section


def raw_tensor(values: np.ndarray, dtype: str = "F32"):
    arr = np.asarray(values)
    if dtype == "BF16":
        payload = (arr.astype(np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
    else:
        payload = arr.astype({"F16": "<f2", "F32": "<f4", "F64": "<f8"}[dtype]).tobytes()
    return {"shape": list(arr.shape), "encoding": "raw", "dtype": dtype, "compression": "none"}, payload


def assemble(
    modules: list[dict[str, Any]],
    tensors: list[dict[str, Any]],
    sections: list[bytes],
    *,
    metadata: dict[str, Any] | None = None,
    version: int = 1,
    magic: bytes = MAGIC,
    header_obj: Any = None,
    fix_offsets: bool = True,
) -> bytes:
    """Build a file from header maps (tensor maps without offset/length/crc) and sections.

    Offsets, lengths and CRCs are filled in (in section order) unless already present, so a test
    can corrupt exactly one thing and leave the rest valid.
    """
    it = iter(sections)
    pos = 0

    def fill(t: dict[str, Any]) -> None:
        nonlocal pos
        sec = next(it)
        if fix_offsets:
            t.setdefault("offset", pos)
            t.setdefault("length", len(sec))
            t.setdefault("crc32", zlib.crc32(sec))
        pos += len(sec)

    for m in modules:
        fill(m["A"])
        fill(m["B"])
    for t in tensors:
        fill(t)
    if header_obj is None:
        header_obj = {"metadata": metadata or {}, "modules": modules, "tensors": tensors}
    raw = msgpack.packb(header_obj, use_bin_type=True)
    return header_bytes_file(zstandard.ZstdCompressor(level=3).compress(raw), b"".join(sections), version, magic)


def header_bytes_file(header: bytes, data: bytes, version: int = 1, magic: bytes = MAGIC) -> bytes:
    return struct.pack("<8sIII", magic, version, len(header), zlib.crc32(header)) + header + data


def lora_module(name="m", out_f=3, in_f=5, rank=2, kind="lora", **extra):
    m = {
        "name": name,
        "kind": kind,
        "out_features": out_f,
        "in_features": in_f,
        "rank": rank,
        "scale": 2.0,
    }
    if kind == "sine":
        m["omega"] = 100.0
        m["gamma"] = float(np.sqrt(in_f))
    m["fan_in_fan_out"] = False
    m.update(extra)
    return m


def simple_file(kind: str = "lora", compression: str = "none", **module_overrides) -> tuple[bytes, dict]:
    """A valid small file: one module (out 3, in 5, rank 2), 2-bit codebooks."""
    rng = np.random.default_rng(7)
    m = lora_module(kind=kind, **module_overrides)
    cb = f16_codebook([-1.0, -0.25, 0.25, 1.0])
    a_idx = rng.integers(0, 4, 10)
    b_idx = rng.integers(0, 4, 6)
    ta, sa = codebook_tensor((2, 5), 2, 2, a_idx, cb, 0.5, compression)
    tb, sb = codebook_tensor((3, 2), 2, 2, b_idx, cb, 0.125, compression)
    m["A"], m["B"] = ta, tb
    data = assemble([m], [], [sa, sb])
    return data, {"a_idx": a_idx, "b_idx": b_idx}
