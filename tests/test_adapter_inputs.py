"""Adapter inputs, class by class: every malformed config, tensor set, weight file or option
gets an AdapterError naming the file and the key or tensor, no file is written, and what is
stored but that apply cannot honour is a DeltacodecWarning. Each class is parametrized over its
members; the random search over the same ground is tests/test_adapter_fuzz.py."""

from __future__ import annotations

import json
import math
import os
import re
import warnings

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from hypothesis import given
from hypothesis import strategies as st

import deltacodec
from deltacodec.adapter import read_adapter
from deltacodec.adapter_config import MAX_CONFIG_BYTES, MAX_CONFIG_DEPTH, resolve_settings
from deltacodec.errors import AdapterError, DeltacodecWarning, SldError
from deltacodec.format import MAX_NAME_BYTES, MAX_NDIM
from deltacodec.patterns import MAX_STATES, KeyMatcher, PatternError

from adapter_dirs import BASE_CONFIG, lora_tensors, write_dir

Q = "base_model.model.layers.0.q_proj"


def refused(src, match: str | None = None, *, names=(), **kw) -> AdapterError:
    """Encode ``src``: an AdapterError on one line naming every string in ``names``, and no file."""
    out = os.path.join(os.path.dirname(os.fspath(src).rstrip("/")), "out.sld")
    with pytest.raises(AdapterError) as info:
        deltacodec.encode(os.fspath(src), bits=3, out=out, **kw)
    msg = str(info.value)
    assert "\n" not in msg and "\x1b" not in msg, msg
    for n in names:
        assert n in msg, (n, msg)
    if match is not None:
        assert re.search(match, msg), msg
    assert not os.path.exists(out)
    return info.value


def quiet_read(src, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeltacodecWarning)
        return read_adapter(src, **kw)


# ----------------------------------------------------------------------------------------------
# 1. Config keys of the wrong type: every key deltacodec reads, every wrong JSON type

WRONG = {
    "bool": ["false", "true", 0, 1, None, [], {}],
    "rank": [4.9, 4.0, True, "4", None, 0, -1, [4], {"r": 4}],
    "alpha": [True, "16", None, [16], {"a": 1}],
    "map": [[], ["q_proj"], 5, "q_proj", True],
    "strlist_or_str": [1, [1], {"a": "b"}, True, ["a", None]],
    "strlist": ["q_proj", [1], {}, 1],
    "optional_str": [1, [], {}, True],
    "real": ["100", True, [1.0], {}],
    "gamma": [0, -1, "sqrt", True, [2.0]],
    "list": [1, "x", {}, True],
}
KEYS = [
    ("use_rslora", "bool"), ("fan_in_fan_out", "bool"), ("use_dora", "bool"), ("lora_bias", "bool"),
    ("use_sinelora", "bool"), ("use_qalora", "bool"),
    ("r", "rank"), ("lora_alpha", "alpha"),
    ("rank_pattern", "map"), ("alpha_pattern", "map"), ("deltacodec", "map"),
    ("megatron_config", "map"), ("kasa_config", "map"),
    ("target_modules", "strlist_or_str"), ("exclude_modules", "strlist_or_str"), ("layers_pattern", "strlist_or_str"),
    ("modules_to_save", "strlist"), ("layer_replication", "list"),
    ("base_model_name_or_path", "optional_str"),
    ("sinelora_frequency", "real"), ("sinelora_scaling", "gamma"),
]
CASES = [(k, v) for k, kind in KEYS for v in WRONG[kind] if not (kind == "map" and v is None)]


@pytest.mark.parametrize("where", ["file", "metadata"])
@pytest.mark.parametrize("key,value", CASES, ids=[f"{k}={json.dumps(v)}" for k, v in CASES])
def test_config_key_of_the_wrong_type_names_file_and_key(tmp_path, where, key, value):
    d = write_dir(tmp_path / "a", config={**BASE_CONFIG, key: value}, in_metadata=where == "metadata")
    file = os.path.join(d, "adapter_config.json") if where == "file" else "metadata 'adapter_config'"
    refused(d, names=(file, f"'{key}'"))


@pytest.mark.parametrize(
    "key,value,why",
    [
        ("peft_type", "lora", "one of"), ("peft_type", "ADALORA", "one of"), ("peft_type", None, "one of"),
        ("peft_type", 1, "one of"), ("bias", "some", "one of"), ("bias", 1, "one of"),
        ("layers_to_transform", "1", "integer"), ("layers_to_transform", [1.5], "integer"),
        ("init_lora_weights", 1, "true, false"), ("init_lora_weights", [], "true, false"),
        ("trainable_token_indices", "x", "list, a map"),
    ],
)
def test_config_values_outside_peft_declared_types(tmp_path, key, value, why):
    d = write_dir(tmp_path / "a", config={**BASE_CONFIG, key: value})
    refused(d, why, names=(f"'{key}'",))


@pytest.mark.parametrize(
    "cfg,key",
    [
        ({"peft_type": "SINLORA", "freq": "100"}, "freq"),
        ({"deltacodec": {"omega": "1"}}, "deltacodec.omega"),
        ({"deltacodec": {"omega": 10.0, "gamma": 0}}, "deltacodec.gamma"),
        ({"deltacodec": {"omega": 10.0, "gamma": "sqrt"}}, "deltacodec.gamma"),
        ({"deltacodec": {"omega": 10.0, "w": 1}}, "'w'"),
        ({"rank_pattern": {"q_proj": 4.5}}, "rank_pattern"),
        ({"rank_pattern": {"q_proj": 0}}, "rank_pattern"),
        ({"rank_pattern": {"q_proj": True}}, "rank_pattern"),
        ({"alpha_pattern": {"q_proj": "8"}}, "alpha_pattern"),
        ({"alpha_pattern": {"q_proj": None}}, "alpha_pattern"),
    ],
)
def test_nested_config_values_of_the_wrong_type(tmp_path, cfg, key):
    refused(write_dir(tmp_path / "a", config={**BASE_CONFIG, **cfg}), names=(key,))


@pytest.mark.parametrize(
    "text,why",
    [
        ('{"r": 4, "lora_alpha": 8, "x": ' + str(10**30) + "}", "64-bit"),
        ('{"r": 4, "lora_alpha": 8, "x": {"y": [' + str(-(10**20)) + "]}}", "64-bit"),
        ('{"r": 4, "lora_alpha": 1e400}', "lora_alpha"),
        ('{"r": 4, "lora_alpha": 8, "lora_dropout": NaN}', "lora_dropout"),
        ('{"r": 4, "lora_alpha": Infinity}', "lora_alpha"),
        ('{"r": 4, "lora_alpha": 8, "x": -Infinity}', "'x'"),
        ('{"r": 4, "lora_alpha": 8, "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested"),
        ('{"r": 4, "lora_alpha": 8, "x": ' + "[" * MAX_CONFIG_DEPTH + "]" * MAX_CONFIG_DEPTH + "}", "nested"),
        ('{"r": 4, "lora_alpha": 8, "lora_alpha": 16}', "twice"),
        ('{"r": 4, "lora_alpha": 8, "x": "\\ud800"}', "surrogate"),
        ('{"r": 4, "lora_alpha": 8, "\\udc00": 1}', "surrogate"),
        ('{"r": 4, "lora_alpha": 8, "x": 1' + "0" * 5000 + "}", "not valid JSON"),
        ("[1, 2]", "JSON object"), ("7", "JSON object"), ("null", "JSON object"), ('"x"', "JSON object"),
        ("", "not valid JSON"), ("{", "not valid JSON"), ("{'r': 4}", "not valid JSON"),
        (b"\xff\xfe{}", "not valid JSON"),
    ],
    ids=lambda x: x[:24] if isinstance(x, str) else repr(x)[:24],
)
def test_config_text_that_cannot_be_stored_or_parsed(tmp_path, text, why):
    d = write_dir(tmp_path / "a", config_text=text)
    refused(d, why, names=(os.path.join(d, "adapter_config.json"),))


def test_huge_config_is_refused_after_reading_a_bounded_prefix(tmp_path):
    text = '{"r": 4, "lora_alpha": 8, "pad": "' + "x" * MAX_CONFIG_BYTES + '"}'
    refused(write_dir(tmp_path / "a", config_text=text), "larger than")
    refused(write_dir(tmp_path / "b", config_text=text, in_metadata=True), "larger than", names=("metadata",))


def test_a_config_path_that_is_not_a_regular_file(tmp_path):
    d = write_dir(tmp_path / "a", config=None)
    os.mkdir(os.path.join(d, "adapter_config.json"))
    refused(d, "not a regular file")
    d = write_dir(tmp_path / "b", config=None)
    os.symlink(str(tmp_path / "nowhere"), os.path.join(d, "adapter_config.json"))
    refused(d, "not a regular file")


@pytest.mark.parametrize(
    "cfg,scale",
    [
        ({"use_rslora": False}, 8 / 4), ({"use_rslora": True}, 8 / 2), ({"lora_alpha": 16.0}, 16 / 4),
        ({"lora_alpha": 0.5}, 0.5 / 4), ({"rank_pattern": None, "alpha_pattern": None}, 8 / 4),
        ({"fan_in_fan_out": False}, 8 / 4), ({"peft_type": "LORA", "lora_dropout": 0.1}, 8 / 4),
    ],
)
def test_well_typed_configs_mean_what_peft_means(tmp_path, cfg, scale):
    a = quiet_read(write_dir(tmp_path / "a", config={**BASE_CONFIG, **cfg}))
    assert [m.scale for m in a.modules] == [scale, scale]
    assert all(m.fan_in_fan_out is False and not m.sine for m in a.modules)


def test_missing_lora_alpha_takes_peft_default_with_a_warning(tmp_path):
    cfg = {k: v for k, v in BASE_CONFIG.items() if k != "lora_alpha"}
    with pytest.warns(DeltacodecWarning, match="lora_alpha.*default 8"):
        a = read_adapter(write_dir(tmp_path / "a", config=cfg))
    assert all(m.scale == 8 / 4 for m in a.modules)


# ----------------------------------------------------------------------------------------------
# 2. rank_pattern / alpha_pattern keys: PEFT's matching, bounded

SEGMENTS = ["layers", "0", "1", "12", "q_proj", "k_proj", "mlp", "a", "ab", "b"]
names_st = st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=6).map(".".join)
_atom = st.sampled_from(["a", "b", "q", "_", "p", "r", "o", "j", "0", "1", ".", r"\.", "[a-c]", "[^.]", r"\d", r"\w", "[0-9]"])
_piece = st.tuples(_atom, st.sampled_from(["", "", "*", "+", "?", "{1,2}", "*?"])).map("".join)
_seq = st.lists(_piece, min_size=1, max_size=5).map("".join)
_alts = st.lists(_seq, min_size=1, max_size=3).map("|".join)
# Quantifiers sit on atoms only (a group gets at most "?"): PEFT's own backtracking matcher must
# stay fast on what this compares it with.
_wrap = st.sampled_from([("", ""), ("^", ""), ("", "$"), ("(", ")?"), ("(?i:", ")"), ("(?:", ")"), ("q_proj)|(", "")])
pattern_st = st.one_of(
    st.tuples(_wrap, _alts).map(lambda t: t[0][0] + t[1] + t[0][1]),
    st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=3).map(".".join),
)


def _valid(p: str) -> bool:
    try:
        re.compile(rf"(.*\.)?({p})$")
        return True
    except re.error:
        return False


@given(key=pattern_st.filter(_valid), name=names_st)
def test_key_matcher_agrees_with_python_re_on_ordinary_patterns(key, name):
    assert KeyMatcher(key).matches(name) == (re.match(rf"(.*\.)?({key})$", name) is not None)


_anchored = st.tuples(
    st.sampled_from(["", "^", "\\A", "(?m:^)", "\\b", "\\B", "(?s:.)"]), _alts,
    st.sampled_from(["", "$", "\\Z", "(?m:$)", "\\b", "\\n", "\\B"]),
).map("".join)


@given(key=_anchored.filter(_valid), name=st.text(alphabet="ab.q_\n 0", max_size=12))
def test_key_matcher_agrees_with_python_re_on_anchors_and_newlines(key, name):
    # Names never hold a newline once read (they must be printable), but the matcher is exact
    # anyway: this runs the uncached NFA, the anchors and the trailing-newline rule of $.
    m = KeyMatcher(key)
    assert m.matches(name) == (re.match(rf"(.*\.)?({key})$", name) is not None)
    assert m.matches(name) == (re.match(rf"(.*\.)?({key})$", name) is not None)  # memoised path again


@pytest.fixture(scope="module")
def get_pattern_key():
    return pytest.importorskip("peft.utils.other").get_pattern_key


@given(keys=st.lists(pattern_st.filter(_valid), min_size=1, max_size=4, unique=True), names=st.lists(names_st, min_size=1, max_size=4))
def test_pattern_lookup_agrees_with_peft_get_pattern_key(get_pattern_key, keys, names):
    rank_pattern = {k: i + 2 for i, k in enumerate(keys)}
    s = resolve_settings({"r": 1, "lora_alpha": 1, "rank_pattern": rank_pattern}, "cfg", src="src")
    for name in names:
        assert s.rank_for(name) == rank_pattern.get(get_pattern_key(rank_pattern.keys(), name), 1)


def test_a_literal_key_that_does_not_match_itself_is_found_by_exact_lookup_as_in_peft():
    s = resolve_settings({"r": 1, "lora_alpha": 1, "rank_pattern": {"a+b": 3}}, "cfg", src="src")
    assert s.rank_for("a+b") == 3 and s.rank_for("aab") == 3 and s.rank_for("x.a+b") == 1


ADVERSARIAL = ["(a+)+b", "(a|a)*b", "(a*)*b", "(a|aa)+$b", "(.*a){5}", "(x+x+)+y", ".*.*.*.*.*.*=", "a*(a?){6}a{6}",
               "((a+)+)+c", "(\\w+\\d*)+\\."]


@pytest.mark.parametrize("key", ADVERSARIAL)
@pytest.mark.parametrize("n", [30, 1000])
def test_backtracking_keys_are_matched_in_bounded_work(key, n):
    m = KeyMatcher(key)
    name = "layers." + "a" * n
    got = m.matches(name)
    # A closure visits each state at most once per position, and each position moves at most
    # every state once: the work is linear in the name, whatever the key.
    assert m.steps <= 2 * (len(name) + 1) * m.nstates
    # Same answer as Python's backtracking matcher where that one still finishes quickly: every
    # key here matches "a"*k either for every k >= some small k or for none.
    short = "layers." + "a" * 6
    assert got == (re.match(rf"(.*\.)?({key})$", short) is not None)


def test_a_backtracking_key_in_a_config_costs_bounded_work_per_module(tmp_path):
    mods = [("m" + "a" * 200, 8, 8), ("layers.0.q_proj", 8, 8)]
    d = write_dir(tmp_path / "a", tensors=lora_tensors(mods, rank=2), config={"r": 2, "lora_alpha": 2, "rank_pattern": {"(a+)+b": 5}})
    a = quiet_read(d)
    assert [m.rank for m in a.modules] == [2, 2]
    s = resolve_settings({"r": 2, "lora_alpha": 2, "rank_pattern": {"(a+)+b": 5}}, "cfg", src="src")
    assert s.rank_for("m" + "a" * 200) == 2
    assert 0 < s.pattern_work() <= 2 * 202 * s._rank_keys["(a+)+b"].nstates


@pytest.mark.parametrize(
    "key,why",
    [("(", "not a valid regular expression"), ("[a", "not a valid"), ("a{2,1}", "not a valid"),
     ("*a", "not a valid"), ("(?i)a", "not a valid"), ("(a)\\1", "backreference"), ("a(?=b)", "lookahead"),
     ("(?<!x)a", "lookahead"), ("a*+", "possessive"), ("(?>a+)", "atomic"), ("(a)(?(1)b|c)", "conditional"),
     ("(a{100}){1000}", "matcher states"), ("a" * 5000, "characters"), ("(" * 200 + ")" * 200, "nested|parsed")],
)
@pytest.mark.parametrize("which", ["rank_pattern", "alpha_pattern"])
def test_pattern_keys_that_are_not_bounded_regular_expressions_are_refused(tmp_path, key, why, which):
    d = write_dir(tmp_path / "a", config={**BASE_CONFIG, which: {"q_proj": 4, key: 4}})
    refused(d, why, names=(which, key[:20]))


def test_refused_keys_bound_their_state_count():
    with pytest.raises(PatternError):
        KeyMatcher("(a{%d})" % (MAX_STATES + 1))
    assert KeyMatcher("(a{%d})" % (MAX_STATES // 4)).nstates <= MAX_STATES


def test_rank_and_alpha_patterns_apply_per_module_first_match_wins(tmp_path):
    cfg = {**BASE_CONFIG, "rank_pattern": {"q_proj": 2}, "alpha_pattern": {"layers\\.0\\..*proj": 6, "down_proj": 99}}
    t = lora_tensors([("layers.0.q_proj", 32, 48)], rank=2) | lora_tensors([("layers.0.down_proj", 48, 64)], rank=4)
    a = quiet_read(write_dir(tmp_path / "a", tensors=t, config=cfg))
    by = {m.name.split(".")[-1]: m for m in a.modules}
    assert by["q_proj"].scale == 6 / 2 and by["down_proj"].scale == 6 / 4
    # an alpha given by the caller overrides the config, its patterns included
    a = quiet_read(write_dir(tmp_path / "b", tensors=t, config=cfg), alpha=12)
    by = {m.name.split(".")[-1]: m for m in a.modules}
    assert by["q_proj"].scale == 12 / 2 and by["down_proj"].scale == 12 / 4


# ----------------------------------------------------------------------------------------------
# 3. Tensor sets the .sld format cannot hold, or would hold with another meaning


def _with(extra: dict, base=None) -> dict:
    return {**(lora_tensors() if base is None else base), **extra}


@pytest.mark.parametrize(
    "extra,why",
    [
        ({"": np.ones(3, np.float32)}, "empty name"),
        ({"x" * (MAX_NAME_BYTES + 1): np.ones(3, np.float32)}, f"at most {MAX_NAME_BYTES}"),
        ({"é" * (MAX_NAME_BYTES // 2 + 1): np.ones(3, np.float32)}, "UTF-8 bytes"),
        ({"bad\nname": np.ones(3, np.float32)}, "non-printable"),
        ({"bad\x1b[31mname": np.ones(3, np.float32)}, "non-printable"),
        ({"bad\u202ename": np.ones(3, np.float32)}, "non-printable"),
        ({"scalar": np.array(1.0, np.float32)}, "0-d"),
        ({"nine": np.ones((1,) * (MAX_NDIM + 1), np.float32)}, f"1..{MAX_NDIM} dimensions"),
        ({"empty": np.ones((3, 0), np.float32)}, "empty"),
        ({"i": np.ones(3, np.int64)}, "dtype"), ({"u": np.ones(3, np.uint8)}, "dtype"),
        ({"b": np.ones(3, bool)}, "dtype"),
        ({"nan": np.array([1.0, np.nan], np.float32)}, "NaN/Inf"),
        ({"inf": np.array([np.inf], np.float16)}, "NaN/Inf"),
        ({Q + ".lora_A.weight": np.ones((4, 48, 1), np.float32)}, "both 2-D"),
        ({Q + ".lora_B.weight": np.ones(32, np.float32)}, "both 2-D"),
        ({"lora_A.weight": np.ones((4, 8), np.float32)}, "names no module"),
    ],
    ids=lambda x: None if isinstance(x, dict) else x,
)
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_tensors_the_format_cannot_hold_are_refused_at_read_time(tmp_path, extra, why, fmt):
    d = write_dir(tmp_path / "a", tensors=_with(extra), fmt=fmt)
    refused(d, why, names=(f"adapter_model.{fmt}",))


@pytest.mark.parametrize(
    "make,fmt",
    [
        (lambda: torch.ones(3, dtype=torch.complex64), "bin"),
        (lambda: torch.ones(3, dtype=torch.float8_e4m3fn), "bin"),
        (lambda: torch.ones(3, dtype=torch.float8_e4m3fn), "safetensors"),
        (lambda: torch.ones(3, dtype=torch.int8), "safetensors"),
        (lambda: torch.ones(3, 3).to_sparse(), "bin"),
    ],
    ids=["complex-bin", "float8-bin", "float8-safetensors", "int8-safetensors", "sparse-bin"],
)
def test_torch_tensors_that_are_not_dense_floats(tmp_path, make, fmt):
    t = make()
    d = write_dir(tmp_path / "a", tensors=_with({"odd": t}), fmt=fmt)
    refused(d, "dtype|dense|cannot", names=("'odd'",))


def test_float64_factor_beyond_float32_is_refused(tmp_path):
    t = lora_tensors()
    t[Q + ".lora_A.weight"] = t[Q + ".lora_A.weight"].astype(np.float64) * 1e300
    refused(write_dir(tmp_path / "a", tensors=t), "beyond float32", names=(Q + ".lora_A.weight",))


def test_several_adapters_in_one_file_are_refused_listing_both_keys(tmp_path):
    t = lora_tensors()
    named = {k.replace(".lora_A.weight", ".lora_A.other.weight").replace(".lora_B.weight", ".lora_B.other.weight"): v
             for k, v in lora_tensors(seed=1).items()}
    e = refused(write_dir(tmp_path / "a", tensors={**t, **named}), "several adapters", names=("selected_adapters",))
    assert ".lora_A.weight" in str(e) and ".lora_A.other.weight" in str(e)
    # One named adapter alone (a model's own state dict) is one adapter: its name is dropped.
    a = quiet_read(write_dir(tmp_path / "b", tensors=named))
    assert sorted(m.name for m in a.modules) == sorted({k.rsplit(".lora_", 1)[0] for k in named})


def test_a_model_checkpoint_is_not_an_adapter_with_or_without_a_config(tmp_path):
    model = {"model.embed_tokens.weight": np.ones((10, 8), np.float32), "model.layers.0.q_proj.weight": np.ones((8, 8), np.float32),
             "model.norm.weight": np.ones(8, np.float32)}
    for i, cfg in enumerate([None, BASE_CONFIG]):
        e = refused(write_dir(tmp_path / f"m{i}", tensors=model, config=cfg), "no lora_A/lora_B pairs: this looks like a model")
        assert "--alpha" not in str(e)


@pytest.mark.parametrize(
    "tensors,why",
    [
        (lora_tensors([("lin", 8, 8)]) | lora_tensors([("lin", 8, 8)], prefix=""), "both stand for 'lin'"),
        (lora_tensors([("lin", 8, 8)]) | {"lin.weight": np.ones((8, 8), np.float32)}, "both stand for 'lin.weight'"),
        (lora_tensors([("lin", 8, 8)]) | {"base_model.model.lin": np.ones(3, np.float32)}, "both stand for 'lin'"),
        (lora_tensors() | {"x.bias": np.ones(3, np.float32), "base_model.model.x.bias": np.ones(3, np.float32)}, "x.bias"),
    ],
    ids=["two-modules", "module-and-replacement", "module-and-extra", "two-extras"],
)
def test_two_entries_for_one_model_weight_are_refused(tmp_path, tensors, why):
    refused(write_dir(tmp_path / "a", tensors=tensors), why)


@pytest.mark.parametrize("kernel", [(3, 3), (5,), (1, 2, 2)], ids=["conv2d", "conv1d", "conv3d"])
def test_conv_lora_factors_are_quantized_conv_modules_and_decode_to_kernel_shapes(tmp_path, kernel):
    # PEFT's conv LoRA: lora_A (r, in, *kernel), lora_B (out, r, 1, ...): ΔW = B@A reshaped to (out, in, *kernel)
    rng = np.random.default_rng(1)
    nd = len(kernel)
    conv = {"base_model.model.conv.lora_A.weight": rng.standard_normal((4, 3, *kernel)).astype(np.float32),
            "base_model.model.conv.lora_B.weight": rng.standard_normal((8, 4, *([1] * nd))).astype(np.float32)}
    d = write_dir(tmp_path / "a", tensors=_with(conv))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeltacodecWarning)
        f = deltacodec.load(deltacodec.encode(d, bits=8, out=str(tmp_path / "a.sld")))
    (m,) = [m for m in f.modules if m.name == "base_model.model.conv"]
    assert f.version == 2 and m.weight_shape == (8, 3, *kernel) and (m.in_features, m.rank) == (3 * math.prod(kernel), 4)
    A, B = f.dequantize(m.name)
    ref_a = conv["base_model.model.conv.lora_A.weight"].reshape(4, -1)
    ref_b = conv["base_model.model.conv.lora_B.weight"].reshape(8, 4)
    assert np.abs(A - ref_a).max() <= 0.02 * np.abs(ref_a).max() and np.abs(B - ref_b).max() <= 0.02 * np.abs(ref_b).max()
    out = deltacodec.decode(f.path, str(tmp_path / "dec"))
    got = load_file([p for p in out if p.endswith(".safetensors")][0])
    for k, v in conv.items():
        assert got[k].shape == v.shape, k
    np.testing.assert_array_equal(got["base_model.model.conv.lora_A.weight"].reshape(4, -1), A)


# ----------------------------------------------------------------------------------------------
# 4. Options and scales that cannot give a finite ΔW never make a file


@pytest.mark.parametrize(
    "kw,why",
    [
        ({"alpha": math.nan}, "alpha"), ({"alpha": math.inf}, "alpha"), ({"alpha": True}, "alpha"), ({"alpha": "8"}, "alpha"),
        ({"omega": math.inf}, "omega"), ({"omega": math.nan}, "omega"), ({"omega": 0.0}, "omega"), ({"omega": "1"}, "omega"),
        ({"omega": 1.0, "gamma": 0.0}, "gamma"), ({"omega": 1.0, "gamma": -1.0}, "gamma"), ({"omega": 1.0, "gamma": math.nan}, "gamma"),
        ({"omega": 1.0, "gamma": math.inf}, "gamma"), ({"omega": 1.0, "gamma": "sqrt"}, "gamma"), ({"gamma": 0.0}, "gamma"),
        ({"alpha": 1e308}, "beyond float32"), ({"alpha": -1e308}, "beyond float32"),
    ],
    ids=repr,
)
def test_options_that_cannot_be_finite_are_errors(tmp_path, kw, why):
    refused(write_dir(tmp_path / "a"), why, **kw)


@pytest.mark.parametrize("text", ['{"r": 4, "lora_alpha": 1e308}', '{"r": 4, "lora_alpha": 2e39}', '{"r": 4, "lora_alpha": 2e39, "use_rslora": true}'])
def test_config_scale_beyond_float32_is_an_error(tmp_path, text):
    refused(write_dir(tmp_path / "a", config_text=text), "beyond float32", names=("scale",))


def test_config_alpha_that_is_infinite_in_json_is_an_error(tmp_path):
    refused(write_dir(tmp_path / "a", config_text='{"r": 4, "lora_alpha": Infinity}'), names=("lora_alpha",))


def test_delta_beyond_float32_is_an_error_though_every_factor_is_finite(tmp_path):
    t = lora_tensors([("lin", 8, 8)], rank=2)
    t["base_model.model.lin.lora_A.weight"][:] = 1e20
    t["base_model.model.lin.lora_B.weight"][:] = 1e20
    refused(write_dir(tmp_path / "a", tensors=t, config={"r": 2, "lora_alpha": 2}), "beyond float32", names=("'base_model.model.lin'",))
    # sine: ω·B@A beyond float32 makes sin() NaN; scale/γ beyond float32 makes ΔW inf
    t = lora_tensors([("lin", 8, 8)], rank=2)
    t["base_model.model.lin.lora_A.weight"][:] = 1.0
    t["base_model.model.lin.lora_B.weight"][:] = 1.0
    refused(write_dir(tmp_path / "b", tensors=t, config={"r": 2, "lora_alpha": 2}), "ω·B@A", omega=3e38)
    refused(write_dir(tmp_path / "c", tensors=t, config={"r": 2, "lora_alpha": 6e38}), "sin", omega=1.0, gamma=1e-3)


def test_products_whose_terms_overflow_float32_are_refused_even_if_they_cancel(tmp_path):
    # apply sums B@A in float32: 1e20·1e20 overflows there whatever the exact sum is.
    t = lora_tensors([("lin", 4, 4)], rank=2)
    t["base_model.model.lin.lora_A.weight"][:] = 1e20
    t["base_model.model.lin.lora_B.weight"][:] = np.array([[1e20, -1e20]] * 4, np.float32)
    refused(write_dir(tmp_path / "a", tensors=t, config={"r": 2, "lora_alpha": 2}), "terms of B@A")


def test_a_huge_scale_on_a_product_that_cancels_is_judged_on_the_exact_product(tmp_path):
    # The bound Σ|B||A|·scale overflows, the exact ΔW is 0: refusing would be wrong.
    t = lora_tensors([("lin", 4, 4)], rank=2)
    t["base_model.model.lin.lora_A.weight"][:] = 1.0
    t["base_model.model.lin.lora_B.weight"][:] = np.array([[1e10, -1e10]] * 4, np.float32)
    a = quiet_read(write_dir(tmp_path / "a", tensors=t, config={"r": 2, "lora_alpha": 2e30}))
    assert a.modules[0].scale == 1e30 and np.all(a.modules[0].delta() == 0)


# ----------------------------------------------------------------------------------------------
# 5. Encode-time warnings: stored, but apply cannot honour it


def _warned(src, match, **kw):
    with pytest.warns(DeltacodecWarning, match=match) as rec:
        read_adapter(src, **kw)
    assert all("\n" not in str(w.message) for w in rec)


def test_a_plain_peft_style_adapter_reads_without_any_warning(tmp_path):
    quiet_read(write_dir(tmp_path / "a", config={**BASE_CONFIG, "use_dora": False, "lora_bias": False, "layer_replication": None,
                                                   "megatron_config": None, "init_lora_weights": True, "trainable_token_indices": None}))


@pytest.mark.parametrize(
    "cfg,kw",
    [({}, {"gamma": 2.0}), ({}, {"gamma": "sqrt-in"}), ({"deltacodec": {"gamma": 3.0}}, {}), ({"sinelora_scaling": 4.0}, {})],
)
def test_gamma_on_a_plain_lora_adapter_warns_that_it_is_ignored(tmp_path, cfg, kw):
    _warned(write_dir(tmp_path / "a", config={**BASE_CONFIG, **cfg}), "gamma .* ignored", **kw)


def test_dora_and_lora_bias_warn_that_apply_will_refuse_them(tmp_path):
    _warned(write_dir(tmp_path / "a", config={**BASE_CONFIG, "use_dora": True}), "DoRA.*apply will refuse")
    mags = {Q + ".lora_magnitude_vector": np.ones(32, np.float32)}
    _warned(write_dir(tmp_path / "b", tensors=_with(mags)), "DoRA.*apply will refuse")
    _warned(write_dir(tmp_path / "c", config={**BASE_CONFIG, "lora_bias": True}), "LoRA biases.*apply will refuse")
    _warned(write_dir(tmp_path / "d", tensors=_with({Q + ".lora_B.bias": np.ones(32, np.float32)})), "LoRA biases")


@pytest.mark.parametrize(
    "key,value",
    [("layer_replication", [[0, 2], [1, 2]]), ("target_parameters", ["experts.down_proj"]),
     ("trainable_token_indices", [1, 2]), ("trainable_token_indices", {"embed_tokens": [1]}),
     ("alora_invocation_tokens", [5, 6]), ("megatron_config", {"tp": 2}), ("use_bdlora", {"nblocks": 2}),
     ("kasa_config", {}), ("arrow_config", {"top_k": 2}), ("monteclora_config", {}), ("use_qalora", True),
     ("init_lora_weights", "pissa"), ("init_lora_weights", "pissa_niter_4"), ("init_lora_weights", "olora"),
     ("init_lora_weights", "corda"), ("init_lora_weights", "loftq"), ("init_lora_weights", "lora_ga")],
)
def test_config_keys_that_change_the_meaning_warn(tmp_path, key, value):
    _warned(write_dir(tmp_path / "a", config={**BASE_CONFIG, key: value}), re.escape(key))


# ----------------------------------------------------------------------------------------------
# 6. Weight files: .bin through weights_only, damaged safetensors


@pytest.mark.parametrize(
    "obj,why",
    [
        ([torch.ones(2)], "state dict"), (torch.ones(2), "state dict"), (7, "state dict"),
        ({"a.weight": 3}, "expected a tensor"), ({"a.weight": "x"}, "expected a tensor"),
        ({"sd": {"a.lora_A.weight": torch.ones(2, 2)}}, "expected a tensor"),
        ({1: torch.ones(2)}, "expected a string name"), ({("a", 1): torch.ones(2)}, "expected a string name"),
    ],
    ids=["list", "tensor", "int", "int-value", "str-value", "nested", "int-key", "tuple-key"],
)
def test_bin_files_that_are_not_flat_state_dicts(tmp_path, obj, why):
    d = tmp_path / "a"
    d.mkdir()
    torch.save(obj, str(d / "adapter_model.bin"))
    (d / "adapter_config.json").write_text(json.dumps(BASE_CONFIG))
    refused(d, why, names=(str(d / "adapter_model.bin"),))


def test_bin_files_are_never_unpickled(tmp_path):
    import pickle

    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    d = tmp_path / "a"
    d.mkdir()
    with open(d / "adapter_model.bin", "wb") as fh:
        pickle.dump({"x": Boom()}, fh)
    refused(d, "weights-only", names=(str(d / "adapter_model.bin"),))
    assert not (tmp_path / "pwned").exists()


def _valid_safetensors(tmp_path) -> bytes:
    d = write_dir(tmp_path / "valid")
    with open(os.path.join(d, "adapter_model.safetensors"), "rb") as fh:
        return fh.read()


@pytest.mark.parametrize(
    "damage",
    ["empty", "7 bytes", "header cut", "data cut", "huge header length", "header longer than file", "garbage header",
     "header not a map", "offsets past data"],
)
def test_damaged_safetensors_are_adapter_errors_naming_the_file(tmp_path, damage):
    good = _valid_safetensors(tmp_path)
    n = int.from_bytes(good[:8], "little")
    bad = {
        "empty": b"",
        "7 bytes": good[:7],
        "header cut": good[: 8 + n // 2],
        "data cut": good[: len(good) - 100],
        "huge header length": (2**63).to_bytes(8, "little") + good[8:],
        "header longer than file": (len(good) * 2).to_bytes(8, "little") + good[8:],
        "garbage header": n.to_bytes(8, "little") + (b"\x00{not json" * n)[:n] + good[8 + n:],
        "header not a map": (6).to_bytes(8, "little") + b"[1, 2]",
        "offsets past data": good[: 8 + n].replace(b'"data_offsets":[0,', b'"data_offsets":[9,', 1) + good[8 + n:],
    }[damage]
    assert bad != good
    d = tmp_path / "a"
    d.mkdir()
    (d / "adapter_model.safetensors").write_bytes(bad)
    (d / "adapter_config.json").write_text(json.dumps(BASE_CONFIG))
    refused(d, names=(str(d / "adapter_model.safetensors"),))


# ----------------------------------------------------------------------------------------------
# 7. encode --report with the stricter reader


def test_weight_error_report_on_a_strictly_read_adapter(tmp_path):
    from deltacodec.report import weight_error_report, weight_errors

    d = write_dir(tmp_path / "a", config={**BASE_CONFIG, "use_dora": True})
    with pytest.warns(DeltacodecWarning):
        out = deltacodec.encode(d, bits=8, out=str(tmp_path / "a.sld"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, at encode; the report does not repeat it
        rows = weight_errors(d, out)
        text = weight_error_report(d, out)
    assert [r[0] for r in rows] == sorted(k.rsplit(".lora_", 1)[0] for k in lora_tensors() if ".lora_A." in k)
    # 8 bits on these near-uniform factors: relative weight error near 2**-8
    assert all(0 < r[1] < 0.02 for r in rows)
    assert "2 modules" in text
    other = write_dir(tmp_path / "b", tensors=lora_tensors([("other", 8, 8)]))
    with pytest.raises(AdapterError, match="no module"):
        weight_errors(other, out)


def test_every_refusal_is_an_sld_error_and_a_value_error():
    assert issubclass(AdapterError, SldError) and issubclass(AdapterError, ValueError)


# ----------------------------------------------------------------------------------------------
# 8. γ as a multiple of √in_features (the papers' γ = 2√n)


@pytest.mark.parametrize("where", ["override", "sinelora_scaling", "deltacodec"])
def test_gamma_as_a_multiple_of_sqrt_in(tmp_path, where):
    cfg = {**BASE_CONFIG, "use_sinelora": True, "sinelora_frequency": 200.0}
    kw = {}
    if where == "override":
        kw["gamma"] = "2*sqrt-in"
    elif where == "sinelora_scaling":
        cfg["sinelora_scaling"] = "2*sqrt-in"
    else:
        cfg = {**BASE_CONFIG, "deltacodec": {"omega": 200.0, "gamma": "2*sqrt-in"}}
    a = quiet_read(write_dir(tmp_path / "a", config=cfg), **kw)
    assert all(m.sine and m.gamma == 2 * math.sqrt(m.in_features) for m in a.modules)
    sld = deltacodec.encode(write_dir(tmp_path / "b", config=cfg), bits=8, out=str(tmp_path / "b.sld"), **kw)
    deltacodec.decode(sld, str(tmp_path / "dec"))
    dec = json.loads((tmp_path / "dec" / "adapter_config.json").read_text())
    assert dec["deltacodec"] == {"omega": 200.0, "gamma": "2.0*sqrt-in"}
    back = quiet_read(str(tmp_path / "dec"))
    assert [m.gamma for m in back.modules] == [m.gamma for m in a.modules]


@pytest.mark.parametrize("text", ["2*sqrt", "-2*sqrt-in", "0*sqrt-in", "1e999*sqrt-in", "2 * sqrt-in", "sqrt-in*2"])
def test_malformed_multiples_of_sqrt_in_are_refused(tmp_path, text):
    refused(write_dir(tmp_path / "a"), "gamma", omega=1.0, gamma=text)
    cfg = {**BASE_CONFIG, "use_sinelora": True, "sinelora_frequency": 1.0, "sinelora_scaling": text}
    refused(write_dir(tmp_path / "b", config=cfg), names=("'sinelora_scaling'",))
