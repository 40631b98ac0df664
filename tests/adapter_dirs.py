"""Adapter directories for tests: PEFT layout written plainly, with any config text or tensors."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

MODULES = (("layers.0.q_proj", 32, 48), ("layers.0.down_proj", 48, 64))
BASE_CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "base_model_name_or_path": "tiny",
               "target_modules": ["q_proj", "down_proj"]}


def lora_tensors(modules=MODULES, rank: int = 4, seed: int = 0, prefix: str = "base_model.model.") -> dict[str, np.ndarray]:
    """lora_A (r×in) and lora_B (out×r) of each (name, out, in), float32, PEFT key layout."""
    rng = np.random.default_rng(seed)
    out = {}
    for mod, o, i in modules:
        out[f"{prefix}{mod}.lora_A.weight"] = rng.uniform(-0.1, 0.1, (rank, i)).astype(np.float32)
        out[f"{prefix}{mod}.lora_B.weight"] = (rng.standard_normal((o, rank)) * 0.01).astype(np.float32)
    return out


def save_tensors(path: str, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> None:
    """numpy or torch tensors to ``path`` (.safetensors or a torch .bin)."""
    import torch

    as_torch = {k: (v if isinstance(v, torch.Tensor) else torch.from_numpy(np.require(v, requirements="C"))) for k, v in tensors.items()}
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(as_torch, path, metadata=metadata)
    else:
        torch.save(as_torch, path)


def write_dir(
    path: str | os.PathLike[str],
    tensors: dict[str, Any] | None = None,
    config: Any = BASE_CONFIG,
    *,
    config_text: str | bytes | None = None,
    fmt: str = "safetensors",
    in_metadata: bool = False,
) -> str:
    """An adapter directory; ``config=None`` writes no config, ``config_text`` writes raw text,
    ``in_metadata`` puts the config in the safetensors metadata instead of a file."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    tensors = lora_tensors() if tensors is None else tensors
    text = config_text if config_text is not None else (None if config is None else json.dumps(config))
    weights = os.path.join(path, f"adapter_model.{fmt}")
    metadata = {"adapter_config": text if isinstance(text, str) else text.decode("utf-8", "surrogatepass")} if in_metadata and text is not None else None
    save_tensors(weights, tensors, metadata)
    if text is not None and not in_metadata:
        with open(os.path.join(path, "adapter_config.json"), "wb") as fh:
            fh.write(text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text)
    return path
