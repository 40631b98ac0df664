"""The original Stable Diffusion UNet's module names for a diffusers ``UNet2DConditionModel``.

kohya-ss' sd-scripts train SDXL LoRAs on the UNet as Stability's code builds it ("SGM" naming:
``input_blocks.N.K``, ``middle_block.K``, ``output_blocks.N.K``), so their stems read
``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``, while a diffusers pipeline's UNet
names that module ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``. This module
maps a diffusers UNet module name to its SGM name, from the UNet's block structure (its config's
``layers_per_block``, ``down_block_types``, ``up_block_types``); apply uses it to resolve such
stems. The correspondence, kept as data below:

* ``input_blocks.0.0`` is ``conv_in``; each down block ``i`` then takes ``layers_per_block[i]``
  consecutive input blocks (sub-block 0 its resnet, 1 its attention), followed, except for the
  last down block, by one holding the downsampler (``.0.op``);
* ``middle_block.0/1/2`` are ``mid_block.resnets.0``, ``mid_block.attentions.0``,
  ``mid_block.resnets.1``;
* each up block takes ``layers_per_block`` (reversed) + 1 consecutive output blocks (sub-block 0
  its resnet, 1 its attention); its upsampler sits in the last of them, at sub-block 2 when the
  block has attentions, else 1 (``.conv``);
* inside a resnet, the layers are renamed (``_RESNET``); inside an attention (a
  ``Transformer2DModel``) the names are the same in both.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

__all__ = ["sgm_name", "unet_structure"]

# diffusers ResnetBlock2D layer -> the original ResBlock's
_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_MID = {("resnets", 0): 0, ("attentions", 0): 1, ("resnets", 1): 2}

_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions)\.(\d+)(?:\.(.+))?$")
_SAMPLER = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(downsamplers|upsamplers)\.0\.conv(?:\.(.+))?$")
_MIDRE = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)(?:\.(.+))?$")


def unet_structure(module: Any) -> tuple[list[int], list[bool]] | None:
    """(layers per down block, whether each up block has attentions) from a diffusers UNet's
    config, or None when ``module`` is not one (no such config)."""
    cfg = getattr(module, "config", None)
    get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
    down, up, layers = get("down_block_types"), get("up_block_types"), get("layers_per_block")
    if not isinstance(down, (list, tuple)) or not isinstance(up, (list, tuple)) or len(down) != len(up) or not down:
        return None
    if isinstance(layers, int):
        layers = [layers] * len(down)
    if not isinstance(layers, (list, tuple)) or len(layers) != len(down) or not all(isinstance(n, int) and n > 0 for n in layers):
        return None
    return list(layers), ["CrossAttn" in str(t) for t in up]


def _resnet_rest(rest: str | None) -> str | None:
    if rest is None:
        return None
    head, dot, tail = rest.partition(".")
    mapped = _RESNET.get(head)
    return None if mapped is None else mapped + dot + tail


def _join(*parts: Any) -> str:
    return ".".join(str(p) for p in parts if p is not None and p != "")


def sgm_name(name: str, layers: Sequence[int], up_attention: Sequence[bool]) -> str | None:
    """The SGM name of the diffusers UNet module ``name`` (see the module docs), or None for a
    module with no counterpart (a container such as ``down_blocks.0``, a layer the map does not
    cover). ``layers``, ``up_attention``: from :func:`unet_structure`."""
    n = len(layers)
    if name in _TOP:
        return _TOP[name]
    m = _BLOCK.match(name)
    if m:
        side, i, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        if i >= n:
            return None
        if kind == "resnets":
            rest = _resnet_rest(rest)
            if m.group(5) is not None and rest is None:
                return None
        sub = 0 if kind == "resnets" else 1
        if side == "down_blocks":
            if j >= layers[i]:
                return None
            start = 1 + sum(layers[k] + 1 for k in range(i))
            return _join("input_blocks", start + j, sub, rest)
        up_layers = [layers[n - 1 - k] + 1 for k in range(n)]  # up block k mirrors down block n-1-k, one layer more
        if j >= up_layers[i]:
            return None
        return _join("output_blocks", sum(up_layers[:i]) + j, sub, rest)
    m = _SAMPLER.match(name)
    if m:
        side, i, rest = m.group(1), int(m.group(2)), m.group(4)
        if i >= n:
            return None
        if side == "down_blocks":
            if i == n - 1:
                return None  # the last down block has no downsampler in the original UNet
            return _join("input_blocks", sum(layers[k] + 1 for k in range(i + 1)), 0, "op", rest)
        up_layers = [layers[n - 1 - k] + 1 for k in range(n)]
        return _join("output_blocks", sum(up_layers[: i + 1]) - 1, 2 if up_attention[i] else 1, "conv", rest)
    m = _MIDRE.match(name)
    if m:
        k = _MID.get((m.group(1), int(m.group(2))))
        if k is None:
            return None
        rest = m.group(3)
        if m.group(1) == "resnets":
            mapped = _resnet_rest(rest)
            if rest is not None and mapped is None:
                return None
            rest = mapped
        return _join("middle_block", k, rest)
    return None
