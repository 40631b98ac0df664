"""Argument types of the ``sld`` verbs: a value they reject is a usage error (exit status 2,
argparse's message), caught before any file is read."""

from __future__ import annotations

import argparse
import math
import re
from typing import Callable

__all__ = ["size_arg", "gamma_arg", "finite_arg", "positive_arg", "int_range_arg", "bits_arg", "level_arg",
           "limit_help"]


def _float(text: str) -> float:
    """``float(text)``, NaN for text that is not a number (each caller refuses NaN)."""
    try:
        return float(text)
    except ValueError:
        return math.nan


def gamma_arg(text: str) -> float | str:
    """γ for --gamma: a positive finite number, or 'sqrt-in' (γ = sqrt(in_features))."""
    if text == "sqrt-in":
        return text
    v = _float(text)
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"gamma must be a positive finite number or 'sqrt-in', got '{text}'")
    return v


def finite_arg(what: str, *, nonzero: bool = False) -> Callable[[str], float]:
    """A parser of finite floats (NaN and ±Inf are refused; with ``nonzero`` also 0) for the
    option named ``what``."""

    def parse(text: str) -> float:
        v = _float(text)
        if not math.isfinite(v) or (nonzero and v == 0):
            kind = "a finite non-zero number" if nonzero else "a finite number"
            raise argparse.ArgumentTypeError(f"{what} must be {kind}, got '{text}'")
        return v

    parse.__name__ = what  # argparse names the type in some messages
    return parse


def positive_arg(what: str) -> Callable[[str], float]:
    """A parser of positive finite floats for the option named ``what`` (rate targets)."""

    def parse(text: str) -> float:
        v = _float(text)
        if not (math.isfinite(v) and v > 0):
            raise argparse.ArgumentTypeError(f"{what} must be a positive finite number, got '{text}'")
        return v

    parse.__name__ = what
    return parse


_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
}


def size_arg(text: str) -> int:
    """A byte count as users type it: ``1048576``, ``3MB`` (10^6), ``4GiB`` (2^30), ``1.5GB``."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*", text)
    unit = m and m.group(2).lower()
    if not m or unit not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(
            f"expected a size such as 1048576, 3MB or 4GiB (units B, kB, MB, GB, TB, KiB, MiB, GiB, TiB), got '{text}'"
        )
    value = float(m.group(1)) * _SIZE_UNITS[unit]
    if not math.isfinite(value) or value < 1 or value >= 2**63:
        raise argparse.ArgumentTypeError(f"size must be 1 byte .. 2^63, got '{text}'")
    return int(value)


def int_range_arg(what: str, ok: Callable[[int], bool], expect: str) -> Callable[[str], int]:
    """A parser of integers for which ``ok`` holds; ``expect`` says which in the message."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what}: expected an integer, got '{text}'") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"{what} must be {expect}, got {v}")
        return v

    parse.__name__ = what
    return parse


bits_arg = int_range_arg("bits", lambda v: 1 <= v <= 8 or v in (16, 32), "1..8, 16 or 32")
level_arg = int_range_arg("level", lambda v: 0 <= v <= 22, "0..22")


def limit_help() -> str:
    """Help text of --max-decoded-bytes, with the reader's default limit."""
    from . import format as _format

    default = getattr(_format, "DEFAULT_MAX_DECODED_BYTES", None)
    shown = f"{default / (1 << 30):g} GiB" if default else "the reader's limit"
    return f"refuse a file whose tensors decode to more than SIZE bytes, e.g. 64GiB (default {shown})"
