"""Machinery shared by the two rate–quality testbeds (``rd_experiment.py``, ``rd_text.py``).

What lives here is independent of the task: the learning-rate schedule, the base-weight digest
that proves ``deltacodec.apply(...).remove()`` restored the model, the ΔW diagnostic of an
``.sld`` file, the encoder *arms* (one quantizer and its rate settings: k-means at fixed bit
widths, or a rate-controlled quantizer at bits/param targets when the installed encoder has one),
and the RD bookkeeping: monotone frontier, CSVs in ``sld bd`` format, BD tables
(``deltacodec.analysis.bd_table``, akima by default) and a call of the ``sld bd`` CLI.

Imports torch lazily: only :func:`weights_digest` needs it.
"""

from __future__ import annotations

import csv
import hashlib
import inspect
import json
import math
import os
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # run from a checkout without installing

import deltacodec  # noqa: E402
from deltacodec.analysis import RDPoint, bd_table  # noqa: E402

INTERP = "akima"


def make_logger(tag: str):
    """A ``log(msg)`` writing ``[tag HH:MM:SS] msg`` to stderr (stdout is kept for result tables)."""

    def log(msg: str) -> None:
        print(f"[{tag} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    return log


def start_run(threads: int, seed: int) -> None:
    """What every training run sets first: quiet transformers logs, torch threads and seed."""
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # PEFT calls a transformers method that transformers 5 marks deprecated: noise, not ours.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    torch.set_num_threads(threads)
    torch.manual_seed(seed)


def settings_dict(st) -> dict:
    """A run's ``Settings`` dataclass as JSON values (nested specs as maps, tuples as lists): what
    ``measurements.json`` records and what ``--reuse`` compares."""
    import dataclasses

    return json.loads(json.dumps({k: (dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v)
                                  for k, v in vars(st).items()}))


class ReuseError(Exception):
    """``--reuse`` cannot take the adapters of an earlier run (missing, or other settings)."""


def check_same_settings(now: dict, before: dict, where: Path, keys: Sequence[str] | None = None) -> None:
    """:class:`ReuseError` naming the settings (``keys``, default all of both) in which ``before``
    (an earlier run's record at ``where``) differs from ``now``."""
    keys = sorted(set(now) | set(before)) if keys is None else keys
    diff = [k for k in keys if now.get(k) != before.get(k)]
    if diff:
        raise ReuseError(f"--reuse: {where} was trained with other settings ({', '.join(diff)})")


def lr_schedule(step: int, steps: int, warmup: int, decay: bool = True) -> float:
    """Multiplier of the base learning rate: linear warmup, then linear decay to 0 (or constant)."""
    if step < warmup:
        return (step + 1) / warmup
    if not decay:
        return 1.0
    return max(0.0, (steps - step) / max(1, steps - warmup))


def weights_digest(model) -> str:
    """SHA-256 of every parameter's bytes: proves ``AppliedAdapter.remove`` restored the base."""
    import torch

    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def delta_stats(adapter_dir: str, sld_path: Path) -> dict:
    """Weight-space view of one ``.sld`` file against its source adapter, averaged over modules:
    ``dw_rel_error`` = ||ΔW_q − ΔW||_F / ||ΔW||_F and ``dw_stable_rank`` = stable rank of the
    ΔW_q the file applies (sin(ω·Q(B)Q(A)) for sine-LoRA, Q(B)Q(A) for LoRA). Diagnostic only."""
    from deltacodec.analysis import module_stats

    src = {m.name: m for m in deltacodec.read_adapter(adapter_dir).modules}
    f = deltacodec.load(sld_path)
    errs, srs = [], []
    for e in f.modules:
        m = src[e.name]
        A_q, B_q = f.dequantize(e.name)
        st = module_stats(m.A, m.B, omega=m.omega, gamma=m.gamma, scale=m.scale, sine=m.sine, A_q=A_q, B_q=B_q)
        errs.append(st["rel_error"])
        srs.append(st["sr_sine_q"] if m.sine else st["sr_lowrank_q"])
    return {"dw_rel_error": float(np.mean(errs)), "dw_stable_rank": float(np.mean(srs))}


# ==================================================================================================
# Encoder arms
# ==================================================================================================

#: Rate settings of a rate-controlled arm (bits per parameter, header included as the encoder
#: defines it), used when the installed encoder accepts ``bits_per_param``.
DEFAULT_BITS_PER_PARAM = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


@dataclass(frozen=True)
class Arm:
    """One encoder configuration of the comparison.

    ``quantizer`` is passed to ``deltacodec.encode``; ``rate_kind`` says whether the arm's rate
    settings are fixed bit widths (``"bits"``, today's meaning) or bits-per-parameter targets
    (``"bpp"``, the rate-controlled v2 encoder). ``"kmeans"`` with bits is today's default
    encoder, the anchor of every per-option BD table."""

    name: str
    quantizer: str
    rate_kind: str  # "bits" | "bpp"
    container: int | None = None  # passed to encode when set (the v2 encoder's container version)

    def settings(self, bits: Sequence[int], bpps: Sequence[float]) -> tuple:
        return tuple(bits) if self.rate_kind == "bits" else tuple(bpps)


KMEANS = Arm("kmeans", "kmeans", "bits")


ARM_NAMES = ("kmeans", "uniform", "kmeans_v2", "ecsq", "auto")


def arm_named(name: str) -> Arm:
    """``kmeans`` and ``uniform`` are fixed-bit-width arms (today's encoder); ``kmeans_v2`` is
    k-means at fixed bits in container version 2 (rANS-coded indices, lighter header: the
    container's gain without the new quantizer); ``ecsq`` and ``auto`` are rate-controlled
    (``bits_per_param``, refit on)."""
    if name in ("kmeans", "uniform"):
        return Arm(name, name, "bits")
    if name == "kmeans_v2":
        return Arm(name, "kmeans", "bits", container=2)
    if name in ("ecsq", "auto"):
        return Arm(name, name, "bpp")
    raise ValueError(f"unknown quantizer arm {name!r}: expected one of {', '.join(ARM_NAMES)}")


def encoder_supports(arm: Arm) -> tuple[bool, str]:
    """Whether the installed ``deltacodec.encode`` can run ``arm``, and why not. Probed at run
    time, so the same script runs before and after the v2 encoder lands."""
    params = inspect.signature(deltacodec.encode).parameters
    if arm.rate_kind == "bpp" and "bits_per_param" not in params:
        return False, "deltacodec.encode has no bits_per_param (the rate-controlled v2 encoder is not installed)"
    if arm.container is not None and "container" not in params:
        return False, "deltacodec.encode has no container option (container version 2 is not installed)"
    try:
        from deltacodec.quantize import QUANTIZERS
    except ImportError:  # pragma: no cover - a layout change of the library
        QUANTIZERS = ()
    known = set(QUANTIZERS) | {"ecsq", "auto"} if "bits_per_param" in params else set(QUANTIZERS)
    if arm.quantizer not in known:
        return False, f"quantizer {arm.quantizer!r} is not one of {sorted(known)}"
    return True, ""


def supported_arms(names: Sequence[str], log) -> list[Arm]:
    """The arms of ``names`` this encoder supports, k-means first (the anchor); each skipped arm
    gets a printed note (stdout) and a log line."""
    arms = [KMEANS]
    for n in names:
        arm = arm_named(n)
        if arm in arms:
            continue
        ok, why = encoder_supports(arm)
        if ok:
            arms.append(arm)
        else:
            print(f"note: arm {n!r} skipped: {why}")
            log(f"arm {n!r} skipped: {why}")
    return arms


def encode_arm(adapter_dir: str | os.PathLike, arm: Arm, setting, out: Path) -> float:
    """Encode ``adapter_dir`` into ``out`` with ``arm`` at one rate ``setting`` (bits or
    bits/param). Returns the encode seconds. Today's k-means arm calls ``encode(src, bits=b,
    out=...)`` exactly as the first testbed always has."""
    t0 = time.perf_counter()
    if arm == KMEANS:
        deltacodec.encode(adapter_dir, bits=int(setting), out=out)
    elif arm.rate_kind == "bits":
        extra = {} if arm.container is None else {"container": arm.container}
        deltacodec.encode(adapter_dir, bits=int(setting), out=out, quantizer=arm.quantizer, **extra)
    else:
        deltacodec.encode(adapter_dir, out=out, quantizer=arm.quantizer, bits_per_param=float(setting),
                          refit=True)
    return time.perf_counter() - t0


def setting_tag(arm: Arm, setting) -> str:
    """File-name tag of one rate setting: ``b3`` (bits) or ``p1.5`` (bits/param)."""
    return f"b{int(setting)}" if arm.rate_kind == "bits" else f"p{float(setting):g}"


# ==================================================================================================
# RD points, BD tables
# ==================================================================================================


def monotone_frontier(points: list[RDPoint]) -> tuple[list[RDPoint], list[RDPoint]]:
    """Per (method, group) curve, sorted by rate, keep a point only if its quality is strictly
    above that of every cheaper point: the operational RD curve (nobody ships a larger file for
    no better quality). BD integrals need such strictly increasing curves. Returns (kept, dropped)."""
    kept, dropped = [], []
    curves: dict = {}
    for p in points:
        curves.setdefault((p.method, p.group), []).append(p)
    for pts in curves.values():
        best = -math.inf
        for p in sorted(pts, key=lambda p: p.rate):
            (kept if p.quality > best else dropped).append(p)
            best = max(best, p.quality)
    order = {p: i for i, p in enumerate(points)}
    return sorted(kept, key=order.get), sorted(dropped, key=order.get)


def write_points_csv(points: list[RDPoint], path: Path) -> None:
    """CSV in the ``sld bd`` input format: columns method, group, rate (bytes), quality."""
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "group", "rate", "quality"])
        for p in points:
            w.writerow([p.method, p.group, int(p.rate), f"{p.quality:.4f}"])


def bd_rows(points: list[RDPoint], anchor: str, interp: str = INTERP) -> tuple[list[dict], list[str]]:
    """``bd_table`` of every method vs ``anchor``; curves it cannot use (too few points, ...) are
    left out. Returns (rows, messages about what was left out or flagged)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = bd_table(points, anchor=anchor, method=interp, errors="warn")
    return rows, [str(w.message) for w in caught]


def write_bd_csv(rows: list[dict], path: Path, kind: str, quality_unit: str = "bd_accuracy_points") -> None:
    """The BD rows as CSV; ``kind`` names the group column, ``quality_unit`` the BD-quality one."""
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([kind, "method", "anchor", "interpolation", "bd_rate_percent", quality_unit,
                    "n_test", "n_anchor", "warnings"])
        for r in rows:
            w.writerow([r["group"], r["method"], r["anchor"], r["interpolation"], f"{r['bd_rate']:.3f}",
                        f"{r['bd_quality']:.3f}", r["n_test"], r["n_anchor"], " | ".join(r["warnings"])])


def run_sld_bd_cli(csv_path: Path, out_json: Path, anchor: str) -> dict:
    """``python -m deltacodec.cli bd CSV --json --skip-bad``: the CLI reads our CSV as its input."""
    proc = subprocess.run(
        [sys.executable, "-m", "deltacodec.cli", "bd", str(csv_path), "--anchor", anchor, "--json", "--skip-bad"],
        capture_output=True, text=True, cwd=REPO, check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"sld bd failed on {csv_path} (exit {proc.returncode}): {proc.stderr.strip()}")
    out_json.write_text(proc.stdout)
    return json.loads(proc.stdout)


def cache_atomically(path: Path, write) -> bool:
    """Create the cache directory ``path`` by ``write(tmp_dir)`` then a rename; when a concurrent
    run finished first its copy is kept. Returns True when this call's copy was installed."""
    import shutil

    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    write(tmp)
    if path.exists():
        shutil.rmtree(tmp)
        return False
    os.replace(tmp, path)
    return True


def measure_arms(base, adapters: Sequence[tuple[str, int, str]], arms: Sequence[Arm], settings_of,
                 evaluate, sld_dir: Path, log) -> tuple[list[dict], list[dict]]:
    """Encode every adapter with every arm at each of its rate settings, apply each file to the
    bare ``base`` with ``deltacodec.apply`` and measure it with ``evaluate(base) -> dict``.

    ``adapters``: ``(method, rank, adapter_dir)``; ``settings_of(arm)``: the arm's rate settings.
    The patch is removed after each file and the base weights' digest is checked. Returns (rows,
    skipped): one row per file ``{"method", "rank", "arm", "rate_kind", "setting", "bytes",
    "encode_seconds", **evaluate(base), "dw_rel_error", "dw_stable_rank"}``; a rate-controlled
    arm's target the encoder refuses (below the adapter's fixed cost) gives no file and is listed
    in ``skipped`` with the encoder's message."""
    from deltacodec.errors import SldError

    digest = weights_digest(base)
    sld_dir.mkdir(parents=True, exist_ok=True)
    rows, skipped = [], []
    for method, rank, adir in adapters:
        for arm in arms:
            for s in settings_of(arm):
                path = sld_dir / f"{method}-r{rank}-{arm.name}-{setting_tag(arm, s)}.sld"
                if path.exists():
                    path.unlink()  # a rerun into the same directory re-encodes
                try:
                    enc = encode_arm(adir, arm, s, path)
                except SldError as exc:
                    if arm.rate_kind != "bpp":
                        raise
                    skipped.append({"method": method, "rank": rank, "arm": arm.name, "setting": s,
                                    "reason": str(exc)})
                    log(f"{method} r={rank} {arm.name} {s:g}: no file: {exc}")
                    continue
                with deltacodec.apply(base, path, backend="torch"):
                    quality = evaluate(base)
                if weights_digest(base) != digest:
                    raise RuntimeError(f"{path}: the base weights changed after apply(...).remove()")
                rows.append({"method": method, "rank": rank, "arm": arm.name, "rate_kind": arm.rate_kind,
                             "setting": s, "bytes": os.path.getsize(path), "encode_seconds": enc, **quality,
                             **delta_stats(adir, path)})
    return rows, skipped


def arm_rd_points(rows: Sequence[dict], quality_key: str, sign: float = 1.0) -> list[RDPoint]:
    """Arm-vs-arm RD points: method = arm, group = ``<method>-r<rank>``, curve over the arm's
    rate settings; quality = ``sign * row[quality_key]`` (sign −1 turns a loss into a quality)."""
    return [RDPoint(r["arm"], f"{r['method']}-r{r['rank']}", float(r["bytes"]), sign * r[quality_key])
            for r in rows]
