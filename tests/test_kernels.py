"""Tests of deltacodec.kernels: dequantization, the torch backend, the fused Triton kernel (under
Triton's CPU interpreter), ahead-of-time GPU compilation, and backend selection.

Everything is checked against references written here from the format's definition: a numpy
bit packer that sets one bit at a time, and the delta computed in float64.  Comparisons use a
per-element error bound derived from the data (see `error_bound`), not a fixed tolerance.
"""

import os

# The Triton kernel is tested on CPU tensors through Triton's interpreter, which must be switched
# on before the kernel is defined (the kernel is defined lazily, on first use).  Child processes
# that exercise the real compiler (AOT compile, GPU test) set DELTACODEC_TEST_NATIVE_TRITON=1.
if os.environ.get("DELTACODEC_TEST_NATIVE_TRITON") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import json  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from deltacodec import kernels as kernels_module  # noqa: E402
from deltacodec.errors import ApplyError, SldFormatError  # noqa: E402
from deltacodec.kernels import (  # noqa: E402
    FACTOR_WIDTHS,
    RANK_BLOCKS,
    W_DTYPES,
    PackedFactor,
    delta_add,
    delta_add_torch,
    delta_add_triton,
    delta_coefficient,
    dequantize_torch,
    finite_by_bound,
    launch_specialisations,
    rank_block,
    select_backend,
    triton_available,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


# ----------------------------------------------------------------------------------------------
# Reference bit packing, written from the format's definition one bit at a time
# ----------------------------------------------------------------------------------------------


def pack_reference(indices, width: int) -> np.ndarray:
    """Element i occupies stream bits [i*width, (i+1)*width), least significant bit first;
    stream bit j lives in byte j // 8 at bit position j % 8."""
    indices = [int(v) for v in np.asarray(indices).reshape(-1)]
    out = np.zeros((len(indices) * width + 7) // 8, dtype=np.uint8)
    for i, value in enumerate(indices):
        assert 0 <= value < (1 << width)
        for t in range(width):
            j = i * width + t
            if (value >> t) & 1:
                out[j // 8] |= np.uint8(1 << (j % 8))
    return out


def unpack_reference(stream: np.ndarray, numel: int, width: int) -> np.ndarray:
    """Inverse of pack_reference, also one bit at a time."""
    values = np.zeros(numel, dtype=np.int64)
    for i in range(numel):
        for t in range(width):
            j = i * width + t
            values[i] |= ((int(stream[j // 8]) >> (j % 8)) & 1) << t
    return values


def make_factor(rng: np.random.Generator, shape, bits: int, width: int, spread: float):
    """A random PackedFactor and its exact values as float64 (codebook[index], or the fp16s)."""
    rows, cols = shape
    if bits == 16:
        values = (rng.standard_normal(shape) * spread).astype(np.float16)
        factor = PackedFactor(torch.from_numpy(values.copy()), None, 16, 16, (rows, cols))
        return factor, values.astype(np.float64)
    codebook = np.sort(rng.standard_normal(1 << bits) * spread).astype(np.float32)
    indices = rng.integers(0, 1 << bits, size=rows * cols)
    stream = pack_reference(indices, width)
    factor = PackedFactor(torch.from_numpy(stream), torch.from_numpy(codebook), bits, width, (rows, cols))
    return factor, codebook[indices].astype(np.float64).reshape(shape)


# ----------------------------------------------------------------------------------------------
# Float64 reference delta and the per-element error bound
# ----------------------------------------------------------------------------------------------

U32 = 2.0**-24  # unit roundoff of fp32 (half an ulp of 1)
U64 = 2.0**-53
# sin implementations in play, max error in ulps of the fp32 result: CUDA sinf / libdevice
# __nv_sinf (what tl.sin lowers to): 2 (CUDA Math API table); torch CPU (SLEEF u10): 1;
# numpy float32 (the interpreter's tl.sin): measured <= 1.5 on this machine.  |sin| <= 1, so
# 2 ulps are at most 2 * 2**-24 in absolute terms.
SIN_ULPS = 2
# (mantissa bits, smallest normal exponent) of W's dtype, for the ulp of the final rounding.
DTYPE_FORMAT = {torch.float32: (23, -126), torch.float16: (10, -14), torch.bfloat16: (7, -126)}


def ulp(dtype: torch.dtype, magnitude: np.ndarray) -> np.ndarray:
    """Spacing of `dtype` values at |x| = magnitude (subnormal spacing below the normal range)."""
    mantissa, emin = DTYPE_FORMAT[dtype]
    exponent = np.floor(np.log2(np.maximum(magnitude, 2.0**emin)))
    return 2.0 ** (exponent - mantissa)


def reference_delta(a: np.ndarray, b: np.ndarray, *, scale, omega, gamma, sine):
    """Exact (float64) delta of the documented arithmetic, with the fp32 constants it uses.
    Returns (D, X, S, c, omega32): D = c*sin(omega32*X) or c*X with X = b @ a, and
    S = |b| @ |a|, which bounds the rounding error of any fp32 evaluation of X."""
    c = float(np.float32(scale / gamma)) if sine else float(np.float32(scale))
    assert c == delta_coefficient(scale=scale, gamma=gamma, sine=sine)
    omega32 = float(np.float32(omega))
    X = b @ a
    S = np.abs(b) @ np.abs(a)
    D = c * np.sin(omega32 * X) if sine else c * X
    return D, X, S, c, omega32


def error_bound(*, W0, D, X, S, c, omega32, rank, sine, dtype):
    """Per-element bound on |result - exact| for ONE backend that follows the documented fp32
    sequence (two backends are then within twice this of each other).

    * x = b @ a in fp32, any summation order (BLAS blocking, tl.dot tiles, the rank loop):
      |x - X| <= g * S with g = gamma_r = r*u/(1 - r*u)  (Higham, Thm 3.5).  The float64
      reference X has the same kind of error with u = 2**-53; it is added to g.
    * sine: y = fl(omega*x): |y - omega*X| <= omega*g*S + u*omega*(|X| + g*S); or, folded into
      the factor, y = fl(fl(omega*b) @ a): |y - omega*X| <= omega*g*S*(1 + u) + u*omega*S.  The
      bound takes the sum of both forms' terms.  sin is
      1-Lipschitz, so sin(omega*x) amplifies an absolute error in x by up to omega; plus
      SIN_ULPS*u for the sin implementation; times |c|, plus u*|c| for rounding c*s (|s| <= 1).
    * plain: d = fl(c*x): |d - D| <= |c|*g*S + u*|c|*(|X| + g*S).
    * t = fl(w + d): adds u*|t| with |t| <= T = (|W0 + D| + err_d)*(1 + u); for fp16/bf16 the
      single rounding of t to W's dtype adds half an ulp of that dtype at T.
    * A last term covers the float64 reference's own roundings (omega*X, sin, c*sin, W0 + D).
    """
    g = rank * U32 / (1 - rank * U32) + rank * U64 / (1 - rank * U64)
    absX = np.abs(X)
    if sine:
        err_y = omega32 * g * S + U32 * omega32 * (absX + g * S) + U32 * omega32 * S * (1 + g)
        err_d = abs(c) * (err_y + SIN_ULPS * U32) + U32 * abs(c)
    else:
        err_d = abs(c) * g * S + U32 * abs(c) * (absX + g * S)
    T = (np.abs(W0 + D) + err_d) * (1 + U32)
    bound = err_d + U32 * T
    if dtype != torch.float32:
        bound = bound + 0.5 * ulp(dtype, T)
    return bound + 8 * U64 * (abs(c) * (omega32 * absX + 1) + T)


def as_f64(W: torch.Tensor) -> np.ndarray:
    return W.detach().to(device="cpu", dtype=torch.float64).numpy()


# ----------------------------------------------------------------------------------------------
# Test problems
# ----------------------------------------------------------------------------------------------


def make_problem(seed, *, out_f, in_f, rank, a_spec, b_spec, dtype, fan_in_fan_out, sine, omega):
    """Factors scaled so the delta matters: the argument omega*(B@A) spans a few radians (sine)
    or B@A is O(1) (plain), c is O(1), and W is O(1), so the delta moves W by many ulps."""
    rng = np.random.default_rng(seed)
    typical = 3.0 / omega if sine else 1.0  # target size of one element of B@A
    spread = math.sqrt(typical / math.sqrt(rank))  # per-factor std: sqrt(r) * s^2 = typical
    A, a = make_factor(rng, (rank, in_f), *a_spec, spread=spread)
    B, b = make_factor(rng, (out_f, rank), *b_spec, spread=spread)
    scale, gamma = float(rng.uniform(0.5, 2.0)), float(rng.uniform(0.7, 1.5))
    shape = (in_f, out_f) if fan_in_fan_out else (out_f, in_f)
    W = torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).to(dtype)
    params = dict(scale=scale, omega=float(omega), gamma=gamma, sine=sine)
    return W, A, B, a, b, params


def expected_and_bound(W0: torch.Tensor, a, b, *, params, rank, fan_in_fan_out, dtype):
    D, X, S, c, omega32 = reference_delta(a, b, **params)
    if fan_in_fan_out:
        D, X, S = D.T, X.T, S.T
    w0 = as_f64(W0)
    E = error_bound(W0=w0, D=D, X=X, S=S, c=c, omega32=omega32, rank=rank, sine=params["sine"], dtype=dtype)
    return w0 + D, E, D


def assert_within(actual: np.ndarray, expected: np.ndarray, bound: np.ndarray, what: str):
    err = np.abs(actual - expected)
    bad = ~(err <= bound)
    if bad.any():
        i = np.unravel_index(np.argmax(np.where(bad, err / bound, -1)), err.shape)
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{err.size} elements outside the bound; worst at {i}: "
            f"got {actual[i]!r}, expected {expected[i]!r}, |err| {err[i]:.3g} > bound {bound[i]:.3g}"
        )


# ----------------------------------------------------------------------------------------------
# The reference packer itself, then dequantize_torch
# ----------------------------------------------------------------------------------------------


def test_reference_packer_matches_hand_computed_streams():
    # width 3, values 1..7,0: sum(v_i << 3i) = 0x1F58D1, stored little-endian.
    assert pack_reference([1, 2, 3, 4, 5, 6, 7, 0], 3).tolist() == [0xD1, 0x58, 0x1F]
    # width 1: bits 1,0,1,1,0,0,0,0 | 1 -> 0b00001101, then 0b1 in a second, partial byte.
    assert pack_reference([1, 0, 1, 1, 0, 0, 0, 0, 1], 1).tolist() == [0x0D, 0x01]
    # width 5, value 31 then 1: bits 0-4 set, then bit 5 -> 0b00111111.
    assert pack_reference([31, 1], 5).tolist() == [0x3F, 0x00]
    rng = np.random.default_rng(1)
    for width in range(1, 9):
        values = rng.integers(0, 1 << width, size=29)
        assert unpack_reference(pack_reference(values, width), 29, width).tolist() == values.tolist()


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 13), (37, 11)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("width", range(1, 9))
def test_dequantize_torch_matches_reference_for_every_width(width, shape):
    # numel 1, 21, 65, 407: none is a multiple of 8, so the last byte is always partial.
    rng = np.random.default_rng(width * 100 + shape[0])
    for bits in sorted({1, max(1, width - 1), width}):
        factor, expected = make_factor(rng, shape, bits, width, spread=1.0)
        indices = unpack_reference(factor.data.numpy(), shape[0] * shape[1], width)
        assert np.array_equal(factor.codebook.numpy()[indices].reshape(shape), expected)
        got = dequantize_torch(factor)
        assert got.dtype == torch.float32 and tuple(got.shape) == shape
        assert np.array_equal(got.numpy().astype(np.float64), expected), (bits, width)


def test_dequantize_torch_passes_fp16_factors_through():
    factor, expected = make_factor(np.random.default_rng(2), (5, 9), 16, 16, spread=1.0)
    got = dequantize_torch(factor)
    assert got.dtype == torch.float32 and np.array_equal(got.numpy().astype(np.float64), expected)


def test_dequantize_torch_rejects_malformed_factors():
    rng = np.random.default_rng(3)
    good, _ = make_factor(rng, (3, 5), 3, 3, spread=1.0)
    with pytest.raises(SldFormatError, match="bytes"):
        dequantize_torch(PackedFactor(good.data[:-1], good.codebook, 3, 3, (3, 5)))
    with pytest.raises(SldFormatError, match="codebook"):
        dequantize_torch(PackedFactor(good.data, good.codebook[:4], 3, 3, (3, 5)))
    with pytest.raises(SldFormatError, match="width"):
        dequantize_torch(PackedFactor(good.data, good.codebook, 3, 2, (3, 5)))
    with pytest.raises(SldFormatError, match="bits"):
        dequantize_torch(PackedFactor(good.data, good.codebook, 9, 9, (3, 5)))
    # width 4 holds indices up to 15 but a 3-bit codebook has 8 entries.
    stream = torch.from_numpy(pack_reference([0, 15, 2], 4))
    with pytest.raises(SldFormatError, match="2\\*\\*bits"):
        dequantize_torch(PackedFactor(stream, good.codebook, 3, 4, (1, 3)))


# ----------------------------------------------------------------------------------------------
# Torch backend against the float64 reference
# ----------------------------------------------------------------------------------------------

TORCH_CASES = [
    # out, in, rank, A (bits, width), B (bits, width), dtype, fan_in_fan_out, sine, omega
    (1, 1, 1, (1, 1), (2, 2), torch.float32, False, True, 1.0),
    (7, 13, 3, (3, 3), (5, 6), torch.float16, True, True, 1000.0),
    (300, 257, 16, (4, 4), (16, 16), torch.bfloat16, False, True, 30.0),
    (300, 257, 64, (8, 8), (7, 7), torch.float32, True, False, 1.0),
    (96, 130, 100, (6, 8), (2, 2), torch.bfloat16, True, True, 300.0),
    (64, 48, 8, (16, 16), (3, 4), torch.float16, False, False, 1.0),
]


def _case_id(case):
    out_f, in_f, rank, a_spec, b_spec, dtype, fifo, sine, omega = case
    kind = f"sine-w{omega:g}" if sine else "plain"
    return (
        f"{out_f}x{in_f}-r{rank}-A{a_spec[0]}in{a_spec[1]}-B{b_spec[0]}in{b_spec[1]}-"
        f"{str(dtype).removeprefix('torch.')}-{'fifo-' if fifo else ''}{kind}"
    )


@pytest.mark.parametrize("case", TORCH_CASES, ids=_case_id)
@pytest.mark.parametrize(
    "chunk_elements, proven",
    [(None, False), (3000, False), (None, True), (3000, True)],
    ids=["default-chunks", "small-chunks", "proven", "proven-small-chunks"],
)
def test_delta_add_torch_matches_float64_reference(case, chunk_elements, proven):
    out_f, in_f, rank, a_spec, b_spec, dtype, fifo, sine, omega = case
    W, A, B, a, b, params = make_problem(
        11, out_f=out_f, in_f=in_f, rank=rank, a_spec=a_spec, b_spec=b_spec,
        dtype=dtype, fan_in_fan_out=fifo, sine=sine, omega=omega,
    )
    expected, E, D = expected_and_bound(W, a, b, params=params, rank=rank, fan_in_fan_out=fifo, dtype=dtype)
    W0 = W.clone()
    if proven:  # ordinary weights: the bound proves every sum finite, so the fast path is taken
        pp = {k: v for k, v in params.items() if k != "omega"}
        assert finite_by_bound(W, A, B, fan_in_fan_out=fifo, **pp)
    delta_add_torch(W, A, B, fan_in_fan_out=fifo, chunk_elements=chunk_elements, proven=proven, **params)
    assert W.dtype == dtype and W.shape == W0.shape
    assert_within(as_f64(W), expected, E, "torch backend vs float64")
    # The bound is tight enough to catch a wrong element, and the delta actually moved W.
    assert np.median(E) < 0.02 * np.median(np.abs(D))
    assert (W != W0).float().mean().item() > 0.5


def test_delta_add_torch_patches_non_contiguous_weights():
    W, A, B, a, b, params = make_problem(
        5, out_f=40, in_f=24, rank=4, a_spec=(3, 3), b_spec=(3, 3),
        dtype=torch.float32, fan_in_fan_out=False, sine=True, omega=50.0,
    )
    storage = W.t().contiguous()
    view = storage.t()  # same values as W, column-major
    expected, E, _ = expected_and_bound(W, a, b, params=params, rank=4, fan_in_fan_out=False, dtype=torch.float32)
    delta_add_torch(view, A, B, fan_in_fan_out=False, **params)
    assert_within(as_f64(storage.t()), expected, E, "non-contiguous W")


def test_delta_add_rejects_mismatched_operands():
    W, A, B, _, _, params = make_problem(
        6, out_f=8, in_f=6, rank=2, a_spec=(2, 2), b_spec=(2, 2),
        dtype=torch.float32, fan_in_fan_out=False, sine=True, omega=10.0,
    )
    with pytest.raises(ApplyError, match="expected"):
        delta_add_torch(W.t().contiguous(), A, B, fan_in_fan_out=False, **params)
    with pytest.raises(ApplyError, match="rank"):
        delta_add_torch(W, A, PackedFactor(B.data[:2], B.codebook, 2, 2, (8, 1)), fan_in_fan_out=False, **params)
    with pytest.raises(ApplyError, match="float32/float16/bfloat16"):
        delta_add_torch(W.double(), A, B, fan_in_fan_out=False, **params)
    with pytest.raises(ApplyError, match="gamma"):
        delta_add_torch(W, A, B, fan_in_fan_out=False, **{**params, "gamma": 0.0})


ROUNDING_CASES = {
    # W dtype: (delta added to W = 1.0, the correctly rounded result).  Spacing above 1.0 is
    # 2**-7 for bf16 and 2**-10 for fp16; ties go to the even neighbour.
    torch.bfloat16: [
        (2.0**-8, 1.0),  # tie between 1 and 1 + 2**-7: even is 1
        (3 * 2.0**-8, 1.0 + 2.0**-6),  # tie between 1 + 2**-7 and 1 + 2**-6: even is the latter
        (2.0**-8 + 2.0**-12, 1.0 + 2.0**-7),  # just above the tie: up
        (2.0**-8 - 2.0**-12, 1.0),  # just below: down
        (-(2.0**-9), 1.0),  # below 1 the spacing is 2**-8: a tie between 1 - 2**-8 and 1
    ],
    torch.float16: [
        (2.0**-11, 1.0),
        (3 * 2.0**-11, 1.0 + 2.0**-9),
        (2.0**-11 + 2.0**-14, 1.0 + 2.0**-10),
        (-(2.0**-12), 1.0),
    ],
}


@pytest.mark.parametrize("dtype", list(ROUNDING_CASES), ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sum_is_rounded_once_to_nearest_even_in_w_dtype(backend, dtype):
    if backend == "triton" and not triton_available():
        pytest.skip("triton is not installed")
    deltas, expected = zip(*ROUNDING_CASES[dtype])
    n = len(deltas)
    # Plain LoRA, c = scale = 1, rank 1: A = [[1, 1]], B = deltas as a column, so the delta is
    # exactly B @ A (all values are exact in fp16 and in fp32).
    A = PackedFactor(torch.ones(1, 2, dtype=torch.float16), None, 16, 16, (1, 2))
    B = PackedFactor(torch.tensor(deltas, dtype=torch.float16).reshape(n, 1), None, 16, 16, (n, 1))
    W = torch.ones(n, 2, dtype=dtype)
    apply = delta_add_triton if backend == "triton" else delta_add_torch
    apply(W, A, B, scale=1.0, omega=1.0, gamma=1.0, sine=False, fan_in_fan_out=False)
    assert W[:, 0].tolist() == list(expected) and W[:, 1].tolist() == list(expected)


# W + delta at the edge of each dtype's range.  Plain LoRA, rank 1, A = [[1, 1]], so row i of
# W receives c * B[i] exactly (c = float32(scale), B in fp16); every sum below is exact in fp32.
FP32_MAX = float(torch.finfo(torch.float32).max)  # (2 - 2**-23) * 2**127, ulp 2**104
BF16_MAX = float(torch.finfo(torch.bfloat16).max)  # (2 - 2**-7) * 2**127, ulp 2**120
OVERFLOW_EDGES = {
    # dtype: (W value, scale, B value that stays finite, B value that overflows, rounded finite result)
    # fp16: 65504 + 15.984375 rounds down to 65504; 65504 + 16 = 65520 is halfway to 65536 and
    # rounds (to even) up to inf.
    torch.float16: (65504.0, 1.0, 15.984375, 16.0, 65504.0),
    # bf16: the largest value plus just under half an ulp rounds down; plus half an ulp (2**119)
    # ties to even, upwards: inf, though the fp32 sum is finite.
    torch.bfloat16: (BF16_MAX, 2.0**119, 1 - 2.0**-11, 1.0, BF16_MAX),
    # fp32: the largest value plus a quarter ulp stays; plus half an ulp ties to even: inf.
    torch.float32: (FP32_MAX, 2.0**102, 1.0, 2.0, FP32_MAX),
}


def _column(values, dtype=torch.float16) -> PackedFactor:
    v = torch.tensor(values, dtype=dtype).reshape(-1, 1)
    return PackedFactor(v, None, 16, 16, (len(values), 1))


ONES_1x2 = PackedFactor(torch.ones(1, 2, dtype=torch.float16), None, 16, 16, (1, 2))


@pytest.mark.parametrize("dtype", list(OVERFLOW_EDGES), ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_sum_that_rounds_to_inf_in_w_dtype_is_refused_at_the_exact_threshold(backend, dtype):
    if backend == "triton" and not triton_available():
        pytest.skip("triton is not installed")
    w0, scale, fits, overflows, rounded = OVERFLOW_EDGES[dtype]
    params = dict(scale=scale, omega=1.0, gamma=1.0, sine=False, fan_in_fan_out=False, backend=backend)
    W = torch.full((1, 2), w0, dtype=dtype)
    assert delta_add(W, ONES_1x2, _column([fits]), name="m", **params) == backend
    assert W.tolist() == [[rounded, rounded]]
    W = torch.full((1, 2), w0, dtype=dtype)
    with pytest.raises(ApplyError) as exc:
        delta_add(W, ONES_1x2, _column([overflows]), name="module 'm'", **params)
    dt = str(dtype).removeprefix("torch.")
    largest = w0 + scale * overflows if dtype != torch.float32 else math.inf
    assert str(exc.value) == (
        f"module 'm': W + ΔW is not finite in {dt}: the largest |W + ΔW| is {largest:.6g}, "
        f"{dt} holds at most {torch.finfo(dtype).max:.6g}"
    )


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_nan_in_the_sum_is_refused(backend):
    if backend == "triton" and not triton_available():
        pytest.skip("triton is not installed")
    W = torch.tensor([[1.0, float("nan")]], dtype=torch.bfloat16)  # W itself already holds a NaN
    with pytest.raises(ApplyError, match="not finite in bfloat16: W \\+ ΔW has NaN elements"):
        delta_add(W, ONES_1x2, _column([1.0]), scale=1.0, omega=1.0, gamma=1.0, sine=False,
                  fan_in_fan_out=False, backend=backend)


def test_torch_backend_writes_no_overflowing_chunk_and_reports_the_largest_sum():
    # One row per chunk. Rows 2 and 4 overflow float16 (70000, 90000): rows 0-1 were patched
    # before the first overflow was seen, the rest is untouched, and the message gives the
    # largest sum over the whole weight (row 4), not the first one found.
    W = torch.full((6, 2), 3e4, dtype=torch.float16)
    B = _column([16.0, 32.0, 4e4, 16.0, 6e4, 16.0])  # float16 spacing at 3e4 is 16
    with pytest.raises(ApplyError, match="the largest \\|W \\+ ΔW\\| is 90000, float16 holds at most 65504"):
        delta_add_torch(W, ONES_1x2, B, scale=1.0, omega=1.0, gamma=1.0, sine=False, fan_in_fan_out=False,
                        chunk_elements=2)
    assert W[:, 0].tolist() == [30016.0, 30032.0, 3e4, 3e4, 3e4, 3e4]
    assert torch.isfinite(W).all()


# Values beyond the torch backend's cheap finiteness proof (2% below the dtype's largest) but
# far enough from it that W + ΔW (|ΔW| ~ 1) stays finite: exact in each dtype.
NEAR_TOP = {torch.float16: 65024.0, torch.bfloat16: 3.35e38, torch.float32: 3.35e38}


@pytest.mark.parametrize("sine", [True, False], ids=["sine", "plain"])
@pytest.mark.parametrize("dtype", W_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_torch_backend_chunks_near_the_top_of_the_range_are_checked_exactly_and_patched_alike(
    dtype, sine, monkeypatch
):
    W, A, B, a, b, params = make_problem(
        31, out_f=40, in_f=24, rank=4, a_spec=(3, 3), b_spec=(4, 4),
        dtype=dtype, fan_in_fan_out=False, sine=sine, omega=50.0,
    )
    W[5, 3], W[33, 0] = NEAR_TOP[dtype], -NEAR_TOP[dtype]  # chunks 0 and 3 of 4 (10 rows each)
    expected, E, _ = expected_and_bound(W, a, b, params=params, rank=4, fan_in_fan_out=False, dtype=dtype)
    calls = []
    real = kernels_module._largest_magnitude
    monkeypatch.setattr(kernels_module, "_largest_magnitude", lambda x: calls.append(x.shape) or real(x))
    delta_add_torch(W, A, B, fan_in_fan_out=False, chunk_elements=240, **params)
    # One reduction per chunk over W's rows; a second, over the sums, in the two exact chunks.
    assert len(calls) == 4 + 2
    assert_within(as_f64(W), expected, E, "exact and proven chunks vs float64")


@pytest.mark.parametrize("dtype", W_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_finite_by_bound_proves_ordinary_weights_and_nothing_near_the_top_of_the_range(dtype):
    plain = dict(scale=1.0, gamma=1.0, sine=False, fan_in_fan_out=False)
    top = float(torch.finfo(dtype).max)
    # |ΔW| <= |c| * max_i sum_k |B_ik| * max |A| = 3; the proof keeps 2% of the range as its
    # margin: W at 90% of the largest value is proven, at 99% it is not (though W + ΔW is finite).
    B = _column([3.0, -1.0])
    for w, proven in [(1.0, True), (0.9 * top, True), (0.99 * top, False), (-0.99 * top, False),
                      (math.inf, False), (math.nan, False)]:
        W = torch.tensor([[1.0, 1.0], [1.0, w]]).to(dtype)
        assert finite_by_bound(W, ONES_1x2, B, **plain) is proven, w
    # Sine: |ΔW| <= |c| = |scale / gamma| whatever the factors; a huge c proves nothing.
    sine = dict(plain, sine=True)
    W = torch.ones(2, 2, dtype=dtype)
    assert finite_by_bound(W, ONES_1x2, _column([6e4, 6e4]), **sine)
    assert not finite_by_bound(W, ONES_1x2, B, **{**sine, "scale": 0.99 * top})
    # A non-finite bound (a codebook entry of inf, element 0 of A) proves nothing.
    cb = torch.tensor([math.inf, 1.0])
    A_inf = PackedFactor(torch.tensor([2], dtype=torch.uint8), cb, 1, 1, (1, 2))  # indices 0, 1
    assert not finite_by_bound(W, A_inf, B, **plain)


@pytest.mark.parametrize("dtype", W_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("proven", [True, False], ids=["proven", "checked"])
def test_power_of_two_scales_take_addmm_and_other_scales_a_buffer_both_within_the_bound(dtype, proven, monkeypatch):
    # addmm_(alpha=c) is the documented d = fl(c*x), W + d only when c*x is exact; rank 1 makes
    # the bound tight (S = |X|), so a rounded c*b folded into the product would show.
    calls = []
    real = torch.Tensor.addmm_
    monkeypatch.setattr(torch.Tensor, "addmm_", lambda self, *a, **k: calls.append(k.get("alpha")) or real(self, *a, **k))
    for scale, fused in [(1.0, True), (2.0, True), (0.5, True), (-4.0, True), (0.7, False), (1.5, False)]:
        for rank in (1, 16):
            W, A, B, a, b, params = make_problem(
                7, out_f=64, in_f=80, rank=rank, a_spec=(8, 8), b_spec=(16, 16),
                dtype=dtype, fan_in_fan_out=False, sine=False, omega=1.0,
            )
            params["scale"] = scale
            expected, E, _ = expected_and_bound(W, a, b, params=params, rank=rank, fan_in_fan_out=False, dtype=dtype)
            calls.clear()
            delta_add_torch(W, A, B, fan_in_fan_out=False, chunk_elements=1000, proven=proven, **params)
            assert_within(as_f64(W), expected, E, f"scale {scale}, rank {rank}")
            assert bool(calls) == fused and all(c == scale for c in calls), (scale, calls)


@pytest.mark.parametrize("shape", [(64, 64, 1), (300, 257, 16), (257, 300, 64), (1024, 96, 8)],
                         ids=lambda s: f"{s[0]}x{s[1]}-r{s[2]}")
def test_the_blas_forms_the_rank_sum_before_it_updates_w(shape):
    """What the one-addmm_ path relies on: for a power-of-two c, W.addmm_(b, a, alpha=c) equals
    x = b @ a, then W + c·x, bit for bit (the sum over the rank is formed before W is updated,
    and c·x is exact). If a BLAS ever breaks this, this test says so."""
    out_f, in_f, rank = shape
    g = torch.Generator().manual_seed(rank)
    for c in (1.0, 2.0, 0.25):
        W = torch.randn(out_f, in_f, generator=g)
        b, a = torch.randn(out_f, rank, generator=g), torch.randn(rank, in_f, generator=g)
        fused = W.clone().addmm_(b, a, alpha=c)
        stepwise = W.clone().add_(torch.matmul(b, a) * c)
        assert torch.equal(fused, stepwise), c
        assert torch.equal(W.t().clone().addmm_(a.t(), b.t(), alpha=c), stepwise.t()), c  # fan_in_fan_out


@pytest.mark.parametrize("out_f, in_f, rank", [(8, 200, 2), (200, 8, 2), (100, 100, 100)])
def test_small_sides_and_large_ranks_take_the_buffered_sum(out_f, in_f, rank, monkeypatch):
    calls = []
    real = torch.Tensor.addmm_
    monkeypatch.setattr(torch.Tensor, "addmm_", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    W, A, B, a, b, params = make_problem(
        3, out_f=out_f, in_f=in_f, rank=rank, a_spec=(8, 8), b_spec=(16, 16),
        dtype=torch.float32, fan_in_fan_out=False, sine=False, omega=1.0,
    )
    params["scale"] = 2.0
    expected, E, _ = expected_and_bound(W, a, b, params=params, rank=rank, fan_in_fan_out=False, dtype=torch.float32)
    delta_add_torch(W, A, B, fan_in_fan_out=False, proven=True, **params)
    assert calls == []
    assert_within(as_f64(W), expected, E, "buffered sum")


def test_proven_fast_path_takes_no_reduction_over_w(monkeypatch):
    calls = []
    real = kernels_module._largest_magnitude
    monkeypatch.setattr(kernels_module, "_largest_magnitude", lambda x: calls.append(x.shape) or real(x))
    for dtype, sine in [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False)]:
        W, A, B, a, b, params = make_problem(
            5, out_f=40, in_f=24, rank=4, a_spec=(3, 3), b_spec=(4, 4),
            dtype=dtype, fan_in_fan_out=True, sine=sine, omega=50.0,
        )
        expected, E, _ = expected_and_bound(W, a, b, params=params, rank=4, fan_in_fan_out=True, dtype=dtype)
        delta_add_torch(W, A, B, fan_in_fan_out=True, chunk_elements=240, proven=True, **params)
        assert_within(as_f64(W), expected, E, f"proven {dtype} sine={sine}")
    assert calls == []


def bf16_factor(rng: np.random.Generator, shape, spread: float):
    """A bfloat16 pass-through PackedFactor and its exact values as float64."""
    values = torch.from_numpy((rng.standard_normal(shape) * spread).astype(np.float32)).to(torch.bfloat16)
    return PackedFactor(values, None, 16, 16, tuple(shape)), values.to(torch.float64).numpy()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", W_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_bf16_pass_through_factors_match_the_float64_reference(backend, dtype):
    if backend == "triton" and not triton_available():
        pytest.skip("triton is not installed")
    rng = np.random.default_rng(41)
    out_f, in_f, rank = 37, 70, 5
    for sine, omega, fifo in [(True, 300.0, False), (False, 1.0, True)]:
        typical = 3.0 / omega if sine else 1.0
        spread = math.sqrt(typical / math.sqrt(rank))
        A, a = bf16_factor(rng, (rank, in_f), spread)
        B, b = make_factor(rng, (out_f, rank), 3, 3, spread=spread) if sine else bf16_factor(rng, (out_f, rank), spread)
        assert np.array_equal(dequantize_torch(A).numpy().astype(np.float64), a)  # exact widening
        params = dict(scale=1.25, omega=omega, gamma=0.8, sine=sine)
        shape = (in_f, out_f) if fifo else (out_f, in_f)
        W = torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).to(dtype)
        expected, E, _ = expected_and_bound(W, a, b, params=params, rank=rank, fan_in_fan_out=fifo, dtype=dtype)
        W0 = W.clone()
        delta_add(W, A, B, fan_in_fan_out=fifo, backend=backend, **params)
        assert_within(as_f64(W), expected, E, f"{backend} bf16 pass-through, sine={sine}")
        assert (W != W0).float().mean().item() > 0.5


@needs_triton
def test_triton_kernel_reports_the_largest_sum_over_every_tile():
    # 16x16 tiles over a 40x40 W: the overflowing rows lie in different tiles, the largest in
    # the last (partial) tile row.
    n = 40
    deltas = [1.0] * n
    deltas[3], deltas[37] = 4e4, 6e4
    A = PackedFactor(torch.ones(1, n, dtype=torch.float16), None, 16, 16, (1, n))
    W = torch.full((n, n), 3e4, dtype=torch.float16)
    with pytest.raises(ApplyError, match="the largest \\|W \\+ ΔW\\| is 90000"):
        delta_add_triton(W, A, _column(deltas), scale=1.0, omega=1.0, gamma=1.0, sine=False,
                         fan_in_fan_out=False, block_m=16, block_n=16)


def test_delta_coefficient_is_the_fp32_rounded_float64_quotient():
    assert delta_coefficient(scale=1.0, gamma=3.0, sine=True) == float(np.float32(1.0 / 3.0))
    assert delta_coefficient(scale=0.1, gamma=7.0, sine=False) == float(np.float32(0.1))


# ----------------------------------------------------------------------------------------------
# Triton kernel (interpreter) against the torch backend
# ----------------------------------------------------------------------------------------------

# The interpreter costs ~0.3 ms per 64x64 tile, so the matrix below is almost exhaustive and
# still runs in ~30 s:
# * every combination of shape (1x1, 7x13, 300x257) x rank (1, 3, 16, 64) x W dtype x
#   fan_in_fan_out x sine/plain (144 runs), with the factors' (bits, width) and omega
#   (1, 30, 1000) rotating so that every bits value (1-8, 16, and 3 stored in 4-bit fields etc.)
#   appears many times on A and on B;
# * three 1024x1024 modules (one per W dtype, both layouts, sine and plain);
# * rank 100 (the kernel loops over the rank in steps of 32, as for 64), 257x300, non-default tiles
#   so that small shapes span several tiles with masked edges;
# * every (A width, B width) pair, 81 runs, in test_delta_add_triton_decodes_every_width_pair.
# Left out of the product: the 1024x1024 shape with every other axis (~2 s a run) -- it differs
# from 300x257 only in the number of tiles.
FACTOR_SPECS = [(1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (6, 6), (7, 7), (8, 8), (16, 16),
                (1, 2), (2, 3), (3, 4), (5, 8), (6, 7)]
OMEGAS = (1.0, 30.0, 1000.0)


def _triton_matrix() -> list[tuple]:
    cases = []
    combos = [
        (shape, rank, dtype, fifo, sine)
        for shape in [(1, 1), (7, 13), (300, 257)]
        for rank in (1, 3, 16, 64)
        for dtype in W_DTYPES
        for fifo in (False, True)
        for sine in (True, False)
    ]
    n = len(FACTOR_SPECS)
    for i, ((out_f, in_f), rank, dtype, fifo, sine) in enumerate(combos):
        a_spec = FACTOR_SPECS[i % n]
        b_spec = FACTOR_SPECS[(3 * i + i // n + 5) % n]
        omega = OMEGAS[(i // 2) % len(OMEGAS)] if sine else 1.0
        cases.append((out_f, in_f, rank, a_spec, b_spec, dtype, fifo, sine, omega, None))
    return cases + [
        # out, in, rank, A (bits, width), B (bits, width), dtype, fifo, sine, omega, (block_m, block_n)
        (1024, 1024, 16, (3, 3), (3, 3), torch.bfloat16, False, True, 300.0, None),
        (1024, 1024, 64, (4, 4), (16, 16), torch.float16, True, True, 1000.0, None),
        (1024, 1024, 3, (8, 8), (2, 2), torch.float32, False, False, 1.0, None),
        (257, 300, 16, (8, 8), (7, 7), torch.float32, False, True, 1.0, None),
        (96, 130, 100, (6, 8), (2, 2), torch.float16, True, True, 300.0, None),
        (130, 96, 100, (3, 3), (5, 5), torch.bfloat16, False, False, 1.0, None),
        (40, 50, 16, (5, 6), (3, 3), torch.float32, False, True, 100.0, (16, 32)),
        (50, 40, 3, (1, 2), (6, 7), torch.bfloat16, True, False, 1.0, (32, 16)),
        (33, 70, 64, (16, 16), (4, 4), torch.float16, True, True, 30.0, (16, 16)),
    ]


TRITON_CASES = _triton_matrix()


def _triton_case_id(case):
    *base, blocks = case
    return _case_id(tuple(base)) + (f"-blocks{blocks[0]}x{blocks[1]}" if blocks else "")


def check_triton_against_torch(case, seed=17):
    out_f, in_f, rank, a_spec, b_spec, dtype, fifo, sine, omega, blocks = case
    W, A, B, a, b, params = make_problem(
        seed, out_f=out_f, in_f=in_f, rank=rank, a_spec=a_spec, b_spec=b_spec,
        dtype=dtype, fan_in_fan_out=fifo, sine=sine, omega=omega,
    )
    expected, E, _ = expected_and_bound(W, a, b, params=params, rank=rank, fan_in_fan_out=fifo, dtype=dtype)
    W_torch, W_triton = W.clone(), W.clone()
    delta_add_torch(W_torch, A, B, fan_in_fan_out=fifo, **params)
    block_m, block_n = blocks or (None, None)
    delta_add_triton(W_triton, A, B, fan_in_fan_out=fifo, block_m=block_m, block_n=block_n, **params)
    assert W_triton.dtype == dtype
    # Each backend is within E of the exact value, hence within 2E of the other.
    assert_within(as_f64(W_triton), as_f64(W_torch), 2 * E, "triton vs torch backend")
    assert_within(as_f64(W_triton), expected, E, "triton vs float64")
    if out_f * in_f > 1:
        assert (W_triton != W).float().mean().item() > 0.5


@needs_triton
@pytest.mark.parametrize("case", TRITON_CASES, ids=_triton_case_id)
def test_delta_add_triton_interpreter_matches_torch_backend(case):
    check_triton_against_torch(case)


@needs_triton
@pytest.mark.parametrize("b_width", FACTOR_WIDTHS, ids=lambda w: f"B{w}")
@pytest.mark.parametrize("a_width", FACTOR_WIDTHS, ids=lambda w: f"A{w}")
def test_delta_add_triton_decodes_every_width_pair(a_width, b_width):
    fifo = (a_width + b_width) % 2 == 1
    check_triton_against_torch(
        (9, 11, 5, (a_width, a_width), (b_width, b_width), torch.float32, fifo, True, 30.0, None),
        seed=a_width * 100 + b_width,
    )


@needs_triton
def test_delta_add_triton_patches_non_contiguous_weights_in_place():
    W, A, B, a, b, params = make_problem(
        8, out_f=30, in_f=20, rank=5, a_spec=(4, 4), b_spec=(4, 4),
        dtype=torch.float16, fan_in_fan_out=True, sine=True, omega=20.0,
    )
    storage = W.t().contiguous()
    view = storage.t()
    expected, E, _ = expected_and_bound(W, a, b, params=params, rank=5, fan_in_fan_out=True, dtype=torch.float16)
    delta_add_triton(view, A, B, fan_in_fan_out=True, **params)
    assert_within(as_f64(storage.t()), expected, E, "non-contiguous W (triton)")


def test_rank_block_pads_to_a_power_of_two_of_at_least_16():
    assert [rank_block(r) for r in (1, 3, 16, 17, 32, 33, 64, 1000)] == [16, 16, 16, 32, 32, 32, 32, 32]
    assert set(RANK_BLOCKS) == {rank_block(r) for r in range(1, 200)}


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compilation for real GPUs (no GPU needed)
# ----------------------------------------------------------------------------------------------

# Which specialisations are compiled.  launch_specialisations() enumerates 9 A widths x 9 B widths
# x 3 W dtypes x 2 rank paddings x 2 (sine) x 2 (fan_in_fan_out) = 1944 variants per arch, ~1.5 s
# each on this 2-core box.  Compiled here, 54 in all: for each (W dtype, fan_in_fan_out) class,
# the 9 (A width, B width) pairs of WIDTH_PAIRS, alternating between sm_80 and sm_90 and cycling
# through (rank padding, sine) so that each arch gets every (W dtype, rank padding, sine,
# fan_in_fan_out) combination -- the constexprs that shape the tl.dot, the index layout and the
# epilogue -- and every width (1..8 and 16) is compiled on A and on B with every dtype and layout.
# Not compiled: the other width pairings with each of those combinations.  They are structurally
# identical: a width only selects the branch of _load_factor_tile (fp16 load / one-byte field /
# field straddling two bytes) and the constants of its shifts and masks; the A and B loads are
# independent of each other and of the dot, the epilogue and the store.  Also not enumerated:
# the JIT's value specialisations (an int argument equal to 1 becomes a constant), which only
# fold arithmetic.
WIDTH_PAIRS = [(1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (6, 7), (7, 8), (8, 16), (16, 1)]
AOT_ARCHS = (80, 90)


def aot_cases() -> list[dict]:
    rank_and_sine = [(block_r, sine) for block_r in RANK_BLOCKS for sine in (False, True)]
    cases = []
    for class_index, (w_dtype, fifo) in enumerate((d, f) for d in W_DTYPES for f in (False, True)):
        for k in range(len(WIDTH_PAIRS)):
            a_width, b_width = WIDTH_PAIRS[(k + class_index) % len(WIDTH_PAIRS)]
            block_r, sine = rank_and_sine[(k // 2 + class_index) % len(rank_and_sine)]
            cases.append(
                dict(arch=AOT_ARCHS[k % 2], a_width=a_width, b_width=b_width,
                     w_dtype=str(w_dtype).removeprefix("torch."), block_r=block_r, sine=sine,
                     fan_in_fan_out=fifo, aligned=k != 4)
            )
    # bf16 pass-through factors (a lossless bf16 adapter): the width-16 pointer as bf16
    return cases + [
        dict(arch=80, a_width=16, b_width=3, w_dtype="bfloat16", block_r=16, sine=True, fan_in_fan_out=False,
             aligned=True, a_pass_through="bf16"),
        dict(arch=90, a_width=16, b_width=16, w_dtype="float16", block_r=32, sine=False, fan_in_fan_out=True,
             aligned=True, a_pass_through="bf16", b_pass_through="bf16"),
        # fp32 pass-through factors (a bits=32 file's float32 factors)
        dict(arch=90, a_width=16, b_width=16, w_dtype="float32", block_r=16, sine=False, fan_in_fan_out=False,
             aligned=True, a_pass_through="fp32", b_pass_through="fp32"),
        dict(arch=80, a_width=3, b_width=16, w_dtype="bfloat16", block_r=32, sine=True, fan_in_fan_out=True,
             aligned=True, b_pass_through="fp32"),
    ]


_AOT_CHILD = r"""
import contextlib, io, json, re, sys, torch
from deltacodec.kernels import compile_for_gpu
for case in json.loads(open(sys.argv[1]).read()):
    spec = dict(case, w_dtype=getattr(torch, case["w_dtype"]))
    ptxas_log = io.StringIO()  # TRITON_DUMP_PTXAS_LOG=1: triton prints ptxas -v output
    with contextlib.redirect_stdout(ptxas_log):
        compiled = compile_for_gpu(spec.pop("arch"), **spec)
    log = ptxas_log.getvalue()
    print(json.dumps(dict(case=case, arch=compiled.metadata.arch, shared=compiled.metadata.shared,
                          cubin=len(compiled.asm["cubin"]), ptx_tf32=compiled.asm["ptx"].count("tf32"),
                          ptx_sin_approx=compiled.asm["ptx"].count("sin.approx"),
                          regs=[int(n) for n in re.findall(r"Used (\d+) registers", log)],
                          spills=[int(n) for n in re.findall(r"(\d+) bytes spill stores", log)])), flush=True)
"""


def _native_triton_env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DELTACODEC_BACKEND")}
    env.update(DELTACODEC_TEST_NATIVE_TRITON="1", TRITON_CACHE_DIR=str(tmp_path / "triton-cache"),
               TRITON_DEFAULT_FP_FUSION="0", TRITON_DUMP_PTXAS_LOG="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def test_launch_specialisations_enumerates_every_constexpr_combination():
    specs = list(launch_specialisations())
    assert len(specs) == len(FACTOR_WIDTHS) ** 2 * len(W_DTYPES) * len(RANK_BLOCKS) * 2 * 2
    cases = aot_cases()
    for arch in AOT_ARCHS:  # each arch: every (dtype, rank padding, sine, fan_in_fan_out)
        assert {(c["w_dtype"], c["block_r"], c["sine"], c["fan_in_fan_out"]) for c in cases if c["arch"] == arch} == {
            (str(s["w_dtype"]).removeprefix("torch."), s["block_r"], s["sine"], s["fan_in_fan_out"]) for s in specs
        }
    covered = {(c["a_width"], c["b_width"], c["w_dtype"], c["block_r"], c["sine"], c["fan_in_fan_out"])
               for c in cases}
    for width in FACTOR_WIDTHS:  # every width on each factor, in both layouts, with every dtype
        for fifo in (False, True):
            for dtype in ("float32", "float16", "bfloat16"):
                assert any(k[0] == width and k[5] == fifo and k[2] == dtype for k in covered)
                assert any(k[1] == width and k[5] == fifo and k[2] == dtype for k in covered)


@needs_triton
def test_kernel_compiles_ahead_of_time_for_sm80_and_sm90(tmp_path):
    compile_and_check(aot_cases(), tmp_path)


@pytest.mark.exhaustive
@needs_triton
def test_kernel_compiles_every_launch_specialisation_for_sm80_and_sm90(tmp_path):
    """All 2 x 1944 variants (40 min on 2 cores, measured): run with -m exhaustive."""
    cases = [dict(spec, arch=arch, w_dtype=str(spec["w_dtype"]).removeprefix("torch."))
             for arch in AOT_ARCHS for spec in launch_specialisations()]
    compile_and_check(cases, tmp_path)


def compile_and_check(cases: list[dict], tmp_path: Path) -> None:
    """Compile each case in child processes with the real compiler and check the cubins."""
    workers = max(1, min(4, os.cpu_count() or 1))
    env = _native_triton_env(tmp_path)
    procs = []
    for i in range(workers):
        batch = tmp_path / f"aot-cases-{i}.json"
        batch.write_text(json.dumps(cases[i::workers]))
        procs.append(subprocess.Popen([sys.executable, "-c", _AOT_CHILD, str(batch)], env=env, cwd=REPO_ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=len(cases) * 10 + 600)
        assert proc.returncode == 0, stderr[-4000:]
        results += [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(cases)
    for r in results:
        case = r["case"]
        assert r["arch"] == f"sm{case['arch']}", r
        assert r["cubin"] > 0, r
        # Fits the smallest per-block shared memory of sm_80+ parts (99 KiB on sm_86/sm_89).
        assert r["shared"] <= 99 * 1024, r
        # tl.dot stayed in true fp32 ("ieee"): no TF32 tensor-core instructions.
        assert r["ptx_tf32"] == 0, r
        # tl.sin stayed libdevice's __nv_sinf (2 ulps, full range reduction), which the interpreter
        # tests' error bound assumes; sin.approx.f32 loses accuracy quickly beyond |x| > pi.
        assert r["ptx_sin_approx"] == 0, r
        # No real register spilling.  ptxas spills a word or two in a few variants (8 and 16 bytes
        # in 2 of these 54 on sm_90, where it capped itself at 64/128 registers); with a rank
        # padding of 64 the spills were 190 to 5000+ bytes, which this bound catches.
        assert r["regs"] and max(r["spills"]) <= 64, r


# ----------------------------------------------------------------------------------------------
# On a real GPU
# ----------------------------------------------------------------------------------------------

GPU_CASES = [
    # out, in, rank, A, B, dtype, fifo, sine, omega
    (4096, 4096, 16, (3, 3), (3, 3), torch.bfloat16, False, True, 300.0),
    (1024, 4096, 8, (3, 3), (3, 3), torch.float16, True, True, 1000.0),
    (4096, 1024, 64, (4, 4), (5, 6), torch.float32, False, True, 30.0),
    (300, 257, 3, (16, 16), (1, 1), torch.bfloat16, True, False, 1.0),
    (1, 1, 1, (2, 2), (8, 8), torch.float16, False, True, 1.0),
    (513, 130, 100, (6, 8), (7, 7), torch.float32, True, True, 300.0),
]


def gpu_check_main() -> None:
    """Run in a child process without TRITON_INTERPRET: the compiled kernel vs the torch backend
    on CUDA tensors, both against the float64 reference."""
    for case in GPU_CASES:
        out_f, in_f, rank, a_spec, b_spec, dtype, fifo, sine, omega = case
        W, A, B, a, b, params = make_problem(
            23, out_f=out_f, in_f=in_f, rank=rank, a_spec=a_spec, b_spec=b_spec,
            dtype=dtype, fan_in_fan_out=fifo, sine=sine, omega=omega,
        )
        expected, E, _ = expected_and_bound(W, a, b, params=params, rank=rank, fan_in_fan_out=fifo, dtype=dtype)
        W_torch, W_triton = W.cuda(), W.cuda()
        delta_add_torch(W_torch, A, B, fan_in_fan_out=fifo, **params)
        assert select_backend(W_triton) == "triton"
        delta_add(W_triton, A, B, fan_in_fan_out=fifo, backend="triton", **params)
        torch.cuda.synchronize()
        assert_within(as_f64(W_torch), expected, E, f"{_case_id(case)}: torch (cuda) vs float64")
        assert_within(as_f64(W_triton), expected, E, f"{_case_id(case)}: triton vs float64")
        assert_within(as_f64(W_triton), as_f64(W_torch), 2 * E, f"{_case_id(case)}: triton vs torch")
        print("ok", _case_id(case), flush=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@needs_triton
def test_delta_add_triton_on_gpu_matches_torch_backend(tmp_path):
    code = f"import runpy; runpy.run_path({str(Path(__file__))!r})['gpu_check_main']()"
    proc = subprocess.run([sys.executable, "-c", code], env=_native_triton_env(tmp_path), cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("ok ") == len(GPU_CASES)


# ----------------------------------------------------------------------------------------------
# Backend selection and the optional dependency
# ----------------------------------------------------------------------------------------------


def test_select_backend_auto_picks_torch_for_cpu_weights(monkeypatch):
    monkeypatch.delenv("DELTACODEC_BACKEND", raising=False)
    assert select_backend(torch.zeros(2, 2)) == "torch"
    assert select_backend(torch.zeros(2, 2), "torch") == "torch"


def test_select_backend_honours_the_environment_variable(monkeypatch):
    monkeypatch.setenv("DELTACODEC_BACKEND", "torch")
    assert select_backend(torch.zeros(2, 2)) == "torch"
    monkeypatch.setenv("DELTACODEC_BACKEND", "fast")
    with pytest.raises(ApplyError, match="unknown backend"):
        select_backend(torch.zeros(2, 2))
    if triton_available():  # under the interpreter triton can patch CPU weights
        monkeypatch.setenv("DELTACODEC_BACKEND", "triton")
        assert select_backend(torch.zeros(2, 2)) == "triton"
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(ApplyError, match="CUDA"):
            select_backend(torch.zeros(2, 2))


def test_delta_add_dispatches_to_the_selected_backend(monkeypatch):
    monkeypatch.setenv("DELTACODEC_BACKEND", "torch")
    W, A, B, a, b, params = make_problem(
        9, out_f=12, in_f=10, rank=2, a_spec=(3, 3), b_spec=(3, 3),
        dtype=torch.float32, fan_in_fan_out=False, sine=True, omega=40.0,
    )
    expected, E, _ = expected_and_bound(W, a, b, params=params, rank=2, fan_in_fan_out=False, dtype=torch.float32)
    assert delta_add(W, A, B, fan_in_fan_out=False, **params) == "torch"
    assert_within(as_f64(W), expected, E, "delta_add")


def test_importing_kernels_does_not_import_triton():
    code = "import sys, deltacodec.kernels; assert 'triton' not in sys.modules, 'triton imported'"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_torch_backend_works_without_triton_installed():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch\n"
        "from deltacodec.kernels import triton_available, select_backend, delta_add_triton, PackedFactor\n"
        "from deltacodec.errors import ApplyError\n"
        "assert not triton_available()\n"
        "assert select_backend(torch.zeros(2, 2)) == 'torch'\n"
        "f = PackedFactor(torch.zeros(1, dtype=torch.uint8), torch.zeros(2), 1, 1, (1, 1))\n"
        "try:\n"
        "    delta_add_triton(torch.zeros(1, 1), f, f, scale=1.0, omega=1.0, gamma=1.0, sine=True, fan_in_fan_out=False)\n"
        "except ApplyError as e:\n"
        "    assert 'triton' in str(e)\n"
        "else:\n"
        "    raise AssertionError('expected ApplyError')\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
