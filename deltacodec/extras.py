"""Optional dependencies: which ``pip install 'deltacodec[EXTRA]'`` provides each, and the
one-line error that says so.

The core (encode, decode, inspect, verify of safetensors adapters) needs numpy, msgpack,
zstandard and kmeans1d only. torch is needed by apply, ``.bin`` files and the sine training
layer; the rest by what the table says.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["EXTRA_OF", "install_hint", "require"]

# top-level module -> the extra that installs it
EXTRA_OF = {
    "torch": "torch",
    "triton": "triton",
    "transformers": "train",
    "peft": "train",
    "diffusers": "diffusers",
    "matplotlib": "analysis",
    "bjontegaard": "analysis",
}


def install_hint(module: str | None) -> str | None:
    """``pip install 'deltacodec[EXTRA]'`` for a missing top-level ``module``, or None."""
    extra = EXTRA_OF.get((module or "").split(".")[0])
    return f"pip install 'deltacodec[{extra}]'" if extra else None


def require(module: str, what: str) -> ModuleType:
    """Import ``module``, or raise ImportError: "``what`` needs ``module``, which is not
    installed: pip install 'deltacodec[EXTRA]'"."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] != module.split(".")[0]:
            raise  # the module is there, something it imports is not: let that say so
        hint = install_hint(module) or f"pip install {module}"
        raise ImportError(f"{what} needs {module}, which is not installed: {hint}") from None
