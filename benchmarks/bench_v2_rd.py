"""v2 quantization against today's encoder: bytes, per-module relative ΔW error and (trained
adapters) task accuracy.

For each adapter, today's encoder (``deltacodec.encode``: k-means at 1..8 bits + zstd) gives one
point per bit width; the v2 variants are then run by rate control (deltacodec.ratecontrol) at
the same payload size (``size`` target = that file's payload), so every row compares equal bytes:

* ``ecsq``           ECSQ, one λ for the adapter, modules weighted by relative error, no refit;
* ``ecsq+refit``     the same with B refitted against Q(A);
* ``mm+refit``       minimax allocation (smallest common bound on the modules' relative errors);
* ``auto+mm+refit``  the same, each tensor may also take k-means at 1-3 bits.

Payload = what the quantized data needs: v1: the sections plus every codebook and its scale
(v1 keeps those in its header); v2: the rANS stream plus every tensor's side information. The
rest of the header (names, shapes, config) is left out of both: the v2 container is not built.
Columns: payload bytes, bits/param, mean and max relative ΔW error over modules, and, with
``--eval``, test accuracy of the rd_experiment task (the reconstructed factors written to a
``--bits 16`` .sld and applied with deltacodec.apply). BD-rate (akima) of each variant against
today's encoder, on weight-space quality (−10·log10 of the mean squared relative error) and on
accuracy (monotone frontier only).

    python benchmarks/rd_experiment.py --quick --out /tmp/rd --cache-dir /tmp/rdcache
    python benchmarks/bench_v2_rd.py --adapters /tmp/rd/adapters/* --eval /tmp/rd --cache-dir /tmp/rdcache
    python benchmarks/bench_v2_rd.py --llama-layers 4             # LLaMA-shaped synthetic
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import deltacodec  # noqa: E402
from deltacodec.adapter import Adapter, AdapterModule, read_adapter  # noqa: E402
from deltacodec.dwerror import relative_error  # noqa: E402
from deltacodec.ratecontrol import Target, encode_modules  # noqa: E402

VARIANTS = {"ecsq": dict(method="ecsq", refit=False), "ecsq+refit": dict(method="ecsq", refit=True),
            "mm+refit": dict(method="ecsq", refit=True, allocation="minimax"),
            "auto+mm+refit": dict(method="auto", refit=True, allocation="minimax")}


def v1_point(adapter: Adapter, bits: int, tmp: str) -> tuple[int, list[float], list[tuple[np.ndarray, np.ndarray]]]:
    path = os.path.join(tmp, f"v1-{bits}.sld")
    if os.path.exists(path):
        os.remove(path)
    deltacodec.encode(adapter, bits=bits, out=path)
    f = deltacodec.load(path)
    # sections + the codebooks (which v1 keeps in its header) + their float32 scales
    payload = os.path.getsize(path) - f.data_offset
    payload += sum(len(e.codebook_f16) + 4 for e in f.entries() if e.encoding == "codebook")
    errs, facs = [], []
    for m in adapter.modules:
        a_q, b_q = f.dequantize(m.name)
        errs.append(relative_error(m.A, m.B, a_q, b_q, sine=m.sine, omega=m.omega))
        facs.append((a_q, b_q))
    return payload, errs, facs


class Evaluator:
    """Task accuracy of reconstructed factors on the rd_experiment test split (quick settings)."""

    def __init__(self, rd_out: str, cache_dir: str, seed: int) -> None:
        import torch  # noqa: F401

        import rd_experiment as rd

        self.rd = rd
        meas = json.load(open(os.path.join(rd_out, "measurements.json")))
        st = rd.quick_settings(seed) if meas["settings"].get("quick") else rd.Settings(seed=seed)
        self.st = st
        pre, new = rd.make_tables(st.task, st.seed)
        base_path = meas["base"]["path"]  # the very base the adapters were trained on
        if not os.path.isdir(base_path):
            base_path, _ = rd.load_or_pretrain_base(st, __import__("pathlib").Path(cache_dir), pre)
        self.base = rd.load_base(base_path)
        data = rd.downstream_splits(st.task, st.seed, st.steps * st.batch, st.n_val, st.n_test, new)
        self.test = data["test"]

    def accuracy(self, adapter: Adapter, facs, tmp: str) -> float:
        mods = [AdapterModule(name=m.name, A=np.ascontiguousarray(a, np.float32), B=np.ascontiguousarray(b, np.float32),
                              scale=m.scale, sine=m.sine, omega=m.omega, gamma=m.gamma, fan_in_fan_out=m.fan_in_fan_out)
                for m, (a, b) in zip(adapter.modules, facs)]
        path = os.path.join(tmp, "eval.sld")
        if os.path.exists(path):
            os.remove(path)
        deltacodec.encode(Adapter(modules=mods, extras=adapter.extras, config=adapter.config), bits=16, out=path)
        with deltacodec.apply(self.base, path, backend="torch"):
            return float(self.rd.accuracy(self.base, self.test, self.st.task))


def run_adapter(name: str, adapter: Adapter, bits_list, ev: Evaluator | None, rows: list[dict]) -> None:
    params = sum(m.A.size + m.B.size for m in adapter.modules)
    with tempfile.TemporaryDirectory() as tmp:
        for bits in bits_list:
            t0 = time.perf_counter()
            payload, errs, facs = v1_point(adapter, bits, tmp)
            t1 = time.perf_counter() - t0
            acc = ev.accuracy(adapter, facs, tmp) if ev else float("nan")
            rows.append(dict(adapter=name, method="kmeans-v1", bits=bits, payload=payload, bpp=8 * payload / params,
                             mean_err=float(np.mean(errs)), max_err=float(np.max(errs)),
                             ms_err=float(np.mean(np.square(errs))), acc=acc, seconds=t1))
            print_row(rows[-1])
            for vname, kw in VARIANTS.items():
                t0 = time.perf_counter()
                plan = encode_modules(adapter.modules, Target("size", payload), **kw)
                t1 = time.perf_counter() - t0
                errs = [r.rel_error for r in plan.modules]
                facs = [(plan.tensors[2 * i].values.reshape(m.A.shape), plan.tensors[2 * i + 1].values.reshape(m.B.shape))
                        for i, m in enumerate(adapter.modules)]
                acc = ev.accuracy(adapter, facs, tmp) if ev else float("nan")
                rows.append(dict(adapter=name, method=vname, bits=bits, payload=plan.total_bytes,
                                 bpp=8 * plan.total_bytes / params, mean_err=float(np.mean(errs)),
                                 max_err=float(np.max(errs)), ms_err=float(np.mean(np.square(errs))), acc=acc,
                                 seconds=t1, kmeans_tensors=sum(t.method == "kmeans" for t in plan.tensors)))
                print_row(rows[-1])


def print_row(r: dict) -> None:
    acc = f"{r['acc']:7.2f}" if not math.isnan(r["acc"]) else f"{'-':>7}"
    print(f"{r['adapter']:22s} {r['method']:13s} {r['bits']:>4} {r['payload']:>10,} {r['bpp']:>7.3f} "
          f"{r['mean_err']:>9.4f} {r['max_err']:>8.4f} {acc} {r['seconds']:>7.2f}", flush=True)


def bd_summary(rows: list[dict]) -> None:
    from deltacodec.analysis import RDPoint, bd_table
    from rd_experiment import monotone_frontier

    print("\nBD-rate vs kmeans-v1 (akima; negative = fewer bytes at equal quality)")
    print(f"{'adapter':22s} {'method':13s} {'weight-space':>13} {'accuracy':>9}")
    for ad in dict.fromkeys(r["adapter"] for r in rows):
        out = {}
        for quality in ("w", "acc"):
            pts = []
            for r in rows:
                if r["adapter"] != ad:
                    continue
                q = -10 * math.log10(max(r["ms_err"], 1e-30)) if quality == "w" else r["acc"]
                if math.isnan(q):
                    continue
                pts.append(RDPoint(r["method"], 0, float(r["payload"]), float(q)))
            if quality == "acc":
                kept = []
                for m in dict.fromkeys(p.method for p in pts):
                    kept += monotone_frontier([p for p in pts if p.method == m])[0]
                pts = kept
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    table = bd_table(pts, anchor="kmeans-v1", errors="warn") if pts else []
                except Exception:
                    table = []
            for row in table:
                out.setdefault(row["method"], {})[quality] = row["bd_rate"]
        for m, d in out.items():
            w = f"{d['w']:+.1f}%" if "w" in d else "-"
            a = f"{d['acc']:+.1f}%" if "acc" in d else "-"
            print(f"{ad:22s} {m:13s} {w:>13} {a:>9}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", nargs="*", default=[])
    ap.add_argument("--llama-layers", type=int, default=0, help="also the LLaMA-shaped rank-16 adapter, N layers")
    ap.add_argument("--bits", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6, 7, 8])
    ap.add_argument("--eval", metavar="RD_OUT", help="rd_experiment output dir: measure task accuracy")
    ap.add_argument("--cache-dir", default=os.path.join(os.path.dirname(__file__), "out", "cache"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    ev = Evaluator(args.eval, args.cache_dir, args.seed) if args.eval else None
    print(f"{'adapter':22s} {'method':13s} {'bits':>4} {'payload B':>10} {'bits/p':>7} {'mean err':>9} "
          f"{'max err':>8} {'acc %':>7} {'enc s':>7}")
    rows: list[dict] = []
    for d in args.adapters:
        run_adapter(os.path.basename(os.path.normpath(d)), read_adapter(d), args.bits, ev, rows)
    if args.llama_layers:
        from bench_codec import synthetic_adapter

        run_adapter(f"llama-r16-{args.llama_layers}L", synthetic_adapter(16, layers=args.llama_layers), args.bits,
                    None, rows)
    bd_summary(rows)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
