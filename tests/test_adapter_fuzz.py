"""Random adapter directories: plausible and wrong configs (every known key replaced by any JSON
value, random nesting, raw fragments JSON parses to inf or nests deeply, random extra keys),
random tensor sets (names, shapes, dtypes, missing halves, several adapters, colliding names,
non-finite values) and random overrides. read_adapter and encode raise only deltacodec's own
errors, each on one line naming the file and, for a config at fault, the key; what they accept
encodes to a file the reader takes. The default profile runs in seconds; -m exhaustive with
HYPOTHESIS_PROFILE=slow runs thousands of examples."""

from __future__ import annotations

import json
import os
import tempfile
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import deltacodec
from deltacodec.adapter import read_adapter
from deltacodec.errors import SldError

from adapter_dirs import BASE_CONFIG, lora_tensors, save_tensors

KNOWN_KEYS = [
    "peft_type", "r", "lora_alpha", "use_rslora", "fan_in_fan_out", "rank_pattern", "alpha_pattern",
    "use_sinelora", "sinelora_frequency", "sinelora_scaling", "freq", "s", "deltacodec", "base_model_name_or_path",
    "use_dora", "lora_bias", "target_modules", "modules_to_save", "exclude_modules", "layers_to_transform",
    "layers_pattern", "bias", "init_lora_weights", "layer_replication", "target_parameters", "use_qalora",
    "trainable_token_indices", "megatron_config", "alora_invocation_tokens", "kasa_config", "lora_dropout",
]
BASES = [
    BASE_CONFIG,
    {"peft_type": "SINLORA", "r": 4, "lora_alpha": 16, "freq": 100.0, "s": 1.0, "target_modules": ["q_proj"]},
    {**BASE_CONFIG, "use_sinelora": True, "sinelora_frequency": 50.0, "sinelora_scaling": None},
    {**BASE_CONFIG, "rank_pattern": {"q_proj": 4}, "alpha_pattern": {"down_proj": 32}, "use_rslora": True},
    {**BASE_CONFIG, "deltacodec": {"omega": 30.0, "gamma": "sqrt-in"}},
]
# Fragments of JSON text the JSON encoder would not write: what a hand-made or hostile file holds.
RAW = ["1e400", "-1e400", "NaN", "Infinity", "1" + "0" * 40, "[" * 5000 + "]" * 5000, "[" * 40 + "]" * 40,
       '"\\ud800"', '{"a": {"b": {"c": [1, 2, {"d": null}]}}}', "4.9", "true", '"false"', "0", "-1"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**21), 10**21), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8), st.sampled_from(["LORA", "SINLORA", "sqrt-in", "false", "q_proj", "(a+)+b", "(", "pissa"]),
)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8
)
plausible = {
    "r": st.sampled_from([4, 8, 2]), "lora_alpha": st.sampled_from([8, 16.0, 0.5]), "use_rslora": st.booleans(),
    "rank_pattern": st.dictionaries(st.sampled_from(["q_proj", "down_proj", ".*", "layers\\.0\\..*"]), st.sampled_from([4, 8]), max_size=2),
    "alpha_pattern": st.dictionaries(st.sampled_from(["q_proj", "down_proj", "x|y"]), st.sampled_from([1, 32.0]), max_size=2),
    "use_sinelora": st.booleans(), "sinelora_frequency": st.sampled_from([None, 10.0, 0]), "peft_type": st.sampled_from(["LORA", "SINLORA"]),
}


@st.composite
def configs(draw):
    """(config text or None, where it goes, the top-level keys changed)."""
    where = draw(st.sampled_from(["file", "file", "metadata", "none"]))
    cfg = dict(draw(st.sampled_from(BASES)))
    changed: list[str] = []
    raws: dict[str, str] = {}
    for _ in range(draw(st.integers(0, 4))):
        key = draw(st.one_of(st.sampled_from(KNOWN_KEYS), st.text(max_size=6)))
        how = draw(st.sampled_from(["any", "any", "plausible", "raw", "drop"]))
        changed.append(key)
        if how == "drop":
            cfg.pop(key, None)
        elif how == "raw":
            marker = f"@@raw{len(raws)}@@"
            raws[marker] = draw(st.sampled_from(RAW))
            cfg[key] = marker
        elif how == "plausible" and key in plausible:
            cfg[key] = draw(plausible[key])
        else:
            cfg[key] = draw(json_values)
    text = json.dumps(cfg)
    for marker, raw in raws.items():
        text = text.replace(json.dumps(marker), raw)
    return (None if where == "none" else text), where, changed


NAMES = ["base_model.model.layers.0.q_proj.weight", "base_model.model.layers.0.q_proj.lora_A.weight",
         "layers.0.q_proj.lora_A.weight", "base_model.model.layers.0.q_proj.lora_magnitude_vector",
         "base_model.model.layers.0.q_proj.lora_B.bias", "base_model.model.layers.0.q_proj.lora_A.other.weight",
         "base_model.model.lm_head.weight", "lora_A.weight", "x\ny", "\x1b[0m", "", "é" * 600, "m.lora_B.weight",
         "base_model.model.conv.lora_A.weight"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.bool]


@st.composite
def tensor_sets(draw):
    base = lora_tensors(((("layers.0.q_proj", 6, 5)), ("layers.0.down_proj", 5, 7)), rank=draw(st.sampled_from([1, 2])))
    tensors: dict = {k: torch.from_numpy(v) for k, v in base.items()}
    for _ in range(draw(st.integers(0, 3))):
        action = draw(st.sampled_from(["drop", "add", "add", "dtype", "poison", "rank"]))
        keys = sorted(tensors)
        if action == "drop" and keys:
            tensors.pop(draw(st.sampled_from(keys)))
        elif action == "add":
            name = draw(st.one_of(st.sampled_from(NAMES), st.text(max_size=12)))
            shape = draw(st.lists(st.integers(0, 3), min_size=0, max_size=9))
            dtype = draw(st.sampled_from(DTYPES))
            tensors[name] = torch.ones(shape).to(dtype)
        elif action == "dtype" and keys:
            k = draw(st.sampled_from(keys))
            tensors[k] = tensors[k].to(draw(st.sampled_from(DTYPES)))
        elif action == "poison" and keys:
            k = draw(st.sampled_from(keys))
            if tensors[k].numel() == 0:
                continue
            t = tensors[k].clone().to(torch.float64)
            t.view(-1)[0] = draw(st.sampled_from([float("nan"), float("inf"), 1e300, 1e30, -1e20]))
            tensors[k] = t
        elif action == "rank" and keys:
            k = draw(st.sampled_from(keys))
            tensors[k] = torch.ones(3, *tensors[k].shape[1:]) if tensors[k].dim() else tensors[k]
    return tensors


overrides = st.fixed_dictionaries(
    {},
    optional={
        "omega": st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 30.0, 3e38])),
        "gamma": st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(["sqrt-in", "x", 0.0, 2.0])),
        "alpha": st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([8.0, 1e308, True])),
    },
)


def _write(d: str, tensors: dict, text: str | None, where: str, fmt: str) -> None:
    weights = os.path.join(d, f"adapter_model.{fmt}")
    meta = {"adapter_config": text} if (text is not None and where == "metadata" and fmt == "safetensors") else None
    save_tensors(weights, tensors, meta)
    if text is not None and (where == "file" or meta is None):
        with open(os.path.join(d, "adapter_config.json"), "w", encoding="utf-8", errors="surrogatepass") as fh:
            fh.write(text)


def _names_a_key(msg: str, changed: list[str]) -> bool:
    """A config error names a key, unless the document as a whole is at fault."""
    if any(w in msg for w in ("not valid JSON", "JSON nested", "larger than", "JSON object")):
        return True
    keys = changed + KNOWN_KEYS
    if any(f"[{json.dumps(k, ensure_ascii=True)}]" in msg for k in keys):  # an odd key, quoted
        return True
    shown = {form for k in keys for form in (k, repr(k)[1:-1]) if form}  # as printed, or escaped
    return any(f"'{k}'" in msg or f"'{k}." in msg or f".{k}'" in msg or f"'{k}[" in msg for k in shown)


def check_one(cfg, tensors, fmt, kw) -> None:
    text, where, changed = cfg
    with tempfile.TemporaryDirectory() as tmp:
        d = os.path.join(tmp, "ad")
        os.mkdir(d)
        try:
            _write(d, tensors, text, where, fmt)
        except Exception:
            return  # a tensor set the writers themselves refuse (e.g. safetensors and odd dtypes)
        out = os.path.join(tmp, "a.sld")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                adapter = read_adapter(d, **kw)
                path = deltacodec.encode(d, bits=2, out=out, **kw)
            except SldError as exc:
                msg = str(exc)
                assert "\n" not in msg and "\x1b" not in msg, msg
                assert d in msg, msg  # the directory, its config or its weights file
                cfg_path = os.path.join(d, "adapter_config.json")
                if msg.startswith(cfg_path) or "metadata 'adapter_config'" in msg:
                    assert _names_a_key(msg, changed), (msg, changed)
                assert not os.path.exists(out)
                return
        f = deltacodec.load(path)
        assert len(f.modules) == len(adapter.modules)
        for m in f.modules:
            assert np.isfinite(np.float32(m.scale)) and (not m.sine or (m.omega and m.gamma > 0))
            A, B = f.dequantize(m.name)
            assert np.isfinite(A).all() and np.isfinite(B).all()


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(cfg=configs(), tensors=tensor_sets(), fmt=st.sampled_from(["safetensors", "bin"]), kw=overrides)
def test_random_adapter_directories_raise_only_library_errors(cfg, tensors, fmt, kw):
    check_one(cfg, tensors, fmt, kw)


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs())
def test_random_configs_on_a_valid_adapter_raise_only_library_errors(cfg):
    check_one(cfg, {k: torch.from_numpy(v) for k, v in lora_tensors().items()}, "safetensors", {})


@pytest.mark.exhaustive
@settings(max_examples=5000, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(cfg=configs(), tensors=tensor_sets(), fmt=st.sampled_from(["safetensors", "bin"]), kw=overrides)
def test_random_adapter_directories_long_run(cfg, tensors, fmt, kw):
    check_one(cfg, tensors, fmt, kw)
