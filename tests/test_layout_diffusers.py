"""diffusers LoRA files (pytorch_lora_weights.safetensors), without diffusers: per-component
configs in the `lora_adapter_metadata` metadata (or none: alpha = rank), the three factor-name
styles, round trips that give back the same keys, file name and metadata, configs rebuilt when
they no longer describe the modules, sine adapters, and malformed files. Files are written with
numpy here; tests/test_diffusers_pipeline.py checks the same against diffusers itself."""

from __future__ import annotations

import json
import math
import os
import re
import warnings

import numpy as np
import pytest

import deltacodec
from deltacodec.errors import AdapterError, DeltacodecWarning

from layout_files import diffusers_module, read_st, write_st

UNET_Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
UNET_K = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
TE_Q = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
TE2_V = "text_encoder_2.text_model.encoder.layers.1.self_attn.v_proj"


def quiet_read(path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeltacodecWarning)
        return deltacodec.read_adapter(path, **kw)


def component_metadata(**configs) -> str:
    """lora_adapter_metadata as diffusers writes it: each component's config keys prefixed."""
    return json.dumps({f"{c}.{k}": v for c, cfg in configs.items() for k, v in cfg.items()}, indent=2, sort_keys=True)


def sd_file(path, rng, *, styles=("peft", "peft"), metadata=True, te2=False):
    t = {}
    t.update(diffusers_module(UNET_Q, 16, 16, 4, rng, styles[0]))
    t.update(diffusers_module(UNET_K, 16, 8, 2, rng, styles[0]))
    t.update(diffusers_module(TE_Q, 8, 8, 2, rng, styles[1]))
    if te2:
        t.update(diffusers_module(TE2_V, 12, 12, 4, rng, styles[1]))
    meta = {"format": "pt"}
    if metadata:
        meta["lora_adapter_metadata"] = component_metadata(
            unet={"r": 4, "lora_alpha": 8, "rank_pattern": {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k": 2},
                  "alpha_pattern": {"to_k": 3}, "target_modules": ["to_q", "to_k"], "peft_type": "LORA"},
            text_encoder={"r": 2, "lora_alpha": 4, "use_rslora": True, "target_modules": ["q_proj"]},
            **({"text_encoder_2": {"r": 4, "lora_alpha": 4}} if te2 else {}),
        )
    write_st(path, t, meta)
    return t, meta


def test_component_configs_give_each_module_its_scale(tmp_path, rng):
    sd_file(str(tmp_path / "pytorch_lora_weights.safetensors"), rng, te2=True)
    a = quiet_read(str(tmp_path))  # a DreamBooth output directory
    assert a.layout == "diffusers"
    scales = {m.name: m.scale for m in a.modules}
    # the reference, per component: alpha (alpha_pattern first) / r, or / √r with use_rslora
    assert scales == {UNET_Q: 8 / 4, UNET_K: 3 / 2, TE_Q: 4 / math.sqrt(2), TE2_V: 4 / 4}


def test_files_without_configs_mean_alpha_equals_rank(tmp_path, rng):
    sd_file(str(tmp_path / "pytorch_lora_weights.safetensors"), rng, metadata=False)
    a = quiet_read(str(tmp_path / "pytorch_lora_weights.safetensors"))
    assert a.layout == "diffusers" and all(m.scale == 1.0 for m in a.modules)


@pytest.mark.parametrize("styles", [("peft", "peft"), ("lora", "lora_linear_layer"), ("lora", "peft")],
                         ids=["peft", "diffusers-own", "mixed"])
@pytest.mark.parametrize("bits", [3, 16])
def test_round_trip_gives_back_keys_file_name_and_metadata(tmp_path, rng, styles, bits):
    src = str(tmp_path / "in" / "pytorch_lora_weights.safetensors")
    t, meta = sd_file(src, rng, styles=styles)
    sld = deltacodec.encode(src, bits=bits, out=str(tmp_path / "a.sld"))
    f = deltacodec.load(sld)
    assert f.metadata["layout"] == "diffusers"
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeltacodecWarning)
        paths = deltacodec.decode(sld, str(tmp_path / "dec"))
    assert paths == [str(tmp_path / "dec" / "pytorch_lora_weights.safetensors")]
    got, got_meta = read_st(paths[0])
    assert got_meta == meta and sorted(got) == sorted(t)
    for k, v in t.items():
        mod = k.rsplit(".", 3 if ".lora." in k or "lora_linear_layer" in k else 2)[0]
        A, B = f.dequantize(mod)
        want = A if re.search(r"(lora_A|down)\.weight$", k) else B
        np.testing.assert_array_equal(got[k][0], want)
        if bits == 16:
            np.testing.assert_array_equal(got[k][0], v.astype(np.float16).astype(np.float32))


def test_a_file_name_other_than_dreambooths_is_kept(tmp_path, rng):
    src = str(tmp_path / "my_lora.safetensors")
    sd_file(src, rng)
    sld = deltacodec.encode(src, bits=4, out=str(tmp_path / "a.sld"))
    assert deltacodec.decode(sld, str(tmp_path / "dec")) == [str(tmp_path / "dec" / "my_lora.safetensors")]


def test_a_config_that_no_longer_fits_is_rebuilt_with_a_warning(tmp_path, rng):
    src = str(tmp_path / "pytorch_lora_weights.safetensors")
    _, meta = sd_file(src, rng)
    sld = deltacodec.encode(src, bits=8, out=str(tmp_path / "a.sld"), alpha=6.0)  # every module: alpha 6
    f = deltacodec.load(sld)
    with pytest.warns(DeltacodecWarning, match="config of component .* not usable.*rebuilt"):
        deltacodec.decode(sld, str(tmp_path / "dec"))
    out = str(tmp_path / "dec" / "pytorch_lora_weights.safetensors")
    _, got_meta = read_st(out)
    assert got_meta["format"] == "pt" and got_meta["lora_adapter_metadata"] != meta["lora_adapter_metadata"]
    again = quiet_read(out)
    assert {m.name: m.scale for m in again.modules} == pytest.approx({m.name: m.scale for m in f.modules}, rel=1e-12)


def test_a_file_without_configs_gets_one_when_a_scale_is_not_one(tmp_path, rng):
    src = str(tmp_path / "pytorch_lora_weights.safetensors")
    sd_file(src, rng, metadata=False)
    sld = deltacodec.encode(src, bits=8, out=str(tmp_path / "a.sld"), alpha=8.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeltacodecWarning)
        deltacodec.decode(sld, str(tmp_path / "dec"))
    out = str(tmp_path / "dec" / "pytorch_lora_weights.safetensors")
    assert "lora_adapter_metadata" in read_st(out)[1]
    assert {m.name: m.scale for m in quiet_read(out).modules} == {m.name: m.scale for m in deltacodec.load(sld).modules}


def test_sine_configs_in_the_metadata_make_a_sine_adapter_and_stay_as_they_are(tmp_path, rng):
    t = {**diffusers_module(UNET_Q, 16, 16, 4, rng), **diffusers_module(UNET_K, 16, 8, 4, rng)}
    meta = {"format": "pt", "lora_adapter_metadata": component_metadata(
        unet={"r": 4, "lora_alpha": 4, "use_sinelora": True, "sinelora_frequency": 200.0, "sinelora_scaling": "2*sqrt-in"})}
    src = write_st(str(tmp_path / "pytorch_lora_weights.safetensors"), t, meta)
    sld = deltacodec.encode(src, bits=3, out=str(tmp_path / "a.sld"))  # no flags
    f = deltacodec.load(sld)
    assert f.metadata["method"] == "sine"
    assert all(m.sine and m.omega == 200.0 and m.gamma == 2 * math.sqrt(m.in_features) for m in f.modules)
    deltacodec.decode(sld, str(tmp_path / "dec"))
    assert read_st(str(tmp_path / "dec" / "pytorch_lora_weights.safetensors"))[1] == meta  # nothing to add
    # ω given at encode over the config's: the decoded file says so in a 'deltacodec' key
    sld2 = deltacodec.encode(src, bits=3, out=str(tmp_path / "b.sld"), omega=50.0)
    deltacodec.decode(sld2, str(tmp_path / "dec2"))
    out2 = str(tmp_path / "dec2" / "pytorch_lora_weights.safetensors")
    assert json.loads(read_st(out2)[1]["deltacodec"])["omega"] == 50.0
    assert {m.omega for m in quiet_read(out2).modules} == {50.0}


def test_bfloat16_files_are_read_exactly(tmp_path, rng):
    vals = {k: (np.asarray(v, np.float32).view(np.uint32) & 0xFFFF0000).view(np.float32)
            for k, v in diffusers_module(UNET_Q, 16, 16, 4, rng).items()}
    write_st(str(tmp_path / "pytorch_lora_weights.safetensors"), {k: (v, "BF16") for k, v in vals.items()})
    (m,) = quiet_read(str(tmp_path / "pytorch_lora_weights.safetensors")).modules
    np.testing.assert_array_equal(m.A, vals[f"{UNET_Q}.lora_A.weight"])
    np.testing.assert_array_equal(m.B, vals[f"{UNET_Q}.lora_B.weight"])


# ----------------------------------------------------------------------------------------------
# Malformed files


def _refused(path, match, names=(), **kw):
    out = os.path.join(os.path.dirname(path), "bad.sld")
    with pytest.raises(AdapterError) as info:
        deltacodec.encode(path, bits=3, out=out, **kw)
    msg = str(info.value)
    assert "\n" not in msg and re.search(match, msg), msg
    for n in names:
        assert n in msg, (n, msg)
    assert not os.path.exists(out)


def test_a_key_without_a_component_prefix_is_refused_naming_it(tmp_path, rng):
    t = {**diffusers_module(UNET_Q, 16, 16, 4, rng), "vae.encoder.conv_in.weight": np.ones((4, 3), np.float32)}
    src = write_st(str(tmp_path / "pytorch_lora_weights.safetensors"), t, {"lora_adapter_metadata": component_metadata(unet={"r": 4})})
    _refused(src, "no pipeline-component prefix", names=("vae.encoder.conv_in.weight",))


def test_prefixed_and_unprefixed_factors_without_a_config_are_a_mixed_file(tmp_path, rng):
    t = {**diffusers_module(UNET_Q, 16, 16, 4, rng), **diffusers_module("base_model.model.layers.0.q_proj", 8, 8, 4, rng)}
    src = write_st(str(tmp_path / "x.safetensors"), t)
    _refused(src, "mixes LoRA layouts", names=(UNET_Q, "base_model.model.layers.0.q_proj"))


def test_one_factor_named_in_two_styles_is_refused_naming_both(tmp_path, rng):
    t = diffusers_module(UNET_Q, 16, 16, 4, rng) | {f"{UNET_Q}.lora.down.weight": np.ones((4, 16), np.float32)}
    src = write_st(str(tmp_path / "pytorch_lora_weights.safetensors"), t)
    _refused(src, "both the A factor", names=(f"{UNET_Q}.lora_A.weight", f"{UNET_Q}.lora.down.weight"))


@pytest.mark.parametrize(
    "text,match,name",
    [
        ('{"r": 4}', "does not start with a pipeline component", "'r'"),
        ('{"unet.r": "4"}', "must be an integer", "'r'"),
        ('{"unet.r": 2}', "config says rank 2", UNET_Q),  # names the module (the tensors are at fault too)
        ('{"unet.lora_alpha": Infinity}', "lora_alpha", "lora_adapter_metadata"),
        ("[1]", "JSON object", "lora_adapter_metadata"),
        ('{"unet.r": 4', "not valid JSON", "lora_adapter_metadata"),
        ('{"unet.rank_pattern": {"(a)\\\\1": 2}}', "backreference", "rank_pattern"),
    ],
    ids=["no-component", "wrong-type", "wrong-rank", "infinite", "not-a-map", "not-json", "bad-pattern"],
)
def test_malformed_component_configs_are_refused_naming_the_key(tmp_path, rng, text, match, name):
    src = write_st(str(tmp_path / "pytorch_lora_weights.safetensors"), diffusers_module(UNET_Q, 16, 16, 4, rng),
                   {"lora_adapter_metadata": text})
    _refused(src, match, names=(name,) if name == UNET_Q else (name, "lora_adapter_metadata"))


# ---------------------------------------------------------------------------------------------
# diffusers < 0.19: attention-processor keys


ATTN = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1"


def _processor_file(tmp_path, rng, projs=("to_q", "to_k", "to_v", "to_out")):
    t = {}
    for proj in projs:
        t[f"{ATTN}.processor.{proj}_lora.down.weight"] = rng.standard_normal((4, 16)).astype(np.float32)
        t[f"{ATTN}.processor.{proj}_lora.up.weight"] = rng.standard_normal((16, 4)).astype(np.float32)
    return t, write_st(str(tmp_path / "old" / "pytorch_lora_weights.safetensors"), t)


def test_attention_processor_keys_read_as_the_attention_projections_and_are_written_back(tmp_path, rng):
    t, src = _processor_file(tmp_path, rng)
    a = quiet_read(src)
    assert a.layout == "diffusers" and a.layout_info["key_style"] == {"unet": "processor"}
    want = {f"{ATTN}.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0")}
    assert {m.name for m in a.modules} == want and all(m.scale == 1.0 for m in a.modules)  # no config: alpha = r
    for m in a.modules:
        proj = m.name.rsplit(".", 2)[-2] if m.name.endswith(".0") else m.name.rsplit(".", 1)[-1]
        assert np.array_equal(m.A, t[f"{ATTN}.processor.{proj}_lora.down.weight"])
        assert np.array_equal(m.B, t[f"{ATTN}.processor.{proj}_lora.up.weight"])
    sld = deltacodec.encode(src, bits=16, out=str(tmp_path / "old.sld"))
    (path,) = deltacodec.decode(sld, str(tmp_path / "dec"))
    got, meta = read_st(path)
    assert os.path.basename(path) == "pytorch_lora_weights.safetensors" and sorted(got) == sorted(t)
    for k, v in t.items():  # float32 sources are stored as float16 at 16 bits
        assert np.array_equal(got[k][0], v.astype(np.float16).astype(np.float32)), k


def test_attention_processor_and_peft_keys_for_one_module_are_refused(tmp_path, rng):
    t, _ = _processor_file(tmp_path, rng, projs=("to_q",))
    t[f"{ATTN}.to_q.lora_A.weight"] = t[f"{ATTN}.processor.to_q_lora.down.weight"]
    src = write_st(str(tmp_path / "mixed.safetensors"), t)
    with pytest.raises(AdapterError, match="to_q"):
        quiet_read(src)
