"""Rate control: every target kind lands where it should, the coded plan decodes to the values it
reports, reported errors equal dense recomputation, and the refit and `auto` do their jobs."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from deltacodec import ecsq, rans
from deltacodec.bitio import BitReader, BitWriter
from deltacodec.freqtable import FreqTable
from deltacodec.ratecontrol import Target, encode_modules, module_weights

pytestmark = pytest.mark.skipif(not rans.native_available(), reason="compiled coder unavailable")


def tiny_adapter(sine: bool, seed: int = 0, rank: int = 4):
    """A testbed-shaped adapter: hidden 64, MLP 256, two layers, trained-looking factors."""
    rng = np.random.default_rng(seed)
    mods = []
    for layer in range(2):
        for name, (o, i) in {"q": (64, 64), "v": (64, 64), "up": (256, 64), "down": (64, 256)}.items():
            A = rng.normal(0, 1 / np.sqrt(i), (rank, i)).astype(np.float32)
            B = (rng.standard_t(5, (o, rank)) * 0.05).astype(np.float32)
            mods.append(SimpleNamespace(name=f"layers.{layer}.{name}", A=A, B=B, sine=sine, omega=30.0 if sine else None))
    return mods


def dense_rel_error(m, a_hat, b_hat):
    p, ph = m.B.astype(np.float64) @ m.A, b_hat.astype(np.float64) @ a_hat
    if m.sine:
        p, ph = np.sin(m.omega * p), np.sin(m.omega * ph)
    return float(np.linalg.norm(ph - p) / np.linalg.norm(p))


def decode_plan(plan):
    """Parse every tensor's side information and decode the stream, as a container would."""
    bw = BitWriter()
    for t in plan.tensors:
        t.write_side_info(bw)
    br = BitReader(bw.getvalue())
    segs = []
    for t in plan.tensors:
        method = br.bits(1)
        table = FreqTable.read(br)
        if method == 0:
            step_bits, t1, t2 = ecsq.read_params(br)
            lut = ecsq.recon_values(table.imin, table.imax, step_bits, t1, t2)
        else:
            bits = br.bits(3) + 1
            scale = np.uint32(br.bits(32)).view(np.float32)
            cb = np.array([br.bits(16) for _ in range(1 << bits)], np.uint16)
            lut = (cb.view(np.float16).astype(np.float32) * scale)[table.imin: table.imax + 1]
        segs.append((t.indices.size, table, lut))
    return rans.decode_values(plan.stream, segs)


SLOW = pytest.mark.slow


@pytest.mark.parametrize("sine,size", [(False, 2500), (True, 1200), pytest.param(False, 1200, marks=SLOW),
                                       pytest.param(True, 2500, marks=SLOW), pytest.param(False, 6000, marks=SLOW),
                                       pytest.param(True, 6000, marks=SLOW)])
def test_size_target_lands_at_or_just_under(sine, size):
    plan = encode_modules(tiny_adapter(sine), Target("size", size), overhead_bytes=200)
    assert 0.95 * size <= plan.total_bytes <= size, plan.history


@pytest.mark.parametrize("bpp", [3.0, pytest.param(1.5, marks=SLOW), pytest.param(6.0, marks=SLOW)])
def test_bits_per_param_target(bpp):
    plan = encode_modules(tiny_adapter(False), Target("bits_per_param", bpp), overhead_bytes=100)
    got = 8 * plan.total_bytes / plan.params
    assert 0.95 * bpp <= got <= bpp, plan.history


@pytest.mark.parametrize("sine,eps", [(False, 0.05), (True, 0.3), pytest.param(False, 0.3, marks=SLOW),
                                      pytest.param(False, 0.01, marks=SLOW), pytest.param(True, 0.05, marks=SLOW),
                                      pytest.param(True, 0.01, marks=SLOW)])
def test_max_error_target_bounds_every_module(sine, eps):
    mods = tiny_adapter(sine)
    plan = encode_modules(mods, Target("max_error", eps))
    assert plan.max_error <= eps
    # and is not wasteful: some module is within a factor 2 of the bound
    assert plan.max_error >= 0.5 * eps


@pytest.mark.parametrize("sine", [False, True])
def test_plan_decodes_to_the_values_it_reports_and_errors_are_exact(sine):
    mods = tiny_adapter(sine, seed=3)
    plan = encode_modules(mods, Target("bits", 2.5), method="auto")
    vals = decode_plan(plan)
    assert np.array_equal(vals, np.concatenate([t.values for t in plan.tensors]))
    for mi, m in enumerate(mods):
        ta, tb = plan.tensors[2 * mi], plan.tensors[2 * mi + 1]
        got = dense_rel_error(m, ta.values.reshape(m.A.shape), tb.values.reshape(m.B.shape))
        assert plan.modules[mi].rel_error == pytest.approx(got, rel=1e-9)


@SLOW
def test_larger_budgets_give_smaller_errors():
    mods = tiny_adapter(False, seed=5)
    errs = [sum(r.rel_error ** 2 for r in encode_modules(mods, Target("size", s)).modules) for s in (1500, 3000, 6000)]
    assert errs[0] > errs[1] > errs[2]


def test_refit_lowers_the_error_at_the_same_multiplier():
    mods = tiny_adapter(False, seed=7)
    for lam in (1e-4, 1e-3):
        with_refit = encode_modules(mods, Target("lambda", lam), refit=True)
        without = encode_modules(mods, Target("lambda", lam), refit=False)
        e1 = sum(r.rel_error ** 2 for r in with_refit.modules)
        e0 = sum(r.rel_error ** 2 for r in without.modules)
        assert e1 < e0


def test_auto_takes_kmeans_where_ecsq_cannot_reach_one_bit():
    # flat-topped (uniform) A near 1 bit/param: two k-means levels beat any ECSQ point there
    rng = np.random.default_rng(2)
    mods = [SimpleNamespace(name=f"m{k}", A=rng.uniform(-1, 1, (8, 1024)).astype(np.float32) / 32,
                            B=(rng.standard_t(4, (256, 8)) * 1e-3).astype(np.float32), sine=False, omega=None)
            for k in range(4)]
    ec = encode_modules(mods, Target("bits", 1.0), method="ecsq")
    au = encode_modules(mods, Target("bits", 1.0), method="auto")
    assert any(t.method == "kmeans" for t in au.tensors)
    assert sum(r.rel_error ** 2 for r in au.modules) < sum(r.rel_error ** 2 for r in ec.modules)


def test_weights_scale_with_the_other_factor_and_the_product():
    rng = np.random.default_rng(0)
    A = rng.normal(size=(4, 50))
    B = rng.normal(size=(30, 4))
    wa, wb = module_weights(A, B, False, None)
    wa2, wb2 = module_weights(A, 3 * B, False, None)
    # doubling B: ‖B‖² ×9 but ‖BA‖² ×9 too, so w_A stays and w_B drops 9×
    assert wa2 == pytest.approx(wa) and wb2 == pytest.approx(wb / 9)


@pytest.mark.parametrize("kind,value", [("size", 0), ("bits", -1), ("max_error", float("nan")), ("speed", 1)])
def test_invalid_targets_are_refused(kind, value):
    with pytest.raises(ValueError):
        Target(kind, value)


def test_minimax_allocation_lowers_the_largest_module_error():
    mods = tiny_adapter(False, seed=9)
    s = encode_modules(mods, Target("size", 1500), allocation="sum")
    m = encode_modules(mods, Target("size", 1500), allocation="minimax")
    assert m.max_error < s.max_error
    assert abs(m.total_bytes - s.total_bytes) <= 0.05 * 1500
