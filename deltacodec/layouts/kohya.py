"""The kohya-ss / A1111 LoRA layout: one ``.safetensors`` file, per module

    <stem>.lora_down.weight   r×in          (conv: r×in×kh×kw)
    <stem>.lora_up.weight     out×r         (conv: out×r×1×1)
    <stem>.alpha              a scalar      scale = alpha / r, per module

where ``<stem>`` is ``lora_unet_``, ``lora_transformer_``, ``lora_te_``, ``lora_te1_``,
``lora_te2_`` or ``lora_te3_`` followed by the module's name with dots as underscores
(``lora_unet_down_blocks_0_attentions_0_proj_in``), and ``ss_*`` training metadata. An
optional ``<stem>.dora_scale`` (DoRA) is kept losslessly; LyCORIS variants (LoHa, LoKr, Tucker
``lora_mid``, ...) are refused.

Module names in the ``.sld`` are the stems, so decode gives the same keys back; ``layout_info``
keeps the file name, the original metadata and the dtype and shape of the alpha scalars (their
values are scale·r, exact: see :func:`_alpha_spec`).

A conv module becomes an :class:`AdapterModule` with ``weight_shape`` (out, in, kh, kw), which
container version 2 records (``ModuleEntry.weight_shape``; encode writes version 2 for such an
adapter): quantized like any module, applied as ΔW reshaped to the kernel, decoded back to the
kernel shapes. (A package whose container could not record kernel shapes kept the three tensors
losslessly instead: the branch stays for that case.)
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections import Counter
from typing import Any

import numpy as np

from ..errors import AdapterError, DecodeError, DeltacodecWarning, preview
from .base import (INFO_VERSION, Adapter, AdapterModule, Source, UnusableInfo, check_info, info_file_name,
                   info_metadata, write_one_file)
from .checks import f32_finite, make_module
from .peft import sine_block
from .peft_config import gamma_for, resolve_settings, show_name, sine_metadata

__all__ = ["NAME", "EXPECTED", "PREFIXES", "KEY", "STEM", "owned_keys", "detect", "read", "write", "component_of", "container_records_kernels"]

NAME = "kohya"
# Prefix -> the pipeline component it adapts (kohya's lora_unet_ is Flux's transformer too:
# apply looks it up as unet first, then transformer).
PREFIXES = {
    "lora_unet": "unet", "lora_transformer": "transformer", "lora_te": "text_encoder", "lora_te1": "text_encoder",
    "lora_te2": "text_encoder_2", "lora_te3": "text_encoder_3",
}
EXPECTED = (
    "kohya-ss (lora_unet_… / lora_transformer_… / lora_te[123]_… stems with .lora_down.weight, .lora_up.weight "
    "and .alpha)"
)
SINE_KEY = "deltacodec"
_PARTS = ("lora_down.weight", "lora_up.weight", "alpha", "dora_scale")
# LyCORIS and other non-LoRA kohya-style parts: claimed (so the file is recognised) and refused.
_OTHER = re.compile(r"(?:hada_|lokr_|lora_mid|diff|ia3|on_input|bias_|w_norm|b_norm)")
STEM = re.compile(r"lora_[A-Za-z0-9]+_[A-Za-z0-9_]+")
KEY = re.compile(r"(?P<stem>lora_[A-Za-z0-9]+_[A-Za-z0-9_]+)\.(?P<part>[A-Za-z0-9_.]+)")
_PREFIX = re.compile(r"(lora_(?:unet|transformer|te[123]?))_.")


def _match(key: str) -> re.Match[str] | None:
    m = KEY.fullmatch(key)
    if m is None or not (m["part"] in _PARTS or _OTHER.match(m["part"])):
        return None
    return m


def owned_keys(source: Source) -> list[str]:
    """Keys named like kohya LoRA parts (<lora_…_stem>.<part>)."""
    return [k for k in source.tensors if _match(k)]


def detect(source: Source) -> float | None:
    return 1.0 if owned_keys(source) else None


def component_of(stem: str) -> str | None:
    """The pipeline component a stem's prefix stands for (None: not a known prefix)."""
    m = _PREFIX.match(stem)
    return PREFIXES[m.group(1)] if m else None


def container_records_kernels() -> bool:
    """Whether the ``.sld`` container this package writes records a module's kernel shape."""
    from ..format import ModuleEntry

    return hasattr(ModuleEntry, "weight_shape")


def _shape_error(wfile: str, stem: str, kd: str, D: tuple[int, ...], ku: str, U: tuple[int, ...]) -> AdapterError:
    return AdapterError(
        f"{wfile}: module '{stem}': '{kd}' is {list(D)} and '{ku}' is {list(U)}; expected down r×in and up out×r "
        "(linear) or down r×in×kh×kw and up out×r×1×1 (conv), with the same r"
    )


def read(source: Source, *, omega: Any = None, gamma: Any = None, alpha: Any = None) -> Adapter:
    wfile = source.weights
    groups: dict[str, dict[str, str]] = {}
    for key in sorted(source.tensors):
        m = _match(key)
        if m is None:
            raise AdapterError(
                f"{wfile}: tensor {show_name(key)} is not a kohya-ss LoRA key (expected <stem>.lora_down.weight, "
                ".lora_up.weight or .alpha, <stem> starting lora_unet_, lora_transformer_ or lora_te…_); a file holds "
                "one layout"
            )
        stem, part = m["stem"], m["part"]
        if component_of(stem) is None:
            raise AdapterError(
                f"{wfile}: tensor {show_name(key)}: unknown kohya-ss prefix; expected the stem to start with "
                + ", ".join(f"{p}_" for p in PREFIXES)
            )
        if part not in _PARTS:
            raise AdapterError(
                f"{wfile}: tensor {show_name(key)} is a LyCORIS (LoHa/LoKr/Tucker/...) part; deltacodec reads plain "
                "LoRA (lora_down, lora_up, alpha) only"
            )
        groups.setdefault(stem, {})[part] = key

    if omega is None and SINE_KEY in source.metadata:
        omega, g = sine_metadata(source.metadata[SINE_KEY], f"{wfile} (metadata '{SINE_KEY}')")
        gamma = g if gamma is None else gamma
    # The overrides, checked as for any layout (no config: a kohya file's alpha is per module).
    st = resolve_settings(None, source.src, src=source.src, omega=omega, gamma=gamma, alpha=alpha)
    alpha_given = st.alpha if st.alpha_override else None

    kernels = container_records_kernels()
    modules: list[AdapterModule] = []
    extras: dict[str, tuple[np.ndarray, str]] = {}
    lossless_conv: list[str] = []
    dora: list[str] = []
    alpha_forms: dict[str, tuple[str, tuple[int, ...]]] = {}
    for stem, parts in groups.items():
        kd, ku, ka = parts.get("lora_down.weight"), parts.get("lora_up.weight"), parts.get("alpha")
        if kd is None or ku is None:
            have = kd or ku or ka or parts.get("dora_scale")
            miss = f"{stem}.lora_down.weight" if kd is None else f"{stem}.lora_up.weight"
            raise AdapterError(f"{wfile}: module '{stem}' has '{have}' but no '{miss}'")
        D, dd = source.tensors[kd]
        U, _ = source.tensors[ku]
        if not ((D.ndim == U.ndim == 2) or (D.ndim == U.ndim == 4 and U.shape[2:] == (1, 1))) or D.shape[0] != U.shape[1]:
            raise _shape_error(wfile, stem, kd, D.shape, ku, U.shape)
        r = D.shape[0]
        if ka is None:
            if alpha_given is None:
                raise AdapterError(
                    f"{wfile}: module '{stem}' has no '{stem}.alpha'; a kohya-ss file gives every module its alpha "
                    "(scale = alpha / r): pass --alpha to set one for every module"
                )
            a = alpha_given
        else:
            av, adt = source.tensors[ka]
            if av.size != 1 or av.ndim > 1:
                raise AdapterError(f"{wfile}: tensor '{ka}' is {list(av.shape)}; an alpha is a scalar (shape [] or [1])")
            alpha_forms[stem] = (adt, tuple(av.shape))
            a = alpha_given if alpha_given is not None else float(av.reshape(-1)[0])
        scale = a / r
        if not f32_finite(scale):
            raise AdapterError(f"{wfile}: module '{stem}': scale = alpha / r = {a:g} / {r} is beyond float32")
        if "dora_scale" in parts:
            kds = parts["dora_scale"]
            extras[kds] = source.tensors[kds]
            dora.append(kds)
        if D.ndim == 4 and not kernels:
            # Version-1 containers cannot record the kernel shape: keep the module as it is.
            for k in (kd, ku) + ((ka,) if ka else ()):
                arr, dt = source.tensors[k]
                extras[k] = (arr.reshape(1) if arr.ndim == 0 else arr, dt)
            lossless_conv.append(stem)
            continue
        weight_shape = (U.shape[0], *D.shape[1:]) if D.ndim == 4 else None
        A = D.reshape(r, -1)
        B = U.reshape(U.shape[0], r)
        gm = gamma_for(st.gamma, A.shape[1]) if st.sine else None
        modules.append(make_module(stem, (kd, A), (ku, B), scale, path=wfile, omega=st.omega if st.sine else None,
                                   gamma=gm, weight_shape=weight_shape))
    if not modules and not lossless_conv:  # pragma: no cover - groups is never empty when detected
        raise AdapterError(f"{wfile}: no kohya-ss LoRA modules")
    notes = list(st.notes)
    if lossless_conv:
        notes.append(
            f"{source.src}: {len(lossless_conv)} conv LoRA modules (e.g. {preview(lossless_conv, limit=3)}) are stored "
            "losslessly, not quantized (this container version cannot record a kernel shape); decode restores "
            "them, apply will refuse them"
        )
    if dora:
        notes.append(
            f"{source.src}: a DoRA adapter ({len(dora)} dora_scale tensors): stored losslessly and decode restores "
            "it, but apply will refuse it (DoRA is not supported by apply)"
        )
    for note in notes:
        warnings.warn(note, DeltacodecWarning, stacklevel=4)  # the caller of read_adapter
    common = Counter(alpha_forms.values()).most_common(1)
    dtype, shape = common[0][0] if common else ("F32", ())
    info = {
        "version": INFO_VERSION,
        "file_name": source.file_name if source.file_name.endswith(".safetensors") else "lora.safetensors",
        "metadata": dict(source.metadata),
        "alpha_dtype": dtype,
        "alpha_shape": list(shape),
        "alpha_other": {s: {"dtype": d, "shape": list(sh)} for s, (d, sh) in alpha_forms.items() if (d, sh) != (dtype, shape)},
    }
    return Adapter(modules=modules, extras=extras, config={}, source=source.src, layout=NAME, layout_info=info)


# ----------------------------------------------------------------------------------------------
# Writing


def _alpha_spec(value: float, dtype: str, shape: list[int]) -> Any:
    """The alpha scalar ``value`` (= scale·r) as a tensor of ``dtype`` and ``shape``.

    scale was alpha/r in float64, so scale·r is within 2 float64 ulps of alpha, an exact value
    of ``dtype`` (at most float64's precision): rounding to ``dtype`` gives alpha back exactly
    (for F64 the product is alpha to within those ulps).
    """
    from ..codec import float32_to_bfloat16_bits
    from ..safetensors_io import TensorSpec

    if dtype == "BF16":
        arr: np.ndarray = float32_to_bfloat16_bits(np.array([value], np.float32))
    else:
        arr = np.array([value], {"F16": np.float16, "F32": np.float32, "F64": np.float64}[dtype])
    return TensorSpec(dtype, tuple(shape), lambda arr=arr: [arr])


def _alpha_form(info: dict[str, Any], stem: str) -> tuple[str, list[int]]:
    other = info.get("alpha_other", {})
    form = other.get(stem) if isinstance(other, dict) else None
    dtype, shape = (form.get("dtype"), form.get("shape")) if isinstance(form, dict) else (info.get("alpha_dtype"), info.get("alpha_shape"))
    if dtype not in ("F16", "F32", "BF16", "F64") or shape not in ([], [1]):
        raise UnusableInfo(f"the alpha dtype/shape of '{stem}' is {dtype!r:.20}/{shape!r:.20}")
    return dtype, shape


def write(out: str, f: Any, specs: dict[str, Any], info: Any, *, force: bool, inputs: Any, progress: Any) -> list[str]:
    """The decoded file with the original keys and metadata: ``<out>/<file name>``, or ``out``
    itself when it ends in .safetensors."""
    from ..safetensors_io import TensorSpec

    info = check_info(info, NAME)
    name = info_file_name(info, "lora.safetensors")
    meta = info_metadata(info)
    bad = [m.name for m in f.modules if not (STEM.fullmatch(m.name) and component_of(m.name))]
    if bad:
        raise UnusableInfo(f"module '{bad[0]}' is not a kohya-ss stem")
    entries: dict[str, Any] = {}

    def put(key: str, spec: Any) -> None:
        if key in entries:
            raise DecodeError(f"{f.path}: two tensors would be written as '{key}'")
        entries[key] = spec

    factor_names = set()
    for m in f.modules:
        a, b = specs[m.A.name], specs[m.B.name]
        factor_names.update((m.A.name, m.B.name))
        ws = tuple(getattr(m, "weight_shape", None) or ())
        conv = len(ws) > 2
        if conv and (ws[0] != m.out_features or math.prod(ws[1:]) != m.in_features):
            raise DecodeError(f"{f.path}: module '{m.name}': kernel shape {list(ws)} does not match {m.out_features}×{m.in_features}")
        put(f"{m.name}.lora_down.weight", TensorSpec(a.dtype, (m.rank, *ws[1:]) if conv else a.shape, a.chunks))
        put(f"{m.name}.lora_up.weight", TensorSpec(b.dtype, (m.out_features, m.rank, 1, 1) if conv else b.shape, b.chunks))
        put(f"{m.name}.alpha", _alpha_spec(m.scale * m.rank, *_alpha_form(info, m.name)))
    for key, spec in specs.items():
        if key in factor_names:
            continue
        stem, _, part = key.partition(".")
        if part == "alpha" and spec.shape == (1,):  # a scalar stored as [1] (version-1 conv modules)
            spec = TensorSpec(spec.dtype, tuple(_alpha_form(info, stem)[1]), spec.chunks)
        put(key, spec)
    meta.pop(SINE_KEY, None)
    block = sine_block(f.modules, f.path)
    if block is not None:
        meta[SINE_KEY] = json.dumps(block, sort_keys=True)
    return write_one_file(out, name, entries, meta, force=force, inputs=inputs, progress=progress)
