"""deltacodec.apply and `sld apply` on a tiny Llama (built from a config, no download)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import deltacodec
from deltacodec import ApplyError

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def tiny_llama(layers: int = 2, seed: int = 0):
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def trained_lora(tmp_path, steps: int = 3):
    """A PEFT LoRA trained a few steps so that B is not zero, saved with save_pretrained."""
    model = tiny_llama()
    pm = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(1)
    x = torch.randint(0, 128, (4, 16))
    for _ in range(steps):
        loss = pm(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    pm.save_pretrained(str(tmp_path / "lora"))
    return tmp_path / "lora", pm.eval()


def sine_adapter_dir(tmp_path, omega=150.0):
    """A sine adapter in the reference fork's layout with non-trivial A and B."""
    model = tiny_llama()
    g = torch.Generator().manual_seed(3)
    state = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.split(".")[-1] in TARGETS:
            state[f"base_model.model.{name}.lora_A.weight"] = torch.randn(8, mod.in_features, generator=g) / math.sqrt(mod.in_features)
            state[f"base_model.model.{name}.lora_B.weight"] = torch.randn(mod.out_features, 8, generator=g) * 0.05
    d = tmp_path / "sine"
    d.mkdir()
    torch.save(state, d / "adapter_model.bin")
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "SINLORA", "r": 8, "lora_alpha": 16, "freq": omega}))
    return d, state


def plain_reference(model, f, dtype=torch.float32):
    """W + ΔW from the file's decoded factors, in float64, then rounded once to W's dtype."""
    named = dict(model.named_parameters())
    out = {}
    for m in f.modules:
        A, B = f.dequantize(m.name)
        p = B.astype(np.float64) @ A.astype(np.float64)
        d = m.scale * (np.sin(m.omega * p) / m.gamma if m.sine else p)
        key = m.name[len("base_model.model."):] + ".weight"
        W = named[key].detach().double().numpy()
        out[key] = torch.from_numpy(W + (d.T if m.fan_in_fan_out else d)).to(dtype)
    return out


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("bits", [8, 16])
def test_lora_apply_matches_peft_merge(tmp_path, bits):
    src, pm = trained_lora(tmp_path)
    sld = deltacodec.encode(str(src), bits=bits, out=str(tmp_path / "a.sld"))
    base = tiny_llama()
    h = deltacodec.apply(base, sld)
    assert len(h.patched) == 10 and set(h.backends.values()) == {"torch"}
    # 1. weights vs a float64 reference of what the file holds: only fp32 matmul rounding differs
    ref = plain_reference(tiny_llama(), deltacodec.load(sld))
    params = dict(base.named_parameters())
    for k, v in ref.items():
        torch.testing.assert_close(params[k].detach(), v, rtol=1e-6, atol=1e-6)
    # 2. logits vs PEFT's own merge of the unquantized adapter
    merged = pm.merge_and_unload()
    x = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got, want = base(x).logits, merged(x).logits
    # 16 bits: factors rounded to float16 (2**-11 relative) -> ΔW error ~1e-3 relative;
    # 8 bits: k-means error ~2**-8 relative. Logits move by that fraction of ΔW's effect.
    tol = {16: 2e-4, 8: 2e-3}[bits]
    assert (got - want).abs().max().item() < tol * max(1.0, want.abs().max().item())


def test_sine_apply_matches_the_reference_sine_merge(tmp_path):
    d, state = sine_adapter_dir(tmp_path)
    sld = deltacodec.encode(str(d), bits=16, out=str(tmp_path / "s.sld"))
    base = tiny_llama()
    deltacodec.apply(base, sld)
    ref_model = tiny_llama()
    with torch.no_grad():
        for name, mod in ref_model.named_modules():
            key = f"base_model.model.{name}.lora_A.weight"
            if key in state:
                A, B = state[key].double(), state[f"base_model.model.{name}.lora_B.weight"].double()
                mod.weight += (2.0 * torch.sin(150.0 * (B @ A)) / math.sqrt(mod.in_features)).float()
    x = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        got, want = base(x).logits, ref_model(x).logits
    # float16 factors: B@A off by ~2**-11 relative, which sin(150·x) turns into an absolute error
    # of ~150·|B@A|·2**-11 in the sine's argument; ΔW is ~1e-1·that / sqrt(in).
    assert (got - want).abs().max().item() < 5e-3


def test_gpt2_conv1d_adapter_with_fan_in_fan_out_matches_peft_merge(tmp_path):
    # GPT-2's Conv1D stores W as in×out, which is what PEFT's fan_in_fan_out describes: the file
    # records it per module and apply adds ΔWᵀ. Checked against PEFT's own merge end to end.
    cfg = transformers.GPT2Config(vocab_size=128, n_positions=32, n_embd=64, n_layer=2, n_head=4)
    torch.manual_seed(0)
    pm = peft.get_peft_model(
        transformers.GPT2LMHeadModel(cfg).eval(),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
    )
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    pm.save_pretrained(str(tmp_path / "gpt2-lora"))
    sld = deltacodec.encode(str(tmp_path / "gpt2-lora"), bits=16, out=str(tmp_path / "g.sld"))
    assert all(m.fan_in_fan_out for m in deltacodec.load(sld).modules)
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(cfg).eval()
    h = deltacodec.apply(base, sld)
    assert len(h.patched) == 4
    merged = pm.merge_and_unload()
    x = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        got, want = base(x).logits, merged(x).logits
    # float16 factors (2**-11 relative) are the only difference; a transposed ΔW would be off by O(1).
    assert (got - want).abs().max().item() < 2e-4 * max(1.0, want.abs().max().item())


def test_remove_restores_weights_bit_exactly(tmp_path):
    d, _ = sine_adapter_dir(tmp_path)
    sld = deltacodec.encode(str(d), bits=3, out=str(tmp_path / "s.sld"))
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        model = tiny_llama().to(dtype)
        before = snapshot(model)
        h = deltacodec.apply(model, sld)
        changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
        assert len(changed) == 10
        h.remove()
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        with deltacodec.apply(model, sld):
            assert not torch.equal(model.state_dict()[changed[0]], before[changed[0]])
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_half_precision_weights_get_the_fp32_sum_rounded_once(tmp_path):
    d, _ = sine_adapter_dir(tmp_path)
    sld = deltacodec.encode(str(d), bits=4, out=str(tmp_path / "s.sld"))
    f = deltacodec.load(sld)
    u = 2.0**-24
    for dtype in (torch.float16, torch.bfloat16):
        model = tiny_llama().to(dtype)
        ref, err = {}, {}
        named = dict(model.named_parameters())
        for m in f.modules:
            A, B = f.dequantize(m.name)
            key = m.name[len("base_model.model."):] + ".weight"
            A64, B64 = A.astype(np.float64), B.astype(np.float64)
            d64 = m.scale * np.sin(m.omega * (B64 @ A64)) / m.gamma
            ref[key] = named[key].detach().double() + torch.from_numpy(d64)
            # fp32 evaluation error of ΔW before the one rounding: the rank-r matmul and the
            # products around it (|x - X| <= (r+2)u |B||A|), amplified by ω inside the sine, plus
            # a few roundings of c·sin and of the fp32 sum (kernels.py states the arithmetic).
            S = np.abs(B64) @ np.abs(A64)
            c = abs(m.scale / m.gamma)
            err[key] = torch.from_numpy(c * (m.omega * (m.rank + 2) * u * S + 4 * u) + 2 * u * ref[key].abs().numpy())
        deltacodec.apply(model, f)
        for k, v in ref.items():
            got = dict(model.named_parameters())[k].detach().double()
            # one rounding of the fp32 sum: within half a spacing of the dtype (normal or
            # subnormal) of the exact value, plus the fp32 error above; rounding ΔW to the dtype
            # first and then the sum again would add up to half a spacing at |ΔW| more.
            top = torch.maximum(v.abs(), got.abs()).clamp_min(torch.finfo(dtype).tiny)
            spacing = torch.finfo(dtype).eps * torch.exp2(torch.floor(torch.log2(top)))
            assert ((got - v).abs() <= 0.5 * spacing + err[k]).all(), k


def test_peft_wrapped_and_bare_models_take_the_same_names(tmp_path):
    src, _ = trained_lora(tmp_path)
    sld = deltacodec.encode(str(src), bits=8, out=str(tmp_path / "a.sld"))
    bare = tiny_llama()
    deltacodec.apply(bare, sld)
    wrapped = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=TARGETS))
    h = deltacodec.apply(wrapped, sld)
    assert len(h.patched) == 10
    for name, mod in wrapped.named_modules():
        if hasattr(mod, "base_layer") and name.endswith("q_proj"):
            short = name[len("base_model.model."):] + ".weight"
            assert torch.equal(mod.base_layer.weight, dict(bare.named_parameters())[short])


def test_strict_mode_lists_every_problem_and_changes_nothing(tmp_path):
    src, _ = trained_lora(tmp_path)
    sld = deltacodec.encode(str(src), bits=8, out=str(tmp_path / "a.sld"))
    small = tiny_llama(layers=1)  # layer 1's modules are missing
    with torch.no_grad():
        small.model.layers[0].mlp.up_proj.weight = torch.nn.Parameter(torch.zeros(10, 64))  # mismatched
    before = snapshot(small)
    with pytest.raises(ApplyError) as exc:
        deltacodec.apply(small, sld)
    msg = str(exc.value)
    assert "5 missing" in msg and "1 mismatched" in msg and "layers.1.self_attn.q_proj" in msg
    assert "[10, 64]" in msg and "no weight was changed" in msg
    assert all(torch.equal(v, before[k]) for k, v in small.state_dict().items())


def test_non_strict_patches_what_matches(tmp_path):
    src, _ = trained_lora(tmp_path)
    sld = deltacodec.encode(str(src), bits=8, out=str(tmp_path / "a.sld"))
    small = tiny_llama(layers=1)
    missing, unexpected = deltacodec.apply(small, sld, strict=False)
    assert len(missing) == 5 and all("layers.1." in m for m in missing) and unexpected == []
    h = deltacodec.apply(tiny_llama(layers=1), sld, strict=False)
    assert len(h.patched) == 5


def test_failure_midway_rolls_back_every_patched_module(tmp_path, monkeypatch):
    d, _ = sine_adapter_dir(tmp_path)
    sld = deltacodec.encode(str(d), bits=3, out=str(tmp_path / "s.sld"))
    model = tiny_llama()
    before = snapshot(model)
    from deltacodec import kernels

    real = kernels.delta_add
    calls = {"n": 0}

    def flaky(W, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            W.add_(1.0)  # half-done damage that the rollback must undo too
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return real(W, *a, **kw)

    monkeypatch.setattr(kernels, "delta_add", flaky)
    with pytest.raises(ApplyError, match="rolled back 2 patched tensor"):
        deltacodec.apply(model, sld)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_keep_original_false_cannot_be_removed(tmp_path):
    d, _ = sine_adapter_dir(tmp_path)
    sld = deltacodec.encode(str(d), bits=3, out=str(tmp_path / "s.sld"))
    h = deltacodec.apply(tiny_llama(), sld, keep_original=False)
    with pytest.raises(ApplyError, match="keep_original=False"):
        h.remove()


def test_modules_to_save_replace_the_model_tensor(tmp_path):
    model = tiny_llama()
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                   modules_to_save=["lm_head"], init_lora_weights=False))
    with torch.no_grad():
        pm.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    pm.save_pretrained(str(tmp_path / "a"))
    sld = deltacodec.encode(str(tmp_path / "a"), bits=16, out=str(tmp_path / "a.sld"))
    merged = pm.merge_and_unload().eval()
    fresh = tiny_llama()
    before = snapshot(fresh)
    h = deltacodec.apply(fresh, sld)
    assert "base_model.model.lm_head.weight" in h.patched
    # lm_head is stored losslessly (float32), so it is copied exactly
    assert torch.equal(fresh.lm_head.weight, merged.lm_head.weight)
    x = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        # q_proj's factors went through float16 (bits=16): ~1e-3 relative on ΔW, far below 1e-4
        # of the logits' scale after the residual stream dilutes it.
        got, want = fresh(x).logits, merged(x).logits
    assert (got - want).abs().max() < 1e-4 * want.abs().max()
    h.remove()
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())


def test_dora_magnitudes_are_refused_in_strict_mode_and_reported_otherwise(tmp_path):
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    pm.save_pretrained(str(tmp_path / "d"))
    sld = deltacodec.encode(str(tmp_path / "d"), bits=8, out=str(tmp_path / "d.sld"))
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ApplyError, match="DoRA magnitude vector") as exc:
        deltacodec.apply(model, sld)
    assert "no weight was changed" in str(exc.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    missing, unexpected = deltacodec.apply(model, sld, strict=False)
    assert missing == [] and len(unexpected) == 2 and all(u.endswith("lora_magnitude_vector") for u in unexpected)
