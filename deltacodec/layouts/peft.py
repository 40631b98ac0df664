"""The PEFT layout: ``<module>.lora_A.weight`` (r×in) and ``<module>.lora_B.weight`` (out×r),
usually prefixed ``base_model.model.``, with an ``adapter_config.json`` beside the weights (or the
config in the safetensors metadata under ``adapter_config``). LoRA and SineLoRA (the reference
fork's ``SINLORA`` configs, the proposed upstream ``use_sinelora`` keys, deltacodec's own).

Reading refuses, with the file and the tensor or key named, everything an ``.sld`` file could
not hold or would hold with a different meaning: several adapters in one file, two entries that
stand for the same model weight, a model checkpoint instead of an adapter, a scale or ΔW beyond
float32. The config is checked by :mod:`deltacodec.layouts.peft_config`. What is stored but that
``apply`` cannot honour (DoRA, LoRA biases, conv LoRA, config keys deltacodec does not model) is
a :class:`DeltacodecWarning`.

The grouping of factor keys into modules and the per-module rank/scale resolution are shared
with the diffusers layout, which is this one with a component prefix per module and a config per
component.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections import Counter
from typing import Any, Callable

import numpy as np

from ..errors import AdapterError, DecodeError, DeltacodecWarning, OutputError, preview
from .base import Adapter, AdapterModule, Source
from .checks import f32_finite, make_module
from .peft_config import (
    GAMMA_SQRT_IN,
    AdapterSettings,
    gamma_for,
    gamma_text,
    parse_config,
    read_config_file,
    resolve_settings,
    show_name,
)
from .tensors import check_storable

__all__ = [
    "NAME",
    "EXPECTED",
    "detect",
    "read",
    "write",
    "write_adapter",
    "decoded_config",
    "factor_keys",
    "group_factors",
    "build_modules",
    "check_collisions",
    "peft_notes",
    "has_config",
    "canonical",
    "config_problem",
    "config_from_modules",
    "sine_block",
    "tensor_specs",
    "match_factor",
    "GAMMA_SQRT_IN",
]

NAME = "peft"
EXPECTED = "PEFT (<module>.lora_A.weight / <module>.lora_B.weight, adapter_config.json beside or in the metadata)"

PEFT_PREFIX = "base_model.model."
# A LoRA factor's key: <module>.lora_A[.<adapter name>].weight. The adapter name is there in a
# model's own state dict (PEFT strips it when saving); more than one of them is several adapters.
FACTOR_KEY = re.compile(r"^(?:(?P<mod>.+)\.)?lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
EMBEDDING_FACTOR = re.compile(r"(?:^|\.)lora_embedding_[AB](?:\.[^.]+)?$")
_LORA_BIAS = re.compile(r"(?:^|\.)lora_[AB](?:\.[^.]+)?\.bias$")
_DORA = re.compile(r"(?:^|\.)lora_magnitude_vector(?:\.|$)")

# module -> {"A": (key, r×in array), "B": (key, out×r array)}, and for a conv module also
# "kernel": its weight shape (out, in, k...), the factors then being the kernels flattened
Pairs = dict[str, dict[str, Any]]


def canonical(name: str) -> str:
    """The model-side name an entry stands for: apply tries it with and without PEFT's prefix."""
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


def factor_keys(source: Source) -> list[str]:
    """Keys named like PEFT LoRA factors (linear or embedding)."""
    return [k for k in source.tensors if FACTOR_KEY.match(k) or EMBEDDING_FACTOR.search(k)]


def has_config(source: Source) -> bool:
    """A PEFT config is there: adapter_config.json beside the weights, or in the metadata."""
    return os.path.lexists(source.config_path) or "adapter_config" in source.metadata


def detect(source: Source) -> float | None:
    if not factor_keys(source):
        return None
    return 1.0 if has_config(source) else 0.5


# ----------------------------------------------------------------------------------------------
# Reading


def match_factor(key: str) -> tuple[str | None, str, str | None] | None:
    """(module, "A" or "B", adapter name) of a PEFT factor key, or None."""
    m = FACTOR_KEY.match(key)
    return None if m is None else (m["mod"], m["ab"], m["adapter"])


def group_factors(
    tensors: dict[str, tuple[np.ndarray, str]], path: str, match: Callable[[str], Any] = match_factor
) -> tuple[Pairs, dict[str, tuple[np.ndarray, str]], list[str]]:
    """(module -> {"A"/"B": (key, values)} for 2-D factor pairs, extras, non-linear factor keys).

    ``match(key)`` names a factor key's (module, "A"/"B", adapter name), None for other keys.
    A module whose factor-named tensors are all not 2-D (conv LoRA) is kept losslessly with
    the extras; one that mixes 2-D and other factors is an error, as is a factor without a
    module name and a file holding factors of more than one adapter.
    """
    groups: dict[str, dict[str, tuple[str, np.ndarray, str]]] = {}
    keys_by_tag: dict[str, dict[str | None, list[str]]] = {}  # module -> adapter name -> keys
    extras: dict[str, tuple[np.ndarray, str]] = {}
    twice: list[tuple[str, str, str, str]] = []  # two keys naming one factor (diffusers' styles)
    for key, (arr, dt) in tensors.items():
        m = match(key)
        if m is None:
            extras[key] = (arr, dt)
            continue
        mod, ab, tag = m
        if mod is None:
            raise AdapterError(f"{path}: tensor {show_name(key)} is named like a LoRA factor but names no module")
        keys_by_tag.setdefault(mod, {}).setdefault(tag, []).append(key)
        if ab in groups.get(mod, {}):
            twice.append((groups[mod][ab][0], key, ab, mod))
        groups.setdefault(mod, {})[ab] = (key, arr, dt)
    tags = {tag for by_tag in keys_by_tag.values() for tag in by_tag}
    if len(tags) > 1:
        both = next((by for by in keys_by_tag.values() if len(by) > 1), None)
        if both is not None:  # one module, several adapters: list its keys
            shown = sorted(k for ks in both.values() for k in ks)
        else:  # several adapters on different modules: one key of each
            shown = sorted(next(ks[0] for by in keys_by_tag.values() for t, ks in by.items() if t == tag) for tag in tags)
        names = sorted("(unnamed)" if t is None else f"'{t}'" for t in tags)
        raise AdapterError(
            f"{path}: holds LoRA factors of several adapters ({', '.join(names)}): {preview(shown, limit=4)}; "
            "an .sld holds one adapter: save each on its own with "
            "PeftModel.save_pretrained(dir, selected_adapters=[name])"
        )
    if twice:
        k1, k2, ab, mod = twice[0]
        raise AdapterError(f"{path}: tensors {show_name(k1)} and {show_name(k2)} are both the {ab} factor of module '{mod}'")
    pairs: Pairs = {}
    kernels: dict[str, tuple[int, ...]] = {}
    nonlinear: list[str] = []
    for mod, group in groups.items():
        dims = {ab: arr.ndim for ab, (_, arr, _) in group.items()}
        if all(d == 2 for d in dims.values()):
            pairs[mod] = {ab: (key, arr) for ab, (key, arr, _) in group.items()}
        elif _conv_pair(group):
            # PEFT's conv LoRA: lora_A is a conv (r, in, *kernel), lora_B a 1×…×1 conv (out, r, 1, ...)
            (ka, A, _), (kb, B, _) = group["A"], group["B"]
            pairs[mod] = {"A": (ka, A.reshape(A.shape[0], -1)), "B": (kb, B.reshape(B.shape[0], B.shape[1]))}
            kernels[mod] = (B.shape[0], *A.shape[1:])
        elif all(d != 2 for d in dims.values()):
            for key, arr, dt in group.values():
                extras[key] = (arr, dt)
                nonlinear.append(key)
        else:
            desc = ", ".join(f"{show_name(key)} is {list(arr.shape)}" for key, arr, _ in group.values())
            raise AdapterError(
                f"{path}: module '{mod}': {desc}; the factors of a linear layer are both 2-D (r×in, out×r)"
            )
    nonlinear += [k for k in extras if EMBEDDING_FACTOR.search(k)]
    for mod, ws in kernels.items():  # read by build_modules: the kernel shape rides with the pair
        pairs[mod]["kernel"] = ws
    return pairs, extras, nonlinear


def _conv_pair(group: dict[str, tuple[str, np.ndarray, str]]) -> bool:
    """Whether a module's factors are a conv LoRA pair: A (r, in, k...) and B (out, r, 1...), 3 to
    5 dimensions alike (Conv1d/2d/3d)."""
    if set(group) != {"A", "B"}:
        return False
    A, B = group["A"][1], group["B"][1]
    return (3 <= A.ndim <= 5 and B.ndim == A.ndim and B.shape[1] == A.shape[0]
            and all(s == 1 for s in B.shape[2:]) and A.shape[0] >= 1)


def check_collisions(modules: list[str], extras: list[str], path: str) -> None:
    """No two entries may stand for the same model tensor (apply would add or replace twice)."""
    claimed: dict[str, str] = {}

    def claim(name: str, owner: str) -> None:
        if name in claimed and claimed[name] != owner:
            raise AdapterError(
                f"{path}: {claimed[name]} and {owner} both stand for '{name}' in the model (names are "
                f"matched with and without PEFT's '{PEFT_PREFIX}' prefix): one weight, one entry"
            )
        claimed[name] = owner

    for mod in modules:
        c = canonical(mod)
        for name in (c, c + ".weight", c + ".lora_A.weight", c + ".lora_B.weight"):
            claim(name, f"module '{mod}'")
    for key in extras:
        claim(canonical(key), f"tensor '{key}'")


def peft_notes(st: AdapterSettings | None, extras: list[str], nonlinear: list[str], src: str) -> list[str]:
    """Warnings about what is stored but that apply cannot honour (``st``: the config's
    settings, None when the layout has none)."""
    notes = list(st.notes) if st is not None else []
    use_dora = bool(st and st.use_dora)
    lora_bias = bool(st and st.lora_bias)
    dora = [k for k in extras if _DORA.search(k)]
    if use_dora or dora:
        notes.append(
            f"{src}: a DoRA adapter ({'use_dora' if use_dora else ''}{', ' if use_dora and dora else ''}"
            f"{f'{len(dora)} lora_magnitude_vector tensors' if dora else ''}): stored losslessly and decode "
            "restores it, but apply will refuse it (DoRA is not supported by apply)"
        )
    biases = [k for k in extras if _LORA_BIAS.search(k)]
    if lora_bias or biases:
        notes.append(
            f"{src}: LoRA biases ({'lora_bias' if lora_bias else ''}{', ' if lora_bias and biases else ''}"
            f"{f'{len(biases)} lora_B.bias tensors' if biases else ''}): stored losslessly and decode restores "
            "them, but apply will refuse them"
        )
    if nonlinear:
        notes.append(
            f"{src}: {len(nonlinear)} LoRA factors of layers that are neither linear nor conv (embedding; e.g. "
            f"{preview(nonlinear, limit=3)}) are stored losslessly, not quantized; apply will refuse them"
        )
    return notes


def build_modules(
    pairs: Pairs,
    settings: Callable[[str], tuple[AdapterSettings, str]],
    wfile: str,
    *,
    default_alpha: Callable[[str, int], float | None] = lambda mod, r: None,
    no_alpha: str = "",
) -> list[AdapterModule]:
    """One module per lora_A/lora_B pair, in name order. ``settings(module)`` gives the config
    settings that govern the module and its name as the config's patterns see it;
    ``default_alpha(module, r)`` the alpha when the settings have none (None: an error saying
    ``no_alpha``)."""
    modules: list[AdapterModule] = []
    for mod in sorted(pairs):
        pair = pairs[mod]
        if "A" not in pair or "B" not in pair:
            have, miss = ("A", "B") if "A" in pair else ("B", "A")
            raise AdapterError(f"{wfile}: module '{mod}' has lora_{have} but no lora_{miss} weight")
        (ka, A), (kb, B) = pair["A"], pair["B"]
        r = A.shape[0]
        if B.shape[1] != r:
            raise AdapterError(
                f"{wfile}: module '{mod}': mismatched ranks, '{ka}' is {list(A.shape)} (r×in) and "
                f"'{kb}' is {list(B.shape)} (out×r)"
            )
        st, short = settings(mod)
        r_cfg = st.rank_for(short)
        if r_cfg is not None and r_cfg != r:
            raise AdapterError(
                f"{wfile}: module '{mod}': the config says rank {r_cfg}, the tensors have rank {r}"
            )
        a = st.alpha_for(short)
        if a is None:
            a = default_alpha(mod, r)
        if a is None:
            raise AdapterError(no_alpha)
        scale = a / (math.sqrt(r) if st.use_rslora else r)
        if not f32_finite(scale):
            origin, what = st.alpha_origin(short)
            raise AdapterError(
                f"{origin}: module '{mod}': scale = {what} / {'√r' if st.use_rslora else 'r'} = {scale:.3g} "
                "is beyond float32"
            )
        gm = gamma_for(st.gamma, A.shape[1]) if st.sine else None
        kernel = pair.get("kernel")
        modules.append(
            make_module(mod, (ka, A), (kb, B), scale, path=wfile, omega=st.omega if st.sine else None,
                        gamma=gm, fan_in_fan_out=st.fan_in_fan_out and kernel is None,
                        weight_shape=tuple(kernel) if kernel is not None else None)
        )
    return modules


def _config(source: Source) -> tuple[dict[str, Any] | None, str]:
    config = read_config_file(source.config_path)
    where = source.config_path if config is not None else source.src
    if config is None and "adapter_config" in source.metadata:
        where = f"{source.weights} (metadata 'adapter_config')"
        config = parse_config(source.metadata["adapter_config"], where)
    return config, where


def read(source: Source, *, omega: Any = None, gamma: Any = None, alpha: Any = None) -> Adapter:
    config, cfg_where = _config(source)
    st = resolve_settings(config, cfg_where, src=source.src, omega=omega, gamma=gamma, alpha=alpha)
    wfile = source.weights
    pairs, extras, nonlinear = group_factors(source.tensors, wfile)
    if not pairs and not nonlinear:
        names = sorted(source.tensors)
        raise AdapterError(
            f"{wfile}: no lora_A/lora_B pairs ({len(names)} tensor{'s' if len(names) != 1 else ''}: "
            f"{preview(names, limit=3)}); expected {EXPECTED}"
        )
    for key, (arr, _) in extras.items():
        check_storable(key, arr, wfile)
    check_collisions(sorted(pairs), sorted(extras), wfile)
    modules = build_modules(
        pairs, lambda mod: (st, canonical(mod)), wfile,
        no_alpha=f"{source.src}: no adapter_config.json (nor 'adapter_config' metadata) to take lora_alpha "
        "from: pass --alpha (scale = alpha / r)",
    )
    for note in peft_notes(st, sorted(extras), nonlinear, source.src):
        warnings.warn(note, DeltacodecWarning, stacklevel=4)  # the caller of read_adapter
    return Adapter(modules=modules, extras=extras, config=st.config, source=source.src, layout=NAME)


# ----------------------------------------------------------------------------------------------
# Writing


def write_adapter(
    out: str | os.PathLike[str],
    tensors: dict[str, Any],
    config: dict[str, Any],
    *,
    force: bool = False,
    inputs: Any = (),
    progress: Any = None,
) -> list[str]:
    """Write an adapter in PEFT layout; returns the paths written.

    ``tensors`` maps names to numpy arrays, torch tensors (bfloat16 included), or
    :class:`deltacodec.safetensors_io.TensorSpec` (values produced on demand: written one tensor
    at a time, so peak memory is one tensor). ``out`` ending in ``.safetensors``: one file, the
    config in its metadata under ``adapter_config``. Otherwise a directory with
    ``adapter_model.safetensors`` and ``adapter_config.json``, built beside ``out`` and renamed
    into place whole. An existing ``out`` is refused unless ``force``; one that is, lies inside
    or contains any of ``inputs`` (paths) is refused even with ``force`` (:class:`OutputError`).
    ``progress(i, n, name)`` is called before each tensor is written.
    """
    from ..outputs import atomic_file, staged_directory
    from ..safetensors_io import write_safetensors

    out = os.fspath(out)
    try:
        cfg_json = json.dumps(config, indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise OutputError(f"{out}: the adapter config cannot be written as JSON: {exc}") from None
    specs = tensor_specs(out, tensors)
    if out.endswith(".safetensors"):
        with atomic_file(out, inputs=inputs, force=force) as fh:
            write_safetensors(fh, specs, {"adapter_config": cfg_json, "format": "pt"}, progress=progress)
        return [out]
    with staged_directory(out, inputs=inputs, force=force) as stage:
        with stage.open("adapter_model.safetensors") as fh:
            write_safetensors(fh, specs, {"format": "pt"}, progress=progress)
        with stage.open("adapter_config.json") as fh:
            fh.write((cfg_json + "\n").encode())
    return [os.path.join(out, "adapter_model.safetensors"), os.path.join(out, "adapter_config.json")]


def tensor_specs(out: str, tensors: dict[str, Any]) -> dict[str, Any]:
    """Each value of ``tensors`` (numpy array, torch tensor or TensorSpec) as a TensorSpec."""
    from ..safetensors_io import TensorSpec

    st_dtypes = {
        "f8": "F64", "f4": "F32", "f2": "F16", "i8": "I64", "i4": "I32", "i2": "I16", "i1": "I8",
        "u8": "U64", "u4": "U32", "u2": "U16", "u1": "U8", "b1": "BOOL",
    }

    def spec(name: str, t: Any) -> TensorSpec:
        if isinstance(t, TensorSpec):
            return t
        dtype = None
        if type(t).__module__.split(".")[0] == "torch":
            t = t.detach().to("cpu").contiguous()
            if str(t.dtype) == "torch.bfloat16":
                import torch

                arr, dtype = t.view(torch.int16).numpy().view("<u2"), "BF16"
            else:
                arr = t.numpy()
        else:
            arr = np.asarray(t)
        if dtype is None:
            dtype = st_dtypes.get(arr.dtype.str[1:])
            if dtype is None:
                raise OutputError(f"{out}: tensor '{name}' has dtype {arr.dtype}, which safetensors cannot hold here")
        return TensorSpec(dtype, tuple(arr.shape), lambda arr=arr: [arr])

    return {name: spec(name, t) for name, t in tensors.items()}


def write(out: str, f: Any, specs: dict[str, Any], info: Any, *, force: bool, inputs: Any, progress: Any) -> list[str]:
    """A decoded file in PEFT layout (``info`` is not used: the config is in the metadata)."""
    return write_adapter(out, specs, decoded_config(f), force=force, inputs=inputs, progress=progress)


# ----------------------------------------------------------------------------------------------
# The config of a decoded file


def _plain_config(value: Any) -> dict[str, Any] | None:
    """A JSON-clean copy of a stored config map, or None when it is not one (not a map, bytes,
    non-finite numbers, nesting too deep for JSON)."""
    if not isinstance(value, dict):
        return None
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError, RecursionError):
        return None


def config_problem(cfg: dict[str, Any], modules: list[Any]) -> str | None:
    """Why ``cfg`` would not rebuild ``modules``' rank, scale, kind or layout, or None.

    With rank_pattern/alpha_pattern the per-module scale is PEFT's business and is not rechecked.
    A config without lora_alpha means alpha = r (diffusers' convention for files without one).
    """
    sine_cfg = (
        str(cfg.get("peft_type", "LORA")).upper() == "SINLORA"
        or cfg.get("use_sinelora") is True
        or (isinstance(cfg.get("deltacodec"), dict) and cfg["deltacodec"].get("omega") is not None)
    )
    if modules and sine_cfg != any(m.sine for m in modules):
        return f"it describes a {'sine' if sine_cfg else 'plain LoRA'} adapter, the file holds the other kind"
    for key, types in (("r", int), ("lora_alpha", (int, float)), ("use_rslora", bool), ("fan_in_fan_out", bool)):
        v = cfg.get(key)
        if v is not None and (not isinstance(v, types) or (isinstance(v, bool) and types is not bool)):
            return f"'{key}' is {v!r}"
    fifo = bool(cfg.get("fan_in_fan_out", False))
    for m in modules:
        if m.fan_in_fan_out != fifo:
            return f"fan_in_fan_out is {fifo}, module '{m.name}' has {m.fan_in_fan_out}"
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        return None
    r, alpha, rs = cfg.get("r"), cfg.get("lora_alpha"), bool(cfg.get("use_rslora", False))
    for m in modules:
        if r is not None and r != m.rank:
            return f"r is {r}, module '{m.name}' has rank {m.rank}"
        a = float(alpha) if alpha is not None else float(m.rank)
        want = a / (math.sqrt(m.rank) if rs else m.rank)
        if not math.isclose(want, m.scale, rel_tol=1e-9):
            return f"it gives module '{m.name}' scale {want:g}, the file says {m.scale:g}"
    return None


def config_from_modules(modules: list[Any], short: Callable[[str], str] = canonical) -> dict[str, Any]:
    """r, lora_alpha (= scale·rank), rank_pattern and alpha_pattern that rebuild every module's
    rank and scale: the most common rank and alpha, patterns for the rest (keyed ``short(name)``)."""
    if not modules:
        return {}
    r = Counter(m.rank for m in modules).most_common(1)[0][0]
    alphas = {m.name: m.scale * m.rank for m in modules}
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return dict(
        r=r,
        lora_alpha=alpha,
        use_rslora=False,
        fan_in_fan_out=all(m.fan_in_fan_out for m in modules),
        target_modules=sorted({m.name.rsplit(".", 1)[-1] for m in modules}),
        rank_pattern={short(m.name): m.rank for m in modules if m.rank != r},
        alpha_pattern={short(m.name): alphas[m.name] for m in modules if alphas[m.name] != alpha},
    )


def sine_block(modules: list[Any], path: str) -> dict[str, Any] | None:
    """``{"omega": ω, "gamma": γ}`` of the sine modules (γ as "sqrt-in" or "c*sqrt-in" when every
    module's γ is one multiple of √in_features), None without sine modules; a DecodeError when
    the modules disagree (a config holds one ω and one γ)."""
    sine = [m for m in modules if m.sine]
    if not sine:
        return None
    omegas = {m.omega for m in sine}
    if len(omegas) != 1:
        raise DecodeError(f"{path}: modules use different ω {sorted(omegas)}; a config holds one")
    ratios = [m.gamma / math.sqrt(m.in_features) for m in sine]
    c = float(f"{ratios[0]:.12g}")
    gammas = {m.gamma for m in sine}
    same_multiple = all(math.isclose(x, c, rel_tol=1e-12) for x in ratios)
    if same_multiple and (c == 1.0 or len(gammas) > 1):
        gamma: Any = gamma_text(c)
    elif len(gammas) == 1:
        gamma = gammas.pop()
    else:
        raise DecodeError(f"{path}: modules use different γ {sorted(gammas)}; a config holds one")
    return {"omega": omegas.pop(), "gamma": gamma}


def decoded_config(f: Any) -> dict[str, Any]:
    """adapter_config.json for a decoded file: the stored config plus ω and γ of sine modules.

    The stored config is metadata, which a reader must not need: when it is missing (or empty,
    as for files read from other layouts) the config is rebuilt from the header; when it is unusable (not a map, not JSON-clean, or disagreeing
    with the modules' rank, scale, kind or layout) it is rebuilt too, with a DeltacodecWarning.
    """
    stored = f.metadata.get("adapter_config")
    cfg = _plain_config(stored)
    why = "it is not a JSON map" if cfg is None else ("empty" if not cfg else config_problem(cfg, f.modules))
    if why is not None:
        # An empty map is what a file from another layout (diffusers, kohya) stores: no config
        # of its own to keep, so nothing to warn about.
        if stored is not None and stored != {}:
            warnings.warn(
                f"{f.path}: the stored adapter_config is not usable ({why}); writing one rebuilt from the header",
                DeltacodecWarning,
                stacklevel=5,
            )
        cfg = {"peft_type": "LORA"}
        base = f.metadata.get("base_model")
        if isinstance(base, str):
            cfg["base_model_name_or_path"] = base
        cfg.update(config_from_modules(f.modules))
    assert cfg is not None
    cfg.pop("deltacodec", None)
    mixed = sorted({m.fan_in_fan_out for m in f.modules})
    if len(mixed) > 1:
        warnings.warn(
            f"{f.path}: modules differ in fan_in_fan_out; a PEFT config holds one value, the decoded "
            f"config says {cfg.get('fan_in_fan_out', False)}",
            DeltacodecWarning,
            stacklevel=5,
        )
    block = sine_block(f.modules, f.path)
    if block is not None:
        cfg["deltacodec"] = block
    return cfg

