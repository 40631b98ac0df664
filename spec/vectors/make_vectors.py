"""Regenerate the test vectors in this folder (run from the repository root).

    python spec/vectors/make_vectors.py              # everything (the golden vectors need torch)
    python spec/vectors/make_vectors.py --no-golden  # crafted and invalid vectors only
    python spec/vectors/make_vectors.py --spec-table # only the table of invalid vectors in the spec

Golden vectors (spec section 9.1), made by deltacodec's writer: for each, <name>.source.safetensors
(the adapter, config in its metadata), <name>.sld (what the writer makes of it with the options
below) and <name>.expected.json (options, header facts, and every decoded tensor as float32 bit
patterns in hex). Regenerate them only when the writer's output changes on purpose (a quantizer
change, a format change), and say why in the commit.

Crafted vectors (crafted_*.sld, same JSON schema without "options"): valid files made by hand
here, for what this writer never writes (frames without a content size, the widest msgpack
encodings, codebook-coded extras, ...).

Invalid vectors (invalid/<name>.sld and invalid/<name>.json, section 9.3): files a reader MUST
reject, each breaking one rule; the JSON names the error class, the spec section and the stage
("open": opening the file fails; "verify": it opens, decoding its sections fails). They are
made from a valid file by hand (msgpack-python, zstd frames of raw and RLE blocks written byte
by byte), so they do not depend on the zstd release and regenerate byte for byte.
"""

from __future__ import annotations

import copy
import json
import os
import struct
import sys
import zlib

import msgpack
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from sldtools import (  # noqa: E402
    MAGIC,
    f16_codebook,
    file_from_header,
    header_bytes_file,
    ref_pack,
    relayout,
    wide_pack,
    zstd_frame,
)

# ----------------------------------------------------------------------------------------------
# Golden vectors (the writer)

VECTORS = {
    "lora_1bit_none": dict(kind="lora", bits=1, level=0, quantizer="kmeans", extras=False),
    # larger tensors: zstd only pays (and is only kept) past a few hundred indices
    "sine_3bit_zstd": dict(kind="sine", bits=3, level=1, quantizer="kmeans", extras=False, scale=8),
    "sine_5bit_dense": dict(kind="sine", bits=5, level=0, quantizer="uniform", extras=False),
    "mixed_16bit_extras": dict(kind="sine", bits=16, level=1, quantizer="kmeans", extras=True),
    # 6-bit dense fields straddling bytes with padding bits (3 x 201 and 67 x 3 values), Conv1D
    # layout, an all-zero lora_B (codebook_scale 0) and a float64 extra
    "lora_6bit_fifo_f64": dict(kind="lora", bits=6, level=0, quantizer="kmeans", extras=False, fifo=True,
                               shapes={"transformer.h.0.attn.c_attn": (67, 201, 3)}, zero_b=True, f64=True),
    # 4-bit codebooks, and zstd on a raw (modules_to_save) tensor
    "sine_4bit_zstd_extras": dict(kind="sine", bits=4, level=1, quantizer="kmeans", extras=False, scale=4,
                                  saved=True),
    # container version 2 (spec part 2)
    "v2_lora_ecsq": dict(kind="lora", bits=3, level=1, quantizer="ecsq", extras=False, scale=4, container=2),
    "v2_sine_ecsq_1bit": dict(kind="sine", bits=1, level=1, quantizer="ecsq", extras=False, scale=4, container=2),
    "v2_sine_auto_bpp": dict(kind="sine", bits_per_param=2.5, level=1, quantizer="auto", extras=False, scale=4,
                             container=2),
    "v2_lossless_fp16_bf16": dict(kind="lora", bits=16, level=1, quantizer="kmeans", extras=True, container=2,
                                  factor_dtypes=("float16", "bfloat16"), scale=4),
    # bits 32: float32 factors bit-exact as F32 field streams (extension f32_fields), special
    # values included; one exactly-bfloat16 factor stays BF16 (the smallest exact form)
    "v2_lossless_fp32": dict(kind="lora", bits=32, level=1, quantizer="kmeans", extras=True, container=2,
                             fp32_specials=True, scale=2),
    "v2_kmeans_4bit_extras": dict(kind="sine", bits=4, level=1, quantizer="kmeans", extras=False, scale=4,
                                  saved=True, container=2),
    # a config as PEFT's save_pretrained writes it: stored without table 1's default-valued keys (12.5)
    "v2_peft_config_elided": dict(kind="lora", bits=2, level=1, quantizer="kmeans", extras=False, container=2,
                                  peft_config=True),
}

# What save_pretrained writes for a LoraConfig (sorted keys), with two table-1 keys off their
# default (bias, lora_dropout: kept) and one the config lacks (use_bdlora: listed as absent).
PEFT_CONFIG = {
    "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None,
    "auto_mapping": {"base_model_class": "LlamaForCausalLM", "parent_library": "transformers.models.llama.modeling_llama"},
    "base_model_name_or_path": "golden", "bias": "lora_only", "corda_config": None, "ensure_weight_tying": False,
    "eva_config": None, "exclude_modules": None, "fan_in_fan_out": False, "inference_mode": True,
    "init_lora_weights": True, "kasa_config": None, "layer_replication": None, "layers_pattern": None,
    "layers_to_transform": None, "loftq_config": {}, "lora_alpha": 16, "lora_bias": False, "lora_dropout": 0.05,
    "lora_ga_config": None, "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None,
    "monteclora_config": None, "peft_type": "LORA", "peft_version": "0.21.2", "qalora_group_size": 16, "r": 8,
    "rank_pattern": {}, "revision": None, "target_modules": ["k_proj", "q_proj", "v_proj"], "target_parameters": None,
    "task_type": "CAUSAL_LM", "trainable_token_indices": None, "use_dora": False, "use_qalora": False,
    "use_rslora": False, "velora_config": None,
}


def source(name: str, spec: dict) -> str:
    import torch
    from safetensors.torch import save_file

    rng = np.random.default_rng(sum(map(ord, name)))
    tensors = {}
    k = spec.get("scale", 1)
    shapes = spec.get("shapes") or {
        "model.layers.0.self_attn.q_proj": (12 * k, 20 * k, 8), "model.layers.0.mlp.down_proj": (20 * k, 36 * k, 8)}
    for j, (mod, (o, i, r)) in enumerate(shapes.items()):
        tensors[f"base_model.model.{mod}.lora_A.weight"] = torch.from_numpy(
            rng.uniform(-1, 1, (r, i)).astype(np.float32) / np.sqrt(i))
        b = (rng.standard_t(4, (o, r)) * 1e-2).astype(np.float32)
        tensors[f"base_model.model.{mod}.lora_B.weight"] = torch.from_numpy(np.zeros_like(b) if spec.get("zero_b") else b)
        if spec.get("factor_dtypes"):  # a 16-bit source: one module float16, the next bfloat16
            dt = getattr(torch, spec["factor_dtypes"][j % len(spec["factor_dtypes"])])
            for k in ("A", "B"):
                key = f"base_model.model.{mod}.lora_{k}.weight"
                t = tensors[key].to(dt).clone()
                flat = t.view(-1)
                flat[0], flat[1], flat[2] = 0.0, -0.0, torch.finfo(dt).tiny / 4  # ±0 and a subnormal
                tensors[key] = t
    if spec.get("fp32_specials"):
        (a0, b0), (a1, b1) = ([f"base_model.model.{mod}.lora_{x}.weight" for x in "AB"] for mod in shapes)
        flat = tensors[a0].view(-1)
        # ±0, float32 subnormals (the smallest, and one of each sign), values near 2^±100
        flat[:7] = torch.tensor([0.0, -0.0, 1e-45, -2.5e-41, 1.1e-38, 2.0**100 * 1.1, -(2.0**-100) * 1.3])
        tensors[a1] = torch.full_like(tensors[a1], 0.1)  # a constant, not exactly 16-bit
        tensors[b1] = (tensors[b1].view(torch.int32) & -65536).view(torch.float32)  # exactly bfloat16
        big = rng.laplace(0, 0.01, 256).astype(np.float32)
        big[:2] = [3.4028235e38, -3.3e38]  # near the float32 maximum
        tensors["base_model.model.score.weight"] = torch.from_numpy(big)
    if spec["extras"]:
        tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.from_numpy(
            rng.normal(1, 0.1, 12).astype(np.float32)).to(torch.bfloat16)
        tensors["base_model.model.lm_head.bias"] = torch.from_numpy(rng.normal(0, 1, 7).astype(np.float32))
    if spec.get("f64"):
        tensors["base_model.model.lm_head.bias"] = torch.from_numpy(rng.normal(0, 1, 9))  # float64
    if spec.get("saved"):
        tensors["base_model.model.score.weight"] = torch.from_numpy(
            np.round(rng.normal(0, 1, (16, 64)) * 4).astype(np.float32) / 4)  # few distinct values
    cfg = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "base_model_name_or_path": "golden"}
    if spec.get("shapes"):
        cfg["r"] = None
    if spec.get("fifo"):
        cfg["fan_in_fan_out"] = True
    if spec["kind"] == "sine":
        cfg.update(peft_type="SINLORA", freq=60.0)
    cfg = {key: v for key, v in cfg.items() if v is not None}
    if spec.get("peft_config"):
        cfg = PEFT_CONFIG
    path = os.path.join(HERE, f"{name}.source.safetensors")
    save_file(tensors, path, metadata={"adapter_config": json.dumps(cfg, sort_keys=True)})
    return path


def hexbits(a: np.ndarray) -> list[str]:
    return [f"{v:08x}" for v in np.asarray(a, dtype=np.float32).reshape(-1).view(np.uint32).tolist()]


def values(e, arr: np.ndarray) -> dict:
    """Decoded values, exactly: float32 bit patterns, float64 ones for raw F64 tensors."""
    if e.dtype == "F64":
        return {"values_f64_hex": [f"{v:016x}" for v in np.asarray(arr, "<f8").reshape(-1).view(np.uint64).tolist()]}
    return {"values_f32_hex": hexbits(arr)}


def expected(path: str, spec: dict | None) -> dict:
    """The expected.json of a file (section 9.2)."""
    import deltacodec
    import zstandard

    f = deltacodec.load(path)
    out: dict = {}
    if spec is not None:
        out["options"] = {key: spec[key] for key in ("bits", "level", "quantizer", "size", "bits_per_param",
                                                      "max_error", "refit") if key in spec}
        out["options"]["container"] = spec.get("container", 1)
        out["zstd_version"] = zstandard.ZSTD_VERSION
        if spec.get("peft_config"):
            out["adapter_config"] = PEFT_CONFIG  # what a reader presents (12.5), key for key
    out.update({
        "file_bytes": f.file_size,
        "modules": [
            {"name": m.name, "kind": "sine" if m.sine else "lora", "out_features": m.out_features,
             "in_features": m.in_features, "rank": m.rank, "scale": m.scale, "omega": m.omega,
             "gamma": m.gamma, "fan_in_fan_out": m.fan_in_fan_out}
            for m in f.modules
        ],
        "tensors": {
            e.name: {"shape": list(e.shape), "encoding": e.encoding, "bits": e.bits, "width": e.width,
                     "dtype": e.dtype, "compression": e.compression, **values(e, f.tensor(e))}
            for e in f.entries()
        },
    })
    return out


def write_json(path: str, obj: dict) -> None:
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=1, sort_keys=True)
        fh.write("\n")


def golden(names: list[str] | None = None) -> None:
    import deltacodec

    for name, spec in VECTORS.items():
        if names and name not in names:
            continue
        src = source(name, spec)
        out = os.path.join(HERE, f"{name}.sld")
        if os.path.exists(out):
            os.remove(out)
        opts = {k: spec[k] for k in ("size", "bits_per_param", "max_error", "refit") if k in spec}
        if "bits" in spec:
            opts["bits"] = spec["bits"]
        deltacodec.encode(src, out=out, level=spec["level"], quantizer=spec["quantizer"], force=True,
                          container=spec.get("container", 1), **opts)
        write_json(os.path.join(HERE, f"{name}.expected.json"), expected(out, spec))
        print(f"{name}: {os.path.getsize(out)} bytes")


# ----------------------------------------------------------------------------------------------
# Crafted vectors (valid, made by hand)


def cb_map(shape, bits, width, cb, scale, comp="none"):
    return {"shape": list(shape), "encoding": "codebook", "bits": bits, "width": width, "quantizer": "kmeans",
            "codebook": cb, "codebook_scale": scale, "compression": comp}


def crafted() -> dict[str, bytes]:
    """Valid files exercising what the writer never writes."""
    # Extras only; the header frame has no content size and its msgpack uses the widest
    # encodings; sections at odd offsets; a codebook-coded extra with 5-bit indices in 8-bit
    # fields, float16 subnormals and ±0 in its codebook; a zstd section of raw blocks without a
    # content size; a single-segment frame; codebook_scale 0; raw F64 and BF16.
    c16 = np.array([0.0, -0.0, 2.0**-24, -(2.0**-14), 1.0, -1.5, 65504.0, 3.0] + [0.25] * 24, "<f2").tobytes()
    idx = [i % 32 for i in range(37)]
    t1 = dict(cb_map((37,), 5, 8, c16, 0.0078125, "zstd"), name="codebook.extra")
    s1 = zstd_frame([("raw", ref_pack(idx, 8))], content_size=None)
    t2 = dict(cb_map((3, 3), 2, 2, f16_codebook([1, 2, 3, 4]), 0.0), name="zero.scale")
    s2 = ref_pack([0, 1, 2, 3, 0, 1, 2, 3, 3], 2)
    f64 = np.array([1e300, -2.5, 5e-324, 0.0, 1 / 3], "<f8")
    t3 = {"name": "lm_head.bias", "shape": [5], "encoding": "raw", "dtype": "F64", "compression": "zstd"}
    s3 = zstd_frame([("raw", f64.tobytes())], single_segment=True)
    bf = (np.array([1.0, -3.0, 1e38, 2.0**-130], np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
    t4 = {"name": "norm.weight", "shape": [2, 2], "encoding": "raw", "dtype": "BF16", "compression": "none"}
    header = {"tensors": [t1, t2, t3, t4], "modules": [], "metadata": {"note": "crafted", "n": 2**64 - 1}}
    secs = [s1, s2, s3, bf]
    relayout(header, secs)
    data = file_from_header(header, secs, packer=wide_pack, frame=lambda b: zstd_frame([("raw", b)], content_size=None))
    return {"crafted_extras_only": data}


# ----------------------------------------------------------------------------------------------
# Invalid vectors (section 9.3)


def base() -> tuple[dict, list[bytes]]:
    """The valid file every invalid vector is one change away from: module 'm' (LoRA, 3x5, rank
    2, 2-bit codebooks, dense fields, no zstd) and a raw F32 extra 'x' of 3 values."""
    cb = f16_codebook([-1.0, -0.25, 0.25, 1.0])
    a_idx = [0, 1, 2, 3, 3, 2, 1, 0, 1, 2]
    b_idx = [3, 0, 1, 2, 2, 1]
    m = {"name": "m", "kind": "lora", "out_features": 3, "in_features": 5, "rank": 2, "scale": 2.0,
         "fan_in_fan_out": False, "A": cb_map((2, 5), 2, 2, cb, 0.5), "B": cb_map((3, 2), 2, 2, cb, 0.125)}
    x = {"name": "x", "shape": [3], "encoding": "raw", "dtype": "F32", "compression": "none"}
    secs = [ref_pack(a_idx, 2), ref_pack(b_idx, 2), np.array([1.0, -2.0, 3.0], "<f4").tobytes()]
    h = {"metadata": {"encoder": "make_vectors.py"}, "modules": [m], "tensors": [x]}
    return relayout(h, secs), secs


def build(h: dict, secs: list[bytes], *, layout: bool = True, **kw) -> bytes:
    return file_from_header(relayout(h, secs) if layout else h, secs, **kw)


def changed(fn) -> bytes:
    """The base file with ``fn(header, sections)`` applied (offsets, lengths, CRCs recomputed
    unless fn returns False)."""
    h, secs = base()
    h = copy.deepcopy(h)
    secs = list(secs)
    relay = fn(h, secs)
    return build(h, secs, layout=relay is not False)


def header_raw(raw: bytes, secs: list[bytes] | None = None, **frame_kw) -> bytes:
    return header_bytes_file(zstd_frame([("raw", raw)], **frame_kw), b"".join(secs if secs is not None else base()[1]))


def packed_base() -> bytes:
    return msgpack.packb(base()[0], use_bin_type=True)


def set_(path: str, value):
    """fn for changed(): set header field at path like 'modules.0.A.bits'."""
    def fn(h, secs):
        keys = path.split(".")
        t = h
        for k in keys[:-1]:
            t = t[int(k)] if k.isdigit() else t[k]
        t[keys[-1]] = value
    return fn


def with_module_names(names: list[str], extras: list[str]) -> bytes:
    h, secs = base()
    m, x = h["modules"][0], h["tensors"][0]
    h["modules"] = [dict(copy.deepcopy(m), name=n) for n in names]
    h["tensors"] = [dict(copy.deepcopy(x), name=n) for n in extras]
    return build(h, secs[:2] * len(names) + secs[2:] * len(extras))


def zstd_a(section: bytes):
    """fn for changed(): lora_A stored as the given zstd section."""
    def fn(h, secs):
        h["modules"][0]["A"]["compression"] = "zstd"
        secs[0] = section
    return fn


def kv(k, v) -> bytes:
    return msgpack.packb(k) + msgpack.packb(v, use_bin_type=True)


def meta_raw(parts: list[tuple]) -> bytes:
    """metadata {"k": V} with V made of zstd_frame parts, the rest of the base header after it."""
    h, secs = base()
    rest = kv("modules", h["modules"]) + kv("tensors", h["tensors"])
    frame_parts = [("raw", b"\x83" + msgpack.packb("metadata") + b"\x81\xa1k")] + parts + [("raw", rest)]
    return header_bytes_file(zstd_frame(frame_parts), b"".join(secs))


def a32(n: int) -> bytes:
    return b"\xdd" + struct.pack(">I", n)


def invalid() -> dict[str, tuple[bytes, str, str, str, str]]:
    """name -> (bytes, error class, spec section, reason, stage)."""
    F, V, C, L = "SldFormatError", "SldVersionError", "SldChecksumError", "SldLimitError"
    h0, secs0 = base()
    good = build(copy.deepcopy(h0), list(secs0))
    hlen = struct.unpack_from("<I", good, 12)[0]
    pb = packed_base()
    out: dict[str, tuple[bytes, str, str, str, str]] = {}

    def add(name, data, cls, rule, reason, stage="open"):
        assert name not in out
        out[name] = (data, cls, rule, reason, stage)

    # -- preamble and check order (2, 7.2) --
    add("not_sld_magic", b"\x89SLX" + good[4:], F, "2.1", "the first 8 bytes are not the magic")
    add("not_sld_text", b"hello world", F, "7.2", "an 11-byte text file: the magic is checked first, on the bytes there are")
    add("not_sld_zip", b"PK\x03\x04" + b"\0" * 26, F, "7.2", "a zip file")
    add("empty", b"", F, "7.2", "0 bytes")
    add("truncated_preamble", good[:19], F, "7.2", "19 bytes: the magic and version are right, the preamble is cut")
    add("future_version", good[:8] + struct.pack("<I", 3) + good[12:], V, "2.1", "container version 3")
    add("future_version_short", MAGIC + struct.pack("<I", 3), V, "7.2",
        "12 bytes with version 3: the version is checked before the preamble length")
    add("version_zero", good[:8] + struct.pack("<I", 0) + good[12:], V, "2.1", "container version 0")
    add("header_length_zero", good[:12] + struct.pack("<I", 0) + good[16:], F, "2.1", "H = 0")
    add("header_length_past_end", good[:12] + struct.pack("<I", len(good) - 19) + good[16:], F, "2.1",
        "H runs past the end of the file")
    add("header_length_over_limit", good[:12] + struct.pack("<I", (1 << 28) + 1) + good[16:], L, "7.1",
        "H = 2^28 + 1, over the header limit (checked before H is compared with the file size)")
    bad = bytearray(good)
    bad[20 + hlen // 2] ^= 0x01
    add("header_crc", bytes(bad), C, "2.3", "one header byte changed: the header CRC-32 does not match")

    # -- the header frame (4.3, 7.1) --
    add("header_not_zstd", header_bytes_file(pb, b"".join(secs0)), F, "4.3", "the header is msgpack without a zstd frame")
    add("header_skippable_frame", header_raw(pb, magic=0x184D2A50), F, "4.3", "a skippable frame instead of a data frame")
    add("header_dictionary_id", header_raw(pb, dict_id=1), F, "4.3", "the header frame names a dictionary")
    add("header_reserved_bit", header_raw(pb, reserved_bit=True), F, "4.3", "the frame header's reserved bit is set")
    add("header_frame_then_bytes", header_bytes_file(zstd_frame([("raw", pb)]) + b"\0", b"".join(secs0)), F, "4.3",
        "a byte after the header frame, inside the H bytes")
    add("header_two_frames", header_bytes_file(zstd_frame([("raw", pb)]) * 2, b"".join(secs0)), F, "4.3",
        "two frames in the header")
    add("header_declares_over_limit", header_bytes_file(zstd_frame([("rle", 0x80, (1 << 28) + 1)]), b""), L, "7.1",
        "the header frame declares (and its RLE blocks hold) 2^28 + 1 bytes: a header bomb in 8 KB")
    add("header_expands_over_limit",
        header_bytes_file(zstd_frame([("rle", 0x80, (1 << 28) + 1)], content_size=None), b""), L, "7.1",
        "no declared size, RLE blocks expanding to 2^28 + 1 bytes")
    add("header_window_over_limit", header_raw(pb, window_log=28), L, "7.1", "the header frame's window is 2^28")
    add("header_declares_wrong_size", header_raw(pb, content_size=len(pb) + 1), F, "4.3",
        "the header frame declares one byte more than its blocks hold")

    # -- msgpack (3.1) --
    add("header_invalid_msgpack", header_raw(b"\xc1" + pb), F, "3.1", "0xc1, a byte msgpack never uses")
    add("header_not_a_map", header_raw(msgpack.packb([1, 2, 3])), F, "3.1", "the header is an array")
    add("header_bytes_after_map", header_raw(pb + b"\xc0"), F, "3.1", "a nil after the header map")
    add("header_truncated_msgpack", header_raw(pb[:-3]), F, "3.1", "the msgpack ends inside a value")
    add("duplicate_root_key", header_raw(b"\x84" + kv("metadata", {}) + pb[1:]), F, "3.1", "'metadata' twice in the root map")
    dup_mod = pb.replace(b"\x89\xa4name\xa1m", b"\x8a\xa4name\xa1m\xa4name\xa1m", 1)
    add("duplicate_module_key", header_raw(dup_mod), F, "3.1", "'name' twice in a module map")
    dup_meta = pb.replace(b"\x81\xa7encoder", b"\x82\xa1a\x01\xa7encoder", 1).replace(b"\x82\xa1a\x01", b"\x83\xa1a\x01\xa1a\x02", 1)
    add("duplicate_metadata_key", header_raw(dup_meta), F, "3.1", "'a' twice in the metadata map")
    add("ext_type", header_raw(msgpack.packb({"metadata": {"x": msgpack.ExtType(5, b"a")}, "modules": h0["modules"],
                                              "tensors": h0["tensors"]}, use_bin_type=True)), F, "3.1",
        "an extension type (5) in metadata")
    add("timestamp", header_raw(msgpack.packb({"metadata": {"t": msgpack.Timestamp(0)}, "modules": h0["modules"],
                                               "tensors": h0["tensors"]}, use_bin_type=True)), F, "3.1",
        "the timestamp extension (-1) in metadata")
    add("non_string_key", header_raw(pb.replace(b"\x81\xa7encoder", b"\x82\x01\x02\xa7encoder", 1)), F, "3.1",
        "an int map key in metadata")
    add("invalid_utf8", header_raw(pb.replace(b"\xa4name\xa1m", b"\xa4name\xa1\xff", 1)), F, "3.1",
        "a module name that is not UTF-8")
    add("metadata_nesting_33", meta_raw([("rle", 0x91, 31), ("raw", b"\xc0")]), L, "7.1",
        "metadata arrays nested to level 33 (root map = 1)")
    add("metadata_nesting_1000", meta_raw([("rle", 0x91, 998), ("raw", b"\xc0")]), L, "7.1",
        "1000 levels, which crashed consumers that recurse")
    add("metadata_array_over_limit", meta_raw([("raw", a32((1 << 17) + 1)), ("rle", 0xC0, (1 << 17) + 1)]), L, "7.1",
        "an array of 2^17 + 1 elements")
    add("metadata_map_declares_2p32", meta_raw([("raw", b"\xdf\xff\xff\xff\xff")]), L, "7.1",
        "a map header declaring 2^32 - 1 pairs (5 bytes; refused before anything is built)")
    add("metadata_values_over_limit", meta_raw([("raw", a32(1 << 17) * 9 + b"\xc0")] + [("rle", 0xC0, (1 << 17) - 1)] * 9),
        L, "7.1", "nine nested arrays of 2^17 elements: over 2^20 metadata values")
    n = 1 << 17
    entries = b"\x83" + kv("metadata", {}) + kv("modules", h0["modules"]) + msgpack.packb("tensors") + a32(n)
    add("too_many_entries", header_bytes_file(zstd_frame([("raw", entries), ("rle", 0xC0, n)]), b"".join(secs0[:2])),
        L, "7.1", "one module and an array declaring 2^17 tensors (of nils: the count is refused before entries are read)")

    # -- root, module and tensor maps (3.2-3.5) --
    add("unknown_root_key", changed(set_("extra", 1)), F, "3.2", "a fourth key in the root map")
    add("missing_root_key", header_raw(msgpack.packb({"metadata": {}, "modules": h0["modules"]}, use_bin_type=True),
                                       secs0[:2]), F, "3.2", "no 'tensors' key")
    add("empty_adapter", header_raw(msgpack.packb({"metadata": {}, "modules": [], "tensors": []}), []), F, "3.2",
        "no modules and no tensors")
    add("unknown_module_key", changed(set_("modules.0.bias", True)), F, "3.4", "a module map with a key not in the table")
    add("missing_module_key", changed(lambda h, s: h["modules"][0].pop("scale") and None), F, "3.4", "no 'scale'")
    add("unknown_tensor_key", changed(set_("modules.0.A.note", "x")), F, "3.5", "a tensor map with a key not in the table")
    add("codebook_key_on_raw", changed(set_("tensors.0.bits", 32)), F, "3.5", "'bits' on a raw tensor map")
    add("name_on_factor", changed(set_("modules.0.A.name", "a")), F, "3.5", "'name' on a factor's tensor map")
    add("rank_is_float", changed(set_("modules.0.rank", 2.0)), F, "3.1", "an int field holding a float")
    add("rank_is_bool", changed(set_("modules.0.rank", True)), F, "3.1", "an int field holding true")
    add("scale_is_int", changed(set_("modules.0.scale", 2)), F, "3.1", "a float field holding an int")
    add("fan_in_fan_out_is_int", changed(set_("modules.0.fan_in_fan_out", 0)), F, "3.1", "a bool field holding 0")
    add("codebook_is_str", changed(set_("modules.0.A.codebook", "\x00" * 8)), F, "3.1", "a bin field holding a str")
    add("name_is_bin", changed(set_("tensors.0.name", b"x")), F, "3.1", "a str field holding bin")
    add("kind_unknown", changed(set_("modules.0.kind", "dora")), F, "3.4", "kind 'dora'")
    add("lora_with_omega", changed(set_("modules.0.omega", 1.0)), F, "3.4", "a lora module with omega")
    add("sine_without_gamma", changed(lambda h, s: h["modules"][0].update(kind="sine", omega=1.0)), F, "3.4",
        "a sine module without gamma")
    add("sine_omega_zero", changed(lambda h, s: h["modules"][0].update(kind="sine", omega=0.0, gamma=1.0)), F, "3.4",
        "omega = 0")
    add("sine_gamma_negative", changed(lambda h, s: h["modules"][0].update(kind="sine", omega=1.0, gamma=-1.0)), F,
        "3.4", "gamma < 0")
    add("rank_zero", changed(set_("modules.0.rank", 0)), F, "3.4", "rank 0")
    add("factor_shape_mismatch", changed(set_("modules.0.A.shape", [5, 2])), F, "3.4", "A is [5, 2], rank x in is [2, 5]")
    add("shape_zero_dim", changed(set_("tensors.0.shape", [3, 0])), F, "3.5", "a dimension of 0")
    add("shape_no_dims", changed(set_("tensors.0.shape", [])), F, "3.5", "a 0-d tensor")
    add("shape_nine_dims", changed(set_("tensors.0.shape", [1] * 8 + [3])), F, "3.5", "9 dimensions")
    add("shape_dim_over_2p31", changed(set_("tensors.0.shape", [2**31, 1])), F, "3.5", "a dimension of 2^31")
    add("bits_nine", changed(set_("modules.0.A.bits", 9)), F, "3.5", "bits 9")
    add("width_below_bits", changed(set_("modules.0.A.width", 1)), F, "3.5", "width 1 < bits 2")
    add("codebook_wrong_length", changed(set_("modules.0.A.codebook", f16_codebook([1, 2, 3]))), F, "3.5",
        "3 float16 values for 2 bits")
    add("codebook_nan", changed(set_("modules.0.A.codebook", f16_codebook([1, float("nan"), 2, 3]))), F, "3.5",
        "a NaN in the codebook")
    add("codebook_inf_scale_zero", changed(lambda h, s: h["modules"][0]["A"].update(
        codebook=f16_codebook([1, float("inf"), 2, 3]), codebook_scale=0.0)), F, "3.5",
        "an infinity in the codebook, even with codebook_scale 0")
    add("codebook_scale_negative", changed(set_("modules.0.A.codebook_scale", -0.5)), F, "3.5", "codebook_scale < 0")
    add("codebook_scale_not_float32", changed(set_("modules.0.A.codebook_scale", 0.1)), F, "3.5",
        "0.1 is not a float32 value")
    add("compression_unknown", changed(set_("modules.0.A.compression", "lz4")), F, "3.5", "compression 'lz4'")
    add("encoding_unknown", changed(set_("modules.0.A.encoding", "huffman")), F, "3.5", "encoding 'huffman'")
    add("dtype_unknown", changed(set_("tensors.0.dtype", "I32")), F, "3.5", "dtype 'I32'")
    add("quantizer_empty", changed(set_("modules.0.A.quantizer", "")), F, "3.5", "an empty quantizer name")
    add("quantizer_control", changed(set_("modules.0.A.quantizer", "k\x1bmeans")), F, "3.5",
        "an escape character in the quantizer")

    def numel(h, s):
        h["tensors"][0]["shape"] = [2**31 - 1, 5]
    add("numel_over_limit", changed(numel), L, "7.1", "(2^31 - 1) x 5 elements, over 2^33")

    def big_extra(h, s):  # 1-bit codebook extra of (2^31 - 1) x 4 elements: 34 GB as float32
        n = (2**31 - 1) * 4
        h["tensors"].append(dict(cb_map([2**31 - 1, 4], 1, 1, f16_codebook([0, 1]), 1.0, "zstd"), name="big"))
        s.append(zstd_frame([("rle", 0, (n + 7) // 8)]))
    add("decoded_size_over_default_limit", changed(big_extra), L, "7.1",
        "a valid 33 KB file that decodes to 34 GB, over the default 16 GiB (max_decoded_bytes raises it)")

    # -- names (3.6) --
    add("name_empty", changed(set_("modules.0.name", "")), F, "3.6", "an empty module name")
    add("name_too_long", changed(set_("tensors.0.name", "x" * 1025)), F, "3.6", "1025 bytes")
    add("name_too_long_utf8", changed(set_("tensors.0.name", "\u00e9" * 513)), F, "3.6", "513 characters, 1026 bytes")
    add("name_newline", changed(set_("modules.0.name", "a\nb")), F, "3.6", "a newline in a name")
    add("name_escape", changed(set_("tensors.0.name", "\x1b[2Jx")), F, "3.6", "a terminal escape sequence in a name")
    add("name_del", changed(set_("modules.0.name", "a\x7f")), F, "3.6", "DEL in a name")
    add("name_c1", changed(set_("modules.0.name", "a\u0085b")), F, "3.6", "U+0085 (NEL, a C1 control) in a name")
    add("name_nul", changed(set_("tensors.0.name", "x\x00")), F, "3.6", "NUL in a name")
    add("name_only_prefix", changed(set_("modules.0.name", "base_model.model.")), F, "3.6", "only PEFT's prefix")
    add("duplicate_name", with_module_names(["m"], ["m"]), F, "3.6", "a module and an extra tensor both named 'm'")
    add("collision_prefix", with_module_names(["base_model.model.lin", "lin"], []), F, "3.6",
        "modules 'base_model.model.lin' and 'lin' patch the same weight")
    add("collision_extra_weight", with_module_names(["m"], ["m.weight"]), F, "3.6",
        "an extra 'm.weight' replaces the weight module 'm' patches")
    add("collision_extra_factor", with_module_names(["m"], ["base_model.model.m.lora_A.weight"]), F, "3.6",
        "an extra named like module m's lora_A factor")
    add("collision_extras", with_module_names(["m"], ["lm_head.bias", "base_model.model.lm_head.bias"]), F, "3.6",
        "two extras for the same model tensor")

    # -- values that cannot be finite (6) --
    add("codebook_overflow", changed(lambda h, s: h["modules"][0]["A"].update(
        codebook=f16_codebook([0, 1, 2, 65504]), codebook_scale=2.0**113)), F, "6.1",
        "float16 65504 x codebook_scale 2^113 overflows float32")
    add("scale_not_float32", changed(set_("modules.0.scale", 1e39)), F, "6.2", "scale 1e39 is inf in float32")
    add("lora_bound", changed(set_("modules.0.scale", 2.0**127)), F, "6.2",
        "rank 2 x scale 2^127: the module's delta cannot be guaranteed finite")
    add("sine_coefficient", changed(lambda h, s: h["modules"][0].update(kind="sine", scale=1.0, omega=1.0, gamma=1e-300)),
        F, "6.2", "scale/gamma = 1e300 is inf in float32")
    add("sine_omega_not_float32", changed(lambda h, s: h["modules"][0].update(kind="sine", omega=1e39, gamma=1.0)), F,
        "6.2", "omega 1e39 is inf in float32")

    def raw_factor(h, s):
        vals = np.full(10, 0.5, np.float32)
        vals[7] = 3e38
        h["modules"][0]["A"] = {"shape": [2, 5], "encoding": "raw", "dtype": "F32", "compression": "none"}
        s[0] = vals.astype("<f4").tobytes()
    add("raw_factor_bound", changed(raw_factor), F, "6.2",
        "a raw F32 lora_A holding 3e38: found when decoded (the header cannot tell)", "verify")

    # -- layout (4.1, 4.2) --
    def offset(i, delta):
        def fn(h, s):
            relayout(h, s)
            items = [h["modules"][0]["A"], h["modules"][0]["B"], h["tensors"][0]]
            items[i]["offset"] += delta
            return False
        return fn
    add("offset_gap", changed(offset(1, 1)), F, "4.1", "lora_B starts one byte after lora_A ends")
    add("offset_overlap", changed(offset(2, -1)), F, "4.1", "x starts one byte before lora_B ends")
    add("truncated", good[:-1], F, "4.1", "the last byte is missing")
    add("trailing_bytes", good + b"\0", F, "4.1", "one byte after the last section")
    add("uncompressed_wrong_length", changed(lambda h, s: s.__setitem__(2, s[2] + b"\0\0\0\0")), F, "4.2",
        "an uncompressed section one float longer than its shape")

    # -- sections (4.3, 5), found when they are decoded --
    bad = bytearray(good)
    bad[-1] ^= 0x80
    add("section_crc", bytes(bad), C, "4.3", "one byte of the last section changed", "verify")
    pa = secs0[0]
    add("section_declares_wrong_size", changed(zstd_a(zstd_frame([("raw", pa)], content_size=4))), F, "4.3",
        "a frame declaring 4 bytes for a 3-byte payload", "verify")
    add("section_expands_short", changed(zstd_a(zstd_frame([("raw", pa[:2])], content_size=None))), F, "4.3",
        "a frame without declared size holding 2 of 3 bytes", "verify")
    add("section_expands_long", changed(zstd_a(zstd_frame([("raw", pa), ("rle", 0, 1 << 30)], content_size=None))), F,
        "4.3", "a frame without declared size whose RLE blocks add 1 GiB", "verify")
    add("section_frame_then_bytes", changed(zstd_a(zstd_frame([("raw", pa)]) + b"\0")), F, "4.3",
        "a byte after the frame inside the section", "verify")
    add("section_two_frames", changed(zstd_a(zstd_frame([("raw", pa[:1])]) + zstd_frame([("raw", pa[1:])]))), F, "4.3",
        "the payload split over two frames", "verify")
    add("section_skippable_frame", changed(zstd_a(zstd_frame([("raw", pa)], magic=0x184D2A5A))), F, "4.3",
        "a skippable frame", "verify")
    add("section_dictionary_id", changed(zstd_a(zstd_frame([("raw", pa)], dict_id=3))), F, "4.3",
        "a frame naming dictionary 3", "verify")
    fr = zstd_frame([("raw", pa)])
    add("section_reserved_block_type", changed(zstd_a(fr[: -3 - len(pa)] + ((len(pa) << 3) | 7).to_bytes(3, "little") + pa)),
        F, "4.3", "block type 3 (reserved)", "verify")
    add("section_window_over_limit", changed(zstd_a(zstd_frame([("raw", pa)], window_log=28))), L, "7.1",
        "a section frame with a 2^28 window", "verify")
    add("nonzero_padding", changed(lambda h, s: s.__setitem__(0, s[0][:-1] + bytes([s[0][-1] | 0x80]))), F, "5.2",
        "a padding bit after the last 2-bit index is set", "verify")

    def out_of_range(h, s):
        h["modules"][0]["A"].update(bits=3, width=4, codebook=f16_codebook(list(range(8))))
        s[0] = ref_pack([1] * 9 + [8], 4)
    add("index_out_of_range", changed(out_of_range), F, "5.2", "index 8 in a 4-bit field of a 3-bit codebook", "verify")
    add("raw_nan", changed(lambda h, s: s.__setitem__(2, np.array([1, np.nan, 3], "<f4").tobytes())), F, "5.3",
        "a NaN in a raw F32 tensor", "verify")

    def bf16_inf(h, s):
        h["tensors"][0]["dtype"] = "BF16"
        s[2] = np.array([0x3F80, 0x7F80, 0x4040], "<u2").tobytes()
    add("raw_inf_bf16", changed(bf16_inf), F, "5.3", "+inf in a raw BF16 tensor", "verify")
    invalid_v2(add)
    return out


# ----------------------------------------------------------------------------------------------
# Invalid vectors of container version 2 (spec part 2)


def _bw():
    from deltacodec.bitio import BitWriter

    return BitWriter()


def v2_base() -> tuple[dict, list[bytes]]:
    """The valid version-2 file the v2 invalid vectors are one change away from: module 'm'
    (LoRA, 3x5, rank 2) with an ECSQ lora_A (explicit table over -1..1) and a k-means lora_B
    (1-bit codebook), and a raw F32 extra 'x'; all coded here, by hand, with the library's rANS
    coder (integer arithmetic: the bytes do not depend on any release)."""
    from deltacodec import rans
    from deltacodec.ecsq import write_params
    from deltacodec.freqtable import FreqTable

    ta = FreqTable("explicit", 4, -1, np.array([4, 8, 4], dtype=np.int64))
    bw = _bw()
    bw.bits(0, 1)
    ta.write(bw)
    write_params(bw, 0x3E80, 16, 8)  # Δ = 0.25, θ1 = 16/256, θ2 = 8/256
    side_a = bw.getvalue()
    a_idx = np.array([0, 1, -1, 0, 0, 1, 0, -1, 0, 0], dtype=np.int32)
    tb = FreqTable("explicit", 3, 0, np.array([3, 5], dtype=np.int64))
    bw = _bw()
    bw.bits(1, 1)
    tb.write(bw)
    bw.bits(0, 3)  # 1-bit codebook
    bw.bits(int(np.array(0.5, np.float32).view(np.uint32)), 32)
    for v in np.array([-0.5, 0.25], dtype=np.float16).view(np.uint16).tolist():
        bw.bits(int(v), 16)
    side_b = bw.getvalue()
    b_idx = np.array([1, 0, 1, 1, 0, 1], dtype=np.int32)
    secs = [rans.encode([(a_idx, ta)], lanes=2), rans.encode([(b_idx, tb)], lanes=2),
            np.array([1.0, -2.0, 3.0], "<f4").tobytes()]
    h = {"metadata": {"encoder": "make_vectors.py"}, "defaults": {"kind": "lora", "scale": 2.0, "fan_in_fan_out": False},
         "lanes": 2, "crc32": 0,
         "modules": [{"name": "m", "shape": [3, 5, 2], "A": [0, 0, side_a], "B": [0, 0, side_b]}],
         "tensors": [{"name": "x", "shape": [3], "t": [2, 0, "F32", "none"]}]}
    return h, secs


def v2_build(h: dict, secs: list[bytes], *, fix: bool = True, raw: bytes | None = None) -> bytes:
    """A v2 file: lengths and the data CRC recomputed (``fix``), header in a raw-block frame."""
    if fix:
        items = [m[k] for m in h["modules"] for k in ("A", "B")] + [t["t"] for t in h["tensors"]]
        for t, sec in zip(items, secs):
            t[1] = len(sec)
        h["crc32"] = zlib.crc32(b"".join(secs))
    packed = raw if raw is not None else msgpack.packb(h, use_bin_type=True)
    return header_bytes_file(zstd_frame([("raw", packed)]), b"".join(secs), version=2)


def v2_changed(fn, *, fix: bool = True) -> bytes:
    h, secs = v2_base()
    h = copy.deepcopy(h)
    secs = list(secs)
    fn(h, secs)
    return v2_build(h, secs, fix=fix)


def _side(*fields) -> bytes:
    """Side information from (kind, value) pairs: ("b", v, k) bits, ("e", v) EG0, ("s", v) SEG0."""
    bw = _bw()
    for f in fields:
        if f[0] == "b":
            bw.bits(f[1], f[2])
        elif f[0] == "e":
            bw.eg0(f[1])
        else:
            bw.seg0(f[1])
    return bw.getvalue()


def _ecsq_params(step: int = 0x3E80) -> list:
    return [("b", step, 16), ("b", 0, 8), ("s", 0)]


def invalid_v2(add) -> None:
    F, C, L = "SldFormatError", "SldChecksumError", "SldLimitError"

    def set_side(which: str, side: bytes):
        return lambda h, secs: h["modules"][0][which].__setitem__(2, side)

    # explicit table, P = 4, imin -1, imax 1, implied symbol 1: f0 = 9, f2 = 8 sum to 17 > 16
    add("v2_table_sum", v2_changed(set_side("A", _side(("b", 0, 1), ("b", 0, 1), ("b", 3, 4), ("s", -1), ("s", 0),
                                                        ("s", 0), ("e", 9), ("e", 8), *_ecsq_params()))),
        F, "13.2", "an explicit table whose frequencies exceed 2^P")
    add("v2_alphabet_over_256", v2_changed(set_side("A", _side(("b", 0, 1), ("b", 1, 1), ("b", 13, 4), ("s", -150),
                                                                ("s", 149 - 150), ("b", 0, 4), ("s", 0), ("s", 1),
                                                                *_ecsq_params()))),
        F, "13.4", "an ECSQ alphabet of 300 indices, over the cap of 256 levels")
    add("v2_index_outside_codebook", v2_changed(set_side("B", _side(
        ("b", 1, 1), ("b", 0, 1), ("b", 2, 4), ("s", 1), ("s", 2 + 1), ("s", 0), ("e", 3),
        ("b", 0, 3), ("b", 0x3F000000, 32), ("b", 0xB800, 16), ("b", 0x3400, 16)))),
        F, "13.4", "k-means indices 1..2 for a 1-bit (2-entry) codebook")
    add("v2_nonfinite_value", v2_changed(set_side("A", _side(("b", 0, 1), ("b", 1, 1), ("b", 13, 4), ("s", -200),
                                                              ("s", 0 - 200), ("b", 0, 4), ("s", 0), ("s", 1),
                                                              *_ecsq_params(0x7F00)))),
        F, "13.4", "step 2^127: the value of index -200 is not finite in float32")
    add("v2_step_not_normal", v2_changed(set_side("A", _side(("b", 0, 1), ("b", 1, 1), ("b", 13, 4), ("s", -1),
                                                              ("s", 0), ("b", 0, 4), ("s", 0), ("s", 1),
                                                              *_ecsq_params(0x0000)))),
        F, "13.4", "an ECSQ step of 0 (not a positive normal bfloat16)")
    h0, secs0 = v2_base()
    add("v2_side_info_past_end", v2_changed(set_side("A", h0["modules"][0]["A"][2][:2])),
        F, "13.1", "lora_A's side information ends inside its table")
    add("v2_side_info_trailing", v2_changed(set_side("A", h0["modules"][0]["A"][2] + b"\x01")),
        F, "13.1", "a byte after lora_A's side information")
    add("v2_stream_truncated", v2_changed(lambda h, secs: secs.__setitem__(0, secs[0][:-2])),
        F, "13.3", "lora_A's rANS stream lacks its last word", "verify")
    add("v2_stream_odd_length", v2_changed(lambda h, secs: secs.__setitem__(0, secs[0] + b"\x00")),
        F, "13.3", "lora_A's rANS stream has an odd number of word bytes", "verify")
    add("v2_state_below_range", v2_changed(lambda h, secs: secs.__setitem__(0, struct.pack("<I", 0xFFFF) + secs[0][4:])),
        F, "13.3", "an initial lane state of 2^16 - 1", "verify")
    add("v2_final_state", v2_changed(lambda h, secs: secs.__setitem__(
        1, secs[1][:-1] + bytes([secs[1][-1] ^ 0x40]))),
        F, "13.3", "a flipped bit in lora_B's stream: a final lane state is not 2^16", "verify")
    hf = copy.deepcopy(h0)
    good = v2_build(hf, list(secs0))  # hf now holds the lengths and the data CRC
    add("v2_data_crc", good[:-1] + bytes([good[-1] ^ 0x41]),
        C, "11.2", "one byte of the data area changed: the data CRC-32 does not match", "verify")
    add("v2_required_extension", v2_changed(lambda h, secs: h.__setitem__("required", ["zfp"])),
        F, "15.1", "'required' names an extension this reader does not implement")
    add("v2_lanes_zero", v2_changed(lambda h, secs: h.__setitem__("lanes", 0)), F, "12.1", "lanes 0")
    nocrc = copy.deepcopy(hf)
    nocrc.pop("crc32")
    add("v2_missing_crc", v2_build(nocrc, list(secs0), fix=False), F, "12.1", "no 'crc32' in the root map")
    order = {"metadata": {}, "modules": copy.deepcopy(hf["modules"]), "defaults": h0["defaults"], "lanes": 2, "crc32": 0, "tensors": []}
    add("v2_entries_before_defaults", v2_build(copy.deepcopy(order), list(secs0[:2])),
        F, "12.1", "'modules' comes before 'defaults' and 'lanes'")
    add("v2_descriptor_length", v2_changed(lambda h, secs: h["modules"][0]["A"].append(0)),
        F, "12.4", "a quantized tensor's descriptor with 4 elements")
    add("v2_encoding_unknown", v2_changed(lambda h, secs: h["modules"][0]["A"].__setitem__(0, 3)),
        F, "12.4", "tensor encoding 3")
    add("v2_shape_two_dims", v2_changed(lambda h, secs: h["modules"][0].__setitem__("shape", [3, 5])),
        F, "12.2", "a module shape without its rank")
    add("v2_module_unknown_key", v2_changed(lambda h, secs: h["modules"][0].__setitem__("bits", 3)),
        F, "12.2", "a module map with a key not in the table")
    out0, in0, _ = h0["modules"][0]["shape"]
    add("v2_weight_shape_product", v2_changed(lambda h, secs: h["modules"][0].__setitem__(
        "weight_shape", [out0, in0 + 1, 1])),
        F, "12.2", "a conv kernel shape whose in·k product is not the module's in_features")
    add("v2_weight_shape_fan_in_fan_out", v2_changed(lambda h, secs: h["modules"][0].update(
        weight_shape=[out0, in0, 1], fan_in_fan_out=True)),
        F, "12.2", "a conv module (weight_shape) marked fan_in_fan_out")
    add("v2_kind_missing", v2_changed(lambda h, secs: h["defaults"].pop("kind")),
        F, "12.2", "no 'kind' in the module nor in defaults")
    add("v2_prefix_past_previous", v2_changed(lambda h, secs: h["tensors"][0].__setitem__("p", 2)),
        F, "12.3", "a name prefix of 2 bytes after the 1-byte name 'm'")
    add("v2_fields_too_short", v2_changed(lambda h, secs: (
        h["tensors"][0].__setitem__("t", [1, 0, _side(("b", 0, 2), ("b", 0, 1), ("b", 0, 1), ("b", 0, 1))]),
        h["tensors"][0].__setitem__("shape", [5]))),
        F, "13.5", "a 5-value float16 tensor with 3 stored field streams in 12 bytes")
    # float32 field streams (13.5, extension f32_fields of 15): the extra 'x' (3 values) as F32
    # fields, all four streams stored (12 bytes)
    f32_all_stored = _side(("b", 2, 2), ("b", 0, 1), ("b", 0, 1), ("b", 0, 1), ("b", 0, 1))
    x_words = np.array([1.0, -2.0, 3.0], "<f4").view("<u4")
    x_fields = (((x_words >> 23) & 0xFF).astype(np.uint8).tobytes()
                + ((((x_words >> 24) & 0x80) | ((x_words >> 16) & 0x7F)).astype(np.uint8)).tobytes()
                + ((x_words >> 8) & 0xFF).astype(np.uint8).tobytes() + (x_words & 0xFF).astype(np.uint8).tobytes())

    def f32_extra(side: bytes, section: bytes, announce: bool = True):
        def fn(h, secs):
            h["tensors"][0]["t"] = [1, 0, side]
            secs[2] = section
            if announce:
                h["required"] = ["f32_fields"]
        return fn

    add("v2_f32_fields_without_required", v2_changed(f32_extra(f32_all_stored, x_fields, announce=False)),
        F, "13.5", "a tensor stored as F32 field streams in a file whose 'required' does not list 'f32_fields'")
    add("v2_fields_dtype_3", v2_changed(f32_extra(
        _side(("b", 3, 2), ("b", 0, 1), ("b", 0, 1), ("b", 0, 1), ("b", 0, 1)), x_fields)),
        F, "13.5", "field dtype code 3 (required lists 'f32_fields')")
    add("v2_f32_fields_too_short", v2_changed(f32_extra(f32_all_stored, x_fields[:-1])),
        F, "13.5", "a 3-value F32 tensor with 4 stored field streams in 11 bytes")
    # stream 0 coded under a param table over 250..260, the others stored
    add("v2_f32_table_alphabet", v2_changed(f32_extra(
        _side(("b", 2, 2), ("b", 1, 1), ("b", 1, 1), ("b", 7, 4), ("s", 250), ("s", 260 + 250), ("b", 0, 4),
              ("s", 0), ("s", 1), ("b", 0, 1), ("b", 0, 1), ("b", 0, 1)),
        struct.pack("<II", 1 << 16, 1 << 16) + x_fields[3:])),
        F, "13.5", "an F32 exponent stream whose table covers 250..260, outside 0..255")
    add("v2_too_many_entries", v2_build(None, list(secs0[:2]), fix=False, raw=(
        b"\x86" + kv("metadata", {}) + kv("defaults", h0["defaults"]) + kv("lanes", 2) + kv("crc32", 0)
        + msgpack.packb("modules") + msgpack.packb(hf["modules"], use_bin_type=True)
        + msgpack.packb("tensors") + a32(1 << 17) + b"\xc0" * (1 << 17))),
        L, "14.1", "one module and an array declaring 2^17 tensors (the count is refused before entries are read)")


def write_invalid() -> None:
    d = os.path.join(HERE, "invalid")
    os.makedirs(d, exist_ok=True)
    vecs = invalid()
    for fn in os.listdir(d):
        if os.path.splitext(fn)[0] not in vecs:
            os.remove(os.path.join(d, fn))
    for name, (data, cls, rule, reason, stage) in vecs.items():
        with open(os.path.join(d, f"{name}.sld"), "wb") as fh:
            fh.write(data)
        write_json(os.path.join(d, f"{name}.json"), {"error": cls, "rule": f"§{rule}", "reason": reason, "stage": stage})
    print(f"invalid: {len(vecs)} vectors, {sum(len(v[0]) for v in vecs.values()):,} bytes")


def write_crafted() -> None:
    for name, data in crafted().items():
        path = os.path.join(HERE, f"{name}.sld")
        with open(path, "wb") as fh:
            fh.write(data)
        write_json(os.path.join(HERE, f"{name}.expected.json"), expected(path, None))
        print(f"{name}: {len(data)} bytes")


SPEC = os.path.join(HERE, "..", "sld-format.md")
_BEGIN = "<!-- invalid-vectors: generated by spec/vectors/make_vectors.py --spec-table -->"
_END = "<!-- end invalid-vectors -->"


def write_spec_table() -> None:
    """The table of invalid vectors in spec section 9.3, between its two markers."""
    rows = ["| vector | error | rule | stage | what is wrong |", "|---|---|---|---|---|"]
    for name, (_, cls, rule, reason, stage) in invalid().items():
        rows.append(f"| `invalid/{name}` | {cls} | §{rule} | {stage} | {reason} |")
    text = open(SPEC, encoding="utf-8").read()
    head, rest = text.split(_BEGIN)
    _, tail = rest.split(_END)
    with open(SPEC, "w", encoding="utf-8") as fh:
        fh.write(head + _BEGIN + "\n\n" + "\n".join(rows) + "\n\n" + _END + tail)


def main() -> None:
    args = sys.argv[1:]
    if "--spec-table" not in args:
        if "--no-golden" not in args:
            golden([a for a in args if not a.startswith("--")] or None)
        write_crafted()
        write_invalid()
    write_spec_table()


if __name__ == "__main__":
    main()
