"""Reading adapters from disk (PEFT LoRA, SineLoRA) and writing them back in PEFT layout.

What an adapter *means* is resolved here, once, into :class:`AdapterModule` records: for every
adapted linear module its A (r×in), B (out×r), scale, and for sine adapters ω and γ, so the
codec below never looks at a config again.

Reading refuses, with the file and the tensor or key named, everything an ``.sld`` file could
not hold or would hold with a different meaning: names the format cannot store, non-float or
non-finite tensors, several adapters in one file, two entries that stand for the same model
weight, a model checkpoint instead of an adapter, a scale or ΔW beyond float32. The config is
checked by :mod:`deltacodec.adapter_config`. What is stored but that ``apply`` cannot honour
(DoRA, LoRA biases, conv LoRA, config keys deltacodec does not model) is a
:class:`DeltacodecWarning`.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .adapter_config import GAMMA_SQRT_IN, AdapterSettings, parse_config, read_config_file, resolve_settings, show_name
from .errors import AdapterError, DeltacodecWarning, preview
from .format import MAX_DIM, MAX_NAME_BYTES, MAX_NDIM, MAX_NUMEL

__all__ = ["AdapterModule", "Adapter", "read_adapter", "write_adapter", "check_tensor_name", "GAMMA_SQRT_IN"]

_PEFT_PREFIX = "base_model.model."
# A LoRA factor's key: <module>.lora_A[.<adapter name>].weight. The adapter name is there in a
# model's own state dict (PEFT strips it when saving); more than one of them is several adapters.
_FACTOR_KEY = re.compile(r"^(?:(?P<mod>.+)\.)?lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_EMBEDDING_FACTOR = re.compile(r"(?:^|\.)lora_embedding_[AB](?:\.[^.]+)?$")
_LORA_BIAS = re.compile(r"(?:^|\.)lora_[AB](?:\.[^.]+)?\.bias$")
_DORA = re.compile(r"(?:^|\.)lora_magnitude_vector(?:\.|$)")
_DTYPES = ("F32", "F16", "BF16", "F64")
_TORCH_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}
_F32_MAX = float(np.finfo(np.float32).max)


@dataclass
class AdapterModule:
    """One adapted linear module. ΔW (out×in) = scale·sin(ω·B@A)/γ (sine) or scale·B@A (LoRA)."""

    name: str
    A: np.ndarray  # float32 (r, in)
    B: np.ndarray  # float32 (out, r)
    scale: float
    sine: bool = False
    omega: float | None = None
    gamma: float | None = None
    fan_in_fan_out: bool = False

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.A.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.B.shape[0])

    def delta(self) -> np.ndarray:
        """ΔW (out×in) in float64, computed plainly (for tests and reports, not for speed)."""
        p = self.B.astype(np.float64) @ self.A.astype(np.float64)
        if self.sine:
            return self.scale * np.sin(self.omega * p) / self.gamma
        return self.scale * p


@dataclass
class Adapter:
    """An adapter in memory: its modules, the tensors kept losslessly, and its config."""

    modules: list[AdapterModule]
    extras: dict[str, tuple[np.ndarray, str]] = field(default_factory=dict)  # name -> (values, dtype)
    config: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    @property
    def sine(self) -> bool:
        return any(m.sine for m in self.modules)


# ----------------------------------------------------------------------------------------------
# Loading tensors


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:200] + "...") if len(text) > 200 else (text or type(exc).__name__)


def check_tensor_name(key: Any, path: str) -> str:
    """``key`` if it is a tensor name an .sld file can hold and a terminal can print: a
    non-empty str of at most MAX_NAME_BYTES UTF-8 bytes, every character printable (no
    control, format or line-separator characters). Else an AdapterError naming ``path``.
    The writer can apply the same rule to an in-memory Adapter."""
    if not isinstance(key, str):
        raise AdapterError(f"{path}: a tensor is keyed by {show_name(key)}, expected a string name")
    if not key:
        raise AdapterError(f"{path}: a tensor has an empty name")
    try:
        nbytes = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        raise AdapterError(f"{path}: tensor name {show_name(key)} is not valid Unicode (a lone surrogate)") from None
    if nbytes > MAX_NAME_BYTES:
        raise AdapterError(
            f"{path}: tensor name {show_name(key)} is {nbytes} UTF-8 bytes; an .sld name holds at most {MAX_NAME_BYTES}"
        )
    if not key.isprintable():
        raise AdapterError(f"{path}: tensor name {show_name(key)} holds control or other non-printable characters")
    return key


def _check_layout(key: str, dtype: str, shape: tuple[int, ...] | list[int], path: str) -> None:
    """Dtype and shape checks that need no tensor data."""
    if dtype not in _DTYPES:
        raise AdapterError(
            f"{path}: tensor {show_name(key)} has dtype {dtype}; expected a float dtype (float32, float16, bfloat16, float64)"
        )
    if not 1 <= len(shape) <= MAX_NDIM:
        what = "a 0-d (scalar) tensor" if not shape else f"{len(shape)}-dimensional"
        raise AdapterError(f"{path}: tensor {show_name(key)} is {what}; an .sld tensor has 1..{MAX_NDIM} dimensions")
    if 0 in shape:
        raise AdapterError(f"{path}: tensor {show_name(key)} is empty (shape {list(shape)})")
    if max(shape) > MAX_DIM or math.prod(shape) > MAX_NUMEL:
        raise AdapterError(f"{path}: tensor {show_name(key)} of shape {list(shape)} exceeds the .sld size caps")


def _torch_to_numpy(name: str, t: Any, path: str) -> tuple[np.ndarray, str]:
    import torch

    if t.layout != torch.strided or t.is_quantized:
        raise AdapterError(f"{path}: tensor {show_name(name)} is a {t.layout} / quantized tensor; expected a dense one")
    dtype = _TORCH_DTYPES.get(str(t.dtype).replace("torch.", ""), str(t.dtype).replace("torch.", ""))
    _check_layout(name, dtype, tuple(t.shape), path)
    try:
        arr = t.detach().to("cpu")
        values = arr.float().numpy() if t.dtype == torch.bfloat16 else arr.numpy()
    except RuntimeError as exc:
        raise AdapterError(f"{path}: tensor {show_name(name)} cannot be read as an array: {_one_line(exc)}") from None
    return np.ascontiguousarray(values), dtype


def _load_safetensors(path: str) -> tuple[dict[str, tuple[np.ndarray, str]], dict[str, str]]:
    from safetensors import safe_open

    out: dict[str, tuple[np.ndarray, str]] = {}
    try:
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
            keys = [check_tensor_name(k, path) for k in f.keys()]
            for k in keys:
                sl = f.get_slice(k)
                # Checked from the header before the data is touched: a non-float or oversized
                # tensor is refused without being loaded.
                _check_layout(k, sl.get_dtype(), tuple(sl.get_shape()), path)
                out[k] = _torch_to_numpy(k, f.get_tensor(k), path)
    except AdapterError:
        raise
    except Exception as exc:  # safetensors raises its own, OSError, ValueError...: all are "unreadable"
        raise AdapterError(f"{path}: cannot read as safetensors: {_one_line(exc)}") from None
    return out, meta


def _load_bin(path: str) -> dict[str, tuple[np.ndarray, str]]:
    import torch

    try:
        # weights_only: plain tensors and containers; nothing else is ever unpickled.
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise AdapterError(f"{path}: cannot load as a weights-only torch file: {_one_line(exc)}") from None
    if not isinstance(sd, dict):
        raise AdapterError(f"{path}: expected a state dict (a map of name to tensor), got {type(sd).__name__}")
    out: dict[str, tuple[np.ndarray, str]] = {}
    for k, v in sd.items():
        check_tensor_name(k, path)
        if not isinstance(v, torch.Tensor):
            raise AdapterError(
                f"{path}: entry {show_name(k)} is a {type(v).__name__}, expected a tensor (a flat state dict)"
            )
        out[k] = _torch_to_numpy(k, v, path)
    return out


def _resolve_files(src: str) -> tuple[str, str | None]:
    """(weights file, path where its adapter_config.json would be) for a directory or a file."""
    if os.path.isdir(src):
        for fname in ("adapter_model.safetensors", "adapter_model.bin"):
            p = os.path.join(src, fname)
            if os.path.isfile(p):
                return p, os.path.join(src, "adapter_config.json")
        raise AdapterError(f"{src}: no adapter_model.safetensors or adapter_model.bin in the directory")
    if os.path.isfile(src):
        if not (src.endswith(".safetensors") or src.endswith(".bin")):
            raise AdapterError(f"{src}: expected a PEFT adapter directory, a .safetensors or a .bin file")
        return src, os.path.join(os.path.dirname(os.path.abspath(src)), "adapter_config.json")
    if os.path.lexists(src):
        raise AdapterError(f"{src}: not a regular file or directory")
    raise AdapterError(f"{src}: no such file or directory")


# ----------------------------------------------------------------------------------------------
# Meaning


def _canonical(name: str) -> str:
    """The model-side name an entry stands for: apply tries it with and without PEFT's prefix."""
    return name[len(_PEFT_PREFIX):] if name.startswith(_PEFT_PREFIX) else name


def _f32_finite(x: float) -> bool:
    with np.errstate(over="ignore"):
        return bool(np.isfinite(np.float32(x)))


def _product_bound(A: np.ndarray, B: np.ndarray) -> float:
    """An upper bound on max|B@A| in O(r·(in+out)): |Σ_k B_ik A_kj| <= Σ_k |B_ik|·max_j|A_kj|."""
    return float((np.abs(B).astype(np.float64) @ np.abs(A).astype(np.float64).max(axis=1)).max())


def _delta_peaks(A: np.ndarray, B: np.ndarray, omega: float | None) -> tuple[float, float]:
    """(max|B@A|, max|sin(ω·B@A)|) exactly, in float64, a block of rows at a time."""
    A64 = A.astype(np.float64)
    rows = max(1, (1 << 22) // max(1, A.shape[1]))
    peak = peak_sin = 0.0
    for i in range(0, B.shape[0], rows):
        p = B[i : i + rows].astype(np.float64) @ A64
        peak = max(peak, float(np.abs(p).max()))
        if omega is not None:
            with np.errstate(over="ignore", invalid="ignore"):
                peak_sin = max(peak_sin, float(np.nan_to_num(np.abs(np.sin(omega * p)), nan=1.0).max()))
    return peak, peak_sin


def _check_delta_finite(mod: str, A: np.ndarray, B: np.ndarray, scale: float, omega: float | None,
                        gamma: float | None, path: str) -> None:
    """Refuse a module whose ΔW cannot be finite in float32, where apply forms it.

    B@A is summed in float32 in an order apply's backend chooses, so every partial sum must be
    finite: the bound Σ_k |B_ik|·max_j|A_kj| must be. The factors applied after it (scale, ω,
    1/γ) are checked on the exact peak when the bound alone would overflow, so a large scale
    on a small product is not refused for the bound's slack.
    """
    bound = _product_bound(A, B)
    if not _f32_finite(bound):
        raise AdapterError(
            f"{path}: module '{mod}': the terms of B@A add up to {bound:.3g} (Σ_k |B_ik|·|A_kj|): beyond "
            "float32, where apply forms B@A"
        )
    if omega is None:
        if _f32_finite(bound * abs(scale)):
            return
        peak, _ = _delta_peaks(A, B, None)
        if _f32_finite(peak * abs(scale)):
            return
        raise AdapterError(
            f"{path}: module '{mod}': ΔW = scale·B@A reaches {peak * abs(scale):.3g} (scale {scale:.6g}, "
            f"max|B@A| {peak:.3g}): beyond float32, so it cannot become a finite weight"
        )
    ratio = abs(scale) / gamma  # type: ignore[operator]
    if _f32_finite(bound * abs(omega)) and _f32_finite(ratio):
        return
    peak, peak_sin = _delta_peaks(A, B, omega)
    if not _f32_finite(peak * abs(omega)):
        raise AdapterError(
            f"{path}: module '{mod}': ω·B@A reaches {peak * abs(omega):.3g} (ω {omega:.6g}): beyond float32, "
            "so sin(ω·B@A) cannot be finite"
        )
    if not _f32_finite(ratio * peak_sin):
        raise AdapterError(
            f"{path}: module '{mod}': ΔW = scale·sin(ω·B@A)/γ reaches {ratio * peak_sin:.3g} "
            f"(scale {scale:.6g}, γ {gamma:.6g}): beyond float32"
        )


def _as_float32(key: str, arr: np.ndarray, path: str) -> np.ndarray:
    with np.errstate(over="ignore"):
        out = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(out).all():
        raise AdapterError(
            f"{path}: tensor {show_name(key)} has values up to {float(np.abs(arr).max()):.3g}, beyond float32 (a LoRA factor is stored from float32)"
        )
    return out


def _group_factors(
    tensors: dict[str, tuple[np.ndarray, str]], path: str
) -> tuple[dict[str, dict[str, tuple[str, np.ndarray]]], dict[str, tuple[np.ndarray, str]], list[str]]:
    """(module -> {"A"/"B": (key, values)} for 2-D factor pairs, extras, non-linear factor keys).

    A module whose factor-named tensors are all not 2-D (conv LoRA) is kept losslessly with
    the extras; one that mixes 2-D and other factors is an error, as is a factor without a
    module name and a file holding factors of more than one adapter.
    """
    groups: dict[str, dict[str, tuple[str, np.ndarray, str]]] = {}
    keys_by_tag: dict[str, dict[str | None, list[str]]] = {}  # module -> adapter name -> keys
    extras: dict[str, tuple[np.ndarray, str]] = {}
    for key, (arr, dt) in tensors.items():
        m = _FACTOR_KEY.match(key)
        if m is None:
            extras[key] = (arr, dt)
            continue
        if m["mod"] is None:
            raise AdapterError(f"{path}: tensor {show_name(key)} is named like a LoRA factor but names no module")
        keys_by_tag.setdefault(m["mod"], {}).setdefault(m["adapter"], []).append(key)
        groups.setdefault(m["mod"], {})[m["ab"]] = (key, arr, dt)
    tags = {tag for by_tag in keys_by_tag.values() for tag in by_tag}
    if len(tags) > 1:
        both = next((by for by in keys_by_tag.values() if len(by) > 1), None)
        if both is not None:  # one module, several adapters: list its keys
            shown = sorted(k for ks in both.values() for k in ks)
        else:  # several adapters on different modules: one key of each
            shown = sorted(next(ks[0] for by in keys_by_tag.values() for t, ks in by.items() if t == tag) for tag in tags)
        names = sorted("(unnamed)" if t is None else f"'{t}'" for t in tags)
        raise AdapterError(
            f"{path}: holds LoRA factors of several adapters ({', '.join(names)}): {preview(shown, limit=4)}; "
            "an .sld holds one adapter: save each on its own with "
            "PeftModel.save_pretrained(dir, selected_adapters=[name])"
        )
    pairs: dict[str, dict[str, tuple[str, np.ndarray]]] = {}
    nonlinear: list[str] = []
    for mod, group in groups.items():
        dims = {ab: arr.ndim for ab, (_, arr, _) in group.items()}
        if all(d == 2 for d in dims.values()):
            pairs[mod] = {ab: (key, arr) for ab, (key, arr, _) in group.items()}
        elif all(d != 2 for d in dims.values()):
            for key, arr, dt in group.values():
                extras[key] = (arr, dt)
                nonlinear.append(key)
        else:
            desc = ", ".join(f"{show_name(key)} is {list(arr.shape)}" for key, arr, _ in group.values())
            raise AdapterError(
                f"{path}: module '{mod}': {desc}; the factors of a linear layer are both 2-D (r×in, out×r)"
            )
    nonlinear += [k for k in extras if _EMBEDDING_FACTOR.search(k)]
    return pairs, extras, nonlinear


def _check_collisions(modules: list[str], extras: list[str], path: str) -> None:
    """No two entries may stand for the same model tensor (apply would add or replace twice)."""
    claimed: dict[str, str] = {}

    def claim(name: str, owner: str) -> None:
        if name in claimed and claimed[name] != owner:
            raise AdapterError(
                f"{path}: {claimed[name]} and {owner} both stand for '{name}' in the model (names are "
                f"matched with and without PEFT's '{_PEFT_PREFIX}' prefix): one weight, one entry"
            )
        claimed[name] = owner

    for mod in modules:
        c = _canonical(mod)
        for name in (c, c + ".weight", c + ".lora_A.weight", c + ".lora_B.weight"):
            claim(name, f"module '{mod}'")
    for key in extras:
        claim(_canonical(key), f"tensor '{key}'")


def _warnings(st: AdapterSettings, extras: list[str], nonlinear: list[str], src: str) -> list[str]:
    notes = list(st.notes)
    dora = [k for k in extras if _DORA.search(k)]
    if st.use_dora or dora:
        notes.append(
            f"{src}: a DoRA adapter ({'use_dora' if st.use_dora else ''}{', ' if st.use_dora and dora else ''}"
            f"{f'{len(dora)} lora_magnitude_vector tensors' if dora else ''}): stored losslessly and decode "
            "restores it, but apply will refuse it (DoRA is not supported by apply)"
        )
    biases = [k for k in extras if _LORA_BIAS.search(k)]
    if st.lora_bias or biases:
        notes.append(
            f"{src}: LoRA biases ({'lora_bias' if st.lora_bias else ''}{', ' if st.lora_bias and biases else ''}"
            f"{f'{len(biases)} lora_B.bias tensors' if biases else ''}): stored losslessly and decode restores "
            "them, but apply will refuse them"
        )
    if nonlinear:
        notes.append(
            f"{src}: {len(nonlinear)} LoRA factors of layers that are not linear (conv, embedding; e.g. "
            f"{preview(nonlinear, limit=3)}) are stored losslessly, not quantized; apply will refuse them"
        )
    return notes


def read_adapter(
    src: str | os.PathLike[str],
    *,
    omega: float | None = None,
    gamma: float | str | None = None,
    alpha: float | None = None,
) -> Adapter:
    """Read a PEFT LoRA / SineLoRA adapter (directory, .safetensors or .bin).

    ``omega``, ``gamma`` (a number > 0 or ``"sqrt-in"``) and ``alpha`` override the config (an
    ``alpha`` applies to every module, over ``alpha_pattern``). An ``omega`` makes the adapter
    a sine adapter. Raises :class:`AdapterError` with the file and the tensor or key at fault;
    warns (:class:`DeltacodecWarning`) about what is stored but that ``apply`` cannot honour.
    """
    src = os.fspath(src)
    wfile, cfg_path = _resolve_files(src)
    config = read_config_file(cfg_path) if cfg_path else None
    cfg_where = cfg_path if config is not None else src
    if wfile.endswith(".safetensors"):
        tensors, st_meta = _load_safetensors(wfile)
    else:
        tensors, st_meta = _load_bin(wfile), {}
    if config is None and "adapter_config" in st_meta:
        cfg_where = f"{wfile} (metadata 'adapter_config')"
        config = parse_config(st_meta["adapter_config"], cfg_where)
    if not tensors:
        raise AdapterError(f"{wfile}: the adapter holds no tensors")
    st = resolve_settings(config, cfg_where, src=src, omega=omega, gamma=gamma, alpha=alpha)

    pairs, extras, nonlinear = _group_factors(tensors, wfile)
    if not pairs and not nonlinear:
        names = sorted(tensors)
        model = "" if any("lora_" in k for k in names) else ": this looks like a model, not an adapter"
        raise AdapterError(
            f"{wfile}: no lora_A/lora_B pairs{model} ({len(names)} tensor{'s' if len(names) != 1 else ''}: "
            f"{preview(names, limit=3)})"
        )
    for key, (arr, _) in tensors.items():
        if not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr)).sum())
            raise AdapterError(f"{wfile}: tensor {show_name(key)} has {bad} NaN/Inf values")
    _check_collisions(sorted(pairs), sorted(extras), wfile)

    modules: list[AdapterModule] = []
    for mod in sorted(pairs):
        pair = pairs[mod]
        if "A" not in pair or "B" not in pair:
            have, miss = ("A", "B") if "A" in pair else ("B", "A")
            raise AdapterError(f"{wfile}: module '{mod}' has lora_{have} but no lora_{miss} weight")
        (ka, A), (kb, B) = pair["A"], pair["B"]
        r = A.shape[0]
        if B.shape[1] != r:
            raise AdapterError(
                f"{wfile}: module '{mod}': mismatched ranks, '{ka}' is {list(A.shape)} (r×in) and "
                f"'{kb}' is {list(B.shape)} (out×r)"
            )
        short = _canonical(mod)
        r_cfg = st.rank_for(short)
        if r_cfg is not None and r_cfg != r:
            raise AdapterError(
                f"{wfile}: module '{mod}': the config says rank {r_cfg}, the tensors have rank {r}"
            )
        a = st.alpha_for(short)
        if a is None:
            raise AdapterError(
                f"{src}: no adapter_config.json (nor 'adapter_config' metadata) to take lora_alpha "
                "from: pass --alpha (scale = alpha / r)"
            )
        scale = a / (math.sqrt(r) if st.use_rslora else r)
        if not _f32_finite(scale):
            origin, what = st.alpha_origin(short)
            raise AdapterError(
                f"{origin}: module '{mod}': scale = {what} / {'√r' if st.use_rslora else 'r'} = {scale:.3g} "
                "is beyond float32"
            )
        A32, B32 = _as_float32(ka, A, wfile), _as_float32(kb, B, wfile)
        gm = None
        if st.sine:
            gm = math.sqrt(A.shape[1]) if st.gamma is None or st.gamma == GAMMA_SQRT_IN else float(st.gamma)
        _check_delta_finite(mod, A32, B32, scale, st.omega if st.sine else None, gm, wfile)
        modules.append(
            AdapterModule(
                name=mod,
                A=A32,
                B=B32,
                scale=scale,
                sine=st.sine,
                omega=st.omega if st.sine else None,
                gamma=gm,
                fan_in_fan_out=st.fan_in_fan_out,
            )
        )
    for note in _warnings(st, sorted(extras), nonlinear, src):
        warnings.warn(note, DeltacodecWarning, stacklevel=2)
    return Adapter(modules=modules, extras=extras, config=st.config, source=src)


# ----------------------------------------------------------------------------------------------
# Writing


def write_adapter(
    out: str | os.PathLike[str],
    tensors: dict[str, Any],
    config: dict[str, Any],
    *,
    force: bool = False,
    inputs: Any = (),
    progress: Any = None,
) -> list[str]:
    """Write an adapter in PEFT layout; returns the paths written.

    ``tensors`` maps names to numpy arrays, torch tensors (bfloat16 included), or
    :class:`deltacodec.safetensors_io.TensorSpec` (values produced on demand: written one tensor
    at a time, so peak memory is one tensor). ``out`` ending in ``.safetensors``: one file, the
    config in its metadata under ``adapter_config``. Otherwise a directory with
    ``adapter_model.safetensors`` and ``adapter_config.json``, built beside ``out`` and renamed
    into place whole. An existing ``out`` is refused unless ``force``; one that is, lies inside
    or contains any of ``inputs`` (paths) is refused even with ``force`` (:class:`OutputError`).
    ``progress(i, n, name)`` is called before each tensor is written.
    """
    from .errors import OutputError
    from .outputs import atomic_file, staged_directory
    from .safetensors_io import TensorSpec, write_safetensors

    st_dtypes = {
        "f8": "F64", "f4": "F32", "f2": "F16", "i8": "I64", "i4": "I32", "i2": "I16", "i1": "I8",
        "u8": "U64", "u4": "U32", "u2": "U16", "u1": "U8", "b1": "BOOL",
    }
    out = os.fspath(out)
    try:
        cfg_json = json.dumps(config, indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise OutputError(f"{out}: the adapter config cannot be written as JSON: {exc}") from None

    def spec(name: str, t: Any) -> TensorSpec:
        if isinstance(t, TensorSpec):
            return t
        dtype = None
        if type(t).__module__.split(".")[0] == "torch":
            t = t.detach().to("cpu").contiguous()
            if str(t.dtype) == "torch.bfloat16":
                import torch

                arr, dtype = t.view(torch.int16).numpy().view("<u2"), "BF16"
            else:
                arr = t.numpy()
        else:
            arr = np.asarray(t)
        if dtype is None:
            dtype = st_dtypes.get(arr.dtype.str[1:])
            if dtype is None:
                raise OutputError(f"{out}: tensor '{name}' has dtype {arr.dtype}, which safetensors cannot hold here")
        return TensorSpec(dtype, tuple(arr.shape), lambda arr=arr: [arr])

    specs = {name: spec(name, t) for name, t in tensors.items()}
    if out.endswith(".safetensors"):
        with atomic_file(out, inputs=inputs, force=force) as fh:
            write_safetensors(fh, specs, {"adapter_config": cfg_json, "format": "pt"}, progress=progress)
        return [out]
    with staged_directory(out, inputs=inputs, force=force) as stage:
        with stage.open("adapter_model.safetensors") as fh:
            write_safetensors(fh, specs, {"format": "pt"}, progress=progress)
        with stage.open("adapter_config.json") as fh:
            fh.write((cfg_json + "\n").encode())
    return [os.path.join(out, "adapter_model.safetensors"), os.path.join(out, "adapter_config.json")]
