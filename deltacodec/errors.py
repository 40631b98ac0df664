"""The one exception hierarchy of deltacodec.

Every failure the library reports on purpose is an :class:`SldError`. Callers that only care
whether an operation failed catch ``SldError``; the subclasses say what kind of failure it was.
Messages name the file, the offset, tensor or key, and what was expected.
"""

from __future__ import annotations

from typing import Sequence


def preview(items: Sequence[str], sep: str = ", ", limit: int = 10) -> str:
    """The first ``limit`` items joined by ``sep``, with " ..." when there are more: long lists of
    names stay readable in a one-line error message."""
    return sep.join(items[:limit]) + (" ..." if len(items) > limit else "")


class SldError(Exception):
    """Base class of every error raised by deltacodec on purpose."""


class SldFormatError(SldError, ValueError):
    """An ``.sld`` file is malformed: bad magic, truncated, inconsistent header, bad section."""


class SldVersionError(SldFormatError):
    """The container version is not one this reader supports (e.g. a file from a newer writer)."""

    def __init__(self, message: str, *, found: int, supported: tuple[int, ...]) -> None:
        super().__init__(message)
        self.found = found
        self.supported = supported


class SldChecksumError(SldFormatError):
    """A header or section failed its CRC-32 check: the bytes were altered after writing."""


class AdapterError(SldError, ValueError):
    """An input adapter cannot be encoded: missing A or B, rank mismatch, NaN/Inf, empty, ..."""


class EncodeError(SldError, ValueError):
    """Encoding options are invalid (bits out of range, unknown quantizer, bad omega/gamma)."""


class ApplyError(SldError, RuntimeError):
    """Patching a model failed: missing or mismatched modules, or a failure midway (rolled back)."""
