"""What every layout reads into and what it is given: the adapter model, the loaded source file,
and the interface one layout module implements.

A layout is one module of this package with:

* ``NAME`` (``"peft"``, ``"diffusers"``, ``"kohya"``) and ``EXPECTED``, one line saying what a
  file of the layout looks like (for the error on a file no layout recognises);
* ``detect(source) -> float | None``: how sure the layout is that ``source`` is its own (None:
  not at all). Detection looks at tensor names, safetensors metadata and the file's name only;
* ``read(source, *, omega, gamma, alpha) -> Adapter``: every module with its factors and scale,
  ``Adapter.layout`` and ``Adapter.layout_info`` set (what writing it back needs);
* ``write(out, f, specs, info, *, force, inputs, progress) -> list[str]``: write a decoded
  ``.sld`` (``specs``: the decoded tensors by their ``.sld`` names) in the layout, with ``info``
  the file's ``layout_info`` metadata (None or unusable: written from the header alone).

Adding a layout is one module and one line in :data:`deltacodec.layouts.LAYOUTS`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["AdapterModule", "Adapter", "Source", "LAYOUT_NAMES"]

LAYOUT_NAMES = ("peft", "diffusers", "kohya")


@dataclass
class AdapterModule:
    """One adapted module. ΔW (out×in) = scale·sin(ω·B@A)/γ (sine) or scale·B@A (LoRA).

    ``weight_shape`` is None for a linear layer (W is out×in, or in×out with
    ``fan_in_fan_out``). For a convolution with kernel (out, in, kh, kw), A is the down factor
    as (r, in·kh·kw), B the up factor as (out, r), and ``weight_shape`` = (out, in, kh, kw): ΔW
    is the (out × in·kh·kw) product reshaped to it (a contiguous conv weight viewed as 2-D).
    """

    name: str
    A: np.ndarray  # float32 (r, in) — in = in·kh·kw for a conv kernel
    B: np.ndarray  # float32 (out, r)
    scale: float
    sine: bool = False
    omega: float | None = None
    gamma: float | None = None
    fan_in_fan_out: bool = False
    weight_shape: tuple[int, ...] | None = None

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
        """ΔW (out×in) in float64, computed plainly (for tests and reports, not for speed);
        a conv module's ΔW is this matrix reshaped to ``weight_shape``."""
        p = self.B.astype(np.float64) @ self.A.astype(np.float64)
        if self.sine:
            return self.scale * np.sin(self.omega * p) / self.gamma
        return self.scale * p


@dataclass
class Adapter:
    """An adapter in memory: its modules, the tensors kept losslessly, its config, and the
    layout it was read from (``layout_info``: what writing that layout back needs; None for
    PEFT, whose config is ``config``)."""

    modules: list[AdapterModule]
    extras: dict[str, tuple[np.ndarray, str]] = field(default_factory=dict)  # name -> (values, dtype)
    config: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    layout: str = "peft"
    layout_info: dict[str, Any] | None = None

    @property
    def sine(self) -> bool:
        return any(m.sine for m in self.modules)


@dataclass
class Source:
    """An adapter file as loaded, before any layout has given it a meaning.

    ``src`` is what the caller named (a directory or a file), ``weights`` the weights file read,
    ``tensors`` its tensors (name -> (values, safetensors dtype); bfloat16 widened exactly to
    float32), ``metadata`` its safetensors ``__metadata__`` ({} for .bin files), and
    ``config_path`` where a PEFT ``adapter_config.json`` belongs (beside the weights).
    """

    src: str
    weights: str
    tensors: dict[str, tuple[np.ndarray, str]]
    metadata: dict[str, str]
    config_path: str

    @property
    def file_name(self) -> str:
        return os.path.basename(self.weights)


# ----------------------------------------------------------------------------------------------
# layout_info, as decode finds it in a file's metadata (informational: never trusted)


class UnusableInfo(Exception):
    """The file's ``layout_info`` cannot be used to write its layout back; the message says why
    (decode then writes PEFT layout, with a warning)."""


def info_file_name(info: Any, default: str) -> str:
    """``info["file_name"]`` if it is a plain file name ending in .safetensors (no directory
    part, printable, at most 255 bytes), ``default`` when absent; else :class:`UnusableInfo`."""
    name = info.get("file_name", default)
    if (
        not isinstance(name, str)
        or not name.endswith(".safetensors")
        or name != os.path.basename(name)
        or any(c in name for c in "/\\\0")
        or name.startswith(".")
        or not name.isprintable()
        or len(name.encode("utf-8", "replace")) > 255
    ):
        raise UnusableInfo(f"'file_name' is {name!r:.80}, not a plain .safetensors file name")
    return name


def info_metadata(info: Any) -> dict[str, str]:
    """``info["metadata"]`` (the original file's safetensors metadata), a map of str to str."""
    meta = info.get("metadata", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise UnusableInfo("'metadata' is not a map of strings to strings")
    return dict(meta)


def check_info(info: Any, layout: str) -> dict[str, Any]:
    """``info`` if it is a map with the layout's version, else :class:`UnusableInfo`."""
    if not isinstance(info, dict):
        raise UnusableInfo("'layout_info' is missing or not a map")
    if info.get("version") != INFO_VERSION:
        raise UnusableInfo(f"'layout_info' version is {info.get('version')!r:.40}, this reader writes version {INFO_VERSION}")
    return info


INFO_VERSION = 1


def write_one_file(out: str, name: str, tensors: dict[str, Any], meta: dict[str, str], *, force: bool,
                   inputs: Any, progress: Any) -> list[str]:
    """A one-file layout's decoded adapter: ``out`` itself when it ends in .safetensors, else
    ``<out>/<name>`` in a directory that appears whole (both through :mod:`deltacodec.outputs`:
    an existing output needs ``force``, an input is never written over or into)."""
    from ..outputs import atomic_file, staged_directory
    from ..safetensors_io import write_safetensors

    if out.endswith(".safetensors"):
        with atomic_file(out, inputs=inputs, force=force) as fh:
            write_safetensors(fh, tensors, meta, progress=progress)
        return [out]
    with staged_directory(out, inputs=inputs, force=force) as stage:
        with stage.open(name) as fh:
            write_safetensors(fh, tensors, meta, progress=progress)
    return [os.path.join(out, name)]
