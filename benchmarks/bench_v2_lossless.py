"""Lossless 16-bit tensors: field grouping + rANS (deltacodec.bytegroup) against fp16/bf16 + zstd
and (if it imports; not a dependency) zipnn, bytes per value on the same tensors.

Tensors: Laplace- and Gaussian-distributed values (the planning measurement), the A and B
factors of the LLaMA-shaped synthetic adapter (bench_codec.py, 2 layers), and trained adapters
given with --adapters (PEFT directories, e.g. the ones rd_experiment.py leaves under
<out>/adapters). Every coded tensor is decoded and checked bit-exact.

    python benchmarks/bench_v2_lossless.py --adapters /tmp/h7rd/adapters/*
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import zstandard  # noqa: E402

from bench_codec import synthetic_adapter  # noqa: E402
from deltacodec import bytegroup  # noqa: E402


def to_bits(x: np.ndarray, dtype: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32).reshape(-1)
    if dtype == "F16":
        return x.astype(np.float16).view(np.uint16)
    u = x.view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even


def zstd_bytes(bits: np.ndarray, level: int) -> int:
    return len(zstandard.ZstdCompressor(level=level).compress(bits.astype("<u2").tobytes()))


def zipnn_bytes(bits: np.ndarray, dtype: str) -> int | None:
    try:
        import torch
        from zipnn import ZipNN
    except Exception:
        return None
    t = torch.from_numpy(bits.astype(np.int16).copy()).view(torch.bfloat16 if dtype == "BF16" else torch.float16)
    z = ZipNN(input_format="torch", bytearray_dtype="bfloat16" if dtype == "BF16" else "float16")
    comp = z.compress(t.clone())  # zipnn 0.5 rewrites its input tensor in place
    back = z.decompress(comp)
    assert torch.equal(back.view(torch.int16), t.view(torch.int16)), "zipnn round trip"
    return len(comp)


def tensors(args) -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    out = [("laplace 1e-3", rng.laplace(0, 1e-3, 1 << 20)), ("gauss 0.02", rng.normal(0, 0.02, 1 << 20))]
    ad = synthetic_adapter(16, layers=2)
    out.append(("llama A (all)", np.concatenate([m.A.reshape(-1) for m in ad.modules])))
    out.append(("llama B (all)", np.concatenate([m.B.reshape(-1) for m in ad.modules])))
    for d in args.adapters or []:
        from deltacodec.adapter import read_adapter

        a = read_adapter(d)
        name = os.path.basename(os.path.normpath(d))
        out.append((f"{name} A", np.concatenate([m.A.reshape(-1) for m in a.modules])))
        out.append((f"{name} B", np.concatenate([m.B.reshape(-1) for m in a.modules])))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", nargs="*")
    args = ap.parse_args()
    print(f"{'tensor':24s} {'dtype':5s} {'values':>9} | bytes/value: {'raw':>5} {'zstd-3':>7} {'zstd-19':>7} "
          f"{'zipnn':>7} {'grouped':>8} | grouped/zstd-3 grouped/zipnn  enc s  dec s")
    for name, x in tensors(args):
        for dt in ("F16", "BF16"):
            bits = to_bits(x, dt)
            n = bits.size
            t0 = time.perf_counter()
            g = bytegroup.encode16(bits, dt)
            te = time.perf_counter() - t0
            t0 = time.perf_counter()
            back = bytegroup.decode16(g)
            td = time.perf_counter() - t0
            assert np.array_equal(back, bits), f"{name} {dt}: not bit-exact"
            z3, z19 = zstd_bytes(bits, 3), zstd_bytes(bits, 19)
            zn = zipnn_bytes(bits, dt)
            zs = f"{zn / n:>7.3f}" if zn else f"{'-':>7}"
            rz = f"{g.nbytes / zn:>13.3f}" if zn else f"{'-':>13}"
            print(f"{name:24s} {dt:5s} {n:>9,} | {'':12s} {2.0:>5.2f} {z3 / n:>7.3f} {z19 / n:>7.3f} {zs} "
                  f"{g.nbytes / n:>8.3f} | {g.nbytes / z3:>14.3f} {rz} {te:>6.2f} {td:>6.2f}", flush=True)


if __name__ == "__main__":
    main()
