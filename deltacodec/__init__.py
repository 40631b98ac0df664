"""deltacodec: a codec and file format (``.sld``) for quantized low-rank adapters.

An ``.sld`` file holds, per adapted linear module, the quantized factors Q(A) (r×in) and
Q(B) (out×r) of a LoRA or sine-activated LoRA adapter with what it takes to rebuild
ΔW (out×in) = scale·sin(ω·Q(B)Q(A))/γ (plain LoRA: scale·Q(B)Q(A)).

    >>> import deltacodec
    >>> path = deltacodec.encode("adapter/", bits=3)      # writes adapter.sld
    >>> f = deltacodec.load(path)                          # header only, validated
    >>> A, B = f.dequantize(f.modules[0].name)             # float32 (r×in), (out×r)
    >>> deltacodec.decode(path, "decoded/")                # PEFT layout again

Importing this package loads numpy, msgpack and zstandard only; torch is imported by the
functions that need it.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .adapter import Adapter, AdapterModule, read_adapter
from .codec import decode, encode, load
from .errors import (
    AdapterError,
    ApplyError,
    DecodeError,
    DeltacodecWarning,
    EncodeError,
    OutputError,
    SldChecksumError,
    SldError,
    SldFormatError,
    SldLimitError,
    SldVersionError,
)
from .format import ModuleEntry, SldFile, TensorEntry
from .patch import AppliedAdapter, apply

__all__ = [
    "__version__",
    "encode",
    "decode",
    "load",
    "apply",
    "AppliedAdapter",
    "read_adapter",
    "Adapter",
    "AdapterModule",
    "SldFile",
    "ModuleEntry",
    "TensorEntry",
    "SldError",
    "SldFormatError",
    "SldVersionError",
    "SldChecksumError",
    "SldLimitError",
    "AdapterError",
    "EncodeError",
    "DecodeError",
    "ApplyError",
    "OutputError",
    "DeltacodecWarning",
]
