"""Spec 12.5: a version-2 file stores the PEFT config without the keys of table 1 that hold the
table's value, and readers put them back. Checked against the plain reference reader
(tests/v2ref.py, transcribed from the spec) and on classes of configs and of markers."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import deltacodec
from deltacodec import config_defaults as cd
from deltacodec.adapter import Adapter, AdapterModule

import v2ref

HERE = os.path.join(os.path.dirname(__file__), "..", "spec", "vectors")
TABLE = dict(v2ref.CONFIG_TABLE_1)


def tiny_adapter(config: dict) -> Adapter:
    rng = np.random.default_rng(0)
    mods = [AdapterModule(name=f"base_model.model.model.layers.{i}.self_attn.q_proj",
                          A=rng.normal(0, 0.1, (4, 24)).astype(np.float32),
                          B=rng.normal(0, 0.1, (24, 4)).astype(np.float32), scale=2.0) for i in range(2)]
    return Adapter(modules=mods, config=config)


def peft_like(**over) -> dict:
    """A LoraConfig as save_pretrained writes it: every key of table 1 at its value, plus the
    adapter's own keys; sorted."""
    cfg = dict(TABLE)
    cfg.update(r=4, lora_alpha=8, target_modules=["q_proj"], peft_version="0.21.2",
               base_model_name_or_path="tiny")
    cfg.update(over)
    return {k: cfg[k] for k in sorted(cfg)}


def stored_metadata(path) -> dict:
    header, _ = v2ref.parse(open(path, "rb").read())
    return header["metadata"]


def test_table_is_the_spec_table():
    # the implementation's table and the one transcribed from the spec's text agree, in order
    assert list(cd.TABLE_1) == [(k, v) for k, v in v2ref.CONFIG_TABLE_1]
    assert all(cd.same(a[1], b[1]) for a, b in zip(cd.TABLE_1, v2ref.CONFIG_TABLE_1))


def test_elided_config_comes_back_key_for_key(tmp_path):
    """A config as PEFT saves it: stored without its default keys, presented whole (same keys,
    values, types and order) by load, by the reference reader, and in decode's adapter_config.json."""
    pytest.importorskip("peft")
    import peft
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=4))
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    pm.save_pretrained(tmp_path / "a")
    original = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    original["target_modules"] = sorted(original["target_modules"])  # a set: stored sorted (spec 3.3)
    path = deltacodec.encode(tmp_path / "a", bits=3, container=2, out=tmp_path / "a.sld")
    stored = stored_metadata(path)
    assert cd.MARKER in stored
    kept = stored["adapter_config"]
    assert len(kept) < len(original) / 2
    assert all(k not in kept for k in TABLE if k in original and cd.same(original[k], TABLE[k]))
    for got in (deltacodec.load(path).metadata, v2ref.restore_config(stored)):
        assert cd.MARKER not in got
        assert json.dumps(got["adapter_config"]) == json.dumps(original)  # order and types too
    deltacodec.decode(path, out=tmp_path / "d")
    decoded = json.loads((tmp_path / "d" / "adapter_config.json").read_text())
    assert decoded == original


def test_reference_reader_restores_the_golden_config():
    path = os.path.join(HERE, "v2_peft_config_elided.sld")
    exp = json.load(open(os.path.join(HERE, "v2_peft_config_elided.expected.json")))["adapter_config"]
    stored = stored_metadata(path)
    assert stored[cd.MARKER] == {"table": 1, "sorted": True, "absent": ["use_bdlora"]}
    assert sorted(stored["adapter_config"]) == ["auto_mapping", "base_model_name_or_path", "bias", "lora_alpha",
                                                "lora_dropout", "peft_version", "r", "target_modules", "task_type"]
    for got in (v2ref.restore_config(stored), deltacodec.load(path).metadata):
        assert json.dumps(got["adapter_config"]) == json.dumps(exp)
        assert "use_bdlora" not in got["adapter_config"]  # absent stays absent
        assert got["adapter_config"]["bias"] == "lora_only"  # a stored value wins over the table


BAD_MARKERS = {
    "a list": [1, True, []],
    "an int": 1,
    "nil": None,
    "table 2": {"table": 2, "sorted": True, "absent": []},
    "table as str": {"table": "1", "sorted": True, "absent": []},
    "table as float": {"table": 1.0, "sorted": True, "absent": []},
    "table as bool": {"table": True, "sorted": True, "absent": []},
    "sorted as int": {"table": 1, "sorted": 1, "absent": []},
    "absent not a list": {"table": 1, "sorted": True, "absent": "use_bdlora"},
    "absent names an unknown key": {"table": 1, "sorted": True, "absent": ["r"]},
    "absent twice": {"table": 1, "sorted": True, "absent": ["use_bdlora", "use_bdlora"]},
    "absent holds an int": {"table": 1, "sorted": True, "absent": [3]},
    "a fourth key": {"table": 1, "sorted": True, "absent": [], "x": 0},
    "a key missing": {"table": 1, "sorted": True},
}


@pytest.mark.parametrize("what", sorted(BAD_MARKERS))
def test_unusable_marker_leaves_metadata_as_stored(what, tmp_path):
    """Metadata is informational: a marker a reader cannot use is not an error; it and the config
    stay as stored, and the tensors decode as without it."""
    golden = os.path.join(HERE, "v2_peft_config_elided.sld")
    header, secs = v2ref.parse(open(golden, "rb").read())
    header["metadata"][cd.MARKER] = BAD_MARKERS[what]
    p = tmp_path / "bad.sld"
    p.write_bytes(v2ref.build(header, secs))
    f, ref = deltacodec.load(p), deltacodec.load(golden)
    assert f.metadata == header["metadata"]
    assert v2ref.restore_config(header["metadata"]) == header["metadata"]
    for fe, re_ in zip(f.entries(), ref.entries()):
        assert fe.name == re_.name and np.array_equal(f.tensor(fe), ref.tensor(re_))


@pytest.mark.parametrize("cfg_value", [[1, 2], "x", 7])
def test_marker_beside_a_config_that_is_not_a_map_is_ignored(cfg_value, tmp_path):
    golden = os.path.join(HERE, "v2_peft_config_elided.sld")
    header, secs = v2ref.parse(open(golden, "rb").read())
    header["metadata"]["adapter_config"] = cfg_value
    p = tmp_path / "bad.sld"
    p.write_bytes(v2ref.build(header, secs))
    assert deltacodec.load(p).metadata == header["metadata"]


@pytest.mark.parametrize("key,value", [
    ("lora_dropout", 0),        # int, the table says float 0.0
    ("lora_dropout", -0.0),     # another float
    ("fan_in_fan_out", 0),      # int, not false
    ("use_dora", None),         # nil, not false
    ("qalora_group_size", 16.0),  # float, the table says int
    ("alpha_pattern", []),      # array, not map
    ("bias", "None"),
])
def test_writer_elides_only_what_comes_back(key, value, tmp_path):
    """A value equal to the table's only up to type is stored as it is, and read back with its
    own type; the rest of the config is still left out."""
    cfg = peft_like(**{key: value})
    path = deltacodec.encode(tiny_adapter(cfg), bits=3, container=2, out=tmp_path / "x.sld")
    stored = stored_metadata(path)["adapter_config"]
    assert key in stored and cd.same(stored[key], value)
    assert len(stored) < len(cfg) / 2
    got = deltacodec.load(path).metadata["adapter_config"]
    assert json.dumps(got) == json.dumps(cfg)
    assert cd.same(got[key], value)


def test_version_1_files_keep_the_config_whole(tmp_path):
    cfg = peft_like()
    path = deltacodec.encode(tiny_adapter(cfg), bits=3, container=1, out=tmp_path / "x.sld")
    f = deltacodec.load(path)
    assert f.version == 1 and json.dumps(f.metadata["adapter_config"]) == json.dumps(cfg)


def test_small_config_is_stored_whole(tmp_path):
    """Leaving keys out only where it makes the metadata smaller: a 4-key config would need an
    `absent` list of 35 names."""
    cfg = {"base_model_name_or_path": "x", "lora_alpha": 8, "peft_type": "LORA", "r": 4}
    path = deltacodec.encode(tiny_adapter(cfg), bits=3, container=2, out=tmp_path / "x.sld")
    assert cd.MARKER not in stored_metadata(path)
    assert deltacodec.load(path).metadata["adapter_config"] == cfg


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 20), st.floats(allow_nan=False, width=64),
                         st.sampled_from(["none", "LORA", "megatron.core", "x"]))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)), max_leaves=6)


@st.composite
def configs(draw):
    keys = draw(st.lists(st.sampled_from([k for k, _ in cd.TABLE_1]), unique=True))
    cfg = {}
    for k in keys:
        cfg[k] = TABLE[k] if draw(st.booleans()) else draw(json_values)
    for k in draw(st.lists(st.text(min_size=1, max_size=12), max_size=5, unique=True)):
        cfg.setdefault(k, draw(json_values))
    items = list(cfg.items())
    if draw(st.booleans()):
        items.sort()
    else:
        items = draw(st.permutations(items))
    return dict(items)


@settings(max_examples=300, deadline=None)
@given(configs())
def test_elide_then_restore_is_the_identity_on_any_config(cfg):
    """For every config (table keys at their value or not, in type or not; extra keys; sorted or
    not): what the writer stores comes back equal as a map, in order when it was sorted, and the
    reference reader agrees with the library's."""
    meta = {"encoder": "t", "adapter_config": cfg, "z": 1}
    stored = cd.elide(meta)
    for back in (cd.restore(stored), v2ref.restore_config(stored)):
        assert cd.same(back, meta)
        if list(cfg) == sorted(cfg):
            assert list(back["adapter_config"]) == list(cfg)
        assert list(back) == list(meta)
    if stored is not meta:
        assert len(stored["adapter_config"]) < len(cfg)


def test_a_str_enum_is_its_string(tmp_path):
    """PEFT's live config holds enums (peft_type = PeftType.LORA, a str enum) where the saved JSON
    holds strings; both are written as the same msgpack str, so both are left out alike (else the
    header, and with it a rate-controlled allocation, would depend on which one was encoded)."""
    import enum

    class Kind(str, enum.Enum):
        LORA = "LORA"

    plain, live = peft_like(), peft_like(peft_type=Kind.LORA)
    paths = [deltacodec.encode(tiny_adapter(c), bits=3, container=2, out=tmp_path / f"{i}.sld")
             for i, c in enumerate((plain, live))]
    assert open(paths[0], "rb").read() == open(paths[1], "rb").read()
    assert "peft_type" not in stored_metadata(paths[1])["adapter_config"]


def test_absent_naming_a_stored_key_keeps_the_stored_value(tmp_path):
    """`absent` only stops a key being added back; a key the config holds is never dropped or
    replaced, whatever the marker lists."""
    golden = os.path.join(HERE, "v2_peft_config_elided.sld")
    header, secs = v2ref.parse(open(golden, "rb").read())
    header["metadata"][cd.MARKER]["absent"] = ["bias", "use_bdlora"]
    p = tmp_path / "x.sld"
    p.write_bytes(v2ref.build(header, secs))
    got = deltacodec.load(p).metadata["adapter_config"]
    assert got["bias"] == "lora_only" and "use_bdlora" not in got
    assert got == v2ref.restore_config(header["metadata"])["adapter_config"]
