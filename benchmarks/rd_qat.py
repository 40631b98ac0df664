"""QAT arm of the RD experiment (issue 12): quantization-aware vs post-training quantization.

Testbed 1 of ``rd_experiment.py`` (tiny Llama, new-cipher task; its base model, data, adapter
configs and accuracy are imported from there). Per method (LoRA, SineLoRA) and rank, one training
run of ``steps`` steps is shared by every arm up to the switch point ``steps - qat_steps``:

* **PTQ**: plain training to the end, ``save_pretrained``, ``deltacodec.encode`` at b bits (the
  codec's k-means), applied to the bare base with ``deltacodec.apply``;
* **QAT at b bits**: from the switch point, the same remaining steps with
  ``deltacodec.sinelora.enable_qat(model, bits=b)`` (nothing else changes: same optimizer state,
  batches and learning rate), then ``export_sld`` and the same apply + evaluation.

So both arms have the same total step budget; the QAT steps are counted inside it. Quality is
test accuracy (%) of the patched base; rate is the ``.sld`` size. BD-rate (akima, curves over
ranks at each bit width) of QAT against PTQ per method, and SineLoRA-QAT against LoRA-QAT.
Hyperparameters are not searched here: each (method, rank) uses the learning rate and ω that
``rd_experiment.py``'s validation search chose for seed 0 (``benchmarks/README.md``), for every
seed. Training-time overhead: seconds per step of the QAT phase over seconds per step of the
same phase trained plainly (PTQ arm), measured in the same process.

Usage::

    python benchmarks/rd_qat.py --seed 0                 # -> benchmarks/out/rd_qat/seed0/
    python benchmarks/rd_qat.py --quick --out /tmp/rdq    # small task, ranks 2 8, ~1 min
    python benchmarks/rd_qat.py --summarize benchmarks/out/rd_qat/seed0 benchmarks/out/rd_qat/seed1

``--testbed text`` runs the same protocol on testbed 2 (``rd_text.py``: byte-level Llama pretrained on
stdlib code, adapters trained on docstrings), imported from there: rd_text's settings (ranks 4, 8,
16, 200 steps of 16 windows, AdamW with 5% warmup then linear decay to 0, clipping at 1, ω = 100,
lr = 3e-3, the same initial factors and windows as ``rd_text.train_adapter``; the PTQ arm's
adapter is the one rd_text trains), its cached base (``--threads`` enters the cache key) and
quality = held-out bits/byte of the patched base on the test docstrings (RD quality = −bpb)::

    python benchmarks/rd_qat.py --testbed text --seed 0 --threads 1   # -> benchmarks/out/rd_qat/text-seed0/
    python benchmarks/rd_qat.py --testbed text --quick --out /tmp/rdq-text
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import deltacodec  # noqa: E402
from deltacodec.analysis import RDPoint, bd_table  # noqa: E402
import rdlib  # noqa: E402
from rd_experiment import (  # noqa: E402
    Settings,
    accuracy,
    adapter_config,
    answer_loss,
    downstream_splits,
    load_base,
    load_or_pretrain_base,
    log,
    lr_schedule,
    make_tables,
    monotone_frontier,
    quick_settings,
    weights_digest,
)

METHODS = ("LoRA", "SineLoRA")
INTERP = "akima"
# rd_experiment.py's validation choice for seed 0 (benchmarks/README.md): rank -> (ω, lr).
HYPER = {
    "LoRA": {1: (None, 1e-3), 2: (None, 3e-3), 4: (None, 3e-3), 8: (None, 3e-3), 16: (None, 3e-3)},
    "SineLoRA": {1: (100.0, 3e-3), 2: (100.0, 3e-3), 4: (100.0, 3e-3), 8: (30.0, 3e-3), 16: (30.0, 3e-3)},
}
QUICK_HYPER = {"LoRA": (None, 3e-3), "SineLoRA": (100.0, 3e-3)}


def hyper(method: str, rank: int, quick: bool) -> tuple[float | None, float]:
    if quick or rank not in HYPER[method]:
        return QUICK_HYPER[method]
    return HYPER[method][rank]


def setting(b: float, a: argparse.Namespace) -> str:
    """A rate setting's label: ``2b`` (fixed bits, k-means) or ``2b/p`` (bits/param target)."""
    return f"{b:g}b/p" if a.bits_per_param else f"{b:g}b"


def ptq_encode(adir: Path, b: float, a: argparse.Namespace, p: Path) -> None:
    """The PTQ arm's file: the codec at ``b`` bits (k-means) or at ``b`` bits/param (``a.quantizer``,
    the codec's default refit and allocation, as a user's ``sld encode --bits-per-param`` gets)."""
    if a.bits_per_param:
        deltacodec.encode(adir, bits_per_param=b, quantizer=a.quantizer, out=p, force=True)
    else:
        deltacodec.encode(adir, bits=int(b), out=p, force=True)


def qat_on(pm, b: float, a: argparse.Namespace, refresh_every: int | None = None):
    """QAT on at ``b`` bits (k-means) or ``b`` bits/param (``a.quantizer``)."""
    from deltacodec.sinelora import enable_qat

    every = a.refresh_every if refresh_every is None else refresh_every
    if a.bits_per_param:
        return enable_qat(pm, bits_per_param=b, quantizer=a.quantizer, refresh_every=every)
    return enable_qat(pm, bits=int(b), refresh_every=every)


def unreachable(err: Exception, what: str) -> None:
    """A bits/param target below what the codec can reach for this adapter (the container alone
    is larger) is a missing point, not a failed run."""
    log(f"  {what}: no point ({err})")


def both_arms(snap, adir: Path, stem: Path, bits, a: argparse.Namespace, ptq_row, qat_row) -> list[dict]:
    """Both arms of one (method, rank) at every rate setting: PTQ encodes the plainly trained
    adapter in ``adir`` into ``<stem>-b<b>-ptq.sld``; QAT continues a fork of ``snap`` (the run
    at the switch point) for the QAT steps with :func:`qat_on` and exports ``<stem>-b<b>-qat.sld``,
    at the settings PTQ reached. ``ptq_row(b, path)`` and ``qat_row(qat_model, path)`` measure a
    file (testbed-specific); the rows carry arm, setting, bytes and the QAT phase's figures."""
    from deltacodec.sinelora import export_sld

    rows, reached = [], []
    for b in bits:
        p = stem.with_name(f"{stem.name}-b{b:g}-ptq.sld")
        try:
            ptq_encode(adir, b, a, p)
        except deltacodec.EncodeError as e:
            unreachable(e, f"{stem.name} PTQ {setting(b, a)}")
            continue
        reached.append(b)
        rows.append({"arm": "PTQ", "bits": b, "setting": setting(b, a), "bytes": os.path.getsize(p), **ptq_row(b, p)})
    for b in reached:
        q = snap.fork()
        p = stem.with_name(f"{stem.name}-b{b:g}-qat.sld")
        try:
            qs = qat_on(q.pm, b, a)
            t_qat, loss_qat = q.advance(a.qat_steps)
            t0 = time.perf_counter()
            export_sld(q.pm, p, force=True)
        except deltacodec.EncodeError as e:
            unreachable(e, f"{stem.name} QAT {setting(b, a)}")
            continue
        t_export = time.perf_counter() - t0
        rows.append({"arm": "QAT", "bits": b, "setting": setting(b, a), "bytes": os.path.getsize(p),
                     "final_loss": loss_qat, "phase_seconds": t_qat, "export_seconds": t_export,
                     "refreshes": qs.refreshes, **qat_row(q.pm, p)})
    return rows


class Run:
    """One adapter's training state: PEFT model, AdamW, step counter (batches are a function of
    the step, so a copy resumes exactly where the original was)."""

    def __init__(self, pm, lr: float, st: Settings, train: torch.Tensor, order: torch.Tensor):
        self.pm, self.lr, self.st, self.train, self.order = pm, lr, st, train, order
        self.params = [p for p in pm.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
        self.step = 0
        self.decay_from: int | None = None  # --decay-last: the last phase's rate falls linearly to 0

    def batch(self, step: int) -> torch.Tensor:
        n = len(self.order) - len(self.order) % self.st.batch
        i = (step * self.st.batch) % n
        return self.train[self.order[i : i + self.st.batch]]

    def advance(self, n: int) -> tuple[float, float]:
        """Train ``n`` steps (AdamW, 5% warmup, then constant: rd_experiment's adapter schedule);
        returns (seconds, last loss)."""
        self.pm.train()
        loss = torch.tensor(float("nan"))
        t0 = time.perf_counter()
        for _ in range(n):
            mult = lr_schedule(self.step, self.st.steps, max(1, self.st.steps // 20), decay=False)
            if self.decay_from is not None and self.step >= self.decay_from:  # linear to 0 at the end
                mult *= (self.st.steps - self.step) / max(1, self.st.steps - self.decay_from)
            for g in self.opt.param_groups:
                g["lr"] = self.lr * mult
            loss = answer_loss(self.pm, self.batch(self.step), self.st.task)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.step += 1
        secs = time.perf_counter() - t0
        self.pm.eval()
        return secs, float(loss.item())

    def fork(self) -> "Run":
        """An independent copy (model, optimizer state, step)."""
        twin = Run(copy.deepcopy(self.pm), self.lr, self.st, self.train, self.order)
        twin.opt.load_state_dict(self.opt.state_dict())  # params in the same order
        twin.step = self.step
        twin.decay_from = self.decay_from
        return twin


def evaluate_file(base, path: Path, test: torch.Tensor, st: Settings, digest: str) -> float:
    with deltacodec.apply(base, path, backend="torch"):
        acc = accuracy(base, test, st.task)
    if weights_digest(base) != digest:
        raise RuntimeError(f"{path}: the base weights changed after apply(...).remove()")
    return acc


def run_cell(base, method: str, rank: int, data: dict, st: Settings, a: argparse.Namespace, out: Path,
             digest: str) -> list[dict]:
    from peft import get_peft_model

    from deltacodec.sinelora import get_sinelora_model

    omega, lr = hyper(method, rank, st.quick)
    torch.manual_seed(st.seed * 1000 + rank)  # as rd_experiment.train_adapter: same initial A per rank
    model = copy.deepcopy(base)
    cfg = adapter_config(method, rank, omega, st)
    pm = get_peft_model(model, cfg) if method == "LoRA" else get_sinelora_model(model, cfg)
    order = torch.randperm(len(data["train"]), generator=torch.Generator().manual_seed(st.seed))
    run = Run(pm, lr, st, data["train"], order)
    switch = st.steps - a.qat_steps
    if a.decay_last:
        run.decay_from = switch
    t_pre, _ = run.advance(switch)
    snap = run.fork()
    t_plain, loss_plain = run.advance(a.qat_steps)
    adir = out / "adapters" / f"{method}-r{rank}"
    run.pm.save_pretrained(adir)
    fp_acc = accuracy(run.pm, data["test"], st.task)
    sld = out / "sld"
    sld.mkdir(parents=True, exist_ok=True)
    common = {"method": method, "rank": rank, "omega": omega, "lr": lr, "steps": st.steps, "qat_steps": a.qat_steps,
              "unquantized_accuracy": fp_acc, "adapter_bytes": os.path.getsize(adir / "adapter_model.safetensors"),
              "pre_seconds": t_pre, "plain_phase_seconds": t_plain}
    def ptq_row(b: float, p: Path) -> dict:
        return {"accuracy": evaluate_file(base, p, data["test"], st, digest), "final_loss": loss_plain,
                "phase_seconds": t_plain, "model_accuracy": fp_acc}

    def qat_row(qpm, p: Path) -> dict:
        model_acc = accuracy(qpm, data["test"], st.task)  # the QAT forward itself, after export
        return {"accuracy": evaluate_file(base, p, data["test"], st, digest), "model_accuracy": model_acc}

    rows = [{**common, **r} for r in both_arms(snap, adir, sld / f"{method}-r{rank}", st.bits, a, ptq_row, qat_row)]
    log(f"{method} r={rank}: fp32 {fp_acc:.2f}%; " + ", ".join(
        f"{r['arm']} {r['setting']} {r['accuracy']:.2f}% ({r['bytes']} B)" for r in rows)
        + f"; step s plain {t_plain / a.qat_steps:.3f}, QAT "
        + "/".join(f"{r['phase_seconds'] / a.qat_steps:.3f}" for r in rows if r["arm"] == "QAT"))
    return rows


def measure_overhead(base, data: dict, st: Settings, a: argparse.Namespace) -> list[dict]:
    """Step time of QAT against plain training, robust to a machine whose load drifts: per
    (method, rank, refit period) a plain and a QAT copy of the same adapter train alternately in
    blocks of 5 steps; the ratio of the median block times is reported."""
    from peft import get_peft_model

    from deltacodec.sinelora import get_sinelora_model

    rows = []
    for rank in st.ranks:
        for m in METHODS:
            omega, lr = hyper(m, rank, st.quick)
            torch.manual_seed(st.seed * 1000 + rank)
            cfg = adapter_config(m, rank, omega, st)
            model = copy.deepcopy(base)
            pm = get_peft_model(model, cfg) if m == "LoRA" else get_sinelora_model(model, cfg)
            order = torch.randperm(len(data["train"]), generator=torch.Generator().manual_seed(st.seed))
            plain = Run(pm, lr, st, data["train"], order)
            plain.advance(st.steps // 20)  # past the warmup
            for period in a.overhead_periods:
                for b in st.bits:
                    q = plain.fork()
                    qat_on(q.pm, b, a, refresh_every=period)
                    p_fork = plain.fork()
                    tp, tq = [], []
                    for _ in range(a.overhead_blocks):
                        tp.append(p_fork.advance(5)[0])
                        tq.append(q.advance(5)[0])
                    ratio = float(np.median(tq) / np.median(tp))
                    rows.append({"method": m, "rank": rank, "bits": b, "setting": setting(b, a), "refresh_every": period,
                                 "plain_step_s": float(np.median(tp)) / 5, "qat_step_s": float(np.median(tq)) / 5,
                                 "ratio": ratio})
                    log(f"overhead {m} r={rank} {setting(b, a)} refit every {period}: plain {np.median(tp) / 5:.4f} s/step, "
                        f"QAT {np.median(tq) / 5:.4f} s/step, ratio {ratio:.2f}")
    return rows


def bd_rows(points: list[RDPoint], anchor: str) -> list[dict]:
    kept, _ = monotone_frontier(points)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bd_table(kept, anchor=anchor, method=INTERP, errors="warn")


def quality(r: dict) -> float:
    """RD quality of one point: testbed 1's test accuracy (%), or testbed 2's negative held-out
    bits/byte (``quality`` in the record)."""
    return float(r["quality"] if "quality" in r else r["accuracy"])


def analyse(records: list[dict]) -> dict:
    """BD tables: per bit width (curve = ranks), QAT vs PTQ per method and SineLoRA vs LoRA
    under QAT (and under PTQ, for reference)."""
    def pts(method: str, arm: str, label: str) -> list[RDPoint]:
        return [RDPoint(label, f"{r['bits']:g}", float(r["bytes"]), quality(r))
                for r in records if r["method"] == method and r["arm"] == arm]

    res = {}
    for m in METHODS:
        res[f"{m}: QAT vs PTQ"] = bd_rows(pts(m, "PTQ", "PTQ") + pts(m, "QAT", "QAT"), "PTQ")
    for arm in ("QAT", "PTQ"):
        res[f"{arm}: SineLoRA vs LoRA"] = bd_rows(pts("LoRA", arm, "LoRA") + pts("SineLoRA", arm, "SineLoRA"), "LoRA")
    return res


@dataclass(frozen=True)
class Shown:
    """How a testbed's tables show quality: the record key of a file's and of the unquantized
    adapter's quality, the cells' number format, and the BD-quality unit and decimals."""

    label: str
    key: str
    fp_key: str
    fmt: str
    bd_unit: str
    bd_decimals: int


ACCURACY = Shown("test accuracy % (bytes)", "accuracy", "unquantized_accuracy", "6.2f", "BD-acc points", 2)
BITS_PER_BYTE = Shown("held-out bits/byte (bytes), lower is better", "bits_per_byte", "unquantized_bits_per_byte",
                      "7.4f", "BD-quality (−bpb)", 4)


def print_tables(records: list[dict], bd: dict, st, a: argparse.Namespace, shown: Shown, testbed: str) -> None:
    """Per (method, rank): the unquantized quality and each arm's file at every rate setting;
    then the BD rows and the QAT phase's time ratio."""
    print(f"\nQAT vs PTQ, {testbed}seed {st.seed}{' (quick)' if st.quick else ''}: {st.steps} steps, last "
          f"{a.qat_steps} quantization-aware (refresh every {a.refresh_every}); {shown.label}")
    bits, u = list(st.bits), unit(records)
    w = int(shown.fmt.split(".")[0]) + 9  # the number, " (", six digits, ")"
    print(f"{'method':8s} {'rank':>4s} {'fp32':>{w - 9}s} "
          + " ".join(f"{f'PTQ {b:g}{u}':>{w}s} {f'QAT {b:g}{u}':>{w}s}" for b in bits))
    for m in METHODS:
        for rank in st.ranks:
            rr = {(r["arm"], r["bits"]): r for r in records if r["method"] == m and r["rank"] == rank}
            if not rr:
                continue
            fp = next(iter(rr.values()))[shown.fp_key]
            cells = [f"{rr[(arm, b)][shown.key]:{shown.fmt}} ({rr[(arm, b)]['bytes']:>6d})" if (arm, b) in rr
                     else f"{'-':>{w}s}" for b in bits for arm in ("PTQ", "QAT")]
            print(f"{m:8s} {rank:>4d} {fp:{shown.fmt}} " + " ".join(cells))
    print(f"\nBD per rate setting (curve = ranks, {INTERP}): BD-rate % (negative = fewer bytes) | {shown.bd_unit}")
    for title, rows in bd.items():
        print(f"  {title}: " + ("; ".join(f"{r['group']}{u} {r['bd_rate']:+.2f}% | {r['bd_quality']:+.{shown.bd_decimals}f}"
                                          + (" *" if r["warnings"] else "") for r in rows) or "n/a"))
    print("\nQAT phase time per step / plain phase time per step (same process): "
          + ", ".join(f"{k} {v:.2f}" for k, v in overhead(records).items()))


def unit(records: list[dict]) -> str:
    """``b/p`` for a bits/param run, ``b`` for fixed bits."""
    return "b/p" if any(r.get("setting", "").endswith("b/p") for r in records) else "b"


def overhead(records: list[dict]) -> dict:
    out = {}
    u = unit(records)
    for m in METHODS:
        for b in sorted({r["bits"] for r in records}):
            q = [r["phase_seconds"] for r in records if r["method"] == m and r["arm"] == "QAT" and r["bits"] == b]
            p = [r["phase_seconds"] for r in records if r["method"] == m and r["arm"] == "PTQ" and r["bits"] == b]
            if q and p:
                out[f"{m} {b:g}{u}"] = float(np.sum(q) / np.sum(p))
    return out


def run(st: Settings, a: argparse.Namespace, out: Path) -> dict:
    rdlib.start_run(st.threads, st.seed)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    pre_tables, new_tables = make_tables(st.task, st.seed)
    base_path, base_info = load_or_pretrain_base(st, a.cache_dir, pre_tables)
    base = load_base(base_path)
    data = downstream_splits(st.task, st.seed, st.steps * st.batch, st.n_val, st.n_test, new_tables)
    digest = weights_digest(base)
    if a.overhead:
        rows = measure_overhead(base, data, st, a)
        (out / "overhead.json").write_text(json.dumps({"settings": {"seed": st.seed, "threads": st.threads,
                                                                    "blocks": a.overhead_blocks}, "rows": rows}, indent=1))
        print(f"{'method':8s} {'rank':>4s} {'rate':>6s} {'refit':>5s} {'plain s':>8s} {'QAT s':>8s} {'ratio':>6s}")
        for r in rows:
            print(f"{r['method']:8s} {r['rank']:>4d} {r['setting']:>6s} {r['refresh_every']:>5d} {r['plain_step_s']:>8.4f} "
                  f"{r['qat_step_s']:>8.4f} {r['ratio']:>6.2f}")
        return {"overhead": rows}
    records: list[dict] = []
    summary = {"settings": {"seed": st.seed, "quick": st.quick, "steps": st.steps, "batch": st.batch,
                            "ranks": list(st.ranks), "bits": list(st.bits), "qat_steps": a.qat_steps,
                            "bits_per_param": bool(a.bits_per_param), "quantizer": a.quantizer if a.bits_per_param else "kmeans",
                            "refresh_every": a.refresh_every, "threads": st.threads,
                            "decay_last": a.decay_last},
               "base": {**base_info, "path": str(base_path)}}
    for rank in st.ranks:
        for m in METHODS:
            records += run_cell(base, m, rank, data, st, a, out, digest)
            summary["measurements"] = records
            (out / "measurements.json").write_text(json.dumps(summary, indent=1, default=float))
    return finish(records, summary, out, t_start, "accuracy", lambda bd: print_tables(records, bd, st, a, ACCURACY, ""))


def finish(records: list[dict], summary: dict, out: Path, t_start: float, quality: str, print_tables_of) -> dict:
    """A testbed run's end: BD and overhead into the summary, measurements.json and rd_qat.csv
    (``sld bd`` format, quality = ``records[i][quality]``) written, the tables printed."""
    summary["bd"] = analyse(records)
    summary["overhead"] = overhead(records)
    summary["total_seconds"] = time.perf_counter() - t_start
    (out / "measurements.json").write_text(json.dumps(summary, indent=1, default=float))
    with open(out / "rd_qat.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "group", "rate", "quality"])
        for r in records:
            w.writerow([f"{r['method']}-{r['arm']}", r["bits"], r["bytes"], f"{r[quality]:.4f}"])
    print_tables_of(summary["bd"])
    print(f"\ntotal {summary['total_seconds']:.0f} s; outputs in {out}")
    return summary


def paired(runs: list[dict]) -> None:
    """Testbed 2, where BD is often undefined (curves of 3 ranks whose quality ranges do not
    overlap): QAT against PTQ at equal (method, rank, bits), files of nearly equal size. Per
    (method, bits) and seed: mean Δ bits/byte over the ranks (QAT − PTQ, negative = QAT better),
    how many ranks have a QAT file both smaller and better, and whether QAT's whole curve beats
    PTQ's (its worst file scores below PTQ's best); then the bytes of QAT's smallest file that
    beats PTQ's best, as a share of the PTQ file's bytes (a bound on the saving at that quality)."""
    print("\nPaired QAT − PTQ at equal rank (testbed 2): mean Δbpb over ranks | ranks with a smaller and better "
          "QAT file | dominance (QAT's smallest file beating PTQ's best, bytes as a share of PTQ's)")
    u = unit(runs[0]["measurements"])
    for m in METHODS:
        for b in sorted({r["bits"] for r in runs[0]["measurements"]}):
            cells = []
            for run_ in runs:
                rr = [r for r in run_["measurements"] if r["method"] == m and r["bits"] == b]
                ptq = {r["rank"]: r for r in rr if r["arm"] == "PTQ"}
                qat = {r["rank"]: r for r in rr if r["arm"] == "QAT"}
                ranks = sorted(set(ptq) & set(qat))
                if not ranks:
                    cells.append(f"{'n/a':24s}")
                    continue
                d = [qat[k]["bits_per_byte"] - ptq[k]["bits_per_byte"] for k in ranks]
                wins = sum(qat[k]["bits_per_byte"] < ptq[k]["bits_per_byte"] and qat[k]["bytes"] < ptq[k]["bytes"]
                           for k in ranks)
                best_ptq = min(ptq.values(), key=lambda r: r["bits_per_byte"])
                beat = [r for r in qat.values() if r["bits_per_byte"] < best_ptq["bits_per_byte"]]
                dom = ""
                if beat:
                    q = min(beat, key=lambda r: r["bytes"])
                    dom = f" r{q['rank']}<r{best_ptq['rank']} {q['bytes'] / best_ptq['bytes']:.2f}"
                    if max(r["bits_per_byte"] for r in qat.values()) < best_ptq["bits_per_byte"]:
                        dom += " all"
                cells.append(f"{np.mean(d):+.4f} {wins}/{len(ranks)}{dom:16s}")
            print(f"  {m:8s} {b:g}{u}: " + " | ".join(cells))


def summarize(dirs: list[Path]) -> None:
    runs = [json.loads((d / "measurements.json").read_text()) for d in dirs]
    seeds = [r["settings"]["seed"] for r in runs]
    u = unit(runs[0]["measurements"])
    qunit = "−bpb" if runs[0].get("testbed") == "rd_text" else "acc points"
    qd = 4 if runs[0].get("testbed") == "rd_text" else 2  # decimals of BD-quality
    print(f"BD-rate % | BD-quality ({qunit}) per rate setting across seeds {seeds} (mean, spread = max - min; * = a bd_table warning)")
    for title in runs[0]["bd"]:
        groups = []
        for r in runs:
            for row in r["bd"].get(title, []):
                if row["group"] not in groups:
                    groups.append(row["group"])
        for g in groups:
            vals = []
            for r in runs:
                row = next((x for x in r["bd"].get(title, []) if x["group"] == g), None)
                vals.append(None if row is None else (row["bd_rate"], row["bd_quality"], bool(row["warnings"])))
            ok = [v for v in vals if v]
            cells = " ".join(f"{v[0]:+8.2f} {v[1]:+8.{qd}f}{'*' if v[2] else ' '}" if v else f"{'n/a':>18s}"
                             for v in vals)
            br, bq = np.array([v[0] for v in ok]), np.array([v[1] for v in ok])
            print(f"  {title:24s} {g}{u}: {cells}   mean {br.mean():+8.2f} {bq.mean():+8.{qd}f}   "
                  f"spread {np.ptp(br):7.2f} {np.ptp(bq):7.{qd}f}")
    if runs[0].get("testbed") == "rd_text":
        paired(runs)
    for r in runs:
        print(f"seed {r['settings']['seed']} overhead (QAT/plain step time): "
              + ", ".join(f"{k} {v:.2f}" for k, v in r["overhead"].items()))


def envelope(dirs: list[Path]) -> None:
    """Whole pipelines against today's encoder: per seed and method, every file of an arm (all
    ranks and rate settings of every run given, fixed-bits and bits/param runs pooled) on one
    curve, its monotone frontier (the best file at each size), and BD of each arm (PTQ or QAT ×
    k-means or the rate-controlled quantizer) against PTQ with k-means."""
    runs = [json.loads((d / "measurements.json").read_text()) for d in dirs]
    by_seed: dict[int, list[dict]] = {}
    for r in runs:
        q = r["settings"].get("quantizer", "kmeans")
        for m in r["measurements"]:
            by_seed.setdefault(r["settings"]["seed"], []).append({**m, "label": f"{m['arm']}-{q}"})
    anchor = "PTQ-kmeans"
    print(f"Envelope BD (curve = every file of the arm, frontier; akima) against {anchor}: "
          "BD-rate % | BD-quality, overlap warnings marked *")
    for seed, recs in sorted(by_seed.items()):
        for method in METHODS:
            pts = [RDPoint(r["label"], method, float(r["bytes"]), quality(r)) for r in recs if r["method"] == method]
            labels = sorted({p.method for p in pts} - {anchor})
            if anchor not in {p.method for p in pts}:
                continue
            rows = {row["method"]: row for row in bd_rows(pts, anchor)}
            cells = []
            for lab in labels:
                row = rows.get(lab)
                cells.append(f"{lab} {row['bd_rate']:+.2f}% | {row['bd_quality']:+.4f}{' *' if row['warnings'] else ''}"
                             if row else f"{lab} n/a")
            print(f"  seed {seed} {method:8s}: " + "; ".join(cells))


# ==================================================================================================
# Testbed 2 (rd_text.py): byte-level Llama on stdlib code, adapted to docstrings; held-out bits/byte
# ==================================================================================================


class TextRun:
    """One testbed-2 adapter's training state, trained exactly as ``rd_text.train_adapter`` trains
    it (AdamW, 5% warmup then linear decay to 0 over ``steps``, clipping at 1, the same random
    windows in the same order), but resumable: the batches are drawn up front, indexed by step,
    so a :meth:`fork` continues where the original was."""

    def __init__(self, pm, lr: float, steps: int, batches: list[torch.Tensor]):
        self.pm, self.lr, self.steps, self.batches = pm, lr, steps, batches
        self.params = [p for p in pm.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
        self.step = 0

    def advance(self, n: int) -> tuple[float, float]:
        """Train ``n`` steps; returns (seconds, last loss in nats)."""
        import rd_text

        self.pm.train()
        loss = torch.tensor(float("nan"))
        t0 = time.perf_counter()
        for _ in range(n):
            # what rd_text.train_loop's LambdaLR sets before this step
            mult = lr_schedule(self.step, self.steps, max(1, self.steps // 20), decay=True)
            for g in self.opt.param_groups:
                g["lr"] = self.lr * mult
            loss = rd_text.lm_loss(self.pm, self.batches[self.step])
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
            self.step += 1
        secs = time.perf_counter() - t0
        self.pm.eval()
        return secs, float(loss.item())

    def fork(self) -> "TextRun":
        twin = TextRun(copy.deepcopy(self.pm), self.lr, self.steps, self.batches)
        twin.opt.load_state_dict(self.opt.state_dict())
        twin.step = self.step
        return twin


def text_settings(a: argparse.Namespace):
    """rd_text's default settings with this run's seed, ranks, steps and threads (the base-model
    cache key depends on seed and threads only among these)."""
    import rd_text

    st = rd_text.quick_settings(a.seed) if a.quick else rd_text.Settings(seed=a.seed)
    if a.ranks:
        st.ranks = tuple(sorted(set(a.ranks)))
    st.bits = rate_settings(a)
    if a.steps:
        st.steps = a.steps
    st.threads = a.threads
    return st


def evaluate_text_file(base, path: Path, test: torch.Tensor, digest: str) -> dict:
    import rd_text

    with deltacodec.apply(base, path, backend="torch"):
        ev = rd_text.evaluate(base, test)
    if weights_digest(base) != digest:
        raise RuntimeError(f"{path}: the base weights changed after apply(...).remove()")
    return ev


def run_text_cell(base, method: str, rank: int, train: np.ndarray, test: torch.Tensor, st, a: argparse.Namespace,
                  out: Path, digest: str) -> list[dict]:
    """PTQ and QAT arms of one (method, rank) on testbed 2 (the protocol of :func:`run_cell`)."""
    import rd_text
    from peft import get_peft_model

    from deltacodec.sinelora import get_sinelora_model

    omega = st.omegas[0] if method == "SineLoRA" else None
    lr = st.lrs[0]
    torch.manual_seed(st.seed * 1000 + rank)  # as rd_text.train_adapter: same initial A per rank
    model = copy.deepcopy(base)
    cfg = rd_text.adapter_config(method, rank, omega, st)
    pm = get_peft_model(model, cfg) if method == "LoRA" else get_sinelora_model(model, cfg)
    rng = np.random.default_rng([st.seed, 505])  # rd_text.train_adapter's window stream
    L = st.model.context + 1
    batches = [rd_text.random_windows(train, rng, st.batch, L) for _ in range(st.steps)]
    run = TextRun(pm, lr, st.steps, batches)
    switch = st.steps - a.qat_steps
    t_pre, _ = run.advance(switch)
    snap = run.fork()
    t_plain, loss_plain = run.advance(a.qat_steps)
    adir = out / "adapters" / f"{method}-r{rank}"
    run.pm.save_pretrained(adir)
    fp = rd_text.evaluate(run.pm, test)
    sld = out / "sld"
    sld.mkdir(parents=True, exist_ok=True)
    common = {"method": method, "rank": rank, "omega": omega, "lr": lr, "steps": st.steps, "qat_steps": a.qat_steps,
              "unquantized_bits_per_byte": fp["bits_per_byte"], "unquantized_accuracy": fp["accuracy"],
              "adapter_bytes": os.path.getsize(adir / "adapter_model.safetensors"),
              "pre_seconds": t_pre, "plain_phase_seconds": t_plain}
    def ptq_row(b: float, p: Path) -> dict:
        ev = evaluate_text_file(base, p, test, digest)
        return {"bits_per_byte": ev["bits_per_byte"], "accuracy": ev["accuracy"], "quality": -ev["bits_per_byte"],
                "final_loss": loss_plain, "phase_seconds": t_plain, "model_bits_per_byte": fp["bits_per_byte"]}

    def qat_row(qpm, p: Path) -> dict:
        model_ev = rd_text.evaluate(qpm, test)  # the QAT forward itself, after export
        ev = evaluate_text_file(base, p, test, digest)
        return {"bits_per_byte": ev["bits_per_byte"], "accuracy": ev["accuracy"], "quality": -ev["bits_per_byte"],
                "model_bits_per_byte": model_ev["bits_per_byte"]}

    rows = [{**common, **r} for r in both_arms(snap, adir, sld / f"{method}-r{rank}", st.bits, a, ptq_row, qat_row)]
    log(f"{method} r={rank}: fp32 {fp['bits_per_byte']:.4f} bpb; " + ", ".join(
        f"{r['arm']} {r['setting']} {r['bits_per_byte']:.4f} ({r['bytes']} B)" for r in rows)
        + f"; step s plain {t_plain / a.qat_steps:.3f}, QAT "
        + "/".join(f"{r['phase_seconds'] / a.qat_steps:.3f}" for r in rows if r["arm"] == "QAT"))
    return rows


def run_text(a: argparse.Namespace, out: Path) -> dict:
    import rd_text

    st = text_settings(a)
    rdlib.start_run(st.threads, st.seed)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    streams = rd_text.build_corpus(st.corpus)
    base_path, base_info = rd_text.load_or_pretrain_base(st, a.cache_dir, streams)
    base = rd_text.load_base(base_path)
    test = rd_text.windows(streams["test"], st.n_test, st.model.context + 1)
    digest = weights_digest(base)
    records: list[dict] = []
    summary = {"testbed": "rd_text",
               "settings": {"seed": st.seed, "quick": st.quick, "steps": st.steps, "batch": st.batch, "ranks": list(st.ranks),
                            "bits": list(st.bits), "qat_steps": a.qat_steps, "refresh_every": a.refresh_every,
                            "bits_per_param": bool(a.bits_per_param), "quantizer": a.quantizer if a.bits_per_param else "kmeans",
                            "threads": st.threads, "omega": st.omegas[0], "lr": st.lrs[0], "n_test": st.n_test},
               "base": {**base_info, "path": str(base_path)}}
    for rank in st.ranks:
        for m in METHODS:
            records += run_text_cell(base, m, rank, streams["train"], test, st, a, out, digest)
            summary["measurements"] = records
            (out / "measurements.json").write_text(json.dumps(summary, indent=1, default=float))
    return finish(records, summary, out, t_start, "quality",
                  lambda bd: print_tables(records, bd, st, a, BITS_PER_BYTE, "testbed 2 (rd_text), "))


def rate_settings(a: argparse.Namespace) -> tuple:
    """The run's rate settings: ``--bits-per-param`` targets, else ``--bits`` (default 1 2 3)."""
    if a.bits_per_param:
        bad = [b for b in a.bits_per_param if not 0 < b < float("inf")]
        if bad:
            raise SystemExit(f"rd_qat.py: error: --bits-per-param must be positive and finite, got {bad[0]}")
        return tuple(sorted(set(a.bits_per_param)))
    return tuple(sorted(set(a.bits))) if a.bits else (1, 2, 3)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--testbed", choices=("cipher", "text"), default="cipher",
                   help="cipher: rd_experiment.py's testbed 1 (default); text: rd_text.py's testbed 2 "
                   "(ranks 4 8 16, 200 steps, held-out bits/byte)")
    p.add_argument("--out", type=Path)
    p.add_argument("--quick", action="store_true", help="testbed 1: rd_experiment's quick task, ranks 2 8, 100 steps; "
                   "text: rd_text's quick model and corpus, ranks 2 4 8, 80 steps")
    p.add_argument("--ranks", type=int, nargs="+", help="default 1 2 4 8 16 (text: 4 8 16)")
    rate = p.add_mutually_exclusive_group()
    rate.add_argument("--bits", type=int, nargs="+", help="fixed bits, k-means (default 1 2 3)")
    rate.add_argument("--bits-per-param", type=float, nargs="+", metavar="B",
                      help="rate-controlled arms instead: PTQ = encode(bits_per_param=B, quantizer=Q), QAT = "
                      "enable_qat(bits_per_param=B, quantizer=Q); a target the codec cannot reach for an adapter "
                      "is a missing point")
    p.add_argument("--quantizer", choices=("ecsq", "auto"), default="ecsq",
                   help="the rate-controlled quantizer of --bits-per-param (ecsq)")
    p.add_argument("--steps", type=int, help="total training steps of every arm (default 500, quick 100; text 200, quick 80)")
    p.add_argument("--qat-fraction", type=float, default=0.25, help="share of the steps trained with QAT (0.25)")
    p.add_argument("--refresh-every", type=int, default=1, help="codebook refit period in steps (1)")
    p.add_argument("--decay-last", action="store_true",
                   help="both arms: the learning rate falls linearly to 0 over the last (QAT) phase instead of staying constant")
    p.add_argument("--overhead", action="store_true",
                   help="only measure QAT/plain step time (alternating blocks of 5 steps) -> OUT/overhead.json")
    p.add_argument("--overhead-periods", type=int, nargs="+", default=[1, 10], help="refit periods timed (1 10)")
    p.add_argument("--overhead-blocks", type=int, default=8, help="blocks of 5 steps per arm (8)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache-dir", type=Path, default=REPO / "benchmarks" / "out" / "cache")
    p.add_argument("--summarize", type=Path, nargs="+", metavar="OUT")
    p.add_argument("--envelope", type=Path, nargs="+", metavar="OUT",
                   help="do not run: BD of every arm's best-file curve (all ranks and settings of the given runs "
                   "pooled per seed, fixed-bits and --bits-per-param runs together) against PTQ with k-means")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.summarize:
        summarize(a.summarize)
        return 0
    if a.envelope:
        envelope(a.envelope)
        return 0
    if a.testbed == "text":
        if a.overhead or a.decay_last:
            print("rd_qat.py: error: --overhead and --decay-last are testbed-1 options", file=sys.stderr)
            return 2
        steps = a.steps or (80 if a.quick else 200)
        a.qat_steps = max(1, int(round(steps * a.qat_fraction)))
        a.cache_dir.mkdir(parents=True, exist_ok=True)
        run_text(a, a.out or REPO / "benchmarks" / "out" / "rd_qat" / f"text-seed{a.seed}{'-bpp' if a.bits_per_param else ''}{'-quick' if a.quick else ''}")
        return 0
    st = quick_settings(a.seed) if a.quick else Settings(seed=a.seed)
    st.bits = rate_settings(a)
    if a.ranks:
        st.ranks = tuple(sorted(set(a.ranks)))
    if a.steps:
        st.steps = a.steps
    st.threads = a.threads
    a.qat_steps = max(1, int(round(st.steps * a.qat_fraction)))
    a.cache_dir.mkdir(parents=True, exist_ok=True)
    out = a.out or REPO / "benchmarks" / "out" / "rd_qat" / f"seed{st.seed}{'-bpp' if a.bits_per_param else ''}{'-quick' if st.quick else ''}"
    run(st, a, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
