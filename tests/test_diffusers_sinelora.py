"""Sine-LoRA for diffusers training, the papers' text-to-image setting in miniature: a tiny
SD3Transformer2DModel wrapped with the sine layer (ω = 200, γ = 2√n, rank 4), trained a few
steps, saved the way diffusers' train_dreambooth_lora_sd3.py saves, encoded with no flags (ω and
γ come from the file's LoRA metadata) and applied to a fresh pipeline."""

from __future__ import annotations

import math
import os

import pytest

pytestmark = pytest.mark.slow
torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
sl = pytest.importorskip("deltacodec.sinelora")

import deltacodec  # noqa: E402

import diffusers_tiny as dt  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
U16, U32 = 2.0**-11, 2.0**-24


def inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g), encoder_hidden_states=torch.randn(2, 6, 24, generator=g),
                pooled_projections=torch.randn(2, 24, generator=g), timestep=torch.tensor([10.0, 500.0]))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("sine")
    pipe = dt.sd3_pipeline(seed=0)
    tr = pipe.transformer
    tr.requires_grad_(False)  # as the DreamBooth script: only the LoRA factors train
    cfg = sl.sinelora_config(200.0, "2*sqrt-in", r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights="gaussian")
    sl.add_sinelora_adapter(tr, cfg)
    layers = sl.sinelora_layers(tr)
    assert layers and all(layer.is_sine("default") for layer in layers.values())
    tr.train()
    params = [p for p in tr.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    for step in range(4):
        x = inputs(step)
        loss = torch.nn.functional.mse_loss(tr(**x).sample, torch.zeros_like(x["hidden_states"]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    tr.eval()
    # saved as train_dreambooth_lora_sd3.py saves: PEFT state dict + the config as LoRA metadata
    from diffusers import StableDiffusion3Pipeline
    from diffusers.training_utils import _collate_lora_metadata
    from peft.utils import get_peft_model_state_dict

    StableDiffusion3Pipeline.save_lora_weights(str(root / "out"), transformer_lora_layers=get_peft_model_state_dict(tr),
                                               **_collate_lora_metadata({"transformer": tr}))
    return root, pipe, os.path.join(str(root / "out"), "pytorch_lora_weights.safetensors")


def test_the_sine_layer_trains_inside_a_diffusers_model(trained):
    root, pipe, wf = trained
    for layer in sl.sinelora_layers(pipe.transformer).values():
        assert float(layer.lora_B["default"].weight.detach().abs().max()) > 0  # B left zero init: it trained
        assert layer.sinelora_gamma["default"] == 2 * math.sqrt(layer.in_features)


@pytest.mark.parametrize("bits", [3, 16])
def test_saved_sine_lora_encodes_with_no_flags_and_applies(trained, bits):
    root, pipe, wf = trained
    sld = deltacodec.encode(wf, bits=bits, out=str(root / f"sine{bits}.sld"))  # no --omega, no --gamma
    f = deltacodec.load(sld)
    assert f.metadata["method"] == "sine" and f.metadata["layout"] == "diffusers"
    assert all(m.sine and m.omega == 200.0 and m.gamma == 2 * math.sqrt(m.in_features) and m.scale == 1.0 for m in f.modules)
    fresh = dt.sd3_pipeline(seed=0)  # the same base weights
    W0 = {n: p.detach().clone() for n, p in fresh.transformer.named_parameters()}
    h = deltacodec.apply(fresh, sld)
    assert len(h.patched) == len(f.modules) == len(sl.sinelora_layers(pipe.transformer))
    got = dict(fresh.transformer.named_parameters())
    layers = sl.sinelora_layers(pipe.transformer)
    for m in f.modules:
        short = m.name[len("transformer."):]
        # the reference, plainly in float64: W + scale·sin(ω·Q(B)Q(A))/γ from the file's factors
        Aq, Bq = (torch.from_numpy(x).double() for x in f.dequantize(m.name))
        ref = W0[short + ".weight"].double() + m.scale * torch.sin(m.omega * (Bq @ Aq)) / m.gamma
        # apply forms B@A in float32 (r terms: r·u32 relative to |B|@|A|, times ω through the
        # sine's slope ≤ 1), then rounds W + ΔW once
        bound = m.scale / m.gamma * m.omega * (m.rank + 1) * U32 * (Bq.abs() @ Aq.abs()) + U32 * ref.abs() + 1e-30
        assert ((got[short + ".weight"].double() - ref).abs() <= bound).all(), m.name
        # against the trained layer's own merged ΔW (float32 factors): the file's factors are the
        # trained ones rounded to float16 (16 bits) or quantized (3 bits); sin is 1-Lipschitz, so
        # |ΔW_file − ΔW_trained| ≤ scale/γ·ω·|Q(B)Q(A) − BA| elementwise
        layer = layers[short]
        A = layer.lora_A["default"].weight.detach().double()
        B = layer.lora_B["default"].weight.detach().double()
        trained_delta = m.scale * torch.sin(m.omega * (B @ A)) / m.gamma
        gap = m.scale / m.gamma * m.omega * (Bq @ Aq - B @ A).abs()
        assert ((ref - W0[short + ".weight"].double() - trained_delta).abs() <= gap + 1e-12).all()
        if bits == 16:  # float16 rounding: |Q(x) − x| ≤ 2^-11 |x| per factor
            assert (gap <= m.scale / m.gamma * m.omega * (2 * U16 + U16**2) * (B.abs() @ A.abs()) + 1e-12).all()
    if bits == 16:
        with torch.no_grad():
            y_trained = pipe.transformer(**inputs(99)).sample
            y_applied = fresh.transformer(**inputs(99)).sample
        # weights within the float16-rounding bound above (ΔW moves by < 1e-3 of its size); the
        # output of this 2-layer transformer moves by less than 1e-3 of its scale
        assert float((y_applied - y_trained).abs().max()) <= 1e-3 * float(y_trained.abs().max())
    h.remove()
    assert all(torch.equal(W0[n], p) for n, p in fresh.transformer.named_parameters())
