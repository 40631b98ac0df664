"""Curve arithmetic for the peer comparison: Pareto fronts and bytes at equal distortion.

A point is ``(bytes, distortion)`` with lower distortion better (relative ΔW error, or held-out
loss). Between two measured points of a front, ``log(bytes)`` is interpolated linearly in the
distortion's log (``log_d=True``: errors span decades) or in the distortion itself (losses).
Nothing is extrapolated: a distortion outside a front's measured range gives ``None``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

__all__ = ["pareto_front", "bytes_at", "equal_distortion_ratio", "smallest_within"]


def pareto_front(points: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats in both bytes and distortion, by bytes ascending (so
    distortion strictly descending)."""
    front: list[tuple[float, float]] = []
    for b, d in sorted(points, key=lambda p: (p[0], p[1])):
        if not front or d < front[-1][1]:
            front.append((float(b), float(d)))
    return front


def _t(d: float, log_d: bool) -> float:
    return math.log(d) if log_d else d


def bytes_at(front: Sequence[tuple[float, float]], d: float, *, log_d: bool = True, rtol: float = 1e-9) -> float | None:
    """Bytes the front needs for distortion ``d`` (``None`` outside its range). ``front`` as
    :func:`pareto_front` returns it. A distortion within ``rtol`` of a point's is that point."""
    if not front:
        return None
    for b, dd in front:
        if abs(dd - d) <= rtol * max(abs(d), abs(dd)):
            return b
    if log_d and d <= 0:
        return None
    for (b0, d0), (b1, d1) in zip(front, front[1:]):
        if d1 <= d <= d0:
            if log_d and d1 <= 0:
                return None
            t = (_t(d, log_d) - _t(d0, log_d)) / (_t(d1, log_d) - _t(d0, log_d))
            return math.exp(math.log(b0) + t * (math.log(b1) - math.log(b0)))
    return None


def equal_distortion_ratio(bytes_a: float, d_a: float, front_b: Sequence[tuple[float, float]], *,
                           log_d: bool = True) -> float | None:
    """``bytes_a`` ÷ the bytes front ``b`` needs at distortion ``d_a`` (< 1: ``a`` is smaller)."""
    b = bytes_at(front_b, d_a, log_d=log_d)
    return None if b is None else bytes_a / b


def smallest_within(points: Iterable[tuple[float, float]], d: float, rtol: float = 1e-9) -> float | None:
    """Bytes of the smallest measured point with distortion ≤ ``d`` (a setting that exists, unlike
    an interpolated one: deltacodec has none between 8 and 16 bits); ``None`` if there is none."""
    ok = [b for b, dd in points if dd <= d + rtol * abs(d)]
    return min(ok) if ok else None
