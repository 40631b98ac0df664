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


# --- zstd frames made by hand (RFC 8878), so a test controls every header bit -----------------


def zstd_frame(
    parts: list[tuple],
    *,
    content_size: int | None = -1,
    window_log: int = 17,
    single_segment: bool = False,
    checksum: bytes | None = None,
    dict_id: int | None = None,
    reserved_bit: bool = False,
    magic: int = 0xFD2FB528,
) -> bytes:
    """One zstd frame of raw and RLE blocks: ``parts`` are ("raw", bytes) or ("rle", byte, count)
    (raw parts are cut into blocks of at most 128 KiB, RLE parts likewise). ``content_size`` -1
    declares the true size, None declares none. ``checksum``: 4 bytes to append (and the flag)."""
    blocks = []
    total = 0
    for p in parts:
        if p[0] == "raw":
            data = p[1]
            for i in range(0, max(len(data), 1), 1 << 17):
                chunk = data[i:i + (1 << 17)]
                blocks.append((0, chunk, len(chunk)))
            total += len(data)
        else:
            _, byte, count = p
            while count:
                n = min(count, 1 << 17)
                blocks.append((1, bytes([byte]), n))
                count -= n
                total += n
    declared = total if content_size == -1 else content_size
    if declared is None:
        fcs_flag, fcs = 0, b""
    elif declared < 256 and single_segment:
        fcs_flag, fcs = 0, bytes([declared])
    else:
        fcs_flag, fcs = 3, struct.pack("<Q", declared)
    fhd = fcs_flag << 6 | (single_segment << 5) | (reserved_bit << 3) | ((checksum is not None) << 2)
    out = bytearray(struct.pack("<I", magic))
    did = b""
    if dict_id is not None:
        fhd |= 3
        did = struct.pack("<I", dict_id)
    out.append(fhd)
    if not single_segment:
        out.append((window_log - 10) << 3)
    out += did + fcs
    for i, (btype, body, size) in enumerate(blocks):
        last = i == len(blocks) - 1
        out += ((size << 3) | (btype << 1) | last).to_bytes(3, "little") + body
    if not blocks:
        out += (1).to_bytes(3, "little")  # one empty last raw block
    if checksum is not None:
        out += checksum
    return bytes(out)


def wide_pack(obj: Any) -> bytes:
    """msgpack with the widest encoding of everything (map 32, array 32, str 32, bin 32, uint 64 /
    int 64, float 64): what a reader must accept as readily as the compact forms."""
    if obj is None:
        return b"\xc0"
    if obj is True or obj is False:
        return b"\xc3" if obj else b"\xc2"
    if isinstance(obj, int):
        return b"\xcf" + struct.pack(">Q", obj) if obj >= 0 else b"\xd3" + struct.pack(">q", obj)
    if isinstance(obj, float):
        return b"\xcb" + struct.pack(">d", obj)
    if isinstance(obj, str):
        b = obj.encode()
        return b"\xdb" + struct.pack(">I", len(b)) + b
    if isinstance(obj, (bytes, bytearray)):
        return b"\xc6" + struct.pack(">I", len(obj)) + bytes(obj)
    if isinstance(obj, (list, tuple)):
        return b"\xdd" + struct.pack(">I", len(obj)) + b"".join(wide_pack(v) for v in obj)
    if isinstance(obj, dict):
        return b"\xdf" + struct.pack(">I", len(obj)) + b"".join(wide_pack(k) + wide_pack(v) for k, v in obj.items())
    raise TypeError(type(obj))


def file_from_header(header_obj: Any, sections: list[bytes], *, packer=None, frame=None) -> bytes:
    """A file from a complete header object (offsets etc. already in it), packed by ``packer``
    (default msgpack-python) into a hand-made raw-block zstd frame (default)."""
    raw = (packer or (lambda o: msgpack.packb(o, use_bin_type=True)))(header_obj)
    hdr = (frame or (lambda b: zstd_frame([("raw", b)])))(raw)
    return header_bytes_file(hdr, b"".join(sections))


def parse_file(data: bytes) -> tuple[dict, list[bytes]]:
    """The header object and the sections of a valid file (to change one thing and rebuild)."""
    (hlen,) = struct.unpack_from("<I", data, 12)
    header = msgpack.unpackb(zstandard.ZstdDecompressor().decompress(data[20:20 + hlen], max_output_size=1 << 26),
                             raw=False)
    base = 20 + hlen
    items = [m[k] for m in header["modules"] for k in ("A", "B")] + header["tensors"]
    sections = [data[base + t["offset"]: base + t["offset"] + t["length"]] for t in items]
    return header, sections


def relayout(header: dict, sections: list[bytes]) -> dict:
    """Recompute offsets, lengths and CRCs of ``header`` for ``sections`` (in section order)."""
    items = [m[k] for m in header["modules"] for k in ("A", "B")] + header["tensors"]
    pos = 0
    for t, s in zip(items, sections):
        t["offset"], t["length"], t["crc32"] = pos, len(s), zlib.crc32(s)
        pos += len(s)
    return header


def bomb_file(numel: int = 1 << 30) -> bytes:
    """The issue's bomb, valid under the spec: one module whose lora_A is ``numel`` 8-bit indices
    (all 0) stored as one zstd frame of RLE blocks: a ``numel``-byte payload in 4 bytes per
    128 KiB (2^30: 34 KB of file, 1 GiB of payload, 4 GiB as float32)."""
    cb = np.linspace(-1, 1, 256).astype("<f2").tobytes()
    sec_a, sec_b = zstd_frame([("rle", 0, numel)]), b"\x00"

    def t(shape, sec, comp, off):
        return {"shape": list(shape), "encoding": "codebook", "bits": 8, "width": 8, "quantizer": "kmeans",
                "codebook": cb, "codebook_scale": 1.0, "compression": comp, "offset": off,
                "length": len(sec), "crc32": zlib.crc32(sec)}

    m = {"name": "bomb", "kind": "lora", "out_features": 1, "in_features": numel, "rank": 1, "scale": 1.0,
         "fan_in_fan_out": False, "A": t((1, numel), sec_a, "zstd", 0), "B": t((1, 1), sec_b, "none", len(sec_a))}
    return file_from_header({"metadata": {}, "modules": [m], "tensors": []}, [sec_a, sec_b])


def many_modules_file(n: int) -> bytes:
    """``n`` sine modules (4x16 and 4x4 factors, 3-bit dense codebooks), header as raw blocks:
    what a file at the entry cap costs to open, with nothing else in the way."""
    rng = np.random.default_rng(0)
    cb = np.sort(rng.normal(0, 1, 8)).astype("<f2").tobytes()
    sa = ref_pack(rng.integers(0, 8, 64).tolist(), 3)
    sb = ref_pack(rng.integers(0, 8, 16).tolist(), 3)
    mods, secs, off = [], [], 0

    def t(shape, sec, off):
        return {"shape": list(shape), "encoding": "codebook", "bits": 3, "width": 3, "quantizer": "kmeans",
                "codebook": cb, "codebook_scale": 0.015625, "compression": "none", "offset": off,
                "length": len(sec), "crc32": zlib.crc32(sec)}

    for i in range(n):
        mods.append({"name": f"base_model.model.model.layers.{i // 1024}.mlp.experts.{i % 1024}.up_proj",
                     "kind": "sine", "out_features": 4, "in_features": 16, "rank": 4, "scale": 2.0,
                     "omega": 100.0, "gamma": 4.0, "fan_in_fan_out": False,
                     "A": t((4, 16), sa, off), "B": t((4, 4), sb, off + len(sa))})
        secs += [sa, sb]
        off += len(sa) + len(sb)
    return file_from_header({"metadata": {}, "modules": mods, "tensors": []}, secs)
