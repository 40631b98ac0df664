"""apply on version-2 files (ECSQ / auto quantizers, rANS-coded indices): both backends (Triton
under the interpreter), with and without copies, against ΔW formed plainly in float64 from the
reader's dequantized factors (SldFile.dequantize, an independent decode path: the reader's
values, not the kernels')."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import deltacodec
from deltacodec import kernels
from deltacodec.adapter import Adapter, AdapterModule

SHAPES = [("base_model.model.a.q", 24, 40, 4), ("base_model.model.a.v", 40, 24, 4)]


def small_adapter(sine: bool) -> Adapter:
    rng = np.random.default_rng(1)
    mods = []
    for name, o, i, r in SHAPES:
        A = (rng.uniform(-1, 1, (r, i)) / np.sqrt(i)).astype(np.float32)
        B = (rng.standard_t(4, (o, r)) * (3e-2 if sine else 1e-1)).astype(np.float32)
        mods.append(AdapterModule(name=name, A=A, B=B, scale=2.0, sine=sine,
                                  omega=100.0 if sine else None, gamma=float(np.sqrt(i)) if sine else None))
    return Adapter(modules=mods, config={"peft_type": "SINLORA" if sine else "LORA", "r": 4, "lora_alpha": 8})


def model_for(dtype: torch.dtype) -> torch.nn.Module:
    root = torch.nn.Module()
    root.add_module("a", torch.nn.Module())
    for name, o, i, _ in SHAPES:
        root.a.add_module(name.rsplit(".", 1)[1], torch.nn.Linear(i, o, bias=False))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in root.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return root.to(dtype)


@pytest.mark.parametrize("keep_original", [False, True], ids=["no-copy", "keep"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("quantizer, sine", [("ecsq", False), ("ecsq", True), ("auto", True)])
def test_a_v2_file_applies_its_decoded_delta(tmp_path, quantizer, sine, backend, keep_original):
    if backend == "triton" and not kernels.triton_available():
        pytest.skip("triton is not installed")
    p = deltacodec.encode(small_adapter(sine), bits=3, quantizer=quantizer, out=str(tmp_path / "a.sld"))
    f = deltacodec.load(p)
    assert f.version == 2
    model = model_for(torch.float32)
    before = {k: v.detach().double().clone() for k, v in model.state_dict().items()}
    deltacodec.apply(model, f, backend=backend, keep_original=keep_original)
    for m in f.modules:
        A, B = (x.astype(np.float64) for x in f.dequantize(m.name))
        x = B @ A
        d = m.scale * (np.sin(m.omega * x) / m.gamma if m.sine else x)
        key = m.name[len("base_model.model."):] + ".weight"
        got = model.state_dict()[key].double().numpy() - before[key].numpy()
        # fp32 arithmetic (rank 4, |W| ~ 0.02, |ΔW| <~ 0.1; sine: omega amplifies the rounding
        # of x, |x| <~ 0.1, by 100): every error term is below 1e-6 absolute
        np.testing.assert_allclose(got, d, rtol=0, atol=1e-6)
        assert np.abs(d).max() > 1e-3  # the delta is not trivially small


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_lossless_bf16_adapter_applies_its_exact_factors(tmp_path, backend):
    """--bits 16 in a version-2 container keeps bf16 factors bit-exact (raw BF16 entries); apply
    takes them as bf16 pass-through factors, widened exactly to fp32."""
    if backend == "triton" and not kernels.triton_available():
        pytest.skip("triton is not installed")
    from safetensors.torch import save_file

    src = tmp_path / "bf16"
    src.mkdir()
    g = torch.Generator().manual_seed(2)
    state = {}
    for name, o, i, r in SHAPES:
        state[f"{name}.lora_A.weight"] = (torch.randn(r, i, generator=g) / i**0.5).to(torch.bfloat16)
        state[f"{name}.lora_B.weight"] = (torch.randn(o, r, generator=g) * 0.1).to(torch.bfloat16)
    save_file(state, str(src / "adapter_model.safetensors"))
    (src / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 8}')
    f = deltacodec.load(deltacodec.encode(str(src), bits=16, container=2, out=str(tmp_path / "a.sld")))
    assert {e.dtype for e in f.entries()} == {"BF16"}
    model = model_for(torch.float32)
    before = {k: v.detach().double().clone() for k, v in model.state_dict().items()}
    deltacodec.apply(model, f, backend=backend, keep_original=False)
    for m in f.modules:
        A = state[f"{m.name}.lora_A.weight"].double().numpy()  # the source's own values
        B = state[f"{m.name}.lora_B.weight"].double().numpy()
        d = m.scale * (B @ A)
        key = m.name[len("base_model.model."):] + ".weight"
        got = model.state_dict()[key].double().numpy() - before[key].numpy()
        np.testing.assert_allclose(got, d, rtol=0, atol=1e-6)  # fp32 rounding only (rank 4, |ΔW| < 1)
        assert np.abs(d).max() > 1e-3


def test_a_raw_float64_factor_is_refused_naming_it(tmp_path):
    """Only codebook and fp16/bf16/fp32 pass-through factors reach the kernels: rounding another
    writer's float64 factor to float32 would silently change it. (A raw F32 factor, as a
    bits=32 file holds, applies exactly: tests/test_lossless_fp32.py.)"""
    from sldtools import assemble, lora_module, raw_tensor

    m = lora_module("lin", out_f=4, in_f=6, rank=2)
    ta, sa = raw_tensor(np.ones((2, 6), dtype=np.float64) / 3, "F64")
    tb, sb = raw_tensor(np.ones((4, 2), dtype=np.float32), "F16")
    m["A"], m["B"] = ta, tb
    (tmp_path / "f64.sld").write_bytes(assemble([m], [], [sa, sb]))
    lin = torch.nn.Sequential()
    lin.add_module("lin", torch.nn.Linear(6, 4, bias=False))
    w0 = lin.lin.weight.detach().clone()
    with pytest.raises(deltacodec.ApplyError, match=r"f64\.sld: tensor 'lin\.lora_A\.weight' is raw F64; apply supports codebook, F16, BF16 and F32"):
        deltacodec.apply(lin, str(tmp_path / "f64.sld"))
    assert torch.equal(lin.lin.weight.detach(), w0)
