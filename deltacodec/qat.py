"""Quantization-aware training (QAT) of (sine-)LoRA adapters, exported straight to ``.sld``.

:func:`enable_qat` makes every LoRA layer of a PEFT model compute its forward pass with Q(A) and
Q(B), the factors quantized exactly as :func:`deltacodec.encode` quantizes them at ``bits``
(:func:`deltacodec.quantize.quantize`: a ``2**bits``-entry codebook stored as float16 × a
float32 scale, each value mapped to its nearest stored entry, a tie to the lower one). Gradients
pass straight through Q to the latent full-precision factors, which the optimizer keeps
updating; the training loop is unchanged (a parametrization of each ``lora_A``/``lora_B``
weight, and one forward pre-hook on the model that counts steps).

Schedule (why this one):

* the **assignment** (nearest stored codebook entry) is recomputed at every access of the
  weight, so a latent value that crosses a cell boundary changes the forward pass at once: the
  task loss sees the quantizer's real output at every step, and a latent that the optimizer
  moves within a cell costs nothing;
* the **codebook** is refitted (k-means on the detached latent factor, the codec's own
  quantizer) every ``refresh_every`` training-mode forward calls of the model (default: every
  call), and once more by :func:`export_sld`; between refits it is fixed and the forward pass is
  a nearest-neighbour lookup. Refitting is the expensive part (a 1-D k-means per factor, in
  numpy: QAT steps took 1.6-2.1x a plain step on the tiny models of benchmarks/rd_qat.py), but a stale
  codebook costs accuracy: refitting every 10 steps instead of every step made QAT worse than
  post-training quantization there (benchmarks/README.md, "QAT"). Just after a refit Q(x) equals
  ``quantize(x, bits).codebook[indices]`` exactly, because ``quantize`` itself returns the
  nearest-entry assignment to its stored codebook.

:func:`export_sld` refits the codebooks on the final latent factors, encodes the latent adapter
with :func:`deltacodec.encode` (which quantizes each factor exactly like the refit did) and then
checks, factor by factor, that the file decodes to exactly the values the forward pass uses.
The codec stores a factor as raw float16 instead of a codebook when that is no larger (tensors
of a handful of values); such a factor's forward pass is switched to float16 rounding of the
latent, which is what the file holds, so the equality is exact for those too.

Limits: linear LoRA layers (PEFT's plain LoRA ``Linear`` and :class:`SineLoraLinear`), one adapter
at a time, float32 factors (the exactness of the export is a float32 statement); ``bits`` with
the ``kmeans`` or ``uniform`` codebook quantizers, or ``bits_per_param`` with the rate-controlled
``ecsq``/``auto`` (each refresh is then a whole-adapter encode: 2.6-11x a plain training step on
benchmarks/rd_qat.py's testbed 2, against 1.2-1.9x for k-means). Save the latent adapter with ``save_pretrained`` only after :func:`disable_qat`:
while QAT is on, PEFT's state dict holds the parametrization's keys.

This module imports torch and peft; ``import deltacodec`` does not import it.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.nn.utils import parametrize

from .codec import encode, load
from .entropy import DEFAULT_LEVEL
from .errors import AdapterError, EncodeError, preview
from .layouts import read as _read_layout
from .layouts.base import Adapter, Source
from .quantize import QUANTIZERS, quantize

RATE_QUANTIZERS = ("ecsq", "auto")  # the codec's rate-controlled quantizers (bits_per_param)

__all__ = ["enable_qat", "disable_qat", "refresh_qat", "qat_enabled", "quantized_factors", "export_sld", "QatState"]

_ATTR = "_deltacodec_qat"


class _NearestSTE(torch.autograd.Function):
    """Forward: each value replaced by its nearest codebook entry (or its float16 rounding).
    Backward: the identity (straight-through estimator) to the latent weight."""

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, codebook: torch.Tensor, mids: torch.Tensor, raw_f16: bool) -> torch.Tensor:
        if raw_f16:
            return w.detach().to(torch.float16).to(w.dtype)
        # float64 midpoints and values, searched with "left" ties: quantize._assign, exactly.
        idx = torch.bucketize(w.detach().to(torch.float64), mids, right=False)
        return codebook[idx]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], None, None, None]:
        return grad, None, None, None


class _FixedSTE(torch.autograd.Function):
    """Forward: the values the codec's file holds for this factor (set at the last refresh).
    Backward: the identity (straight-through estimator) to the latent weight."""

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return values.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], None]:
        return grad, None


class FactorQuantizer(nn.Module):
    """The parametrization of one ``lora_A``/``lora_B`` weight: latent (any shape, float32) →
    its quantized value, same shape and dtype.

    ``codebook`` (2**bits float32 values, sorted) and ``mids`` (their float64 midpoints) are set
    by :meth:`refit`; ``stored`` is the codebook as the file stores it (float16 bytes, scale).
    """

    def __init__(self, bits: int, quantizer: str, name: str) -> None:
        super().__init__()
        self.bits = bits
        self.quantizer = quantizer
        self.name = name
        self.raw_f16 = False
        self.stored: tuple[bytes, float] | None = None
        k = 1 << bits
        self.register_buffer("codebook", torch.zeros(k, dtype=torch.float32), persistent=False)
        self.register_buffer("mids", torch.zeros(k - 1, dtype=torch.float64), persistent=False)
        # rate-controlled mode: the decoded values of the whole factor, from an encode of the
        # whole adapter at the last refresh (ECSQ's cells depend on every module, through λ)
        self.coded: torch.Tensor | None = None

    def refit(self, latent: torch.Tensor) -> None:
        """Codebook := the codec's quantizer run on ``latent`` (detached); float16 mode off."""
        values = latent.detach().to("cpu", torch.float32).numpy()
        q = quantize(values, self.bits, self.quantizer)
        cb = q.codebook.astype(np.float32)
        cb64 = cb.astype(np.float64)
        self.codebook.copy_(torch.from_numpy(cb))
        self.mids.copy_(torch.from_numpy((cb64[:-1] + cb64[1:]) * 0.5))
        self.stored = (q.codebook_f16, float(q.codebook_scale))
        self.raw_f16 = False

    def set_coded(self, values: np.ndarray, device: torch.device) -> None:
        self.coded = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(device)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.coded is not None:
            return _FixedSTE.apply(w, self.coded.reshape(w.shape))
        return _NearestSTE.apply(w, self.codebook, self.mids, self.raw_f16)


@dataclass
class QatState:
    """What :func:`enable_qat` attached to a model (``model._deltacodec_qat``)."""

    bits: int | None
    quantizer: str
    refresh_every: int
    adapter: str
    layers: dict[str, nn.Module]  # module name -> PEFT LoRA layer
    steps: int = 0  # training-mode forward calls since enable_qat
    since_refresh: int = 0
    refreshes: int = 0
    hook: Any = field(default=None, repr=False)
    bits_per_param: float | None = None  # rate-controlled mode (ecsq/auto): the file's bits/param


def _tuner_layers(model: nn.Module, adapter: str) -> dict[str, nn.Module]:
    found, bad = {}, []
    for name, mod in model.named_modules():
        if not isinstance(mod, BaseTunerLayer):
            continue
        la = getattr(mod, "lora_A", None)
        r = getattr(mod, "r", None)
        if not (isinstance(r, dict) and adapter in r):
            continue
        if isinstance(la, nn.ModuleDict) and adapter in la and isinstance(la[adapter], nn.Linear) \
                and adapter in mod.lora_B and isinstance(mod.lora_B[adapter], nn.Linear) \
                and isinstance(mod.get_base_layer(), nn.Linear):
            found[name] = mod
        else:
            bad.append(f"{name} ({type(mod.get_base_layer()).__name__})")
    if bad:
        raise AdapterError(
            f"QAT supports LoRA on torch.nn.Linear layers only; adapter '{adapter}' is also on "
            f"{len(bad)} other module(s): {preview(bad, limit=6)}"
        )
    return found


def _default_adapter(model: nn.Module) -> str:
    names: set[str] = set()
    for mod in model.modules():
        if isinstance(mod, BaseTunerLayer) and isinstance(getattr(mod, "r", None), dict):
            names.update(mod.r)
    if not names:
        raise AdapterError(f"{type(model).__name__} has no LoRA layers: nothing to train quantization-aware "
                           "(wrap it with peft.get_peft_model or deltacodec.sinelora.get_sinelora_model first)")
    if len(names) > 1:
        raise AdapterError(f"the model holds several adapters ({', '.join(sorted(names))}): pass adapter_name=")
    return names.pop()


def _factor_modules(layer: nn.Module, adapter: str) -> tuple[nn.Linear, nn.Linear]:
    return layer.lora_A[adapter], layer.lora_B[adapter]


def _latent(lin: nn.Linear) -> torch.Tensor:
    return lin.parametrizations.weight.original


def _quantizer(lin: nn.Linear) -> FactorQuantizer:
    return lin.parametrizations.weight[0]


def qat_enabled(model: nn.Module) -> bool:
    return getattr(model, _ATTR, None) is not None


def _state(model: nn.Module, what: str) -> QatState:
    st = getattr(model, _ATTR, None)
    if st is None:
        raise EncodeError(f"{what}: quantization-aware training is not enabled on this model (call enable_qat first)")
    return st


def enable_qat(
    model: nn.Module,
    bits: int | None = None,
    *,
    bits_per_param: float | None = None,
    quantizer: str | None = None,
    refresh_every: int = 1,
    adapter_name: str | None = None,
) -> QatState:
    """Train ``model``'s LoRA adapter for the codec at ``bits`` from now on.

    Every ``lora_A``/``lora_B`` weight (r×in, out×r) of the adapter's linear LoRA layers (plain
    LoRA and sine alike) is replaced in the forward pass by its quantized value, with
    straight-through gradients to the latent float32 factor; the optimizer's parameters stay the
    same objects, so an optimizer built before this call keeps working. ``bits``: 1..8;
    ``quantizer``: ``"kmeans"`` (the codec's default) or ``"uniform"``; the codebooks are refitted
    now and then every ``refresh_every`` training-mode forward calls of ``model`` (micro-batches).

    ``bits_per_param`` instead (the default bits are 3): the rate-controlled codec, ``quantizer``
    ``"ecsq"`` (default) or ``"auto"``. Its quantization of a factor depends on every module (one
    allocation for the adapter), so each refresh encodes the whole latent adapter at that target
    and the forward pass uses the file's decoded factors until the next refresh (every forward
    call by default: an encode per step; on the 0.4M-parameter model of benchmarks/rd_qat.py's
    testbed 2 a QAT step took 2.6-11x a plain one this way).
    Returns the state (also at ``model._deltacodec_qat``). Raises :class:`AdapterError` for a
    model without LoRA layers (or with non-linear ones, or non-float32 factors) and
    :class:`EncodeError` for bad options or when QAT is already on.
    """
    if bits is not None and bits_per_param is not None:
        raise EncodeError("give bits or bits_per_param, not both")
    if bits_per_param is not None:
        if isinstance(bits_per_param, bool) or not isinstance(bits_per_param, (int, float)) or not (
                0 < bits_per_param < float("inf")):
            raise EncodeError(f"bits_per_param must be a positive finite number, got {bits_per_param!r}")
        quantizer = "ecsq" if quantizer is None else quantizer
        if quantizer not in RATE_QUANTIZERS:
            raise EncodeError(f"a bits_per_param target needs quantizer {' or '.join(RATE_QUANTIZERS)}, got {quantizer!r}")
    else:
        bits = 3 if bits is None else bits
        quantizer = "kmeans" if quantizer is None else quantizer
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
            raise EncodeError(f"QAT bits must be an integer 1..8 (a 2**bits-entry codebook), got {bits!r}")
        if quantizer not in QUANTIZERS:
            raise EncodeError(f"unknown QAT quantizer '{quantizer}', expected one of {', '.join(QUANTIZERS)}")
    if isinstance(refresh_every, bool) or not isinstance(refresh_every, int) or refresh_every < 1:
        raise EncodeError(f"refresh_every must be a positive integer (forward calls), got {refresh_every!r}")
    if qat_enabled(model):
        raise EncodeError("quantization-aware training is already enabled on this model (disable_qat first)")
    adapter = adapter_name if adapter_name is not None else _default_adapter(model)
    layers = _tuner_layers(model, adapter)
    if not layers:
        raise AdapterError(f"{type(model).__name__} has no LoRA layers for adapter '{adapter}'")
    wrong = [f"{n}.lora_{s}" for n, l in layers.items() for s, lin in zip("AB", _factor_modules(l, adapter))
             if lin.weight.dtype != torch.float32]
    if wrong:
        raise AdapterError(f"QAT needs float32 LoRA factors (the export is exact in float32); not float32: "
                           f"{preview(wrong, limit=6)}")
    for name, layer in layers.items():
        for s, lin in zip("AB", _factor_modules(layer, adapter)):
            if parametrize.is_parametrized(lin, "weight"):
                raise EncodeError(f"{name}.lora_{s}.weight already has a parametrization")
            fq = FactorQuantizer(bits or 1, quantizer if bits else "kmeans", f"{name}.lora_{s}.weight").to(lin.weight.device)
            parametrize.register_parametrization(lin, "weight", fq, unsafe=True)
    st = QatState(bits=bits if bits_per_param is None else None, quantizer=quantizer, refresh_every=refresh_every,
                  adapter=adapter, layers=layers, bits_per_param=bits_per_param)

    def pre_hook(module: nn.Module, args: Any) -> None:
        if module.training:
            if st.since_refresh >= st.refresh_every:
                refresh_qat(module)
            st.steps += 1
            st.since_refresh += 1

    st.hook = model.register_forward_pre_hook(pre_hook)
    setattr(model, _ATTR, st)
    refresh_qat(model)
    return st


def refresh_qat(model: nn.Module) -> None:
    """Refit every codebook on the current latent factors now (float16 mode off everywhere)."""
    st = _state(model, "refresh_qat")
    with torch.no_grad():
        if st.bits_per_param is not None:
            with tempfile.TemporaryDirectory(prefix="deltacodec-qat-") as d:
                _code_latent(model, st, os.path.join(d, "refresh.sld"), force=False)
        else:
            for layer in st.layers.values():
                for lin in _factor_modules(layer, st.adapter):
                    _quantizer(lin).refit(_latent(lin))
    st.since_refresh = 0
    st.refreshes += 1


def disable_qat(model: nn.Module) -> None:
    """Undo :func:`enable_qat`: the layers use their latent factors again (the same
    ``nn.Parameter`` objects, trained), and the step hook is removed."""
    st = _state(model, "disable_qat")
    st.hook.remove()
    for layer in st.layers.values():
        for lin in _factor_modules(layer, st.adapter):
            parametrize.remove_parametrizations(lin, "weight", leave_parametrized=False)
    delattr(model, _ATTR)


def quantized_factors(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Q(A) (r×in) and Q(B) (out×r), float32, as the forward pass uses them now, by module name."""
    st = _state(model, "quantized_factors")
    with torch.no_grad():
        return {n: tuple(lin.weight.detach().clone() for lin in _factor_modules(l, st.adapter))
                for n, l in st.layers.items()}


def _plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (set, frozenset)):
        return sorted(_plain(x) for x in v)
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


def _latent_adapter(model: nn.Module, st: QatState) -> tuple[Adapter, dict[str, nn.Module]]:
    """The latent adapter as the PEFT layout reads it from ``save_pretrained``'s output (same
    tensor names, same config), built in memory; and the layer of every module name."""
    cfgs = getattr(model, "peft_config", None)
    if not isinstance(cfgs, dict) or st.adapter not in cfgs:
        raise AdapterError(f"{type(model).__name__} has no peft_config for adapter '{st.adapter}'")
    config = _plain(cfgs[st.adapter].to_dict())
    tensors: dict[str, tuple[np.ndarray, str]] = {}
    by_key: dict[str, nn.Module] = {}
    for name, layer in st.layers.items():
        for s, lin in zip("AB", _factor_modules(layer, st.adapter)):
            tensors[f"{name}.lora_{s}.weight"] = (_latent(lin).detach().to("cpu", torch.float32).numpy().copy(), "F32")
        by_key[name] = layer
    src = f"<in-memory {type(model).__name__}, adapter '{st.adapter}'>"
    source = Source(src=src, weights=src, tensors=tensors, metadata={"adapter_config": json.dumps(config)},
                    config_path="")
    adapter = _read_layout(source, layout="peft")
    layers = {}
    for m in adapter.modules:
        if m.name not in by_key:
            raise EncodeError(f"{src}: module '{m.name}' of the encoded adapter matches no QAT layer")
        layers[m.name] = by_key[m.name]
    return adapter, layers


def export_sld(model: nn.Module, path: str | os.PathLike[str], *, force: bool = False,
               level: int = DEFAULT_LEVEL) -> str:
    """Write the QAT model's adapter to ``path`` (``.sld``) so that it decodes to exactly the
    factors the forward pass uses from now on; returns the path.

    The codebooks are refitted on the final latent factors, the latent adapter is encoded with
    :func:`deltacodec.encode` at the QAT bits and quantizer (``level``: zstd level), and every
    factor of the file is checked to decode bit for bit to the forward pass's Q(A)/Q(B) (a factor
    the codec stores as raw float16 switches its forward pass to float16 rounding, which is what
    the file holds). A mismatch removes the file and raises :class:`EncodeError`. An existing
    ``path`` is refused unless ``force`` (:class:`OutputError`).
    """
    st = _state(model, "export_sld")
    if st.bits_per_param is not None:
        # the file *is* the refresh: the forward adopts its decoded factors, so they agree by construction
        with torch.no_grad():
            out = _code_latent(model, st, path, force=force, level=level)
        st.since_refresh = 0
        return out
    refresh_qat(model)
    adapter, layers = _latent_adapter(model, st)
    # refit=False: k-means at fixed bits quantizes each factor on its own (B is not refitted against
    # Q(A)), exactly like the QAT forward.
    out = encode(adapter, st.bits, out=path, quantizer=st.quantizer, level=level, force=force, refit=False)
    _removed_on_failure(out, lambda: _adopt_and_check(load(out), layers, st))
    return out


def _removed_on_failure(path: str, step: Callable[[], None]) -> None:
    """``step()``; a file it fails on (or is interrupted over) is not left behind."""
    try:
        step()
    except BaseException:
        try:
            os.remove(path)
        except OSError:
            pass
        raise


def _code_latent(model: nn.Module, st: QatState, path: str | os.PathLike[str], *, force: bool,
                 level: int = DEFAULT_LEVEL) -> str:
    """Rate-controlled mode, what refresh and export share: the latent adapter encoded at the
    target into ``path``, and every factor's forward values := what that file decodes to."""
    adapter, layers = _latent_adapter(model, st)
    out = encode(adapter, out=path, bits_per_param=st.bits_per_param, quantizer=st.quantizer, level=level,
                 force=force)
    _removed_on_failure(out, lambda: _adopt_coded(st, out, layers))
    return out


def _adopt_coded(st: QatState, path: str, layers: dict[str, nn.Module]) -> None:
    """Every factor's forward values := what the file at ``path`` decodes to."""
    f = load(path)
    seen = set()
    for m in f.modules:
        A, B = f.dequantize(m.name)
        layer = layers[m.name]
        for values, lin in zip((A, B), _factor_modules(layer, st.adapter)):
            _quantizer(lin).set_coded(values, _latent(lin).device)
        seen.add(m.name)
    missing = sorted(set(layers) - seen)
    if missing:
        raise EncodeError(f"{path}: no factors for {preview(missing, limit=3)}")


def _adopt_and_check(f: Any, layers: dict[str, nn.Module], st: QatState) -> None:
    for m in f.modules:
        layer = layers[m.name]
        for entry, lin in zip((m.A, m.B), _factor_modules(layer, st.adapter)):
            fq = _quantizer(lin)
            if entry.encoding == "raw" and entry.dtype == "F16":
                fq.raw_f16 = True
            elif entry.encoding != "codebook" or (entry.codebook_f16, float(entry.codebook_scale)) != fq.stored:
                raise EncodeError(
                    f"{f.path}: tensor '{entry.name}' is stored as {entry.encoding} with a codebook other than the "
                    "QAT quantizer's: the codec no longer quantizes like deltacodec.quantize.quantize"
                )
        A, B = f.dequantize(m.name)
        with torch.no_grad():
            qa, qb = (lin.weight.detach().to("cpu") for lin in _factor_modules(layer, st.adapter))
        for got, want, s in ((A, qa, "A"), (B, qb, "B")):
            if got.shape != tuple(want.shape) or not np.array_equal(got.view(np.uint32), want.numpy().view(np.uint32)):
                raise EncodeError(f"{f.path}: module '{m.name}' lora_{s} does not decode to the QAT forward's values")
