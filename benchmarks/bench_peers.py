"""deltacodec against what users would ship instead, on the same adapters (issue 10).

Peers: GGUF Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q4_0, Q8_0 (the ``gguf`` package's quantizers where it
has them — Q4_0, Q8_0 — and ggml's own C quantizers, built from a llama-cpp-python sdist, for the
K-quants it can only dequantize; see benchmarks/peers/ggml_lib.py); QLoRA's NF4 with float32 or
double-quantized absmax; fp16/bf16 + zstd (level 19); fp16/bf16 + zipnn. deltacodec: ``encode``
with the k-means quantizer at 1..8 bits and 16 (float16); the ECSQ/auto quantizers and lossless
16-bit join automatically when the installed ``deltacodec.encode`` accepts them.

Adapters: (a) the LLaMA-3-8B-shaped synthetic sine adapter of bench_codec.py (heavy-tailed B),
``--layers`` of its 32 layers; (b) LoRA and sine-LoRA adapters trained by
benchmarks/rd_experiment.py's own functions with its ``--quick`` settings (``--ranks``; the
default 4 and 8 keep every factor a whole number of 256-value K-quant blocks).

Bytes: deltacodec = the ``.sld`` file (header and metadata included); a peer = its payload only
(GGUF blocks, NF4 indices + absmax, the compressed stream): no container, which favours the
peers (a GGUF file adds ~24 B + metadata per file and ~40–90 B per tensor: name, dims, type,
offset, 32-byte alignment). Distortion: relative ΔW error per module ‖ΔŴ−ΔW‖/‖ΔW‖ (the sine
applied for sine adapters), averaged over modules; for trained adapters also test accuracy and
held-out answer loss after merging each arm's dequantized factors into the base model
(W += ΔŴ exactly as ``AdapterModule.delta`` defines it, which ``deltacodec.apply`` implements;
checked against ``deltacodec.apply`` on the deltacodec arms).

Ratios (< 1: deltacodec is smaller): for each peer point, deltacodec's bytes at the peer's error
(deltacodec's curve interpolated in log-bytes vs log-error) ÷ the peer's bytes; and for each
deltacodec point, its bytes ÷ the best peer's (the peers' joint Pareto front) at its error; for
trained adapters the same at equal held-out loss. The issue's goal is ≤ 0.85 at every rate.

    python benchmarks/bench_peers.py --llama-cpp-src /tmp/llama-src/llama_cpp_python-0.3.36.tar.gz
    python benchmarks/bench_peers.py --layers 1 --no-trained        # synthetic only, quick
    python benchmarks/bench_peers.py --plot benchmarks/out/peers/peers.png

Lossless: the adapter rounded to fp16 and to bf16 (what a user holds in 16 bits), through
deltacodec ``bits=16`` and the 16-bit peers on the same values; ``exact`` = decodes bit for bit.

Outputs in --out (default benchmarks/out/peers/): points.csv (one row per adapter × arm),
ratios.csv (the equal-distortion ratios), lossless.csv, and the PNG with --plot. Stdout: the
tables.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import inspect
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import deltacodec  # noqa: E402
from deltacodec.adapter import Adapter, AdapterModule  # noqa: E402
from deltacodec.dwerror import relative_error  # noqa: E402
from peers import Coded  # noqa: E402
from peers.compare import bytes_at, equal_distortion_ratio, pareto_front, smallest_within  # noqa: E402
from peers.ggml_lib import GgmlQuantizer, load_ggml  # noqa: E402
from peers.gguf_quants import GGUF_TYPES, code_factor, gguf_file_size, gguf_has_quantizer  # noqa: E402
from peers.lossless import code_zipnn, code_zstd, zipnn_version  # noqa: E402
from peers.nf4 import code_nf4  # noqa: E402

DELTACODEC = "deltacodec"
# Equal-loss ratios are left out where the loss is within 1 % of the unquantized adapter's: there
# every rate ties (the test split's loss moves by ~1e-4 between 6 bits and lossless) and the
# interpolated ratio would be noise.
LOSS_FLOOR = 0.01


def log(msg: str) -> None:
    print(f"[peers {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ==================================================================================================
# Adapters
# ==================================================================================================


@dataclass
class Testbed:
    """An adapter to compress, and (trained adapters only) how to score it on its task."""

    name: str
    adapter: Adapter
    evaluate: Callable[[list[AdapterModule]], dict] | None = None  # modules -> {"accuracy", "loss"}
    evaluate_sld: Callable[[str], dict] | None = None  # .sld path -> same, through deltacodec.apply
    reference: dict = field(default_factory=dict)  # the unquantized adapter's scores

    @property
    def params(self) -> int:
        return sum(m.A.size + m.B.size for m in self.adapter.modules)


def synthetic_testbed(rank: int, layers: int) -> Testbed:
    from bench_codec import synthetic_adapter

    ad = synthetic_adapter(rank, layers=layers)
    return Testbed(name=f"llama8b-synth-r{rank}-{layers}L", adapter=ad)


def trained_testbeds(seed: int, ranks: tuple[int, ...], out: Path, cache_dir: Path, threads: int,
                     reuse: Path | None = None) -> list[Testbed]:
    """Train LoRA and sine-LoRA per rank with rd_experiment's quick settings; one testbed each,
    scored on the test split by accuracy (percent) and answer loss (nats). ``reuse``: a directory
    holding ``adapters/<method>-r<rank>/`` from an earlier run with the same seed (this script's
    ``<out>/trained`` or ``rd_experiment.py --quick --out``): those are loaded, not retrained."""
    import torch
    import transformers

    import rd_experiment as rd

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(threads)
    st = rd.quick_settings(seed)
    st.ranks = tuple(ranks)
    st.threads = threads
    pre, new = rd.make_tables(st.task, st.seed)
    base_path, _ = rd.load_or_pretrain_base(st, cache_dir, pre)
    base = rd.load_base(base_path)
    data = rd.downstream_splits(st.task, st.seed, st.steps * st.batch, st.n_val, st.n_test, new)
    test = data["test"]
    if reuse is not None:
        dirs = [(m, r, reuse / "adapters" / f"{m}-r{r}") for r in st.ranks for m in rd.METHODS]
        absent = [str(d) for _, _, d in dirs if not (d / "adapter_model.safetensors").is_file()]
        if absent:
            raise SystemExit(f"--reuse-trained: no adapter in {', '.join(absent)}")
        adapters = [(f"trained-{m}-r{r}", str(d)) for m, r, d in dirs]
        log(f"reusing {len(adapters)} trained adapters from {reuse}")
    else:
        grid, secs = rd.train_grid(base, data, st, out / "trained")
        log(f"trained {len(grid)} adapters in {secs:.0f} s")
        adapters = [(f"trained-{ta.method}-r{ta.rank}", ta.adapter_dir) for ta in grid]
    originals = {n: p.detach().clone() for n, p in base.named_parameters()}

    import torch.nn.functional as F

    answers = test[:, st.task.answer_slice]

    @torch.no_grad()
    def score() -> dict:
        """rd_experiment's accuracy (percent, argmax on the answer positions) and its answer
        loss (mean cross-entropy, nats) from one forward pass over the test split."""
        base.eval()
        logits = rd.answer_logits(base, test, st.task)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), answers.reshape(-1))
        acc = (logits.argmax(-1) == answers).float().mean()
        return {"accuracy": 100.0 * float(acc), "loss": float(loss)}

    def restore() -> None:
        with torch.no_grad():
            for n, p in base.named_parameters():
                p.copy_(originals[n])

    @torch.no_grad()
    def evaluate(mods: list[AdapterModule]) -> dict:
        try:
            for m in mods:
                target = base.get_submodule(m.name.removeprefix("base_model.model.")).weight
                target += torch.from_numpy(m.delta()).to(target.dtype)
            return score()
        finally:
            restore()

    def evaluate_sld(path: str) -> dict:
        with deltacodec.apply(base, path, backend="torch"):
            return score()

    beds = []
    for name, adir in adapters:
        ad = deltacodec.read_adapter(adir)
        bed = Testbed(name=name, adapter=ad, evaluate=evaluate, evaluate_sld=evaluate_sld)
        bed.reference = evaluate(ad.modules)
        beds.append(bed)
    return beds


# ==================================================================================================
# Arms: one adapter in, dequantized modules and bytes out
# ==================================================================================================


@dataclass
class ArmResult:
    arm: str
    family: str
    modules: list[AdapterModule]  # same names/scales, dequantized factors
    nbytes: int
    pad: int = 0
    exact: bool | None = None
    sld_path: str | None = None
    container_bytes: int | None = None  # the whole file where one is written (GGUF, .sld)


def _gguf_name(i: int, module: str) -> str:
    # llama.cpp-like names ("blk.N.<proj>.weight.lora_a"): GGUF caps names at 64 bytes
    return f"blk.{i}.{module.rsplit('.', 1)[-1]}.weight"


def _factorwise(adapter: Adapter, arm: str, family: str, code: Callable[[np.ndarray, bool], Coded],
                gguf_type: str | None = None, tmp: str | None = None) -> ArmResult:
    """A peer that codes every factor separately: ``code(x, is_B)``. With ``gguf_type`` the
    blocks are also written as one GGUF LoRA file under ``tmp`` to measure its container."""
    mods, nbytes, pad, exact = [], 0, 0, True
    tensors = []
    for i, m in enumerate(adapter.modules):
        ca, cb = code(m.A, False), code(m.B, True)
        if gguf_type is not None:
            tensors += [(_gguf_name(i, m.name) + ".lora_a", ca.payload), (_gguf_name(i, m.name) + ".lora_b", cb.payload)]
        nbytes += ca.nbytes + cb.nbytes
        pad += ca.pad + cb.pad
        if ca.exact is None:
            exact = None
        elif exact is not None:
            exact = exact and ca.exact and cb.exact
        mods.append(dataclasses.replace(m, A=ca.x_hat, B=cb.x_hat))
    container = None
    if gguf_type is not None and tmp is not None:
        alpha = float(adapter.config.get("lora_alpha", adapter.modules[0].scale * adapter.modules[0].rank))
        container = gguf_file_size(tensors, gguf_type, alpha, os.path.join(tmp, arm.replace(" ", "_") + ".gguf"))
    return ArmResult(arm=arm, family=family, modules=mods, nbytes=nbytes, pad=pad, exact=exact, container_bytes=container)


def peer_arms(ggml: GgmlQuantizer | None, zipnn_ok: bool, tmp: str) -> list[tuple[str, str, Callable[[Adapter], ArmResult]]]:
    arms = []
    for t in GGUF_TYPES:
        if gguf_has_quantizer(t) or ggml is not None:
            arms.append((f"GGUF {t}", "gguf", lambda ad, t=t: _factorwise(
                ad, f"GGUF {t}", "gguf", lambda x, is_b: code_factor(x, t, transpose=is_b, ggml=ggml),
                gguf_type=t, tmp=tmp)))
    arms.append(("NF4", "nf4", lambda ad: _factorwise(ad, "NF4", "nf4", lambda x, _: code_nf4(x))))
    arms.append(("NF4-dq", "nf4", lambda ad: _factorwise(ad, "NF4-dq", "nf4", lambda x, _: code_nf4(x, True))))
    for dt in ("fp16", "bf16"):
        arms.append((f"{dt}+zstd", "lossless", lambda ad, dt=dt: _factorwise(
            ad, f"{dt}+zstd", "lossless", lambda x, _: code_zstd(x, dt))))
        if zipnn_ok:
            arms.append((f"{dt}+zipnn", "lossless", lambda ad, dt=dt: _factorwise(
                ad, f"{dt}+zipnn", "lossless", lambda x, _: code_zipnn(x, dt))))
    return arms


BPP_TARGETS = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 7.0, 8.0)


def encode_capabilities() -> dict[str, bool]:
    """What the installed ``deltacodec.encode`` accepts (v2: ``bits_per_param``, ``container``)."""
    params = inspect.signature(deltacodec.encode).parameters
    return {"rate_control": "bits_per_param" in params, "container": "container" in params}


def deltacodec_options() -> list[tuple[str, dict]]:
    """(arm name, encode kwargs) for what the installed ``deltacodec.encode`` supports: k-means
    at 1..8 bits and 16 always; with the v2 encoder also k-means in container 2, ECSQ and auto
    at a ladder of bits/param targets, and 16 bits in container 2."""
    cap = encode_capabilities()
    opts = [(f"dc kmeans {b}b", {"bits": b, "quantizer": "kmeans"}) for b in range(1, 9)]
    if cap["container"]:
        opts += [(f"dc kmeans-v2 {b}b", {"bits": b, "quantizer": "kmeans", "container": 2}) for b in range(1, 9)]
    if cap["rate_control"]:
        for q in ("ecsq", "auto"):
            opts += [(f"dc {q} {bpp:g}bpp", {"quantizer": q, "bits_per_param": bpp}) for bpp in BPP_TARGETS]
    opts.append(("dc 16b", {"bits": 16}))
    if cap["container"]:
        opts.append(("dc 16b-v2", {"bits": 16, "container": 2}))
    return opts


def deltacodec_arm(adapter: Adapter, name: str, kw: dict, tmp: str) -> ArmResult:
    path = os.path.join(tmp, name.replace(" ", "_") + ".sld")
    deltacodec.encode(adapter, out=path, force=True, **kw)
    f = deltacodec.load(path)
    by_name = {m.name: m for m in adapter.modules}
    mods = []
    for e in f.modules:
        A_q, B_q = f.dequantize(e.name)
        mods.append(dataclasses.replace(by_name[e.name], A=np.asarray(A_q, np.float32), B=np.asarray(B_q, np.float32)))
    size = os.path.getsize(path)
    return ArmResult(arm=name, family=DELTACODEC, modules=mods, nbytes=size, sld_path=path, container_bytes=size)


# ==================================================================================================
# Measurement
# ==================================================================================================


def module_errors(adapter: Adapter, mods: list[AdapterModule]) -> np.ndarray:
    by_name = {m.name: m for m in adapter.modules}
    errs = []
    for q in mods:
        m = by_name[q.name]
        errs.append(relative_error(m.A, m.B, q.A, q.B, sine=m.sine, omega=m.omega))
    return np.array(errs)


def measure(bed: Testbed, res: ArmResult, check_apply: bool) -> dict:
    errs = module_errors(bed.adapter, res.modules)
    row = {
        "adapter": bed.name, "arm": res.arm, "family": res.family, "params": bed.params,
        "bytes": res.nbytes, "bits_per_param": 8 * res.nbytes / bed.params,
        "dw_rel_error_mean": float(errs.mean()), "dw_rel_error_median": float(np.median(errs)),
        "dw_rel_error_max": float(errs.max()), "pad_values": res.pad,
        "file_bytes": res.container_bytes if res.container_bytes is not None else "",
        "exact": "" if res.exact is None else res.exact,
    }
    if bed.evaluate is not None:
        s = bed.evaluate(res.modules)
        row.update(accuracy=s["accuracy"], loss=s["loss"],
                   ref_accuracy=bed.reference["accuracy"], ref_loss=bed.reference["loss"])
        if check_apply and res.sld_path is not None:
            via = bed.evaluate_sld(res.sld_path)
            row["apply_loss"] = via["loss"]
    return row


def lossless_rows(bed: Testbed, zipnn_ok: bool, tmp: str) -> list[dict]:
    """The adapter as a user would hold it in 16 bits (factors rounded to fp16 or bf16), coded
    losslessly: deltacodec ``bits=16`` against ``{dtype}`` + zstd / zipnn on the same values.
    ``exact``: every decoded value equals the 16-bit input (for deltacodec: the dequantized
    factors compared with the rounded ones)."""
    from peers.lossless import from16, to16

    rows = []
    for dt in ("fp16", "bf16"):
        mods16 = [dataclasses.replace(m, A=from16(to16(m.A, dt), dt), B=from16(to16(m.B, dt), dt))
                  for m in bed.adapter.modules]
        ad16 = dataclasses.replace(bed.adapter, modules=mods16)
        arms = [deltacodec_arm(ad16, f"dc 16b on {dt}", {"bits": 16}, tmp)]
        if encode_capabilities()["container"]:
            arms.append(deltacodec_arm(ad16, f"dc 16b-v2 on {dt}", {"bits": 16, "container": 2}, tmp))
        n_dc = len(arms)
        for res in arms:
            res.exact = all(np.array_equal(q.A, m.A) and np.array_equal(q.B, m.B) for q, m in zip(res.modules, mods16))
        arms.append(_factorwise(ad16, f"{dt}+zstd", "lossless", lambda x, _, dt=dt: code_zstd(x, dt)))
        if zipnn_ok:
            arms.append(_factorwise(ad16, f"{dt}+zipnn", "lossless", lambda x, _, dt=dt: code_zipnn(x, dt)))
        for res in arms:
            rows.append({"adapter": bed.name, "source_dtype": dt, "arm": res.arm, "params": bed.params,
                         "bytes": res.nbytes, "bits_per_param": 8 * res.nbytes / bed.params, "exact": res.exact})
        group = rows[-len(arms):]
        exact_peers = [r for r in group[n_dc:] if r["exact"]]
        if exact_peers:
            best = min(exact_peers, key=lambda r: r["bytes"])
            for r in group[:n_dc]:
                r["ratio_vs_best_exact_peer"] = r["bytes"] / best["bytes"]
                r["best_exact_peer"] = best["arm"]
    return rows


def print_lossless(rows: list[dict]) -> None:
    print("\n## 16-bit sources coded losslessly (ratio: deltacodec ÷ the smallest peer that decodes exactly)")
    print(f"{'adapter':<26} {'arm':<16} {'bytes':>11} {'bits/p':>7} {'exact':>5} {'ratio':>7}")
    for r in rows:
        print(f"{r['adapter']:<26} {r['arm']:<16} {r['bytes']:>11,} {r['bits_per_param']:>7.3f} {str(r['exact']):>5} "
              f"{_f(r.get('ratio_vs_best_exact_peer'), '7.3f'):>7}")


def ratio_rows(rows: list[dict]) -> list[dict]:
    """Equal-distortion byte ratios per adapter (see the module docstring)."""
    out = []
    adapters = list(dict.fromkeys(r["adapter"] for r in rows))
    measures = [("dw_rel_error_mean", True)] + ([("loss", False)] if any("loss" in r for r in rows) else [])
    for ad in adapters:
        rs = [r for r in rows if r["adapter"] == ad]
        dc = [r for r in rs if r["family"] == DELTACODEC]
        peers = [r for r in rs if r["family"] != DELTACODEC]
        for key, log_d in measures:
            if key not in rs[0]:
                continue
            dc_front = pareto_front((r["bytes"], r[key]) for r in dc)
            peer_front = pareto_front((r["bytes"], r[key]) for r in peers)
            for p in peers:  # deltacodec at this peer's distortion
                if key == "loss" and p["loss"] - p["ref_loss"] < LOSS_FLOOR * p["ref_loss"]:
                    continue  # within noise of the unquantized adapter: every high rate ties
                b = bytes_at(dc_front, p[key], log_d=log_d)
                s = smallest_within(dc_front, p[key])
                pf = p.get("file_bytes") or None  # GGUF: the whole file, container included
                out.append({"adapter": ad, "measure": key, "kind": "vs_peer", "arm": p["arm"],
                            "distortion": p[key], "peer_bits_per_param": p["bits_per_param"],
                            "dc_bits_per_param": None if b is None else 8 * b / p["params"],
                            "ratio": None if b is None else b / p["bytes"],
                            "ratio_setting": None if s is None else s / p["bytes"],
                            "ratio_file": None if b is None or pf is None else b / pf})
            for d in dc:  # the best peer at this deltacodec point's distortion
                if key == "loss" and d["loss"] - d["ref_loss"] < LOSS_FLOOR * d["ref_loss"]:
                    continue
                r = equal_distortion_ratio(d["bytes"], d[key], peer_front, log_d=log_d)
                b = bytes_at(peer_front, d[key], log_d=log_d)
                s = smallest_within(peer_front, d[key])
                out.append({"adapter": ad, "measure": key, "kind": "vs_best_peer", "arm": d["arm"],
                            "distortion": d[key], "peer_bits_per_param": None if b is None else 8 * b / d["params"],
                            "dc_bits_per_param": d["bits_per_param"], "ratio": r,
                            "ratio_setting": None if s is None else d["bytes"] / s})
    return out


# ==================================================================================================
# Output
# ==================================================================================================


def _f(v, fmt: str) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def print_points(rows: list[dict]) -> None:
    for ad in dict.fromkeys(r["adapter"] for r in rows):
        rs = [r for r in rows if r["adapter"] == ad]
        trained = "loss" in rs[0]
        print(f"\n## {ad}: {rs[0]['params']:,} params" + (
            f"; unquantized: accuracy {rs[0]['ref_accuracy']:.2f}%, loss {rs[0]['ref_loss']:.4f}" if trained else ""))
        print(f"{'arm':<18} {'bytes':>11} {'file B':>11} {'bits/p':>7} {'ΔW err mean':>11} {'median':>8} {'max':>8} {'pad':>6} {'exact':>5}"
              + (f" {'acc %':>7} {'loss':>8}" if trained else ""))
        for r in sorted(rs, key=lambda r: r["bytes"]):
            fb = f"{r['file_bytes']:,}" if r["file_bytes"] != "" else "—"
            print(f"{r['arm']:<18} {r['bytes']:>11,} {fb:>11} {r['bits_per_param']:>7.3f} {r['dw_rel_error_mean']:>11.4g} "
                  f"{r['dw_rel_error_median']:>8.4g} {r['dw_rel_error_max']:>8.4g} {r['pad_values']:>6} {str(r['exact']):>5}"
                  + (f" {r['accuracy']:>7.2f} {r['loss']:>8.4f}" if trained else ""))


def print_ratios(ratios: list[dict]) -> None:
    for ad in dict.fromkeys(r["adapter"] for r in ratios):
        for key in dict.fromkeys(r["measure"] for r in ratios if r["adapter"] == ad):
            rs = [r for r in ratios if r["adapter"] == ad and r["measure"] == key]
            what = "relative ΔW error" if key.startswith("dw") else "held-out loss"
            print(f"\n### {ad}: bytes of deltacodec ÷ bytes of the peer at equal {what} (< 1: deltacodec smaller)")
            print("ratio: interpolated on the other side's front; setting: against the other side's smallest "
                  "measured setting at least as good; vs file: ratio against the peer's whole GGUF file")
            print(f"{'peer':<18} {'distortion':>11} {'peer b/p':>9} {'dc b/p':>8} {'ratio':>7} {'setting':>7} {'vs file':>7}")
            for r in (x for x in rs if x["kind"] == "vs_peer"):
                print(f"{r['arm']:<18} {r['distortion']:>11.4g} {r['peer_bits_per_param']:>9.3f} "
                      f"{_f(r['dc_bits_per_param'], '8.3f'):>8} {_f(r['ratio'], '7.3f'):>7} {_f(r['ratio_setting'], '7.3f'):>7} "
                      f"{_f(r['ratio_file'], '7.3f'):>7}")
            print(f"{'deltacodec':<18} {'distortion':>11} {'best b/p':>9} {'dc b/p':>8} {'ratio':>7} {'setting':>7}"
                  "   (vs the peers' joint front)")
            for r in (x for x in rs if x["kind"] == "vs_best_peer"):
                print(f"{r['arm']:<18} {r['distortion']:>11.4g} {_f(r['peer_bits_per_param'], '9.3f'):>9} "
                      f"{r['dc_bits_per_param']:>8.3f} {_f(r['ratio'], '7.3f'):>7} {_f(r['ratio_setting'], '7.3f'):>7}")


def print_summary(ratios: list[dict]) -> None:
    """One line per peer: deltacodec's equal-distortion ratio on every adapter (ΔW error; loss in
    brackets where measured)."""
    ads = list(dict.fromkeys(r["adapter"] for r in ratios))
    peers = list(dict.fromkeys(r["arm"] for r in ratios if r["kind"] == "vs_peer"))
    cell = {(r["adapter"], r["arm"], r["measure"]): r for r in ratios if r["kind"] == "vs_peer"}
    print("\n## Summary: bytes of deltacodec (best setting, interpolated) ÷ bytes of the peer at equal relative "
          "ΔW error [at equal held-out loss]; peer payload, no container")
    print(f"{'peer':<12}" + "".join(f" {a[:24]:>24}" for a in ads))
    for p in peers:
        line = f"{p:<12}"
        for a in ads:
            dw = cell.get((a, p, "dw_rel_error_mean"))
            lo = cell.get((a, p, "loss"))
            txt = _f(dw["ratio"] if dw else None, ".3f")
            if lo is not None:
                txt += f" [{_f(lo['ratio'], '.3f')}]"
            line += f" {txt:>24}"
        print(line)


def read_csv(path: Path) -> list[dict]:
    """Rows written by :func:`write_csv`, numbers back as numbers ("" and absent cells dropped)."""
    def conv(v: str):
        if v in ("True", "False"):
            return v == "True"
        try:
            return int(v)
        except ValueError:
            try:
                return float(v)
            except ValueError:
                return v

    with open(path, newline="") as fh:
        return [{k: conv(v) for k, v in r.items() if v != ""} for r in csv.DictReader(fh)]


def write_csv(rows: list[dict], path: Path) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ads = list(dict.fromkeys(r["adapter"] for r in rows))
    panels = [("dw_rel_error_mean", "mean relative ΔW error", True)]
    if any("loss" in r for r in rows):
        panels.append(("loss", "held-out answer loss (nats)", False))
    fig, axes = plt.subplots(len(panels), len(ads), figsize=(5.2 * len(ads), 4.2 * len(panels)), squeeze=False)
    for row_i, (key, label, logy) in enumerate(panels):
        for ax, ad in zip(axes[row_i], ads):
            rs = [r for r in rows if r["adapter"] == ad and key in r]
            if not rs:
                ax.axis("off")
                continue
            for fam, style in ((DELTACODEC, "o-"), ("gguf", "s"), ("nf4", "^"), ("lossless", "x")):
                fr = [r for r in rs if r["family"] == fam]
                if fam == DELTACODEC:
                    for q in dict.fromkeys(r["arm"].rsplit(" ", 1)[0] for r in fr):
                        qr = sorted((r for r in fr if r["arm"].rsplit(" ", 1)[0] == q), key=lambda r: r["bytes"])
                        ax.plot([r["bits_per_param"] for r in qr], [r[key] for r in qr], style, ms=4,
                                label="dc 16-bit" if q == "dc" else q)
                    continue
                for r in fr:
                    ax.plot(r["bits_per_param"], r[key], style, ms=6, color={"gguf": "C3", "nf4": "C2"}.get(fam, "C7"))
                    ax.annotate(r["arm"].replace("GGUF ", ""), (r["bits_per_param"], r[key]),
                                fontsize=6, xytext=(3, 2), textcoords="offset points")
            if key == "loss":
                ax.axhline(rs[0]["ref_loss"], color="k", lw=0.8, ls="--", label="unquantized")
            ax.set(xscale="log", yscale="log" if logy else "linear", xlabel="bits / parameter", ylabel=label, title=ad)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    log(f"wrote {path}")


# ==================================================================================================
# Main
# ==================================================================================================


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="See the module docstring (benchmarks/bench_peers.py) for definitions.")
    ap.add_argument("--rank", type=int, default=16, help="rank of the synthetic adapter (default 16)")
    ap.add_argument("--layers", type=int, default=2, help="layers of the 32 in the synthetic adapter (default 2)")
    ap.add_argument("--no-synthetic", action="store_true")
    ap.add_argument("--no-trained", action="store_true", help="skip training (the synthetic adapter only)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[4, 8], help="trained adapters' ranks (default 4 8)")
    ap.add_argument("--reuse-trained", type=Path, metavar="DIR",
                    help="load the trained adapters from DIR/adapters/<method>-r<rank> (an earlier run's <out>/trained)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-cpp-src", help="llama-cpp-python sdist (.tar.gz or directory): ggml's K-quant quantizers")
    ap.add_argument("--no-zipnn", action="store_true")
    ap.add_argument("--out", type=Path, default=HERE / "out" / "peers")
    ap.add_argument("--cache-dir", type=Path, default=HERE / "out" / "cache", help="rd_experiment's base-model cache")
    ap.add_argument("--plot", type=Path, help="write a bits/param vs ΔW error PNG here")
    ap.add_argument("--tables", type=Path, metavar="DIR",
                    help="measure nothing: print the tables (and --plot) from DIR/points.csv and DIR/lossless.csv")
    return ap.parse_args(argv)


def reprint(d: Path, plot_path: Path | None) -> int:
    rows = read_csv(d / "points.csv")
    for r in rows:
        r.setdefault("file_bytes", "")
        r.setdefault("exact", "")
    print(f"# deltacodec vs peers (bench_peers.py), from {d}")
    print_points(rows)
    ratios = ratio_rows(rows)
    print_ratios(ratios)
    if (d / "lossless.csv").is_file():
        print_lossless(read_csv(d / "lossless.csv"))
    print_summary(ratios)
    if plot_path:
        plot(rows, plot_path)
    return 0


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.tables:
        return reprint(a.tables, a.plot)
    ggml, how = load_ggml(a.llama_cpp_src)
    log(f"ggml: {how}")
    missing = [t for t in GGUF_TYPES if not gguf_has_quantizer(t)]
    notes = [f"gguf package quantizes {', '.join(t for t in GGUF_TYPES if t not in missing)} itself; "
             f"{', '.join(missing)}: " + (f"ggml's quantizer ({how})" if ggml else f"LEFT OUT ({how})")]
    zv = None if a.no_zipnn else zipnn_version()
    notes.append(f"zipnn {zv}" if zv else "zipnn: not installed or disabled (pip install zipnn)")
    opts = deltacodec_options()
    notes.append("deltacodec arms: " + ", ".join(n for n, _ in opts))

    beds: list[Testbed] = []
    if not a.no_synthetic:
        beds.append(synthetic_testbed(a.rank, a.layers))
    if not a.no_trained:
        beds += trained_testbeds(a.seed, tuple(a.ranks), a.out, a.cache_dir, a.threads, a.reuse_trained)
    rows, lossless = [], []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        arms = peer_arms(ggml, zv is not None, tmp)
        for bed in beds:
            log(f"{bed.name}: {bed.params:,} params, {len(bed.adapter.modules)} modules")
            for name, kw in opts:
                try:
                    res = deltacodec_arm(bed.adapter, name, kw, tmp)
                except deltacodec.SldError as exc:  # e.g. a rate target the encoder cannot reach
                    log(f"{bed.name}: {name} skipped: {exc}")
                    continue
                rows.append(measure(bed, res, check_apply=True))
            for name, _, run in arms:
                rows.append(measure(bed, run(bed.adapter), check_apply=False))
            lossless += lossless_rows(bed, zv is not None, tmp)
            log(f"{bed.name}: done ({time.perf_counter() - t0:.0f} s)")
    ratios = ratio_rows(rows)

    print("# deltacodec vs peers (bench_peers.py)")
    for n in notes:
        print(f"- {n}")
    print_points(rows)
    print_ratios(ratios)
    print_lossless(lossless)
    print_summary(ratios)
    apply_gaps = [abs(r["apply_loss"] - r["loss"]) for r in rows if "apply_loss" in r]
    if apply_gaps:
        print(f"\nmerge check: |loss via deltacodec.apply − loss via the plain merge| ≤ {max(apply_gaps):.2e} over "
              f"{len(apply_gaps)} deltacodec files")
    write_csv(rows, a.out / "points.csv")
    write_csv(ratios, a.out / "ratios.csv")
    write_csv(lossless, a.out / "lossless.csv")
    log(f"wrote points.csv, ratios.csv, lossless.csv in {a.out}")
    if a.plot:
        plot(rows, a.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
