"""Training sine-activated LoRA adapters with PEFT, saved so that ``sld encode`` needs no flags.

A SineLoRA adapter on a linear layer with weight W (out×in) replaces LoRA's update by

    ΔW = scale · sin(ω · B @ A) / γ,        scale = lora_alpha / r  (lora_alpha / √r with rsLoRA)

with A (r×in) and B (out×r) trained exactly as in LoRA, ω a fixed frequency and γ a fixed
divisor, √in_features by default. The sine raises the stable rank of ΔW far above r at no cost
in parameters. This module plugs such a layer into current PEFT through its custom-module
dispatch, so ``get_peft_model``, training, ``save_pretrained`` and ``merge_and_unload`` work as
usual; the saved ``adapter_config.json`` records ``"use_sinelora": true``,
``"sinelora_frequency": ω`` and ``"sinelora_scaling": γ`` (``null`` = √in_features), which is
what :func:`deltacodec.encode` reads. Recipe::

    from deltacodec.sinelora import sinelora_config, get_sinelora_model, load_sinelora
    cfg = sinelora_config(omega=200, r=8, lora_alpha=16, lora_dropout=0.05,
                          target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"])
    model = get_sinelora_model(base_model, cfg)       # peft.get_peft_model + a check
    ...                                               # train as any PEFT model (Trainer, loop)
    model.save_pretrained("adapter/")                 # adapter_config.json holds ω and γ
    # shell: sld encode adapter/ --bits 3 -o adapter.sld   (no --omega needed)
    merged = model.merge_and_unload()                 # W + ΔW, a plain transformers model
    model = load_sinelora(fresh_base_model, "adapter/")  # reload for inference or more training

Models that carry their adapters themselves (diffusers' ``UNet2DConditionModel``,
``SD3Transformer2DModel``, ...) take the layer through :func:`add_sinelora_adapter` (their
``add_adapter`` plus the same check); saved the way diffusers' DreamBooth LoRA scripts save
(``get_peft_model_state_dict`` + ``save_lora_weights`` with the component's config as its
LoRA metadata), the file records ω and γ there and encodes with no flags.

Reload with :func:`load_sinelora`, not ``PeftModel.from_pretrained``: plain PEFT does not know
the sine keys, drops them with an "Unexpected keyword arguments" warning and builds ordinary
LoRA layers, which compute a different ΔW.

Forward convention (same as PEFT's LoRA): ``y = base_layer(x) + dropout(x) @ ΔWᵀ``, dropout
(``lora_dropout``) acting on the adapter branch's input only, so in eval mode (or with
``lora_dropout=0``) ``y = x @ (W + ΔW)ᵀ + bias``, and merging is exact. ΔW is formed in the
adapter's dtype (input cast to it, as PEFT does); on CPU, half-precision factors are
multiplied in float32 when merging. The sine is not separable, so each forward forms the
out×in matrix ΔW (O(out·in·r) work, like DoRA), not LoRA's two thin products.

Supported: ``torch.nn.Linear`` targets (float weights), several adapters per model (sine and
plain LoRA may be mixed; ``adapter_names=`` mixed batches), ``use_rslora``, ``rank_pattern`` /
``alpha_pattern``, ``set_scale``. Not supported with the sine (a ``ValueError`` says so): LoRA
variants (DoRA, aLoRA, ...), ``lora_bias``, ``fan_in_fan_out`` (GPT-2 ``Conv1D``), embeddings,
convolutions and quantized (bitsandbytes/GPTQ/...) base layers.

Quantization-aware training for the codec (sine and plain LoRA layers alike): call
``enable_qat(model, bits=3)`` for the last part of training, then ``export_sld(model,
"adapter.sld")``, which writes a file that decodes to exactly the factors the quantized forward
pass used (see :mod:`deltacodec.qat`; ``disable_qat`` goes back to the latent factors).

``peft`` and ``transformers`` are imported by this module only: ``import deltacodec`` does not
load them.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import Linear as _LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .errors import preview
from .layouts.peft_config import gamma_for, sqrt_in_multiple
from .qat import disable_qat, enable_qat, export_sld, refresh_qat

__all__ = [
    "SineLoraConfig",
    "SineLoraLinear",
    "sinelora_config",
    "get_sinelora_model",
    "load_sinelora",
    "add_sinelora_adapter",
    "sinelora_layers",
    "GAMMA_SQRT_IN",
    "enable_qat",
    "disable_qat",
    "refresh_qat",
    "export_sld",
]

GAMMA_SQRT_IN = "sqrt-in"


def _check_omega(omega: Any) -> float:
    if isinstance(omega, bool) or not isinstance(omega, (int, float)) or not math.isfinite(omega) or omega == 0:
        raise ValueError(f"SineLoRA needs a finite, non-zero frequency ω (sinelora_frequency), got {omega!r}")
    return float(omega)


def _check_gamma(gamma: Any) -> Optional[float | str]:
    """γ as stored in the config: None for √in_features, "c*sqrt-in" for c·√in_features (the
    papers' γ = 2√n is "2*sqrt-in"), else a positive finite float."""
    if gamma is None or gamma == GAMMA_SQRT_IN:
        return None
    if sqrt_in_multiple(gamma) is not None:
        return gamma
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not (math.isfinite(gamma) and gamma > 0):
        raise ValueError(
            f"SineLoRA γ (sinelora_scaling) must be a positive number, '{GAMMA_SQRT_IN}' or 'c*{GAMMA_SQRT_IN}', got {gamma!r}"
        )
    return float(gamma)


@dataclass
class SineLoraConfig(LoraConfig):
    """A :class:`peft.LoraConfig` whose ``nn.Linear`` targets become :class:`SineLoraLinear`.

    Extra fields (saved in ``adapter_config.json``; ``peft_type`` stays ``"LORA"``):

    * ``sinelora_frequency``: ω (required, finite, non-zero);
    * ``sinelora_scaling``: γ, a positive number, ``None`` for √in_features per layer, or
      ``"c*sqrt-in"`` for c·√in_features (the papers' γ = 2√n: ``"2*sqrt-in"``);
    * ``use_sinelora``: ``True`` (a ``False`` makes this an ordinary LoRA config).
    """

    use_sinelora: bool = field(default=True, metadata={"help": "Apply sin(ω·BA)/γ to the LoRA product."})
    sinelora_frequency: Optional[float] = field(default=None, metadata={"help": "The frequency ω."})
    sinelora_scaling: Optional[Union[float, str]] = field(
        default=None,
        metadata={"help": "The divisor γ; None means sqrt(in_features) of each layer, 'c*sqrt-in' c times it."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.use_sinelora:
            self.sinelora_frequency = _check_omega(self.sinelora_frequency)
            self.sinelora_scaling = _check_gamma(self.sinelora_scaling)
            if self.use_dora:
                raise ValueError("SineLoRA cannot be combined with DoRA (use_dora=True)")
            if self.lora_bias:
                raise ValueError("SineLoRA does not support lora_bias=True")
            if self.fan_in_fan_out:
                raise ValueError("SineLoRA supports torch.nn.Linear targets only (fan_in_fan_out must be False)")
            # Registered here, not by the caller, so that every way PEFT rebuilds this config
            # (deepcopy, from a dict) keeps the dispatch. _custom_modules is not a dataclass
            # field: it is never written to adapter_config.json.
            self._register_custom_module({nn.Linear: SineLoraLinear})


class SineLoraLinear(_LoraLinear):
    """PEFT's LoRA ``Linear`` with ΔW = scale·sin(ω·B@A)/γ for adapters added with a
    :class:`SineLoraConfig` (adapters added with a plain ``LoraConfig`` stay plain LoRA).

    Per adapter, ``sinelora_omega[name]`` is ω and ``sinelora_gamma[name]`` the resolved γ.
    """

    other_param_names = _LoraLinear.other_param_names + ("sinelora_omega", "sinelora_gamma")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, **kwargs: Any) -> None:
        base = base_layer.get_base_layer() if isinstance(base_layer, BaseTunerLayer) else base_layer
        if not isinstance(base, nn.Linear):
            raise ValueError(f"SineLoRA supports torch.nn.Linear targets, got {type(base).__name__}")
        w = getattr(base, "weight", None)
        if not isinstance(w, torch.Tensor) or not w.dtype.is_floating_point or type(w) not in (torch.Tensor, nn.Parameter):
            raise ValueError(
                f"SineLoRA needs a plain floating-point weight; {type(base).__name__} has "
                f"{type(w).__name__} ({getattr(w, 'dtype', None)}) — quantized base layers are not supported"
            )
        super().__init__(base_layer, adapter_name, config=config, **kwargs)

    def _sine_maps(self) -> tuple[dict[str, float], dict[str, float]]:
        # Created on first use: update_layer runs inside the parent __init__.
        om = self.__dict__.setdefault("sinelora_omega", {})
        ga = self.__dict__.setdefault("sinelora_gamma", {})
        return om, ga

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs: Any) -> None:
        om, ga = self._sine_maps()
        sine = bool(getattr(config, "use_sinelora", False))
        if sine:
            if self.resolve_lora_variant(config=config) is not None:
                raise ValueError(
                    "SineLoRA cannot be combined with a LoRA variant (DoRA, aLoRA, Arrow, ...): "
                    "their forward and merge ignore the sine"
                )
            if config.lora_bias:
                raise ValueError("SineLoRA does not support lora_bias=True")
            if config.fan_in_fan_out:
                raise ValueError("SineLoRA supports torch.nn.Linear targets only (fan_in_fan_out must be False)")
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
        if sine:
            om[adapter_name] = _check_omega(config.sinelora_frequency)
            ga[adapter_name] = gamma_for(_check_gamma(getattr(config, "sinelora_scaling", None)), self.in_features)
        else:
            om.pop(adapter_name, None)
            ga.pop(adapter_name, None)

    def is_sine(self, adapter: str) -> bool:
        return adapter in self._sine_maps()[0]

    def _sine_delta(self, adapter: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """ΔW (out×in) = scale·sin(ω·B@A)/γ, differentiable, in ``dtype`` (default: the factors')."""
        om, ga = self._sine_maps()
        A = self.lora_A[adapter].weight
        B = self.lora_B[adapter].weight
        if dtype is not None:
            A, B = A.to(dtype), B.to(dtype)
        return torch.sin(om[adapter] * (B @ A)) * (self.scaling[adapter] / ga[adapter])

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        if not self.is_sine(adapter):
            return super().get_delta_weight(adapter)
        dtype = self.lora_B[adapter].weight.dtype
        device = self.lora_B[adapter].weight.device
        cast = device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)
        delta = self._sine_delta(adapter, torch.float32 if cast else None)
        return delta.to(dtype) if cast else delta

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None:
            return super().forward(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.lora_A.keys()]
        if not any(self.is_sine(a) for a in active):
            return super().forward(x, *args, **kwargs)
        self._check_forward_args(x, *args, **kwargs)
        from peft.tuners.lora.layer import VARIANT_KWARG_KEYS

        kwargs.pop("adapter_names", None)
        for k in VARIANT_KWARG_KEYS:  # not for the base layer (as in PEFT's forward)
            kwargs.pop(k, None)
        if any(a in self.lora_variant for a in active):
            raise ValueError("SineLoRA layer: an active adapter uses a LoRA variant, which is not supported here")
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        for a in active:
            A = self.lora_A[a]
            xa = self._cast_input_dtype(x, A.weight.dtype)
            if self.is_sine(a):
                result = result + F.linear(self.lora_dropout[a](xa), self._sine_delta(a))
            else:
                result = result + self.lora_B[a](A(self.lora_dropout[a](xa))) * self.scaling[a]
        return result.to(out_dtype)

    def _mixed_batch_forward(self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any) -> torch.Tensor:
        if not any(self.is_sine(a) for a in set(adapter_names)):
            return super()._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        for a in set(adapter_names):
            if a in self.lora_variant:
                raise ValueError("SineLoRA layer: mixed batches with LoRA variants are not supported")
        from peft.tuners.lora.layer import VARIANT_KWARG_KEYS

        for k in VARIANT_KWARG_KEYS:
            kwargs.pop(k, None)
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        for a in set(adapter_names):
            if a == "__base__" or a not in self.lora_A.keys():
                continue
            idx = [i for i, n in enumerate(adapter_names) if n == a]
            sub = x[idx].to(self.lora_A[a].weight.dtype)
            if self.is_sine(a):
                out = F.linear(self.lora_dropout[a](sub), self._sine_delta(a))
            else:
                out = self.lora_B[a](self.lora_A[a](self.lora_dropout[a](sub))) * self.scaling[a]
            result[idx] += out.to(out_dtype)
        return result

    def __repr__(self) -> str:
        return "sinelora." + super().__repr__()[len("lora."):]


def sinelora_config(omega: float, gamma: float | str = GAMMA_SQRT_IN, **lora_kwargs: Any) -> SineLoraConfig:
    """A :class:`SineLoraConfig`: ω, γ (a number, ``"sqrt-in"`` for √in_features or
    ``"c*sqrt-in"`` for c·√in_features), and any :class:`peft.LoraConfig` keyword (``r``,
    ``lora_alpha``, ``target_modules``, ...)."""
    return SineLoraConfig(sinelora_frequency=omega, sinelora_scaling=_check_gamma(gamma), **lora_kwargs)


def sinelora_layers(model: nn.Module) -> dict[str, SineLoraLinear]:
    """Every :class:`SineLoraLinear` in ``model``, by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, SineLoraLinear)}


def _check_all_sine(model: nn.Module, adapter_name: str) -> None:
    """Every layer holding ``adapter_name`` must compute the sine: no silent plain-LoRA layer."""
    plain = []
    for name, mod in model.named_modules():
        r = getattr(mod, "r", None)  # every LoRA layer type records its adapters' ranks here
        if isinstance(mod, BaseTunerLayer) and isinstance(r, dict) and adapter_name in r:
            if not (isinstance(mod, SineLoraLinear) and mod.is_sine(adapter_name)):
                base = mod.get_base_layer()
                plain.append(f"{name} ({type(base).__name__})")
    if plain:
        raise ValueError(
            f"SineLoRA adapter '{adapter_name}': {len(plain)} targeted module(s) are not torch.nn.Linear "
            "layers (or were already plain LoRA layers) and would train as plain LoRA: "
            + preview(plain, limit=8)
        )


def get_sinelora_model(model: nn.Module, config: SineLoraConfig, adapter_name: str = "default", **kwargs: Any):
    """``peft.get_peft_model(model, config)``, then a check that every targeted module is a
    sine layer (a target PEFT would wrap as plain LoRA raises ``ValueError``)."""
    if not isinstance(config, SineLoraConfig) or not config.use_sinelora:
        raise TypeError("get_sinelora_model needs a SineLoraConfig (see sinelora_config)")
    pm = get_peft_model(model, config, adapter_name=adapter_name, **kwargs)
    _check_all_sine(pm, adapter_name)
    return pm


def add_sinelora_adapter(model: nn.Module, config: SineLoraConfig, adapter_name: str = "default") -> nn.Module:
    """``model.add_adapter(config, adapter_name)`` for models that carry their adapters
    themselves (diffusers' ``UNet2DConditionModel``, ``SD3Transformer2DModel``, ... and
    transformers models), then a check that every targeted module is a sine layer. The model is
    trained as it is and saved the way the diffusers DreamBooth scripts save (see the README);
    returns ``model``."""
    if not isinstance(config, SineLoraConfig) or not config.use_sinelora:
        raise TypeError("add_sinelora_adapter needs a SineLoraConfig (see sinelora_config)")
    add = getattr(model, "add_adapter", None)
    if add is None:
        raise TypeError(f"{type(model).__name__} has no add_adapter: use get_sinelora_model (a PeftModel wrapper)")
    add(config, adapter_name=adapter_name)
    _check_all_sine(model, adapter_name)
    return model


def _config_from_dir(path: str) -> SineLoraConfig:
    cfg_path = os.path.join(path, "adapter_config.json")
    try:
        with open(cfg_path, encoding="utf-8") as fh:
            raw = json.load(fh)
    except OSError as exc:
        raise ValueError(f"{cfg_path}: cannot read: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ValueError(f"{cfg_path}: not valid JSON: {exc}") from None
    if str(raw.get("peft_type", "LORA")).upper() != "LORA":
        raise ValueError(f"{cfg_path}: peft_type {raw.get('peft_type')!r}; load_sinelora reads LoRA-type configs")
    dc = raw.get("deltacodec") if isinstance(raw.get("deltacodec"), dict) else {}
    if not raw.get("use_sinelora") and dc.get("omega") is None:
        raise ValueError(f"{cfg_path}: not a SineLoRA adapter (no use_sinelora / deltacodec.omega)")
    if dc.get("omega") is not None:  # e.g. a directory written by `sld decode`
        raw["use_sinelora"] = True
        raw["sinelora_frequency"] = dc["omega"]
        if dc.get("gamma") is not None:
            raw["sinelora_scaling"] = None if dc["gamma"] == GAMMA_SQRT_IN else dc["gamma"]
    names = {f.name for f in fields(SineLoraConfig) if f.init}
    unknown = sorted(k for k in raw if k not in names and k != "deltacodec")
    if unknown:
        warnings.warn(f"{cfg_path}: ignoring keys this PEFT version does not know: {unknown}", stacklevel=3)
    return SineLoraConfig(**{k: v for k, v in raw.items() if k in names})


def load_sinelora(model: nn.Module, path: str | os.PathLike[str], adapter_name: str = "default",
                  is_trainable: bool = False, **kwargs: Any) -> PeftModel:
    """Load a saved SineLoRA adapter directory onto ``model`` (the PEFT counterpart of
    ``PeftModel.from_pretrained``, which would build plain LoRA layers from it).

    Also reads directories written by ``sld decode`` (their ``"deltacodec"`` block)."""
    path = os.fspath(path)
    config = _config_from_dir(path)
    pm = PeftModel.from_pretrained(model, path, adapter_name=adapter_name, is_trainable=is_trainable,
                                   config=config, **kwargs)
    _check_all_sine(pm, adapter_name)
    return pm
