"""Benchmark patching LLaMA-3-8B-shaped weights with a 3-bit sine-LoRA delta.

Per module shape (out x in) and rank, on CPU:

* naive  -- ``W += scale * torch.sin(omega * (B @ A)) / gamma`` on already-dequantized fp32 factors
* torch  -- :func:`deltacodec.kernels.delta_add_torch` on the packed factors (dequantization included)
* floor  -- measured in the same run: one ``torch.sin`` pass over a preallocated fp32 buffer of
  W's size (in place) plus the rank-r ``torch.matmul`` into such a buffer.  Any implementation
  must at least form B @ A and take its sine, so ``torch / floor`` says how much the torch backend
  spends beyond that (the final read-modify-write of W, the extra scalings), and
  ``naive / torch`` what it saves.

With CUDA available, the same shapes on the GPU: naive, torch backend, the fused Triton kernel,
and the read+write bandwidth bound of W (2 * W bytes at the bandwidth of a large device copy).

Whole model: LLaMA-3-8B has 32 layers of q, k, v, o (4096x4096, 1024x4096, 1024x4096,
4096x4096), gate, up (14336x4096) and down (4096x14336); the whole-model line sums the per-shape
times with those multiplicities.

Usage: python benchmarks/bench_apply.py [--dtype float32|float16|bfloat16] [--ranks 8 16]
       [--repeat 5] [--shapes q,o ...] [--plot out.png]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from deltacodec.kernels import PackedFactor, delta_add_torch, delta_add_triton, dequantize_torch, triton_available

SHAPES = [  # (name, out, in, modules of this shape per layer)
    ("q,o", 4096, 4096, 2),
    ("k,v", 1024, 4096, 2),
    ("gate,up", 14336, 4096, 2),
    ("down", 4096, 14336, 1),
]
LAYERS = 32
BITS = 3
SCALE, OMEGA, GAMMA = 2.0, 300.0, 64.0


def pack(indices: np.ndarray, width: int) -> torch.Tensor:
    """LSB-first bit stream of `width`-bit fields (the PackedFactor layout)."""
    bits = (indices.reshape(-1, 1) >> np.arange(width)) & 1
    return torch.from_numpy(np.packbits(bits.astype(np.uint8).reshape(-1), bitorder="little"))


def random_factor(rng: np.random.Generator, shape: tuple[int, int], spread: float) -> PackedFactor:
    codebook = torch.from_numpy(np.sort(rng.standard_normal(1 << BITS) * spread).astype(np.float32))
    indices = rng.integers(0, 1 << BITS, size=shape[0] * shape[1])
    return PackedFactor(pack(indices, BITS), codebook, BITS, BITS, shape)


def time_cpu(fn, repeat: int) -> float:
    """Best-of-`repeat` wall time in ms, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def time_cuda(fn, repeat: int) -> float:
    """Median of `repeat` CUDA-event timings in ms, after warm-up (including JIT compilation)."""
    fn()
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def make_problem(out_f: int, in_f: int, rank: int, dtype: torch.dtype, device: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    spread = (3.0 / OMEGA / rank**0.5) ** 0.5  # omega * (B @ A) spans a few radians
    A = random_factor(rng, (rank, in_f), spread)
    B = random_factor(rng, (out_f, rank), spread)
    W = torch.randn(out_f, in_f, device=device).to(dtype)
    return W, A, B


def bench_cpu(rank: int, dtype: torch.dtype, repeat: int, shapes=SHAPES) -> dict:
    rows = {}
    params = dict(scale=SCALE, omega=OMEGA, gamma=GAMMA, sine=True, fan_in_fan_out=False)
    for name, out_f, in_f, _ in shapes:
        W, A, B = make_problem(out_f, in_f, rank, dtype, "cpu")
        a, b = dequantize_torch(A), dequantize_torch(B)

        def naive():
            W.add_(SCALE * torch.sin(OMEGA * (b @ a)) / GAMMA)

        t_naive = time_cpu(naive, repeat)
        t_torch = time_cpu(lambda: delta_add_torch(W, A, B, **params), repeat)
        buf = torch.empty(out_f, in_f)
        t_mm = time_cpu(lambda: torch.matmul(b, a, out=buf), repeat)
        t_sin = time_cpu(lambda: torch.sin(buf, out=buf), repeat)
        del buf
        rows[name] = dict(naive=t_naive, torch=t_torch, sin=t_sin, matmul=t_mm, floor=t_sin + t_mm)
    return rows


def bench_cuda(rank: int, dtype: torch.dtype, repeat: int, shapes=SHAPES) -> dict:
    # Device read+write bandwidth from a large copy (reads and writes 512 MiB each).
    src = torch.empty(1 << 27, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    t_copy = time_cuda(lambda: dst.copy_(src), repeat)
    bandwidth = 2 * src.numel() * 4 / (t_copy * 1e-3)  # bytes / s
    del src, dst
    rows = {}
    params = dict(scale=SCALE, omega=OMEGA, gamma=GAMMA, sine=True, fan_in_fan_out=False)
    for name, out_f, in_f, _ in shapes:
        W, A, B = make_problem(out_f, in_f, rank, dtype, "cuda")
        a, b = dequantize_torch(A, device="cuda"), dequantize_torch(B, device="cuda")

        def naive():
            W.add_(SCALE * torch.sin(OMEGA * (b @ a)) / GAMMA)

        row = dict(
            naive=time_cuda(naive, repeat),
            torch=time_cuda(lambda: delta_add_torch(W, A, B, **params), repeat),
            bound=2 * W.numel() * W.element_size() / bandwidth * 1e3,
        )
        if triton_available():
            row["triton"] = time_cuda(lambda: delta_add_triton(W, A, B, **params), repeat)
        rows[name] = row
    return rows, bandwidth


def whole_model(rows: dict) -> dict | None:
    """Per-method totals over LLaMA-3-8B's 224 modules; None unless every shape was measured."""
    if len(rows) != len(SHAPES):
        return None
    keys = next(iter(rows.values())).keys()
    return {k: LAYERS * sum(count * rows[name][k] for name, _, _, count in SHAPES) for k in keys}


def print_cpu_table(rank: int, rows: dict, shapes=SHAPES) -> None:
    print(f"\nCPU, rank {rank}, {BITS}-bit factors  (ms, best of repeats)")
    head = f"{'module (out x in)':<24}{'naive':>9}{'torch':>9}{'sin':>9}{'matmul':>9}{'floor':>9}{'torch/floor':>13}{'naive/torch':>13}"
    print(head)
    print("-" * len(head))
    for (name, out_f, in_f, _), r in zip(shapes, rows.values()):
        label = f"{name} {out_f}x{in_f}"
        print(f"{label:<24}{r['naive']:9.1f}{r['torch']:9.1f}{r['sin']:9.1f}{r['matmul']:9.1f}{r['floor']:9.1f}"
              f"{r['torch'] / r['floor']:13.2f}{r['naive'] / r['torch']:13.2f}")
    m = whole_model(rows)
    if m is None:
        return
    print(f"{'whole model (7x32 mods)':<24}{m['naive']:9.0f}{m['torch']:9.0f}{m['sin']:9.0f}{m['matmul']:9.0f}"
          f"{m['floor']:9.0f}{m['torch'] / m['floor']:13.2f}{m['naive'] / m['torch']:13.2f}")


def print_cuda_table(rank: int, rows: dict, bandwidth: float, shapes=SHAPES) -> None:
    print(f"\nCUDA ({torch.cuda.get_device_name()}), rank {rank}  (ms, median; copy bandwidth "
          f"{bandwidth / 1e9:.0f} GB/s)")
    has_triton = "triton" in next(iter(rows.values()))
    head = f"{'module (out x in)':<24}{'naive':>9}{'torch':>9}{'triton':>9}{'R+W bound':>11}{'triton/bound':>14}{'naive/triton':>14}"
    print(head)
    print("-" * len(head))
    for (name, out_f, in_f, _), r in zip(shapes, rows.values()):
        t = r.get("triton", float("nan"))
        label = f"{name} {out_f}x{in_f}"
        print(f"{label:<24}{r['naive']:9.3f}{r['torch']:9.3f}{t:9.3f}{r['bound']:11.3f}{t / r['bound']:14.2f}"
              f"{r['naive'] / t:14.2f}")
    m = whole_model(rows)
    if m is None:
        return
    t = m.get("triton", float("nan"))
    print(f"{'whole model (7x32 mods)':<24}{m['naive']:9.1f}{m['torch']:9.1f}{t:9.1f}{m['bound']:11.1f}"
          f"{t / m['bound']:14.2f}{m['naive'] / t:14.2f}")
    if not has_triton:
        print("(triton not installed: no fused-kernel column)")


def plot(results: dict, path: str) -> None:
    import matplotlib  # noqa: PLC0415 - optional, only for --plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    panels = list(results.items())
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (title, rows) in zip(axes[0], panels):
        methods = list(next(iter(rows.values())).keys())
        x = np.arange(len(rows))
        width = 0.8 / len(methods)
        for i, method in enumerate(methods):
            ax.bar(x + i * width, [r[method] for r in rows.values()], width, label=method)
        ax.set_xticks(x + 0.4 - width / 2, [f"{n}\n{o}x{i}" for n, o, i, _ in SHAPES])
        ax.set_yscale("log")
        ax.set_ylabel("ms")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"\nplot written to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU tables")
    parser.add_argument("--shapes", nargs="+", choices=[n for n, *_ in SHAPES], metavar="NAME",
                        help=f"only these module shapes ({', '.join(n for n, *_ in SHAPES)}); no whole-model line")
    parser.add_argument("--plot", metavar="PNG", help="also write a bar chart (needs matplotlib)")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    shapes = [s for s in SHAPES if args.shapes is None or s[0] in args.shapes]

    print(f"W dtype {args.dtype}; {BITS}-bit factors; omega={OMEGA}, scale={SCALE}, gamma={GAMMA}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    results = {}
    if not args.no_cpu:
        for rank in args.ranks:
            rows = bench_cpu(rank, dtype, args.repeat, shapes)
            print_cpu_table(rank, rows, shapes)
            results[f"CPU rank {rank}"] = rows
    if torch.cuda.is_available():
        for rank in args.ranks:
            rows, bandwidth = bench_cuda(rank, dtype, max(args.repeat, 20), shapes)
            print_cuda_table(rank, rows, bandwidth, shapes)
            results[f"CUDA rank {rank}"] = rows
    else:
        print("\n(no CUDA device: GPU table skipped)")
    if args.plot and results:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
