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


class SldLimitError(SldFormatError):
    """A file asks for more than a reader's limit allows (decoded bytes, entry counts, nesting
    depth, zstd window). ``limit`` is the limit in force, ``requested`` what the file asks for;
    a caller that trusts the file can raise the limit (``max_decoded_bytes``)."""

    def __init__(self, message: str, *, limit: int, requested: int) -> None:
        super().__init__(message)
        self.limit = limit
        self.requested = requested


class AdapterError(SldError, ValueError):
    """An input adapter cannot be encoded: missing A or B, rank mismatch, NaN/Inf, empty, ..."""


class EncodeError(SldError, ValueError):
    """Encoding options are invalid (bits out of range, unknown quantizer, bad omega/gamma)."""


class DecodeError(SldError, ValueError):
    """A decoded adapter cannot be written as asked: a value overflows the requested dtype,
    or the decode options are invalid."""


class OutputError(SldError, ValueError):
    """An output path is refused or could not be written: it exists (without ``force``), it is
    or lies inside one of the inputs, or the write failed (nothing partial is left behind)."""


class DeltacodecWarning(UserWarning):
    """Something the user should know that does not stop the operation (a config value that is
    ignored, tensors that ``apply`` will refuse, a delta stacked on a weight already patched)."""


class ApplyError(SldError, RuntimeError):
    """Patching a model failed: missing or mismatched modules, or a failure midway (rolled back)."""
