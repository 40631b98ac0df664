"""The diffusers LoRA layout: what ``save_lora_weights`` and the DreamBooth LoRA scripts write
(``pytorch_lora_weights.safetensors``).

Keys name a module's factors, prefixed with the pipeline component it adapts (``unet.``,
``transformer.``, ``text_encoder.``, ``text_encoder_2.``, ...), in one of four styles: PEFT's
``<module>.lora_A.weight`` (r×in) / ``.lora_B.weight`` (out×r), which the SD3/Flux scripts and
``save_lora_adapter`` write; and diffusers' own, which ``convert_state_dict_to_diffusers`` makes
of them in the SD 1.x/SDXL scripts: ``<module>.lora.down.weight`` / ``.lora.up.weight`` (UNet)
and ``<module>.lora_linear_layer.down.weight`` / ``.up.weight`` (text encoders); and the
attention processors' of diffusers < 0.19, ``<attention>.processor.to_q_lora.down.weight`` /
``.up.weight`` (``to_k``, ``to_v``, ``to_out`` alike), read as the modules ``<attention>.to_q``
... ``<attention>.to_out.0`` so that apply finds them. The style is kept per component in ``layout_info`` and written back. Newer diffusers store each component's LoRA config (its
``LoraConfig.to_dict()``) in the safetensors metadata under ``lora_adapter_metadata``, as one
JSON object whose keys are the config's keys prefixed the same way (``"unet.r"``,
``"unet.lora_alpha"``, ...); rank_pattern / alpha_pattern keys are module names inside the
component. Older files have no config: alpha then equals the rank (scale 1), as diffusers loads
them.

``layout_info`` keeps the file name and the original metadata, written back verbatim on decode
(so ``pipe.load_lora_weights(decoded)`` reads the same config), unless the stored config no
longer describes the modules, when that component's config is rebuilt from the header.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections import Counter
from typing import Any

from ..errors import AdapterError, DecodeError, DeltacodecWarning, preview
from .base import (INFO_VERSION, Adapter, Source, UnusableInfo, check_info, info_file_name, info_metadata,
                   write_one_file)
from . import peft
from .tensors import check_storable
from .peft_config import AdapterSettings, gamma_for, parse_config, resolve_settings, show_name, sine_metadata

__all__ = ["NAME", "EXPECTED", "COMPONENTS", "METADATA_KEY", "FILE_NAME", "component_of", "detect", "read", "write"]

NAME = "diffusers"
# diffusers' LoRA-loadable pipeline components (the `_lora_loadable_modules` of its loaders).
COMPONENTS = (
    "unet", "transformer", "transformer_2", "transformer_ref", "text_encoder", "text_encoder_2",
    "text_encoder_3", "connectors", "text_conditioner",
)
EXPECTED = (
    "diffusers (<component>.<module>.lora_A.weight / .lora_B.weight, <component> one of unet, transformer, "
    "text_encoder, text_encoder_2, ...; pytorch_lora_weights.safetensors)"
)
METADATA_KEY = "lora_adapter_metadata"
FILE_NAME = "pytorch_lora_weights.safetensors"
SINE_KEY = "deltacodec"  # ω and γ, written by decode when the component configs do not say them
# factor-name style -> (A suffix, B suffix)
STYLES = {
    "peft": ("lora_A.weight", "lora_B.weight"),
    "lora": ("lora.down.weight", "lora.up.weight"),
    "lora_linear_layer": ("lora_linear_layer.down.weight", "lora_linear_layer.up.weight"),
    # diffusers < 0.19 (LoRAAttnProcessor): <attention>.processor.to_q_lora.down.weight for the
    # module <attention>.to_q (to_out_lora: <attention>.to_out.0); keys built by _processor_key
    "processor": ("", ""),
}
FACTOR_KEY = re.compile(
    r"^(?:(?P<mod>.+)\.)?(?:lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight"
    r"|(?P<style>lora|lora_linear_layer)\.(?P<du>down|up)\.weight)$"
)
PROCESSOR_KEY = re.compile(r"^(?P<attn>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<du>down|up)\.weight$")
_PROCESSOR_MODULE = re.compile(r"^(?P<attn>.+)\.(?P<proj>to_q|to_k|to_v|to_out\.0)$")


def match_factor(key: str) -> tuple[str | None, str, str | None] | None:
    """(module, "A"/"B", adapter name) of a factor key in any of the four styles, or None."""
    p = PROCESSOR_KEY.match(key)
    if p is not None:
        proj = "to_out.0" if p["proj"] == "to_out" else p["proj"]
        return f"{p['attn']}.{proj}", "A" if p["du"] == "down" else "B", None
    m = FACTOR_KEY.match(key)
    if m is None:
        return None
    return m["mod"], m["ab"] or ("A" if m["du"] == "down" else "B"), m["adapter"]


def style_of(key: str) -> str:
    if PROCESSOR_KEY.match(key):
        return "processor"
    m = FACTOR_KEY.match(key)
    assert m is not None
    return m["style"] or "peft"


def _processor_key(module: str, part: str) -> str:
    """The attention-processor key of ``module``'s ``part`` ("down"/"up"); :class:`UnusableInfo`
    for a module that style cannot name (not an attention's to_q/to_k/to_v/to_out.0)."""
    m = _PROCESSOR_MODULE.match(module)
    if m is None:
        raise UnusableInfo(f"module '{module}' has no attention-processor key (key style 'processor')")
    proj = "to_out" if m["proj"] == "to_out.0" else m["proj"]
    return f"{m['attn']}.processor.{proj}_lora.{part}.weight"


def factor_keys(source: Source) -> list[str]:
    """Keys named like factors in any of the four styles."""
    return [k for k in source.tensors if FACTOR_KEY.match(k) or PROCESSOR_KEY.match(k)]


def component_of(name: str) -> str | None:
    """The pipeline component a key or module name starts with, or None."""
    first, dot, rest = name.partition(".")
    return first if dot and rest and first in COMPONENTS else None


def detect(source: Source) -> float | None:
    keys = factor_keys(source)
    prefixed = [k for k in keys if component_of(k)]
    if not prefixed:
        return None
    if METADATA_KEY in source.metadata or source.file_name.startswith("pytorch_lora_weights."):
        return 0.9
    return 0.7 if len(prefixed) == len(keys) else 0.3


def _component_configs(source: Source) -> dict[str, dict[str, Any]] | None:
    """Each component's config from ``lora_adapter_metadata`` (None: the file has none)."""
    raw = source.metadata.get(METADATA_KEY)
    if raw is None:
        return None
    where = f"{source.weights} (metadata '{METADATA_KEY}')"
    flat = parse_config(raw, where)
    out: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        comp = component_of(key)
        if comp is None:
            raise AdapterError(
                f"{where}: key {show_name(key)} does not start with a pipeline component and a dot "
                f"(expected e.g. 'unet.r'; components: {', '.join(COMPONENTS)})"
            )
        out.setdefault(comp, {})[key[len(comp) + 1:]] = value
    return out


def read(source: Source, *, omega: Any = None, gamma: Any = None, alpha: Any = None) -> Adapter:
    wfile = source.weights
    configs = _component_configs(source)
    if omega is None and SINE_KEY in source.metadata:
        omega, g = sine_metadata(source.metadata[SINE_KEY], f"{wfile} (metadata '{SINE_KEY}')")
        gamma = g if gamma is None else gamma
    pairs, extras, nonlinear = peft.group_factors(source.tensors, wfile, match_factor)
    stray = sorted(k for k in source.tensors if component_of(k) is None)
    if stray:
        raise AdapterError(
            f"{wfile}: tensor {show_name(stray[0])} has no pipeline-component prefix; a diffusers LoRA file "
            f"prefixes every key with the component it adapts ({', '.join(COMPONENTS[:5])}, ...)"
            + (f" ({len(stray)} such tensors: {preview(stray, limit=3)})" if len(stray) > 1 else "")
        )
    if not pairs and not nonlinear:
        names = sorted(source.tensors)
        raise AdapterError(f"{wfile}: no lora_A/lora_B pairs ({len(names)} tensors: {preview(names, limit=3)})")
    for key, (arr, _) in extras.items():
        check_storable(key, arr, wfile)
    peft.check_collisions(sorted(pairs), sorted(extras), wfile)

    settings: dict[str, AdapterSettings] = {}
    for comp in sorted({component_of(k) for k in source.tensors} - {None}):  # type: ignore[arg-type]
        cfg = configs.get(comp) if configs is not None else None
        where = f"{wfile} (metadata '{METADATA_KEY}', component '{comp}')" if cfg is not None else source.src
        settings[comp] = resolve_settings(cfg, where, src=source.src, omega=omega, gamma=gamma, alpha=alpha)

    def module_settings(mod: str) -> tuple[AdapterSettings, str]:
        comp = component_of(mod)
        assert comp is not None
        return settings[comp], mod[len(comp) + 1:]

    # Without a config diffusers loads alpha = rank (scale 1): see its get_peft_kwargs.
    modules = peft.build_modules(pairs, module_settings, wfile, default_alpha=lambda mod, r: float(r))
    notes: list[str] = []
    for comp, st in settings.items():
        for note in peft.peft_notes(st, [k for k in extras if component_of(k) == comp], [], source.src):
            if note not in notes:
                notes.append(note)
    notes += peft.peft_notes(None, [], nonlinear, source.src)
    for note in notes:
        warnings.warn(note, DeltacodecWarning, stacklevel=4)  # the caller of read_adapter
    info = {"version": INFO_VERSION, "file_name": source.file_name if source.file_name.endswith(".safetensors") else FILE_NAME,
            "metadata": dict(source.metadata)}
    info.update(_styles({mod: style_of(pair["A" if "A" in pair else "B"][0]) for mod, pair in pairs.items()}))
    return Adapter(modules=modules, extras=extras, config={}, source=source.src, layout=NAME, layout_info=info)


def _styles(by_module: dict[str, str]) -> dict[str, Any]:
    """layout_info's ``key_style`` (component -> its modules' usual style) and ``key_style_other``
    (module -> style, for the modules that differ), PEFT's style left out."""
    by_comp: dict[str, Counter[str]] = {}
    for mod, st in by_module.items():
        by_comp.setdefault(component_of(mod) or "", Counter())[st] += 1
    usual = {c: n.most_common(1)[0][0] for c, n in by_comp.items()}
    other = {mod: st for mod, st in by_module.items() if st != usual[component_of(mod) or ""]}
    out: dict[str, Any] = {"key_style": {c: st for c, st in sorted(usual.items()) if st != "peft"}}
    if other:
        out["key_style_other"] = dict(sorted(other.items()))
    return out


def _keys_for(info: dict[str, Any], module: str) -> tuple[str, str]:
    """The (A, B) keys of ``module`` as the original file named them."""
    other = info.get("key_style_other", {})
    usual = info.get("key_style", {})
    if not isinstance(other, dict) or not isinstance(usual, dict):
        raise UnusableInfo("'key_style' is not a map")
    st = other.get(module, usual.get(component_of(module) or "", "peft"))
    if st not in STYLES:
        raise UnusableInfo(f"key style {st!r:.40} of '{module}' is not one of {', '.join(STYLES)}")
    if st == "processor":
        return _processor_key(module, "down"), _processor_key(module, "up")
    a, b = STYLES[st]
    return f"{module}.{a}", f"{module}.{b}"


# ----------------------------------------------------------------------------------------------
# Writing


def _stored_configs(f: Any, meta: dict[str, str]) -> dict[str, dict[str, Any]] | None:
    """The component configs of the original metadata (None: there were none, or they are not
    a JSON map, which is warned about)."""
    raw = meta.get(METADATA_KEY)
    if raw is None:
        return None
    try:
        flat = json.loads(raw)
        configs: dict[str, dict[str, Any]] = {}
        for key, value in flat.items():
            comp, _, rest = key.partition(".")
            configs.setdefault(comp, {})[rest] = value
        if all(isinstance(c, dict) for c in configs.values()):
            return configs
    except (ValueError, AttributeError, TypeError, RecursionError):
        pass
    warnings.warn(f"{f.path}: the stored '{METADATA_KEY}' is not a JSON map of component configs; rebuilt from the header",
                  DeltacodecWarning, stacklevel=4)
    return None


def _config_problem(cfg: Any, comp: str, mods: list[Any], path: str) -> str | None:
    """Why the component config ``cfg``, read as :func:`read` reads it, would not give ``mods``
    their rank, scale, kind or layout (None: it does). Patterns included."""
    if not isinstance(cfg, dict):
        return "not a map"
    try:
        st = resolve_settings(cfg, path, src=path)
    except AdapterError as exc:
        return str(exc)
    for m in mods:
        short = m.name[len(comp) + 1:]
        r = st.rank_for(short)
        if r is not None and r != m.rank:
            return f"it says rank {r} for '{m.name}', the file has {m.rank}"
        a = st.alpha_for(short)
        a = float(m.rank) if a is None else a
        want = a / (math.sqrt(m.rank) if st.use_rslora else m.rank)
        if not math.isclose(want, m.scale, rel_tol=1e-9):
            return f"it gives '{m.name}' scale {want:g}, the file says {m.scale:g}"
        if st.sine != m.sine or st.fan_in_fan_out != m.fan_in_fan_out:
            return f"it describes '{m.name}' as {'sine' if st.sine else 'plain'} LoRA with fan_in_fan_out {st.fan_in_fan_out}"
    return None


def _metadata_for(f: Any, meta: dict[str, str]) -> dict[str, str]:
    """The original metadata, with the component configs checked against the modules. When a
    stored config no longer describes its modules (rank, scale, kind), or there is none and a
    scale is not 1 (what diffusers assumes without one), every component's config is written,
    the unusable ones rebuilt from the header."""
    by_comp: dict[str, list[Any]] = {}
    for m in f.modules:
        by_comp.setdefault(component_of(m.name) or "", []).append(m)
    had = METADATA_KEY in meta
    configs = _stored_configs(f, meta)
    final: dict[str, dict[str, Any]] = {}
    rebuild = configs is None and had
    for comp, mods in sorted(by_comp.items()):
        cfg = configs.get(comp) if configs is not None else None
        if cfg is None:
            why = "none stored" if configs is not None else None
            if configs is None and not had and (any(m.scale != 1.0 for m in mods) or any(m.fan_in_fan_out for m in mods)):
                why = "none stored, and a scale is not 1"
        else:
            why = _config_problem(cfg, comp, mods, f.path)
        if why is not None:
            if configs is not None:
                warnings.warn(f"{f.path}: the stored config of component '{comp}' is not usable ({why}); "
                              "rebuilt from the header", DeltacodecWarning, stacklevel=4)
            rebuild = True
        final[comp] = cfg if why is None and cfg is not None else peft.config_from_modules(mods, lambda n, c=comp: n[len(c) + 1:])
    out = dict(meta)
    if rebuild:
        out[METADATA_KEY] = json.dumps({f"{c}.{k}": v for c, cfg in final.items() for k, v in cfg.items()},
                                       indent=2, sort_keys=True)
    return out


def _configs_say_sine(f: Any, meta: dict[str, str]) -> bool:
    """Whether the component configs in ``meta``, read as this layout's reader reads them, give
    every module its ω and γ (then decode needs no ``deltacodec`` key)."""
    try:
        source = Source(src=f.path, weights=f.path, tensors={}, metadata=meta, config_path="")
        configs = _component_configs(source) or {}
        for m in f.modules:
            comp = component_of(m.name)
            cfg = configs.get(comp) if comp else None
            if cfg is None:
                return False
            st = resolve_settings(cfg, f.path, src=f.path)
            if not st.sine or st.omega != m.omega:
                return False
            if not math.isclose(gamma_for(st.gamma, m.in_features), m.gamma, rel_tol=1e-12):
                return False
        return True
    except AdapterError:
        return False


def write(out: str, f: Any, specs: dict[str, Any], info: Any, *, force: bool, inputs: Any, progress: Any) -> list[str]:
    """The decoded file as ``<out>/<file name>`` (or ``out`` itself when it ends in
    .safetensors), with the original metadata."""

    info = check_info(info, NAME)
    name = info_file_name(info, FILE_NAME)
    meta = info_metadata(info)
    stray = [m.name for m in f.modules if component_of(m.name) is None]
    if stray:
        raise UnusableInfo(f"module '{stray[0]}' has no pipeline-component prefix")
    renamed: dict[str, Any] = {}
    factor_of = {}
    for m in f.modules:
        factor_of[m.A.name], factor_of[m.B.name] = _keys_for(info, m.name)
    for key, spec in specs.items():
        new = factor_of.get(key, key)
        if new in renamed:
            raise DecodeError(f"{f.path}: two tensors would be written as '{new}'")
        renamed[new] = spec
    meta = _metadata_for(f, meta)
    meta.pop(SINE_KEY, None)
    block = peft.sine_block(f.modules, f.path)
    if block is not None and not _configs_say_sine(f, meta):
        meta[SINE_KEY] = json.dumps(block, sort_keys=True)
    return write_one_file(out, name, renamed, meta, force=force, inputs=inputs, progress=progress)
