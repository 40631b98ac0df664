"""Adapter files in the diffusers and kohya-ss layouts, written plainly with numpy (no torch):
the tests of the layouts build their inputs here."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from deltacodec.safetensors_io import TensorSpec, read_header, write_safetensors

_DT = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.float64): "F64"}


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 values that are exact bfloat16 values, as their bfloat16 bit patterns."""
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
    assert not (bits & 0xFFFF).any(), "not a bfloat16 value"
    return (bits >> 16).astype(np.uint16)


def write_st(path: str, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> str:
    """``tensors``: name -> numpy array (F32/F16/F64), or (float32 array, "BF16")."""
    specs = {}
    for name, v in tensors.items():
        if isinstance(v, tuple):
            arr, dt = v
            assert dt == "BF16"
            bits = bf16_bits(arr)
            specs[name] = TensorSpec("BF16", tuple(arr.shape), lambda b=bits: [b])
        else:
            arr = np.asarray(v)
            specs[name] = TensorSpec(_DT[arr.dtype], tuple(arr.shape), lambda a=arr: [a])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as fh:
        write_safetensors(fh, specs, metadata)
    return path


def read_st(path: str) -> tuple[dict[str, tuple[np.ndarray, str]], dict[str, str]]:
    """Every tensor of a safetensors file as (float values, dtype), shapes kept (0-d included),
    and its metadata; read with the header reader and numpy alone."""
    head = read_header(path, AssertionError)
    out = {}
    with open(path, "rb") as fh:
        for e in head.entries:
            fh.seek(e.start)
            raw = fh.read(e.end - e.start)
            if e.dtype == "BF16":
                v = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
            else:
                v = np.frombuffer(raw, {"F32": "<f4", "F16": "<f2", "F64": "<f8"}[e.dtype])
            out[e.name] = (v.reshape(e.shape), e.dtype)
    return out, dict(head.metadata or {})


def kohya_module(stem: str, out: int, inp: int, r: int, alpha: float | None, rng: np.random.Generator, *,
                 kernel: tuple[int, int] | None = None, dtype=np.float16, alpha_shape=()) -> dict[str, Any]:
    """One kohya-ss module: down r×in (×kh×kw), up out×r (×1×1), alpha (if given)."""
    down_shape = (r, inp, *kernel) if kernel else (r, inp)
    up_shape = (out, r, 1, 1) if kernel else (out, r)
    t: dict[str, Any] = {
        f"{stem}.lora_down.weight": (rng.standard_normal(down_shape) * 0.3).astype(dtype),
        f"{stem}.lora_up.weight": (rng.standard_normal(up_shape) * 0.05).astype(dtype),
    }
    if alpha is not None:
        t[f"{stem}.alpha"] = np.full(alpha_shape, alpha, dtype)
    return t


KOHYA_META = {"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "2",
              "ss_tag_frequency": '{"x": {"a photo": 3}}', "ss_output_name": "tiny"}


def kohya_file(path: str, rng: np.random.Generator, **kw: Any) -> dict[str, Any]:
    """A kohya-ss SD file: UNet attention projections and a CLIP projection with different ranks
    and alphas, F16 with F16 0-d alphas."""
    t: dict[str, Any] = {}
    t.update(kohya_module("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", 16, 16, 4, 2.0, rng, **kw))
    t.update(kohya_module("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 16, 8, 4, 1.0, rng, **kw))
    t.update(kohya_module("lora_unet_mid_block_attentions_0_proj_out", 32, 32, 8, 8.0, rng, **kw))
    t.update(kohya_module("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 8, 8, 2, 1.5, rng, **kw))
    write_st(path, t, KOHYA_META)
    return t


def diffusers_module(mod: str, out: int, inp: int, r: int, rng: np.random.Generator, style: str = "peft",
                     dtype=np.float32) -> dict[str, np.ndarray]:
    a_key, b_key = {"peft": ("lora_A.weight", "lora_B.weight"), "lora": ("lora.down.weight", "lora.up.weight"),
                    "lora_linear_layer": ("lora_linear_layer.down.weight", "lora_linear_layer.up.weight")}[style]
    return {f"{mod}.{a_key}": (rng.standard_normal((r, inp)) * 0.3).astype(dtype),
            f"{mod}.{b_key}": (rng.standard_normal((out, r)) * 0.05).astype(dtype)}
