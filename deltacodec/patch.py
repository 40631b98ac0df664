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

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ApplyError
from .format import ModuleEntry, SldFile, TensorEntry

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["apply", "AppliedAdapter", "resolve_targets", "packed_factor"]

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
    if strict and (missing or mismatched):
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing from the model: " + ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else ""))
        if mismatched:
            parts.append(f"{len(mismatched)} mismatched: " + "; ".join(mismatched[:10]) + (" ..." if len(mismatched) > 10 else ""))
        raise ApplyError(f"{f.path}: cannot apply (strict): " + " | ".join(parts) + "; no weight was changed")
    for t in targets:  # one backend check for all, before any weight changes
        kernels.select_backend(t.weight, backend)

    originals: list[tuple[torch.Tensor, torch.Tensor]] = []
    backends: dict[str, str] = {}
    done: list[str] = []
    with torch.no_grad():
        for t in targets:
            e = t.entry
            try:
                originals.append((t.weight, t.weight.detach().clone()))
                A = packed_factor(f, e.A, t.weight.device)
                B = packed_factor(f, e.B, t.weight.device)
                backends[e.name] = kernels.delta_add(
                    t.weight, A, B,
                    scale=e.scale, omega=e.omega if e.sine else 0.0, gamma=e.gamma if e.sine else 1.0,
                    sine=e.sine, fan_in_fan_out=e.fan_in_fan_out, backend=backend,
                )
                done.append(e.name)
            except BaseException as exc:
                for w, orig in originals:
                    w.copy_(orig)
                msg = (
                    f"{f.path}: applying module '{e.name}' failed ({type(exc).__name__}: {exc}); "
                    f"rolled back {len(done)} patched module(s): the model is unchanged"
                )
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    raise
                raise ApplyError(msg) from exc
    handle = AppliedAdapter(done, missing, [m.split(":")[0] for m in mismatched], backends)
    if keep_original:
        handle._originals = originals
    return handle
