"""Reading adapters from disk (PEFT LoRA, SineLoRA) and writing them back in PEFT layout.

What an adapter *means* is resolved here, once, into :class:`AdapterModule` records: for every
adapted linear module its A (r×in), B (out×r), scale, and for sine adapters ω and γ, so the
codec below never looks at a config again.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import AdapterError

__all__ = ["AdapterModule", "Adapter", "read_adapter", "write_adapter", "GAMMA_SQRT_IN"]

GAMMA_SQRT_IN = "sqrt-in"
_FACTOR_KEY = re.compile(r"^(?P<mod>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_DTYPE_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


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


def _torch_to_numpy(name: str, t: Any, path: str) -> tuple[np.ndarray, str]:
    import torch

    dtype = str(t.dtype).replace("torch.", "")
    if dtype not in _DTYPE_NAMES:
        raise AdapterError(f"{path}: tensor '{name}' has dtype {dtype}; expected a floating point dtype")
    arr = t.detach().to("cpu")
    if t.dtype == torch.bfloat16:
        values = arr.float().numpy()
    else:
        values = arr.numpy()
    return np.ascontiguousarray(values), _DTYPE_NAMES[dtype]


def _load_tensors(path: str) -> tuple[dict[str, tuple[np.ndarray, str]], dict[str, str]]:
    """name -> (array, dtype name) from a .safetensors or a torch .bin (weights only)."""
    import torch

    out: dict[str, tuple[np.ndarray, str]] = {}
    meta: dict[str, str] = {}
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as f:
                meta = dict(f.metadata() or {})
                for k in f.keys():
                    out[k] = _torch_to_numpy(k, f.get_tensor(k), path)
        except AdapterError:
            raise
        except Exception as exc:
            raise AdapterError(f"{path}: cannot read safetensors: {exc}") from None
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise AdapterError(f"{path}: cannot load as a weights-only torch file: {exc}") from None
        if not isinstance(sd, dict):
            raise AdapterError(f"{path}: expected a state dict, got {type(sd).__name__}")
        for k, v in sd.items():
            if not isinstance(v, torch.Tensor):
                raise AdapterError(f"{path}: entry '{k}' is {type(v).__name__}, expected a tensor")
            out[k] = _torch_to_numpy(k, v, path)
    return out, meta


def _read_config(cfg_path: str) -> dict[str, Any] | None:
    """adapter_config.json as a dict, or None when there is none."""
    if not os.path.isfile(cfg_path):
        return None
    try:
        with open(cfg_path, encoding="utf-8") as fh:
            config = json.load(fh)
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{cfg_path}: not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{cfg_path}: expected a JSON object")
    return config


def _resolve_files(src: str) -> tuple[str, dict[str, Any] | None, str]:
    """(weights file, config or None, description) for a directory or a single file."""
    if os.path.isdir(src):
        config = _read_config(os.path.join(src, "adapter_config.json"))
        for fname in ("adapter_model.safetensors", "adapter_model.bin"):
            p = os.path.join(src, fname)
            if os.path.isfile(p):
                return p, config, src
        raise AdapterError(f"{src}: no adapter_model.safetensors or adapter_model.bin in the directory")
    if os.path.isfile(src):
        if not (src.endswith(".safetensors") or src.endswith(".bin")):
            raise AdapterError(f"{src}: expected a PEFT adapter directory, a .safetensors or a .bin file")
        return src, _read_config(os.path.join(os.path.dirname(os.path.abspath(src)), "adapter_config.json")), src
    raise AdapterError(f"{src}: no such file or directory")


def _pattern_value(patterns: dict[str, Any] | None, module: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup: a key matches the module name's tail."""
    if not patterns:
        return default
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def _num(cfg: dict[str, Any], key: str, where: str) -> float | None:
    v = cfg.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise AdapterError(f"{where}: '{key}' must be a finite number, got {v!r}")
    return float(v)


def read_adapter(
    src: str | os.PathLike[str],
    *,
    omega: float | None = None,
    gamma: float | str | None = None,
    alpha: float | None = None,
) -> Adapter:
    """Read a PEFT LoRA / SineLoRA adapter (directory, .safetensors or .bin).

    ``omega``, ``gamma`` (a number or ``"sqrt-in"``) and ``alpha`` override the config. An
    ``omega`` makes the adapter a sine adapter. Raises :class:`AdapterError` with the file and
    the tensor or key at fault.
    """
    src = os.fspath(src)
    wfile, config, where = _resolve_files(src)
    tensors, st_meta = _load_tensors(wfile)
    if config is None and "adapter_config" in st_meta:
        try:
            config = json.loads(st_meta["adapter_config"])
        except ValueError as exc:
            raise AdapterError(f"{wfile}: metadata 'adapter_config' is not JSON: {exc}") from None
    cfg: dict[str, Any] = dict(config or {})
    cfg_where = f"{where}: adapter_config"
    if not tensors:
        raise AdapterError(f"{wfile}: the adapter holds no tensors")

    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    sine = peft_type == "SINLORA" or bool(cfg.get("use_sinelora", False))
    w = _num(cfg, "freq", cfg_where) if peft_type == "SINLORA" else None
    if w is None:
        w = _num(cfg, "sinelora_frequency", cfg_where)
    g: float | str | None = _num(cfg, "sinelora_scaling", cfg_where) if not peft_type == "SINLORA" else None
    dc = cfg.get("deltacodec") if isinstance(cfg.get("deltacodec"), dict) else {}
    if dc.get("omega") is not None:
        sine, w = True, _num(dc, "omega", f"{cfg_where}.deltacodec")
    if dc.get("gamma") is not None:
        g = dc["gamma"] if dc["gamma"] == GAMMA_SQRT_IN else _num(dc, "gamma", f"{cfg_where}.deltacodec")
    if omega is not None:
        sine, w = True, float(omega)
    if gamma is not None:
        g = gamma
    if sine and (w is None or w == 0 or not math.isfinite(w)):
        raise AdapterError(
            f"{where}: a sine adapter needs a non-zero frequency ω (config 'freq' / "
            f"'sinelora_frequency', or --omega); got {w!r}"
        )
    if isinstance(g, str) and g != GAMMA_SQRT_IN:
        raise AdapterError(f"{where}: gamma must be a number or '{GAMMA_SQRT_IN}', got {g!r}")
    if isinstance(g, (int, float)) and not (math.isfinite(g) and g > 0):
        raise AdapterError(f"{where}: gamma must be > 0, got {g!r}")

    r_default = cfg.get("r")
    a_default = alpha if alpha is not None else cfg.get("lora_alpha")
    if a_default is None and config is None:
        raise AdapterError(
            f"{where}: no adapter_config.json (nor 'adapter_config' metadata) to take lora_alpha "
            "from: pass --alpha (scale = alpha / r)"
        )
    use_rslora = bool(cfg.get("use_rslora", False))
    fifo = bool(cfg.get("fan_in_fan_out", False))

    factors: dict[str, dict[str, tuple[str, np.ndarray]]] = {}
    extras: dict[str, tuple[np.ndarray, str]] = {}
    for key, (arr, dt) in tensors.items():
        if arr.size == 0:
            raise AdapterError(f"{wfile}: tensor '{key}' is empty (shape {list(arr.shape)})")
        if not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr)).sum())
            raise AdapterError(f"{wfile}: tensor '{key}' has {bad} NaN/Inf values")
        m = _FACTOR_KEY.match(key)
        if m and arr.ndim == 2:
            factors.setdefault(m["mod"], {})[m["ab"]] = (key, arr)
        else:
            extras[key] = (arr, dt)

    modules: list[AdapterModule] = []
    for mod in sorted(factors):
        pair = factors[mod]
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
        short = mod[len("base_model.model."):] if mod.startswith("base_model.model.") else mod
        r_cfg = _pattern_value(cfg.get("rank_pattern"), short, r_default)
        if r_cfg is not None and int(r_cfg) != r:
            raise AdapterError(
                f"{wfile}: module '{mod}': the config says rank {r_cfg}, the tensors have rank {r}"
            )
        a = _pattern_value(cfg.get("alpha_pattern"), short, a_default)
        if a is None:
            a = r
        scale = float(a) / (math.sqrt(r) if use_rslora else r)
        gm = None
        if sine:
            gm = math.sqrt(A.shape[1]) if g is None or g == GAMMA_SQRT_IN else float(g)
        modules.append(
            AdapterModule(
                name=mod,
                A=np.ascontiguousarray(A, dtype=np.float32),
                B=np.ascontiguousarray(B, dtype=np.float32),
                scale=scale,
                sine=sine,
                omega=float(w) if sine else None,
                gamma=gm,
                fan_in_fan_out=fifo,
            )
        )
    if not modules and not extras:
        raise AdapterError(f"{wfile}: an empty adapter (no lora_A/lora_B pairs, no other tensors)")
    return Adapter(modules=modules, extras=extras, config=cfg, source=src)


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
