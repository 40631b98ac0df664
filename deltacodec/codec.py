"""Encode and decode: adapter tensors → quantize → pack → entropy → container, and back."""

from __future__ import annotations

import math
import os
import time
from typing import Any, Callable

import numpy as np

from . import __version__ as _version
from .adapter import GAMMA_SQRT_IN, Adapter, AdapterModule, read_adapter, write_adapter
from .entropy import DEFAULT_LEVEL, MAX_LEVEL, compress
from .errors import EncodeError, SldFormatError
from .format import SldFile, atomic_write, build_container
from .pack import default_width, pack_indices, packed_nbytes
from .quantize import QUANTIZERS, quantize

__all__ = ["encode", "decode", "load", "default_output", "Progress"]

Progress = Callable[[int, int, str], None]
PASSTHROUGH_BITS = 16
_F16_MAX = 65504.0


def load(path: str | os.PathLike[str], *, max_decoded_bytes: int | None = None) -> SldFile:
    """Open an ``.sld`` file: the header is read and validated, tensors decode on request.

    ``max_decoded_bytes`` caps what decoding the whole file may allocate (every tensor as
    float32); a file that asks for more is refused with :class:`SldLimitError` before anything
    is decoded. None means the library default, ``format.DEFAULT_MAX_DECODED_BYTES``.
    """
    return SldFile(path, max_decoded_bytes=max_decoded_bytes)


def default_output(src: str | os.PathLike[str]) -> str:
    """Where ``encode`` writes without ``out``: beside the input, ``<name>.sld``."""
    src = os.fspath(src).rstrip("/\\")
    base, ext = os.path.splitext(src)
    return (base if ext in (".safetensors", ".bin") else src) + ".sld"


def _raw_section(values: np.ndarray, dtype: str) -> bytes:
    if dtype == "BF16":
        bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
        return (bits >> np.uint32(16)).astype("<u2").tobytes()
    return np.ascontiguousarray(values, dtype={"F16": "<f2", "F32": "<f4", "F64": "<f8"}[dtype]).tobytes()


def _f16_factor(values: np.ndarray, level: int) -> dict[str, Any]:
    section, comp = compress(_raw_section(values, "F16"), level)
    return {"shape": values.shape, "encoding": "raw", "dtype": "F16", "compression": comp, "section": section}


def _factor(values: np.ndarray, name: str, bits: int, quantizer: str, level: int) -> dict[str, Any]:
    """One module factor as a section dict for :func:`build_container`.

    A codebook costs 2·2^bits bytes whatever the tensor's size, so a small tensor (a rank-1 lora_A
    of a narrow layer, any tensor at 7-8 bits with a few hundred values) can be cheaper as float16.
    It is then stored as raw F16 when that is no larger and, in SSE, either no less accurate than
    the codebook or within float16's own precision (each value off by at most 2^-11 of itself).
    The second clause keeps float16 for a 64-value tensor at 8 bits whose codebook holds every
    value exactly up to the same rounding; the first keeps the codebook for values so small that
    float16 is subnormal and loses relative precision.
    """
    peak = float(np.max(np.abs(values)))
    if bits == PASSTHROUGH_BITS:
        if peak > _F16_MAX:
            raise EncodeError(f"tensor '{name}': |value| up to {peak:g} does not fit float16 (--bits 16)")
        return _f16_factor(values, level)
    q = quantize(values, bits, quantizer)
    width = default_width(bits, entropy_coded=level > 0)
    section, comp = compress(pack_indices(q.indices, width).tobytes(), level)
    if width != bits and packed_nbytes(values.size, bits) < len(section):
        # Byte-aligned fields let zstd reach the index entropy, but when the indices are close to
        # uniform (lora_A near its init) or the tensor is small (frame overhead), dense fields
        # with no entropy stage are smaller: keep whichever is.
        section, comp, width = pack_indices(q.indices, bits).tobytes(), "none", bits
    coded_bytes = len(section) + len(q.codebook_f16)
    if 2 * values.size <= coded_bytes and peak <= _F16_MAX:
        raw = _f16_factor(values, level)
        x = values.astype(np.float64).reshape(-1)
        sse_f16 = float(np.sum((values.astype(np.float16).astype(np.float64).reshape(-1) - x) ** 2))
        sse_cb = float(np.sum((q.codebook.astype(np.float64)[q.indices] - x) ** 2))
        sse_normal = float(np.sum((x * 2.0**-11) ** 2))
        if len(raw["section"]) <= coded_bytes and sse_f16 <= max(sse_cb, sse_normal):
            return raw
    return {
        "shape": values.shape,
        "encoding": "codebook",
        "bits": bits,
        "width": width,
        "quantizer": quantizer,
        "codebook_f16": q.codebook_f16,
        "codebook_scale": q.codebook_scale,
        "compression": comp,
        "section": section,
    }


def encode(
    src: str | os.PathLike[str] | Adapter,
    bits: int = 3,
    *,
    out: str | os.PathLike[str] | None = None,
    omega: float | None = None,
    gamma: float | str | None = None,
    alpha: float | None = None,
    quantizer: str = "kmeans",
    level: int = DEFAULT_LEVEL,
    progress: Progress | None = None,
) -> str:
    """Encode an adapter into an ``.sld`` file and return its path.

    ``src``: a PEFT adapter directory, a ``.safetensors``/``.bin`` file, or an :class:`Adapter`.
    ``bits``: 1..8 (a ``2**bits``-entry codebook per tensor) or 16 (float16 pass-through).
    ``omega``/``gamma``/``alpha`` override the adapter's config (``gamma`` a number or
    ``"sqrt-in"``). ``level``: zstd level 1..22, or 0 to store packed indices without the
    entropy stage. Tensors that are not lora_A/lora_B pairs are stored losslessly. The file is
    written atomically; the same input and options give byte-identical output.
    """
    if not (1 <= bits <= 8 or bits == PASSTHROUGH_BITS):
        raise EncodeError(f"bits must be 1..8 or 16, got {bits}")
    if quantizer not in QUANTIZERS:
        raise EncodeError(f"unknown quantizer '{quantizer}', expected one of {', '.join(QUANTIZERS)}")
    if not 0 <= level <= MAX_LEVEL:
        raise EncodeError(f"level must be 0..{MAX_LEVEL}, got {level}")
    if isinstance(src, Adapter):
        adapter = src
        if out is None:
            raise EncodeError("out is required when encoding an in-memory Adapter")
    else:
        adapter = read_adapter(src, omega=omega, gamma=gamma, alpha=alpha)
    out = os.fspath(out) if out is not None else default_output(src)

    modules = []
    total = len(adapter.modules)
    for i, m in enumerate(adapter.modules):
        if progress:
            progress(i, total, m.name)
        modules.append(
            {
                "name": m.name,
                "sine": m.sine,
                "out_features": m.out_features,
                "in_features": m.in_features,
                "rank": m.rank,
                "scale": m.scale,
                "omega": m.omega,
                "gamma": m.gamma,
                "fan_in_fan_out": m.fan_in_fan_out,
                "A": _factor(m.A, f"{m.name}.lora_A.weight", bits, quantizer, level),
                "B": _factor(m.B, f"{m.name}.lora_B.weight", bits, quantizer, level),
            }
        )
    if progress:
        progress(total, total, "")
    tensors = []
    for name in sorted(adapter.extras):
        values, dt = adapter.extras[name]
        section, comp = compress(_raw_section(values, dt), level)
        tensors.append(
            {"name": name, "shape": values.shape, "encoding": "raw", "dtype": dt, "compression": comp, "section": section}
        )
    config = _portable_config(adapter.config)
    metadata: dict[str, Any] = {
        "encoder": f"deltacodec {_version}",
        "method": "sine" if adapter.sine else "lora",
        "base_model": config.get("base_model_name_or_path"),
        "adapter_config": config,
    }
    atomic_write(out, build_container(metadata, modules, tensors))
    return out


# PEFT keeps these as sets and writes them in hash order, which changes from run to run.
_SET_VALUED_KEYS = ("target_modules", "exclude_modules", "modules_to_save", "layers_to_transform")


def _portable_config(config: dict[str, Any]) -> dict[str, Any]:
    """The adapter config as the header stores it: plain msgpack types, set-valued keys sorted
    (so the same adapter gives the same bytes), and a local absolute base-model path reduced to
    its last component (the file is shipped to other machines; the path means nothing there)."""
    cfg = _jsonable(config)
    for key in _SET_VALUED_KEYS:
        v = cfg.get(key)
        if isinstance(v, list) and len({type(x) for x in v}) <= 1:
            cfg[key] = sorted(v)
    base = cfg.get("base_model_name_or_path")
    if isinstance(base, str) and os.path.isabs(base):
        cfg["base_model_name_or_path"] = os.path.basename(base.rstrip("/\\")) or base
    return cfg


def _jsonable(obj: Any) -> Any:
    """Config values as plain msgpack/JSON types (sets and tuples become sorted/plain lists)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, set):
        return sorted(_jsonable(v) for v in obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


_TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def decoded_config(f: SldFile) -> dict[str, Any]:
    """adapter_config.json for a decoded file: the original config plus ω and γ of sine modules."""
    cfg = dict(f.metadata.get("adapter_config") or {})
    sine = [m for m in f.modules if m.sine]
    if sine:
        omegas = {m.omega for m in sine}
        if len(omegas) != 1:
            raise SldFormatError(f"{f.path}: modules use different ω {sorted(omegas)}; PEFT configs hold one")
        if all(math.isclose(m.gamma, math.sqrt(m.in_features), rel_tol=1e-12) for m in sine):
            gamma: Any = GAMMA_SQRT_IN
        else:
            gammas = {m.gamma for m in sine}
            if len(gammas) != 1:
                raise SldFormatError(f"{f.path}: modules use different γ {sorted(gammas)}; PEFT configs hold one")
            gamma = gammas.pop()
        cfg["deltacodec"] = {"omega": omegas.pop(), "gamma": gamma}
    return cfg


def decode(
    path: str | os.PathLike[str] | SldFile,
    out: str | os.PathLike[str] | None = None,
    *,
    dtype: str = "fp32",
    progress: Progress | None = None,
) -> list[str]:
    """Write the dequantized adapter back in PEFT layout; returns the paths written.

    ``out`` ending in ``.safetensors`` gives one file (config in its metadata); otherwise a
    directory with ``adapter_model.safetensors`` and ``adapter_config.json`` (default:
    ``<file>-decoded/`` beside the input). ``dtype`` (fp32, fp16, bf16) applies to lora_A/B;
    losslessly stored tensors keep their stored dtype.
    """
    import torch

    if dtype not in _TORCH_DTYPES:
        raise EncodeError(f"dtype must be one of {', '.join(_TORCH_DTYPES)}, got '{dtype}'")
    f = path if isinstance(path, SldFile) else SldFile(path)
    if out is None:
        out = os.path.splitext(f.path)[0] + "-decoded"
    tdt = getattr(torch, _TORCH_DTYPES[dtype])
    tensors: dict[str, Any] = {}
    total = len(f.modules)
    for i, m in enumerate(f.modules):
        if progress:
            progress(i, total, m.name)
        for e in (m.A, m.B):
            tensors[e.name] = torch.from_numpy(np.asarray(f.tensor(e), dtype=np.float32)).to(tdt)
    if progress:
        progress(total, total, "")
    for e in f.tensors:
        t = torch.from_numpy(np.ascontiguousarray(f.tensor(e)))
        tensors[e.name] = t.to(torch.bfloat16) if e.dtype == "BF16" else t
    return write_adapter(out, tensors, decoded_config(f))


def stderr_progress(label: str, quiet: bool = False) -> Progress:
    """A progress line on stderr that appears only once work has taken more than half a second."""
    import sys

    start: float | None = None
    shown = False

    def report(i: int, n: int, name: str) -> None:
        nonlocal shown, start
        if quiet or n == 0:
            return
        if start is None:
            start = time.monotonic()
        if not shown and time.monotonic() - start < 0.5:
            return
        shown = True
        width = 30
        done = int(width * i / n)
        sys.stderr.write(f"\r{label} [{'#' * done}{'.' * (width - done)}] {i}/{n}")
        if i == n:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return report
