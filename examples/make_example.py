"""Write the small sine-LoRA adapter shipped in examples/tiny-sine-adapter/ (deterministic).

It has the layout PEFT's save_pretrained produces for a 2-layer Llama-style model (hidden 256,
MLP 512, rank 8) on q/k/v/up/down projections, with a SineLoRA config (ω = 100, γ = sqrt(in)).
The values mimic a trained adapter: A near its uniform init, B small and heavy-tailed.
Only numpy and safetensors are needed.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from safetensors.numpy import save_file

HIDDEN, KV, MLP, LAYERS, RANK = 256, 64, 512, 2, 8


def build(out: str) -> None:
    rng = np.random.default_rng(20261124)
    shapes = {
        "self_attn.q_proj": (HIDDEN, HIDDEN),
        "self_attn.k_proj": (KV, HIDDEN),
        "self_attn.v_proj": (KV, HIDDEN),
        "mlp.up_proj": (MLP, HIDDEN),
        "mlp.down_proj": (HIDDEN, MLP),
    }
    tensors = {}
    for layer in range(LAYERS):
        for mod, (out_f, in_f) in shapes.items():
            prefix = f"base_model.model.model.layers.{layer}.{mod}"
            bound = 1.0 / np.sqrt(in_f)
            a = rng.uniform(-bound, bound, (RANK, in_f)) + rng.normal(0, 0.1 * bound, (RANK, in_f))
            b = rng.standard_t(4, (out_f, RANK)) * 2e-3
            tensors[f"{prefix}.lora_A.weight"] = a.astype(np.float32)
            tensors[f"{prefix}.lora_B.weight"] = b.astype(np.float32)
    config = {
        "peft_type": "SINLORA",
        "base_model_name_or_path": "tiny-llama-example",
        "r": RANK,
        "lora_alpha": 16,
        "freq": 100.0,
        "s": 1.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
        "fan_in_fan_out": False,
        "task_type": "CAUSAL_LM",
    }
    os.makedirs(out, exist_ok=True)
    save_file(tensors, os.path.join(out, "adapter_model.safetensors"))
    with open(os.path.join(out, "adapter_config.json"), "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2, sort_keys=True)
        fh.write("\n")


if __name__ == "__main__":
    build(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "tiny-sine-adapter"))
