"""Regenerate the golden vectors in this folder (run from the repository root).

    python spec/vectors/make_vectors.py

For each vector: <name>.source.safetensors (the adapter, config in its metadata),
<name>.sld (what deltacodec's writer makes of it with the options below) and
<name>.expected.json (the options, header facts, and every decoded tensor as float32 bit
patterns in hex — exact). Regenerate only when the writer's output changes on purpose (a
quantizer change, a format change), and say why in the commit.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import zstandard

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import deltacodec  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

VECTORS = {
    "lora_1bit_none": dict(kind="lora", bits=1, level=0, quantizer="kmeans", extras=False),
    # larger tensors: zstd only pays (and is only kept) past a few hundred indices
    "sine_3bit_zstd": dict(kind="sine", bits=3, level=1, quantizer="kmeans", extras=False, scale=8),
    "sine_5bit_dense": dict(kind="sine", bits=5, level=0, quantizer="uniform", extras=False),
    "mixed_16bit_extras": dict(kind="sine", bits=16, level=1, quantizer="kmeans", extras=True),
}


def source(name: str, spec: dict) -> str:
    import torch
    from safetensors.torch import save_file

    rng = np.random.default_rng(sum(map(ord, name)))
    tensors = {}
    k = spec.get("scale", 1)
    for mod, (o, i) in {"model.layers.0.self_attn.q_proj": (12 * k, 20 * k), "model.layers.0.mlp.down_proj": (20 * k, 36 * k)}.items():
        tensors[f"base_model.model.{mod}.lora_A.weight"] = torch.from_numpy(
            rng.uniform(-1, 1, (8, i)).astype(np.float32) / np.sqrt(i))
        tensors[f"base_model.model.{mod}.lora_B.weight"] = torch.from_numpy(
            (rng.standard_t(4, (o, 8)) * 1e-2).astype(np.float32))
    if spec["extras"]:
        tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.from_numpy(
            rng.normal(1, 0.1, 12).astype(np.float32)).to(torch.bfloat16)
        tensors["base_model.model.lm_head.bias"] = torch.from_numpy(rng.normal(0, 1, 7).astype(np.float32))
    cfg = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "base_model_name_or_path": "golden"}
    if spec["kind"] == "sine":
        cfg.update(peft_type="SINLORA", freq=60.0)
    path = os.path.join(HERE, f"{name}.source.safetensors")
    save_file(tensors, path, metadata={"adapter_config": json.dumps(cfg, sort_keys=True)})
    return path


def hexbits(a: np.ndarray) -> list[str]:
    return [f"{v:08x}" for v in np.asarray(a, dtype=np.float32).reshape(-1).view(np.uint32).tolist()]


def expected(path: str, spec: dict) -> dict:
    f = deltacodec.load(path)
    return {
        "options": {key: spec[key] for key in ("bits", "level", "quantizer")},
        "zstd_version": zstandard.ZSTD_VERSION,
        "file_bytes": f.file_size,
        "modules": [
            {"name": m.name, "kind": "sine" if m.sine else "lora", "out_features": m.out_features,
             "in_features": m.in_features, "rank": m.rank, "scale": m.scale, "omega": m.omega,
             "gamma": m.gamma, "fan_in_fan_out": m.fan_in_fan_out}
            for m in f.modules
        ],
        "tensors": {
            e.name: {"shape": list(e.shape), "encoding": e.encoding, "bits": e.bits, "width": e.width,
                     "dtype": e.dtype, "compression": e.compression, "values_f32_hex": hexbits(f.tensor(e))}
            for e in f.entries()
        },
    }


def main() -> None:
    for name, spec in VECTORS.items():
        src = source(name, spec)
        out = os.path.join(HERE, f"{name}.sld")
        deltacodec.encode(src, bits=spec["bits"], out=out, level=spec["level"], quantizer=spec["quantizer"])
        with open(os.path.join(HERE, f"{name}.expected.json"), "w") as fh:
            json.dump(expected(out, spec), fh, indent=1, sort_keys=True)
            fh.write("\n")
        print(f"{name}: {os.path.getsize(out)} bytes")


if __name__ == "__main__":
    main()
