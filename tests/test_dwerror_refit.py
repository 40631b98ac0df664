"""ΔW relative error (Gram form, exact and sampled sine) against dense products, and the least-
squares refit of B against a dense least-squares solve."""

from __future__ import annotations

import numpy as np
import pytest

from deltacodec.dwerror import lora_error_sq, lora_norm_sq, relative_error, sine_error_sq
from deltacodec.refit import refit_b


def factors(rng, out, inn, r, noise):
    A = rng.uniform(-1, 1, (r, inn)) / np.sqrt(inn)
    B = rng.standard_t(4, (out, r)) * 1e-2
    Ah = A + rng.normal(0, noise, A.shape) / np.sqrt(inn)
    Bh = B + rng.normal(0, noise, B.shape) * 1e-2
    return A, B, Ah, Bh


@pytest.mark.parametrize("shape", [(64, 32, 2), (300, 200, 16), (5, 700, 1)])
@pytest.mark.parametrize("noise", [1e-4, 0.1, 2.0])
def test_lora_error_equals_the_dense_product(shape, noise, rng):
    A, B, Ah, Bh = factors(rng, *shape, noise)
    dense = np.sum((Bh @ Ah - B @ A) ** 2)
    # float64 throughout; the Gram form has no cancellation between large terms, so agreement
    # is to rounding of the r×r products (relative 1e-10 is loose by orders of magnitude)
    assert lora_error_sq(A, B, Ah, Bh) == pytest.approx(dense, rel=1e-10)
    assert lora_norm_sq(A, B) == pytest.approx(np.sum((B @ A) ** 2), rel=1e-12)


@pytest.mark.parametrize("omega", [1.0, 100.0])
def test_sine_error_exact_path_equals_dense(omega, rng):
    A, B, Ah, Bh = factors(rng, 120, 90, 4, 0.05)
    num, den = sine_error_sq(A, B, Ah, Bh, omega)
    s, sh = np.sin(omega * (B @ A)), np.sin(omega * (Bh @ Ah))
    assert num == pytest.approx(np.sum((sh - s) ** 2), rel=1e-10)
    assert den == pytest.approx(np.sum(s * s), rel=1e-10)


def test_sampled_sine_error_is_within_two_percent_on_a_llama_sized_module(rng):
    # q_proj-like 2048×2048 rank 16 at ω = 200: 2^16 sampled entries; the ratio estimator's
    # relative standard error is about sqrt(kurtosis/2^16) < 1 % here; 2 % leaves margin.
    A, B, Ah, Bh = factors(rng, 2048, 2048, 16, 0.1)
    exact = relative_error(A, B, Ah, Bh, sine=True, omega=200.0, exact_limit=1 << 23)
    sampled = relative_error(A, B, Ah, Bh, sine=True, omega=200.0, exact_limit=0)
    assert sampled == pytest.approx(exact, rel=0.02)


def test_relative_error_edge_cases(rng):
    A = np.zeros((2, 5))
    B = np.zeros((3, 2))
    assert relative_error(A, B, A, B) == 0.0
    assert relative_error(A, B, A + 1, B + 1) == float("inf")
    with pytest.raises(ValueError):
        relative_error(A, B, A, B, sine=True)


def dense_refit(A, B, Ah):
    """argmin_X ||X Ah - B A||_F by a dense least-squares solve (minimum-norm)."""
    return np.linalg.lstsq(Ah.T, (B @ A).T, rcond=None)[0].T


@pytest.mark.parametrize("shape", [(50, 40, 4), (200, 64, 8), (30, 300, 16)])
def test_refit_matches_dense_least_squares(shape, rng):
    A, B, Ah, _ = factors(rng, *shape, 0.3)
    got = refit_b(A, B, Ah).astype(np.float64)
    ref = dense_refit(A, B, Ah)
    res_got = np.sum((got @ Ah - B @ A) ** 2)
    res_ref = np.sum((ref @ Ah - B @ A) ** 2)
    # float32 output: residual within 1e-5 relative of the optimum (rounding of B_fit)
    assert res_got <= res_ref * (1 + 1e-5) + 1e-12
    assert res_got <= np.sum((B @ Ah - B @ A) ** 2)  # never worse than keeping B


@pytest.mark.parametrize("defect", ["zero_row", "duplicate_rows", "all_zero"])
def test_refit_handles_rank_deficient_quantized_a(defect, rng):
    A, B, Ah, _ = factors(rng, 40, 60, 4, 0.3)
    if defect == "zero_row":
        Ah[2] = 0
    elif defect == "duplicate_rows":
        Ah[1] = Ah[0]
        Ah[3] = 2 * Ah[0]
    else:
        Ah[:] = 0
    got = refit_b(A, B, Ah).astype(np.float64)
    assert np.all(np.isfinite(got))
    res_got = np.sum((got @ Ah - B @ A) ** 2)
    res_ref = np.sum((dense_refit(A, B, Ah) @ Ah - B @ A) ** 2)
    assert res_got <= res_ref * (1 + 1e-5) + 1e-12
    if defect == "zero_row":
        assert np.all(got[:, 2] == 0)  # no weight where Â has nothing
