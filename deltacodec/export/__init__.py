"""Writing a decoded ``.sld`` in another program's adapter format: one module per format.

``codec.decode`` writes PEFT's layout itself; every other format is a module here with one
entry point, ``export(f, out, *, dtype, force, progress, **options) -> list[str]`` (the paths
written), and a ``SUFFIX`` for the default output name. Formats are imported on use, so an
optional package a format needs (``gguf``) is only required when that format is asked for.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Callable

from ..errors import DecodeError
from ..format import SldFile

__all__ = ["FORMATS", "export", "default_output"]

Progress = Callable[[int, int, str], None]

# format name -> module implementing it ("adapter", the layout the file was encoded from, is
# codec.decode's own path).
_EXPORTERS = {"gguf": "deltacodec.export.gguf"}
FORMATS = ("adapter", *_EXPORTERS)


def _module(fmt: str) -> Any:
    if fmt not in _EXPORTERS:
        raise DecodeError(f"format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    return importlib.import_module(_EXPORTERS[fmt])


def default_output(src: str, fmt: str) -> str:
    """Where ``fmt`` is written without an explicit output: beside the ``.sld``, its suffix."""
    return os.path.splitext(src)[0] + _module(fmt).SUFFIX


def export(
    fmt: str,
    path: str | os.PathLike[str] | SldFile,
    out: str | os.PathLike[str] | None = None,
    *,
    dtype: str = "fp32",
    force: bool = False,
    max_decoded_bytes: int | None = None,
    progress: Progress | None = None,
    **options: Any,
) -> list[str]:
    """Write the ``.sld`` at ``path`` in format ``fmt``; returns the paths written.

    ``options`` are the format's own (gguf: ``arch``, ``base_config``). Outputs go through
    :mod:`deltacodec.outputs`: an existing ``out`` is refused unless ``force``; an ``out`` that
    is an input is always refused; the file appears whole or not at all.
    """
    mod = _module(fmt)
    if isinstance(path, SldFile):
        target = os.fspath(out) if out is not None else default_output(path.path, fmt)
        return mod.export(path, target, dtype=dtype, force=force, progress=progress, **options)
    with SldFile(path, max_decoded_bytes=max_decoded_bytes) as f:
        target = os.fspath(out) if out is not None else default_output(f.path, fmt)
        return mod.export(f, target, dtype=dtype, force=force, progress=progress, **options)
