"""Which layout a file is read as (detected, or given), what an unrecognised file is told, what
the .sld records of the layout, and how decode falls back to PEFT layout when that record is
missing or unusable (metadata is informational). numpy only."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest

import deltacodec
from deltacodec.errors import AdapterError, DeltacodecWarning

from adapter_dirs import BASE_CONFIG, lora_tensors
from layout_files import KOHYA_META, diffusers_module, kohya_file, read_st, write_st

UNET_Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def read(path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeltacodecWarning)
        return deltacodec.read_adapter(path, **kw)


def _peft_dir(tmp_path, rng):
    d = tmp_path / "peft"
    write_st(str(d / "adapter_model.safetensors"), lora_tensors())
    (d / "adapter_config.json").write_text(json.dumps(BASE_CONFIG))
    return str(d)


def _peft_file_with_config(tmp_path, rng):
    return write_st(str(tmp_path / "a.safetensors"), lora_tensors(), {"adapter_config": json.dumps(BASE_CONFIG)})


def _peft_transformer_names(tmp_path, rng):
    # GPT-2-like module names start with "transformer.", a diffusers component: the PEFT config says which
    d = tmp_path / "gpt"
    write_st(str(d / "adapter_model.safetensors"), lora_tensors([("transformer.h.0.attn.c_attn", 24, 8)], prefix=""))
    (d / "adapter_config.json").write_text(json.dumps(BASE_CONFIG))
    return str(d)


def _diffusers_dir(tmp_path, rng):
    write_st(str(tmp_path / "db" / "pytorch_lora_weights.safetensors"), diffusers_module(UNET_Q, 16, 16, 4, rng))
    return str(tmp_path / "db")


def _diffusers_other_name(tmp_path, rng):
    return write_st(str(tmp_path / "style.safetensors"), diffusers_module(UNET_Q, 16, 16, 4, rng, "lora"))


def _diffusers_metadata(tmp_path, rng):
    return write_st(str(tmp_path / "x.safetensors"), diffusers_module(UNET_Q, 16, 16, 4, rng),
                    {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 4})})


def _kohya(tmp_path, rng):
    kohya_file(str(tmp_path / "k.safetensors"), rng)
    return str(tmp_path / "k.safetensors")


@pytest.mark.parametrize(
    "make,layout",
    [(_peft_dir, "peft"), (_peft_file_with_config, "peft"), (_peft_transformer_names, "peft"),
     (_diffusers_dir, "diffusers"), (_diffusers_other_name, "diffusers"), (_diffusers_metadata, "diffusers"),
     (_kohya, "kohya")],
    ids=lambda x: x if isinstance(x, str) else x.__name__.strip("_"),
)
def test_each_layout_is_detected(tmp_path, rng, make, layout):
    a = read(make(tmp_path, rng))
    assert a.layout == layout
    assert (a.layout_info is None) == (layout == "peft")


def test_a_peft_file_without_config_is_peft_and_asks_for_alpha(tmp_path):
    src = write_st(str(tmp_path / "sub" / "a.safetensors"), lora_tensors())
    with pytest.raises(AdapterError, match="--alpha"):
        deltacodec.read_adapter(src)
    assert read(src, alpha=8).layout == "peft"


def test_layout_given_overrides_detection(tmp_path, rng):
    src = _diffusers_other_name(tmp_path, rng)
    with pytest.raises(AdapterError, match="no lora_A/lora_B pairs"):  # PEFT has no 'lora.down' names
        deltacodec.read_adapter(src, layout="peft", alpha=4.0)
    p = write_st(str(tmp_path / "p.safetensors"), diffusers_module(UNET_Q, 16, 16, 4, rng))
    a = read(p, layout="peft", alpha=4.0)  # read as a PEFT file, "unet." is part of the module name
    assert a.layout == "peft" and [m.name for m in a.modules] == [UNET_Q] and a.modules[0].scale == 1.0
    with pytest.raises(AdapterError, match="not a kohya-ss LoRA key"):
        deltacodec.encode(_peft_dir(tmp_path, rng), out=str(tmp_path / "x.sld"), layout="kohya")


@pytest.mark.parametrize(
    "tensors,model",
    [({"model.layers.0.q_proj.weight": np.ones((4, 4), np.float32), "model.norm.weight": np.ones(4, np.float32)}, True),
     ({"x.lora_foo.weight": np.ones((4, 4), np.float32)}, False)],
    ids=["model", "lora-like"],
)
def test_an_unrecognised_file_says_what_was_expected(tmp_path, tensors, model):
    src = write_st(str(tmp_path / "m.safetensors"), tensors)
    with pytest.raises(AdapterError) as info:
        deltacodec.encode(src, out=str(tmp_path / "m.sld"))
    msg = str(info.value)
    assert msg.startswith(src) and "no lora_A/lora_B pairs" in msg
    assert ("this looks like a model" in msg) == model
    for expected in ("PEFT (", "diffusers (", "kohya-ss ("):
        assert expected in msg, msg
    assert not os.path.exists(tmp_path / "m.sld")


def test_the_sld_records_the_layout_only_for_non_peft_files(tmp_path, rng):
    from deltacodec.cli import inspect_summary

    peft_sld = deltacodec.encode(_peft_dir(tmp_path, rng), out=str(tmp_path / "p.sld"))
    assert "layout" not in deltacodec.load(peft_sld).metadata  # PEFT files stay as they were (spec 3.3)
    k_sld = deltacodec.encode(_kohya(tmp_path, rng), out=str(tmp_path / "k.sld"))
    meta = inspect_summary(k_sld)["metadata"]
    assert meta["layout"] == "kohya" and meta["layout_info"]["metadata"] == KOHYA_META
    assert meta["layout_info"]["file_name"] == "k.safetensors" and meta["layout_info"]["version"] == 1


@pytest.mark.parametrize(
    "layout,info,why",
    [
        ("diffusers", None, "missing or not a map"),
        ("diffusers", "x", "missing or not a map"),
        ("diffusers", {"version": 2}, "version"),
        ("diffusers", {"version": 1, "file_name": "../evil.safetensors"}, "file_name"),
        ("diffusers", {"version": 1, "file_name": "/abs.safetensors"}, "file_name"),
        ("diffusers", {"version": 1, "file_name": "x.bin"}, "file_name"),
        ("diffusers", {"version": 1, "metadata": {"a": 1}}, "metadata"),
        ("diffusers", {"version": 1, "key_style": {"unet": "weird"}}, "key style"),
        ("kohya", {"version": 1}, "not a kohya-ss stem"),
        ("lycoris", {"version": 1}, "not one of"),
    ],
)
def test_decode_falls_back_to_peft_layout_when_the_layout_record_is_unusable(tmp_path, rng, layout, info, why):
    a = read(_diffusers_dir(tmp_path, rng))
    a.layout, a.layout_info = layout, info
    sld = deltacodec.encode(a, bits=8, out=str(tmp_path / "a.sld"))
    with pytest.warns(DeltacodecWarning, match=why) as rec:
        paths = deltacodec.decode(sld, str(tmp_path / "dec"))
    assert any("PEFT layout" in str(w.message) for w in rec)
    assert sorted(os.path.basename(p) for p in paths) == ["adapter_config.json", "adapter_model.safetensors"]
    back = read(str(tmp_path / "dec"))
    f = deltacodec.load(sld)
    assert back.layout == "peft" and [(m.name, m.scale) for m in back.modules] == [(m.name, m.scale) for m in f.modules]
    assert not os.path.exists(tmp_path / "evil.safetensors")


def test_a_decoded_directory_of_each_layout_reads_back_as_that_layout(tmp_path, rng):
    for make, layout in ((_diffusers_dir, "diffusers"), (_kohya, "kohya")):
        sld = deltacodec.encode(make(tmp_path, rng), bits=8, out=str(tmp_path / f"{layout}.sld"))
        (path,) = deltacodec.decode(sld, str(tmp_path / f"{layout}-dec"))
        assert read(path).layout == layout
        got, _ = read_st(path)
        assert got


# ---------------------------------------------------------------------------------------------
# the CLI: `sld encode --layout` overrides detection, `sld inspect` names the layout it recorded


def test_cli_encode_layout_override_and_inspect_names_the_layout(tmp_path, capsys):
    from cli_helpers import assert_one_line_error, assert_usage_error, run_sld

    rng = np.random.default_rng(7)
    src = str(tmp_path / "style.safetensors")
    kohya_file(src, rng)
    out = tmp_path / "k.sld"
    rc, _, err = run_sld(capsys, "encode", src, "--layout", "kohya", "-o", out, "-q")
    assert rc == 0, err
    rc, text, _ = run_sld(capsys, "inspect", out)
    assert rc == 0 and "  layout      kohya " in text
    rc, js, _ = run_sld(capsys, "inspect", out, "--json")
    assert json.loads(js)["layout"] == "kohya"

    # the same file forced to another layout has no pairs of that layout: an error listing what
    # was expected, never an adapter with no modules
    rc, _, err = run_sld(capsys, "encode", src, "--layout", "peft", "-o", tmp_path / "p.sld")
    assert_one_line_error(rc, err, src, "expected")
    assert not (tmp_path / "p.sld").exists()
    rc, _, err = run_sld(capsys, "encode", src, "--layout", "a1111", "-o", tmp_path / "q.sld")
    assert_usage_error(rc, err, "--layout")

    peft = _peft_dir(tmp_path, rng)
    rc, _, err = run_sld(capsys, "encode", peft, "-o", tmp_path / "peft.sld", "-q", "--report")
    assert rc == 0, err
    rc, text, _ = run_sld(capsys, "inspect", tmp_path / "peft.sld")
    assert "  layout      peft " in text
