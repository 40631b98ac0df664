"""Loading an adapter's weights file into numpy, and the tensor checks every layout shares.

``.safetensors`` files are read without torch: the header by
:func:`deltacodec.safetensors_io.read_header` (bounded, validated before anything is allocated),
each tensor's bytes from its checked byte range. ``.bin`` files need torch and are loaded with
``torch.load(weights_only=True)``: nothing else is ever unpickled.

Refused at load, with the file and the tensor named: names an ``.sld`` file cannot hold or a
terminal would act on, non-float dtypes (checked from the header, before the data is read),
empty tensors, more than :data:`MAX_NDIM` dimensions, sizes beyond the ``.sld`` caps. Scalars
(0-d) are loaded (kohya files keep each module's alpha as one); a layout that would store one as
a tensor refuses it with :func:`check_storable`.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from ..errors import AdapterError
from ..format import MAX_DIM, MAX_NAME_BYTES, MAX_NDIM, MAX_NUMEL
from .base import Source
from .peft_config import show_name

__all__ = [
    "FLOAT_DTYPES",
    "WEIGHT_FILES",
    "check_tensor_name",
    "check_storable",
    "load_source",
    "resolve_files",
    "one_line",
]

FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
_TORCH_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}
_NUMPY = {"F32": "<f4", "F16": "<f2", "F64": "<f8"}
# Weight files a directory may hold, in the order they are looked for: PEFT's, then diffusers'.
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin", "pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")


def one_line(exc: BaseException) -> str:
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


def _check_entry(key: str, dtype: str, shape: tuple[int, ...] | list[int], path: str) -> None:
    """Dtype and shape checks that need no tensor data."""
    if dtype not in FLOAT_DTYPES:
        raise AdapterError(
            f"{path}: tensor {show_name(key)} has dtype {dtype}; expected a float dtype (float32, float16, bfloat16, float64)"
        )
    if len(shape) > MAX_NDIM:
        raise AdapterError(
            f"{path}: tensor {show_name(key)} is {len(shape)}-dimensional; an .sld tensor has 1..{MAX_NDIM} dimensions"
        )
    if 0 in shape:
        raise AdapterError(f"{path}: tensor {show_name(key)} is empty (shape {list(shape)})")
    if shape and (max(shape) > MAX_DIM or math.prod(shape) > MAX_NUMEL):
        raise AdapterError(f"{path}: tensor {show_name(key)} of shape {list(shape)} exceeds the .sld size caps")


def check_storable(key: str, arr: np.ndarray, path: str) -> None:
    """Refuse a tensor an .sld file cannot store as it is (a 0-d scalar)."""
    if arr.ndim == 0:
        raise AdapterError(
            f"{path}: tensor {show_name(key)} is a 0-d (scalar) tensor; an .sld tensor has 1..{MAX_NDIM} dimensions"
        )


def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) widened exactly to float32 (the high half of its bits)."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def _load_safetensors(path: str) -> tuple[dict[str, tuple[np.ndarray, str]], dict[str, str]]:
    """Every tensor of a safetensors file as numpy (no torch), and its metadata."""
    from ..safetensors_io import read_header

    def fail(msg: str) -> AdapterError:
        return AdapterError(f"{path}: cannot read as safetensors: {msg}")

    head = read_header(path, fail)
    for e in head.entries:
        check_tensor_name(e.name, path)
        # From the header, before the data is touched: a non-float or oversized tensor is
        # refused without being read.
        _check_entry(e.name, e.dtype, e.shape, path)
    out: dict[str, tuple[np.ndarray, str]] = {}
    try:
        with open(path, "rb") as fh:
            for e in sorted(head.entries, key=lambda e: e.name):
                fh.seek(e.start)
                raw = fh.read(e.end - e.start)
                if len(raw) != e.end - e.start:
                    raise fail(f"tensor '{e.name}': the file ends inside its data (changed while read?)")
                if e.dtype == "BF16":
                    values = _bf16_to_f32(np.frombuffer(raw, "<u2"))
                else:
                    values = np.frombuffer(raw, _NUMPY[e.dtype]).astype(_NUMPY[e.dtype][1:], copy=True)
                out[e.name] = (values.reshape(e.shape), e.dtype)
    except OSError as exc:
        raise fail(exc.strerror or str(exc)) from None
    return out, dict(head.metadata or {})


def _torch_to_numpy(name: str, t: Any, path: str) -> tuple[np.ndarray, str]:
    import torch

    if t.layout != torch.strided or t.is_quantized:
        raise AdapterError(f"{path}: tensor {show_name(name)} is a {t.layout} / quantized tensor; expected a dense one")
    dtype = _TORCH_DTYPES.get(str(t.dtype).replace("torch.", ""), str(t.dtype).replace("torch.", ""))
    _check_entry(name, dtype, tuple(t.shape), path)
    try:
        arr = t.detach().to("cpu")
        values = arr.float().numpy() if t.dtype == torch.bfloat16 else arr.numpy()
    except RuntimeError as exc:
        raise AdapterError(f"{path}: tensor {show_name(name)} cannot be read as an array: {one_line(exc)}") from None
    return np.array(values, order="C"), dtype  # not ascontiguousarray: that makes a 0-d array 1-d


def _load_bin(path: str) -> dict[str, tuple[np.ndarray, str]]:
    from ..extras import require

    torch = require("torch", f"{path}: reading a .bin (torch pickle) adapter file")
    try:
        # weights_only: plain tensors and containers; nothing else is ever unpickled.
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise AdapterError(f"{path}: cannot load as a weights-only torch file: {one_line(exc)}") from None
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


def resolve_files(src: str) -> tuple[str, str]:
    """(weights file, path where its PEFT adapter_config.json would be) for a directory or a file."""
    if os.path.isdir(src):
        for fname in WEIGHT_FILES:
            p = os.path.join(src, fname)
            if os.path.isfile(p):
                return p, os.path.join(src, "adapter_config.json")
        raise AdapterError(f"{src}: no {', '.join(WEIGHT_FILES[:-1])} or {WEIGHT_FILES[-1]} in the directory")
    if os.path.isfile(src):
        if not (src.endswith(".safetensors") or src.endswith(".bin")):
            raise AdapterError(f"{src}: expected an adapter directory, a .safetensors or a .bin file")
        return src, os.path.join(os.path.dirname(os.path.abspath(src)), "adapter_config.json")
    if os.path.lexists(src):
        raise AdapterError(f"{src}: not a regular file or directory")
    raise AdapterError(f"{src}: no such file or directory")


def load_source(src: str) -> Source:
    """Find and load the weights file of ``src`` (every tensor finite, named and typed as an
    .sld file can hold, checked here)."""
    wfile, cfg_path = resolve_files(src)
    if wfile.endswith(".safetensors"):
        tensors, meta = _load_safetensors(wfile)
    else:
        tensors, meta = _load_bin(wfile), {}
    if not tensors:
        raise AdapterError(f"{wfile}: the adapter holds no tensors")
    for key, (arr, _) in tensors.items():
        if not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr)).sum())
            raise AdapterError(f"{wfile}: tensor {show_name(key)} has {bad} NaN/Inf values")
    return Source(src=src, weights=wfile, tensors=tensors, metadata=meta, config_path=cfg_path)
