"""Analysis tools for (sine-activated) low-rank adapters and their quantized versions.

Two families of tools live here:

* **Spectral statistics** — :func:`sigma_max`, :func:`stable_rank`, :func:`sine_product` and
  :func:`module_stats`. The stable rank ``SR(M) = ||M||_F^2 / sigma_max(M)^2`` is the quantity the
  SineLoRA papers use to explain why ``sin(omega * B @ A)`` is more expressive than ``B @ A`` and why
  quantizing the factors alone cannot raise it.
* **Bjøntegaard-Delta (BD) analysis** of rate/quality curves — :func:`read_points_csv`,
  :func:`bd_table` and :func:`plot_rd`. The integrals are computed by the ``bjontegaard`` package
  (the reference implementation the papers cite); this module only validates the curves, calls it and
  turns its warnings and NaNs into errors or warnings that name the group and the method.

``bjontegaard`` and ``matplotlib`` are optional (``pip install -e '.[analysis]' in a checkout``) and are only
imported inside the functions that need them; ``torch`` is also imported lazily so that the BD tools
start quickly.

Conventions: a LoRA module has ``A`` of shape ``(r, in_features)`` and ``B`` of shape
``(out_features, r)``; its weight update is ``scale * B @ A`` (plain LoRA) or
``scale * sin(omega * B @ A) / gamma`` (SineLoRA).
"""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import numpy as np

from deltacodec.errors import SldError

__all__ = [
    "AnalysisError",
    "AnalysisWarning",
    "INTERPOLATIONS",
    "MIN_POINTS",
    "RDPoint",
    "sigma_max",
    "stable_rank",
    "sine_product",
    "module_stats",
    "relative_weight_error",
    "read_points_csv",
    "bd_table",
    "plot_rd",
]


class AnalysisError(SldError, ValueError):
    """An analysis cannot be carried out on the given input (bad RD points, non-finite matrix, ...)."""


class AnalysisWarning(UserWarning):
    """A result was computed but is less trustworthy (e.g. RD curves overlap only partly)."""


# --------------------------------------------------------------------------------------------------
# Spectral statistics
# --------------------------------------------------------------------------------------------------

#: Below this smaller dimension sigma_max is taken from a direct (exact) SVD in float64.
_EXACT_DIM = 128
_DEFAULT_TOL = 1e-6
_DEFAULT_MAX_ITER = 60
_DEFAULT_BLOCK = 16


def _torch():
    import torch

    return torch


def _as_tensor(M: Any, name: str = "matrix"):
    """A 2-D floating torch tensor viewing ``M`` (numpy array or tensor); no copy when possible."""
    torch = _torch()
    if isinstance(M, torch.Tensor):
        t = M.detach()
    else:
        arr = np.asarray(M)
        if arr.dtype not in (np.float32, np.float64):
            arr = arr.astype(np.float32)
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.ndim != 2:
        raise AnalysisError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if t.dtype not in (torch.float32, torch.float64):
        t = t.to(torch.float32)
    return t


def _check_finite(t, name: str) -> None:
    torch = _torch()
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise AnalysisError(f"{name} contains NaN or Inf")


def _is_factor_pair(M: Any) -> bool:
    return isinstance(M, (tuple, list)) and len(M) == 2


def _factors(M: Any, name: str = "matrix"):
    B, A = (_as_tensor(M[0], f"{name}[0]"), _as_tensor(M[1], f"{name}[1]"))
    if B.shape[1] != A.shape[0]:
        raise AnalysisError(
            f"{name}: factors do not chain: left is {tuple(B.shape)}, right is {tuple(A.shape)}"
        )
    _check_finite(B, f"{name}[0]")
    _check_finite(A, f"{name}[1]")
    return B, A


def _lowrank_core(B, A):
    """A small matrix with the same singular values as ``B @ A`` (via two thin QRs), float64."""
    torch = _torch()
    _, RB = torch.linalg.qr(B.to(torch.float64), mode="reduced")  # B = QB RB
    _, RA = torch.linalg.qr(A.T.to(torch.float64), mode="reduced")  # A^T = QA RA
    return RB @ RA.T  # B A = QB (RB RA^T) QA^T


def _fro2(t, name: str | None = None, chunk_rows: int = 1024) -> float:
    """||t||_F^2 accumulated in float64 without a float64 copy of the whole matrix.

    The sum of squares of finite float32/float64 entries cannot overflow float64 for any matrix that
    fits in memory, so a non-finite result means a NaN/Inf entry: with ``name`` that raises.
    """
    torch = _torch()
    total = 0.0
    for i in range(0, t.shape[0], chunk_rows):
        c = t[i : i + chunk_rows].to(torch.float64)
        total += float(torch.dot(c.reshape(-1), c.reshape(-1)))
    if name is not None and not math.isfinite(total):
        raise AnalysisError(f"{name} contains NaN or Inf")
    return total


def _sigma_max_dense(M, *, tol: float, max_iter: int, block: int, seed: int) -> float:
    """Largest singular value of a dense 2-D tensor by randomized block Krylov iteration."""
    torch = _torch()
    m, n = M.shape
    if m == 0 or n == 0:
        return 0.0
    if min(m, n) <= _EXACT_DIM:
        return float(torch.linalg.svdvals(M.to(torch.float64))[0])
    if m < n:  # iterate in the smaller space: columns of M^T
        M = M.T
        m, n = n, m
    work = M.dtype
    drop = 1e-5 if work == torch.float32 else 1e-11
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    b = max(1, min(int(block), n))
    Q = torch.randn(n, b, generator=gen, dtype=torch.float64).to(device=M.device, dtype=work)
    Q, _ = torch.linalg.qr(Q)
    basis = [Q]
    Ys: list = []  # M @ Q_i in float64 -> Gram matrix of M restricted to the Krylov space
    G = torch.zeros(0, 0, dtype=torch.float64, device=M.device)
    prev = -1.0
    est = 0.0
    for _ in range(max(1, int(max_iter))):
        Y = M @ Q
        Y64 = Y.to(torch.float64)
        if Ys:
            prev_all = torch.cat(Ys, 1)
            cross = prev_all.T @ Y64
            G = torch.cat(
                [torch.cat([G, cross], 1), torch.cat([cross.T, Y64.T @ Y64], 1)], 0
            )
        else:
            G = Y64.T @ Y64
        Ys.append(Y64)
        est = math.sqrt(max(float(torch.linalg.eigvalsh(G)[-1]), 0.0))
        if est == 0.0 or abs(est - prev) <= tol * est:
            break
        prev = est
        Z = M.T @ Y
        znorm = float(torch.linalg.matrix_norm(Z))
        K = torch.cat(basis, 1)
        for _pass in range(2):  # classical Gram-Schmidt against the basis, twice
            Z = Z - K @ (K.T @ Z)
        Qz, R = torch.linalg.qr(Z)
        # Columns whose R diagonal is at rounding level are (numerically) dependent on the basis:
        # their Q columns are noise and would spoil the orthonormality of the basis.
        keep = torch.abs(torch.diagonal(R)) > drop * znorm
        if not bool(keep.any()):
            break  # Krylov space exhausted (M has low rank): the Ritz value is exact
        Q = Qz[:, keep]
        Q = Q - K @ (K.T @ Q)
        Q, _ = torch.linalg.qr(Q)
        if K.shape[1] + Q.shape[1] > n:  # the basis would span everything: an exact SVD is as cheap
            return float(torch.linalg.svdvals(M.to(torch.float64))[0])
        basis.append(Q)
    return est


def sigma_max(
    M: Any,
    *,
    tol: float = _DEFAULT_TOL,
    max_iter: int = _DEFAULT_MAX_ITER,
    block: int = _DEFAULT_BLOCK,
    seed: int = 0,
) -> float:
    """Largest singular value of ``M``.

    ``M`` is a 2-D numpy array or torch tensor, or a pair ``(B, A)`` of factors meaning the product
    ``B @ A`` (which is then never formed: its singular values are those of a small
    ``r x r`` matrix obtained from two thin QR decompositions, computed exactly in float64).

    Method for a dense matrix: if its smaller side is at most 128 an exact float64 SVD is used.
    Otherwise a randomized **block Krylov** iteration (block of ``block`` seeded Gaussian vectors,
    Krylov space of ``M^T M`` grown one block per step with full re-orthogonalization, Rayleigh-Ritz
    value from the Gram matrix of ``M`` on that space in float64). The iteration stops when the
    estimate changes by less than ``tol`` (relative) between two steps, when the Krylov space is
    exhausted (low-rank ``M``: the value is then exact), or after ``max_iter`` steps. Each step costs
    two products of ``M`` with ``block`` vectors, so a 14336 x 4096 float32 matrix takes a few
    seconds on two cores.

    Accuracy: the Ritz value is a lower bound of the true ``sigma_max`` (up to rounding). With the
    defaults (``tol=1e-6``, ``max_iter=60``, ``block=16``) the relative error measured against
    ``torch.linalg.svdvals`` is below 1e-6 on the matrices in the test-suite (dense Gaussian
    matrices, whose top singular values are tightly clustered, low-rank products and
    ``sin(omega * B @ A)`` up to 2048 x 1024); the tests assert < 1e-4. Float32 inputs are
    multiplied in float32, which bounds the attainable relative accuracy near 1e-6.

    Deterministic: the start block comes from a seeded generator (``seed``), so the same input gives
    the same result on the same machine and thread count.
    """
    if _is_factor_pair(M):
        B, A = _factors(M)
        if B.numel() == 0 or A.numel() == 0:
            return 0.0
        core = _lowrank_core(B, A)
        return float(_torch().linalg.svdvals(core)[0]) if core.numel() else 0.0
    t = _as_tensor(M)
    _fro2(t, "matrix")  # raises on NaN/Inf
    return _sigma_max_dense(t, tol=tol, max_iter=max_iter, block=block, seed=seed)


def stable_rank(
    M: Any,
    *,
    tol: float = _DEFAULT_TOL,
    max_iter: int = _DEFAULT_MAX_ITER,
    block: int = _DEFAULT_BLOCK,
    seed: int = 0,
) -> float:
    """Stable rank ``||M||_F^2 / sigma_max(M)^2`` (a value in ``[1, rank(M)]``; 0.0 for a zero matrix).

    ``M`` is a 2-D numpy array / torch tensor or a factor pair ``(B, A)`` meaning ``B @ A``; for a
    pair the result is exact (computed on an ``r x r`` core, the product is not formed).
    ``sigma_max`` is computed as in :func:`sigma_max` (same ``tol``, ``max_iter``, ``block``,
    ``seed``); since its estimate is a lower bound with relative error ``e`` (below 1e-6 in the tests),
    the stable rank is an upper estimate with relative error about ``2e``. The Frobenius norm is
    accumulated in float64.
    """
    torch = _torch()
    if _is_factor_pair(M):
        B, A = _factors(M)
        if B.numel() == 0 or A.numel() == 0:
            return 0.0
        core = _lowrank_core(B, A)
        s = torch.linalg.svdvals(core)
        if s.numel() == 0 or float(s[0]) == 0.0:
            return 0.0
        return float((s * s).sum() / (s[0] * s[0]))
    t = _as_tensor(M)
    f2 = _fro2(t, "matrix")  # raises on NaN/Inf
    if f2 == 0.0:
        return 0.0
    smax = _sigma_max_dense(t, tol=tol, max_iter=max_iter, block=block, seed=seed)
    if smax == 0.0:
        return 0.0
    return f2 / (smax * smax)


def _sine_tensor(B, A, omega: float):
    """``sin(omega * B @ A)`` as a new tensor (dtype of the factors), built in place: one allocation."""
    torch = _torch()
    dtype = torch.promote_types(B.dtype, A.dtype)
    B = B.to(dtype)
    A = A.to(dtype)
    out = torch.empty(B.shape[0], A.shape[1], dtype=dtype, device=B.device)
    torch.matmul(B, A, out=out)
    out.mul_(float(omega))
    out.sin_()
    return out


def sine_product(B: Any, A: Any, omega: float):
    """``sin(omega * B @ A)``, formed with a single output allocation (no temporaries).

    Returns a numpy array when ``B`` is a numpy array, otherwise a torch tensor.
    """
    Bt, At = _factors((B, A), "sine_product factors")
    out = _sine_tensor(Bt, At, omega)
    if isinstance(B, np.ndarray):
        return out.numpy()
    return out


def _frob_diff_lowrank(B, A, Bq, Aq) -> float:
    """``||Bq @ Aq - B @ A||_F`` without forming either product (exact, float64)."""
    torch = _torch()
    B, A, Bq, Aq = (t.to(torch.float64) for t in (B, A, Bq, Aq))
    # Bq Aq - B A = (Bq - B) Aq + B (Aq - A): written with the differences, the Gram traces below
    # do not cancel catastrophically when the quantization error is small.
    X = torch.cat([Bq - B, B], 1)  # out x 2r
    Y = torch.cat([Aq, Aq - A], 0)  # 2r x in
    val = float(torch.trace((X.T @ X) @ (Y @ Y.T)))
    return math.sqrt(max(val, 0.0))


def _frob_lowrank(B, A) -> float:
    torch = _torch()
    val = float(torch.trace((B.T.to(torch.float64) @ B.to(torch.float64)) @ (A.to(torch.float64) @ A.T.to(torch.float64))))
    return math.sqrt(max(val, 0.0))


def relative_weight_error(A: Any, B: Any, A_q: Any, B_q: Any, *, omega: float | None, sine: bool) -> float:
    """``||dW_q - dW||_F / ||dW||_F`` of one module (scale and gamma cancel).

    ``A``/``A_q`` are ``(r, in)``, ``B``/``B_q`` ``(out, r)``. Plain LoRA is computed exactly in
    float64 from the factors without forming ``out x in`` products; SineLoRA forms the two sine
    matrices in float32. 0.0 when both updates are zero, ``inf`` when only the reference is.
    """
    full = _factors((B, A), "(B, A)")
    quant = _factors((B_q, A_q), "(B_q, A_q)")
    if sine:
        S = _sine_tensor(full[0], full[1], omega)
        ref = math.sqrt(_fro2(S))
        Sq = _sine_tensor(quant[0], quant[1], omega)
        Sq.sub_(S)
        diff = math.sqrt(_fro2(Sq))
    else:
        ref = _frob_lowrank(*full)
        diff = _frob_diff_lowrank(full[0], full[1], quant[0], quant[1])
    if ref == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / ref


def module_stats(
    A: Any,
    B: Any,
    *,
    omega: float | None,
    gamma: float | None,
    scale: float,
    sine: bool,
    A_q: Any = None,
    B_q: Any = None,
    tol: float = _DEFAULT_TOL,
    seed: int = 0,
) -> dict:
    """Spectral statistics of one LoRA module, full precision and/or quantized.

    ``A`` is ``(r, in)``, ``B`` is ``(out, r)`` (float32 arrays or tensors); ``A_q``/``B_q`` are the
    dequantized factors. Either pair may be ``None`` (e.g. only an ``.sld`` file is at hand); every
    statistic computable from what was given is returned, the others are absent:

    ``sr_lowrank``      SR(B A)                    (exact, from the factors)
    ``sr_lowrank_q``    SR(Q(B) Q(A))              (exact, from the factors)
    ``sr_sine``         SR(sin(omega B A))         (``sine`` only)
    ``sr_sine_q``       SR(sin(omega Q(B) Q(A)))   (``sine`` only)
    ``rel_error``       ||dW_q - dW||_F / ||dW||_F (both pairs given)
    ``abs_error``       ||dW_q - dW||_F
    ``dw_norm``         ||dW||_F

    with ``dW = scale * sin(omega * B @ A) / gamma`` for SineLoRA and ``scale * B @ A`` otherwise
    (``scale`` and ``gamma`` cancel in ``rel_error``). ``rel_error`` is 0.0 when both updates are zero
    and ``inf`` when only the reference one is. The sine matrices are formed once each (one
    ``out x in`` float32 allocation apiece); plain products never are.
    """
    have_full = A is not None and B is not None
    have_q = A_q is not None and B_q is not None
    if not have_full and not have_q:
        raise AnalysisError("module_stats needs (A, B), (A_q, B_q) or both")
    if sine:
        if omega is None or not math.isfinite(float(omega)):
            raise AnalysisError(f"a sine module needs a finite omega, got {omega!r}")
        if gamma is None or not math.isfinite(float(gamma)) or float(gamma) == 0.0:
            raise AnalysisError(f"a sine module needs a finite non-zero gamma, got {gamma!r}")
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise AnalysisError(f"scale must be a number, got {scale!r}") from None
    if not math.isfinite(scale):
        raise AnalysisError(f"scale must be finite, got {scale!r}")
    factor = scale / float(gamma) if sine else scale

    out: dict = {}
    full = _factors((B, A), "(B, A)") if have_full else None
    quant = _factors((B_q, A_q), "(B_q, A_q)") if have_q else None
    if full is not None and quant is not None:
        if full[0].shape != quant[0].shape or full[1].shape != quant[1].shape:
            raise AnalysisError(
                f"quantized factors have shapes B_q {tuple(quant[0].shape)}, A_q {tuple(quant[1].shape)}"
                f" but the reference has B {tuple(full[0].shape)}, A {tuple(full[1].shape)}"
            )
    if full is not None:
        out["sr_lowrank"] = stable_rank(full)
    if quant is not None:
        out["sr_lowrank_q"] = stable_rank(quant)

    if sine:
        S = _sine_tensor(full[0], full[1], omega) if full is not None else None
        if S is not None:
            out["sr_sine"] = stable_rank(S, tol=tol, seed=seed)
        Sq = _sine_tensor(quant[0], quant[1], omega) if quant is not None else None
        if Sq is not None:
            out["sr_sine_q"] = stable_rank(Sq, tol=tol, seed=seed)
        if S is not None and Sq is not None:
            ref = math.sqrt(_fro2(S))
            Sq.sub_(S.to(Sq.dtype))
            diff = math.sqrt(_fro2(Sq))
            del Sq, S
        else:
            ref = diff = None
    elif full is not None and quant is not None:
        ref = _frob_lowrank(*full)
        diff = _frob_diff_lowrank(full[0], full[1], quant[0], quant[1])
    else:
        ref = diff = None

    if ref is not None and diff is not None:
        out["dw_norm"] = abs(factor) * ref
        out["abs_error"] = abs(factor) * diff
        if ref == 0.0:
            out["rel_error"] = 0.0 if diff == 0.0 else math.inf
        else:
            out["rel_error"] = diff / ref
    return out


# --------------------------------------------------------------------------------------------------
# Bjøntegaard-Delta analysis
# --------------------------------------------------------------------------------------------------

#: Interpolation methods supported by ``bjontegaard`` 1.3 (``bjontegaard/interpolation.py``).
INTERPOLATIONS = ("akima", "pchip", "cubic")

#: Points per curve required by each interpolation. With 2 points the library silently replaces
#: akima (and pchip degenerates) by a straight line, i.e. not the method asked for; a cubic
#: polynomial fit needs 4 points to be determined.
MIN_POINTS = {"akima": 3, "pchip": 3, "cubic": 4}


class RDPoint(NamedTuple):
    """One rate/quality point of a method's curve in a group (e.g. group = bits)."""

    method: str
    group: Any
    rate: float
    quality: float


def _coerce_point(p: Any, index: int) -> RDPoint:
    try:
        if isinstance(p, Mapping):
            method, group, rate, quality = p["method"], p["group"], p["rate"], p["quality"]
        elif all(hasattr(p, k) for k in ("method", "group", "rate", "quality")):
            method, group, rate, quality = p.method, p.group, p.rate, p.quality
        else:
            method, group, rate, quality = p
        return RDPoint(str(method), group, float(rate), float(quality))
    except (KeyError, TypeError, ValueError) as exc:
        raise AnalysisError(
            f"point #{index}: expected (method, group, rate, quality), got {p!r} ({exc})"
        ) from None


def read_points_csv(path: str | Path) -> list[RDPoint]:
    """Read RD points from a CSV file with a header naming the columns ``method, group, rate, quality``.

    Column order is free, extra columns are ignored, blank lines and lines starting with ``#`` are
    skipped. ``rate`` may be in any unit (bytes, KB, MB, bits/param ...) as long as it is the same for
    all points; ``group`` is kept as a string.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise AnalysisError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise AnalysisError(f"{path}: not a UTF-8 text (CSV) file") from None
    lines = [
        (no, line)
        for no, line in enumerate(text.splitlines(), 1)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not lines:
        raise AnalysisError(f"{path}: no header and no points")
    header_no, header_line = lines[0]
    header = [h.strip().lower() for h in next(csv.reader([header_line]))]
    need = ("method", "group", "rate", "quality")
    missing = [c for c in need if c not in header]
    if missing:
        raise AnalysisError(
            f"{path}:{header_no}: header must name the columns {', '.join(need)};"
            f" missing {', '.join(missing)} (found {', '.join(header) or 'nothing'})"
        )
    col = {c: header.index(c) for c in need}
    points: list[RDPoint] = []
    for (no, _), row in zip(lines[1:], csv.reader(line for _, line in lines[1:])):
        if len(row) < len(header):
            raise AnalysisError(f"{path}:{no}: expected {len(header)} fields, got {len(row)}")
        method = row[col["method"]].strip()
        group = row[col["group"]].strip()
        if not method or not group:
            raise AnalysisError(f"{path}:{no}: empty method or group")
        vals = {}
        for c in ("rate", "quality"):
            s = row[col[c]].strip()
            try:
                vals[c] = float(s)
            except ValueError:
                raise AnalysisError(f"{path}:{no}: {c} {s!r} is not a number") from None
        points.append(RDPoint(method, group, vals["rate"], vals["quality"]))
    if not points:
        raise AnalysisError(f"{path}: header only, no points")
    return points


def _ordered_unique(items: Iterable) -> list:
    seen: dict = {}
    for it in items:
        seen.setdefault(it, None)
    return list(seen)


def _validate_curve(pts: Sequence[RDPoint], group: Any, method: str, interp: str):
    """Sorted (rates, qualities) of one curve, or AnalysisError saying what is wrong with it."""
    where = f"group {group!r}, method {method!r}"
    need = MIN_POINTS[interp]
    if len(pts) < need:
        raise AnalysisError(
            f"{where}: {len(pts)} point(s), but {interp!r} interpolation needs at least {need}"
        )
    rates = np.array([p.rate for p in pts], dtype=np.float64)
    quals = np.array([p.quality for p in pts], dtype=np.float64)
    if not np.all(np.isfinite(rates)) or not np.all(np.isfinite(quals)):
        raise AnalysisError(f"{where}: rate and quality must be finite numbers")
    if np.any(rates <= 0):
        bad = rates[rates <= 0][0]
        raise AnalysisError(f"{where}: rates must be positive (BD works on log rate), got {bad:g}")
    order = np.argsort(rates, kind="stable")
    rates, quals = rates[order], quals[order]
    dup = np.nonzero(np.diff(rates) == 0)[0]
    if dup.size:
        raise AnalysisError(f"{where}: duplicate rate {rates[dup[0]]:g}")
    bad = np.nonzero(np.diff(quals) <= 0)[0]
    if bad.size:
        i = bad[0]
        raise AnalysisError(
            f"{where}: quality does not increase strictly with rate (rate {rates[i]:g} -> quality"
            f" {quals[i]:g}, rate {rates[i + 1]:g} -> quality {quals[i + 1]:g}); BD-rate needs a"
            " monotone rate/quality curve"
        )
    return rates, quals


def _call_bd(fn, args, interp: str, min_overlap: float, where: str, axis: str):
    """Call a bjontegaard function, turning its warnings into messages that say where they came from."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            value = fn(*args, interp, require_matching_points=False, min_overlap=min_overlap)
        except ValueError as exc:
            raise AnalysisError(f"{where}: bjontegaard rejected the curves: {exc}") from None
    notes = [f"{where}: {axis}: {w.message}" for w in caught]
    value = float(value)
    if not math.isfinite(value):
        detail = "; ".join(str(w.message) for w in caught) or "non-finite result"
        raise AnalysisError(f"{where}: cannot compute BD along {axis}: {detail}")
    return value, notes


def bd_table(
    points: Iterable[Any],
    *,
    anchor: str,
    method: str = "akima",
    min_overlap: float = 0.75,
    errors: str = "raise",
) -> list[dict]:
    """Bjøntegaard-Delta of every method against ``anchor``, per group.

    ``points`` are records ``(method, group, rate, quality)`` (tuples, :class:`RDPoint`, mappings or
    objects with those attributes). Within each group every curve is sorted by rate; it must have at
    least :data:`MIN_POINTS` ``[method]`` points, positive distinct rates and a quality that increases
    strictly with rate. ``method`` is the interpolation: one of :data:`INTERPOLATIONS`.

    Returns one row per (group, non-anchor method), groups and methods in order of first appearance::

        {"group", "method", "anchor", "interpolation",
         "bd_rate":    average rate difference at equal quality, percent (negative = fewer bytes),
         "bd_quality": average quality difference at equal rate, in the quality's own unit,
         "n_anchor", "n_test", "warnings": [...]}

    computed with ``bjontegaard.bd_rate`` and ``bjontegaard.bd_psnr`` (``require_matching_points``
    off; ``min_overlap`` passed through). A relative overlap of the curves below ``min_overlap``
    gives an :class:`AnalysisWarning` naming the group and method (and is recorded in the row's
    ``"warnings"``); no overlap at all is an error. Errors (:class:`AnalysisError`, naming the group
    and the method) are raised when ``errors="raise"``; with ``errors="warn"`` the affected rows are
    left out and an :class:`AnalysisWarning` says why. The table never contains NaN.
    """
    if method not in INTERPOLATIONS:
        raise AnalysisError(
            f"unknown interpolation {method!r}; bjontegaard supports {', '.join(INTERPOLATIONS)}"
        )
    if errors not in ("raise", "warn"):
        raise AnalysisError(f"errors must be 'raise' or 'warn', got {errors!r}")
    try:
        import bjontegaard as bd
    except ImportError:
        raise AnalysisError(
            "BD analysis needs the 'bjontegaard' package (pip install -e '.[analysis]' in a checkout)"
        ) from None

    pts = [_coerce_point(p, i) for i, p in enumerate(points)]
    if not pts:
        raise AnalysisError("no RD points given")
    methods = _ordered_unique(p.method for p in pts)
    if anchor not in methods:
        raise AnalysisError(f"anchor {anchor!r} is not among the methods: {', '.join(methods)}")
    if len(methods) < 2:
        raise AnalysisError(f"only the anchor {anchor!r} is present: nothing to compare")

    def fail(msg: str) -> None:
        if errors == "raise":
            raise AnalysisError(msg)
        warnings.warn(msg + " (row left out)", AnalysisWarning, stacklevel=3)

    rows: list[dict] = []
    for group in _ordered_unique(p.group for p in pts):
        in_group = [p for p in pts if p.group == group]
        curves = {m: [p for p in in_group if p.method == m] for m in _ordered_unique(p.method for p in in_group)}
        tests = [m for m in curves if m != anchor]
        if anchor not in curves:
            for m in tests:
                fail(f"group {group!r}, method {m!r}: the anchor {anchor!r} has no points in this group")
            continue
        try:
            ar, aq = _validate_curve(curves[anchor], group, anchor, method)
        except AnalysisError as exc:
            for m in tests or [anchor]:
                fail(f"{exc} (anchor of method {m!r})" if m != anchor else str(exc))
            continue
        for m in tests:
            where = f"group {group!r}, method {m!r} vs {anchor!r} ({method})"
            try:
                tr, tq = _validate_curve(curves[m], group, m, method)
                rate, notes_r = _call_bd(bd.bd_rate, (ar, aq, tr, tq), method, min_overlap, where, "quality")
                qual, notes_q = _call_bd(bd.bd_psnr, (ar, aq, tr, tq), method, min_overlap, where, "rate")
            except AnalysisError as exc:
                fail(str(exc))
                continue
            for note in notes_r + notes_q:
                warnings.warn(note, AnalysisWarning, stacklevel=2)
            rows.append(
                {
                    "group": group,
                    "method": m,
                    "anchor": anchor,
                    "interpolation": method,
                    "bd_rate": rate,
                    "bd_quality": qual,
                    "n_anchor": int(ar.size),
                    "n_test": int(tr.size),
                    "warnings": notes_r + notes_q,
                }
            )
    return rows


def plot_rd(
    points: Iterable[Any],
    path: str | Path,
    *,
    rows: Sequence[Mapping] | None = None,
    title: str | None = None,
    rate_label: str = "rate",
    quality_label: str = "quality",
    dpi: int = 120,
) -> Path:
    """Write a PNG of the rate/quality curves: one panel per group, rate on a log axis.

    Each method keeps its colour and marker in every panel. When ``rows`` (from :func:`bd_table`)
    are given, the legend labels carry the BD-rate and BD-quality of each method. Returns the path.
    """
    try:
        from matplotlib import ticker
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise AnalysisError("plotting needs matplotlib (pip install -e '.[analysis]' in a checkout)") from None

    pts = [_coerce_point(p, i) for i, p in enumerate(points)]
    if not pts:
        raise AnalysisError("no RD points to plot")
    bad = [p for p in pts if not (math.isfinite(p.rate) and p.rate > 0 and math.isfinite(p.quality))]
    if bad:
        raise AnalysisError(
            f"cannot plot group {bad[0].group!r}, method {bad[0].method!r}: rate must be positive"
            f" and finite on a log axis (got rate {bad[0].rate:g}, quality {bad[0].quality:g})"
        )
    path = Path(path)
    if not path.parent.is_dir():
        raise AnalysisError(f"cannot write {path}: directory {path.parent} does not exist")
    groups = _ordered_unique(p.group for p in pts)
    methods = _ordered_unique(p.method for p in pts)
    colours = [f"C{i % 10}" for i in range(len(methods))]
    markers = "osD^vP*Xh<>"
    style = {m: (colours[i], markers[i % len(markers)]) for i, m in enumerate(methods)}
    bd_of = {(r["group"], r["method"]): r for r in (rows or [])}

    n = len(groups)
    ncols = n if n <= 3 else math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.4 * nrows), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for k, group in enumerate(groups):
        ax = axes[k // ncols][k % ncols]
        for m in methods:
            cur = sorted((p for p in pts if p.group == group and p.method == m), key=lambda p: p.rate)
            if not cur:
                continue
            label = m
            r = bd_of.get((group, m))
            if r is not None:
                label = f"{m}  (BD-rate {r['bd_rate']:+.1f}%, BD-q {r['bd_quality']:+.2f})"
            colour, marker = style[m]
            ax.plot([p.rate for p in cur], [p.quality for p in cur], color=colour, marker=marker,
                    linewidth=1.4, markersize=5, label=label)
        ax.set_xscale("log")
        # Ticks at 1, 2, 5 x 10^k labelled as plain numbers: readable over the short rate ranges
        # typical of RD curves (one or two decades), where default log labels collide.
        ax.xaxis.set_major_locator(ticker.LogLocator(base=10.0, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_title(f"group {group}")
        ax.set_xlabel(f"{rate_label} (log scale)")
        ax.set_ylabel(quality_label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for k in range(n, nrows * ncols):
        axes[k // ncols][k % ncols].set_visible(False)
    if title:
        fig.suptitle(title)
    try:
        fig.savefig(path, format="png")
    except OSError as exc:
        raise AnalysisError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path
