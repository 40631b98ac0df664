"""A container-version-2 decoder written from spec/sld-format.md part 2 alone, plainly, without
deltacodec (the independent reference the v2 tests and golden vectors are checked against), and
helpers to take a v2 file apart and put it back together."""

from __future__ import annotations

import struct
import zlib
from decimal import Decimal, localcontext

import msgpack
import numpy as np
import zstandard

MAGIC = b"\x89SLD\r\n\x1a\n"


def _t_table() -> list[int]:
    with localcontext() as ctx:
        ctx.prec = 60
        return [int((Decimal(2) ** 31 * Decimal(2) ** (Decimal(-j) / 256)).to_integral_value("ROUND_HALF_EVEN"))
                for j in range(256)]


T = _t_table()


class Bits:
    def __init__(self, data: bytes) -> None:
        self.v = int.from_bytes(data, "little")
        self.n = 8 * len(data)
        self.pos = 0

    def read(self, k: int) -> int:
        assert self.pos + k <= self.n, "side information ends early"
        x = (self.v >> self.pos) & ((1 << k) - 1)
        self.pos += k
        return x

    def eg0(self) -> int:
        m = 0
        while self.read(1) == 0:
            m += 1
            assert m <= 40
        return (1 << m) + self.read(m) - 1

    def seg0(self) -> int:
        u = self.eg0()
        return u // 2 if u % 2 == 0 else -(u + 1) // 2

    def egk(self, k: int) -> int:
        return (self.eg0() << k) | self.read(k)

    def done(self) -> None:
        rest = self.n - self.pos
        assert rest < 8 and self.read(rest) == 0, "padding"


def read_table(b: Bits) -> tuple[int, int, list[int]]:
    """(P, imin, freqs)."""
    kind = b.read(1)
    P = b.read(4) + 1
    imin = b.seg0()
    imax = b.seg0() - imin
    K = imax - imin + 1
    assert 1 <= K
    if kind == 0:
        a = min(max(-imin, 0), K - 1)
        z = b.seg0() + a
        f = [0] * K
        prev = 0
        for s in range(K):
            if s == z:
                continue
            f[s] = b.egk(max(0, prev.bit_length() - 2))
            prev = f[s]
        f[z] = (1 << P) - sum(f)
        assert f[z] >= 1
        return P, imin, f
    shift = b.read(4)
    A = b.seg0() << shift
    B = b.seg0() << shift
    E = [A * abs(i) + B * i * i for i in range(imin, imax + 1)]
    lo = min(E)
    w = []
    for e_full in E:
        e = (e_full - lo) >> 12
        w.append(T[e % 256] >> (e // 256) if e // 256 < 32 else 0)
    W, M = sum(w), (1 << P) - K
    f = [1 + (ws * M) // W for ws in w]
    r = [(ws * M) % W for ws in w]
    R = (1 << P) - sum(f)
    for s in sorted(range(K), key=lambda s: (-r[s], s))[:R]:
        f[s] += 1
    return P, imin, f


def f32(x: float) -> np.float32:
    return np.float32(x)


def quant_values(side: bytes) -> tuple[tuple[int, int, list[int]], list[np.float32]]:
    b = Bits(side)
    method = b.read(1)
    table = read_table(b)
    P, imin, f = table
    K = len(f)
    if method == 0:
        step_bits = b.read(16)
        t1 = b.read(8)
        t1 = t1 - 256 if t1 >= 128 else t1
        t2 = t1 + b.seg0()
        delta = np.array([step_bits << 16], dtype=np.uint32).view(np.float32)[0]
        vals = []
        for s in range(K):
            i = imin + s
            if i == 0:
                vals.append(np.float32(0.0))
                continue
            th = t1 if abs(i) == 1 else t2
            v = np.float32((256 * abs(i) - th) / 256) * delta
            vals.append(np.float32(-v if i < 0 else v))
    else:
        bits = b.read(3) + 1
        scale = np.array([b.read(32)], dtype=np.uint32).view(np.float32)[0]
        cb = np.array([b.read(16) for _ in range(1 << bits)], dtype=np.uint16).view(np.float16)
        vals = [np.float32(cb[imin + s]) * scale for s in range(K)]
    b.done()
    return table, vals


def rans_decode(data: bytes, segments: list[tuple[int, tuple[int, int, list[int]]]], lanes: int) -> list[list[int]]:
    """Symbols (s, not indices) of each segment."""
    x = [int.from_bytes(data[4 * j:4 * j + 4], "little") for j in range(lanes)]
    assert (len(data) - 4 * lanes) % 2 == 0 and min(x) >= 1 << 16
    pos, g, out = 4 * lanes, 0, []
    for n, (P, _, f) in segments:
        cum = [sum(f[:s]) for s in range(len(f))]
        syms = []
        for _ in range(n):
            j = g % lanes
            v = x[j]
            slot = v % (1 << P)
            s = max(k for k in range(len(f)) if cum[k] <= slot and f[k] > 0)
            v = f[s] * (v >> P) + slot - cum[s]
            if v < 1 << 16:
                v = (v << 16) | int.from_bytes(data[pos:pos + 2], "little")
                pos += 2
            x[j] = v
            syms.append(s)
            g += 1
        out.append(syms)
    assert all(v == 1 << 16 for v in x) and pos == len(data)
    return out


def fields_decode(side: bytes, sec: bytes, n: int, lanes: int) -> tuple[str, np.ndarray]:
    """(dtype, uint16 words)."""
    b = Bits(side)
    dtype = ["F16", "BF16"][b.read(2)]
    tables = []
    for _ in range(3 if dtype == "F16" else 2):
        tables.append(read_table(b) if b.read(1) else None)
    b.done()
    fields = [f.astype(np.uint16) for f in field_streams(sec, n, tables, lanes)]
    if dtype == "BF16":
        e, r = fields
        return dtype, ((r & 0x80) << 8) | (e << 7) | (r & 0x7F)
    e, hi, lo = fields
    return dtype, ((hi & 4) << 13) | (e << 10) | ((hi & 3) << 8) | lo


def field_streams(sec: bytes, n: int, tables: list, lanes: int) -> list[np.ndarray]:
    """Spec 13.5's section: the coded fields (one rANS stream, consecutive segments of n symbols,
    value = imin + symbol) then each stored field as n raw bytes; every field in stream order,
    as uint32 arrays."""
    stored = sum(t is None for t in tables)
    slen = len(sec) - stored * n
    assert slen >= 0, "section too short for the stored fields"
    coded = rans_decode(sec[:slen], [(n, t) for t in tables if t is not None], lanes) if slen else []
    fields, ci, ri = [], 0, 0
    for t in tables:
        if t is None:
            fields.append(np.frombuffer(sec[slen + ri * n: slen + (ri + 1) * n], np.uint8).astype(np.uint32))
            ri += 1
        else:
            fields.append(np.array(coded[ci], dtype=np.uint32) + t[1])
            ci += 1
    return fields


def parse(data: bytes) -> tuple[dict, list[bytes]]:
    """The v2 header object and the sections, in order."""
    magic, version, hlen, hcrc = struct.unpack_from("<8sIII", data, 0)
    assert magic == MAGIC and version == 2 and zlib.crc32(data[20:20 + hlen]) == hcrc
    raw = zstandard.ZstdDecompressor().decompressobj().decompress(data[20:20 + hlen])
    header = msgpack.unpackb(raw, raw=False)
    items = [m[k] for m in header["modules"] for k in ("A", "B")] + [t["t"] for t in header["tensors"]]
    pos, secs = 20 + hlen, []
    for t in items:
        secs.append(data[pos:pos + t[1]])
        pos += t[1]
    assert pos == len(data) and zlib.crc32(data[20 + hlen:]) == header["crc32"]
    return header, secs


def build(header: dict, secs: list[bytes], *, fix: bool = True) -> bytes:
    """A v2 file from a header object and sections (lengths and CRCs recomputed when ``fix``)."""
    items = [m[k] for m in header["modules"] for k in ("A", "B")] + [t["t"] for t in header["tensors"]]
    if fix:
        for t, s in zip(items, secs):
            t[1] = len(s)
        header["crc32"] = zlib.crc32(b"".join(secs))
    hdr = zstandard.ZstdCompressor(level=3).compress(msgpack.packb(header, use_bin_type=True))
    return struct.pack("<8sIII", MAGIC, 2, len(hdr), zlib.crc32(hdr)) + hdr + b"".join(secs)


def decode(data: bytes) -> dict[str, np.ndarray]:
    """Every tensor of a v2 file, float32 (raw F64: float64), flat, by name."""
    header, secs = parse(data)
    lanes = header["lanes"]
    defaults = header["defaults"]
    prev = b""
    entries = []
    for m in header["modules"]:
        raw = prev[:m.get("p", 0)] + m["name"].encode()
        prev = raw
        out_f, in_f, r = m["shape"]
        entries.append((raw.decode() + ".lora_A.weight", r * in_f, m["A"]))
        entries.append((raw.decode() + ".lora_B.weight", out_f * r, m["B"]))
        for k in ("kind",):
            assert k in m or k in defaults
    for t in header["tensors"]:
        raw = prev[:t.get("p", 0)] + t["name"].encode()
        prev = raw
        entries.append((raw.decode(), int(np.prod(t["shape"])), t["t"]))
    out = {}
    for (name, n, t), sec in zip(entries, secs):
        if t[0] == 0:
            table, vals = quant_values(t[2])
            (syms,) = rans_decode(sec, [(n, table)], lanes)
            out[name] = np.array([vals[s] for s in syms], dtype=np.float32)
        elif t[0] == 1 and Bits(t[2]).read(2) == 2:  # F32 fields (13.5, extension of 15)
            assert "f32_fields" in header.get("required", []), f"{name}: F32 fields without 'required'"
            out[name] = fields32_decode(t[2], sec, n, lanes).view(np.float32)
        elif t[0] == 1:
            dtype, words = fields_decode(t[2], sec, n, lanes)
            w = np.asarray(words, dtype=np.uint16)
            out[name] = (w.view(np.float16).astype(np.float32) if dtype == "F16"
                         else (w.astype(np.uint32) << 16).view(np.float32))
        else:
            payload = zstandard.ZstdDecompressor().decompressobj().decompress(sec) if t[3] == "zstd" else sec
            dt = t[2]
            if dt == "BF16":
                out[name] = (np.frombuffer(payload, "<u2").astype(np.uint32) << 16).view(np.float32)
            else:
                v = np.frombuffer(payload, {"F16": "<f2", "F32": "<f4", "F64": "<f8"}[dt])
                out[name] = v.astype(np.float64 if dt == "F64" else np.float32)
    return out


# spec 12.5, table 1, transcribed from the spec's text
CONFIG_TABLE_1 = [
    ("alora_invocation_tokens", None), ("alpha_pattern", {}), ("arrow_config", None), ("auto_mapping", None),
    ("bias", "none"), ("corda_config", None), ("ensure_weight_tying", False), ("eva_config", None),
    ("exclude_modules", None), ("fan_in_fan_out", False), ("inference_mode", True), ("init_lora_weights", True),
    ("kasa_config", None), ("layer_replication", None), ("layers_pattern", None), ("layers_to_transform", None),
    ("loftq_config", {}), ("lora_bias", False), ("lora_dropout", 0.0), ("lora_ga_config", None),
    ("megatron_config", None), ("megatron_core", "megatron.core"), ("modules_to_save", None),
    ("monteclora_config", None), ("peft_type", "LORA"), ("qalora_group_size", 16), ("rank_pattern", {}),
    ("revision", None), ("target_parameters", None), ("task_type", None), ("trainable_token_indices", None),
    ("use_bdlora", None), ("use_dora", False), ("use_qalora", False), ("use_rslora", False), ("velora_config", None),
]


def restore_config(metadata: dict) -> dict:
    """Spec 12.5: the metadata as a reader presents it (the left-out config keys back, the marker
    gone); metadata without a usable marker as it is."""
    mark = metadata.get("adapter_config_elided")
    cfg = metadata.get("adapter_config")
    keys = [k for k, _ in CONFIG_TABLE_1]
    usable = (
        isinstance(mark, dict) and sorted(mark) == ["absent", "sorted", "table"]
        and type(mark["table"]) is int and mark["table"] == 1 and type(mark["sorted"]) is bool
        and isinstance(mark["absent"], list) and all(isinstance(k, str) and k in keys for k in mark["absent"])
        and len(set(mark["absent"])) == len(mark["absent"])
        and isinstance(cfg, dict) and all(isinstance(k, str) for k in cfg)
    )
    if not usable:
        return metadata
    out_cfg = dict(cfg)
    for k, v in CONFIG_TABLE_1:
        if k not in cfg and k not in mark["absent"]:
            out_cfg[k] = v
    if mark["sorted"]:
        out_cfg = {k: out_cfg[k] for k in sorted(out_cfg)}
    out = {}
    for k, v in metadata.items():
        if k == "adapter_config":
            out[k] = out_cfg
        elif k != "adapter_config_elided":
            out[k] = v
    return out


# spec 13.5, dtype 2 (F32), under the extension "f32_fields" of section 15


def fields32_decode(side: bytes, sec: bytes, n: int, lanes: int) -> np.ndarray:
    """The uint32 words of an F32 field-stream tensor: streams e, s·128 + (m >> 16),
    (m >> 8) mod 256, m mod 256, each rANS-coded (in one stream, in this order) or stored."""
    b = Bits(side)
    assert b.read(2) == 2
    tables = [read_table(b) if b.read(1) else None for _ in range(4)]
    b.done()
    for t in tables:
        assert t is None or (t[1] >= 0 and t[1] + len(t[2]) - 1 <= 255), "field alphabet outside 0..255"
    e, top, mid, low = field_streams(sec, n, tables, lanes)
    s = top >> 7
    m = ((top & 0x7F) << 16) | (mid << 8) | low
    return ((s << 31) | (e << 23) | m).astype(np.uint32)
