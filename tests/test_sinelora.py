"""deltacodec.sinelora: a sine-LoRA layer in current PEFT, and its hand-off to the codec.

Everything runs on a tiny Llama built from a config (no download)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import deltacodec

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
sl = pytest.importorskip("deltacodec.sinelora")

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
EPS32 = float(np.finfo(np.float32).eps)


def tiny_llama(seed: int = 0):
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def sine_model(omega=100.0, gamma="sqrt-in", r=4, alpha=8, random_b=True, **kw):
    """A SineLoRA model; random_b=True gives B non-zero (PEFT's init_lora_weights=False) so ΔW ≠ 0."""
    cfg = sl.sinelora_config(omega, gamma, r=r, lora_alpha=alpha, target_modules=TARGETS,
                             init_lora_weights=not random_b, **kw)
    torch.manual_seed(1)
    return sl.get_sinelora_model(tiny_llama(), cfg)


def layer_of(pm, name="model.layers.0.mlp.down_proj"):
    return dict(pm.base_model.model.named_modules())[name]


# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", ["sqrt-in", 3.0])
@pytest.mark.parametrize("name", ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.k_proj"])
def test_forward_is_x_times_w_plus_delta_in_float64(name, gamma):
    pm = sine_model(omega=100.0, gamma=gamma).eval()
    layer = layer_of(pm, name)
    assert isinstance(layer, sl.SineLoraLinear) and layer.is_sine("default")
    W = layer.get_base_layer().weight.detach().double()
    A = layer.lora_A["default"].weight.detach().double()
    B = layer.lora_B["default"].weight.detach().double()
    g = math.sqrt(W.shape[1]) if gamma == "sqrt-in" else gamma
    dW = 2.0 * torch.sin(100.0 * (B @ A)) / g  # scale = alpha / r = 2
    assert float((100.0 * (B @ A)).abs().max()) > 1.0  # the sine is far from linear here
    x = torch.randn(3, 5, W.shape[1])
    ref = x.double() @ (W + dW).T
    with torch.no_grad():
        y = layer(x)
    # float32 against float64: the sine's argument carries ω·(float32 error of B@A) ≈ 1e-6, the
    # sums over `in` a relative 1e-6; 1e-5 of the output's scale covers both with margin.
    tol = 1e-5 * float(ref.abs().max())
    assert float((y.double() - ref).abs().max()) < tol


def test_forward_dropout_acts_on_the_adapter_input_only():
    pm = sine_model(lora_dropout=0.5).train()
    layer = layer_of(pm)
    x = torch.randn(4, 160)
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    xd = F.dropout(x, 0.5, training=True)
    W = layer.get_base_layer().weight
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    ref = x @ W.T + xd @ (2.0 * torch.sin(100.0 * (B @ A)) / math.sqrt(160)).T
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)


def test_merge_and_unload_equals_codec_apply_of_16bit_encode(tmp_path):
    pm = sine_model(omega=100.0).eval()
    pm.save_pretrained(str(tmp_path / "ad"))
    sld = deltacodec.encode(str(tmp_path / "ad"), bits=16, out=str(tmp_path / "a.sld"))
    factors = {}
    for name, mod in sl.sinelora_layers(pm).items():
        factors[name] = (mod.lora_A["default"].weight.detach().double(), mod.lora_B["default"].weight.detach().double(),
                         mod.scaling["default"] / mod.sinelora_gamma["default"])
    x = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        y_peft = pm(x).logits
    merged = pm.merge_and_unload()
    patched = tiny_llama()
    h = deltacodec.apply(patched, sld)
    assert len(h.patched) == 2 * len(TARGETS)
    mw, pw = dict(merged.named_modules()), dict(patched.named_modules())
    for name, (A, B, s) in factors.items():
        short = name[len("base_model.model."):] if name.startswith("base_model.model.") else name
        wm, wp = mw[short].weight.detach().double(), pw[short].weight.detach().double()
        # 16 bits stores A and B as float16, so the codec's ΔW is s·sin(ω·Â B̂) with Â, B̂ the
        # factors rounded to float16, while merge_and_unload uses the float32 factors. Since
        # |sin a − sin b| ≤ |a − b|, elementwise |ΔW − ΔŴ| ≤ s·ω·|BA − B̂Â|; float32 rounding of
        # W + ΔW and of ω·BA adds a few ulp (the 1e-6 term).
        Ah, Bh = A.half().double(), B.half().double()
        bound = s * 100.0 * (B @ A - Bh @ Ah).abs() + 1e-6
        diff = (wm - wp).abs()
        assert bool((diff <= bound).all()), (name, float((diff - bound).max()))
        assert float(diff.max()) > 0  # the float16 rounding is visible: the bound is not vacuous
    with torch.no_grad():
        y_merged, y_patched = merged(x).logits, patched(x).logits
    torch.testing.assert_close(y_merged, y_peft, rtol=1e-4, atol=1e-4)  # merge is exact up to fp32
    assert float((y_patched - y_merged).abs().max()) < 2e-2  # fp16 factors, through 2 layers
    h.remove()


@pytest.mark.parametrize("gamma,rslora", [("sqrt-in", False), (5.0, False), ("sqrt-in", True), ("2*sqrt-in", False)])
def test_saved_adapter_encodes_with_no_flags(tmp_path, gamma, rslora):
    pm = sine_model(omega=123.5, gamma=gamma, r=4, alpha=16, use_rslora=rslora)
    pm.save_pretrained(str(tmp_path / "ad"))
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["use_sinelora"] is True and cfg["sinelora_frequency"] == 123.5 and cfg["peft_type"] == "LORA"
    assert cfg["sinelora_scaling"] == {"sqrt-in": None, 5.0: 5.0, "2*sqrt-in": "2*sqrt-in"}[gamma]
    f = deltacodec.load(deltacodec.encode(str(tmp_path / "ad"), bits=3, out=str(tmp_path / "a.sld")))
    assert f.metadata["method"] == "sine" and len(f.modules) == 2 * len(TARGETS)
    for m in f.modules:
        assert m.sine and m.omega == 123.5 and m.rank == 4
        want = {"sqrt-in": math.sqrt(m.in_features), 5.0: 5.0, "2*sqrt-in": 2 * math.sqrt(m.in_features)}[gamma]
        assert m.gamma == pytest.approx(want, rel=1e-12)
        assert m.scale == pytest.approx(16 / math.sqrt(4) if rslora else 16 / 4, rel=1e-12)
        layer = layer_of(pm, m.name[len("base_model.model."):])
        assert layer.sinelora_gamma["default"] == pytest.approx(m.gamma, rel=1e-12)
        assert layer.scaling["default"] == pytest.approx(m.scale, rel=1e-12)


def test_training_moves_b_and_lowers_the_loss():
    pm = sine_model(omega=50.0, random_b=False).train()  # PEFT's default init: B = 0, so ΔW = 0
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    layer = layer_of(pm)
    B0 = layer.lora_B["default"].weight.detach().clone()
    assert float(B0.abs().max()) == 0.0
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 128, (8, 16), generator=g)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(25):
        loss = pm(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert float(layer.lora_B["default"].weight.detach().abs().max()) > 1e-3
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("gamma", ["sqrt-in", "2*sqrt-in"])
def test_load_sinelora_round_trip_and_the_plain_peft_trap(tmp_path, gamma):
    pm = sine_model(omega=80.0, gamma=gamma).eval()
    pm.save_pretrained(str(tmp_path / "ad"))
    x = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        ref = pm(x).logits
        back = sl.load_sinelora(tiny_llama(), str(tmp_path / "ad"))
        torch.testing.assert_close(back(x).logits, ref, rtol=0, atol=0)
    assert all(m.sinelora_omega["default"] == 80.0 for m in sl.sinelora_layers(back).values())
    # Plain PEFT drops the sine keys (with a warning) and builds ordinary LoRA layers.
    with pytest.warns(UserWarning, match="use_sinelora"):
        plain = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "ad"))
    assert not sl.sinelora_layers(plain)
    # A directory written by `sld decode` (ω, γ in its "deltacodec" block) loads too.
    deltacodec.decode(deltacodec.encode(str(tmp_path / "ad"), bits=16, out=str(tmp_path / "a.sld")),
                      str(tmp_path / "dec"))
    dec = sl.load_sinelora(tiny_llama(), str(tmp_path / "dec"))
    assert {n: m.sinelora_gamma["default"] for n, m in sl.sinelora_layers(dec).items()} == pytest.approx(
        {n: m.sinelora_gamma["default"] for n, m in sl.sinelora_layers(pm).items()}, rel=1e-12)
    with torch.no_grad():
        assert float((dec(x).logits - ref).abs().max()) < 2e-2


def test_mixed_adapters_and_batches():
    pm = sine_model(omega=60.0).eval()
    pm.add_adapter("plain", peft.LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False))
    layer = layer_of(pm)
    assert layer.is_sine("default") and not layer.is_sine("plain")
    x = torch.randint(0, 128, (4, 9))
    with torch.no_grad():
        pm.set_adapter("default")
        y_sine = pm(x).logits
        pm.set_adapter("plain")
        y_plain = pm(x).logits
        with pm.disable_adapter():
            y_base = pm(x).logits
        y_mix = pm(x, adapter_names=["default", "plain", "__base__", "default"]).logits
    for i, ref in enumerate([y_sine, y_plain, y_base, y_sine]):
        torch.testing.assert_close(y_mix[i], ref[i], rtol=1e-5, atol=1e-5)
    assert float((y_sine - y_plain).abs().max()) > 1e-3


def test_rejections():
    with pytest.raises(ValueError, match="frequency"):
        sl.sinelora_config(0.0, r=4, target_modules=TARGETS)
    with pytest.raises(ValueError, match="γ"):
        sl.sinelora_config(10.0, gamma=-1.0, r=4, target_modules=TARGETS)
    with pytest.raises(ValueError, match="DoRA"):
        sl.sinelora_config(10.0, r=4, target_modules=TARGETS, use_dora=True)
    with pytest.raises(ValueError, match="lora_bias"):
        sl.sinelora_config(10.0, r=4, target_modules=TARGETS, lora_bias=True)
    cfg = sl.sinelora_config(10.0, r=4, target_modules=["q_proj", "embed_tokens"])
    with pytest.raises(ValueError, match="embed_tokens"):
        sl.get_sinelora_model(tiny_llama(), cfg)
    with pytest.raises(TypeError):
        sl.get_sinelora_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=TARGETS))


def test_import_deltacodec_does_not_import_peft():
    code = "import sys, deltacodec; sys.exit(1 if 'peft' in sys.modules or 'transformers' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
