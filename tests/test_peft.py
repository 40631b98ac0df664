"""Real adapters: a tiny Llama built from a config (no download), PEFT LoRA on top, and a
SineLoRA directory written the way the authors' reference implementation (a PEFT fork) writes it."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

import deltacodec

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def tiny_llama():
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def peft_lora(tmp_path, **lora_kw):
    model = tiny_llama()
    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False, **lora_kw)
    pm = peft.get_peft_model(model, cfg)
    out = tmp_path / "peft-adapter"
    pm.save_pretrained(str(out))
    return out, pm


def saved_tensors(path):
    from safetensors.torch import load_file

    return {k: v.float().numpy() for k, v in load_file(str(path / "adapter_model.safetensors")).items()}


@pytest.mark.parametrize("bits", [3, 8])
def test_peft_lora_encode_inspect_decode(tmp_path, bits):
    src, _ = peft_lora(tmp_path)
    orig = saved_tensors(src)
    out = deltacodec.encode(str(src), bits=bits, out=str(tmp_path / "a.sld"))
    f = deltacodec.load(out)
    assert len(f.modules) == 2 * len(TARGETS)
    assert f.metadata["method"] == "lora" and all(not m.sine and m.scale == 2.0 for m in f.modules)
    from deltacodec.cli import inspect_summary

    s = inspect_summary(out)
    assert s["params"] == sum(v.size for v in orig.values())
    deltacodec.decode(out, str(tmp_path / "dec"))
    dec = saved_tensors(tmp_path / "dec")
    assert set(dec) == set(orig)
    for k, v in orig.items():
        rel = np.linalg.norm(dec[k] - v) / np.linalg.norm(v)
        # k-means MSE falls ~4x per bit; 3 bits on these near-uniform/Gaussian tensors keeps the
        # relative error near 2**-3, 8 bits near 2**-8.
        assert rel < {3: 0.2, 8: 0.01}[bits], (k, rel)
    cfg = json.loads((tmp_path / "dec" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and cfg["peft_type"] == "LORA"
    # PEFT itself loads the decoded directory
    model = tiny_llama()
    pm = peft.PeftModel.from_pretrained(model, str(tmp_path / "dec"))
    assert pm is not None


def test_peft_16bit_round_trip_is_exact_to_float16(tmp_path):
    src, _ = peft_lora(tmp_path)
    orig = saved_tensors(src)
    out = deltacodec.encode(str(src), bits=16, out=str(tmp_path / "a.sld"))
    f = deltacodec.load(out)
    for m in f.modules:
        A, B = f.dequantize(m.name)
        np.testing.assert_array_equal(A, orig[m.A.name].astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(B, orig[m.B.name].astype(np.float16).astype(np.float32))


def test_peft_dora_magnitudes_are_kept_losslessly(tmp_path):
    src, _ = peft_lora(tmp_path, use_dora=True)
    orig = saved_tensors(src)
    mags = [k for k in orig if "magnitude" in k]
    assert mags
    f = deltacodec.load(deltacodec.encode(str(src), bits=2, out=str(tmp_path / "a.sld")))
    for k in mags:
        np.testing.assert_array_equal(f.tensor(k), orig[k])


def write_sinlora_reference_style(path, model, omega=200.0):
    """What the reference fork's save_pretrained leaves: SINLORA config, weights in a .bin."""
    torch.manual_seed(1)
    state = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.split(".")[-1] in TARGETS:
            r = 8
            state[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, mod.in_features) / math.sqrt(mod.in_features)
            state[f"base_model.model.{name}.lora_B.weight"] = torch.randn(mod.out_features, r) * 0.01
    os.makedirs(path, exist_ok=True)
    torch.save(state, os.path.join(path, "adapter_model.bin"))
    cfg = {
        "peft_type": "SINLORA", "base_model_name_or_path": "tiny-llama", "r": 8, "lora_alpha": 16,
        "lora_dropout": 0.05, "target_modules": TARGETS, "freq": omega, "s": 1.0,
        "fan_in_fan_out": False, "bias": "none", "task_type": "CAUSAL_LM", "inference_mode": True,
    }
    with open(os.path.join(path, "adapter_config.json"), "w") as fh:
        json.dump(cfg, fh)
    return {k: v.numpy() for k, v in state.items()}


def test_sinlora_reference_directory_encode_inspect_decode(tmp_path):
    model = tiny_llama()
    orig = write_sinlora_reference_style(tmp_path / "sin", model)
    out = deltacodec.encode(str(tmp_path / "sin"), bits=8, out=str(tmp_path / "s.sld"))
    f = deltacodec.load(out)
    assert f.metadata["method"] == "sine" and f.metadata["base_model"] == "tiny-llama"
    for m in f.modules:
        assert m.sine and m.omega == 200.0 and m.scale == 2.0
        assert m.gamma == pytest.approx(math.sqrt(m.in_features))
        A, B = f.dequantize(m.name)
        assert np.linalg.norm(A - orig[m.A.name]) / np.linalg.norm(orig[m.A.name]) < 0.01
    deltacodec.decode(out, str(tmp_path / "dec"))
    cfg = json.loads((tmp_path / "dec" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "SINLORA" and cfg["freq"] == 200.0
    assert cfg["deltacodec"] == {"omega": 200.0, "gamma": "sqrt-in"}


# ----------------------------------------------------------------------------------------------
# The strict reader against PEFT itself: what PEFT saves reads without a word and means what
# PEFT's layers compute; what PEFT's layers compute is the reference for every scale.


def peft_scales(pm):
    """module name as saved -> scaling of PEFT's own LoRA layer."""
    out = {}
    for name, mod in pm.named_modules():
        if isinstance(getattr(mod, "scaling", None), dict) and "default" in mod.scaling:
            out[name] = mod.scaling["default"]
    return out


@pytest.mark.parametrize(
    "lora_kw",
    [
        {},
        {"use_rslora": True},
        {"rank_pattern": {"q_proj": 4, r"layers\.1\..*v_proj": 2}, "alpha_pattern": {"down_proj": 32, "k_proj|v_proj": 3}},
        {"rank_pattern": {"^model.layers.0.self_attn.q_proj": 2}, "use_rslora": True, "lora_alpha": 5},
        {"modules_to_save": ["lm_head"], "bias": "none", "lora_dropout": 0.1},
    ],
    ids=["plain", "rslora", "patterns", "anchored-pattern-rslora", "modules_to_save"],
)
def test_peft_saved_configs_read_silently_with_peft_scales(tmp_path, lora_kw):
    import warnings

    kw = {"r": 8, "lora_alpha": 16, "target_modules": TARGETS, "init_lora_weights": False, **lora_kw}
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**kw))
    pm.save_pretrained(str(tmp_path / "ad"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", deltacodec.DeltacodecWarning)
        a = deltacodec.read_adapter(str(tmp_path / "ad"))
    want = peft_scales(pm)
    assert len(a.modules) == len(want) == 2 * len(TARGETS)
    for m in a.modules:
        assert m.scale == pytest.approx(want[m.name], rel=1e-15), m.name
        assert m.rank == pm.get_submodule(m.name).r["default"]
    if "modules_to_save" in lora_kw:
        assert any(k.endswith("lm_head.weight") for k in a.extras)


def test_a_peft_model_state_dict_with_two_adapters_is_refused(tmp_path):
    from safetensors.torch import save_file

    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    pm.add_adapter("other", peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    d = tmp_path / "raw"
    d.mkdir()
    save_file({k: v.contiguous() for k, v in pm.state_dict().items()}, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    with pytest.raises(deltacodec.AdapterError, match="several adapters.*'default'.*'other'.*selected_adapters"):
        deltacodec.read_adapter(str(d))


def test_a_model_checkpoint_is_refused_as_a_model(tmp_path):
    from safetensors.torch import save_file

    model = tiny_llama()
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if "lm_head" not in k}, str(tmp_path / "model.safetensors"))
    with pytest.raises(deltacodec.AdapterError, match="no lora_A/lora_B pairs: this looks like a model") as info:
        deltacodec.encode(str(tmp_path / "model.safetensors"), out=str(tmp_path / "m.sld"))
    assert "--alpha" not in str(info.value) and not (tmp_path / "m.sld").exists()
