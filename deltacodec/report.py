"""``sld encode --report``: how far the quantized adapter is from the original, in weight space."""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np

from .adapter import read_adapter
from .errors import AdapterError, DeltacodecWarning
from .format import SldFile

__all__ = ["weight_errors", "weight_error_report"]


def weight_errors(
    src: str | os.PathLike[str], sld_path: str | os.PathLike[str], *, max_decoded_bytes: int | None = None, **overrides: Any
) -> list[tuple[str, float, float]]:
    """Per module: (name, ‖ΔW_q − ΔW‖_F / ‖ΔW‖_F, bits per parameter of its two sections).

    ``src`` is the adapter ``sld_path`` was encoded from, read with the same ``overrides``
    (omega, gamma, alpha) as the encode; a module of ``src`` missing from the file is an
    :class:`AdapterError`.
    """
    from .analysis import relative_weight_error

    with warnings.catch_warnings():
        # encode has just read the same adapter and said all there is to say about it.
        warnings.simplefilter("ignore", DeltacodecWarning)
        adapter = read_adapter(src, **overrides)
    f = SldFile(sld_path, max_decoded_bytes=max_decoded_bytes)
    names = {e.name for e in f.modules}
    rows = []
    for m in adapter.modules:
        if m.name not in names:
            raise AdapterError(f"{f.path}: no module '{m.name}' of {os.fspath(src)}: not encoded from this adapter?")
        e = f.module(m.name)
        Aq, Bq = f.dequantize(m.name)
        rel = relative_weight_error(m.A, m.B, Aq, Bq, omega=e.omega, sine=e.sine)
        rows.append((m.name, rel, 8.0 * f.nbytes_module(m.name) / (m.A.size + m.B.size)))
    return rows


def weight_error_report(
    src: str | os.PathLike[str], sld_path: str | os.PathLike[str], *, max_decoded_bytes: int | None = None, **overrides: Any
) -> str:
    """:func:`weight_errors` as a table, one module a line, and a summary line."""
    rows = weight_errors(src, sld_path, max_decoded_bytes=max_decoded_bytes, **overrides)
    w = max([len(r[0]) for r in rows] + [6])
    lines = [f"{'module':<{w}}  {'rel. error':>10}  {'bits/param':>10}"]
    lines += [f"{n:<{w}}  {e:>10.4f}  {b:>10.3f}" for n, e, b in rows]
    errs = np.array([r[1] for r in rows])
    if errs.size:
        lines.append(
            f"{len(rows)} modules: relative weight-space error mean {errs.mean():.4f}, "
            f"median {np.median(errs):.4f}, max {errs.max():.4f}"
        )
    else:
        lines.append("no LoRA modules: every tensor is stored losslessly")
    return "\n".join(lines)
