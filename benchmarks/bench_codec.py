"""Codec speed and size on a LLaMA-3-8B-shaped adapter (synthetic weights).

Shape: q, k, v, up, down on 32 layers; hidden 4096, kv 1024, MLP 14336 — 1,769,472 parameters
per unit of rank. Weights: A near its uniform init (U(±1/sqrt(in)) plus a little Gaussian drift),
B heavier-tailed (Student-t with 4 degrees of freedom, scale 1e-3), which is what trained LoRA
factors look like.

For each rank and bit width the table gives encode and decode throughput (params/s), the file
size, bits/param, and the file size against a bound: the zero-order entropy of every tensor's
indices plus 16 bits per codebook entry (header included in the file size). `--check-sse N`
also checks the quantizer's SSE on N sampled tensors against kmeans1d's exact optimum.

    python benchmarks/bench_codec.py                   # ranks 1 2 4 8 16, bits 1 2 3 4 5 8
    python benchmarks/bench_codec.py --ranks 16 --bits 3 8 --check-sse 6
    python benchmarks/bench_codec.py --plot out.png
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from deltacodec import encode, load  # noqa: E402
from deltacodec.adapter import Adapter, AdapterModule  # noqa: E402

HIDDEN, KV, MLP, LAYERS = 4096, 1024, 14336, 32
SHAPES = {  # out, in
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (KV, HIDDEN),
    "self_attn.v_proj": (KV, HIDDEN),
    "mlp.up_proj": (MLP, HIDDEN),
    "mlp.down_proj": (HIDDEN, MLP),
}
PAPER_RANK8_KB = {2: 4316, 3: 6028, 5: 9275}  # the paper's rank-8 LLaMA-3-8B adapters


def synthetic_adapter(rank: int, seed: int = 0, layers: int = LAYERS) -> Adapter:
    rng = np.random.default_rng(seed)
    mods = []
    for layer in range(layers):
        for name, (o, i) in SHAPES.items():
            bound = 1.0 / np.sqrt(i)
            A = rng.uniform(-bound, bound, (rank, i)) + rng.normal(0, 0.1 * bound, (rank, i))
            B = rng.standard_t(4, (o, rank)) * 1e-3
            mods.append(
                AdapterModule(
                    name=f"base_model.model.model.layers.{layer}.{name}",
                    A=A.astype(np.float32), B=B.astype(np.float32), scale=2.0,
                    sine=True, omega=200.0, gamma=float(np.sqrt(i)),
                )
            )
    return Adapter(modules=mods, config={"peft_type": "SINLORA", "r": rank, "lora_alpha": 2 * rank, "freq": 200.0})


def coded_index_bound_bytes(f) -> float:
    """Version 2: the indices' ideal code length under the coder's own tables (Σ P − log2 f_s),
    plus the side information as stored, plus raw/lossless sections as stored."""
    total_bits = 0.0
    for e in f.entries():
        if e.coder is not None and e.encoding == "codebook":
            t = e.coder[1].table
            sym = f.indices(e)
            c = np.bincount(sym, minlength=t.size)[: t.size]
            nz = c > 0
            total_bits += float((c[nz] * (t.precision - np.log2(t.freqs[nz]))).sum())
            total_bits += 8 * e.coder[1].nbytes
        else:
            total_bits += 8 * e.length
    return total_bits / 8


def entropy_bound_bytes(f) -> float:
    if f.version == 2:
        return coded_index_bound_bytes(f)
    total_bits = 0.0
    for e in f.entries():
        if e.encoding == "codebook":
            idx = f.indices(e)
            p = np.bincount(idx, minlength=1 << e.bits) / idx.size
            p = p[p > 0]
            total_bits += float(-(p * np.log2(p)).sum()) * idx.size + 16 * (1 << e.bits)
        else:
            total_bits += e.numel * e.bits
    return total_bits / 8


def exact_sse_ratio(x: np.ndarray, cb: np.ndarray, idx: np.ndarray, k: int) -> float:
    from kmeans1d.core import _DLL

    xd = np.ascontiguousarray(x, dtype=np.float64).reshape(-1)
    n = xd.size
    cl = np.empty(n, dtype=np.uint64)
    ce = np.empty(k, dtype=np.float64)
    _DLL.cluster(xd.ctypes.data_as(ctypes.c_void_p), ctypes.c_ulong(n), ctypes.c_ulong(k),
                 cl.ctypes.data_as(ctypes.c_void_p), ce.ctypes.data_as(ctypes.c_void_p))
    opt = float(((xd - ce[cl.astype(np.int64)]) ** 2).sum())
    got = float(((xd - cb.astype(np.float64)[idx]) ** 2).sum())
    return got / opt if opt > 0 else 1.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--bits", type=int, nargs="+", default=[1, 2, 3, 4, 5, 8])
    ap.add_argument("--layers", type=int, default=LAYERS, help="fewer layers for a quick look")
    ap.add_argument("--check-sse", type=int, default=0, metavar="N", help="check SSE vs exact on N tensors")
    ap.add_argument("--plot", help="write bits/param and throughput plots to this PNG")
    ap.add_argument("--quantizer", default="kmeans", choices=["kmeans", "uniform", "ecsq", "auto"],
                    help="ecsq/auto: --bits is the average bits/param target, the file is container 2, and "
                         "the bound is the coded-index bound (ideal code length under the stored tables + "
                         "side information)")
    ap.add_argument("--container", type=int, choices=[1, 2], default=None)
    args = ap.parse_args()

    rows = []
    hdr = (f"{'rank':>4} {'bits':>4} {'params':>11} {'enc s':>6} {'enc Mp/s':>8} {'dec s':>6} {'dec Mp/s':>8} "
           f"{'bytes':>11} {'KB':>8} {'bits/p':>6} {'bound KB':>9} {'file/bound':>10}" + ("  worst SSE/opt" if args.check_sse else ""))
    print(hdr)
    with tempfile.TemporaryDirectory() as tmp:
        for rank in args.ranks:
            adapter = synthetic_adapter(rank, layers=args.layers)
            params = sum(m.A.size + m.B.size for m in adapter.modules)
            for bits in args.bits:
                path = os.path.join(tmp, f"r{rank}b{bits}.sld")
                t0 = time.perf_counter()
                encode(adapter, bits=bits, out=path, force=True, quantizer=args.quantizer, container=args.container)
                t_enc = time.perf_counter() - t0
                t0 = time.perf_counter()
                f = load(path)
                for e in f.entries():
                    f.tensor(e)
                t_dec = time.perf_counter() - t0
                size = os.path.getsize(path)
                bound = entropy_bound_bytes(f)
                worst = ""
                if args.check_sse:
                    rng = np.random.default_rng(rank * 100 + bits)
                    picks = rng.choice(len(adapter.modules), size=min(args.check_sse, len(adapter.modules)), replace=False)
                    ratios = []
                    for i in picks:
                        m = adapter.modules[int(i)]
                        e = f.module(m.name)
                        for x, te in ((m.A, e.A), (m.B, e.B)):
                            if x.size * (1 << bits) > 60e6:  # exact reference would take > ~10 s
                                continue
                            if te.coder is not None:
                                continue
                            ratios.append(exact_sse_ratio(x, te.codebook, f.indices(te).astype(np.int64), 1 << bits))
                    worst = f"  {max(ratios) - 1:+.2e}" if ratios else "  (skipped)"
                row = dict(rank=rank, bits=bits, params=params, t_enc=t_enc, t_dec=t_dec, size=size, bound=bound)
                rows.append(row)
                print(f"{rank:>4} {bits:>4} {params:>11,} {t_enc:>6.2f} {params / t_enc / 1e6:>8.2f} {t_dec:>6.2f} "
                      f"{params / t_dec / 1e6:>8.1f} {size:>11,} {size / 1024:>8.0f} {8 * size / params:>6.3f} "
                      f"{bound / 1024:>9.0f} {size / bound:>10.4f}{worst}", flush=True)
                os.remove(path)
    if args.layers == LAYERS and 8 in args.ranks:
        print("\nThe paper's rank-8 adapters of this shape:", ", ".join(f"{b} bits {kb} KB" for b, kb in PAPER_RANK8_KB.items()))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for rank in args.ranks:
            rs = [r for r in rows if r["rank"] == rank]
            axes[0].plot([r["bits"] for r in rs], [8 * r["size"] / r["params"] for r in rs], "o-", label=f"rank {rank}")
            axes[1].plot([r["bits"] for r in rs], [r["params"] / r["t_enc"] / 1e6 for r in rs], "o-", label=f"rank {rank}")
        axes[0].set(xlabel="bits", ylabel="file bits / parameter", title="size")
        axes[1].set(xlabel="bits", ylabel="encode Mparams/s", title="encode throughput")
        for a in axes:
            a.grid(alpha=0.3)
            a.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
