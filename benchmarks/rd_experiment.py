"""Rate–quality (RD) experiment: plain LoRA vs sine-LoRA, quantized with the real ``.sld`` codec.

The whole pipeline runs on a CPU in minutes, with nothing downloaded:

1. **Base model.** A tiny Llama (``transformers.LlamaForCausalLM`` built from a config) is
   pretrained on sequences generated here: ``[BOS, TASK, x1..xK, SEP, y1..yK]`` with symbols
   ``x`` in ``0..N-1`` and ``y`` the copy of ``x`` or ``table_c[x]`` for one of
   ``C`` substitution ciphers (random permutations of the N symbols), with label smoothing 0.1
   (see ``PretrainSpec``). It is cached on disk, keyed by every setting that shapes it, so
   reruns skip pretraining.
2. **Downstream task.** Every cipher ``c`` gets a *new* table, a random permutation that differs
   from the pretrained one at every symbol (the base model scores ~0 on it). Learning it means
   storing ``C·N`` new symbol→symbol entries: a lookup table with no structure to exploit, so
   the adapter's capacity, i.e. its rank, is the limit (plain LoRA goes from ~1% at rank 1 to
   ~95% at rank 16; see ``benchmarks/README.md``).
3. **Adapters.** Plain LoRA (``peft.LoraConfig``) and sine-LoRA (``deltacodec.sinelora``) at each
   rank on ``q_proj, k_proj, v_proj, up_proj, down_proj``, same steps, batches, data order and
   initial factors. Per rank, both methods pick their learning rate from the same candidates and
   sine-LoRA also its ω, by accuracy on a validation split; accuracy is reported on a disjoint
   test split.
4. **Codec.** Each adapter is saved with ``save_pretrained`` and encoded with
   ``deltacodec.encode`` at every bit width; rate = the ``.sld`` file size in bytes; quality =
   test accuracy of the bare base model patched with ``deltacodec.apply`` (removed again after).
5. **Analysis.** BD-rate / BD-accuracy of sine-LoRA against LoRA (anchor) with
   ``deltacodec.analysis.bd_table`` (akima): per bit width (a curve's points are the ranks) and
   per rank (a curve's points are the bit widths); RD plots with ``plot_rd``; ``sld bd`` run once
   on the written CSV.

Quality is **per-token accuracy in percent** on the answer positions ``y1..yK`` (teacher forcing:
``y_j`` depends only on ``x_j``, so this equals greedy decoding accuracy).

Usage::

    python benchmarks/rd_experiment.py --seed 0          # full grid -> benchmarks/out/rd/seed0/
    python benchmarks/rd_experiment.py --quick --out /tmp/rd-quick
    python benchmarks/rd_experiment.py --summarize benchmarks/out/rd/seed0 benchmarks/out/rd/seed1

Stdout: the results tables; stderr: progress.
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

sys.path.insert(0, str(Path(__file__).resolve().parent))
import deltacodec  # noqa: E402
import rdlib  # noqa: E402  (shared with rd_text.py)
from deltacodec.analysis import RDPoint, plot_rd  # noqa: E402
from rdlib import delta_stats, lr_schedule, monotone_frontier, weights_digest, write_bd_csv, write_points_csv  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
METHODS = ("LoRA", "SineLoRA")
ANCHOR = "LoRA"
INTERP = "akima"
UNQUANTIZED = "fp32"  # group name of the unquantized adapters in the per-bit-width CSV


# ==================================================================================================
# Settings
# ==================================================================================================


@dataclass(frozen=True)
class TaskSpec:
    """The synthetic language. Token ids: symbols ``0..N-1``, then BOS, SEP, COPY and one task
    token per cipher. A sequence is ``[BOS, TASK, x1..xK, SEP, y1..yK]`` (length 2K+3)."""

    n_symbols: int = 256
    n_ciphers: int = 8
    seq_symbols: int = 8

    @property
    def bos(self) -> int:
        return self.n_symbols

    @property
    def sep(self) -> int:
        return self.n_symbols + 1

    def task_token(self, task: int) -> int:
        """Task 0 = copy, 1 + c = cipher c."""
        return self.n_symbols + 2 + task

    @property
    def n_tasks(self) -> int:
        return 1 + self.n_ciphers

    @property
    def vocab_size(self) -> int:
        return self.n_symbols + 2 + self.n_tasks

    @property
    def seq_len(self) -> int:
        return 2 * self.seq_symbols + 3

    @property
    def answer_slice(self) -> slice:
        """Positions of ``y1..yK`` in a sequence (the targets)."""
        return slice(self.seq_symbols + 3, 2 * self.seq_symbols + 3)


@dataclass(frozen=True)
class ModelSpec:
    """Shape of the tiny Llama base model."""

    hidden: int = 64
    intermediate: int = 256
    layers: int = 2
    heads: int = 4


@dataclass(frozen=True)
class PretrainSpec:
    """Full-parameter pretraining of the base model (AdamW, warmup then linear decay, clipping).

    Label smoothing keeps the base from becoming arbitrarily confident in the pretrained tables:
    in pilot runs without it, the downstream loss had a long plateau from which LoRA at most
    ranks did not escape within the step budget (accuracy at chance, not ordered by rank)."""

    steps: int = 2500
    batch: int = 128
    lr: float = 3e-3
    label_smoothing: float = 0.1


@dataclass
class Settings:
    """Everything one run depends on (written to ``measurements.json``)."""

    seed: int = 0
    quick: bool = False
    task: TaskSpec = field(default_factory=TaskSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    pretrain: PretrainSpec = field(default_factory=PretrainSpec)
    ranks: tuple = (1, 2, 4, 8, 16)
    bits: tuple = (1, 2, 3, 4, 5, 8, 16)
    omegas: tuple = (10.0, 30.0, 100.0, 300.0)  # sine-LoRA ω candidates
    steps: int = 500  # adapter training steps, same for every method and rank
    batch: int = 64
    lrs: tuple = (1e-3, 3e-3)  # learning-rate candidates, the same for both methods
    alpha_per_rank: float = 2.0  # lora_alpha = 2·r, i.e. scale = alpha / r = 2 at every rank
    n_val: int = 1000
    n_test: int = 2000
    threads: int = 2


def quick_settings(seed: int) -> Settings:
    """``--quick``: ranks 2 and 8, bits 2, 3, 16, a smaller task and far fewer steps (~1 min)."""
    return Settings(
        seed=seed,
        quick=True,
        task=TaskSpec(n_symbols=64, n_ciphers=2, seq_symbols=8),
        pretrain=PretrainSpec(steps=300, batch=64, lr=3e-3),
        ranks=(2, 8),
        bits=(2, 3, 16),
        omegas=(30.0, 100.0),
        lrs=(3e-3,),
        steps=100,
        n_val=200,
        n_test=400,
    )


# ==================================================================================================
# Data
# ==================================================================================================


log = rdlib.make_logger("rd")  # progress on stderr (stdout is kept for the result tables)


def make_tables(spec: TaskSpec, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The cipher tables: ``(pretrain, downstream)``, each int64 ``(C, N)``; row c is a permutation
    of ``0..N-1``. Each downstream row differs from the pretrained row at *every* symbol, so the
    base model's answers are all wrong on the downstream task before adaptation."""
    rng = np.random.default_rng([seed, 101])
    pre = np.stack([rng.permutation(spec.n_symbols) for _ in range(spec.n_ciphers)])
    new = np.empty_like(pre)
    for c in range(spec.n_ciphers):
        while True:  # a random permutation has no agreement with pre[c] with probability ~1/e
            cand = rng.permutation(spec.n_symbols)
            if np.all(cand != pre[c]):
                new[c] = cand
                break
    return pre, new


def build_sequences(spec: TaskSpec, tasks: np.ndarray, x: np.ndarray, tables: np.ndarray) -> torch.Tensor:
    """Token sequences, int64 ``(n, 2K+3)``, from task ids ``(n,)`` (0 copy, 1+c cipher c),
    symbols ``x`` ``(n, K)`` and the cipher tables ``(C, N)``."""
    n, k = x.shape
    y = x.copy()  # the copy task
    ciph = tasks >= 1
    if ciph.any():  # row i of the (m, N) gathered tables maps the i-th cipher row's symbols
        y[ciph] = np.take_along_axis(tables[tasks[ciph] - 1], x[ciph], axis=1)
    seq = np.empty((n, spec.seq_len), dtype=np.int64)
    seq[:, 0] = spec.bos
    seq[:, 1] = spec.task_token(tasks)
    seq[:, 2 : 2 + k] = x
    seq[:, 2 + k] = spec.sep
    seq[:, 3 + k :] = y
    return torch.from_numpy(seq)


def sample_pretrain_batch(spec: TaskSpec, rng: np.random.Generator, n: int, tables: np.ndarray) -> torch.Tensor:
    """A pretraining batch ``(n, 2K+3)``: tasks uniform over copy and the C ciphers."""
    tasks = rng.integers(0, spec.n_tasks, n)
    x = rng.integers(0, spec.n_symbols, (n, spec.seq_symbols))
    return build_sequences(spec, tasks, x, tables)


def downstream_splits(spec: TaskSpec, seed: int, n_train: int, n_val: int, n_test: int,
                      tables: np.ndarray) -> dict[str, torch.Tensor]:
    """Disjoint train / val / test sets of downstream (new-cipher) sequences, each ``(n, 2K+3)``.

    Sequences are drawn uniformly (cipher uniform over C, symbols uniform) and deduplicated, so no
    test or validation sequence occurs in training. Every symbol of every table does occur in
    training (the task *is* to learn the table); held-out accuracy measures how well the adapter
    holds it for inputs it has not seen.
    """
    rng = np.random.default_rng([seed, 202])
    need = n_train + n_val + n_test
    seen: set[bytes] = set()
    rows_t, rows_x = [], []
    while len(rows_t) < need:
        tasks = 1 + rng.integers(0, spec.n_ciphers, need)
        x = rng.integers(0, spec.n_symbols, (need, spec.seq_symbols))
        for t, row in zip(tasks, x):
            key = bytes([t % 256]) + row.astype(np.int32).tobytes()
            if key not in seen:
                seen.add(key)
                rows_t.append(t)
                rows_x.append(row)
    seqs = build_sequences(spec, np.array(rows_t[:need]), np.stack(rows_x[:need]), tables)
    return {
        "test": seqs[:n_test],
        "val": seqs[n_test : n_test + n_val],
        "train": seqs[n_test + n_val :],
    }


# ==================================================================================================
# Model, loss, accuracy
# ==================================================================================================


def build_config(spec: TaskSpec, ms: ModelSpec):
    """A tiny ``LlamaConfig``: its q/k/v/up/down projections are the adapters' targets."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=ms.hidden,
        intermediate_size=ms.intermediate,
        num_hidden_layers=ms.layers,
        num_attention_heads=ms.heads,
        num_key_value_heads=ms.heads,
        max_position_embeddings=spec.seq_len,
        tie_word_embeddings=False,
    )


def answer_logits(model: torch.nn.Module, seqs: torch.Tensor, spec: TaskSpec) -> torch.Tensor:
    """Logits ``(n, K, vocab)`` predicting ``y1..yK`` (position p predicts token p+1)."""
    a = spec.answer_slice
    logits = model(input_ids=seqs).logits
    return logits[:, a.start - 1 : a.stop - 1]


def answer_loss(model: torch.nn.Module, seqs: torch.Tensor, spec: TaskSpec,
                label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy (nats) over the answer tokens of a batch ``(n, 2K+3)``."""
    logits = answer_logits(model, seqs, spec)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), seqs[:, spec.answer_slice].reshape(-1),
                           label_smoothing=label_smoothing)


@torch.no_grad()
def accuracy(model: torch.nn.Module, seqs: torch.Tensor, spec: TaskSpec, batch: int = 500) -> float:
    """Per-token accuracy (percent) on the answer positions of ``seqs`` ``(n, 2K+3)``."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for i in range(0, len(seqs), batch):
        s = seqs[i : i + batch]
        pred = answer_logits(model, s, spec).argmax(-1)
        correct += int((pred == s[:, spec.answer_slice]).sum())
        total += pred.numel()
    model.train(was_training)
    return 100.0 * correct / total


def train_loop(model: torch.nn.Module, batches, steps: int, lr: float, spec: TaskSpec,
               label_smoothing: float = 0.0, decay: bool = True, clip: float | None = None) -> float:
    """AdamW (no weight decay) on the trainable parameters for ``steps`` steps over the iterator
    ``batches`` of ``(n, 2K+3)`` sequences: warmup over 5% of the steps, then linear decay to 0
    (``decay``) or a constant rate; gradient norm clipped at ``clip`` when given. Returns the last
    batch's loss (nats)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_schedule(s, steps, max(1, steps // 20), decay))
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        loss = answer_loss(model, next(batches), spec, label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        sched.step()
    model.eval()
    return loss.item()


# ==================================================================================================
# Base model: pretrain once, cache on disk
# ==================================================================================================


def base_cache_key(st: Settings) -> str:
    """Hash of everything that determines the pretrained weights."""
    import transformers

    blob = json.dumps(
        {
            "task": dataclasses.asdict(st.task),
            "model": dataclasses.asdict(st.model),
            "pretrain": dataclasses.asdict(st.pretrain),
            "seed": st.seed,
            "threads": st.threads,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            # Bump when the data generator or the training loop changes: the key must change
            # whenever the pretrained weights would.
            "format": 2,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def pretrain_base(st: Settings, tables: np.ndarray):
    """Pretrain the base model from scratch on copy / cipher sequences (all weights)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(st.seed)
    model = LlamaForCausalLM(build_config(st.task, st.model))
    rng = np.random.default_rng([st.seed, 303])

    def batches():
        while True:
            yield sample_pretrain_batch(st.task, rng, st.pretrain.batch, tables)

    train_loop(model, batches(), st.pretrain.steps, st.pretrain.lr, st.task, st.pretrain.label_smoothing,
               clip=1.0)
    return model


def load_or_pretrain_base(st: Settings, cache_dir: Path, tables: np.ndarray) -> tuple[Path, dict]:
    """Path of the cached base model (pretrained now if absent) and its info dict
    (pretraining seconds, accuracy per pretraining task, parameter count)."""
    path = cache_dir / f"base-{base_cache_key(st)}"
    info_file = path / "rd_base_info.json"
    if info_file.is_file():
        info = json.loads(info_file.read_text())
        info["cached"] = True
        log(f"base model: cached at {path}")
        return path, info
    log(f"base model: pretraining {st.pretrain.steps} steps (cache miss: {path})")
    t0 = time.perf_counter()
    model = pretrain_base(st, tables)
    seconds = time.perf_counter() - t0
    rng = np.random.default_rng([st.seed, 404])
    per_task = {}
    for task in range(st.task.n_tasks):
        x = rng.integers(0, st.task.n_symbols, (500, st.task.seq_symbols))
        seqs = build_sequences(st.task, np.full(500, task), x, tables)
        name = "copy" if task == 0 else f"cipher{task - 1}"
        per_task[name] = accuracy(model, seqs, st.task)
    info = {
        "seconds": seconds,
        "pretrain_accuracy": per_task,
        "params": sum(p.numel() for p in model.parameters()),
        "key": path.name,
    }
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    (tmp / "rd_base_info.json").write_text(json.dumps(info, indent=2))
    if path.exists():  # a concurrent run finished first: keep its copy
        import shutil

        shutil.rmtree(tmp)
    else:
        os.replace(tmp, path)
    info["cached"] = False
    log(f"base model: pretrained in {seconds:.1f} s; accuracy per task {fmt_dict(per_task)}")
    return path, info


def load_base(path: Path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path).eval()


def fmt_dict(d: dict) -> str:
    return ", ".join(f"{k} {v:.1f}" for k, v in d.items())


# ==================================================================================================
# Adapters
# ==================================================================================================


def adapter_config(method: str, rank: int, omega: float | None, st: Settings):
    """PEFT config of one adapter: plain ``LoraConfig`` or the project's sine-LoRA config.
    ``lora_alpha = 2·r`` for both (scale 2 at every rank); sine-LoRA's γ is √in_features."""
    kw = dict(r=rank, lora_alpha=st.alpha_per_rank * rank, lora_dropout=0.0, target_modules=TARGETS)
    if method == "LoRA":
        from peft import LoraConfig

        return LoraConfig(**kw)
    from deltacodec.sinelora import sinelora_config

    return sinelora_config(omega=omega, **kw)


def train_adapter(base: torch.nn.Module, method: str, rank: int, omega: float | None, lr: float,
                  train: torch.Tensor, st: Settings) -> tuple[torch.nn.Module, float, float]:
    """Train one adapter on a copy of ``base`` for ``st.steps`` steps of ``st.batch`` sequences
    from ``train`` ``(n, 2K+3)``: returns (PEFT model, seconds, last batch loss in nats).

    Every adapter of a rank starts from the same factors (seeded before PEFT draws A; B = 0) and
    sees the same batches in the same order, so LoRA and sine-LoRA differ only in ΔW's form and
    the chosen hyperparameters. Constant learning rate after a short warmup, no clipping: pilot
    runs with a decaying rate or gradient clipping left LoRA on its initial plateau."""
    from peft import get_peft_model

    from deltacodec.sinelora import get_sinelora_model

    torch.manual_seed(st.seed * 1000 + rank)
    model = copy.deepcopy(base)
    cfg = adapter_config(method, rank, omega, st)
    pm = get_peft_model(model, cfg) if method == "LoRA" else get_sinelora_model(model, cfg)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(st.seed))

    def batches():
        i = 0
        while True:
            if i + st.batch > len(order):
                i = 0
            yield train[order[i : i + st.batch]]
            i += st.batch

    t0 = time.perf_counter()
    loss = train_loop(pm, batches(), st.steps, lr, st.task, decay=False)
    return pm, time.perf_counter() - t0, loss


@dataclass
class TrainedAdapter:
    """One adapter of the grid, after the choice of its hyperparameters on the validation split."""

    method: str
    rank: int
    omega: float | None  # sine-LoRA's ω (None for LoRA)
    lr: float
    train_seconds: float  # the kept adapter's training time
    search_seconds: float  # all candidates of this (method, rank): training + validation
    val_accuracy: float  # percent
    test_accuracy: float  # percent, the unquantized adapter (the PEFT model itself)
    final_loss: float
    adapter_dir: str
    adapter_bytes: int  # adapter_model.safetensors (float32 factors)
    search: list = field(default_factory=list)  # [{"omega", "lr", "val_accuracy", "seconds", "final_loss"}]


def candidates(method: str, st: Settings) -> list[tuple[float | None, float]]:
    """(ω, lr) pairs tried for one (method, rank): LoRA every lr, sine-LoRA every ω × every lr."""
    if method == "LoRA":
        return [(None, lr) for lr in st.lrs]
    return [(om, lr) for om in st.omegas for lr in st.lrs]


def train_grid_cell(base, method: str, rank: int, data: dict, st: Settings, out: Path) -> TrainedAdapter:
    """Train one adapter per candidate of this (method, rank), keep the best by validation
    accuracy (ties: lower final training loss), save it with ``save_pretrained`` under
    ``out/adapters/<method>-r<rank>/`` and measure its test accuracy."""
    best = None
    search = []
    t_all = time.perf_counter()
    for om, lr in candidates(method, st):
        pm, secs, loss = train_adapter(base, method, rank, om, lr, data["train"], st)
        val = accuracy(pm, data["val"], st.task)
        search.append({"omega": om, "lr": lr, "val_accuracy": val, "seconds": secs, "final_loss": loss})
        tag = f"ω={om:<4g}" if om is not None else " " * 6
        log(f"  {method:8s} r={rank:<2d} {tag} lr={lr:g}: trained in {secs:5.1f} s, "
            f"loss {loss:.3f}, val acc {val:6.2f}%")
        if best is None or (val, -loss) > (best[1], -best[4]):
            best = (pm, val, om, lr, loss, secs)
    search_seconds = time.perf_counter() - t_all
    pm, val, om, lr, loss, secs = best
    adir = out / "adapters" / f"{method}-r{rank}"
    pm.save_pretrained(adir)
    ta = TrainedAdapter(
        method=method, rank=rank, omega=om, lr=lr, train_seconds=secs, search_seconds=search_seconds,
        val_accuracy=val, test_accuracy=accuracy(pm, data["test"], st.task), final_loss=loss,
        adapter_dir=str(adir), adapter_bytes=os.path.getsize(adir / "adapter_model.safetensors"),
        search=search,
    )
    # the cell's record beside the run, so --reuse can measure the codec again without retraining
    # (a run that fails after the grid keeps its ~15 minutes of training)
    record = out / "grid" / f"{method}-r{rank}.json"
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"settings": training_settings(st), "adapter": dataclasses.asdict(ta)}, indent=1))
    return ta


def training_settings(st: Settings) -> dict:
    """The settings an adapter of the grid depends on (not the codec's: bits, arms)."""
    d = rdlib.settings_dict(st)
    d.pop("bits", None)
    d.pop("ranks", None)
    return d


def reused_grid(st: Settings, out: Path) -> tuple[list["TrainedAdapter"], float]:
    """``--reuse``: the grid of an earlier run into ``out`` (``out/grid/*.json`` and the adapters
    they name), for every (rank, method) of ``st``; refused when a cell is missing or was trained
    with other settings."""
    grid, seconds = [], 0.0
    want = training_settings(st)
    for rank in st.ranks:
        for method in METHODS:
            path = out / "grid" / f"{method}-r{rank}.json"
            if not path.is_file():
                raise rdlib.ReuseError(f"--reuse: {path} does not exist (run without --reuse first)")
            try:
                rec = json.loads(path.read_text())
                settings, ta = rec["settings"], TrainedAdapter(**rec["adapter"])
                if not isinstance(settings, dict):
                    raise TypeError(f"'settings' is a {type(settings).__name__}, not a map")
            except (ValueError, KeyError, TypeError) as exc:
                raise rdlib.ReuseError(f"--reuse: {path} is not a grid record ({type(exc).__name__}: {exc})") from None
            rdlib.check_same_settings(want, settings, path)
            if not (Path(ta.adapter_dir) / "adapter_model.safetensors").is_file():
                raise rdlib.ReuseError(f"--reuse: {ta.adapter_dir} has no adapter_model.safetensors")
            grid.append(ta)
            seconds += ta.search_seconds
    log(f"--reuse: {len(grid)} adapters of {out}, trained in {seconds:.1f} s (not retrained)")
    return grid, seconds


# ==================================================================================================
# Codec: encode at every bit width, evaluate the patched base model
# ==================================================================================================


def encode_and_evaluate(base, ta: TrainedAdapter, test: torch.Tensor, st: Settings, out: Path,
                        digest: str) -> list[dict]:
    """Encode ``ta`` at every bit width with ``deltacodec.encode`` and measure each file's test
    accuracy with ``deltacodec.apply`` on the bare base model (removed again afterwards; the
    weights' digest proves the base is restored). One row per bit width: ``{"bits", "bytes"
    (the .sld file size), "accuracy" (percent), "encode_seconds", "dw_rel_error",
    "dw_stable_rank"}``."""
    rows = []
    sld_dir = out / "sld"
    sld_dir.mkdir(parents=True, exist_ok=True)
    for b in st.bits:
        path = sld_dir / f"{ta.method}-r{ta.rank}-b{b}.sld"
        if path.exists():
            path.unlink()  # a rerun into the same directory (--reuse) re-encodes
        t0 = time.perf_counter()
        deltacodec.encode(ta.adapter_dir, bits=b, out=path)
        enc = time.perf_counter() - t0
        with deltacodec.apply(base, path, backend="torch"):
            acc = accuracy(base, test, st.task)
        if weights_digest(base) != digest:
            raise RuntimeError(f"{path}: the base weights changed after apply(...).remove()")
        rows.append({"bits": b, "bytes": os.path.getsize(path), "accuracy": acc, "encode_seconds": enc,
                     **delta_stats(ta.adapter_dir, path)})
    return rows


# ==================================================================================================
# RD points, BD tables, plots
# ==================================================================================================


def rd_points(records: list[dict], by: str) -> list[RDPoint]:
    """RD points from the measurement rows (one per method, rank, bits).

    ``by="bits"``: group = bit width, a curve's points are the ranks (as in the paper's Table 2),
    plus group ``fp32`` = the unquantized adapters (rate = ``adapter_model.safetensors`` bytes).
    ``by="ranks"``: group = rank, a curve's points are the bit widths."""
    pts = []
    for r in records:
        group = r["bits"] if by == "bits" else r["rank"]  # by == "ranks"
        pts.append(RDPoint(r["method"], str(group), float(r["bytes"]), r["accuracy"]))
    if by == "bits":
        seen = set()
        for r in records:
            if (r["method"], r["rank"]) not in seen:
                seen.add((r["method"], r["rank"]))
                pts.append(RDPoint(r["method"], UNQUANTIZED, float(r["adapter_bytes"]), r["unquantized_accuracy"]))
    return pts


def bd_rows(points: list[RDPoint]) -> tuple[list[dict], list[str]]:
    """``bd_table`` of every method vs the LoRA anchor (akima); curves it cannot use (too few
    points, ...) are left out. Returns (rows, messages about what was left out or flagged)."""
    return rdlib.bd_rows(points, ANCHOR, INTERP)


def run_sld_bd_cli(csv_path: Path, out_json: Path) -> dict:
    """``python -m deltacodec.cli bd CSV --json --skip-bad``: the CLI reads our CSV as its input."""
    return rdlib.run_sld_bd_cli(csv_path, out_json, ANCHOR)


# ==================================================================================================
# Reporting
# ==================================================================================================


def print_results(grid: list[TrainedAdapter], records: list[dict], st: Settings) -> None:
    """Per adapter: ω, training time, unquantized accuracy, and accuracy / bytes per bit width."""
    bits = list(st.bits)
    head = f"{'method':8s} {'rank':>4s} {'omega':>6s} {'lr':>6s} {'train s':>7s} {'fp32 acc':>8s} " + " ".join(
        f"{str(b) + 'b acc':>8s}" for b in bits)
    print("\nHeld-out accuracy (% of answer tokens) of the unquantized adapter and of the .sld files")
    print(head)
    print("-" * len(head))
    for ta in grid:
        accs = {r["bits"]: r for r in records if r["method"] == ta.method and r["rank"] == ta.rank}
        om = f"{ta.omega:g}" if ta.omega is not None else "-"
        print(f"{ta.method:8s} {ta.rank:>4d} {om:>6s} {ta.lr:>6g} {ta.train_seconds:>7.1f} {ta.test_accuracy:>8.2f} "
              + " ".join(f"{accs[b]['accuracy']:>8.2f}" for b in bits))
    print("\n.sld file size (bytes) per bit width; fp32 = adapter_model.safetensors")
    head = f"{'method':8s} {'rank':>4s} {'fp32':>8s} " + " ".join(f"{str(b) + 'b':>8s}" for b in bits)
    print(head)
    print("-" * len(head))
    for ta in grid:
        accs = {r["bits"]: r for r in records if r["method"] == ta.method and r["rank"] == ta.rank}
        print(f"{ta.method:8s} {ta.rank:>4d} {ta.adapter_bytes:>8d} " + " ".join(f"{accs[b]['bytes']:>8d}" for b in bits))


def print_bd(rows: list[dict], notes: list[str], dropped: list[RDPoint], title: str, anchor: str = ANCHOR) -> None:
    print(f"\n{title}  (anchor {anchor}, {INTERP}; BD-rate: % bytes at equal accuracy, negative = smaller;"
          " BD-acc: accuracy points at equal bytes)")
    if rows:
        print(f"{'group':>6s} {'BD-rate %':>10s} {'BD-acc':>8s} {'points':>7s}")
        for r in rows:
            flag = " *" if r["warnings"] else ""
            who = "" if anchor == ANCHOR else f" {r['method']:>9s}"  # arm tables: name the arm
            print(f"{r['group']:>6s}{who} {r['bd_rate']:>+10.2f} {r['bd_quality']:>+8.2f} "
                  f"{str(r['n_test']) + '/' + str(r['n_anchor']):>7s}{flag}")
    else:
        print("(no group has usable curves on both sides)")
    if dropped:
        print("  dropped as not on the monotone frontier: " + ", ".join(
            f"{p.method}@{p.group}:{int(p.rate)}B/{p.quality:.2f}%" for p in dropped))
    for n in notes:
        print(f"  note: {n}")


# ==================================================================================================
# Main run
# ==================================================================================================


def train_grid(base, data: dict, st: Settings, out: Path) -> tuple[list[TrainedAdapter], float]:
    """Every (rank, method) adapter, hyperparameter search included; returns (adapters, seconds)."""
    t0 = time.perf_counter()
    grid: list[TrainedAdapter] = []
    for rank in st.ranks:
        for method in METHODS:
            g = train_grid_cell(base, method, rank, data, st, out)
            grid.append(g)
            log(f"{method} r={rank}: kept ω={g.omega} lr={g.lr:g}; test acc {g.test_accuracy:.2f}%")
    seconds = time.perf_counter() - t0
    log(f"grid trained in {seconds:.1f} s")
    return grid, seconds


def measure_codec(base, grid: list[TrainedAdapter], test: torch.Tensor, st: Settings, out: Path) -> list[dict]:
    """One raw measurement row per (method, rank, bits): the adapter's settings and training
    time, the .sld size, its test accuracy and ΔW statistics, and the unquantized accuracy."""
    digest = weights_digest(base)
    records = []
    for ta in grid:
        rows = encode_and_evaluate(base, ta, test, st, out, digest)
        for row in rows:
            records.append({
                "method": ta.method, "rank": ta.rank, "omega": ta.omega, "lr": ta.lr, **row,
                "unquantized_accuracy": ta.test_accuracy, "adapter_bytes": ta.adapter_bytes,
                "train_seconds": ta.train_seconds, "search_seconds": ta.search_seconds,
                "val_accuracy": ta.val_accuracy,
            })
        log(f"{ta.method} r={ta.rank}: " + ", ".join(f"{r['bits']}b {r['accuracy']:.1f}%" for r in rows))
    return records


def analyse(records: list[dict], st: Settings, out: Path) -> dict:
    """Write the RD CSVs (all points and frontier), BD tables and plots for both groupings, and
    run ``sld bd`` on the per-bit-width frontier CSV. Returns {"bits"|"ranks": {"rows", "notes",
    "dropped"}, "sld_bd_cli": the CLI's JSON}."""
    analysis: dict = {}
    titles = {"bits": "curves over ranks, per bit width", "ranks": "curves over bit widths, per rank"}
    for by in ("bits", "ranks"):
        pts = rd_points(records, by)
        write_points_csv(pts, out / f"rd_{by}.csv")
        kept, dropped = monotone_frontier(pts)
        write_points_csv(kept, out / f"rd_{by}_frontier.csv")
        rows, notes = bd_rows(kept)
        write_bd_csv(rows, out / f"bd_{by}.csv", by)
        plot_rd(pts, out / f"rd_{by}.png", rows=rows, rate_label=".sld bytes", quality_label="test accuracy %",
                title=f"LoRA vs SineLoRA, seed {st.seed}: {titles[by]}", dpi=80)
        analysis[by] = {"rows": rows, "notes": notes, "dropped": [p._asdict() for p in dropped]}
    analysis["sld_bd_cli"] = run_sld_bd_cli(out / "rd_bits_frontier.csv", out / "sld_bd_cli.json")
    return analysis


def measure_and_analyse_arms(base, grid: list[TrainedAdapter], records: list[dict], test: torch.Tensor,
                             arms: list, bpps: tuple, st: Settings, out: Path) -> dict:
    """``--quantizers``: the extra encoder arms (``rdlib.Arm``) on the same adapters, and BD of
    each against today's k-means (the rows of ``records``), per (method, rank), curves over the
    arm's rate settings; plus sine-vs-LoRA per rate setting under each arm. Writes
    ``arms_points.csv``, ``rd_arms[_frontier].csv``, ``bd_arms.csv``, ``bd_<arm>_settings.csv``.
    Nothing here touches the default outputs."""
    rows, skipped = rdlib.measure_arms(
        base, [(ta.method, ta.rank, ta.adapter_dir) for ta in grid], arms,
        lambda arm: arm.settings(st.bits, bpps), lambda m: {"accuracy": accuracy(m, test, st.task)},
        out / "sld", log)
    km = [{"method": r["method"], "rank": r["rank"], "arm": "kmeans", "rate_kind": "bits", "setting": r["bits"],
           "bytes": r["bytes"], "accuracy": r["accuracy"], "dw_rel_error": r["dw_rel_error"]} for r in records]
    all_rows = km + rows
    with open(out / "arms_points.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["method", "rank", "arm", "rate_kind", "setting", "bytes", "accuracy",
                                           "dw_rel_error"], extrasaction="ignore")
        w.writeheader()
        w.writerows(all_rows)
    result: dict = {"skipped": skipped, "measurements": rows}
    tables = [("arms", rdlib.arm_rd_points(all_rows, "accuracy"), "kmeans", "adapter")]
    for arm in arms:
        pts = [RDPoint(r["method"], f"{r['setting']:g}", float(r["bytes"]), r["accuracy"])
               for r in rows if r["arm"] == arm.name]
        tables.append((f"{arm.name}_settings", pts, ANCHOR, "setting"))
    for name, pts, anchor, kind in tables:
        write_points_csv(pts, out / f"rd_{name}.csv")
        kept, dropped = monotone_frontier(pts)
        write_points_csv(kept, out / f"rd_{name}_frontier.csv")
        bd, notes = rdlib.bd_rows(kept, anchor, INTERP)
        write_bd_csv(bd, out / f"bd_{name}.csv", kind)
        result[name] = {"rows": bd, "notes": notes, "dropped": [p._asdict() for p in dropped], "anchor": anchor}
    return result


def write_measurements(summary: dict, out: Path) -> None:
    """``measurements.json`` (everything) and ``measurements.csv`` (one row per .sld file)."""
    (out / "measurements.json").write_text(json.dumps(summary, indent=1, default=float))
    records = summary["measurements"]
    with open(out / "measurements.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(records[0]))
        w.writeheader()
        w.writerows(records)


def run(st: Settings, out: Path, cache_dir: Path, arms: list | None = None,
        bpps: tuple = rdlib.DEFAULT_BITS_PER_PARAM, reuse: bool = False) -> dict:
    """The whole pipeline for one seed; writes every output file into ``out``; returns the summary.
    ``arms``: extra encoder arms (``rdlib.Arm``, k-means excluded) measured on the same adapters
    after the default measurement, rate-controlled ones at ``bpps`` bits/param. ``reuse``: take
    the trained grid of an earlier run into ``out`` (:func:`reused_grid`) instead of training."""
    rdlib.start_run(st.threads, st.seed)
    reused = reused_grid(st, out) if reuse else None  # fails before any work
    out.mkdir(parents=True, exist_ok=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    pre_tables, new_tables = make_tables(st.task, st.seed)
    base_path, base_info = load_or_pretrain_base(st, cache_dir, pre_tables)
    base = load_base(base_path)
    data = downstream_splits(st.task, st.seed, st.steps * st.batch, st.n_val, st.n_test, new_tables)
    base_info["downstream_test_accuracy_before"] = accuracy(base, data["test"], st.task)
    log(f"base: {base_info['params']:,} params; downstream test accuracy before adaptation "
        f"{base_info['downstream_test_accuracy_before']:.2f}%; train/val/test sequences "
        f"{len(data['train'])}/{len(data['val'])}/{len(data['test'])}")

    grid, grid_seconds = reused if reused is not None else train_grid(base, data, st, out)
    t_codec = time.perf_counter()
    records = measure_codec(base, grid, data["test"], st, out)
    codec_seconds = time.perf_counter() - t_codec
    analysis = analyse(records, st, out)
    arms_result = measure_and_analyse_arms(base, grid, records, data["test"], arms, bpps, st, out) if arms else None

    summary = {
        "settings": rdlib.settings_dict(st),
        "base": {**base_info, "path": str(base_path)},
        "tables": {"pretrain": pre_tables.tolist(), "downstream": new_tables.tolist()},
        "timing": {"grid_train_seconds": grid_seconds, "codec_eval_seconds": codec_seconds,
                   "total_seconds": time.perf_counter() - t_start,
                   "pretrain_seconds": base_info["seconds"], "pretrain_cached": base_info["cached"]},
        "adapters": [dataclasses.asdict(ta) for ta in grid],
        "measurements": records,
        "bd": analysis,
    }
    if arms_result is not None:  # only with --quantizers: default runs write what they always wrote
        summary["arms"] = {"arms": [dataclasses.asdict(a) for a in arms], "bits_per_param": list(bpps),
                           **arms_result}
    write_measurements(summary, out)

    print(f"\nRD experiment, seed {st.seed}{' (quick)' if st.quick else ''}: base {base_info['params']:,} params, "
          f"task {st.task.n_ciphers} ciphers x {st.task.n_symbols} symbols, {st.steps} adapter steps")
    print_results(grid, records, st)
    for by, title in (("bits", "BD per bit width (curve = ranks)"), ("ranks", "BD per rank (curve = bit widths)")):
        a = analysis[by]
        print_bd(a["rows"], a["notes"], [RDPoint(**d) for d in a["dropped"]], title)
    if arms_result is not None:
        for name in ["arms"] + [f"{a.name}_settings" for a in arms]:
            r = arms_result[name]
            what = "arm vs k-means per adapter (curve = rate settings)" if name == "arms" else \
                f"{name}: SineLoRA vs LoRA per rate setting (curve = ranks)"
            print_bd(r["rows"], r["notes"], [RDPoint(**d) for d in r["dropped"]], f"BD {what}", r["anchor"])
    print(f"\ntiming: pretraining {base_info['seconds']:.1f} s{' (cached)' if base_info['cached'] else ''}, "
          f"grid training {grid_seconds:.1f} s (hyperparameter search included), encode+eval {codec_seconds:.1f} s, "
          f"total {summary['timing']['total_seconds']:.1f} s; {st.threads} threads")
    print(f"outputs in {out}")
    return summary


# ==================================================================================================
# Several seeds: spread
# ==================================================================================================


def summarize(dirs: list[Path]) -> None:
    """Print the BD tables of several runs side by side with mean and spread (max - min)."""
    runs = [json.loads((d / "measurements.json").read_text()) for d in dirs]
    seeds = [r["settings"]["seed"] for r in runs]
    for by in ("bits", "ranks"):
        print(f"\nBD per {'bit width' if by == 'bits' else 'rank'} across seeds {seeds} "
              f"(SineLoRA vs LoRA, {INTERP}): BD-rate % | BD-acc points")
        groups: list = []
        for r in runs:
            for row in r["bd"][by]["rows"]:
                if row["group"] not in groups:
                    groups.append(row["group"])
        print(f"{by:>6s} " + " ".join(f"{'seed ' + str(s):>17s}" for s in seeds) + f" {'mean':>17s} {'spread':>17s}")
        for g in groups:
            vals = []
            for r in runs:
                row = next((x for x in r["bd"][by]["rows"] if x["group"] == g), None)
                vals.append(None if row is None else (row["bd_rate"], row["bd_quality"]))
            cells = [f"{v[0]:+8.2f} {v[1]:+8.2f}" if v else f"{'n/a':>17s}" for v in vals]
            ok = [v for v in vals if v]
            if ok:
                br, bq = np.array([v[0] for v in ok]), np.array([v[1] for v in ok])
                cells += [f"{br.mean():+8.2f} {bq.mean():+8.2f}", f"{np.ptp(br):8.2f} {np.ptp(bq):8.2f}"]
            print(f"{g:>6s} " + " ".join(cells))
    print("\nPer seed: grid training and pretraining time; per adapter: unquantized test accuracy % (chosen ω, lr)")
    for r in runs:
        print(f"seed {r['settings']['seed']}: grid {r['timing']['grid_train_seconds']:.0f} s, pretraining "
              f"{r['timing']['pretrain_seconds']:.0f} s; " + "; ".join(
                  f"{a['method']} r{a['rank']}: {a['test_accuracy']:.2f}"
                  + (f" (ω {a['omega']:g}, lr {a['lr']:g})" if a["omega"] is not None else f" (lr {a['lr']:g})")
                  for a in r["adapters"]))


# ==================================================================================================
# CLI
# ==================================================================================================


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + " Pretrains a tiny base model (cached), trains LoRA and "
        "sine-LoRA adapters per rank, encodes them at each bit width and reports BD-rate.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Outputs in --out: rd_bits.csv / rd_ranks.csv (sld bd format, every point), *_frontier.csv "
        "(the points BD is computed on), bd_bits.csv / bd_ranks.csv, rd_bits.png / rd_ranks.png, "
        "measurements.json / measurements.csv (every raw measurement), sld_bd_cli.json, adapters/, sld/.",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of everything: tables, data, base model, adapters")
    p.add_argument("--out", type=Path, help="output directory (default benchmarks/out/rd/seed<SEED>[-quick])")
    p.add_argument("--quick", action="store_true", help="ranks 2 8, bits 2 3 16, small task and few steps (~1 min)")
    p.add_argument("--ranks", type=int, nargs="+", help="adapter ranks (default 1 2 4 8 16)")
    p.add_argument("--bits", type=int, nargs="+", help="bit widths (default 1 2 3 4 5 8 16)")
    p.add_argument("--steps", type=int, help="adapter training steps (default 500; quick 100)")
    p.add_argument("--omegas", type=float, nargs="+", help="sine-LoRA ω candidates (default 10 30 100 300)")
    p.add_argument("--lrs", type=float, nargs="+",
                   help="learning-rate candidates, both methods (default 0.001 0.003; quick 0.003)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--cache-dir", type=Path, default=REPO / "benchmarks" / "out" / "cache",
                   help="where the pretrained base model is cached (default benchmarks/out/cache)")
    p.add_argument("--quantizers", default="kmeans",
                   help="comma-separated encoder arms measured on the same adapters: kmeans (today's default, "
                   "always run), uniform, kmeans_v2, ecsq, auto; arms the installed encoder lacks are skipped with a "
                   "note; extra arms write arms_points.csv, bd_arms.csv, bd_<arm>_settings.csv")
    p.add_argument("--bits-per-param", type=float, nargs="+",
                   help="targets of the rate-controlled arms (default 1 1.5 2 3 4 6)")
    p.add_argument("--reuse", action="store_true",
                   help="do not train: measure the codec again on the adapters an earlier run (same settings) "
                   "left in --out (out/grid/*.json)")
    p.add_argument("--summarize", type=Path, nargs="+", metavar="OUT",
                   help="do not run: print the BD tables of these output directories with mean and spread")
    return p.parse_args(argv)


def settings_from_args(a: argparse.Namespace) -> Settings:
    st = quick_settings(a.seed) if a.quick else Settings(seed=a.seed)
    if a.ranks:
        st.ranks = tuple(sorted(set(a.ranks)))
    if a.bits:
        st.bits = tuple(sorted(set(a.bits)))
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
        summarize(a.summarize)
        return 0
    st = settings_from_args(a)
    out = a.out or REPO / "benchmarks" / "out" / "rd" / f"seed{st.seed}{'-quick' if st.quick else ''}"
    try:
        names = [q.strip() for q in a.quantizers.split(",") if q.strip()]
        for q in names:
            rdlib.arm_named(q)
    except ValueError as exc:
        print(f"rd_experiment.py: error: {exc}", file=sys.stderr)
        return 2
    arms = [x for x in rdlib.supported_arms(names, log) if x != rdlib.KMEANS]
    bpps = tuple(sorted(set(a.bits_per_param))) if a.bits_per_param else rdlib.DEFAULT_BITS_PER_PARAM
    try:
        run(st, out, a.cache_dir, arms, bpps, reuse=a.reuse)
    except rdlib.ReuseError as exc:
        print(f"rd_experiment.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
