"""An ``.sld`` as a llama.cpp LoRA adapter (GGUF), written as llama.cpp's own converter writes one.

What ``convert_lora_to_gguf.py`` produces, and what llama.cpp's adapter loader reads:

* metadata ``general.architecture`` (must equal the base model's), ``general.type = adapter``,
  ``adapter.type = lora``, ``adapter.lora.alpha`` (float32), plus ``general.name`` and
  ``general.quantization_version``;
* per adapted matrix ``<gguf name>.lora_a`` of numpy shape (r, in) and ``<gguf name>.lora_b`` of
  shape (out, r) (ggml's ne reversed: a.ne = [in, r], b.ne = [r, out]; the loader checks
  a.ne[0] = W.ne[0], b.ne[1] = W.ne[1], a.ne[1] = b.ne[0]), where ``<gguf name>`` is the base
  tensor's llama.cpp name, from the ``gguf`` package's own name map for the architecture
  (``gguf.get_tensor_name_map``), e.g. ``model.layers.0.self_attn.q_proj.weight`` ->
  ``blk.0.attn_q.weight``;
* llama.cpp adds ``s · B @ (A @ x)`` with ``s = user_scale · alpha / r``, ``r = b.ne[0]`` the
  tensor's own rank (``llama_adapter_lora_weight::get_scale``; alpha = 0 means s = user_scale).
  So per-module ranks are honoured, but there is one alpha. When the modules' ``scale · rank``
  differ (alpha_pattern, or rsLoRA's alpha/√r with several ranks), alpha is the most common one
  and each other module's ratio ``scale·rank / alpha`` is multiplied into its lora_b (one float32
  rounding); llama.cpp then computes exactly the file's ΔW = scale · B@A.

Refused with a :class:`DecodeError` naming the module or tensor: sine modules (llama.cpp's ΔW is
linear in B@A), losslessly stored tensors (modules_to_save, DoRA magnitudes, biases: the loader
takes only lora_a/lora_b pairs), conv kernels, names the map does not know for the architecture,
embeddings, and ``fan_in_fan_out`` modules of layers the converter does not transpose.
Architecture-specific weight changes of the converter come from :mod:`.gguf_arch`.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from ..errors import DecodeError, preview
from ..format import ModuleEntry, SldFile
from ..outputs import atomic_file, check_output
from .gguf_arch import BaseConfig, GgufArch, config_path, read_base_config, resolve_arch

__all__ = ["SUFFIX", "DTYPES", "export", "import_gguf", "lora_alpha"]

SUFFIX = ".gguf"
DTYPES = {"fp32": np.float32, "fp16": np.float16}
_F16_MAX = 65504.0
_F32_MAX = float(np.finfo(np.float32).max)
_PEFT_PREFIX = "base_model.model."
# A block index beyond this in a module name is not a real model (the largest have ~128 layers)
# and would make gguf's name map (a dict entry per name per block) needlessly large.
MAX_BLOCKS = 1024
_INDEX = re.compile(r"(?:^|\.)(\d{1,9})(?=\.|$)")

Progress = Callable[[int, int, str], None]


def import_gguf() -> Any:
    """The ``gguf`` package, or an ImportError saying which extra provides it."""
    try:
        import gguf
    except ImportError:
        raise ImportError(
            "GGUF export needs the 'gguf' package: pip install 'deltacodec[gguf]' (or pip install gguf)"
        ) from None
    return gguf


@dataclass(frozen=True)
class _Planned:
    """One module as it will be written: its llama.cpp tensor name, the factor multiplied into
    lora_b (1.0: none), and the head count of a RoPE row reorder of lora_b (None: none)."""

    module: ModuleEntry
    name: str
    fold: float
    heads: int | None


def lora_alpha(modules: list[ModuleEntry]) -> float:
    """The ``adapter.lora.alpha`` that expresses the most modules with no change: the most common
    ``scale · rank`` (ties: the first in file order). 0.0 when no module has a nonzero one that
    float32 holds: llama.cpp then uses scale 1, and each lora_b has its scale folded in."""
    # A value float32 cannot hold (the key is float32) is no candidate: those modules fold.
    usable = [m for m in modules if m.scale != 0.0 and abs(m.scale * m.rank) <= _F32_MAX]
    counts = Counter(m.scale * m.rank for m in usable)
    if not counts:
        return 0.0
    best = max(counts.values())
    for m in usable:
        if counts[m.scale * m.rank] == best:
            return m.scale * m.rank
    raise AssertionError("unreachable")


def _fold(m: ModuleEntry, alpha: float) -> float:
    """What lora_b is multiplied by so that llama.cpp's alpha/r scale gives the module's scale."""
    if alpha == 0.0:
        return m.scale  # llama.cpp's scale is 1 when alpha is 0
    if m.scale * m.rank == alpha:
        return 1.0
    return m.scale * m.rank / alpha


def _short(name: str) -> str:
    return name[len(_PEFT_PREFIX):] if name.startswith(_PEFT_PREFIX) else name


def _n_blocks(f: SldFile) -> int:
    """Blocks gguf's name map must cover: up to the largest index in a module name (an index of
    MAX_BLOCKS or more is left unmapped, and so refused, rather than make the map that large)."""
    top = [int(i) for m in f.modules for i in _INDEX.findall(_short(m.name)) if int(i) < MAX_BLOCKS]
    return max(top, default=0) + 1


def _refuse_unexpressible(f: SldFile) -> None:
    if not f.modules:
        raise DecodeError(f"{f.path}: holds no LoRA module; a llama.cpp adapter needs at least one lora_a/lora_b pair")
    sine = [m.name for m in f.modules if m.sine]
    if sine:
        raise DecodeError(
            f"{f.path}: module '{sine[0]}' is a sine-LoRA module (ΔW = scale·sin(ω·B@A)/γ); a llama.cpp "
            "LoRA adapter holds only ΔW = scale·B@A: decode with --format peft instead"
        )
    if f.tensors:
        names = [t.name for t in f.tensors]
        raise DecodeError(
            f"{f.path}: tensor '{names[0]}' is stored losslessly (modules_to_save, DoRA magnitude or LoRA "
            f"bias: {preview(names)}); a llama.cpp LoRA adapter holds only lora_a/lora_b pairs"
        )
    for m in f.modules:
        shape = getattr(m, "weight_shape", None)
        if shape is not None and len(shape) != 2:
            raise DecodeError(
                f"{f.path}: module '{m.name}' adapts a weight of shape {tuple(shape)} (a conv kernel); "
                "llama.cpp adapters hold linear layers only"
            )


def _plan(f: SldFile, gguf: Any, arch: GgufArch, base: BaseConfig | None) -> tuple[float, list[_Planned]]:
    """alpha and the modules to write, or a DecodeError for the first that cannot be written."""
    enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    if arch.name not in enum:
        raise DecodeError(
            f"{f.path}: the installed gguf package ({getattr(gguf, '__version__', 'unknown version')}) does "
            f"not know llama.cpp architecture '{arch.name}'; upgrade it (pip install -U gguf)"
        )
    tmap = gguf.get_tensor_name_map(enum[arch.name], _n_blocks(f))
    T = gguf.MODEL_TENSOR
    rope = {T.ATTN_Q: "n_head", T.ATTN_K: "n_head_kv"} if arch.rope_permute else {}
    alpha = lora_alpha(list(f.modules))
    seen: dict[str, str] = {}
    plan: list[_Planned] = []
    for m in f.modules:
        hf = _short(m.name) + ".weight"
        hit = tmap.get_type_and_name(hf, try_suffixes=(".weight",))
        if hit is None:  # bare-model classes (LlamaModel): the converter prefixes "model."
            hit = tmap.get_type_and_name("model." + hf, try_suffixes=(".weight",))
        where = f"{f.path}: module '{m.name}'"
        if hit is None:
            raise DecodeError(
                f"{where}: weight '{hf}' has no llama.cpp tensor in architecture '{arch.name}' (gguf's "
                "name map); llama.cpp could not apply it"
            )
        kind, name = hit
        if kind == T.TOKEN_EMBD or "norm" in name:
            raise DecodeError(f"{where}: maps to '{name}', not a linear layer's matrix; llama.cpp adapters adapt linear layers")
        if kind == T.OUTPUT and base is not None and base.tie_word_embeddings:
            raise DecodeError(
                f"{where}: maps to '{name}', but {base.path} ties the output to the token embeddings, "
                "so llama.cpp's base model has no such tensor"
            )
        if name in seen:
            raise DecodeError(f"{where}: maps to '{name}', as does module '{seen[name]}'")
        seen[name] = m.name
        transposed = hf.endswith(arch.transposed) if arch.transposed else False
        if m.fan_in_fan_out != transposed:
            why = (
                "its base weight is stored (in, out) (fan_in_fan_out) but llama.cpp's converter keeps it as it is"
                if m.fan_in_fan_out
                else "llama.cpp's converter transposes its base weight, but the module is not fan_in_fan_out"
            )
            raise DecodeError(f"{where}: {why}; the adapter cannot be expressed for '{arch.name}'")
        heads = None
        if kind in rope:
            key = rope[kind]
            heads = getattr(base, key) if base is not None else None
            if heads is None:
                raise DecodeError(
                    f"{where}: llama.cpp stores '{name}' with its rows in RoPE-interleaved order, which "
                    f"needs the base model's head counts; pass --base-config BASE/config.json"
                )
            if m.out_features % (2 * heads):
                raise DecodeError(
                    f"{where}: {m.out_features} rows are not {heads} heads of even size ({key} = {heads} "
                    f"from {base.path if base else '?'}); is that the base model's config?"
                )
        plan.append(_Planned(m, name, _fold(m, alpha), heads))
    return alpha, plan


def _rope_rows(b: np.ndarray, heads: int) -> np.ndarray:
    """lora_b's rows in llama.cpp's order: per head, (first half, second half) interleaved."""
    out, r = b.shape
    return b.reshape(heads, 2, out // heads // 2, r).swapaxes(1, 2).reshape(out, r)


def _as(values: np.ndarray, dtype: Any, where: str) -> np.ndarray:
    if dtype is np.float32:
        return np.ascontiguousarray(values, dtype=np.float32)
    peak = float(np.max(np.abs(values))) if values.size else 0.0
    if peak > _F16_MAX:
        raise DecodeError(f"{where}: max |value| {peak:g} overflows fp16 (largest finite 65504); export with --dtype fp32")
    return np.ascontiguousarray(values, dtype=np.float16)


def _factors(f: SldFile, p: _Planned, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    A, B = f.dequantize(p.module.name)  # float32 (r, in), (out, r), checked finite
    if p.fold != 1.0:
        with np.errstate(over="ignore"):
            B = (B.astype(np.float64) * p.fold).astype(np.float32)
        if not np.all(np.isfinite(B)):
            raise DecodeError(f"{f.path}: module '{p.module.name}': lora_b times {p.fold:g} (its scale folded in) overflows float32")
    if p.heads is not None:
        B = _rope_rows(B, p.heads)
    return _as(A, dtype, f"{f.path}: tensor '{p.name}.lora_a'"), _as(B, dtype, f"{f.path}: tensor '{p.name}.lora_b'")


def _writer(gguf: Any, fh: Any, arch: str) -> Any:
    """A GGUFWriter that writes into ``fh`` (a temporary opened by deltacodec.outputs, which
    renames it into place) instead of opening a path itself."""
    from gguf.gguf_writer import WriterState

    class _HandleWriter(gguf.GGUFWriter):
        def open_output_file(self, path: Any = None) -> None:
            if self.state is WriterState.NO_FILE:
                self.fout = [fh]
                self.state = WriterState.EMPTY

    return _HandleWriter(None, arch)


def _display_name(f: SldFile) -> str:
    base = f.metadata.get("base_model") if isinstance(f.metadata, Mapping) else None
    stem = os.path.splitext(os.path.basename(f.path))[0]
    return f"{base} LoRA ({stem})" if isinstance(base, str) and base else stem


def export(
    f: SldFile,
    out: str,
    *,
    dtype: str = "fp32",
    force: bool = False,
    progress: Progress | None = None,
    arch: str | None = None,
    base_config: str | os.PathLike[str] | Mapping[str, Any] | None = None,
) -> list[str]:
    """Write ``f`` as a llama.cpp LoRA adapter at ``out``; returns ``[out]``.

    ``dtype``: ``fp32`` (default, as the converter) or ``fp16`` for lora_a/lora_b. ``arch``: the
    base model's architecture (a Hugging Face class such as ``LlamaForCausalLM`` or llama.cpp's
    name such as ``llama``) when neither ``base_config`` nor the file records it.
    ``base_config``: the base model's config.json (path, model directory or dict); gives the
    architecture and, for LLaMA-family q/k projections, the head counts. Needs the ``gguf``
    package. Peak memory is one module's factors.
    """
    if dtype not in DTYPES:
        raise DecodeError(f"GGUF export writes lora_a/lora_b as {' or '.join(DTYPES)}, got '{dtype}'")
    gguf = import_gguf()
    inputs = [f.path]
    if base_config is not None and not isinstance(base_config, Mapping):
        inputs.append(config_path(base_config))  # the file read, not its directory: out may sit beside it
    check_output(out, inputs, force=force, kind="file")  # before any decoding
    base = read_base_config(base_config) if base_config is not None else None
    _, target = resolve_arch(f.path, f.metadata, arch, base)
    _refuse_unexpressible(f)
    alpha, plan = _plan(f, gguf, target, base)
    np_dtype = DTYPES[dtype]
    itemsize = np.dtype(np_dtype).itemsize
    with atomic_file(out, inputs=inputs, force=force) as fh:
        w = _writer(gguf, fh, target.name)
        # Key order as convert_lora_to_gguf.py writes them.
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_name(_display_name(f))
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for p in plan:
            m = p.module
            w.add_tensor_info(p.name + ".lora_a", (m.rank, m.in_features), np.dtype(np_dtype), m.rank * m.in_features * itemsize)
            w.add_tensor_info(p.name + ".lora_b", (m.out_features, m.rank), np.dtype(np_dtype), m.out_features * m.rank * itemsize)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for i, p in enumerate(plan):
            if progress:
                progress(i, len(plan), p.module.name)
            a, b = _factors(f, p, np_dtype)
            w.write_tensor_data(a)
            w.write_tensor_data(b)
        if progress:
            progress(len(plan), len(plan), "")
        fh.flush()
    return [out]
