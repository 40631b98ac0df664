"""``sld encode --report``: how far the quantized adapter is from the original, in weight space."""

from __future__ import annotations

import numpy as np

from .adapter import read_adapter
from .format import SldFile

__all__ = ["weight_errors", "weight_error_report"]


def weight_errors(src, sld_path, **overrides) -> list[tuple[str, float, float]]:
    """Per module: (name, ‖ΔW_q − ΔW‖_F / ‖ΔW‖_F, bits per parameter of its two sections)."""
    from .analysis import relative_weight_error

    adapter = read_adapter(src, **overrides)
    f = SldFile(sld_path)
    rows = []
    for m in adapter.modules:
        e = f.module(m.name)
        Aq, Bq = f.dequantize(m.name)
        rel = relative_weight_error(m.A, m.B, Aq, Bq, omega=e.omega, sine=e.sine)
        rows.append((m.name, rel, 8.0 * f.nbytes_module(m.name) / (m.A.size + m.B.size)))
    return rows


def weight_error_report(src, sld_path, **overrides) -> str:
    rows = weight_errors(src, sld_path, **overrides)
    w = max([len(r[0]) for r in rows] + [6])
    lines = [f"{'module':<{w}}  {'rel. error':>10}  {'bits/param':>10}"]
    lines += [f"{n:<{w}}  {e:>10.4f}  {b:>10.3f}" for n, e, b in rows]
    errs = np.array([r[1] for r in rows])
    if errs.size:
        lines.append(
            f"{len(rows)} modules: relative weight-space error mean {errs.mean():.4f}, "
            f"median {np.median(errs):.4f}, max {errs.max():.4f}"
        )
    return "\n".join(lines)
