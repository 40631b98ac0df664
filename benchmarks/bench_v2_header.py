"""Header bytes of container version 1 and 2 (spec part 2), on the examples adapter, a small
adapter as PEFT's ``save_pretrained`` writes it (its full ~40-key config; a 2-layer Llama of
testbed 2's shape, rank 4, random factors) and a LLaMA-3-8B-shaped one (32 layers × q, k, v, o,
up, down; rank 16; synthetic weights).

For each: the header (preamble + compressed msgpack) of version 1 with k-means at 3 bits, of
version 2 with the same k-means quantization, and of version 2 with ECSQ at 3 bits/param; then
the *container's own* bytes, the header recompressed without the quantizers' side information
(version 1: codebooks and their scales; version 2: the side-information blobs, which replace
zstd's in-section Huffman tables and the codebooks), the same for version 2 with the PEFT config
stored whole (``v2 whole``: spec 12.5's left-out default keys put back), and the file sizes.

    python benchmarks/bench_v2_header.py
"""

from __future__ import annotations

import os
import struct
import sys
import tempfile

import msgpack
import numpy as np
import zstandard

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import deltacodec  # noqa: E402
from deltacodec.adapter import Adapter, AdapterModule  # noqa: E402
from deltacodec.config_defaults import restore as restore_config  # noqa: E402

HIDDEN, KV, MLP = 4096, 1024, 14336
SHAPES = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (KV, HIDDEN), "self_attn.v_proj": (KV, HIDDEN),
          "self_attn.o_proj": (HIDDEN, HIDDEN), "mlp.up_proj": (MLP, HIDDEN), "mlp.down_proj": (HIDDEN, MLP)}


def llama_adapter(rank: int = 16, layers: int = 32, seed: int = 0) -> Adapter:
    rng = np.random.default_rng(seed)
    mods = []
    for layer in range(layers):
        for name, (o, i) in SHAPES.items():
            bound = 1.0 / np.sqrt(i)
            A = (rng.uniform(-bound, bound, (rank, i)) + rng.normal(0, 0.1 * bound, (rank, i))).astype(np.float32)
            B = (rng.standard_t(4, (o, rank)) * 1e-3).astype(np.float32)
            mods.append(AdapterModule(name=f"base_model.model.model.layers.{layer}.{name}", A=A, B=B, scale=2.0))
    return Adapter(modules=mods, config={"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
                                         "target_modules": sorted(n.split(".")[1] for n in SHAPES)})


def peft_saved_adapter(out: str, rank: int = 4, seed: int = 0) -> str:
    """A small adapter exactly as PEFT saves it: testbed 2's model shape (rd_text.py: hidden 96,
    MLP 256, 2 layers), LoRA on q, k, v, up, down, B drawn at random so the factors are not zero."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=96, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)
    pm = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=[
        "q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    pm.save_pretrained(out)
    return out


def container_bytes(path: str, whole_config: bool = False) -> int:
    data = open(path, "rb").read()
    (hlen,) = struct.unpack_from("<I", data, 12)
    h = msgpack.unpackb(zstandard.ZstdDecompressor().decompress(data[20:20 + hlen]), raw=False)
    if whole_config:
        h["metadata"] = restore_config(h["metadata"])
    for m in h["modules"]:
        for k in ("A", "B"):
            t = m[k]
            if isinstance(t, dict) and "codebook" in t:
                t["codebook"], t["codebook_scale"] = b"", 0.0
            elif isinstance(t, list) and t[0] in (0, 1):
                t[2] = b""
    return 20 + len(zstandard.ZstdCompressor(level=19).compress(msgpack.packb(h, use_bin_type=True)))


def main() -> None:
    root = os.path.join(os.path.dirname(__file__), "..")
    print(f"{'adapter':32} {'hdr v1':>7} {'hdr v2':>7} {'hdr v2e':>7} {'cont v1':>7} {'cont v2':>7} {'v2/v1':>6} "
          f"{'v2 whole':>8} {'file v1':>10} {'file v2':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        cases = [("examples/tiny-sine-adapter", os.path.join(root, "examples", "tiny-sine-adapter")),
                 ("PEFT-saved 2-layer r4 (10 modules)", peft_saved_adapter(os.path.join(tmp, "peft-r4"))),
                 ("LLaMA-shaped r16 (192 modules)", llama_adapter())]
        for label, src in cases:
            p1 = deltacodec.encode(src, bits=3, container=1, out=os.path.join(tmp, "1.sld"), force=True)
            p2 = deltacodec.encode(src, bits=3, container=2, out=os.path.join(tmp, "2.sld"), force=True)
            p3 = deltacodec.encode(src, bits=3, quantizer="ecsq", out=os.path.join(tmp, "3.sld"), force=True)
            h = [deltacodec.load(p).header_size for p in (p1, p2, p3)]
            c1, c2, cw = container_bytes(p1), container_bytes(p2), container_bytes(p2, whole_config=True)
            print(f"{label:32} {h[0]:>7,} {h[1]:>7,} {h[2]:>7,} {c1:>7,} {c2:>7,} {c2 / c1:>6.2f} {cw:>8,} "
                  f"{os.path.getsize(p1):>10,} {os.path.getsize(p2):>10,}", flush=True)


if __name__ == "__main__":
    main()
