"""Benchmark ``deltacodec.apply`` against the arithmetic floor, on CPU (and the kernels on CUDA).

Three CPU tables, all measured in one run (best of ``--repeat`` after one warm-up call):

1. **unpack**: microseconds to unpack 65,536 ``width``-bit indices (2**16, a 4096-wide rank-16
   factor) from the packed stream: :func:`deltacodec.pack.unpack_indices` (numpy; what apply
   uses for CPU weights) and ``kernels._unpack_indices`` (int64 torch gathers; the path for
   streams already on a GPU); plus :func:`deltacodec.kernels.dequantize_torch`, the whole
   factor (unpack + codebook lookup).
2. **one module**: ``deltacodec.apply(model, file, keep_original=...)`` on a one-layer model
   whose weight is ``--out`` x ``--in`` (default 4096 x 4096, rank 16, 3-bit), plain LoRA and
   sine-LoRA, keep_original False and True. The floor, measured alongside on the same W with the
   factors already dequantized: plain ``W.addmm_(B, A, alpha=scale)`` for a float32 W, the fp32
   product ``torch.matmul(B, A, out=buf)`` for bf16/fp16 (the sum is formed in fp32; a bf16
   ``W.addmm_`` on factors rounded to bf16 is printed beside it for reference); sine
   ``torch.matmul(B, A, out=buf)`` + ``buf.sin_()`` on a preallocated fp32 buffer of W's size
   (any implementation must at least form B @ A and its sine). ``apply/floor`` is the ratio;
   the ``proof`` and ``kernel`` columns split apply's time into the overflow proof (one
   reduction over W, :func:`~deltacodec.kernels.finite_by_bound`) and the patch itself
   (``delta_add_torch(proven=True)``); the rest is reading the file and Python.
3. **LLaMA-3-8B layers**: the same on ``--layers`` (default 4) layers of q, k, v, o (4096x4096,
   1024x4096, 1024x4096, 4096x4096), gate, up (14336x4096), down (4096x14336): 28 modules for
   4 layers. The floor is the sum of the per-module floors.

With CUDA, a fourth table times the kernels per module shape (torch backend, fused Triton
kernel, and the read+write bandwidth bound of W).

Timings on a shared machine are noisy: compare the ratios of one run, not numbers across runs.

Usage: python benchmarks/bench_apply.py [--dtype float32|float16|bfloat16] [--rank 16]
       [--layers 4] [--repeat 5] [--skip-layers] [--plot out.png]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import deltacodec  # noqa: E402
from deltacodec.adapter import Adapter, AdapterModule  # noqa: E402
from deltacodec.kernels import (  # noqa: E402
    PackedFactor,
    _unpack_indices,
    delta_add_torch,
    delta_add_triton,
    dequantize_torch,
    finite_by_bound,
    triton_available,
)
from deltacodec.pack import pack_indices, unpack_indices  # noqa: E402
from deltacodec.patch import packed_factor  # noqa: E402

LAYER_SHAPES = [  # (name, out, in)
    ("self_attn.q_proj", 4096, 4096),
    ("self_attn.k_proj", 1024, 4096),
    ("self_attn.v_proj", 1024, 4096),
    ("self_attn.o_proj", 4096, 4096),
    ("mlp.gate_proj", 14336, 4096),
    ("mlp.up_proj", 14336, 4096),
    ("mlp.down_proj", 4096, 14336),
]
BITS = 3
SCALE, OMEGA = 2.0, 200.0


def best_ms(fn, repeat: int, setup=None) -> float:
    """Best-of-`repeat` wall time of fn() in ms after one warm-up call; setup() runs untimed
    before each call (e.g. to remove the handle the previous call returned)."""
    if setup:
        setup()
    fn()
    times = []
    for _ in range(repeat):
        if setup:
            setup()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


# --------------------------------------------------------------------------------------------
# 1. unpack
# --------------------------------------------------------------------------------------------


def bench_unpack(repeat: int) -> dict[int, dict[str, float]]:
    rng = np.random.default_rng(0)
    n = 1 << 16
    rows = {}
    for width in range(1, 9):
        idx = rng.integers(0, 1 << width, n).astype(np.uint8)
        stream = pack_indices(idx, width)
        assert np.array_equal(unpack_indices(stream, n, width), idx)
        t_stream = torch.from_numpy(stream)
        factor = PackedFactor(t_stream, torch.randn(1 << width), width, width, (16, n // 16))
        rows[width] = {
            "numpy": 1e3 * best_ms(lambda: unpack_indices(stream, n, width), 20 * repeat),
            "torch": 1e3 * best_ms(lambda: _unpack_indices(t_stream, n, width), 20 * repeat),
            "dequantize": 1e3 * best_ms(lambda: dequantize_torch(factor), 20 * repeat),
        }
    return rows


def print_unpack(rows: dict) -> None:
    print("\nUnpacking 65,536 indices (us, best of repeats)")
    head = f"{'width':>6}{'numpy (apply)':>15}{'torch gathers':>15}{'dequantize':>12}{'torch/numpy':>13}"
    print(head)
    print("-" * len(head))
    for w, r in rows.items():
        print(f"{w:>6}{r['numpy']:15.1f}{r['torch']:15.1f}{r['dequantize']:12.1f}{r['torch'] / r['numpy']:13.1f}")


# --------------------------------------------------------------------------------------------
# 2./3. apply against the floor
# --------------------------------------------------------------------------------------------


def adapter_for(shapes: list[tuple[str, int, int]], rank: int, sine: bool, seed: int = 0) -> Adapter:
    """Factors shaped like a trained adapter (A near its uniform init, B heavy-tailed); for sine
    the argument omega·(B@A) spans a few radians."""
    rng = np.random.default_rng(seed)
    mods = []
    for name, o, i in shapes:
        bound = 1.0 / np.sqrt(i)
        A = (rng.uniform(-bound, bound, (rank, i))).astype(np.float32)
        B = (rng.standard_t(4, (o, rank)) * (3.0 / OMEGA if sine else 1e-2)).astype(np.float32)
        mods.append(AdapterModule(name=name, A=A, B=B, scale=SCALE, sine=sine,
                                  omega=OMEGA if sine else None, gamma=float(np.sqrt(i)) if sine else None))
    config = {"peft_type": "SINLORA" if sine else "LORA", "r": rank, "lora_alpha": SCALE * rank}
    if sine:
        config["freq"] = OMEGA
    return Adapter(modules=mods, config=config)


def build_model(shapes: list[tuple[str, int, int]], dtype: torch.dtype) -> torch.nn.Module:
    """A module tree with one bias-free Linear per name; weights small and finite (their values
    do not change the work, only inf/NaN or values near the dtype's top would)."""
    root = torch.nn.Module()
    for name, o, i in shapes:
        parent = root
        *path, leaf = name.split(".")
        for p in path:
            if not hasattr(parent, p):
                parent.add_module(p, torch.nn.Module())
            parent = getattr(parent, p)
        lin = torch.nn.Linear(i, o, bias=False, device="meta")
        lin.weight = torch.nn.Parameter(torch.empty(o, i, dtype=dtype).uniform_(-0.02, 0.02), requires_grad=False)
        parent.add_module(leaf, lin)
    return root


def interleaved_best(fns: dict[str, tuple], repeat: int) -> dict[str, float]:
    """Best-of-`repeat` ms of each (fn, setup) in `fns`, the functions taking turns round by round
    (one warm-up each first), so a change in the machine's load hits all of them alike. setup()
    runs untimed before each call."""
    best = {name: float("inf") for name in fns}
    for rnd in range(repeat + 1):
        for name, (fn, setup) in fns.items():
            if setup:
                setup()
            t0 = time.perf_counter()
            fn()
            if rnd:
                best[name] = min(best[name], 1e3 * (time.perf_counter() - t0))
    return best


def floor_fn(f: deltacodec.SldFile, model: torch.nn.Module, sine: bool, low_precision: bool = False):
    """The floor over the file's modules (see the module docstring), as one function."""
    ops = []
    buf = None
    for m in f.modules:
        W = model.get_submodule(m.name).weight.data
        a = dequantize_torch(packed_factor(f, m.A, "cpu"))
        b = dequantize_torch(packed_factor(f, m.B, "cpu"))
        if low_precision:
            # W.addmm_ in W's dtype on factors rounded to it: what a bf16/fp16 user might call the
            # floor, though it changes the factors' values (printed for reference only).
            ops.append((W.addmm_, (b.to(W.dtype), a.to(W.dtype))))
        elif sine or W.dtype != torch.float32:
            # sine: the product and its sine; bf16/fp16 plain: the documented arithmetic is fp32
            # (exact factors, fp32 sum, one rounding), so its floor is the fp32 product.
            if buf is None or buf.numel() < W.numel():
                buf = torch.empty(W.numel(), dtype=torch.float32)
            out = buf[: W.numel()].view(W.shape)
            ops.append(((lambda b, a, out: torch.matmul(b, a, out=out).sin_()) if sine
                        else (lambda b, a, out: torch.matmul(b, a, out=out)), (b, a, out)))
        else:
            ops.append((W.addmm_, (b, a)))

    def run() -> None:
        for op, args in ops:
            if op.__name__ == "addmm_":
                op(*args, alpha=SCALE)
            else:
                op(*args)

    return run


def parts_fns(f: deltacodec.SldFile, model: torch.nn.Module):
    """(overflow proof over every module, proven kernel over every module) as functions."""
    jobs = []
    for m in f.modules:
        W = model.get_submodule(m.name).weight.data
        A, B = packed_factor(f, m.A, "cpu"), packed_factor(f, m.B, "cpu")
        gamma = m.gamma if m.sine else 1.0
        jobs.append((W, A, B, dict(scale=m.scale, gamma=gamma, sine=m.sine, fan_in_fan_out=False)))

    def proof() -> None:
        for W, A, B, kw in jobs:
            finite_by_bound(W, A, B, **kw)

    def kernel() -> None:
        for (W, A, B, kw), m in zip(jobs, f.modules):
            delta_add_torch(W, A, B, omega=m.omega or 0.0, proven=True, **kw)

    return proof, kernel


def bench_apply(shapes, rank: int, dtype: torch.dtype, repeat: int, tmp: str) -> dict[str, dict[str, float]]:
    rows = {}
    model = build_model(shapes, dtype)
    for sine in (False, True):
        path = os.path.join(tmp, f"{'sine' if sine else 'plain'}-{len(shapes)}.sld")
        deltacodec.encode(adapter_for(shapes, rank, sine), bits=BITS, out=path, force=True)
        f = deltacodec.load(path)
        handles: list = []

        def drop() -> None:  # the previous call's handle: removed when it can be, copies freed
            while handles:
                h = handles.pop()
                if h._originals:
                    h.remove()
            gc.collect()

        def applier(keep: bool):
            return lambda: handles.append(deltacodec.apply(model, f, keep_original=keep, allow_stacking=True))

        proof, kernel = parts_fns(f, model)
        fns = {
            "floor": (floor_fn(f, model, sine), None),
            "apply False": (applier(False), drop),
            "apply True": (applier(True), drop),
            "proof": (proof, None),
            "kernel": (kernel, None),
        }
        if not sine and dtype != torch.float32:
            fns["low-precision addmm"] = (floor_fn(f, model, sine, low_precision=True), None)
        t = interleaved_best(fns, repeat)
        drop()
        kind = "sine" if sine else "plain"
        for keep in (False, True):
            rows[f"{kind}, keep_original={keep}"] = dict(
                apply=t[f"apply {keep}"], floor=t["floor"], proof=t["proof"] if not keep else float("nan"),
                kernel=t["kernel"])
        if "low-precision addmm" in t:
            print(f"  (plain: W.addmm_ in {str(dtype).removeprefix('torch.')} on factors rounded to it: "
                  f"{t['low-precision addmm']:.1f} ms over {len(f.modules)} module(s))")
        f.close()
    return rows


def print_apply(title: str, rows: dict) -> None:
    print(f"\n{title}  (ms, best of repeats)")
    head = f"{'case':<30}{'apply':>9}{'floor':>9}{'apply/floor':>13}{'proof':>9}{'kernel':>9}"
    print(head)
    print("-" * len(head))
    for label, r in rows.items():
        print(f"{label:<30}{r['apply']:9.1f}{r['floor']:9.1f}{r['apply'] / r['floor']:13.2f}"
              f"{r['proof']:9.1f}{r['kernel']:9.1f}")


# --------------------------------------------------------------------------------------------
# 4. CUDA kernels per module shape
# --------------------------------------------------------------------------------------------


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


def copy_bandwidth(repeat: int) -> float:
    """Device read+write bandwidth (bytes/s) of a large copy (512 MiB each way)."""
    src = torch.empty(1 << 27, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    t_copy = time_cuda(lambda: dst.copy_(src), repeat)
    return 2 * src.numel() * 4 / (t_copy * 1e-3)


def bench_cuda(rank: int, dtype: torch.dtype, repeat: int, tmp: str) -> tuple[dict, float]:
    bandwidth = copy_bandwidth(repeat)
    shapes = [s for s in LAYER_SHAPES if s[0] in ("self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj", "mlp.down_proj")]
    path = os.path.join(tmp, "cuda.sld")
    deltacodec.encode(adapter_for(shapes, rank, True), bits=BITS, out=path, force=True)
    f = deltacodec.load(path)
    rows = {}
    for m in f.modules:
        W = torch.randn(m.out_features, m.in_features, device="cuda").to(dtype) * 0.02
        A, B = packed_factor(f, m.A, "cuda"), packed_factor(f, m.B, "cuda")
        params = dict(scale=m.scale, omega=m.omega, gamma=m.gamma, sine=True, fan_in_fan_out=False)
        row = dict(torch=time_cuda(lambda: delta_add_torch(W, A, B, proven=True, **params), repeat),
                   bound=2 * W.numel() * W.element_size() / bandwidth * 1e3)
        if triton_available():
            row["triton"] = time_cuda(lambda: delta_add_triton(W, A, B, **params), repeat)
        rows[f"{m.name} {m.out_features}x{m.in_features}"] = row
    f.close()
    return rows, bandwidth


def print_cuda(rows: dict, bandwidth: float) -> None:
    print(f"\nCUDA ({torch.cuda.get_device_name()}), sine, kernels only (ms, median; copy bandwidth "
          f"{bandwidth / 1e9:.0f} GB/s)")
    head = f"{'module':<34}{'torch':>9}{'triton':>9}{'R+W bound':>11}{'triton/bound':>14}"
    print(head)
    print("-" * len(head))
    for label, r in rows.items():
        t = r.get("triton", float("nan"))
        print(f"{label:<34}{r['torch']:9.3f}{t:9.3f}{r['bound']:11.3f}{t / r['bound']:14.2f}")


def plot(results: dict[str, dict], path: str) -> None:
    import matplotlib  # noqa: PLC0415 - optional, only for --plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (title, rows) in zip(axes[0], results.items()):
        labels = list(rows)
        ax.barh(range(len(labels)), [r["apply"] / r["floor"] for r in rows.values()])
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.set_xlabel("apply / floor")
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"\nplot written to {path}")


def main() -> None:
    global SCALE
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--out", type=int, default=4096, help="rows of the one-module W")
    parser.add_argument("--in", dest="in_features", type=int, default=4096, help="columns of the one-module W")
    parser.add_argument("--layers", type=int, default=4, help="LLaMA-3-8B layers in table 3")
    parser.add_argument("--skip-layers", action="store_true", help="skip table 3 (it needs ~4 GB per layer-set in fp32)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--scale", type=float, default=SCALE,
                        help="the modules' scale (2: power of two, plain LoRA takes one addmm_; e.g. 1.5 does not)")
    parser.add_argument("--plot", metavar="PNG", help="also write a bar chart of apply/floor (needs matplotlib)")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    SCALE = args.scale

    print(f"W dtype {args.dtype}; rank {args.rank}, {BITS}-bit factors; scale={SCALE}, omega={OMEGA}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print_unpack(bench_unpack(args.repeat))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        one = [("lin", args.out, args.in_features)]
        title = f"One module {args.out}x{args.in_features}, {args.dtype}"
        results[title] = bench_apply(one, args.rank, dtype, args.repeat, tmp)
        print_apply(title, results[title])
        if not args.skip_layers:
            shapes = [(f"model.layers.{n}.{name}", o, i) for n in range(args.layers) for name, o, i in LAYER_SHAPES]
            title = f"{args.layers} LLaMA-3-8B layers ({len(shapes)} modules), {args.dtype}"
            results[title] = bench_apply(shapes, args.rank, dtype, max(2, args.repeat // 2), tmp)
            print_apply(title, results[title])
        if torch.cuda.is_available():
            rows, bandwidth = bench_cuda(args.rank, dtype, max(args.repeat, 20), tmp)
            print_cuda(rows, bandwidth)
        else:
            print("\n(no CUDA device: GPU table skipped)")
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
