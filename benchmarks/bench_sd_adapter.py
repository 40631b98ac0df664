"""File size of an SDXL-shaped text-to-image LoRA (synthetic weights) at 2/3/4 bits, against fp16.

Shape: what diffusers' train_dreambooth_lora_sdxl.py adapts, to_q, to_k, to_v and to_out.0 of
every attention of SDXL's UNet (block_out_channels 320/640/1280, transformer_layers_per_block
1/2/10 on the down path, 10 in the middle, 10/2 on the up path as diffusers builds it from
stabilityai/stable-diffusion-xl-base-1.0's unet/config.json; cross-attention dim 2048): 140
attention layers, 1,451,520 parameters per unit of rank. `--from-diffusers` enumerates the same
modules from a UNet2DConditionModel built on the meta device (no weights, no download) instead.

Weights as in bench_codec.py: A near its uniform init, B Student-t(4) · 1e-3 (trained LoRA
factors look like that). Stored as the DreamBooth script stores them, in the diffusers layout.

    python benchmarks/bench_sd_adapter.py                      # ranks 4 32, bits 2 3 4
    python benchmarks/bench_sd_adapter.py --ranks 4 --bits 3 --from-diffusers
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from deltacodec import encode, load  # noqa: E402
from deltacodec.adapter import Adapter, AdapterModule  # noqa: E402

CROSS = 2048
SDXL = {  # (block path, channels, attentions, transformer layers each)
    "down_blocks.1": (640, 2, 2),
    "down_blocks.2": (1280, 2, 10),
    "mid_block": (1280, 1, 10),
    "up_blocks.0": (1280, 3, 10),
    "up_blocks.1": (640, 3, 2),
}


def sdxl_shapes() -> dict[str, tuple[int, int]]:
    """module name (diffusers' UNet naming) -> (out, in) of every targeted projection."""
    out = {}
    for block, (c, n_attn, n_layers) in SDXL.items():
        for a in range(n_attn):
            for t in range(n_layers):
                p = f"{block}.attentions.{a}.transformer_blocks.{t}"
                for attn, kv_in in (("attn1", c), ("attn2", CROSS)):
                    out[f"{p}.{attn}.to_q"] = (c, c)
                    out[f"{p}.{attn}.to_k"] = (c, kv_in)
                    out[f"{p}.{attn}.to_v"] = (c, kv_in)
                    out[f"{p}.{attn}.to_out.0"] = (c, c)
    return out


def diffusers_shapes() -> dict[str, tuple[int, int]]:
    import torch
    from diffusers import UNet2DConditionModel

    cfg = dict(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20), cross_attention_dim=CROSS, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    )
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg)
    return {n: tuple(m.weight.shape) for n, m in unet.named_modules()
            if n.split(".")[-1] in ("to_q", "to_k", "to_v") or n.endswith("to_out.0")}


def synthetic(shapes: dict[str, tuple[int, int]], rank: int, seed: int = 0) -> Adapter:
    rng = np.random.default_rng(seed)
    mods = []
    for name, (o, i) in shapes.items():
        bound = 1.0 / np.sqrt(i)
        A = rng.uniform(-bound, bound, (rank, i)) + rng.normal(0, 0.1 * bound, (rank, i))
        B = rng.standard_t(4, (o, rank)) * 1e-3
        mods.append(AdapterModule(name=f"unet.{name}", A=A.astype(np.float32), B=B.astype(np.float32), scale=1.0))
    info = {"version": 1, "file_name": "pytorch_lora_weights.safetensors", "metadata": {"format": "pt"}, "key_style": {"unet": "lora"}}
    return Adapter(modules=mods, config={}, layout="diffusers", layout_info=info)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[4, 32])
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--from-diffusers", action="store_true", help="enumerate the modules from a meta-device UNet")
    args = ap.parse_args()
    shapes = diffusers_shapes() if args.from_diffusers else sdxl_shapes()
    per_rank = sum(o + i for o, i in shapes.values())
    print(f"SDXL UNet attention LoRA: {len(shapes)} projections, {per_rank:,} parameters per unit of rank")
    print(f"{'rank':>4}  {'params':>11}  {'fp16 bytes':>12}  {'bits':>4}  {'.sld bytes':>12}  {'bytes/param':>11}  "
          f"{'bits/param':>10}  {'vs fp16':>7}  {'encode s':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for r in args.ranks:
            adapter = synthetic(shapes, r)
            n = per_rank * r
            for b in args.bits:
                out = os.path.join(tmp, f"r{r}b{b}.sld")
                t0 = time.perf_counter()
                encode(adapter, bits=b, out=out, force=True)
                dt = time.perf_counter() - t0
                size = os.path.getsize(out)
                assert sum(e.numel for e in load(out).entries()) == n
                print(f"{r:>4}  {n:>11,}  {2 * n:>12,}  {b:>4}  {size:>12,}  {size / n:>11.4f}  {8 * size / n:>10.3f}  "
                      f"{2 * n / size:>6.2f}x  {dt:>8.2f}")


if __name__ == "__main__":
    main()
