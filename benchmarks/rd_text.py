"""RD testbed 2: a tiny byte-level language model adapted from Python code to English prose.

Everything comes from this machine, nothing is downloaded:

1. **Corpus.** The Python standard library's own ``.py`` files (``sysconfig.get_paths()["stdlib"]``,
   test packages, ``site-packages`` and ``idlelib`` left out). Each file is parsed with ``ast``; its
   docstrings (module, class, function) are taken out as *prose*, and the rest is written back with
   ``ast.unparse`` as *code* (comments are dropped by the parser, docstrings removed). Files are
   split by a hash of their path into train / validation / test, so no held-out docstring comes
   from a file the adapter trained on. Documents end with a NUL byte.
2. **Base model.** A tiny ``LlamaForCausalLM`` over bytes (vocabulary 256), pretrained from scratch on
   the *code* of the training files (random windows, AdamW, warmup then linear decay). Cached on
   disk, keyed by every setting that shapes it (and the Python version, which fixes the corpus).
3. **Downstream domain.** The docstrings: English prose with reST markup, which the base has never
   seen as such (string literals remain in the code, so it is a shift, not a new alphabet).
4. **Adapters.** Plain LoRA (``peft.LoraConfig``) and sine-LoRA (``deltacodec.sinelora``, γ = √in)
   on ``q_proj, k_proj, v_proj, up_proj, down_proj`` at each rank, same steps, batches and initial
   factors; per rank each method picks its learning rate (sine-LoRA also ω) by validation loss.
5. **Codec.** Each adapter is encoded by every *arm* (``rdlib.Arm``: today's k-means at 1–16 bits,
   and ``ecsq`` / ``auto`` at bits/param targets when the installed encoder has them) and applied to
   the bare base with ``deltacodec.apply``; quality is the held-out next-byte loss on the test
   docstrings (bits per byte; the RD quality column is its negative, so higher is better) and the
   next-byte accuracy.
6. **Analysis.** BD (akima) of sine-LoRA vs LoRA per bit width (curves over ranks) and per rank
   (curves over bit widths) under k-means, and of each arm vs k-means per (method, rank) (curves
   over rate settings); ``sld bd`` run once on the written CSV.

Usage::

    python benchmarks/rd_text.py --seed 0          # full grid -> benchmarks/out/rd_text/seed0/
    python benchmarks/rd_text.py --quick --out /tmp/rdt-quick
    python benchmarks/rd_text.py --summarize benchmarks/out/rd_text/seed0 benchmarks/out/rd_text/seed1

Stdout: the result tables; stderr: progress.
"""

from __future__ import annotations

import argparse
import ast
import copy
import csv
import dataclasses
import hashlib
import json
import os
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rdlib  # noqa: E402
from rdlib import REPO, Arm, RDPoint  # noqa: E402

from deltacodec.analysis import plot_rd  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
METHODS = ("LoRA", "SineLoRA")
ANCHOR = "LoRA"
UNQUANTIZED = "fp32"
EOD = 0  # end-of-document byte (NUL never occurs in the corpus text)
log = rdlib.make_logger("rd_text")


# ==================================================================================================
# Settings
# ==================================================================================================


@dataclass(frozen=True)
class CorpusSpec:
    """Which stdlib files feed the corpus and how much of it is used (bytes of UTF-8)."""

    code_bytes: int = 4_000_000  # pretraining text (code of the training files), at most
    file_stride: int = 1  # use every n-th file (in path order): --quick reads fewer files
    test_permille: int = 100  # share of files whose docstrings are the test set
    val_permille: int = 50


@dataclass(frozen=True)
class ModelSpec:
    """Shape of the tiny byte-level Llama."""

    hidden: int = 96
    intermediate: int = 256
    layers: int = 3
    heads: int = 4
    context: int = 128


@dataclass(frozen=True)
class PretrainSpec:
    """Full-parameter pretraining on code (AdamW, warmup then linear decay, clipping at 1)."""

    steps: int = 500
    batch: int = 32
    lr: float = 3e-3


@dataclass
class Settings:
    """Everything one run depends on (written to ``measurements.json``)."""

    seed: int = 0
    quick: bool = False
    corpus: CorpusSpec = field(default_factory=CorpusSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    pretrain: PretrainSpec = field(default_factory=PretrainSpec)
    ranks: tuple = (4, 8, 16)  # 15k to 61k adapter parameters: not header-dominated
    bits: tuple = (1, 2, 3, 4, 5, 6, 8, 16)
    bits_per_param: tuple = rdlib.DEFAULT_BITS_PER_PARAM
    quantizers: tuple = ("kmeans",)
    omegas: tuple = (100.0,)  # sine-LoRA ω candidates
    lrs: tuple = (3e-3,)  # learning-rate candidates, the same for both methods
    steps: int = 200  # adapter training steps, same for every method and rank
    batch: int = 16
    alpha_per_rank: float = 2.0  # lora_alpha = 2·r: scale 2 at every rank
    n_val: int = 48  # held-out windows of `context` bytes
    n_test: int = 128
    threads: int = 2


def quick_settings(seed: int) -> Settings:
    """``--quick``: a smaller model and corpus, ranks 2, 4, 8, bits 2, 3, 4, 16, few steps (< 1 min)."""
    return Settings(
        seed=seed,
        quick=True,
        corpus=CorpusSpec(code_bytes=300_000, file_stride=4),
        model=ModelSpec(hidden=64, intermediate=128, layers=2, heads=4, context=64),
        pretrain=PretrainSpec(steps=200, batch=16, lr=3e-3),
        ranks=(2, 4, 8),  # three points per curve: the fewest akima accepts
        bits=(2, 3, 4, 16),
        bits_per_param=(1.5, 3.0, 6.0),
        omegas=(100.0,),
        steps=80,
        batch=16,
        n_val=16,
        n_test=32,
    )


# ==================================================================================================
# Corpus: stdlib code and docstrings
# ==================================================================================================

_SKIP_PARTS = {"test", "tests", "site-packages", "idlelib", "__pycache__", "turtledemo"}


def stdlib_files() -> tuple[Path, list[str]]:
    """The stdlib root and its ``.py`` files (relative POSIX paths, sorted) outside test packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if not any(part in _SKIP_PARTS or part.startswith("test") for part in rel.parts[:-1]) \
                and not rel.name.startswith("test_"):
            files.append(rel.as_posix())
    return root, sorted(files)


def split_of(rel: str, spec: CorpusSpec) -> str:
    """``"test"``, ``"val"`` or ``"train"`` from a hash of the file's relative path (seed-free:
    the corpus split is part of the testbed, not of a run)."""
    bucket = int.from_bytes(hashlib.sha256(rel.encode()).digest()[:4], "big") % 1000
    if bucket < spec.test_permille:
        return "test"
    if bucket < spec.test_permille + spec.val_permille:
        return "val"
    return "train"


def code_and_docstrings(source: str) -> tuple[str, list[str]]:
    """(code with docstrings removed and comments dropped, the docstrings) of one module's
    source. Docstrings are ``ast.get_docstring(clean=True)`` of the module, classes and functions;
    a body left empty gets ``pass``."""
    tree = ast.parse(source)
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc is not None:
                if doc.strip():
                    docs.append(doc)
                node.body = node.body[1:] or [ast.Pass()]
    return ast.unparse(tree), docs


def build_corpus(spec: CorpusSpec) -> dict[str, np.ndarray]:
    """Byte streams (uint8 arrays, documents ended by NUL): ``code`` (training files' code, at most
    ``spec.code_bytes``) and ``train`` / ``val`` / ``test`` (docstrings of each split's files).
    Files are visited in path order; unparsable or non-UTF-8 files are skipped."""
    root, files = stdlib_files()
    parts: dict[str, list[bytes]] = {"code": [], "train": [], "val": [], "test": []}
    code_len = 0
    for rel in files[:: spec.file_stride]:
        try:
            code, docs = code_and_docstrings((root / rel).read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        split = split_of(rel, spec)
        for d in docs:
            parts[split].append(d.encode("utf-8") + bytes([EOD]))
        if split == "train" and code_len < spec.code_bytes:
            b = code.encode("utf-8") + bytes([EOD])
            parts["code"].append(b)
            code_len += len(b)
    streams = {k: np.frombuffer(b"".join(v), dtype=np.uint8) for k, v in parts.items()}
    streams["code"] = streams["code"][: spec.code_bytes]
    return streams


def corpus_digest(streams: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(streams):
        h.update(k.encode())
        h.update(streams[k].tobytes())
    return h.hexdigest()[:16]


def windows(stream: np.ndarray, n: int, length: int) -> torch.Tensor:
    """The first ``n`` non-overlapping windows of ``length`` bytes, int64 ``(n, length)`` (fewer
    when the stream is short)."""
    n = min(n, len(stream) // length)
    return torch.from_numpy(stream[: n * length].astype(np.int64).reshape(n, length))


def random_windows(stream: np.ndarray, rng: np.random.Generator, n: int, length: int) -> torch.Tensor:
    """``n`` windows of ``length`` bytes at uniform random offsets, int64 ``(n, length)``."""
    starts = rng.integers(0, len(stream) - length, n)
    idx = starts[:, None] + np.arange(length)[None, :]
    return torch.from_numpy(stream[idx].astype(np.int64))


# ==================================================================================================
# Model, loss
# ==================================================================================================


def build_config(ms: ModelSpec):
    """A tiny byte-level ``LlamaConfig``; its q/k/v/up/down projections are the adapters' targets."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=256,
        hidden_size=ms.hidden,
        intermediate_size=ms.intermediate,
        num_hidden_layers=ms.layers,
        num_attention_heads=ms.heads,
        num_key_value_heads=ms.heads,
        max_position_embeddings=ms.context + 1,
        tie_word_embeddings=False,
    )


def lm_loss(model, seqs: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy (nats) over every position of ``seqs`` ``(n, L+1)``."""
    logits = model(input_ids=seqs[:, :-1]).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), seqs[:, 1:].reshape(-1))


@torch.no_grad()
def evaluate(model, seqs: torch.Tensor, batch: int = 64) -> dict:
    """Held-out next-byte loss (``loss_nats``, ``bits_per_byte``) and accuracy (``accuracy``, %)
    over every predicted position of ``seqs`` ``(n, L+1)``."""
    was_training = model.training
    model.eval()
    nll = 0.0
    correct = total = 0
    for i in range(0, len(seqs), batch):
        s = seqs[i : i + batch]
        logits = model(input_ids=s[:, :-1]).logits.float()
        tgt = s[:, 1:]
        nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="sum"))
        correct += int((logits.argmax(-1) == tgt).sum())
        total += tgt.numel()
    model.train(was_training)
    loss = nll / total
    return {"loss_nats": loss, "bits_per_byte": loss / np.log(2), "accuracy": 100.0 * correct / total}


def train_loop(model, batches, steps: int, lr: float, decay: bool = True, clip: float | None = None) -> float:
    """AdamW (no weight decay) on the trainable parameters for ``steps`` steps over ``batches``
    (``(n, L+1)`` windows): 5% warmup, then linear decay to 0 or constant. Returns the mean loss
    (nats) of the last 10% of steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: rdlib.lr_schedule(s, steps, max(1, steps // 20), decay))
    model.train()
    tail = []
    for step in range(steps):
        loss = lm_loss(model, next(batches))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        sched.step()
        if step >= steps - max(1, steps // 10):
            tail.append(loss.item())
    model.eval()
    return float(np.mean(tail)) if tail else float("nan")


# ==================================================================================================
# Base model: pretrain once on code, cache on disk
# ==================================================================================================


def base_cache_key(st: Settings, digest: str) -> str:
    """Hash of everything that determines the pretrained weights (the corpus by its digest)."""
    import transformers

    blob = json.dumps({
        "corpus": digest, "model": dataclasses.asdict(st.model), "pretrain": dataclasses.asdict(st.pretrain),
        "seed": st.seed, "threads": st.threads, "torch": torch.__version__,
        "transformers": transformers.__version__,
        "format": 1,  # bump when the training loop changes
    }, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_or_pretrain_base(st: Settings, cache_dir: Path, streams: dict) -> tuple[Path, dict]:
    """Path of the cached base model (pretrained now if absent) and its info dict."""
    from transformers import LlamaForCausalLM

    path = cache_dir / f"text-base-{base_cache_key(st, corpus_digest(streams))}"
    info_file = path / "rd_text_base_info.json"
    if info_file.is_file():
        info = json.loads(info_file.read_text())
        log(f"base model: cached at {path}")
        return path, {**info, "cached": True}
    log(f"base model: pretraining {st.pretrain.steps} steps on {len(streams['code']):,} bytes of code "
        f"(cache miss: {path})")
    torch.manual_seed(st.seed)
    model = LlamaForCausalLM(build_config(st.model))
    rng = np.random.default_rng([st.seed, 303])
    L = st.model.context + 1

    def batches():
        while True:
            yield random_windows(streams["code"], rng, st.pretrain.batch, L)

    t0 = time.perf_counter()
    train_loop(model, batches(), st.pretrain.steps, st.pretrain.lr, decay=True, clip=1.0)
    seconds = time.perf_counter() - t0
    code_eval = random_windows(streams["code"], np.random.default_rng([st.seed, 404]), 32, L)
    info = {"seconds": seconds, "params": sum(p.numel() for p in model.parameters()), "key": path.name,
            "code_train_sample": evaluate(model, code_eval)}

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        (tmp / "rd_text_base_info.json").write_text(json.dumps(info, indent=2))

    rdlib.cache_atomically(path, write)
    log(f"base model: pretrained in {seconds:.1f} s; code loss {info['code_train_sample']['bits_per_byte']:.3f} bpb")
    return path, {**info, "cached": False}


def load_base(path: Path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path).eval()


# ==================================================================================================
# Adapters
# ==================================================================================================


def adapter_config(method: str, rank: int, omega: float | None, st: Settings):
    """PEFT config: plain ``LoraConfig`` or sine-LoRA (γ = √in_features); ``lora_alpha = 2r``."""
    kw = dict(r=rank, lora_alpha=st.alpha_per_rank * rank, lora_dropout=0.0, target_modules=TARGETS)
    if method == "LoRA":
        from peft import LoraConfig

        return LoraConfig(**kw)
    from deltacodec.sinelora import sinelora_config

    return sinelora_config(omega=omega, **kw)


def train_adapter(base, method: str, rank: int, omega: float | None, lr: float, train: np.ndarray,
                  st: Settings):
    """Train one adapter on a copy of ``base`` (``st.steps`` steps of ``st.batch`` random windows
    of the training docstrings). Every adapter of a rank starts from the same A (B = 0) and sees
    the same windows in the same order. Returns (PEFT model, seconds, final loss in nats)."""
    from peft import get_peft_model

    from deltacodec.sinelora import get_sinelora_model

    torch.manual_seed(st.seed * 1000 + rank)
    model = copy.deepcopy(base)
    cfg = adapter_config(method, rank, omega, st)
    pm = get_peft_model(model, cfg) if method == "LoRA" else get_sinelora_model(model, cfg)
    rng = np.random.default_rng([st.seed, 505])
    L = st.model.context + 1

    def batches():
        while True:
            yield random_windows(train, rng, st.batch, L)

    t0 = time.perf_counter()
    loss = train_loop(pm, batches(), st.steps, lr, decay=True, clip=1.0)
    return pm, time.perf_counter() - t0, loss


@dataclass
class TrainedAdapter:
    """One adapter of the grid after the choice of its hyperparameters on the validation split."""

    method: str
    rank: int
    omega: float | None
    lr: float
    params: int  # trainable parameters (A and B of every module)
    train_seconds: float
    search_seconds: float
    val_bits_per_byte: float
    test: dict  # evaluate() of the unquantized adapter (the PEFT model itself)
    final_loss: float
    adapter_dir: str
    adapter_bytes: int  # adapter_model.safetensors (float32 factors)
    search: list = field(default_factory=list)


def candidates(method: str, st: Settings) -> list[tuple[float | None, float]]:
    if method == "LoRA":
        return [(None, lr) for lr in st.lrs]
    return [(om, lr) for om in st.omegas for lr in st.lrs]


def train_grid_cell(base, method: str, rank: int, data: dict, st: Settings, out: Path) -> TrainedAdapter:
    """Train every candidate of this (method, rank), keep the lowest validation loss, save it under
    ``out/adapters/<method>-r<rank>/`` and evaluate it on the test windows."""
    best = None
    search = []
    t_all = time.perf_counter()
    for om, lr in candidates(method, st):
        pm, secs, loss = train_adapter(base, method, rank, om, lr, data["train_stream"], st)
        val = evaluate(pm, data["val"])["bits_per_byte"]
        search.append({"omega": om, "lr": lr, "val_bits_per_byte": val, "seconds": secs, "final_loss": loss})
        tag = f"ω={om:<4g}" if om is not None else " " * 6
        log(f"  {method:8s} r={rank:<2d} {tag} lr={lr:g}: {secs:5.1f} s, train loss {loss:.3f}, val {val:.4f} bpb")
        if best is None or val < best[1]:
            best = (pm, val, om, lr, loss, secs)
    pm, val, om, lr, loss, secs = best
    adir = out / "adapters" / f"{method}-r{rank}"
    pm.save_pretrained(adir)
    params = sum(p.numel() for n, p in pm.named_parameters() if "lora_" in n)
    return TrainedAdapter(
        method=method, rank=rank, omega=om, lr=lr, params=params, train_seconds=secs,
        search_seconds=time.perf_counter() - t_all, val_bits_per_byte=val, test=evaluate(pm, data["test"]),
        final_loss=loss, adapter_dir=str(adir), adapter_bytes=os.path.getsize(adir / "adapter_model.safetensors"),
        search=search)


# ==================================================================================================
# Codec: every arm at every rate setting, evaluated through deltacodec.apply
# ==================================================================================================


def measure_codec(base, grid: list[TrainedAdapter], test: torch.Tensor, arms: list[Arm], st: Settings,
                  out: Path) -> tuple[list[dict], list[dict]]:
    """One row per (adapter, arm, rate setting) (``rdlib.measure_arms``: file bytes, held-out loss
    and accuracy of the base patched with ``deltacodec.apply``, encode seconds, ΔW diagnostic),
    plus the adapter's parameter count, the file's bits/param and the unquantized loss. Returns
    (rows, skipped rate targets)."""
    by_key = {(ta.method, ta.rank): ta for ta in grid}
    rows, skipped = rdlib.measure_arms(
        base, [(ta.method, ta.rank, ta.adapter_dir) for ta in grid], arms,
        lambda arm: arm.settings(st.bits, st.bits_per_param), lambda m: evaluate(m, test), out / "sld", log)
    for r in rows:
        ta = by_key[(r["method"], r["rank"])]
        r.update(params=ta.params, file_bits_per_param=8 * r["bytes"] / ta.params,
                 unquantized_bits_per_byte=ta.test["bits_per_byte"], adapter_bytes=ta.adapter_bytes,
                 omega=ta.omega, lr=ta.lr)
    for ta in grid:
        log(f"{ta.method} r={ta.rank}: " + ", ".join(
            f"{r['arm']}:{r['setting']:g} {r['bits_per_byte']:.3f}" for r in rows
            if r["method"] == ta.method and r["rank"] == ta.rank))
    return rows, skipped


# ==================================================================================================
# RD points and BD tables
# ==================================================================================================

QUALITY = "-bits_per_byte"  # RD quality: negative held-out loss, higher is better


def quality_of(r: dict, metric: str) -> float:
    return -r["bits_per_byte"] if metric == "loss" else r["accuracy"]


def method_points(records: list[dict], grid: list[TrainedAdapter], by: str, metric: str,
                  arm: str = "kmeans") -> list[RDPoint]:
    """Sine-vs-LoRA points of one arm. ``by="bits"``: group = rate setting, curve over ranks,
    plus group ``fp32`` (unquantized adapters); ``by="ranks"``: group = rank, curve over settings."""
    pts = []
    for r in records:
        if r["arm"] != arm:
            continue
        group = f"{r['setting']:g}" if by == "bits" else str(r["rank"])
        pts.append(RDPoint(r["method"], group, float(r["bytes"]), quality_of(r, metric)))
    if by == "bits":
        for ta in grid:
            q = -ta.test["bits_per_byte"] if metric == "loss" else ta.test["accuracy"]
            pts.append(RDPoint(ta.method, UNQUANTIZED, float(ta.adapter_bytes), q))
    return pts


def arm_points(records: list[dict], metric: str) -> list[RDPoint]:
    """Arm-vs-k-means points: method = arm, group = ``<method>-r<rank>``, curve over settings."""
    return rdlib.arm_rd_points(records, "bits_per_byte", -1.0) if metric == "loss" \
        else rdlib.arm_rd_points(records, "accuracy")


def envelope_points(records: list[dict], metric: str) -> list[RDPoint]:
    """Arm-vs-k-means per method over every file of the arm, all ranks and settings on one curve:
    the best file at each size a user can make by choosing rank and setting (method = arm,
    group = LoRA/SineLoRA)."""
    return [RDPoint(r["arm"], r["method"], float(r["bytes"]), quality_of(r, metric)) for r in records]


def analyse(records: list[dict], grid: list[TrainedAdapter], arms: list[Arm], st: Settings, out: Path) -> dict:
    """Write the RD CSVs (all points and frontier), BD tables and plots; run ``sld bd`` on the
    per-bit-width k-means frontier CSV. Returns {table name: {"rows", "notes", "dropped"}}."""
    analysis: dict = {}
    tables = []
    for arm in arms:
        for by in ("bits", "ranks"):
            for metric in ("loss", "acc"):
                tables.append((f"{arm.name}_{by}_{metric}", method_points(records, grid, by, metric, arm.name),
                               ANCHOR, by))
    if len(arms) > 1:
        for metric in ("loss", "acc"):
            tables.append((f"arms_{metric}", arm_points(records, metric), rdlib.KMEANS.name, "adapter"))
            tables.append((f"envelope_{metric}", envelope_points(records, metric), rdlib.KMEANS.name, "lora_method"))
    for name, pts, anchor, kind in tables:
        rdlib.write_points_csv(pts, out / f"rd_{name}.csv")
        kept, dropped = rdlib.monotone_frontier(pts)
        rdlib.write_points_csv(kept, out / f"rd_{name}_frontier.csv")
        rows, notes = rdlib.bd_rows(kept, anchor)
        unit = "bd_minus_bits_per_byte" if name.endswith("loss") else "bd_accuracy_points"
        rdlib.write_bd_csv(rows, out / f"bd_{name}.csv", kind, unit)
        analysis[name] = {"rows": rows, "notes": notes, "dropped": [p._asdict() for p in dropped],
                          "anchor": anchor}
        if name in ("kmeans_bits_loss", "arms_loss"):
            plot_rd(pts, out / f"rd_{name}.png", rows=rows, rate_label=".sld bytes",
                    quality_label="− held-out bits/byte", title=f"rd_text seed {st.seed}: {name}", dpi=80)
    analysis["sld_bd_cli"] = rdlib.run_sld_bd_cli(out / "rd_kmeans_bits_loss_frontier.csv",
                                                  out / "sld_bd_cli.json", ANCHOR)
    return analysis


# ==================================================================================================
# Reporting
# ==================================================================================================


def print_results(grid: list[TrainedAdapter], records: list[dict], arms: list[Arm], st: Settings) -> None:
    for arm in arms:
        sets = arm.settings(st.bits, st.bits_per_param)
        unit = "b" if arm.rate_kind == "bits" else "bpp"
        print(f"\nArm {arm.name}: held-out bits/byte (lower is better) | file bytes, per rate setting")
        head = f"{'method':8s} {'rank':>4s} {'params':>7s} {'fp32':>7s} " + " ".join(f"{f'{s:g}{unit}':>15s}" for s in sets)
        print(head)
        print("-" * len(head))
        for ta in grid:
            rs = {r["setting"]: r for r in records if r["method"] == ta.method and r["rank"] == ta.rank
                  and r["arm"] == arm.name}
            print(f"{ta.method:8s} {ta.rank:>4d} {ta.params:>7d} {ta.test['bits_per_byte']:>7.4f} " + " ".join(
                f"{rs[s]['bits_per_byte']:>7.4f}|{rs[s]['bytes']:>7d}" if s in rs else f"{'(no file)':>15s}"
                for s in sets))


def print_bd(name: str, a: dict) -> None:
    unit = "−bpb" if name.endswith("loss") else "acc pts"
    print(f"\nBD {name} (anchor {a['anchor']}, akima; BD-rate % bytes at equal quality, negative = smaller; "
          f"BD-quality in {unit}, positive = better)")
    for r in a["rows"]:
        flag = " *" if r["warnings"] else ""
        print(f"  {r['group']:>12s} {r['method']:>9s}: {r['bd_rate']:>+8.2f} % {r['bd_quality']:>+9.4f} "
              f"({r['n_test']}/{r['n_anchor']} pts){flag}")
    if not a["rows"]:
        print("  (no group has usable curves on both sides)")
    for n in a["notes"]:
        print(f"  note: {n}")


# ==================================================================================================
# Main run
# ==================================================================================================


def reused_grid(out: Path, st: Settings) -> tuple[list[TrainedAdapter], float]:
    """The adapters of an earlier run into ``out`` (its ``measurements.json``), for ``--reuse``:
    the codec arms are measured again without retraining. The earlier run's training settings
    must equal this run's, or the adapters would not be the ones these settings describe."""
    path = out / "measurements.json"
    if not path.is_file():
        raise rdlib.ReuseError(f"--reuse: {path} does not exist (run without --reuse first)")
    prev = json.loads(path.read_text())
    keys = ("seed", "quick", "corpus", "model", "pretrain", "ranks", "omegas", "lrs", "steps", "batch",
            "alpha_per_rank", "n_val", "n_test", "threads")
    rdlib.check_same_settings(rdlib.settings_dict(st), prev["settings"], path, keys)
    grid = [TrainedAdapter(**a) for a in prev["adapters"]]
    log(f"reusing {len(grid)} adapters from {out}")
    return grid, prev["timing"]["grid_train_seconds"]


def run(st: Settings, out: Path, cache_dir: Path, reuse: bool = False) -> dict:
    """The whole pipeline for one seed; writes every output file into ``out``; returns the summary.
    ``reuse``: take the trained adapters from an earlier run in ``out`` (see :func:`reused_grid`)."""
    rdlib.start_run(st.threads, st.seed)
    out.mkdir(parents=True, exist_ok=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    reused = reused_grid(out, st) if reuse else None  # fails before any work
    arms = rdlib.supported_arms(st.quantizers, log)

    streams = build_corpus(st.corpus)
    log("corpus: " + ", ".join(f"{k} {len(v):,} B" for k, v in streams.items()))
    base_path, base_info = load_or_pretrain_base(st, cache_dir, streams)
    base = load_base(base_path)
    L = st.model.context + 1
    data = {"train_stream": streams["train"], "val": windows(streams["val"], st.n_val, L),
            "test": windows(streams["test"], st.n_test, L)}
    base_info["prose_test_before"] = evaluate(base, data["test"])
    log(f"base: {base_info['params']:,} params; test docstrings before adaptation "
        f"{base_info['prose_test_before']['bits_per_byte']:.3f} bpb, {base_info['prose_test_before']['accuracy']:.1f}%")

    t0 = time.perf_counter()
    if reused is not None:
        grid, grid_seconds = reused
    else:
        grid = []
        for rank in st.ranks:
            for method in METHODS:
                ta = train_grid_cell(base, method, rank, data, st, out)
                grid.append(ta)
                log(f"{method} r={rank} ({ta.params:,} params): kept ω={ta.omega} lr={ta.lr:g}; "
                    f"test {ta.test['bits_per_byte']:.4f} bpb, {ta.test['accuracy']:.2f}%")
        grid_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    records, skipped = measure_codec(base, grid, data["test"], arms, st, out)
    codec_seconds = time.perf_counter() - t1
    analysis = analyse(records, grid, arms, st, out)

    summary = {
        "testbed": "rd_text",
        "settings": rdlib.settings_dict(st),
        "python": sys.version.split()[0],
        "corpus": {k: len(v) for k, v in streams.items()} | {"digest": corpus_digest(streams)},
        "arms": [dataclasses.asdict(a) for a in arms],
        "base": {**base_info, "path": str(base_path)},
        "timing": {"grid_train_seconds": grid_seconds, "codec_eval_seconds": codec_seconds,
                   "total_seconds": time.perf_counter() - t_start, "pretrain_seconds": base_info["seconds"],
                   "pretrain_cached": base_info["cached"]},
        "adapters": [dataclasses.asdict(ta) for ta in grid],
        "measurements": records,
        "skipped": skipped,
        "bd": analysis,
    }
    (out / "measurements.json").write_text(json.dumps(summary, indent=1, default=float))
    with open(out / "points.csv", "w", newline="") as fh:
        cols = ["method", "rank", "arm", "rate_kind", "setting", "bytes", "params", "file_bits_per_param",
                "loss_nats", "bits_per_byte", "accuracy", "dw_rel_error", "encode_seconds"]
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(records)

    print(f"\nrd_text seed {st.seed}{' (quick)' if st.quick else ''}: base {base_info['params']:,} params, "
          f"test docstrings {base_info['prose_test_before']['bits_per_byte']:.4f} bpb before adaptation; "
          f"{st.steps} adapter steps; arms {', '.join(a.name for a in arms)}")
    print_results(grid, records, arms, st)
    for name, a in analysis.items():
        if name != "sld_bd_cli":
            print_bd(name, a)
    print(f"\ntiming: pretraining {base_info['seconds']:.1f} s{' (cached)' if base_info['cached'] else ''}, "
          f"grid {grid_seconds:.1f} s, encode+eval {codec_seconds:.1f} s, total "
          f"{summary['timing']['total_seconds']:.1f} s; {st.threads} threads")
    print(f"outputs in {out}")
    return summary


def summarize(dirs: list[Path], tables: list[str] | None = None) -> None:
    """BD tables of several runs side by side, with mean and spread (max − min)."""
    runs = [json.loads((d / "measurements.json").read_text()) for d in dirs]
    seeds = [r["settings"]["seed"] for r in runs]
    names = tables or [n for n in runs[0]["bd"] if n != "sld_bd_cli"]
    for name in names:
        print(f"\nBD {name} across seeds {seeds} (akima): BD-rate % | BD-quality")
        keys: list = []
        for r in runs:
            for row in r["bd"].get(name, {}).get("rows", []):
                if (row["group"], row["method"]) not in keys:
                    keys.append((row["group"], row["method"]))
        for g, m in keys:
            vals = []
            for r in runs:
                row = next((x for x in r["bd"].get(name, {}).get("rows", [])
                            if x["group"] == g and x["method"] == m), None)
                vals.append(None if row is None else (row["bd_rate"], row["bd_quality"], bool(row["warnings"])))
            cells = [f"{v[0]:+8.2f} {v[1]:+8.4f}{'*' if v[2] else ' '}" if v else f"{'n/a':>19s}" for v in vals]
            ok = [v for v in vals if v]
            if ok:
                br, bq = np.array([v[0] for v in ok]), np.array([v[1] for v in ok])
                cells += [f"mean {br.mean():+8.2f} {bq.mean():+8.4f}", f"spread {np.ptp(br):7.2f} {np.ptp(bq):7.4f}"]
            print(f"  {g:>12s} {m:>9s} " + " ".join(cells))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Outputs in --out: points.csv (every .sld: method, rank, arm, setting, bytes, params, loss, acc), "
        "rd_<table>.csv / rd_<table>_frontier.csv (sld bd format), bd_<table>.csv, rd_*.png, "
        "measurements.json, sld_bd_cli.json, adapters/, sld/.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="output directory (default benchmarks/out/rd_text/seed<SEED>[-quick])")
    p.add_argument("--quick", action="store_true", help="small model and corpus, ranks 2 4 8, bits 2 3 4 16 (< 1 min)")
    p.add_argument("--ranks", type=int, nargs="+", help="adapter ranks (default 4 8 16)")
    p.add_argument("--bits", type=int, nargs="+", help="k-means bit widths (default 1 2 3 4 5 6 8 16)")
    p.add_argument("--bits-per-param", type=float, nargs="+", help="targets of the rate-controlled arms "
                   "(default 1 1.5 2 3 4 6)")
    p.add_argument("--quantizers", default="kmeans",
                   help="comma-separated arms: kmeans (always run, the anchor), uniform, kmeans_v2, ecsq, auto; "
                   "arms the installed encoder lacks are skipped with a note")
    p.add_argument("--steps", type=int, help="adapter training steps (default 200)")
    p.add_argument("--omegas", type=float, nargs="+", help="sine-LoRA ω candidates (default 100)")
    p.add_argument("--lrs", type=float, nargs="+", help="learning-rate candidates, both methods (default 0.003)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reuse", action="store_true",
                   help="do not train: reuse the adapters of an earlier run in --out (same settings) and "
                   "measure the codec arms again (e.g. after a new encoder landed)")
    p.add_argument("--cache-dir", type=Path, default=REPO / "benchmarks" / "out" / "cache")
    p.add_argument("--summarize", type=Path, nargs="+", metavar="OUT",
                   help="do not run: print the BD tables of these output directories with mean and spread")
    p.add_argument("--tables", nargs="+", help="with --summarize: only these BD tables (e.g. kmeans_bits_loss)")
    return p.parse_args(argv)


def settings_from_args(a: argparse.Namespace) -> Settings:
    st = quick_settings(a.seed) if a.quick else Settings(seed=a.seed)
    if a.ranks:
        st.ranks = tuple(sorted(set(a.ranks)))
    if a.bits:
        st.bits = tuple(sorted(set(a.bits)))
    if a.bits_per_param:
        st.bits_per_param = tuple(sorted(set(a.bits_per_param)))
    st.quantizers = tuple(q.strip() for q in a.quantizers.split(",") if q.strip())
    for q in st.quantizers:
        rdlib.arm_named(q)  # an unknown name is a usage error before any work
    if a.steps:
        st.steps = a.steps
    if a.omegas:
        st.omegas = tuple(a.omegas)
    if a.lrs:
        st.lrs = tuple(a.lrs)
    st.threads = a.threads
    return st


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.summarize:
        summarize(a.summarize, a.tables)
        return 0
    try:
        st = settings_from_args(a)
    except ValueError as exc:
        print(f"rd_text.py: error: {exc}", file=sys.stderr)
        return 2
    out = a.out or REPO / "benchmarks" / "out" / "rd_text" / f"seed{st.seed}{'-quick' if st.quick else ''}"
    try:
        run(st, out, a.cache_dir, reuse=a.reuse)
    except rdlib.ReuseError as exc:
        print(f"rd_text.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
