"""Apply kernels: patch a base weight in place with a quantized (sine-)LoRA delta.

An adapter module ships two quantized factors, A (r x in) and B (out x r), each as a
:class:`PackedFactor` (a bit-packed index stream plus a codebook, or a plain fp16 tensor).
The receiver adds the module's delta to the base weight ``W`` in place.

The arithmetic, precisely (both backends implement this sequence; they may differ only in the
summation order of the rank-r matmul and in the last bit of ``sin``)::

    a, b   = dequantize(A), dequantize(B)            # exact fp32: codebook[index]
    x      = b @ a                                   # fp32, accumulated in fp32, any order
    omega' = float32(omega)
    sine:   c = float32(scale / gamma)               # quotient in float64, rounded once to fp32
            y = fp32(omega' * x)                     # or fp32(fp32(omega' * b) @ a): see below
            d = c * sin(y)                           # every product rounded to fp32
    plain:  c = float32(scale)
            d = c * x
    W     <- round_to(W.dtype, fp32(float32(W) + d)) # one fp32 sum, one rounding (RTNE)
             unless that rounding is not finite: then ApplyError (see OVERFLOW_AT)

``W`` is ``(out, in)``; with ``fan_in_fan_out=True`` it is stored transposed, ``(in, out)``,
and receives ``d.T``.  ``W`` may be float32, float16 or bfloat16.  ``c * s + w`` may be
evaluated with one fused multiply-add (the torch backend's ``add_(alpha=c)`` may fuse it).
The torch backend forms ``y`` as ``(omega' * b) @ a``: folding omega into the rank-r factor
saves a pass over every chunk of W, and costs one extra rounding per element of ``b``, which
moves ``y`` by at most ``u * omega * (|b| @ |a|)``, the size of the matmul's own rounding.
For plain LoRA with ``|c|`` a power of two (``scale`` 1, 2, 0.5, ...: alpha/r for the usual
choices) the torch backend forms ``W + c·x`` with one ``addmm_(b, a, alpha=c)``, into W itself
when W is float32: scaling by such a ``c`` is exact, so that equals the sequence above even where
BLAS folds ``c`` into ``b`` (MKL does), provided the BLAS forms the rank-r sum before it updates
W (MKL does for both sides >= 16; the backend asks for 64 and rank <= 64, and
tests/test_kernels.py checks the property bit for bit).  Other scales, and other shapes, form
``x`` in a buffer first.

Backends
--------
* :func:`delta_add_torch` -- reference backend: readable, runs on any device, and fast on CPU
  (row-chunked, in place, at most two pre-allocated fp32 chunk buffers; no full-size temporaries;
  plain LoRA with a power-of-two scale on a float32 W proven finite is one in-place addmm_).
* :func:`delta_add_triton` -- one fused Triton kernel that reads the packed streams and codebooks
  as stored, unpacks and dequantizes the factor tiles in registers, forms the rank-r product with
  ``tl.dot`` and patches the ``W`` tile in place.  Runs on CUDA, and on CPU tensors under
  ``TRITON_INTERPRET=1`` (that is how CI tests it).  Triton is an optional dependency: it is
  imported only when this backend is first used.
* :func:`select_backend` / :func:`delta_add` choose between them.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from deltacodec.errors import ApplyError, SldFormatError
from deltacodec.pack import unpack_indices

__all__ = [
    "PackedFactor",
    "dequantize_torch",
    "delta_coefficient",
    "delta_add_torch",
    "delta_add_triton",
    "delta_add",
    "finite_by_bound",
    "triton_available",
    "select_backend",
    "rank_block",
    "launch_specialisations",
    "compile_for_gpu",
    "W_DTYPES",
    "FACTOR_WIDTHS",
    "RANK_BLOCKS",
    "OVERFLOW_AT",
    "overflow_error",
]

#: Weight dtypes the apply path supports.
W_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
#: Kernel field widths: 1..8 are bit-packed index streams, 16 is a pass-through float factor
#: (fp16, bf16, or fp32 from a ``bits=32`` file: the same kernel, another pointer type).
FACTOR_WIDTHS: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8, 16)
#: Rank is padded to one of these (a power of two >= 16, the smallest K tl.dot accepts); ranks
#: above the largest are processed in several steps of that size.  No 64: with K = 64 the fp32
#: FMA dot needs 255 registers per thread and spills on sm_80 for every tile shape tried, while
#: two steps of 32 cost nothing measurable (64x64 tile, 8 warps: 80 registers on sm_80).
RANK_BLOCKS: tuple[int, ...] = (16, 32)

_PASS_THROUGH = (torch.float16, torch.bfloat16, torch.float32)  # a bits=16 (pass-through) factor's dtypes
_ENV_BACKEND = "DELTACODEC_BACKEND"
_BACKENDS = ("torch", "triton")


# --------------------------------------------------------------------------------------------
# Data layout
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)  # eq=False: field-wise == on tensors has no single truth value
class PackedFactor:
    """One quantized LoRA factor, in the file format's layout.

    ``data``: for ``bits`` 1..8, a 1-D uint8 bit stream.  Element ``i`` (row-major over
    ``shape``) occupies stream bits ``[i*width, (i+1)*width)``, LSB-first: stream bit ``j`` is
    ``(data[j >> 3] >> (j & 7)) & 1`` and the element's index is ``sum_t bit(i*width + t) << t``.
    Fields straddle bytes when ``width`` is 3, 5, 6 or 7.  ``len(data) == ceil(numel*width/8)``.
    For ``bits == 16``: a float16, bfloat16 or float32 tensor of shape ``shape`` (pass-through,
    no codebook; each widens exactly to fp32, and the Triton kernel loads any, as its pointer
    says).

    ``codebook``: float32, length ``2**bits`` (bits 1..8); ``None`` for 16.
    ``width``: field width, ``bits <= width <= 8`` (ignored for 16).
    ``shape``: logical ``(rows, cols)``; A is ``(r, in)``, B is ``(out, r)``.

    The dequantized value of element ``i`` is ``codebook[index_i]``, exactly (fp32).
    """

    data: torch.Tensor
    codebook: torch.Tensor | None
    bits: int
    width: int
    shape: tuple[int, int]

    @property
    def numel(self) -> int:
        return int(self.shape[0]) * int(self.shape[1])

    @property
    def kernel_width(self) -> int:
        """The field width the kernel specialises on: ``width``, or 16 for a fp16 factor."""
        return 16 if self.bits == 16 else int(self.width)


def _check_factor(f: PackedFactor, name: str) -> None:
    """Raise :class:`SldFormatError` unless ``f`` is a well-formed PackedFactor."""
    shape = tuple(f.shape)
    if len(shape) != 2 or any(int(n) < 1 for n in shape):
        raise SldFormatError(f"factor {name}: shape must be two positive sizes, got {shape}")
    numel = int(shape[0]) * int(shape[1])
    if f.bits == 16:
        if f.data.dtype not in _PASS_THROUGH or tuple(f.data.shape) != shape:
            raise SldFormatError(
                f"factor {name}: bits=16 expects a float16, bfloat16 or float32 tensor of shape {shape}, "
                f"got {f.data.dtype} {tuple(f.data.shape)}"
            )
        if f.codebook is not None:
            raise SldFormatError(f"factor {name}: bits=16 has no codebook")
        return
    if not (isinstance(f.bits, int) and 1 <= f.bits <= 8):
        raise SldFormatError(f"factor {name}: bits must be 1..8 or 16, got {f.bits!r}")
    if not (isinstance(f.width, int) and f.bits <= f.width <= 8):
        raise SldFormatError(f"factor {name}: width must be in {f.bits}..8, got {f.width!r}")
    expected_len = (numel * f.width + 7) // 8
    if f.data.dtype != torch.uint8 or f.data.dim() != 1 or f.data.numel() != expected_len:
        raise SldFormatError(
            f"factor {name}: expected a 1-D uint8 stream of {expected_len} bytes "
            f"({numel} fields of {f.width} bits), got {f.data.dtype} {tuple(f.data.shape)}"
        )
    cb = f.codebook
    if cb is None or cb.dtype != torch.float32 or cb.dim() != 1 or cb.numel() != 1 << f.bits:
        got = None if cb is None else (cb.dtype, tuple(cb.shape))
        raise SldFormatError(
            f"factor {name}: expected a float32 codebook of {1 << f.bits} entries, got {got}"
        )


def _where(name: str | None) -> str:
    """The prefix of an error message about the weight called ``name`` ("" when unnamed)."""
    return f"{name}: " if name else ""


def _check_operands(
    W: torch.Tensor, A: PackedFactor, B: PackedFactor, fan_in_fan_out: bool, name: str | None = None
) -> tuple[int, int, int]:
    """Validate W, A, B together; return (out_features, in_features, rank)."""
    _check_factor(A, "A")
    _check_factor(B, "B")
    rank, in_features = (int(n) for n in A.shape)
    out_features, rank_b = (int(n) for n in B.shape)
    where = _where(name)
    if rank_b != rank:
        raise ApplyError(f"{where}rank mismatch: A is {tuple(A.shape)} (r x in), B is {tuple(B.shape)} (out x r)")
    if not isinstance(W, torch.Tensor) or W.dtype not in W_DTYPES:
        got = W.dtype if isinstance(W, torch.Tensor) else type(W).__name__
        raise ApplyError(f"{where}W must be a float32/float16/bfloat16 tensor, got {got}")
    expected = (in_features, out_features) if fan_in_fan_out else (out_features, in_features)
    if tuple(W.shape) != expected:
        layout = "(in, out) since fan_in_fan_out=True" if fan_in_fan_out else "(out, in)"
        raise ApplyError(f"{where}W has shape {tuple(W.shape)}, expected {expected} = {layout}")
    return out_features, in_features, rank


# --------------------------------------------------------------------------------------------
# Overflow: W + delta must stay finite in W's dtype
# --------------------------------------------------------------------------------------------

#: The smallest fp32 magnitude that rounds to infinity in each W dtype (round to nearest even:
#: the halfway point between the largest finite value and the next power of two rounds up,
#: because the largest finite value has an odd significand).  fp16: 65504 is the largest, so
#: 65520 and above become inf; bf16: (2 - 2**-7) * 2**127 is the largest, (2 - 2**-8) * 2**127
#: rounds up; fp32 sums are already in W's dtype, so only inf/NaN fail.
OVERFLOW_AT: dict[torch.dtype, float] = {
    torch.float32: math.inf,
    torch.float16: 65520.0,
    torch.bfloat16: (2.0 - 2.0**-8) * 2.0**127,
}


def overflow_error(name: str | None, dtype: torch.dtype, largest: float) -> ApplyError:
    """The error for a sum ``W + delta`` that is not finite once rounded to ``dtype``.
    ``largest``: the largest |W + delta| in fp32 (inf or NaN included)."""
    dt = str(dtype).removeprefix("torch.")
    if math.isnan(largest):
        what = "W + ΔW has NaN elements"
    else:
        what = f"the largest |W + ΔW| is {largest:.6g}, {dt} holds at most {torch.finfo(dtype).max:.6g}"
    return ApplyError(f"{_where(name)}W + ΔW is not finite in {dt}: {what}")


def _largest_magnitude(x: torch.Tensor) -> float:
    """max |x| as a Python float, NaN if any element is NaN (one reduction pass, one sync)."""
    lo, hi = torch.aminmax(x)  # aminmax propagates NaN; a separate abs() would allocate
    return float(torch.maximum(hi, lo.neg()))


#: Margin of the cheap finiteness proof in delta_add_torch: the bound on |ΔW| is taken 2%
#: larger and the dtype's largest value 2% smaller.  That covers the fp32 roundings of the
#: matmul, of c·d and of the sum (relative (r + 3)·2**-24 at most, far below 2% for any rank
#: the format allows); a chunk outside the margin is not refused, only checked exactly.
_PROOF_MARGIN = 0.02


def _delta_bound(left: torch.Tensor, right: torch.Tensor, c: float, sine: bool) -> float:
    """An upper bound on |ΔW| (before the margin): |c| for sine-LoRA (|sin| <= 1), else
    |c| * max_i sum_k |left_ik| * max |right|.  inf/NaN when it cannot be bounded."""
    if sine:
        return abs(c)
    if left.numel() == 0 or right.numel() == 0:
        return 0.0
    rows = float(left.abs().sum(dim=1).max())
    return abs(c) * rows * float(right.abs().max())


def _room_for_w(dtype: torch.dtype, delta_bound: float) -> float:
    """The largest max |W| of a chunk for which W + ΔW surely stays finite in ``dtype``
    (negative or NaN when none does)."""
    top = (1 - _PROOF_MARGIN) * float(torch.finfo(dtype).max)
    return top - (1 + _PROOF_MARGIN) * delta_bound


def _max_nan(a: float | None, b: float) -> float:
    """max(a, b) in which NaN wins (Python's max() drops a NaN in second place)."""
    if a is None:
        return b
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)


def _largest_value(f: "PackedFactor") -> float:
    """max |value| the factor can decode to (NaN when a value is NaN)."""
    values = f.data if f.bits == 16 else f.codebook
    return _largest_magnitude(values.detach().to(torch.float32))


def finite_by_bound(
    W: torch.Tensor,
    A: "PackedFactor",
    B: "PackedFactor",
    *,
    scale: float,
    gamma: float,
    sine: bool,
    fan_in_fan_out: bool,
    name: str | None = None,
) -> bool:
    """True when every element of W + ΔW is proven finite in W's dtype before anything is
    computed: max |W| (one reduction over W, on its device, no copy) against an upper bound on
    |ΔW| from the factors' codebooks alone, without unpacking them (|c| for sine-LoRA;
    |c|·r·max |codebook of B|·max |codebook of A| for LoRA, the fp16 values for a fp16 factor),
    both with the margin ``_PROOF_MARGIN``.  ``omega`` does not enter (|sin| <= 1).

    False proves nothing either way: W holds inf/NaN or values near the top of its dtype's range,
    or the factors are huge; the sums must then be checked as they are formed (what
    :func:`delta_add_torch` does unless told ``proven=True``).  This is the check that lets
    :func:`deltacodec.apply` with ``keep_original=False`` patch a weight without a copy of it.
    """
    _check_operands(W, A, B, fan_in_fan_out, name)
    c = delta_coefficient(scale=scale, gamma=gamma, sine=sine)
    if W.numel() == 0:
        return True
    if sine:
        bound = abs(c)
    else:  # loose (entries the indices never use count too) but free; a loose bound only sends
        # weights already near the top of their dtype's range to the checked path
        rank = int(A.shape[0])
        bound = abs(c) * rank * _largest_value(B) * _largest_value(A)
    return _largest_magnitude(W.detach()) <= _room_for_w(W.dtype, bound)  # NaN on either side: False


# --------------------------------------------------------------------------------------------
# Dequantization and the scalar coefficients
# --------------------------------------------------------------------------------------------


def _unpack_indices(data: torch.Tensor, numel: int, width: int) -> torch.Tensor:
    """The ``numel`` fields of ``width`` bits of an LSB-first uint8 stream, as int64 indices
    (torch ops on ``data``'s device: the path for CUDA streams)."""
    first_bit = torch.arange(numel, dtype=torch.int64, device=data.device) * width
    byte = first_bit >> 3
    shift = first_bit & 7
    # A field starts at bit 0..7 of its byte and is at most 8 bits wide, so it lies inside the
    # little-endian 16-bit word formed by its byte and the next one.  One zero byte is appended
    # so that "the next byte" exists for the last field.
    stream = torch.cat([data, data.new_zeros(1)]).to(torch.int64)
    word = stream[byte] | (stream[byte + 1] << 8)
    return (word >> shift) & ((1 << width) - 1)


def _index_error(f: PackedFactor) -> SldFormatError:
    return SldFormatError(
        f"factor: index stream holds a value >= 2**bits = {1 << f.bits} "
        f"(width {f.width}); the codebook has only {1 << f.bits} entries"
    )


def dequantize_torch(f: PackedFactor, device: torch.device | str | None = None) -> torch.Tensor:
    """The factor's values as a float32 tensor of shape ``f.shape`` (on ``device``, default the
    device of ``f.data``).  Raises :class:`SldFormatError` for malformed factors, including a
    stream holding an index >= ``2**bits`` (possible only when ``width > bits``).

    A stream on the CPU is unpacked and looked up with numpy (:func:`deltacodec.pack.unpack_indices`:
    whole-array shifts and masks, ~60 us for 65k 3-bit fields, against ~340 us for the int64
    gathers the torch path needs) and then moved to ``device``; a stream already on a GPU is
    unpacked there.
    """
    _check_factor(f, "factor")
    target = f.data.device if device is None else torch.device(device)
    if f.bits == 16:
        return f.data.to(device=target, dtype=torch.float32)
    if f.data.device.type == "cpu":
        index = unpack_indices(f.data.numpy(), f.numel, f.width)
        if f.width > f.bits and bool((index >> f.bits).any()):
            raise _index_error(f)
        values = f.codebook.cpu().numpy()[index]  # exact: a gather of fp32 values
        return torch.from_numpy(values).reshape(f.shape).to(target)
    data = f.data.to(target)
    index = _unpack_indices(data, f.numel, f.width)
    if f.width > f.bits and bool((index >> f.bits).any()):
        raise _index_error(f)
    codebook = f.codebook.to(data.device)
    return codebook[index].reshape(f.shape)


def delta_coefficient(*, scale: float, gamma: float, sine: bool) -> float:
    """The fp32 factor ``c`` of the delta: ``float32(scale / gamma)`` for sine-LoRA (quotient in
    float64, rounded once to fp32), ``float32(scale)`` for plain LoRA.  Returned as the Python
    float holding that fp32 value."""
    if sine:
        if not (math.isfinite(gamma) and gamma != 0.0):
            raise ApplyError(f"gamma must be finite and non-zero, got {gamma!r}")
        value = float(np.float32(float(scale) / float(gamma)))
    else:
        value = float(np.float32(scale))
    if not math.isfinite(value):
        raise ApplyError(f"the delta coefficient is not finite in fp32 (scale={scale!r}, gamma={gamma!r})")
    return value


#: Where the torch backend may form plain LoRA's sum with one addmm_ (see delta_add_torch).
_FUSED_MIN_SIDE = 64
_FUSED_MAX_RANK = 64


def _power_of_two(c: float) -> bool:
    """|c| = 2**k: c·x is exact in fp32 (short of overflow, and of results below the normal
    range, where it differs from the rounded product by less than the smallest subnormal)."""
    return c != 0.0 and math.isfinite(c) and math.frexp(abs(c))[0] == 0.5


def _omega32(omega: float) -> float:
    value = float(np.float32(omega))
    if not math.isfinite(value):
        raise ApplyError(f"omega must be finite in fp32, got {omega!r}")
    return value


# --------------------------------------------------------------------------------------------
# Torch backend
# --------------------------------------------------------------------------------------------

#: Elements per chunk of the torch backend's fp32 buffer.  On CPU 2 Mi elements (8 MiB) keeps the
#: matmul -> sin -> add passes of one chunk in the last-level cache while amortising each op's
#: thread start-up (measured on 2 cores: 1.10x the sin+matmul floor at 1 Mi, 1.08x at 2 Mi);
#: on GPUs larger chunks mean fewer launches.
_CHUNK_ELEMENTS = {"cpu": 1 << 21, "cuda": 1 << 24}


@torch.no_grad()
def delta_add_torch(
    W: torch.Tensor,
    A: PackedFactor,
    B: PackedFactor,
    *,
    scale: float,
    omega: float,
    gamma: float,
    sine: bool,
    fan_in_fan_out: bool,
    chunk_elements: int | None = None,
    name: str | None = None,
    proven: bool = False,
) -> None:
    """Reference backend: ``W += delta`` in place, on W's device (see the module docstring).

    W is processed in chunks of whole rows.  Per chunk: sine: ``matmul(..., out=buf)`` into a
    pre-allocated fp32 buffer and ``buf.sin_()`` (omega is folded into B), then the fp32 sum
    ``W + c·buf``; plain: likewise without the sine, or, when ``|c|`` is a power of two, the sum
    by one ``addmm_(left, right, alpha=c)`` (see the module docstring).  A float32 W holds its
    own sum; otherwise the sum
    is formed in a second fp32 buffer from W widened exactly, and copied back with one rounding
    to W's dtype.  Peak extra memory is two chunks (``chunk_elements`` fp32 values each) plus
    the dequantized factors, whatever the size of W.

    Overflow: no chunk is written unless its sum is finite in W's dtype.  A bound on |ΔW| from
    the factors alone (|sin| <= 1; |x_ij| <= sum_k |left_ik| * max |right|) and one reduction
    over the chunk's rows of W prove that for ordinary weights (the add then finds those rows in
    cache); a chunk near the top of the dtype's range, or holding inf/NaN, has its fp32 sum
    formed aside and checked exactly (|W + ΔW| >= 65520 overflows fp16, ...) before the
    rounding into W.  A chunk that overflows is not written, the remaining ones are only
    scanned for the largest |W + ΔW|, and :class:`ApplyError` is raised naming ``name``, W's
    dtype and that value.  The chunks before the failing one have been patched by then: a
    caller that must leave W unchanged keeps a copy and restores it (:func:`deltacodec.apply`
    does).

    ``proven=True``: the caller has established with :func:`finite_by_bound` on this W and these
    factors that every sum is finite; the per-chunk checks are skipped (one reduction over W
    less), and plain LoRA with a power-of-two ``|c|`` on a float32 W is one in-place
    ``W.addmm_(left, right, alpha=c)``, no buffer at all.
    """
    _check_operands(W, A, B, fan_in_fan_out, name)
    c = delta_coefficient(scale=scale, gamma=gamma, sine=sine)
    omega32 = _omega32(omega) if sine else 1.0
    if W.numel() == 0:
        return
    a = dequantize_torch(A, device=W.device)  # (r, in)
    b = dequantize_torch(B, device=W.device)  # (out, r)
    if sine:
        b = b * omega32  # fold omega into the thin factor: one pass less over W's chunks
    # Row i of W receives row i of left @ right.
    if fan_in_fan_out:
        left, right = a.t().contiguous(), b.t().contiguous()  # (in, r), (r, out)
    else:
        left, right = b, a  # (out, r), (r, in)
    # addmm_(alpha=c) is the documented d = c·x, W + d only when scaling by c is exact (|c| a
    # power of two: BLAS may fold c into ``left``, as MKL does) and the BLAS forms the whole
    # rank-r sum before it updates W once. MKL does for these shapes (tested bit for bit against
    # the buffered sequence); with a side under 16 torch takes another path that accumulates
    # into W term by term, hence the size floor. Everything else: product into a buffer, then
    # W + c·buffer.
    fused = (not sine and _power_of_two(c) and min(W.shape) >= _FUSED_MIN_SIDE
             and int(left.shape[1]) <= _FUSED_MAX_RANK)
    if proven and fused and W.dtype == torch.float32:
        # W's own storage is the fp32 accumulator: nothing to round afterwards, no buffer.
        W.addmm_(left, right, alpha=c)
        return

    n_rows, n_cols = W.shape
    if chunk_elements is None:
        chunk_elements = _CHUNK_ELEMENTS.get(W.device.type, 1 << 20)
    chunk_rows = max(1, min(n_rows, chunk_elements // max(n_cols, 1)))
    # Every op below works on one dtype: mixed-dtype elementwise ops (bf16 + fp32) are not
    # vectorised on CPU and cost 5-10x a widening copy_ followed by an fp32 op.
    shape = (chunk_rows, n_cols)
    # x = left @ right (sin(omega x) for sine), unless addmm_ adds it straight into the sum
    dbuf = None if fused else torch.empty(shape, dtype=torch.float32, device=W.device)
    sbuf: torch.Tensor | None = None  # the fp32 sum W + c·d, made when W cannot hold it itself
    limit = OVERFLOW_AT[W.dtype]
    room = math.inf if proven else _room_for_w(W.dtype, _delta_bound(left, right, c, sine))
    largest: float | None = None  # set once a chunk overflows: max |W + ΔW| from there on
    for r0 in range(0, n_rows, chunk_rows):
        r1 = min(n_rows, r0 + chunk_rows)
        w = W[r0:r1]
        if not fused:
            d = torch.matmul(left[r0:r1], right, out=dbuf[: r1 - r0])
            if sine:
                d.sin_()
        safe = proven or (largest is None and _largest_magnitude(w) <= room)  # NaN/inf in w: not <= room
        if safe and W.dtype == torch.float32:
            if fused:
                w.addmm_(left[r0:r1], right, alpha=c)
            else:
                w.add_(d, alpha=c)
            continue
        # The fp32 sum aside: W widened exactly, the delta added, then (after the check on the
        # exact path) the one rounding to W's dtype (round to nearest even) as it is copied back.
        if sbuf is None:
            sbuf = torch.empty(shape, dtype=torch.float32, device=W.device)
        t = sbuf[: r1 - r0]
        t.copy_(w)
        if fused:
            t.addmm_(left[r0:r1], right, alpha=c)
        else:
            t.add_(d, alpha=c)
        if not safe:  # rounding to W's dtype overflows exactly when |sum| >= limit
            m = _largest_magnitude(t)
            if largest is not None or not m < limit:
                largest = _max_nan(largest, m)
                continue
        w.copy_(t)
    if largest is not None:
        raise overflow_error(name, W.dtype, largest)


# --------------------------------------------------------------------------------------------
# Triton backend
# --------------------------------------------------------------------------------------------

# Filled in by _triton_kernel() on first use.  The @triton.jit bodies look `tl` up in this
# module's globals, and the interpreter (TRITON_INTERPRET=1) requires triton.language to be
# visible there; importing triton at module import would make it a hard dependency.
triton: Any = None
tl: Any = None
_load_factor_tile: Any = None
_round_to_bfloat16: Any = None
_sine_lora_delta_add_kernel: Any = None


def triton_available() -> bool:
    """True when ``import triton`` works (the package is installed and loads)."""
    return _import_triton() is not None


@functools.lru_cache(maxsize=None)
def _import_triton():
    try:
        import triton as triton_module  # noqa: PLC0415 - optional dependency, imported lazily
        import triton.language  # noqa: F401, PLC0415
    except Exception:  # ImportError, or a broken install failing while it loads
        return None
    return triton_module


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def _loaded_for_interpreter() -> bool:
    """Whether triton.language was imported with the interpreter on: its jit functions are bound
    then, and ones bound for the compiler fail inside an interpreted kernel."""
    from triton.runtime.interpreter import InterpretedFunction  # noqa: PLC0415

    return isinstance(tl.zeros, InterpretedFunction)


@functools.lru_cache(maxsize=None)
def _triton_kernel():
    """Import triton and define the kernel (once).  Raises ApplyError without triton."""
    # The helpers and the kernel are bound as module globals (`global` below): the interpreter
    # re-creates a jit function from its source against the module's globals, so a helper kept
    # as a closure variable would not be found there.
    global triton, tl, _load_factor_tile, _round_to_bfloat16, _sine_lora_delta_add_kernel
    triton_module = _import_triton()
    if triton_module is None:
        raise ApplyError("the triton backend needs the optional dependency triton (pip install triton)")
    triton, tl = triton_module, triton_module.language

    @triton.jit
    def _load_factor_tile(data_ptr, codebook_ptr, index, mask, WIDTH: tl.constexpr):
        """fp32 values of the factor elements ``index`` (int64 tile; 0.0 where ~mask)."""
        if WIDTH == 16:  # pass-through fp16 factor
            value = tl.load(data_ptr + index, mask=mask, other=0.0).to(tl.float32)
        else:
            first_bit = index * WIDTH
            byte = first_bit >> 3
            shift = (first_bit & 7).to(tl.int32)
            word = tl.load(data_ptr + byte, mask=mask, other=0).to(tl.int32)
            if 8 % WIDTH != 0:  # widths 3, 5, 6, 7: a field may continue into the next byte
                straddles = mask & (shift + WIDTH > 8)
                high = tl.load(data_ptr + byte + 1, mask=straddles, other=0).to(tl.int32)
                word = word | (high << 8)
            code = (word >> shift) & ((1 << WIDTH) - 1)
            value = tl.load(codebook_ptr + code, mask=mask, other=0.0)
        return value

    @triton.jit
    def _round_to_bfloat16(x):
        """fp32 -> bf16, round to nearest even, on the bit pattern.  Triton's interpreter
        truncates in .to(tl.bfloat16) while GPUs round; doing it by hand gives RTNE on both."""
        bits = x.to(tl.uint32, bitcast=True)
        bits = tl.where(x != x, 0x7FC00000, bits)  # NaN -> quiet NaN (the add below keeps it NaN)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def _sine_lora_delta_add_kernel(
        w_ptr,  # W, row-major with unit column stride: (out, in), or (in, out) if FAN_IN_FAN_OUT
        n_rows,  # rows of W
        n_cols,  # columns of W
        stride_w_row,
        a_data_ptr,  # A (r x in): uint8 stream, or fp16 values if A_WIDTH == 16
        a_codebook_ptr,  # fp32, 2**A_WIDTH entries (unused if A_WIDTH == 16)
        b_data_ptr,  # B (out x r), likewise
        b_codebook_ptr,
        rank,
        omega,  # fp32
        c,  # fp32
        largest_ptr,  # int32[1], zero before the launch: receives the bits of max |W + delta|
        A_WIDTH: tl.constexpr,
        B_WIDTH: tl.constexpr,
        SINE: tl.constexpr,
        FAN_IN_FAN_OUT: tl.constexpr,
        BLOCK_R: tl.constexpr,  # rank padding: power of two >= 16
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < n_rows
        col_ok = cols < n_cols
        rows64 = rows.to(tl.int64)
        cols64 = cols.to(tl.int64)

        # x[i, j] = sum_k left[i, k] * right[k, j] over the tile of W.
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, rank, BLOCK_R):
            ks = k0 + tl.arange(0, BLOCK_R)
            k_ok = ks < rank
            ks64 = ks.to(tl.int64)
            left_mask = row_ok[:, None] & k_ok[None, :]
            right_mask = k_ok[:, None] & col_ok[None, :]
            if FAN_IN_FAN_OUT:
                # W is (in, out) and receives (B @ A).T = A.T @ B.T:
                # left[i, k] = A[k, i] (index k*in + i), right[k, j] = B[j, k] (index j*r + k).
                left = _load_factor_tile(
                    a_data_ptr, a_codebook_ptr, ks64[None, :] * n_rows + rows64[:, None], left_mask, A_WIDTH
                )
                right = _load_factor_tile(
                    b_data_ptr, b_codebook_ptr, cols64[None, :] * rank + ks64[:, None], right_mask, B_WIDTH
                )
            else:
                # W is (out, in): left[i, k] = B[i, k] (index i*r + k), right[k, j] = A[k, j].
                left = _load_factor_tile(
                    b_data_ptr, b_codebook_ptr, rows64[:, None] * rank + ks64[None, :], left_mask, B_WIDTH
                )
                right = _load_factor_tile(
                    a_data_ptr, a_codebook_ptr, ks64[:, None] * n_cols + cols64[None, :], right_mask, A_WIDTH
                )
            # "ieee": true fp32 products.  The tf32 default would perturb x by ~1e-3 relative,
            # which sin(omega * x) amplifies by omega.
            acc = tl.dot(left, right, acc, input_precision="ieee")

        if SINE:
            delta = tl.sin(acc * omega) * c
        else:
            delta = acc * c

        w_ptrs = w_ptr + rows64[:, None] * stride_w_row + cols64[None, :]
        mask = row_ok[:, None] & col_ok[None, :]
        total = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32) + delta
        # max |total| over the tile, as the bit pattern of a non-negative fp32: those order like
        # int32, and NaN (0x7FC00000 and up once the sign is cleared) orders above inf
        # (0x7F800000), so one integer atomic max gives the caller the largest magnitude, NaN
        # winning.  The caller compares it with OVERFLOW_AT[W.dtype] after the launch.
        magnitude = tl.where(mask, tl.abs(total), 0.0).to(tl.int32, bitcast=True)
        tl.atomic_max(largest_ptr, tl.max(tl.max(magnitude, axis=1), axis=0))
        if w_ptr.dtype.element_ty == tl.bfloat16:
            out = _round_to_bfloat16(total)
        else:
            out = total.to(w_ptr.dtype.element_ty)  # fp32: as is; fp16: round to nearest even
        tl.store(w_ptrs, out, mask=mask)

    return _sine_lora_delta_add_kernel


def rank_block(rank: int) -> int:
    """The kernel's rank padding for ``rank``: the smallest power of two >= max(rank, 16), capped
    at 32 (larger ranks loop over steps of 32)."""
    if rank < 1:
        raise ApplyError(f"rank must be >= 1, got {rank}")
    return min(RANK_BLOCKS[-1], max(RANK_BLOCKS[0], 1 << (rank - 1).bit_length()))


# Tile sizes.  In the interpreter every program instance costs ~0.2-0.7 ms of Python, so tiles
# are large.  On GPUs: 64x64 tiles over 8 warps (16 outputs per thread) compile to 66-112
# registers without spills on sm_80/sm_90 for both rank paddings (ptxas, via compile_for_gpu),
# and give ~4000 programs for a 4096x4096 module.  Not timed on hardware.
_GPU_TILE = dict(block_m=64, block_n=64, num_warps=8)
_INTERPRETER_TILE = dict(block_m=64, block_n=64, num_warps=4)


def _kernel_codebook(f: PackedFactor, device: torch.device) -> torch.Tensor:
    """The codebook as the kernel reads it: 2**width fp32 entries.

    The kernel extracts ``width``-bit fields, so it could index up to 2**width - 1.  When
    ``width > bits`` the codebook is padded with NaN: no read can leave the buffer, and a corrupt
    stream (impossible after the container's CRC check) poisons W visibly instead of silently.
    """
    if f.bits == 16:
        return torch.zeros(1, dtype=torch.float32, device=device)  # placeholder, never read
    codebook = f.codebook.to(device=device, dtype=torch.float32)
    if f.width > f.bits:
        pad = torch.full(((1 << f.width) - (1 << f.bits),), float("nan"), device=device)
        codebook = torch.cat([codebook, pad])
    return codebook.contiguous()


def _factor_stream(f: PackedFactor, device: torch.device) -> torch.Tensor:
    return f.data.to(device).contiguous()


@torch.no_grad()
def delta_add_triton(
    W: torch.Tensor,
    A: PackedFactor,
    B: PackedFactor,
    *,
    scale: float,
    omega: float,
    gamma: float,
    sine: bool,
    fan_in_fan_out: bool,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    name: str | None = None,
    proven: bool = False,
) -> None:
    """Fused Triton backend: same contract as :func:`delta_add_torch` (``proven`` changes
    nothing here: the overflow check is fused into the kernel and costs no extra pass).

    One kernel launch; each program patches one ``block_m x block_n`` tile of W.  The packed
    streams and codebooks are copied to W's device as stored (a few hundred KiB); dequantized
    factors and the delta never exist in global memory.  W must be on a CUDA device, or on the
    CPU with ``TRITON_INTERPRET=1`` set before triton is first imported.

    Overflow: every program also folds max |W + ΔW| of its tile into one int32 (an atomic max);
    after the launch (one device sync) a value that does not round to a finite number in W's
    dtype raises :class:`ApplyError` naming ``name``, the dtype and that value.  The tiles are
    written by then, non-finite values included: the caller restores W from its copy
    (:func:`deltacodec.apply` does).
    """
    _, _, rank = _check_operands(W, A, B, fan_in_fan_out, name)
    c = delta_coefficient(scale=scale, gamma=gamma, sine=sine)
    omega32 = _omega32(omega) if sine else 1.0
    if W.device.type != "cuda" and not _interpreting():
        raise ApplyError(
            f"the triton backend needs W on a CUDA device (got {W.device}); "
            "set TRITON_INTERPRET=1 to run it on CPU tensors"
        )
    kernel = _triton_kernel()
    if _interpreting() and not _loaded_for_interpreter():
        raise ApplyError(
            "TRITON_INTERPRET=1 was set after triton had been imported (transformers and peft "
            "import it too): set it in the environment before the first import"
        )
    tile = dict(_INTERPRETER_TILE if _interpreting() else _GPU_TILE)
    tile.update({k: v for k, v in dict(block_m=block_m, block_n=block_n, num_warps=num_warps).items() if v})
    for key in ("block_m", "block_n"):
        v = tile[key]
        if v < 16 or v & (v - 1):
            raise ApplyError(f"{key} must be a power of two >= 16, got {v}")
    if W.numel() == 0:
        return

    target = W if W.stride(-1) == 1 else W.contiguous()  # the kernel assumes unit column stride
    n_rows, n_cols = target.shape
    largest = torch.zeros(1, dtype=torch.int32, device=W.device)
    grid = (triton.cdiv(n_rows, tile["block_m"]), triton.cdiv(n_cols, tile["block_n"]))
    kernel[grid](
        target,
        n_rows,
        n_cols,
        target.stride(0),
        _factor_stream(A, W.device),
        _kernel_codebook(A, W.device),
        _factor_stream(B, W.device),
        _kernel_codebook(B, W.device),
        rank,
        omega32,
        c,
        largest,
        A_WIDTH=A.kernel_width,
        B_WIDTH=B.kernel_width,
        SINE=bool(sine),
        FAN_IN_FAN_OUT=bool(fan_in_fan_out),
        BLOCK_R=rank_block(rank),
        BLOCK_M=tile["block_m"],
        BLOCK_N=tile["block_n"],
        num_warps=tile["num_warps"],
        # Every product rounded as written (no mul+add contraction): the result does not depend
        # on the compiler's choice, and Triton 3.9 warns when this is left implicit.
        enable_fp_fusion=False,
    )
    if target is not W:
        W.copy_(target)
    m = float(largest.view(torch.float32).item())
    if not m < OVERFLOW_AT[W.dtype]:
        raise overflow_error(name, W.dtype, m)


# --------------------------------------------------------------------------------------------
# Backend selection
# --------------------------------------------------------------------------------------------


def select_backend(W: torch.Tensor, backend: str = "auto") -> str:
    """Which backend patches ``W``: ``"torch"`` or ``"triton"``.

    An explicit ``backend`` ("torch"/"triton") is used as given.  For ``"auto"`` the environment
    variable ``DELTACODEC_BACKEND`` ("torch"/"triton"/"auto"), when set, decides; otherwise
    triton is chosen for CUDA weights when triton imports, torch for everything else.
    Asking for triton where it cannot run raises :class:`ApplyError`.
    """
    choice = (backend or "auto").strip().lower()
    if choice == "auto":
        choice = os.environ.get(_ENV_BACKEND, "").strip().lower() or "auto"
    if choice == "auto":
        return "triton" if W.device.type == "cuda" and triton_available() else "torch"
    if choice not in _BACKENDS:
        raise ApplyError(f"unknown backend {choice!r}: expected 'auto', 'torch' or 'triton' (check {_ENV_BACKEND})")
    if choice == "triton":
        if not triton_available():
            raise ApplyError("backend 'triton' requested but triton is not installed")
        if W.device.type != "cuda" and not _interpreting():
            raise ApplyError(f"backend 'triton' requested for a weight on {W.device}; it needs CUDA (or TRITON_INTERPRET=1)")
    return choice


def delta_add(
    W: torch.Tensor,
    A: PackedFactor,
    B: PackedFactor,
    *,
    scale: float,
    omega: float,
    gamma: float,
    sine: bool,
    fan_in_fan_out: bool,
    backend: str = "auto",
    name: str | None = None,
    proven: bool = False,
) -> str:
    """Patch ``W`` in place with the backend :func:`select_backend` picks; returns the backend's
    name.  ``name`` (e.g. the module's or tensor's name) prefixes every error message.

    Raises :class:`ApplyError` when W + ΔW would not be finite in W's dtype; W may be partly
    patched then (see the backends), so a caller that must not lose W keeps a copy, or proves
    beforehand with :func:`finite_by_bound` that no sum can overflow and passes ``proven=True``
    (the torch backend then skips its per-chunk checks)."""
    chosen = select_backend(W, backend)
    apply = delta_add_triton if chosen == "triton" else delta_add_torch
    apply(W, A, B, scale=scale, omega=omega, gamma=gamma, sine=sine, fan_in_fan_out=fan_in_fan_out, name=name,
          proven=proven)
    return chosen


# --------------------------------------------------------------------------------------------
# Ahead-of-time compilation (no GPU needed: the triton wheel ships ptxas)
# --------------------------------------------------------------------------------------------

_TRITON_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def launch_specialisations() -> Iterator[dict]:
    """Every constexpr/dtype combination :func:`delta_add_triton` can launch (tile sizes aside):
    A and B field widths (1..8, 16 = fp16) x W dtype x rank padding x sine x fan_in_fan_out."""
    keys = ("a_width", "b_width", "w_dtype", "block_r", "sine", "fan_in_fan_out")
    for values in itertools.product(FACTOR_WIDTHS, FACTOR_WIDTHS, W_DTYPES, RANK_BLOCKS, (False, True), (False, True)):
        yield dict(zip(keys, values))


def compile_for_gpu(
    arch: int,
    *,
    a_width: int,
    b_width: int,
    w_dtype: torch.dtype,
    block_r: int,
    sine: bool,
    fan_in_fan_out: bool,
    block_m: int = _GPU_TILE["block_m"],
    block_n: int = _GPU_TILE["block_n"],
    num_warps: int = _GPU_TILE["num_warps"],
    aligned: bool = True,
    a_pass_through: str = "fp16",
    b_pass_through: str = "fp16",
):
    """Compile the kernel for CUDA compute capability ``arch`` (80 = sm_80, 90 = sm_90, ...)
    without a GPU; returns triton's ``CompiledKernel`` (``.asm["ptx"]``, ``.asm["cubin"]``,
    ``.metadata``).

    The signature mirrors what the JIT builds for a launch of :func:`delta_add_triton` on
    16-byte aligned tensors: pointers, and with ``aligned`` also ``n_cols`` and ``stride_w_row``
    (as for LLaMA shapes), carry the divisible-by-16 hint.  (The JIT further turns an int
    argument equal to 1 -- rank 1, a one-row W -- into a constant; that only simplifies
    arithmetic and is not enumerated here.)  ``a_pass_through``/``b_pass_through``: the element
    type of a width-16 factor, ``"fp16"``, ``"bf16"`` (a lossless bf16 adapter's factors) or
    ``"fp32"`` (a ``bits=32`` file's float32 factors): the same kernel source, another pointer
    type.  Must run without ``TRITON_INTERPRET``.
    """
    if _interpreting():
        raise ApplyError("compile_for_gpu needs TRITON_INTERPRET unset (the interpreter does not compile)")
    if a_width not in FACTOR_WIDTHS or b_width not in FACTOR_WIDTHS:
        raise ApplyError(f"widths must be in {FACTOR_WIDTHS}, got {a_width}, {b_width}")
    if w_dtype not in W_DTYPES or block_r not in RANK_BLOCKS:
        raise ApplyError(f"unsupported w_dtype {w_dtype} or block_r {block_r}")
    if a_pass_through not in ("fp16", "bf16", "fp32") or b_pass_through not in ("fp16", "bf16", "fp32"):
        raise ApplyError(f"pass-through factors are fp16, bf16 or fp32, got {a_pass_through}, {b_pass_through}")
    kernel = _triton_kernel()
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415

    def stream(width: int, pass_through: str) -> str:
        return "*" + pass_through if width == 16 else "*u8"

    signature = {
        "w_ptr": "*" + _TRITON_DTYPE_NAMES[w_dtype],
        "n_rows": "i32",
        "n_cols": "i32",
        "stride_w_row": "i32",
        "a_data_ptr": stream(a_width, a_pass_through),
        "a_codebook_ptr": "*fp32",
        "b_data_ptr": stream(b_width, b_pass_through),
        "b_codebook_ptr": "*fp32",
        "rank": "i32",
        "omega": "fp32",
        "c": "fp32",
        "largest_ptr": "*i32",
    }
    constexprs = {
        "A_WIDTH": a_width,
        "B_WIDTH": b_width,
        "SINE": bool(sine),
        "FAN_IN_FAN_OUT": bool(fan_in_fan_out),
        "BLOCK_R": block_r,
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
    }
    signature.update({name: "constexpr" for name in constexprs})
    hinted = [name for name, ty in signature.items() if ty.startswith("*")]
    if aligned:
        hinted += ["n_cols", "stride_w_row"]
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in hinted}
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(
        source,
        target=GPUTarget("cuda", int(arch), 32),
        options={"num_warps": num_warps, "enable_fp_fusion": False},
    )
