"""Patching a loaded model with an ``.sld`` file: ``deltacodec.apply``.

For each module in the file: W += scale·sin(ω·Q(B)Q(A))/γ (LoRA: scale·Q(B)Q(A)), transposed
when ``fan_in_fan_out``, in place, the sum formed in fp32 and rounded once to W's dtype. The
work per module is done by :func:`deltacodec.kernels.delta_add` (a Triton kernel for CUDA
weights, a chunked in-place torch path elsewhere).

Guarantees:

* One weight, one delta: the file's entries are mapped to model tensors by name
  (:func:`resolve_names`, shared with ``sld apply``) and then by storage; two entries reaching
  the same tensor are refused, in every mode.
* Nothing is touched until every check has passed: names, shapes, dtypes, devices, the file's
  sections, replacements finite in the target dtype, live handles on the same weights.
* A failure midway (W + ΔW not finite in W's dtype, out of memory, ...) restores every weight
  already patched, in reverse order, bit-exactly, and raises :class:`ApplyError`.
* :meth:`AppliedAdapter.remove` restores bit-exactly, in reverse order; handles that patched
  the same weights must be removed last-applied-first (otherwise :class:`ApplyError`).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Collection, Iterator

import numpy as np

from .errors import ApplyError, DeltacodecWarning, SldError, preview
from .format import ModuleEntry, SldFile, TensorEntry, open_sld

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "apply",
    "AppliedAdapter",
    "NameMap",
    "resolve_names",
    "resolve_targets",
    "resolve_extras",
    "packed_factor",
    "content_fingerprint",
    "unusable_reason",
]

_PEFT_PREFIX = "base_model.model."
_WEIGHT_DTYPES = ("float32", "float16", "bfloat16")
#: PEFT wraps a layer once per tuner (LoRA inside a ModulesToSave wrapper, ...): how many
#: ``base_layer`` hops :func:`resolve_names` follows from a module name to its weight.
_MAX_BASE_LAYERS = 4


def _candidates(name: str) -> list[str]:
    """Model-side names a header name may stand for: as is, without or with PEFT's prefix."""
    out = [name]
    if name.startswith(_PEFT_PREFIX):
        out.append(name[len(_PEFT_PREFIX):])
    else:
        out.append(_PEFT_PREFIX + name)
    return out


# --------------------------------------------------------------------------------------------
# Names: file entries -> model tensor names
# --------------------------------------------------------------------------------------------


@dataclass
class NameMap:
    """Where each entry of a file lands in a model (see :func:`resolve_names`).

    ``modules``: (module entry, name of the weight its delta is added to), e.g.
    ``"model.layers.0.self_attn.q_proj.weight"`` (or ``"...q_proj.base_layer.weight"`` in a
    PEFT-wrapped model). ``tensors``: (stored tensor, name of the tensor it replaces).
    ``missing_modules`` / ``missing_tensors``: entries with no tensor of a matching name.
    Every name appears at most once across ``modules`` and ``tensors``.
    """

    modules: list[tuple[ModuleEntry, str]] = field(default_factory=list)
    tensors: list[tuple[TensorEntry, str]] = field(default_factory=list)
    missing_modules: list[ModuleEntry] = field(default_factory=list)
    missing_tensors: list[TensorEntry] = field(default_factory=list)


def _weight_name(module_name: str, names: Collection[str]) -> str | None:
    """The name of the weight a module entry patches: ``<candidate>.weight``, following PEFT's
    ``base_layer`` wrappers (``<candidate>.base_layer.weight``)."""
    for c in _candidates(module_name):
        prefix = c
        for _ in range(_MAX_BASE_LAYERS + 1):
            if prefix + ".weight" in names:
                return prefix + ".weight"
            prefix += ".base_layer"
    return None


def resolve_names(f: SldFile, names: Collection[str]) -> NameMap:
    """Map ``f``'s entries onto the tensor names of a model or checkpoint.

    ``names``: every tensor name the target holds (a checkpoint's keys, or a model's parameter
    and buffer names, tied ones included); a set or dict makes the lookups O(1).

    A module entry ``m`` patches ``m.weight`` (with or without PEFT's ``base_model.model.``
    prefix, and through ``base_layer`` wrappers); a stored tensor ``t`` replaces ``t`` (same
    prefix rule). Raises :class:`ApplyError`, whatever the caller's strictness, when two
    entries reach the same name (modules ``base_model.model.lin`` and ``lin``; module ``lin``
    and tensor ``lin.weight``) or a stored tensor is named like a module's LoRA factor
    (``lin.lora_A.weight`` beside module ``lin``): the delta would be applied twice, or it is
    ambiguous which of the two is meant. Entries with no matching name are returned as missing;
    shapes and dtypes are the caller's to check.
    """
    out = NameMap()
    owner: dict[str, str] = {}  # tensor name -> the entry that claimed it, for the message

    def claim(key: str, what: str) -> None:
        if key in owner:
            raise ApplyError(
                f"{f.path}: {owner[key]} and {what} both resolve to the model tensor '{key}': "
                "one weight takes one delta, so this file cannot be applied; no weight was changed"
            )
        owner[key] = what

    factor_of: dict[str, str] = {}
    for e in f.modules:
        for c in _candidates(e.name):
            for factor in ("lora_A", "lora_B"):
                factor_of[f"{c}.{factor}.weight"] = e.name
    for e in f.modules:
        key = _weight_name(e.name, names)
        if key is None:
            out.missing_modules.append(e)
            continue
        claim(key, f"module '{e.name}'")
        out.modules.append((e, key))
    for t in f.tensors:
        module = next((factor_of[c] for c in _candidates(t.name) if c in factor_of), None)
        if module is not None:
            raise ApplyError(
                f"{f.path}: stored tensor '{t.name}' is named like a LoRA factor of module "
                f"'{module}', which the file also holds: one weight takes one delta, so this file "
                "cannot be applied; no weight was changed"
            )
        key = next((c for c in _candidates(t.name) if c in names), None)
        if key is None:
            out.missing_tensors.append(t)
            continue
        claim(key, f"stored tensor '{t.name}'")
        out.tensors.append((t, key))
    return out


def unusable_reason(name: str) -> str:
    """Why apply cannot use a stored extra tensor that matches no model tensor."""
    if name.endswith("lora_magnitude_vector") or ".lora_magnitude_vector." in name:
        return "a DoRA magnitude vector (DoRA is not supported by apply)"
    if ".lora_B.bias" in name or ".lora_A.bias" in name:
        return "a LoRA bias (lora_bias=True is not supported by apply)"
    return "no model tensor of that name"


# --------------------------------------------------------------------------------------------
# Targets in an in-memory model
# --------------------------------------------------------------------------------------------


@dataclass
class _Target:
    entry: ModuleEntry
    key: str  # the weight's parameter name
    weight: "torch.Tensor"
    A: Any = None  # PackedFactor (CPU), read and validated before any weight changes
    B: Any = None


@dataclass
class _Replacement:
    """A losslessly stored tensor that takes the place of a model tensor (PEFT modules_to_save)."""

    entry: TensorEntry
    name: str
    tensor: "torch.Tensor"
    value: "torch.Tensor | None" = None  # decoded, cast to the tensor's dtype, checked finite


def _model_tensors(model: "torch.nn.Module") -> dict[str, "torch.Tensor"]:
    """Every parameter and buffer by name, tied ones under each of their names."""
    named: dict[str, torch.Tensor] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        named.setdefault(n, p)
    for n, b in model.named_buffers(remove_duplicate=False):
        if b is not None:
            named.setdefault(n, b)
    return named


def _kernel_shape(e: ModuleEntry) -> tuple[int, ...] | None:
    """A conv module's weight shape (out, in, kh, ...) when the container records one (kohya
    conv LoRA: A is r × in·kh·kw, ΔW is B@A reshaped to it); None for a linear module."""
    ws = getattr(e, "weight_shape", None)
    return tuple(int(n) for n in ws) if ws else None


def _weight_problem(e: ModuleEntry, key: str, w: "torch.Tensor") -> str | None:
    """Why the tensor ``key`` cannot take module ``e``'s delta (None if it can)."""
    ws = _kernel_shape(e)
    if ws is not None:
        if not w.dtype.is_floating_point or tuple(w.shape) != ws:
            return f"{e.name}: '{key}' is a {w.dtype} {list(w.shape)} tensor, the file needs a float weight of shape {list(ws)}"
        if e.fan_in_fan_out or ws[0] != e.out_features or math.prod(ws[1:]) != e.in_features:
            return (f"{e.name}: the file's kernel shape {list(ws)} does not match its factors "
                    f"(out {e.out_features}, in·kernel {e.in_features}, fan_in_fan_out {e.fan_in_fan_out})")
    elif not w.dtype.is_floating_point or w.dim() != 2:
        return f"{e.name}: '{key}' is a {w.dim()}-D {w.dtype} tensor, expected a 2-D float weight"
    want = ws or ((e.in_features, e.out_features) if e.fan_in_fan_out else (e.out_features, e.in_features))
    if tuple(w.shape) != want:
        layout = "in×out (fan_in_fan_out)" if e.fan_in_fan_out else "out×in"
        return f"{e.name}: weight '{key}' is {list(w.shape)}, the file needs {list(want)} ({layout})"
    if str(w.dtype).replace("torch.", "") not in _WEIGHT_DTYPES:
        return f"{e.name}: weight '{key}' dtype {w.dtype} is not float32, float16 or bfloat16"
    if w.device.type == "meta":
        return f"{e.name}: weight '{key}' is on the meta device (not loaded: no values to patch)"
    if w.device.type not in ("cpu", "cuda"):
        return f"{e.name}: weight '{key}' is on {w.device}, expected cpu or cuda"
    return None


def _tensor_problem(t: TensorEntry, key: str, w: "torch.Tensor") -> str | None:
    if tuple(w.shape) != tuple(t.shape) or not w.dtype.is_floating_point:
        return f"{t.name}: '{key}' is {w.dtype} {list(w.shape)}, the file holds {list(t.shape)}"
    if w.device.type == "meta":
        return f"{t.name}: '{key}' is on the meta device (not loaded: no values to replace)"
    if w.device.type not in ("cpu", "cuda"):
        return f"{t.name}: '{key}' is on {w.device}, expected cpu or cuda"
    return None


def _module_problem(model_modules: dict[str, Any], e: ModuleEntry) -> str | None:
    """For a module entry with no weight of a matching name: why, if the module itself exists."""
    hit = next((c for c in _candidates(e.name) if c in model_modules), None)
    if hit is None:
        return None
    return f"{e.name}: '{hit}' has no 2-D weight ({type(model_modules[hit]).__name__})"


def resolve_targets(model: "torch.nn.Module", f: SldFile) -> tuple[list[_Target], list[str], list[str]]:
    """Map the file's modules onto ``model``: (targets, missing, mismatched-with-reason).

    A PEFT LoRA layer (anything with a ``base_layer``) is patched through its base layer, so the
    same file applies to a bare transformers model, a PEFT-wrapped one, or any module tree with
    matching names. Raises :class:`ApplyError` on entries that collide (:func:`resolve_names`).
    """
    r = _resolve(model, f)
    return r.targets, r.missing, [why for _, why in r.mismatched]


def resolve_extras(model: "torch.nn.Module", f: SldFile) -> tuple[list[_Replacement], list[str]]:
    """Map the file's losslessly stored tensors onto ``model``: (replacements, problems).

    A stored tensor whose name (with or without PEFT's prefix) is a parameter or buffer of the
    model with the same shape replaces it: that is how PEFT saves ``modules_to_save``. Anything
    else (DoRA magnitudes, LoRA biases) cannot be applied as a weight update and is a problem.
    """
    r = _resolve(model, f)
    return r.replacements, [why for _, why in r.unusable]


@dataclass
class _Resolved:
    targets: list[_Target] = field(default_factory=list)
    replacements: list[_Replacement] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # module entries with no such module
    mismatched: list[tuple[str, str]] = field(default_factory=list)  # (module entry, why)
    unusable: list[tuple[str, str]] = field(default_factory=list)  # (stored tensor, why)


def _resolve(model: "torch.nn.Module", f: SldFile) -> _Resolved:
    """Where ``f``'s entries land in ``model``, and why the others cannot be applied."""
    named = _model_tensors(model)
    names = resolve_names(f, named)
    modules = dict(model.named_modules(remove_duplicate=False))
    r = _Resolved()
    for e in names.missing_modules:
        why = _module_problem(modules, e)
        (r.mismatched.append((e.name, why)) if why else r.missing.append(e.name))
    for e, key in names.modules:
        why = _weight_problem(e, key, named[key])
        (r.mismatched.append((e.name, why)) if why else r.targets.append(_Target(e, key, named[key])))
    for t in names.missing_tensors:
        r.unusable.append((t.name, f"{t.name}: {unusable_reason(t.name)}"))
    for t, key in names.tensors:
        why = _tensor_problem(t, key, named[key])
        (r.unusable.append((t.name, why)) if why else r.replacements.append(_Replacement(t, key, named[key])))
    return r


def _storage_span(t: "torch.Tensor") -> tuple[str, int, int] | None:
    """(device, first byte, end byte) of the memory ``t`` can reach; None if it holds none."""
    if t.numel() == 0:
        return None
    try:
        start = t.untyped_storage().data_ptr() + t.storage_offset() * t.element_size()
    except Exception:  # tensor subclasses without a plain storage: fall back to the object
        return (f"object:{id(t)}", 0, 1)
    extent = 1 + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()))
    return (str(t.device), start, start + extent * t.element_size())


def _check_distinct(f: SldFile, jobs: list[tuple[str, str, "torch.Tensor"]]) -> None:
    """Refuse two entries whose tensors share memory (tied weights: one Parameter under two
    names, or views of one buffer): the names differ, the weight is the same."""
    spans = []
    for what, key, t in jobs:
        span = _storage_span(t)
        if span is not None:
            spans.append((span, what, key))
    spans.sort(key=lambda s: s[0])
    for (a, what_a, key_a), (b, what_b, key_b) in zip(spans, spans[1:]):
        if a[0] == b[0] and b[1] < a[2]:
            raise ApplyError(
                f"{f.path}: {what_a} (model tensor '{key_a}') and {what_b} (model tensor "
                f"'{key_b}') reach the same weight (tied or shared tensors): one weight takes one "
                "delta, so this file cannot be applied; no weight was changed"
            )


def packed_factor(f: SldFile, entry: TensorEntry, device: "torch.device | str"):
    """A factor in the kernels' layout (packed stream + float32 codebook, or float16 values)."""
    import torch

    from .kernels import PackedFactor

    if entry.encoding == "codebook":
        # One decode: the reader unpacks and validates the indices (index range, zero padding;
        # rANS symbols for a version-2 tensor). Packing them again at the entry's width gives a
        # version-1 section's stream bit for bit (the packing is a bijection once the padding is
        # zero), without a second read, CRC and entropy pass of the section.
        from .pack import pack_indices

        indices, codebook = f.kernel_factor(entry)
        stream = pack_indices(indices, entry.width)
        if not np.isfinite(codebook).all():  # float16 value × float32 scale can overflow
            raise ApplyError(f"{f.path}: tensor '{entry.name}': the codebook times its scale is not finite in float32")
        data = torch.from_numpy(stream).to(device)
        cb = torch.from_numpy(codebook.copy()).to(device)
        return PackedFactor(data, cb, entry.bits, entry.width, tuple(entry.shape))
    values = f.raw_array(entry)
    if entry.dtype not in ("F16", "BF16", "F32"):
        # The kernels take codebooks or fp16/bf16/fp32 pass-through; rounding an F64 factor to
        # float32 would silently change it.
        raise ApplyError(f"{f.path}: tensor '{entry.name}' is raw {entry.dtype}; apply supports codebook, F16, BF16 "
                         "and F32 factors")
    data = torch.from_numpy(values.copy())
    if entry.dtype == "BF16":  # the reader widened it to float32 exactly; narrowing back is exact too
        data = data.to(torch.bfloat16)
    return PackedFactor(data.to(device), None, 16, 16, tuple(entry.shape))


def _replacement_value(f: SldFile, r: _Replacement) -> "torch.Tensor":
    """The stored tensor cast to the target's dtype, refused unless every value stays finite."""
    import torch

    src = torch.from_numpy(np.ascontiguousarray(f.tensor(r.entry)))
    value = src.to(r.tensor.dtype)
    if not bool(torch.isfinite(value).all()):
        largest = float(src.double().abs().max())
        dt = str(r.tensor.dtype).removeprefix("torch.")
        raise ApplyError(
            f"{f.path}: stored tensor '{r.entry.name}' cannot replace '{r.name}': its largest "
            f"|value| {largest:.6g} is not finite in {dt} (at most {torch.finfo(r.tensor.dtype).max:.6g}); "
            "no weight was changed"
        )
    return value


# --------------------------------------------------------------------------------------------
# PEFT layers that already act on a weight
# --------------------------------------------------------------------------------------------


def _peft_layers(model_modules: dict[str, Any], key: str) -> Iterator[tuple[str, Any]]:
    """(name, layer) of every PEFT tuner layer that wraps ``key``'s weight:
    ``x.q_proj.base_layer.weight`` -> ``x.q_proj``; one more per nested ``base_layer``."""
    parts = key.split(".")[:-1]
    while parts and parts[-1] == "base_layer":
        parts.pop()
        name = ".".join(parts)
        yield name, model_modules.get(name)


def _peft_activity(layer: Any) -> list[str]:
    """What a PEFT tuner layer adds to its base weight: merged adapters (already in W) and
    active, unmerged adapters whose delta is not zero (added in forward)."""
    if layer is None:
        return []
    found = [f"'{a}' merged" for a in (getattr(layer, "merged_adapters", None) or [])]
    try:
        active = list(getattr(layer, "active_adapters", None) or [])
        disabled = bool(getattr(layer, "disable_adapters", False))
    except Exception:  # a tuner of an unknown shape: say nothing rather than fail the apply
        return found
    if disabled:
        return found
    merged = set(getattr(layer, "merged_adapters", None) or [])
    lora_b = getattr(layer, "lora_B", None)
    for a in active:
        if a in merged:
            continue
        b = lora_b[a] if lora_b is not None and a in lora_b else None
        w = getattr(b, "weight", None)
        if w is not None and w.device.type != "meta" and not bool(w.detach().any()):
            continue  # B = 0: ΔW = 0 for LoRA and sine-LoRA alike, nothing would count twice
        found.append(f"'{a}' active")
    return found


def _warn_peft(f: SldFile, model: "torch.nn.Module", targets: list[_Target]) -> None:
    modules = dict(model.named_modules(remove_duplicate=False))
    hits = []
    for t in targets:
        for name, layer in _peft_layers(modules, t.key):
            acts = _peft_activity(layer)
            if acts:
                hits.append(f"{name} ({', '.join(acts)})")
    if hits:
        warnings.warn(
            f"{f.path}: {len(hits)} patched weight(s) also carry PEFT adapters: {preview(hits, '; ')}. "
            "If one of them is the adapter in this file, its delta now counts twice: merged adapters "
            "are in W already, active ones are added in forward (unload them, or apply to the base "
            "model instead)",
            DeltacodecWarning,
            stacklevel=3,
        )


# --------------------------------------------------------------------------------------------
# Live handles: which applied adapters each weight carries
# --------------------------------------------------------------------------------------------


def content_fingerprint(f: SldFile) -> str:
    """A digest of everything :func:`apply` would add or write: module names, kinds, scalars,
    shapes, codebooks and every section's CRC-32 and length (so two copies of a file, or a
    re-encoding byte for byte equal, match; the path and the metadata do not count)."""
    h = hashlib.sha256()

    def tensor_key(t: TensorEntry) -> tuple:
        return (t.name, t.shape, t.encoding, t.bits, t.width, t.dtype, t.codebook_f16,
                t.codebook_scale, t.compression, t.length, t.crc32)

    for m in f.modules:
        h.update(repr(("M", m.name, m.sine, m.scale, m.omega, m.gamma, m.fan_in_fan_out,
                       tensor_key(m.A), tensor_key(m.B))).encode())
    for t in f.tensors:
        h.update(repr(("T", tensor_key(t))).encode())
    return h.hexdigest()


@dataclass(eq=False)  # compared by identity
class _Record:
    """One applied handle, as the weights it patched know it."""

    label: str
    fingerprint: str
    removable: bool  # False for keep_original=False: the delta is there for good


@dataclass
class _Stack:
    """The handles a weight carries, oldest first, and the weight's state right after the last
    write by deltacodec: a different state means someone else wrote into it since (an optimizer
    step, load_state_dict, ``param.data = ...``), and the stack no longer describes it."""

    records: list[_Record]
    state: tuple


def _state(t: "torch.Tensor") -> tuple:
    try:
        version = t._version
    except RuntimeError:  # inference tensors have no version counter
        version = None
    return (version, t.data_ptr(), t.dtype, tuple(t.shape))


_registry_by_tensor: "Any" = None
_counter = itertools.count(1)


def _registry():
    """Weight -> _Stack, keyed by the tensor object's identity and held weakly, so that a
    patched model can still be garbage-collected (torch's WeakIdKeyDictionary: a plain
    WeakKeyDictionary would call Tensor.__eq__, which compares values)."""
    global _registry_by_tensor
    if _registry_by_tensor is None:
        from torch.utils.weak import WeakIdKeyDictionary

        _registry_by_tensor = WeakIdKeyDictionary()
    return _registry_by_tensor


def _live(t: "torch.Tensor") -> list[_Record]:
    """The records on ``t`` still valid: dropped when ``t`` was written by someone else."""
    reg = _registry()
    stack = reg.get(t)
    if stack is None:
        return []
    if stack.state != _state(t):
        del reg[t]
        return []
    return stack.records


def _touched(t: "torch.Tensor", push: _Record | None = None, pop: _Record | None = None) -> None:
    """Record a write by deltacodec into ``t`` (after :func:`_live` was consulted for it)."""
    reg = _registry()
    stack = reg.get(t)
    if stack is None:
        if push is None:
            return
        stack = reg[t] = _Stack([], ())
    if pop is not None:
        stack.records = [r for r in stack.records if r is not pop]
    if push is not None:
        stack.records.append(push)
    if stack.records:
        stack.state = _state(t)
    else:
        del reg[t]


def _check_live(f: SldFile, jobs: list[tuple[str, str, "torch.Tensor"]], fingerprint: str, allow_stacking: bool) -> None:
    """Refuse the same content on a weight that already carries it; warn when stacking."""
    same: dict[str, list[str]] = {}
    other: dict[str, list[str]] = {}
    for _what, key, t in jobs:
        for r in _live(t):
            label = r.label + ("" if r.removable else " (keep_original=False: permanent)")
            (same if r.fingerprint == fingerprint else other).setdefault(label, []).append(key)
    if allow_stacking:
        return
    if same:
        label, keys = next(iter(same.items()))
        raise ApplyError(
            f"{f.path}: already applied to {len(keys)} of these weights by {label} (e.g. '{keys[0]}'): "
            "applying the same content again would add its delta twice; remove that handle first, "
            "or pass allow_stacking=True; no weight was changed"
        )
    if other:
        parts = [f"{label} on {len(keys)} weight(s) (e.g. '{keys[0]}')" for label, keys in other.items()]
        warnings.warn(
            f"{f.path}: stacking on weights that already carry another applied adapter: "
            f"{'; '.join(parts)}. Both deltas now count; remove the handles last-applied-first "
            "(pass allow_stacking=True to silence this)",
            DeltacodecWarning,
            stacklevel=3,
        )


# --------------------------------------------------------------------------------------------
# Writing without copies (keep_original=False)
# --------------------------------------------------------------------------------------------


def _write_plan(f: SldFile, targets: list[_Target], keep_original: bool) -> tuple[list[_Target], list[_Target]]:
    """(targets written with a copy of the weight kept first, targets written without one).

    With ``keep_original=True`` every weight is copied (the handle keeps the copies). Without,
    a weight is written uncopied only when :func:`deltacodec.kernels.finite_by_bound` proves
    every sum finite in its dtype (one reduction over W, no copy): what is left to fail then is
    the machine, not the data. Weights near the top of their dtype's range, or holding inf/NaN,
    are copied and patched first, with the sums checked as they are formed, so an overflow still
    rolls back every weight and changes nothing."""
    from . import kernels

    if keep_original:
        return list(targets), []
    cloned, uncopied = [], []
    for t in targets:
        e = t.entry
        try:
            proven = kernels.finite_by_bound(
                _as_matrix(t.weight, e), t.A, t.B, scale=e.scale, gamma=e.gamma if e.sine else 1.0, sine=e.sine,
                fan_in_fan_out=e.fan_in_fan_out, name=f"module '{e.name}' (weight '{t.key}')",
            )
        except ApplyError as exc:
            raise ApplyError(f"{f.path}: {exc}; no weight was changed") from None
        (uncopied if proven else cloned).append(t)
    return cloned, uncopied


def _as_matrix(w: "torch.Tensor", e: ModuleEntry) -> "torch.Tensor":
    """The 2-D weight the kernels patch: ``w`` itself for a linear module; for a conv module the
    (out, in·kh·kw) view of its kernel (the layout B@A has), or a contiguous copy when the
    kernel's memory layout has no such view (channels_last): then the caller copies it back."""
    if _kernel_shape(e) is None:
        return w
    try:
        return w.view(w.shape[0], -1)
    except RuntimeError:
        return w.contiguous().view(w.shape[0], -1)


class _interrupts_deferred:
    """Hold SIGINT (Ctrl-C) while weights are written without copies, and raise the
    KeyboardInterrupt once they are all written: the adapter is then applied whole instead of in
    part. Only the main thread receives signals, so elsewhere this does nothing."""

    def __enter__(self) -> "_interrupts_deferred":
        import signal
        import threading

        self.pending = False
        self.installed = False
        if threading.current_thread() is threading.main_thread():
            try:
                self.previous = signal.signal(signal.SIGINT, self._hold)
                self.installed = True
            except (ValueError, OSError, TypeError):  # no signal support here (embedded interpreters)
                pass
        return self

    def _hold(self, signum: int, frame: Any) -> None:
        self.pending = True

    def __exit__(self, *exc: Any) -> None:
        import signal

        if self.installed:
            # None: the previous handler was not installed from Python; the default one is
            # what an interpreter without one of its own would have.
            signal.signal(signal.SIGINT, self.previous if self.previous is not None else signal.default_int_handler)
        if self.pending and exc[0] is None:
            raise KeyboardInterrupt


# --------------------------------------------------------------------------------------------
# The handle and apply()
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)  # a handle is itself: compared by identity, not by its tensors
class AppliedAdapter:
    """Handle returned by :func:`apply`. ``remove()`` restores the original weights bit-exactly.

    Also a context manager: ``with deltacodec.apply(model, "a.sld"): ...`` removes on exit.
    ``missing`` and ``unexpected`` list the file's modules that were not patched (strict=False).
    ``source`` is the file's path, ``label`` how errors and warnings name this handle.
    """

    patched: list[str]
    missing: list[str]
    unexpected: list[str]
    backends: dict[str, str]
    source: str = ""
    label: str = ""
    _originals: list[tuple["torch.Tensor", "torch.Tensor"]] = field(default_factory=list, repr=False)
    _record: _Record | None = field(default=None, repr=False)
    _removed: bool = field(default=False, repr=False)

    def remove(self) -> None:
        """Put every patched weight back exactly as it was before :func:`apply`.

        Weights patched by several handles are restored last-applied-first: removing this
        handle while a handle applied after it on one of the same weights is still applied
        raises :class:`ApplyError` naming that handle, and changes nothing (restoring this
        handle's copy would silently drop the later delta, and subtracting this delta instead
        is not exact once W has been rounded to fp16/bf16). Calling it again does nothing.
        """
        if self._removed:
            return
        where = self.label or self.source  # the label names the file
        if not self._originals and self.patched:
            raise ApplyError(f"{where}: applied with keep_original=False: it cannot be removed")
        later: dict[str, str] = {}
        for w, orig in self._originals:
            if (w.shape, w.dtype, w.device) != (orig.shape, orig.dtype, orig.device):
                raise ApplyError(
                    f"{where}: a patched weight is now {w.dtype} {list(w.shape)} on {w.device}, it "
                    f"was {orig.dtype} {list(orig.shape)} on {orig.device}: it was converted or "
                    "replaced after apply, so it cannot be restored; nothing was changed"
                )
            records = _live(w)
            if any(r is self._record for r in records):
                for r in records[records.index(self._record) + 1:]:
                    later[r.label] = r.label + ("" if r.removable else " (keep_original=False: permanent)")
        if later:
            raise ApplyError(
                f"{where}: cannot be removed while {', '.join(later.values())}, applied after it to "
                "the same weights, is still applied: remove handles last-applied-first (with "
                "blocks nest that way); nothing was changed"
            )
        import torch

        with torch.no_grad():
            for w, orig in reversed(self._originals):
                w.copy_(orig)
        for w, _ in self._originals:  # after every write: views of one buffer share a version counter
            _touched(w, pop=self._record)
        self._originals.clear()
        self._removed = True

    def __enter__(self) -> "AppliedAdapter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __iter__(self):
        """Unpacks as ``missing, unexpected``, like ``load_state_dict``'s result."""
        return iter((self.missing, self.unexpected))


def apply(
    model: "torch.nn.Module",
    source: str | os.PathLike[str] | SldFile,
    *,
    strict: bool = True,
    backend: str = "auto",
    keep_original: bool = True,
    max_decoded_bytes: int | None = None,
    allow_stacking: bool = False,
) -> AppliedAdapter:
    """Add the adapter in ``source`` (an ``.sld`` path or a loaded file) into ``model``'s weights.

    For each module: W (out×in, or in×out with fan_in_fan_out) += ΔW, formed in fp32 and rounded
    once to W's dtype (fp32/fp16/bf16), on W's device. ``backend``: "auto" (Triton for CUDA
    weights, torch otherwise; the DELTACODEC_BACKEND environment variable overrides), "torch" or
    "triton". ``max_decoded_bytes``: the reader's limit on what the file may decode to (see
    :class:`SldFile`); an already loaded ``source`` is checked against it too.

    Tensors the file stores losslessly replace the model tensor of the same name and shape (PEFT's
    ``modules_to_save``); DoRA magnitudes and LoRA biases cannot be applied and count as mismatched.

    ``strict=True``: every module in the file must exist in the model with a matching 2-D weight;
    one :class:`ApplyError` lists everything missing or mismatched before any weight is touched.
    ``strict=False``: patch what matches; the handle's ``missing``/``unexpected`` say the rest
    (``missing, unexpected = deltacodec.apply(..., strict=False)`` also works), and a
    :class:`DeltacodecWarning` says so when nothing matched at all.

    Refused in every mode, before any weight changes (:class:`ApplyError`): two entries that reach
    the same weight (by name or by storage: tied weights); a replacement or a sum W + ΔW that is
    not finite in the weight's dtype (the sums are checked as they are formed, and the weights
    already patched are restored); this same content again on weights that carry it from a
    handle still applied, unless ``allow_stacking=True``. A different adapter on such weights is
    stacked with a :class:`DeltacodecWarning` (silenced by ``allow_stacking=True``), as is a
    patch of a weight under a PEFT layer whose adapters are merged or active.

    Errors: :class:`ApplyError` for everything about applying (each names the file and the module
    or tensor), :class:`~deltacodec.SldFormatError` and its subclasses for a malformed or corrupt
    file (every section is read and checked before the first weight changes).

    Memory: with ``keep_original=True`` (default) the handle keeps a copy of every patched weight,
    on its device, so ``remove()`` can restore it bit-exactly — for a LLaMA-3-8B q,k,v,up,down
    adapter that is ~4.4 GB in bf16. ``keep_original=False`` copies nothing for weights whose
    sums it proves finite beforehand (max |W| against a bound on |ΔW| from the factors: one read
    of W, see :func:`deltacodec.kernels.finite_by_bound`), and writes those last; a weight the
    proof does not cover (values near the top of its dtype's range, inf/NaN) is copied, patched
    first with every sum checked, and the copy dropped once the whole patch has succeeded. So an
    overflow anywhere still rolls back exactly and changes nothing, and a Ctrl-C during the
    uncopied writes is raised once they are all done.
    """
    from .pipeline_apply import route  # diffusers pipelines, component-prefixed and kohya-ss files

    model, source = route(model, source, max_decoded_bytes=max_decoded_bytes, strict=strict)
    import torch

    from . import kernels

    f = open_sld(source, max_decoded_bytes)

    try:
        res = _resolve(model, f)
    except SldError:
        raise
    except Exception as exc:  # a model tree that cannot be walked: still the library's error
        raise ApplyError(f"{f.path}: cannot read the model's tensors ({type(exc).__name__}: {exc})") from exc
    targets, replacements, missing = res.targets, res.replacements, res.missing
    mismatched = [why for _, why in res.mismatched]
    unusable = [why for _, why in res.unusable]
    if strict and (missing or mismatched or unusable):
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing from the model: " + preview(missing))
        if mismatched:
            parts.append(f"{len(mismatched)} mismatched: " + preview(mismatched, "; "))
        if unusable:
            parts.append(f"{len(unusable)} stored tensor(s) not applicable: " + preview(unusable, "; "))
        raise ApplyError(f"{f.path}: cannot apply (strict): " + " | ".join(parts) + "; no weight was changed")

    jobs = [(f"module '{t.entry.name}'", t.key, t.weight) for t in targets]
    jobs += [(f"stored tensor '{r.entry.name}'", r.name, r.tensor) for r in replacements]
    _check_distinct(f, jobs)
    fingerprint = content_fingerprint(f)
    _check_live(f, jobs, fingerprint, allow_stacking)
    for t in targets:  # one backend check for all, before any weight changes
        try:
            kernels.select_backend(t.weight, backend)
        except ApplyError as exc:
            raise ApplyError(f"{f.path}: module '{t.entry.name}': {exc}; no weight was changed") from None
    # Everything read from the file is read now: a corrupt section fails before any weight
    # changes. The packed factors stay on the CPU (a few bits per parameter); the kernels copy
    # them to W's device one module at a time.
    for t in targets:
        t.A, t.B = packed_factor(f, t.entry.A, "cpu"), packed_factor(f, t.entry.B, "cpu")
    for r in replacements:
        r.value = _replacement_value(f, r)
    _warn_peft(f, model, targets)
    unexpected = [name for name, _ in res.mismatched + res.unusable]
    if not jobs:
        warnings.warn(
            f"{f.path}: nothing in the file matched the model ({len(missing)} module(s) missing, "
            f"{len(unexpected)} unusable): no weight was changed",
            DeltacodecWarning,
            stacklevel=2,
        )

    backends: dict[str, str] = {}
    originals: list[tuple[torch.Tensor, torch.Tensor]] = []  # (weight, its copy before the write)
    written: list[torch.Tensor] = []  # every tensor written, copied or not
    done: list[str] = []
    cloned, uncopied = _write_plan(f, targets, keep_original)

    def rollback() -> None:
        for w, orig in reversed(originals):
            w.copy_(orig)
        for w, _ in originals:
            _touched(w)

    def patch(t: _Target, proven: bool) -> None:
        e = t.entry
        w = _as_matrix(t.weight, e)
        backends[e.name] = kernels.delta_add(
            w, t.A, t.B,
            scale=e.scale, omega=e.omega if e.sine else 0.0, gamma=e.gamma if e.sine else 1.0,
            sine=e.sine, fan_in_fan_out=e.fan_in_fan_out, backend=backend,
            name=f"module '{e.name}' (weight '{t.key}')", proven=proven,
        )
        if w.data_ptr() != t.weight.data_ptr():  # a conv kernel patched through a contiguous copy
            t.weight.copy_(w.view(t.weight.shape))
        written.append(t.weight)
        done.append(e.name)

    def failed(what: str, exc: BaseException) -> ApplyError:
        rollback()
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise exc
        return ApplyError(f"{f.path}: {what}; rolled back {len(done)} patched tensor(s): the model is unchanged")

    with torch.no_grad():
        # First everything that can still fail, each weight copied first: the modules whose sums
        # were not proven finite, then the stored tensors.
        for t in cloned:
            try:
                originals.append((t.weight, t.weight.detach().clone()))
                patch(t, proven=False)
            except BaseException as exc:
                what = str(exc) if isinstance(exc, ApplyError) else f"applying '{t.entry.name}' failed ({type(exc).__name__}: {exc})"
                raise failed(what, exc) from exc
        for r in replacements:
            try:
                originals.append((r.tensor, r.tensor.detach().clone()))
                r.tensor.copy_(r.value)
                written.append(r.tensor)
                done.append(r.entry.name)
            except BaseException as exc:
                raise failed(f"replacing '{r.name}' failed ({type(exc).__name__}: {exc})", exc) from exc
        # Then (keep_original=False) the modules proven finite, written without a copy: nothing
        # in them can fail but the machine itself, and a Ctrl-C is held until they are all done.
        with _interrupts_deferred():
            for t in uncopied:
                try:
                    patch(t, proven=True)
                except BaseException as exc:
                    n_kept = sum(1 for w in written if all(w is not o for o, _ in originals))
                    rollback()
                    if isinstance(exc, (KeyboardInterrupt, SystemExit)):  # off the main thread only
                        raise
                    raise ApplyError(
                        f"{f.path}: applying '{t.entry.name}' failed ({type(exc).__name__}: {exc}); "
                        f"{n_kept} weight(s) patched without a copy (keep_original=False) keep their "
                        f"delta, the {len(originals)} copied one(s) were restored"
                    ) from exc

    n = next(_counter)
    label = f"handle #{n} ({f.path})"
    handle = AppliedAdapter(done, missing, unexpected, backends, source=f.path, label=label)
    record = _Record(label, fingerprint, removable=keep_original)
    handle._record = record
    for w in written:
        _touched(w, push=record)
    if keep_original:
        handle._originals = originals
    return handle
