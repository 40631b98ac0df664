"""apply(keep_original=False) writes proven weights without copying them, and keeps its promises:
an overflow anywhere changes nothing, a Ctrl-C during the uncopied writes is held until the
adapter is applied whole, and the result equals keep_original=True's bit for bit."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import torch

import deltacodec
from deltacodec import ApplyError, kernels
from test_apply_safety import Tiny, assert_unchanged, factors, snapshot, write_sld


def two_module_file(tmp_path) -> str:
    return write_sld(tmp_path / "two.sld", [("lin", *factors(4, 6), 1.0), ("other", *factors(4, 6, seed=1), 0.5)])


@pytest.fixture
def clones(monkeypatch):
    """Every Tensor.clone() made while apply runs, by shape."""
    made: list[tuple] = []
    real = torch.Tensor.clone

    def counting(self, *args, **kwargs):
        made.append(tuple(self.shape))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "clone", counting)
    return made


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_keep_original_false_copies_no_proven_weight_and_matches_keep_original_true(tmp_path, clones, dtype):
    path = two_module_file(tmp_path)
    a, b = Tiny().to(dtype), Tiny().to(dtype)
    deltacodec.apply(a, path, keep_original=True)
    assert clones.count((4, 6)) == 2  # the handle's copies of lin and other
    clones.clear()
    h = deltacodec.apply(b, path, keep_original=False)
    assert (4, 6) not in clones and sorted(h.patched) == ["lin", "other"]  # no copy of a weight
    for name in ("lin", "other"):  # the same arithmetic on both paths: bit-identical weights
        assert torch.equal(getattr(a, name).weight, getattr(b, name).weight), name
    assert not torch.equal(a.lin.weight, Tiny().to(dtype).lin.weight)


def test_a_weight_the_proof_does_not_cover_is_copied_and_patched_first(tmp_path, clones, monkeypatch):
    path = two_module_file(tmp_path)
    model = Tiny(torch.float16)
    with torch.no_grad():
        model.other.weight[0, 0] = 65000.0  # within 2% of float16's top: not proven, still finite after
    order: list[tuple[str, bool]] = []
    real = kernels.delta_add

    def recording(W, A, B, **kw):
        order.append((kw["name"].split("'")[1], kw["proven"]))
        return real(W, A, B, **kw)

    monkeypatch.setattr(kernels, "delta_add", recording)
    before = snapshot(model)
    clones.clear()
    deltacodec.apply(model, path, keep_original=False)
    assert order == [("other", False), ("lin", True)]
    assert clones.count((4, 6)) == 1  # other's copy only, dropped once the whole patch succeeded
    assert not torch.equal(model.lin.weight, before["lin.weight"])


def test_an_overflow_in_an_unproven_weight_changes_nothing_without_copies_of_the_others(tmp_path, clones):
    path = write_sld(tmp_path / "o.sld", [("lin", *factors(4, 6), 1.0), ("other", (1, 6), (4, 1), 6e4)])
    model = Tiny(torch.float16)
    with torch.no_grad():
        model.other.weight.fill_(3e4)  # 3e4 + 6e4 overflows float16
    before = snapshot(model)
    clones.clear()
    with pytest.raises(ApplyError, match="module 'other'.*not finite in float16.*rolled back 0 patched"):
        deltacodec.apply(model, path, keep_original=False)
    assert_unchanged(model, before)
    assert clones.count((4, 6)) == 1  # other's; lin (proven) was never copied, nor written


def test_ctrl_c_during_the_uncopied_writes_is_raised_once_the_adapter_is_applied_whole(tmp_path, monkeypatch):
    path = two_module_file(tmp_path)
    model, ref = Tiny(), Tiny()
    deltacodec.apply(ref, path, keep_original=False)
    real = kernels.delta_add
    calls = []

    def interrupted(W, A, B, **kw):
        calls.append(kw["name"])
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the first weight is written
        return real(W, A, B, **kw)

    monkeypatch.setattr(kernels, "delta_add", interrupted)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        deltacodec.apply(model, path, keep_original=False)
    assert len(calls) == 2  # the second weight was still written
    for name in ("lin", "other"):
        assert torch.equal(getattr(model, name).weight, getattr(ref, name).weight), name
    assert signal.getsignal(signal.SIGINT) is before  # the handler is restored


def test_with_keep_original_true_a_ctrl_c_still_rolls_back(tmp_path, monkeypatch):
    path = two_module_file(tmp_path)
    model = Tiny()
    before = snapshot(model)
    real = kernels.delta_add
    calls = []

    def interrupted(W, A, B, **kw):
        calls.append(kw["name"])
        out = real(W, A, B, **kw)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(kernels, "delta_add", interrupted)
    with pytest.raises(KeyboardInterrupt):
        deltacodec.apply(model, path, keep_original=True)
    assert_unchanged(model, before)


def test_the_factor_streams_apply_reads_are_the_files_own(tmp_path):
    # packed_factor decodes each factor once and packs the indices again: the stream the
    # kernels get must be the stored one, byte for byte (dense 3-bit fields, straddling bytes).
    from sldtools import assemble, codebook_tensor, f16_codebook, lora_module

    from deltacodec.patch import packed_factor

    rng = np.random.default_rng(3)
    m = lora_module("lin", out_f=4, in_f=6, rank=3)
    ta, sa = codebook_tensor((3, 6), 3, 3, rng.integers(0, 8, 18), f16_codebook(list(np.linspace(-1, 1, 8))), 0.5)
    tb, sb = codebook_tensor((4, 3), 2, 4, rng.integers(0, 4, 12), f16_codebook([-1, -0.5, 0.5, 1]), 0.25)
    m["A"], m["B"] = ta, tb
    (tmp_path / "s.sld").write_bytes(assemble([m], [], [sa, sb]))
    f = deltacodec.load(tmp_path / "s.sld")
    for entry, stored in ((f.modules[0].A, sa), (f.modules[0].B, sb)):
        got = packed_factor(f, entry, "cpu")
        assert got.data.numpy().tobytes() == stored and got.width == entry.width
