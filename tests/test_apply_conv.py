"""deltacodec.apply on conv modules (kohya conv LoRA): ΔW = B@A (out × in·kh·kw) reshaped to the
kernel's shape (out, in, kh, kw), in place, through the same fast path as linear modules.

Container version 2 gives a conv module's entry a ``weight_shape``; the file here is a
hand-built version-1 one whose entries are given it, so the codebooks and indices are the test's
own (end to end through a real version-2 file: tests/test_diffusers_pipeline.py). The reference is written plainly: dequantize A and B from
the indices and codebooks the test chose, multiply in float64, reshape with numpy."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import deltacodec
from deltacodec import ApplyError, SldFile
from sldtools import assemble, codebook_tensor, f16_codebook, lora_module

OUT, IN, KH, KW, RANK = 6, 4, 3, 2, 2
CB_A = [-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0]  # 3-bit, scale 0.5
CB_B = [-1.0, -0.25, 0.25, 1.0]  # 2-bit, scale 0.125


def conv_file(tmp_path, kernel=(KH, KW), sine=False) -> tuple[SldFile, np.ndarray]:
    """A one-module file for a conv whose kernel is `kernel`, its entries carrying weight_shape;
    and the float64 ΔW the module must add, shaped like the kernel."""
    rng = np.random.default_rng(5)
    in_k = IN * int(np.prod(kernel))
    a_idx = rng.integers(0, 8, RANK * in_k)
    b_idx = rng.integers(0, 4, OUT * RANK)
    m = lora_module(name="conv", out_f=OUT, in_f=in_k, rank=RANK, kind="sine" if sine else "lora")
    ta, sa = codebook_tensor((RANK, in_k), 3, 3, a_idx, f16_codebook(CB_A), 0.5)
    tb, sb = codebook_tensor((OUT, RANK), 2, 2, b_idx, f16_codebook(CB_B), 0.125)
    m["A"], m["B"] = ta, tb
    path = tmp_path / "conv.sld"
    path.write_bytes(assemble([m], [], [sa, sb]))
    f = SldFile(path)
    shape = (OUT, IN, *kernel)
    f.modules = [e._replace(weight_shape=shape) for e in f.modules]
    f._by_module = {e.name: e for e in f.modules}
    a = (np.asarray(CB_A) * 0.5)[a_idx].reshape(RANK, in_k)
    b = (np.asarray(CB_B) * 0.125)[b_idx].reshape(OUT, RANK)
    x = b @ a
    d = m["scale"] * (np.sin(m["omega"] * x) / m["gamma"] if sine else x)
    return f, d.reshape(shape)


class ConvNet(torch.nn.Module):
    def __init__(self, kernel=(KH, KW), channels_last=False) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(IN, OUT, kernel)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=torch.Generator().manual_seed(0)))
        if channels_last:
            self.conv.to(memory_format=torch.channels_last)


@pytest.mark.parametrize("keep_original", [True, False], ids=["keep", "no-copy"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("sine", [False, True], ids=["lora", "sine"])
def test_a_conv_module_receives_its_delta_reshaped_to_the_kernel(tmp_path, keep_original, channels_last, sine):
    f, d = conv_file(tmp_path, sine=sine)
    net = ConvNet(channels_last=channels_last)
    w = net.conv.weight
    w0 = w.detach().clone()
    ptr = w.data_ptr()
    h = deltacodec.apply(net, f, keep_original=keep_original)
    assert h.patched == ["conv"] and w.data_ptr() == ptr  # in place, the module's own tensor
    assert w.is_contiguous(memory_format=torch.channels_last) == channels_last  # layout kept
    got = w.detach().double().numpy()
    # fp32 arithmetic against the float64 reference: the delta is a few fp32 roundings off,
    # the sum W + ΔW one more; 1e-6 of |W| + |ΔW| bounds both for these O(1) values (rank 2).
    want = w0.double().numpy() + d
    assert np.all(np.abs(got - want) <= 1e-6 * (np.abs(w0.double().numpy()) + np.abs(d) + 1))
    assert (np.abs(got - w0.double().numpy()) > 0).mean() > 0.5
    if keep_original:
        h.remove()
        assert torch.equal(w.detach(), w0)


@pytest.mark.parametrize("kernel", [(1, 1), (3, 3)])
def test_conv_kernels_of_other_shapes(tmp_path, kernel):
    f, d = conv_file(tmp_path, kernel=kernel)
    net = ConvNet(kernel=kernel)
    w0 = net.conv.weight.detach().clone()
    deltacodec.apply(net, f, keep_original=False)
    assert np.allclose(net.conv.weight.detach().double().numpy(), w0.double().numpy() + d, rtol=0, atol=1e-5)


def test_a_conv_of_another_shape_is_refused_naming_both_shapes(tmp_path):
    f, _ = conv_file(tmp_path)
    net = ConvNet(kernel=(3, 3))  # the file's kernel is 3x2
    w0 = net.conv.weight.detach().clone()
    with pytest.raises(ApplyError, match=r"conv.*\[6, 4, 3, 3\].*\[6, 4, 3, 2\]"):
        deltacodec.apply(net, f)
    assert torch.equal(net.conv.weight.detach(), w0)


@pytest.mark.parametrize("conv_cls,kernel", [(torch.nn.Conv2d, (3, 3)), (torch.nn.Conv1d, (3,))], ids=["conv2d", "conv1d"])
def test_a_peft_conv_lora_applies_as_peft_merges_it(tmp_path, conv_cls, kernel):
    # A real PEFT conv LoRA saved by PEFT, encoded losslessly, applied: the same weights as PEFT's
    # own merge_and_unload (independent reference), to float32 rounding of W + ΔW.
    peft = pytest.importorskip("peft")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv_cls(3, 5, kernel)
            self.lin = torch.nn.Linear(6, 4)

    torch.manual_seed(0)
    base = Net()
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["conv", "lin"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:  # non-zero B, and float16-exact factors so the 16-bit file is exact
                p.copy_(torch.randn_like(p).half().float())
    model.save_pretrained(str(tmp_path / "a"))
    sld = deltacodec.encode(str(tmp_path / "a"), bits=16, out=str(tmp_path / "a.sld"))
    assert deltacodec.load(sld).modules[0].weight_shape == (5, 3, *kernel)
    merged = model.merge_and_unload()
    target = Net()
    target.load_state_dict(base.state_dict())
    deltacodec.apply(target, sld, keep_original=False)
    for name, want in merged.state_dict().items():
        got = target.state_dict()[name]
        tol = 4 * torch.finfo(torch.float32).eps * (want.abs() + 1)
        assert ((got - want).abs() <= tol).all(), name
    assert not torch.equal(target.conv.weight, base.conv.weight)
