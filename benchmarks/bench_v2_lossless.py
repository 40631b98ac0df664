"""Lossless tensors: field grouping + rANS (deltacodec.bytegroup) against fp16/bf16/fp32 + zstd
and (if it imports; not a dependency) zipnn, bytes per value on the same tensors.

Tensors: Laplace- and Gaussian-distributed values (the planning measurement), the A and B
factors of the LLaMA-shaped synthetic adapter (bench_codec.py, 2 layers), and trained adapters
given with --adapters (PEFT directories, e.g. the ones rd_experiment.py leaves under
<out>/adapters). Every coded tensor is decoded and checked bit-exact.

``--fp32``: the same tensors kept as float32 (no rounding), F32 field streams against raw fp32
+ zstd (levels 3 and 19) and zipnn; then whole ``encode(bits=32)`` files (header included, each
factor in its smallest exact form) against the adapter's float32 safetensors + zstd.

    python benchmarks/bench_v2_lossless.py --adapters /tmp/h7rd/adapters/*
    python benchmarks/bench_v2_lossless.py --fp32
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
    word = "<u4" if bits.dtype == np.uint32 else "<u2"
    return len(zstandard.ZstdCompressor(level=level).compress(bits.astype(word).tobytes()))


def _zipnn():
    try:
        import torch
        from zipnn import ZipNN
    except Exception:
        return None
    return torch, ZipNN


def zipnn_bytes(bits: np.ndarray, dtype: str) -> int | None:
    mods = _zipnn()
    if mods is None:
        return None
    torch, ZipNN = mods
    if dtype == "F32":
        t = torch.from_numpy(bits.view(np.float32).copy())
        z = ZipNN(input_format="torch", bytearray_dtype="float32")
        comp = z.compress(t.clone())
        back = z.decompress(comp)
        assert torch.equal(back.view(torch.int32), t.view(torch.int32)), "zipnn fp32 round trip"
        return len(comp)
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


def grouped(bits: np.ndarray, dt: str, name: str):
    """(field-coded tensor, encode s, decode s), checked bit-exact, with zstd-3/19 and zipnn bytes."""
    t0 = time.perf_counter()
    g = bytegroup.encode_fields(bits, dt)
    te = time.perf_counter() - t0
    t0 = time.perf_counter()
    back = bytegroup.decode_fields(g)
    td = time.perf_counter() - t0
    assert np.array_equal(back, bits), f"{name} {dt}: not bit-exact"
    return g, te, td, zstd_bytes(bits, 3), zstd_bytes(bits, 19), zipnn_bytes(bits, dt)


def fp32_rows(args) -> None:
    """F32 field streams against raw fp32 + zstd and zipnn, then whole bits=32 files."""
    if _zipnn() is None:
        print("zipnn does not import here: its column is '-' (pip install zipnn to compare)")
    print(f"{'tensor':24s} {'values':>9} | bytes/value: {'raw':>5} {'zstd-3':>7} {'zstd-19':>7} {'zipnn':>7} "
          f"{'grouped':>8} | grouped/zstd-3 grouped/zstd-19 grouped/zipnn  enc s  dec s")
    for name, x in tensors(args):
        bits = np.ascontiguousarray(x, dtype=np.float32).reshape(-1).view(np.uint32)
        n = bits.size
        g, te, td, z3, z19, zn = grouped(bits, "F32", name)
        zs = f"{zn / n:>7.3f}" if zn else f"{'-':>7}"
        rz = f"{g.nbytes / zn:>13.3f}" if zn else f"{'-':>13}"
        print(f"{name:24s} {n:>9,} | {'':12s} {4.0:>5.2f} {z3 / n:>7.3f} {z19 / n:>7.3f} {zs} {g.nbytes / n:>8.3f} | "
              f"{g.nbytes / z3:>14.3f} {g.nbytes / z19:>15.3f} {rz} {te:>6.2f} {td:>6.2f}", flush=True)
    files(args)


def files(args) -> None:
    """Whole files: encode(bits=32) (header, side information, every factor in its smallest exact
    form) against the factors' float32 safetensors-like payload + zstd, bytes per factor value."""
    import tempfile

    import deltacodec
    from deltacodec.adapter import read_adapter

    adapters = [("llama-shaped r16 x2", synthetic_adapter(16, layers=2)),
                ("llama-shaped r8 x1", synthetic_adapter(8, layers=1))]
    adapters += [(os.path.basename(os.path.normpath(d)), read_adapter(d)) for d in args.adapters or []]
    print(f"\n{'adapter (bits=32 file)':24s} {'values':>9} | bytes/value: {'fp32+zstd-3':>11} {'fp32+zstd-19':>12} "
          f"{'zipnn':>7} {'sld':>7} | sld/zstd-19 sld/zipnn  forms")
    with tempfile.TemporaryDirectory() as tmp:
        for name, ad in adapters:
            raw = np.concatenate([np.concatenate([m.A.reshape(-1), m.B.reshape(-1)]) for m in ad.modules])
            bits = raw.astype(np.float32).view(np.uint32)
            n = bits.size
            # the peers compress each tensor on its own, as a safetensors payload would be
            z3 = sum(zstd_bytes(np.ascontiguousarray(t, np.float32).reshape(-1).view(np.uint32), 3)
                     for m in ad.modules for t in (m.A, m.B))
            z19 = sum(zstd_bytes(np.ascontiguousarray(t, np.float32).reshape(-1).view(np.uint32), 19)
                      for m in ad.modules for t in (m.A, m.B))
            zn = [zipnn_bytes(np.ascontiguousarray(t, np.float32).reshape(-1).view(np.uint32), "F32")
                  for m in ad.modules for t in (m.A, m.B)]
            zn_total = sum(zn) if all(v is not None for v in zn) else None
            path = deltacodec.encode(ad, bits=32, out=os.path.join(tmp, "a.sld"), force=True)
            f = deltacodec.load(path)
            for m in ad.modules:
                got = f.module(m.name)
                for e, x in ((got.A, m.A), (got.B, m.B)):
                    assert np.array_equal(np.asarray(f.tensor(e), np.float32).view(np.uint32),
                                          np.asarray(x, np.float32).view(np.uint32)), e.name
            forms = sorted({e.dtype for e in f.entries()})
            size = f.file_size
            zs = f"{zn_total / n:>7.3f}" if zn_total else f"{'-':>7}"
            rz = f"{size / zn_total:>9.3f}" if zn_total else f"{'-':>9}"
            print(f"{name:24s} {n:>9,} | {'':12s} {z3 / n:>11.3f} {z19 / n:>12.3f} {zs} {size / n:>7.3f} | "
                  f"{size / z19:>11.3f} {rz}  {'+'.join(forms)}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", nargs="*")
    ap.add_argument("--fp32", action="store_true", help="float32 tensors (F32 fields, bits=32 files)")
    args = ap.parse_args()
    if args.fp32:
        fp32_rows(args)
        return
    print(f"{'tensor':24s} {'dtype':5s} {'values':>9} | bytes/value: {'raw':>5} {'zstd-3':>7} {'zstd-19':>7} "
          f"{'zipnn':>7} {'grouped':>8} | grouped/zstd-3 grouped/zipnn  enc s  dec s")
    for name, x in tensors(args):
        for dt in ("F16", "BF16"):
            bits = to_bits(x, dt)
            n = bits.size
            g, te, td, z3, z19, zn = grouped(bits, dt, name)
            zs = f"{zn / n:>7.3f}" if zn else f"{'-':>7}"
            rz = f"{g.nbytes / zn:>13.3f}" if zn else f"{'-':>13}"
            print(f"{name:24s} {dt:5s} {n:>9,} | {'':12s} {2.0:>5.2f} {z3 / n:>7.3f} {z19 / n:>7.3f} {zs} "
                  f"{g.nbytes / n:>8.3f} | {g.nbytes / z3:>14.3f} {rz} {te:>6.2f} {td:>6.2f}", flush=True)


if __name__ == "__main__":
    main()
