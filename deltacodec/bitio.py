"""Bit-level writer and reader for the compact side information of v2 tensors.

Bits are packed LSB-first: bit ``j`` of the stream is bit ``j % 8`` of byte ``j // 8`` (the
same order as the index streams of :mod:`deltacodec.pack`). A value of ``k`` bits is written
least significant bit first. Unused high bits of the last byte are zero.

``EG0(v)`` (order-0 Exp-Golomb) codes an integer ``v >= 0``: with ``u = v + 1`` and ``m`` the
number of bits of ``u`` after its leading one, it is ``m`` zero bits, a one bit, then the low
``m`` bits of ``u`` (as a ``m``-bit value). Signed integers go through ``zigzag`` first
(0, -1, 1, -2, ... -> 0, 1, 2, 3, ...).

Side information is read from untrusted files: the reader raises :class:`BitstreamError` on
running out of bits and on codes longer than the caller allows, never an IndexError.
"""

from __future__ import annotations

__all__ = ["BitWriter", "BitReader", "BitstreamError", "zigzag", "unzigzag", "eg0_bits"]

# No side-information field needs more than 40 value bits; a longer EG0 prefix is corrupt.
MAX_EG0_PREFIX = 40


class BitstreamError(ValueError):
    """A side-information bit stream is truncated, has a too-long code, or non-zero padding."""


def zigzag(v: int) -> int:
    """Signed -> unsigned: 0, -1, 1, -2, 2 ... -> 0, 1, 2, 3, 4 ..."""
    return 2 * v if v >= 0 else -2 * v - 1


def unzigzag(u: int) -> int:
    """Inverse of :func:`zigzag`."""
    return u >> 1 if u % 2 == 0 else -((u + 1) >> 1)


def eg0_bits(v: int) -> int:
    """Length in bits of ``EG0(v)``."""
    return 2 * (v + 1).bit_length() - 1


class BitWriter:
    """Accumulates bits LSB-first; :meth:`getvalue` returns the bytes (zero-padded)."""

    def __init__(self) -> None:
        self._acc = 0
        self._n = 0

    def __len__(self) -> int:
        """Number of bits written."""
        return self._n

    def bits(self, value: int, k: int) -> None:
        """Write the ``k`` low bits of ``value`` (``0 <= value < 2**k``)."""
        if k < 0 or value < 0 or value >> k:
            raise ValueError(f"{value} does not fit in {k} bits")
        self._acc |= value << self._n
        self._n += k

    def eg0(self, v: int) -> None:
        """Write ``EG0(v)`` for ``v >= 0``."""
        if v < 0:
            raise ValueError(f"EG0 codes non-negative integers, got {v}")
        u = v + 1
        m = u.bit_length() - 1
        self.bits(0, m)
        self.bits(1, 1)
        self.bits(u - (1 << m), m)

    def seg0(self, v: int) -> None:
        """Write a signed integer as ``EG0(zigzag(v))``."""
        self.eg0(zigzag(v))

    def getvalue(self) -> bytes:
        return self._acc.to_bytes((self._n + 7) // 8, "little")


class BitReader:
    """Reads what :class:`BitWriter` wrote; every read is bounds-checked."""

    def __init__(self, data: bytes) -> None:
        self._data = bytes(data)
        self._acc = int.from_bytes(self._data, "little")
        self._total = 8 * len(data)
        self._pos = 0

    def native_explicit(self, k: int, z: int, precision: int, freqs) -> bool | None:
        """Read an explicit table's frequencies with the compiled reader (freqtable's format);
        None when it is unavailable (the caller reads them in Python)."""
        from . import _native

        lib = _native.library()
        if lib is None:
            return None
        import ctypes

        import numpy as np

        pos = ctypes.c_int64(self._pos)
        buf = np.frombuffer(self._data, dtype=np.uint8) if self._data else np.zeros(1, np.uint8)
        rc = lib.sld_read_explicit_freqs(buf.ctypes.data_as(ctypes.c_void_p), len(self._data), ctypes.byref(pos),
                                         k, z, precision, freqs.ctypes.data_as(ctypes.c_void_p))
        if rc == -1:
            raise BitstreamError(f"explicit table runs past the end of its {len(self._data)} bytes")
        if rc == -2:
            raise BitstreamError(f"explicit table has an over-long or too-large frequency near bit {self._pos}")
        if rc == -3:
            raise BitstreamError(f"frequencies exceed 2^{precision} before the implied symbol")
        self._pos = pos.value
        return True

    @property
    def position(self) -> int:
        return self._pos

    @property
    def remaining(self) -> int:
        return self._total - self._pos

    def bits(self, k: int) -> int:
        pos = self._pos
        if pos + k > self._total:
            raise BitstreamError(f"needs {k} more bits at bit {pos}, {self._total - pos} left")
        self._pos = pos + k
        return (self._acc >> pos) & ((1 << k) - 1)

    def eg0(self, max_value: int | None = None) -> int:
        # the prefix length is the position of the next one bit, found on a 64-bit window
        pos = self._pos
        window = (self._acc >> pos) & 0xFFFFFFFFFFFFFFFF
        m = (window & -window).bit_length() - 1 if window else 64
        if m > MAX_EG0_PREFIX:
            raise BitstreamError(f"Exp-Golomb prefix longer than {MAX_EG0_PREFIX} bits at bit {pos}")
        if pos + 2 * m + 1 > self._total:
            raise BitstreamError(f"Exp-Golomb code at bit {pos} runs past the end ({self._total - pos} bits left)")
        self._pos = pos + m + 1
        v = (1 << m) + self.bits(m) - 1
        if max_value is not None and v > max_value:
            raise BitstreamError(f"value {v} at bit {self._pos} exceeds its limit {max_value}")
        return v

    def seg0(self, max_abs: int | None = None) -> int:
        v = unzigzag(self.eg0())
        if max_abs is not None and abs(v) > max_abs:
            raise BitstreamError(f"value {v} at bit {self._pos} exceeds its limit ±{max_abs}")
        return v

    def finish(self) -> None:
        """Require that only zero padding (< 8 bits) is left."""
        rest = self.remaining
        if rest >= 8:
            raise BitstreamError(f"{rest} bits left over after the last field")
        if rest and self.bits(rest) != 0:
            raise BitstreamError("non-zero padding bits after the last field")
