"""Patching a loaded model with an ``.sld`` file: ``deltacodec.apply``.

For each module in the file: W += scale·sin(ω·Q(B)Q(A))/γ (LoRA: scale·Q(B)Q(A)), transposed
when ``fan_in_fan_out``, in place, the sum formed in fp32 and rounded once to W's dtype. The
work per module is done by :func:`deltacodec.kernels.delta_add` (a Triton kernel for CUDA
weights, a chunked in-place torch path elsewhere).

Guarantees: strict mode checks every target before touching any weight; a failure midway
restores every weight already patched, bit-exactly; :meth:`AppliedAdapter.remove` undoes the
whole patch bit-exactly.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ApplyError, preview
from .format import ModuleEntry, SldFile, TensorEntry

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["apply", "AppliedAdapter", "resolve_targets", "resolve_extras", "packed_factor"]

_PEFT_PREFIX = "base_model.model."
_WEIGHT_DTYPES = ("float32", "float16", "bfloat16")


def _candidates(name: str) -> list[str]:
    """Model-side names a header name may stand for: as is, without or with PEFT's prefix."""
    out = [name]
    if name.startswith(_PEFT_PREFIX):
        out.append(name[len(_PEFT_PREFIX):])
    else:
        out.append(_PEFT_PREFIX + name)
    return out


@dataclass
class _Target:
    entry: ModuleEntry
    module_name: str
    weight: "torch.Tensor"


@dataclass
class _Replacement:
    """A losslessly stored tensor that takes the place of a model tensor (PEFT modules_to_save)."""

    entry: TensorEntry
    name: str
    tensor: "torch.Tensor"


def unusable_reason(name: str) -> str:
    """Why apply cannot use a stored extra tensor that matches no model tensor."""
    if name.endswith("lora_magnitude_vector") or ".lora_magnitude_vector." in name:
        return "a DoRA magnitude vector (DoRA is not supported by apply)"
    if ".lora_B.bias" in name or ".lora_A.bias" in name:
        return "a LoRA bias (lora_bias=True is not supported by apply)"
    return "no model tensor of that name"


def resolve_extras(model: "torch.nn.Module", f: SldFile) -> tuple[list[_Replacement], list[str]]:
    """Map the file's losslessly stored tensors onto ``model``: (replacements, problems).

    A stored tensor whose name (with or without PEFT's prefix) is a parameter or buffer of the
    model with the same shape replaces it: that is how PEFT saves ``modules_to_save``. Anything
    else (DoRA magnitudes, LoRA biases) cannot be applied as a weight update and is a problem.
    """
    import torch

    named = dict(model.named_parameters())
    named.update(model.named_buffers())
    found: list[_Replacement] = []
    problems: list[str] = []
    for e in f.tensors:
        hit = next((c for c in _candidates(e.name) if c in named), None)
        if hit is None:
            problems.append(f"{e.name}: {unusable_reason(e.name)}")
            continue
        t = named[hit]
        if tuple(t.shape) != tuple(e.shape) or not t.dtype.is_floating_point:
            problems.append(f"{e.name}: '{hit}' is {t.dtype} {list(t.shape)}, the file holds {list(e.shape)}")
            continue
        found.append(_Replacement(e, hit, t))
    return found, problems


def resolve_targets(model: "torch.nn.Module", f: SldFile) -> tuple[list[_Target], list[str], list[str]]:
    """Map the file's modules onto ``model``: (targets, missing, mismatched-with-reason).

    A PEFT LoRA layer (anything with a ``base_layer``) is patched through its base layer, so the
    same file applies to a bare transformers model, a PEFT-wrapped one, or any module tree with
    matching names.
    """
    import torch

    named = dict(model.named_modules())
    targets: list[_Target] = []
    missing: list[str] = []
    mismatched: list[str] = []
    for e in f.modules:
        hit = next((c for c in _candidates(e.name) if c in named), None)
        if hit is None:
            missing.append(e.name)
            continue
        mod = named[hit]
        while hasattr(mod, "base_layer"):
            mod = mod.base_layer
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            mismatched.append(f"{e.name}: '{hit}' has no 2-D weight ({type(mod).__name__})")
            continue
        want = (e.in_features, e.out_features) if e.fan_in_fan_out else (e.out_features, e.in_features)
        if tuple(w.shape) != want:
            layout = "in×out (fan_in_fan_out)" if e.fan_in_fan_out else "out×in"
            mismatched.append(f"{e.name}: weight of '{hit}' is {list(w.shape)}, the file needs {list(want)} ({layout})")
            continue
        if str(w.dtype).replace("torch.", "") not in _WEIGHT_DTYPES:
            mismatched.append(f"{e.name}: weight dtype {w.dtype} is not float32, float16 or bfloat16")
            continue
        if w.device.type not in ("cpu", "cuda"):
            mismatched.append(f"{e.name}: weight on {w.device}, expected cpu or cuda")
            continue
        targets.append(_Target(e, hit, w))
    return targets, missing, mismatched


def packed_factor(f: SldFile, entry: TensorEntry, device: "torch.device | str"):
    """A factor in the kernels' layout (packed stream + float32 codebook, or float16 values)."""
    import torch

    from .kernels import PackedFactor

    if entry.encoding == "codebook":
        stream = np.frombuffer(f.read_section(entry), dtype=np.uint8)
        f.indices(entry)  # validates padding and index range before a kernel reads the stream
        data = torch.from_numpy(stream.copy()).to(device)
        cb = torch.from_numpy(entry.codebook.copy()).to(device)
        return PackedFactor(data, cb, entry.bits, entry.width, tuple(entry.shape))
    values = f.raw_array(entry)
    if entry.dtype != "F16":
        # The kernels take codebooks or float16 pass-through; this writer makes nothing else, and
        # rounding another writer's F32/BF16 factors to float16 would silently change them.
        raise ApplyError(f"{f.path}: tensor '{entry.name}' is raw {entry.dtype}; apply supports codebook and F16 factors")
    return PackedFactor(torch.from_numpy(values.copy()).to(device), None, 16, 16, tuple(entry.shape))


@dataclass
class AppliedAdapter:
    """Handle returned by :func:`apply`. ``remove()`` restores the original weights bit-exactly.

    Also a context manager: ``with deltacodec.apply(model, "a.sld"): ...`` removes on exit.
    ``missing`` and ``unexpected`` list the file's modules that were not patched (strict=False).
    """

    patched: list[str]
    missing: list[str]
    unexpected: list[str]
    backends: dict[str, str]
    _originals: list[tuple["torch.Tensor", "torch.Tensor"]] = field(default_factory=list, repr=False)
    _removed: bool = field(default=False, repr=False)

    def remove(self) -> None:
        """Put every patched weight back exactly as it was before :func:`apply`."""
        if self._removed:
            return
        if not self._originals and self.patched:
            raise ApplyError("this adapter was applied with keep_original=False: it cannot be removed")
        import torch

        with torch.no_grad():
            for w, orig in self._originals:
                w.copy_(orig)
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
) -> AppliedAdapter:
    """Add the adapter in ``source`` (an ``.sld`` path or a loaded file) into ``model``'s weights.

    For each module: W (out×in, or in×out with fan_in_fan_out) += ΔW, formed in fp32 and rounded
    once to W's dtype (fp32/fp16/bf16), on W's device. ``backend``: "auto" (Triton for CUDA
    weights, torch otherwise; the DELTACODEC_BACKEND environment variable overrides), "torch" or
    "triton".

    Tensors the file stores losslessly replace the model tensor of the same name and shape (PEFT's
    ``modules_to_save``); DoRA magnitudes and LoRA biases cannot be applied and count as mismatched.

    ``strict=True``: every module in the file must exist in the model with a matching 2-D weight;
    one :class:`ApplyError` lists everything missing or mismatched before any weight is touched.
    ``strict=False``: patch what matches; the handle's ``missing``/``unexpected`` say the rest
    (``missing, unexpected = deltacodec.apply(..., strict=False)`` also works).

    Memory: with ``keep_original=True`` (default) the handle keeps a copy of every patched weight,
    on its device, so ``remove()`` can restore it bit-exactly — for a LLaMA-3-8B q,k,v,up,down
    adapter that is ~4.4 GB in bf16. ``keep_original=False`` drops the copies once the whole patch
    has succeeded (they are still held while it runs, so a failure midway rolls back exactly).
    """
    import torch

    from . import kernels

    f = source if isinstance(source, SldFile) else SldFile(source)
    targets, missing, mismatched = resolve_targets(model, f)
    replacements, unusable = resolve_extras(model, f)
    if strict and (missing or mismatched or unusable):
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing from the model: " + preview(missing))
        if mismatched:
            parts.append(f"{len(mismatched)} mismatched: " + preview(mismatched, "; "))
        if unusable:
            parts.append(f"{len(unusable)} stored tensor(s) not applicable: " + preview(unusable, "; "))
        raise ApplyError(f"{f.path}: cannot apply (strict): " + " | ".join(parts) + "; no weight was changed")
    for t in targets:  # one backend check for all, before any weight changes
        kernels.select_backend(t.weight, backend)

    backends: dict[str, str] = {}

    def add_delta(t: _Target) -> None:
        e = t.entry
        backends[e.name] = kernels.delta_add(
            t.weight, packed_factor(f, e.A, t.weight.device), packed_factor(f, e.B, t.weight.device),
            scale=e.scale, omega=e.omega if e.sine else 0.0, gamma=e.gamma if e.sine else 1.0,
            sine=e.sine, fan_in_fan_out=e.fan_in_fan_out, backend=backend,
        )

    def replace(r: _Replacement) -> None:
        r.tensor.copy_(torch.from_numpy(np.ascontiguousarray(f.tensor(r.entry))))

    jobs = [(t.weight, t.entry.name, functools.partial(add_delta, t)) for t in targets]
    jobs += [(r.tensor, r.entry.name, functools.partial(replace, r)) for r in replacements]
    originals: list[tuple[torch.Tensor, torch.Tensor]] = []
    done: list[str] = []
    with torch.no_grad():
        for tensor, name, run in jobs:
            try:
                originals.append((tensor, tensor.detach().clone()))
                run()
                done.append(name)
            except BaseException as exc:
                for w, orig in originals:
                    w.copy_(orig)
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    raise
                raise ApplyError(
                    f"{f.path}: applying '{name}' failed ({type(exc).__name__}: {exc}); rolled back "
                    f"{len(done)} patched tensor(s): the model is unchanged"
                ) from exc
    unexpected = [m.split(":")[0] for m in mismatched + unusable]
    handle = AppliedAdapter(done, missing, unexpected, backends)
    if keep_original:
        handle._originals = originals
    return handle
