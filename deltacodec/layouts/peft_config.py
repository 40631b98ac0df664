"""An adapter's config (``adapter_config.json`` or the ``adapter_config`` safetensors metadata),
read strictly: bounded in size and nesting, every key deltacodec reads type-checked, every key
that changes what the adapter means but that deltacodec ignores reported.

PEFT's ``LoraConfig`` is a dataclass that trusts its JSON: ``"use_rslora": "false"`` is truthy
there and ``r: 4.9`` breaks only later. Here each key gets the type PEFT declares for it, and a
value of any other type is an :class:`AdapterError` naming the file, the key and what was
expected. Defaults are PEFT's, so a config means here what it means to PEFT.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import AdapterError
from .patterns import KeyMatcher, PatternError, compile_key, pattern_key

__all__ = [
    "GAMMA_SQRT_IN",
    "sqrt_in_multiple",
    "gamma_for",
    "gamma_text",
    "MAX_CONFIG_BYTES",
    "MAX_CONFIG_DEPTH",
    "DEFAULT_LORA_ALPHA",
    "AdapterSettings",
    "read_config_file",
    "parse_config",
    "resolve_settings",
    "sine_metadata",
    "show",
    "show_name",
]

GAMMA_SQRT_IN = "sqrt-in"
# γ as a multiple of √in_features: "sqrt-in" (c = 1) or "c*sqrt-in" ("2*sqrt-in": the papers' 2√n).
_SQRT_IN_MULTIPLE = re.compile(r"(?:(?P<c>[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?)\*)?sqrt-in")
# A PEFT config is a few KB; a rank_pattern over every module of a 70B model is well under 1 MB.
MAX_CONFIG_BYTES = 4 << 20
# PEFT's deepest config value is a sub-config map inside the config map: depth 3.
MAX_CONFIG_DEPTH = 32
DEFAULT_LORA_ALPHA = 8  # LoraConfig's default, used when a config has no lora_alpha
# What the .sld header (msgpack) can hold: the config is stored there as it is.
_INT_MIN, _INT_MAX = -(1 << 63), (1 << 64) - 1
_PEFT_TYPES = ("LORA", "SINLORA")
_BIAS_VALUES = ("none", "all", "lora_only")
# init_lora_weights values that change the base model's weights at init (PEFT converts them
# back only when saving with path_initial_model_for_weight_conversion, which then writes True).
_BASE_MODIFYING_INITS = ("olora", "corda", "lora_ga", "loftq")


def sqrt_in_multiple(value: Any) -> float | None:
    """c when ``value`` says γ = c·√in_features ("sqrt-in": c = 1; "2*sqrt-in": c = 2; c a
    positive finite decimal), else None (a number, or any other text)."""
    if not isinstance(value, str):
        return None
    m = _SQRT_IN_MULTIPLE.fullmatch(value)
    if m is None:
        return None
    c = 1.0 if m["c"] is None else float(m["c"])
    return c if math.isfinite(c) and c > 0 else None


def gamma_for(gamma: float | str | None, in_features: int) -> float:
    """γ of a module with ``in_features`` inputs: None means √in_features, a "c*sqrt-in" text
    c·√in_features, a number itself."""
    c = 1.0 if gamma is None else sqrt_in_multiple(gamma)
    return c * math.sqrt(in_features) if c is not None else float(gamma)  # type: ignore[arg-type]


def gamma_text(c: float) -> str:
    """The config text of γ = c·√in_features (inverse of :func:`sqrt_in_multiple`)."""
    return GAMMA_SQRT_IN if c == 1.0 else f"{c!r}*{GAMMA_SQRT_IN}"


def show(value: Any) -> str:
    """A short, one-line description of a JSON value for an error message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        text = repr(value)
        return text if len(text) <= 40 else text[:37] + "..."
    if isinstance(value, str):
        text = json.dumps(value, ensure_ascii=True)
        return "the string " + (text if len(text) <= 60 else text[:57] + '..."')
    if isinstance(value, list):
        return f"a list of {len(value)} item{'s' if len(value) != 1 else ''}"
    if isinstance(value, dict):
        return f"a map of {len(value)} key{'s' if len(value) != 1 else ''}"
    return type(value).__name__


def show_name(name: Any, limit: int = 120) -> str:
    """A key or tensor name as it can be printed on one line: quoted, escaped when it holds
    characters a terminal would act on, cut at ``limit`` characters."""
    if not isinstance(name, str):
        return f"{type(name).__name__} {show(name) if isinstance(name, (int, float, bool)) else ''}".strip()
    text = f"'{name}'" if name.isprintable() else repr(name)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


# ----------------------------------------------------------------------------------------------
# Reading and parsing


def read_config_file(path: str) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when there is no such file.

    At most :data:`MAX_CONFIG_BYTES` are read. Anything at ``path`` that is not a regular file
    (a directory, a dangling link, a device) is an error, not "no config".
    """
    if not os.path.lexists(path):
        return None
    if not os.path.isfile(path):
        raise AdapterError(f"{path}: exists but is not a regular file")
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise AdapterError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return parse_config(data, path)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _Duplicate(k)
        out[k] = v
    return out


class _Duplicate(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def parse_config(data: str | bytes, where: str) -> dict[str, Any]:
    """Parse a config's JSON text and check it as a whole (see :func:`check_tree`)."""
    size = len(data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data)
    if size > MAX_CONFIG_BYTES:
        raise AdapterError(f"{where}: the config is larger than {MAX_CONFIG_BYTES} bytes; not an adapter config")
    try:
        text = data if isinstance(data, str) else data.decode("utf-8-sig")
        config = json.loads(text, object_pairs_hook=_no_duplicates)
    except _Duplicate as dup:
        raise AdapterError(f"{where}: key {show_name(dup.key)} appears twice in one JSON object") from None
    except RecursionError:
        raise AdapterError(f"{where}: JSON nested too deeply (the limit is {MAX_CONFIG_DEPTH})") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, int digit limit
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise AdapterError(f"{where}: not valid JSON: {first}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{where}: expected a JSON object, got {show(config)}")
    check_tree(config, where)
    return config


def _path(parent: str, key: Any) -> str:
    """A value's place in the config for messages: rank_pattern.q_proj, target_modules[2], and
    ["..."] (JSON-quoted, escaped) for a key that is empty or holds . [ ] ' or unprintables."""
    if isinstance(key, int):
        return f"{parent}[{key}]"
    if key and key.isprintable() and not any(c in key for c in ".[]'"):
        return f"{parent}.{key}" if parent else key
    return f"{parent}[{json.dumps(key, ensure_ascii=True)}]"


def check_tree(config: dict[str, Any], where: str) -> None:
    """Every value storable in the .sld header as it is: nesting at most
    :data:`MAX_CONFIG_DEPTH`, numbers finite (JSON's ``Infinity``/``NaN``, or ``1e400``, which
    parses to inf), integers within 64 bits, strings valid Unicode (no lone surrogates)."""
    stack: list[tuple[Any, str, int]] = [(config, "", 1)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_CONFIG_DEPTH:
            raise AdapterError(f"{where}: '{path}' is nested deeper than {MAX_CONFIG_DEPTH} levels")
        if isinstance(value, dict):
            for k, v in value.items():
                _check_string(k, _path(path, k), where, "key")
                stack.append((v, _path(path, k), depth + 1))
        elif isinstance(value, list):
            stack.extend((v, _path(path, i), depth + 1) for i, v in enumerate(value))
        elif isinstance(value, bool) or value is None:
            pass
        elif isinstance(value, int):
            if not _INT_MIN <= value <= _INT_MAX:
                raise AdapterError(f"{where}: '{path}' is {show(value)}, outside the 64-bit integer range")
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise AdapterError(f"{where}: '{path}' is {value!r} (Infinity, NaN or a number beyond float range)")
        elif isinstance(value, str):
            _check_string(value, path, where, "value")


def _check_string(s: str, path: str, where: str, what: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise AdapterError(f"{where}: '{path}': the {what} holds a lone surrogate (not valid Unicode)") from None


# ----------------------------------------------------------------------------------------------
# Typed access


class _Keys:
    """Typed reads of one config map; every failure names the file and the key."""

    def __init__(self, cfg: dict[str, Any], where: str, prefix: str = "") -> None:
        self.cfg, self.where, self.prefix = cfg, where, prefix

    def fail(self, key: str, expected: str, value: Any) -> AdapterError:
        return AdapterError(f"{self.where}: '{self.prefix}{key}' must be {expected}, got {show(value)}")

    def has(self, key: str) -> bool:
        return key in self.cfg

    def boolean(self, key: str, default: bool = False) -> bool:
        if key not in self.cfg:
            return default
        v = self.cfg[key]
        if not isinstance(v, bool):
            raise self.fail(key, "true or false (a JSON boolean)", v)
        return v

    def integer(self, key: str, lo: int, optional: bool = False) -> int | None:
        v = self.cfg.get(key)
        if key not in self.cfg or (v is None and optional):
            return None
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise self.fail(key, f"an integer >= {lo}" + (" or null" if optional else ""), v)
        return v

    def real(self, key: str, what: str = "a finite number", ok: Callable[[float], bool] = lambda x: True,
             optional: bool = True) -> float | None:
        v = self.cfg.get(key)
        if key not in self.cfg or (v is None and optional):
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not ok(v):
            raise self.fail(key, what + (" or null" if optional else ""), v)
        return float(v)

    def string(self, key: str, choices: tuple[str, ...] | None = None, optional: bool = True) -> str | None:
        v = self.cfg.get(key)
        if key not in self.cfg or (v is None and optional):
            return None
        if not isinstance(v, str) or (choices is not None and v not in choices):
            expected = "one of " + ", ".join(f'"{c}"' for c in choices) if choices else "a string"
            raise self.fail(key, expected + (" or null" if optional else ""), v)
        return v

    def strings(self, key: str, allow_str: bool) -> None:
        """A list of strings (or one string, where PEFT takes a regex), or null."""
        v = self.cfg.get(key)
        if v is None or (allow_str and isinstance(v, str)):
            return
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise self.fail(key, "a list of strings" + (", a string" if allow_str else "") + " or null", v)

    def ints(self, key: str) -> None:
        v = self.cfg.get(key)
        if v is None or (isinstance(v, int) and not isinstance(v, bool)):
            return
        if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            raise self.fail(key, "an integer, a list of integers or null", v)

    def mapping(self, key: str) -> dict[str, Any] | None:
        v = self.cfg.get(key)
        if v is None:
            return None
        if not isinstance(v, dict):
            raise self.fail(key, "a map (JSON object) or null", v)
        return v

    def listing(self, key: str) -> list[Any] | None:
        v = self.cfg.get(key)
        if v is None:
            return None
        if not isinstance(v, list):
            raise self.fail(key, "a list or null", v)
        return v


def _is_omega(x: float) -> bool:
    return x != 0


def _is_gamma(x: float) -> bool:
    return x > 0


# Config keys that change what the saved tensors mean, but that deltacodec (its codec and
# apply) does not model. Encoding still keeps every tensor and the config, and decode gives
# back a directory PEFT loads with its full meaning; apply would silently build a different
# model, hence a warning at encode time. key -> (kind, what it means).
_IGNORED_MEANING: dict[str, tuple[str, str]] = {
    "layer_replication": ("list", "layers are replicated: module names refer to the expanded model"),
    "target_parameters": ("list", "LoRA on bare nn.Parameters (e.g. MoE experts), not on linear layers"),
    "trainable_token_indices": ("list_or_map", "trainable-token deltas of embedding rows"),
    "alora_invocation_tokens": ("list", "aLoRA: the adapter acts only from its invocation tokens on, so it must not be merged"),
    "megatron_config": ("map", "Megatron parallel layers: factors are shards"),
    "use_bdlora": ("map", "BD-LoRA: block-diagonal factors"),
    "kasa_config": ("map", "KaSA: a learned diagonal between A and B, and a truncated base weight"),
    "arrow_config": ("map", "Arrow routing between several adapters"),
    "monteclora_config": ("map", "MonteCLoRA: sampled factors"),
    "use_qalora": ("bool", "QALoRA: lora_A acts on pooled inputs"),
}


@dataclass
class AdapterSettings:
    """What the config (and the caller's overrides) say about every module.

    ``alpha`` is None only when there is no config at all and no override: the scale is then
    unknown. ``gamma`` is a number, ``"sqrt-in"``, ``"c*sqrt-in"`` (c·√in_features) or None
    (√in_features, the default).
    """

    where: str
    src: str
    config: dict[str, Any]
    has_config: bool
    r: int | None = None
    alpha: float | None = None
    alpha_override: bool = False
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    sine: bool = False
    omega: float | None = None
    gamma: float | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_dora: bool = False
    lora_bias: bool = False
    notes: list[str] = field(default_factory=list)
    _rank_keys: dict[str, KeyMatcher] = field(default_factory=dict)
    _alpha_keys: dict[str, KeyMatcher] = field(default_factory=dict)

    def rank_for(self, module: str) -> int | None:
        """The rank the config declares for ``module`` (its name inside the base model)."""
        key = pattern_key(self.rank_pattern, self._rank_keys, module)
        return self.rank_pattern[key] if key is not None else self.r

    def alpha_for(self, module: str) -> float | None:
        """lora_alpha of ``module``: the override, else its alpha_pattern entry, else the default."""
        if self.alpha_override:
            return self.alpha
        key = pattern_key(self.alpha_pattern, self._alpha_keys, module)
        return self.alpha_pattern[key] if key is not None else self.alpha

    def alpha_origin(self, module: str) -> tuple[str, str]:
        """(where, what) the alpha of ``module`` came from, for messages."""
        if self.alpha_override:
            return self.src, "alpha (given)"
        key = pattern_key(self.alpha_pattern, self._alpha_keys, module)
        if key is not None:
            return self.where, f"'alpha_pattern' entry {show_name(key)}"
        return self.where, "'lora_alpha'"

    def pattern_work(self) -> int:
        """NFA state visits spent matching pattern keys so far (bounded; for tests)."""
        return sum(m.steps for m in (*self._rank_keys.values(), *self._alpha_keys.values()))


def _patterns(keys: _Keys, name: str, value_ok: Callable[[Any], bool], expected: str) -> tuple[dict[str, Any], dict[str, KeyMatcher]]:
    patterns = keys.mapping(name) or {}
    matchers: dict[str, KeyMatcher] = {}
    for k, v in patterns.items():
        if not value_ok(v):
            raise AdapterError(f"{keys.where}: '{name}' key {show_name(k)} must map to {expected}, got {show(v)}")
        try:
            matchers[k] = compile_key(k)
        except PatternError as exc:
            raise AdapterError(f"{keys.where}: '{name}' key {show_name(k)}: {exc}") from None
    return patterns, matchers


def _check_override(name: str, value: Any, where: str, what: str, ok: Callable[[float], bool]) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise AdapterError(f"{where}: {name} must be {what}, got {value!r}")
    return float(value)


def resolve_settings(
    config: dict[str, Any] | None,
    where: str,
    *,
    src: str,
    omega: Any = None,
    gamma: Any = None,
    alpha: Any = None,
) -> AdapterSettings:
    """Check every key deltacodec reads and resolve the overrides (``omega``, ``gamma``: a
    number or ``"sqrt-in"``, ``alpha``). ``where`` names the config in messages, ``src`` the
    adapter (for the overrides)."""
    omega = _check_override("omega", omega, src, "a finite, non-zero number", _is_omega)
    if isinstance(gamma, str) and sqrt_in_multiple(gamma) is not None:
        pass
    elif isinstance(gamma, str):
        raise AdapterError(f"{src}: gamma must be a number > 0, '{GAMMA_SQRT_IN}' or 'c*{GAMMA_SQRT_IN}', got {gamma!r}")
    else:
        gamma = _check_override("gamma", gamma, src, f"a finite number > 0 or '{GAMMA_SQRT_IN}'", _is_gamma)
    alpha = _check_override("alpha", alpha, src, "a finite number", lambda x: True)

    cfg = config if config is not None else {}
    k = _Keys(cfg, where)
    s = AdapterSettings(where=where, src=src, config=cfg, has_config=config is not None)

    peft_type = k.string("peft_type", _PEFT_TYPES, optional=False) or "LORA"
    s.r = k.integer("r", 1)
    cfg_alpha = k.real("lora_alpha", optional=False)
    s.use_rslora = k.boolean("use_rslora")
    s.fan_in_fan_out = k.boolean("fan_in_fan_out")
    s.rank_pattern, s._rank_keys = _patterns(
        k, "rank_pattern", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"
    )
    s.alpha_pattern, s._alpha_keys = _patterns(
        k, "alpha_pattern", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a finite number"
    )
    s.use_dora = k.boolean("use_dora")
    s.lora_bias = k.boolean("lora_bias")
    k.string("base_model_name_or_path")
    k.string("bias", _BIAS_VALUES, optional=False)
    k.strings("target_modules", allow_str=True)
    k.strings("exclude_modules", allow_str=True)
    k.strings("modules_to_save", allow_str=False)
    k.strings("layers_pattern", allow_str=True)
    k.ints("layers_to_transform")

    if alpha is not None:
        s.alpha, s.alpha_override = alpha, True
    elif cfg_alpha is not None:
        s.alpha = cfg_alpha
    elif config is not None:
        s.alpha = float(DEFAULT_LORA_ALPHA)
        s.notes.append(f"{where}: no 'lora_alpha': using PEFT's default {DEFAULT_LORA_ALPHA} (scale = {DEFAULT_LORA_ALPHA} / r)")

    # ω and γ: the reference fork's keys, then the proposed upstream ones, then deltacodec's
    # own (written by decode), then the caller's overrides.
    w: float | None = None
    g: float | str | None = None
    if peft_type == "SINLORA":
        s.sine = True
        w = k.real("freq")
    else:
        s.sine = k.boolean("use_sinelora")
        w = k.real("sinelora_frequency")
        if sqrt_in_multiple(cfg.get("sinelora_scaling")) is not None:
            g = cfg["sinelora_scaling"]
        else:
            g = k.real("sinelora_scaling", f"a number > 0, \"{GAMMA_SQRT_IN}\", \"c*{GAMMA_SQRT_IN}\"", _is_gamma)
    dc = k.mapping("deltacodec")
    if dc is not None:
        unknown = sorted(set(dc) - {"omega", "gamma"})
        if unknown:
            raise AdapterError(f"{where}: 'deltacodec' has unknown key {show_name(unknown[0])}; expected omega, gamma")
        dk = _Keys(dc, where, "deltacodec.")
        dw = dk.real("omega")
        if dw is not None:
            s.sine, w = True, dw
        if sqrt_in_multiple(dc.get("gamma")) is not None:
            g = dc["gamma"]
        else:
            dg = dk.real("gamma", f"a number > 0, \"{GAMMA_SQRT_IN}\", \"c*{GAMMA_SQRT_IN}\"", _is_gamma)
            g = dg if dg is not None else g
    if omega is not None:
        s.sine, w = True, omega
    if gamma is not None:
        g = gamma
    if s.sine and not w:
        raise AdapterError(
            f"{where if s.has_config else src}: a sine adapter needs a non-zero frequency ω (config 'freq' / "
            f"'sinelora_frequency', or --omega); got {show(w)}"
        )
    s.omega = w if s.sine else None
    if s.sine:
        s.gamma = g
    elif g is not None:
        s.notes.append(
            f"{src}: gamma ({show(g)}) is ignored: this is a plain LoRA adapter (an omega makes it a sine adapter)"
        )

    _note_ignored_meaning(k, s)
    return s


def _note_ignored_meaning(k: _Keys, s: AdapterSettings) -> None:
    for key, (kind, meaning) in _IGNORED_MEANING.items():
        if kind == "bool":
            active = k.boolean(key)
        elif kind == "map":
            active = k.mapping(key) is not None
        elif kind == "list":
            active = bool(k.listing(key))
        else:
            v = k.cfg.get(key)
            if v is not None and not isinstance(v, (list, dict)):
                raise k.fail(key, "a list, a map or null", v)
            active = bool(v)
        if active:
            s.notes.append(
                f"{k.where}: '{key}' is set ({meaning}); deltacodec stores the tensors and the config "
                "as they are, but apply does not model it and would build a different model"
            )
    init = k.cfg.get("init_lora_weights")
    if init is not None and not isinstance(init, (bool, str)):
        raise k.fail("init_lora_weights", "true, false or a string", init)
    if isinstance(init, str) and (init.startswith("pissa") or init in _BASE_MODIFYING_INITS):
        s.notes.append(
            f"{k.where}: init_lora_weights is \"{init}\": the adapter was trained on modified base weights "
            "(not converted at save time), so apply onto the original base model gives a different model"
        )


def sine_metadata(text: str, where: str) -> tuple[float, float | str | None]:
    """(ω, γ) from the ``deltacodec`` safetensors metadata key that decode writes into layouts
    with no place for them (kohya; diffusers without sine keys in its config): a JSON object
    ``{"omega": ω, "gamma": γ}``, γ a number > 0, "sqrt-in" or "c*sqrt-in" (absent: √in)."""
    cfg = parse_config(text, where)
    unknown = sorted(set(cfg) - {"omega", "gamma"})
    if unknown:
        raise AdapterError(f"{where}: unknown key {show_name(unknown[0])}; expected omega, gamma")
    k = _Keys(cfg, where)
    w = k.real("omega", "a finite, non-zero number", _is_omega, optional=False)
    if w is None:
        raise AdapterError(f"{where}: 'omega' is missing; a sine adapter needs its frequency ω")
    if sqrt_in_multiple(cfg.get("gamma")) is not None:
        return w, cfg["gamma"]
    return w, k.real("gamma", f"a number > 0, \"{GAMMA_SQRT_IN}\", \"c*{GAMMA_SQRT_IN}\"", _is_gamma)
