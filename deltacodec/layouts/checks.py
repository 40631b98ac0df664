"""Numeric checks every layout applies to a module before it becomes an :class:`AdapterModule`:
factors that fit float32 (the codec stores them from float32), a scale that does, and a ΔW that
can be finite in float32, where apply forms it."""

from __future__ import annotations

import numpy as np

from ..errors import AdapterError
from .base import AdapterModule
from .peft_config import show_name

__all__ = ["f32_finite", "as_float32", "check_delta_finite", "make_module"]


def f32_finite(x: float) -> bool:
    with np.errstate(over="ignore"):
        return bool(np.isfinite(np.float32(x)))


def _product_bound(A: np.ndarray, B: np.ndarray) -> float:
    """An upper bound on max|B@A| in O(r·(in+out)): |Σ_k B_ik A_kj| <= Σ_k |B_ik|·max_j|A_kj|."""
    return float((np.abs(B).astype(np.float64) @ np.abs(A).astype(np.float64).max(axis=1)).max())


def _delta_peaks(A: np.ndarray, B: np.ndarray, omega: float | None) -> tuple[float, float]:
    """(max|B@A|, max|sin(ω·B@A)|) exactly, in float64, a block of rows at a time."""
    A64 = A.astype(np.float64)
    rows = max(1, (1 << 22) // max(1, A.shape[1]))
    peak = peak_sin = 0.0
    for i in range(0, B.shape[0], rows):
        p = B[i : i + rows].astype(np.float64) @ A64
        peak = max(peak, float(np.abs(p).max()))
        if omega is not None:
            with np.errstate(over="ignore", invalid="ignore"):
                peak_sin = max(peak_sin, float(np.nan_to_num(np.abs(np.sin(omega * p)), nan=1.0).max()))
    return peak, peak_sin


def check_delta_finite(mod: str, A: np.ndarray, B: np.ndarray, scale: float, omega: float | None,
                       gamma: float | None, path: str) -> None:
    """Refuse a module whose ΔW cannot be finite in float32, where apply forms it.

    B@A is summed in float32 in an order apply's backend chooses, so every partial sum must be
    finite: the bound Σ_k |B_ik|·max_j|A_kj| must be. The factors applied after it (scale, ω,
    1/γ) are checked on the exact peak when the bound alone would overflow, so a large scale
    on a small product is not refused for the bound's slack.
    """
    bound = _product_bound(A, B)
    if not f32_finite(bound):
        raise AdapterError(
            f"{path}: module '{mod}': the terms of B@A add up to {bound:.3g} (Σ_k |B_ik|·|A_kj|): beyond "
            "float32, where apply forms B@A"
        )
    if omega is None:
        if f32_finite(bound * abs(scale)):
            return
        peak, _ = _delta_peaks(A, B, None)
        if f32_finite(peak * abs(scale)):
            return
        raise AdapterError(
            f"{path}: module '{mod}': ΔW = scale·B@A reaches {peak * abs(scale):.3g} (scale {scale:.6g}, "
            f"max|B@A| {peak:.3g}): beyond float32, so it cannot become a finite weight"
        )
    ratio = abs(scale) / gamma  # type: ignore[operator]
    if f32_finite(bound * abs(omega)) and f32_finite(ratio):
        return
    peak, peak_sin = _delta_peaks(A, B, omega)
    if not f32_finite(peak * abs(omega)):
        raise AdapterError(
            f"{path}: module '{mod}': ω·B@A reaches {peak * abs(omega):.3g} (ω {omega:.6g}): beyond float32, "
            "so sin(ω·B@A) cannot be finite"
        )
    if not f32_finite(ratio * peak_sin):
        raise AdapterError(
            f"{path}: module '{mod}': ΔW = scale·sin(ω·B@A)/γ reaches {ratio * peak_sin:.3g} "
            f"(scale {scale:.6g}, γ {gamma:.6g}): beyond float32"
        )


def as_float32(key: str, arr: np.ndarray, path: str) -> np.ndarray:
    with np.errstate(over="ignore"):
        out = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(out).all():
        raise AdapterError(
            f"{path}: tensor {show_name(key)} has values up to {float(np.abs(arr).max()):.3g}, beyond float32 (a LoRA factor is stored from float32)"
        )
    return out


def make_module(
    name: str,
    a: tuple[str, np.ndarray],
    b: tuple[str, np.ndarray],
    scale: float,
    *,
    path: str,
    omega: float | None = None,
    gamma: float | None = None,
    fan_in_fan_out: bool = False,
    weight_shape: tuple[int, ...] | None = None,
) -> AdapterModule:
    """An :class:`AdapterModule` from (key, A as r×in) and (key, B as out×r), factors converted
    to float32 and ΔW checked finite; ``omega`` given makes it a sine module."""
    (ka, A), (kb, B) = a, b
    A32, B32 = as_float32(ka, A, path), as_float32(kb, B, path)
    check_delta_finite(name, A32, B32, scale, omega, gamma, path)
    return AdapterModule(
        name=name, A=A32, B=B32, scale=scale, sine=omega is not None, omega=omega,
        gamma=gamma if omega is not None else None, fan_in_fan_out=fan_in_fan_out, weight_shape=weight_shape,
    )
