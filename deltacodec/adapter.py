"""Reading adapters from disk, whatever their layout, and writing them back in PEFT layout.

What an adapter *means* is resolved here, once, into :class:`AdapterModule` records: for every
adapted module its A (r×in), B (out×r), scale, for sine adapters ω and γ, and for a conv kernel
its shape, so the codec below never looks at a config or a layout again.

:func:`read_adapter` finds the weights file, loads it (safetensors without torch; ``.bin`` with
``torch.load(weights_only=True)``), detects its layout (PEFT, diffusers, kohya-ss; see
:mod:`deltacodec.layouts`) or takes the caller's, and lets the layout give it its meaning. Each
layout refuses, with the file and the tensor or key named, everything an ``.sld`` file could not
hold or would hold with a different meaning; what is stored but that ``apply`` cannot honour is
a :class:`DeltacodecWarning`.
"""

from __future__ import annotations

import os

from .layouts import LAYOUT_NAMES
from .layouts import read as _read_layout
from .layouts.base import Adapter, AdapterModule
from .layouts.peft import write_adapter
from .layouts.peft_config import GAMMA_SQRT_IN
from .layouts.tensors import check_tensor_name, load_source

__all__ = ["AdapterModule", "Adapter", "read_adapter", "write_adapter", "check_tensor_name", "GAMMA_SQRT_IN", "LAYOUT_NAMES"]


def read_adapter(
    src: str | os.PathLike[str],
    *,
    omega: float | None = None,
    gamma: float | str | None = None,
    alpha: float | None = None,
    layout: str | None = None,
) -> Adapter:
    """Read a LoRA / SineLoRA adapter: a directory (PEFT's ``adapter_model.*`` with
    ``adapter_config.json``, or diffusers' ``pytorch_lora_weights.*``), a ``.safetensors`` or a
    ``.bin`` file, in PEFT, diffusers or kohya-ss layout.

    ``layout`` (``"peft"``, ``"diffusers"``, ``"kohya"``) overrides detection. ``omega``,
    ``gamma`` (a number > 0, ``"sqrt-in"`` or ``"c*sqrt-in"``) and ``alpha`` override the
    config (an ``alpha`` applies to every module, over ``alpha_pattern`` and kohya's per-module
    alphas). An ``omega`` makes the adapter a sine adapter. The returned adapter's ``layout``
    and ``layout_info`` say what writing it back in its layout needs. Raises
    :class:`AdapterError` with the file and the tensor or key at fault (a file no layout
    recognises: what was expected); warns (:class:`DeltacodecWarning`) about what is stored but
    that ``apply`` cannot honour.
    """
    source = load_source(os.fspath(src))
    return _read_layout(source, layout=layout, omega=omega, gamma=gamma, alpha=alpha)
