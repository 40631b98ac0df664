"""Adapter file layouts: PEFT, diffusers and kohya-ss, one module each behind one interface
(see :mod:`deltacodec.layouts.base`).

:func:`choose` picks the layout of a loaded file (or takes the caller's), refusing a file that
mixes layouts and one no layout recognises, with what was expected; :func:`write_decoded`
writes a decoded ``.sld`` back in the layout its metadata names, in PEFT layout when the
metadata is missing or unusable (metadata is informational: a reader never needs it).
"""

from __future__ import annotations

import dataclasses

import warnings
from typing import Any

from ..errors import AdapterError, DeltacodecWarning, preview
from . import diffusers, kohya, peft
from .base import LAYOUT_NAMES, Adapter, AdapterModule, Source, UnusableInfo
from .peft_config import show_name

__all__ = ["LAYOUTS", "LAYOUT_NAMES", "Adapter", "AdapterModule", "Source", "choose", "read", "write_decoded", "expected"]

# name -> layout module; detection ties go to the earlier one.
LAYOUTS = {"peft": peft, "diffusers": diffusers, "kohya": kohya}


def expected() -> str:
    """What the layouts expect, for an error on a file none of them recognises."""
    return "; ".join(mod.EXPECTED for mod in LAYOUTS.values())


def _unrecognised(source: Source) -> AdapterError:
    names = sorted(source.tensors)
    model = "" if any("lora" in k.lower() for k in names) else ": this looks like a model, not an adapter"
    return AdapterError(
        f"{source.weights}: no lora_A/lora_B pairs{model} ({len(names)} tensor{'s' if len(names) != 1 else ''}: "
        f"{preview(names, limit=3)}); expected one of: {expected()}"
    )


def choose(source: Source, layout: str | None = None) -> Any:
    """The layout module that reads ``source``: ``layout`` when given (one of
    :data:`LAYOUT_NAMES`), else the one whose ``detect`` is surest. A file with both kohya-ss
    and PEFT-style factor keys, or with PEFT-style factors only partly prefixed with a pipeline
    component and no config saying which, is an :class:`AdapterError` naming a key of each."""
    if layout is not None:
        if layout not in LAYOUTS:
            raise AdapterError(f"{source.src}: layout must be one of {', '.join(LAYOUTS)}, got {show_name(layout)}")
        return LAYOUTS[layout]
    kohya_keys = kohya.owned_keys(source)
    peft_keys = sorted(set(peft.factor_keys(source)) | set(diffusers.factor_keys(source)))
    if kohya_keys and peft_keys:
        raise AdapterError(
            f"{source.weights}: mixes LoRA layouts: {show_name(sorted(kohya_keys)[0])} is a kohya-ss key, "
            f"{show_name(peft_keys[0])} a PEFT/diffusers one; a file holds one adapter in one layout"
        )
    scores = {name: mod.detect(source) for name, mod in LAYOUTS.items()}
    found = {name: s for name, s in scores.items() if s is not None}
    if not found:
        raise _unrecognised(source)
    best = max(found, key=lambda n: (found[n], -list(LAYOUTS).index(n)))
    if best == "peft" and found.get("diffusers") is not None and not peft.has_config(source):
        prefixed = [k for k in peft_keys if diffusers.component_of(k)]
        bare = [k for k in peft_keys if not diffusers.component_of(k)]
        raise AdapterError(
            f"{source.weights}: mixes LoRA layouts: {show_name(prefixed[0])} is a diffusers key (prefixed with a "
            f"pipeline component), {show_name(bare[0])} is not; a file holds one adapter in one layout "
            "(--layout peft reads every key as a PEFT module name)"
        )
    return LAYOUTS[best]


def read(source: Source, *, layout: str | None = None, omega: Any = None, gamma: Any = None, alpha: Any = None) -> Adapter:
    """``source`` read by its layout (:func:`choose`)."""
    return choose(source, layout).read(source, omega=omega, gamma=gamma, alpha=alpha)


def _kernel_shaped(f: Any, specs: dict[str, Any]) -> dict[str, Any]:
    """``specs`` with a conv module's factors in their kernel shapes: A (r, in, k...) and B
    (out, r, 1, ...), as PEFT, diffusers and kohya-ss store them (the values stay in order)."""
    out = dict(specs)
    for m in f.modules:
        ws = getattr(m, "weight_shape", None)
        if ws and m.A.name in out and m.B.name in out:
            a, b = out[m.A.name], out[m.B.name]
            out[m.A.name] = dataclasses.replace(a, shape=(m.rank, *ws[1:]))
            out[m.B.name] = dataclasses.replace(b, shape=(m.out_features, m.rank, *([1] * (len(ws) - 2))))
    return out


def write_decoded(f: Any, out: str, specs: dict[str, Any], *, force: bool, inputs: Any, progress: Any) -> list[str]:
    """Write the decoded tensors of the ``.sld`` file ``f`` (``specs``: by their .sld names) in the
    layout its metadata ``layout`` names, with its ``layout_info``; PEFT layout when there is
    none, or (with a :class:`DeltacodecWarning`) when it is not one this version writes or its
    ``layout_info`` cannot be used."""
    specs = _kernel_shaped(f, specs)
    name = f.metadata.get("layout")
    mod: Any = peft
    if name is not None and name != "peft":
        if isinstance(name, str) and name in LAYOUTS:
            mod = LAYOUTS[name]
        else:
            warnings.warn(
                f"{f.path}: metadata 'layout' is {show_name(name) if isinstance(name, str) else type(name).__name__}, "
                f"not one of {', '.join(LAYOUTS)}: writing PEFT layout",
                DeltacodecWarning,
                stacklevel=3,
            )
    if mod is not peft:
        try:
            return mod.write(out, f, specs, f.metadata.get("layout_info"), force=force, inputs=inputs, progress=progress)
        except UnusableInfo as why:
            warnings.warn(
                f"{f.path}: cannot write the {name} layout back ({why}): writing PEFT layout",
                DeltacodecWarning,
                stacklevel=3,
            )
    return peft.write(out, f, specs, None, force=force, inputs=inputs, progress=progress)
