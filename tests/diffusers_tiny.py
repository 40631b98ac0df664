"""Tiny diffusers pipelines built from configs (no download), LoRAs made on them with PEFT and
saved the way diffusers' DreamBooth LoRA scripts save, and a plain kohya-ss key conversion.

The SD pipeline has no tokenizer (none can be built offline without vocabulary files); nothing
here needs one: the tests call the text encoders on token ids and the UNet / transformer on
latents themselves, which is one denoising step of the pipeline.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch

diffusers = __import__("diffusers")
transformers = __import__("transformers")
peft = __import__("peft")

from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from peft import LoraConfig, inject_adapter_in_model  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def _quiet():
    # diffusers' scheduler deprecation notices and transformers' config notes are not ours
    warnings.filterwarnings("ignore", category=FutureWarning)
    transformers.logging.set_verbosity_error()
    diffusers.utils.logging.set_verbosity_error()


def clip_config(hidden: int = 8) -> CLIPTextConfig:
    return CLIPTextConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=2,
                          vocab_size=100, projection_dim=hidden, max_position_embeddings=16, bos_token_id=0,
                          eos_token_id=1, pad_token_id=1)


def sd_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    """A Stable-Diffusion-shaped pipeline: UNet2DConditionModel (2 blocks, cross-attention 8),
    CLIPTextModel (hidden 8, 2 layers), a tiny VAE, DDIM. Same seed, same weights."""
    _quiet()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, norm_num_groups=2, attention_head_dim=2,
    )
    te = CLIPTextModel(clip_config(8))
    vae = AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=2,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=None, unet=unet, scheduler=DDIMScheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(dtype=dtype)
    for m in (unet, te, vae):
        m.eval()
    return pipe


def sd3_pipeline(seed: int = 0):
    """An SD3-shaped pipeline: SD3Transformer2DModel (2 joint layers), two CLIPTextModelWithProjection
    of different widths (SD3's clip-l and clip-g), no T5, a tiny VAE, flow-matching Euler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    _quiet()
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=4,
                                        num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=8,
                                        pooled_projection_dim=24, out_channels=4)
    te1 = CLIPTextModelWithProjection(clip_config(8))
    te2 = CLIPTextModelWithProjection(clip_config(16))
    vae = AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=2,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                                    text_encoder=te1, tokenizer=None, text_encoder_2=te2, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)
    for m in (transformer, te1, te2, vae):
        m.eval()
    return pipe


def add_lora(module: torch.nn.Module, targets: list[str], r: int, alpha: float, seed: int, config=None,
             fp16_exact: bool = True) -> None:
    """A LoRA (or the given PEFT config) on ``module`` with random A and B (so ΔW ≠ 0).
    ``fp16_exact``: factors rounded to float16 values (kept in their float32 parameters), so a
    16-bit .sld holds them exactly and only the summation order can differ from diffusers' fuse."""
    cfg = config or LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    if hasattr(module, "add_adapter") and isinstance(module, diffusers.ModelMixin):
        module.add_adapter(cfg)
    else:  # transformers' add_adapter insists on a newer PEFT than the test environment has
        inject_adapter_in_model(cfg, module)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if "lora_A" in name else 0.05))
                if fp16_exact:
                    p.copy_(p.half().float())


def lora_state(module: torch.nn.Module, convert: bool) -> dict[str, torch.Tensor]:
    """The module's LoRA state dict as the DreamBooth scripts take it: PEFT's, turned into
    diffusers' own key names (lora.down / lora_linear_layer.down) by the SD 1.x/SDXL scripts."""
    sd = get_peft_model_state_dict(module)
    if convert:
        from diffusers.utils import convert_state_dict_to_diffusers

        sd = convert_state_dict_to_diffusers(sd)
    return sd


def save_sd_lora(pipe, out_dir: str, *, with_metadata: bool = True, convert: bool = True) -> str:
    """pipe's UNet and text-encoder LoRAs saved as train_dreambooth_lora.py saves them; returns
    the weights file."""
    from diffusers.training_utils import _collate_lora_metadata

    meta = _collate_lora_metadata({"unet": pipe.unet, "text_encoder": pipe.text_encoder}) if with_metadata else {}
    StableDiffusionPipeline.save_lora_weights(
        out_dir, unet_lora_layers=lora_state(pipe.unet, convert), text_encoder_lora_layers=lora_state(pipe.text_encoder, convert),
        **meta,
    )
    return os.path.join(out_dir, "pytorch_lora_weights.safetensors")


def save_sd3_lora(pipe, out_dir: str) -> str:
    """pipe's transformer and text-encoder LoRAs saved as train_dreambooth_lora_sd3.py saves them."""
    from diffusers import StableDiffusion3Pipeline
    from diffusers.training_utils import _collate_lora_metadata

    mods = {"transformer": pipe.transformer, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    StableDiffusion3Pipeline.save_lora_weights(
        out_dir, transformer_lora_layers=lora_state(pipe.transformer, False),
        text_encoder_lora_layers=lora_state(pipe.text_encoder, False),
        text_encoder_2_lora_layers=lora_state(pipe.text_encoder_2, False), **_collate_lora_metadata(mods),
    )
    return os.path.join(out_dir, "pytorch_lora_weights.safetensors")


def to_kohya(diffusers_file: str, out: str, alphas: dict[str, float]) -> dict[str, np.ndarray]:
    """A kohya-ss file from a diffusers-layout one, by a plain key conversion: component prefix
    to lora_unet_ / lora_te_, dots of the module name to underscores, A/down and B/up, and an
    alpha per module (``alphas``: component -> alpha). Text-encoder names get CLIP's
    ``text_model.`` level back (older transformers had it; kohya files name it)."""
    from safetensors.numpy import load_file, save_file

    src = load_file(diffusers_file)
    prefix = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
    out_t: dict[str, np.ndarray] = {}
    for key, v in src.items():
        comp, _, rest = key.partition(".")
        for a, b in ((".lora.down.weight", "down"), (".lora.up.weight", "up"), (".lora_linear_layer.down.weight", "down"),
                     (".lora_linear_layer.up.weight", "up"), (".lora_A.weight", "down"), (".lora_B.weight", "up")):
            if rest.endswith(a):
                mod = rest[: -len(a)]
                if comp.startswith("text_encoder") and not mod.startswith("text_model."):
                    mod = "text_model." + mod
                stem = prefix[comp] + mod.replace(".", "_")
                out_t[f"{stem}.lora_{b}.weight"] = v.astype(np.float16)
                out_t[f"{stem}.alpha"] = np.array(alphas[comp], np.float16)
                break
        else:
            raise AssertionError(key)
    save_file(out_t, out, metadata={"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_output_name": "tiny"})
    return out_t
