"""Side information of container-version-2 tensors (spec/sld-format.md, part 2, section 12).

Two kinds, each a bit string (LSB-first, bitio) padded with zero bits to whole bytes, held in
the header (key ``x`` of a tensor map):

* a *quantized* tensor (``e: "q"``): ``method:1`` (0 = ECSQ, 1 = k-means codebook), the
  frequency table of its indices (freqtable), then the method's parameters. Its section is one
  rANS stream of ``numel`` symbols.
* a *lossless float* tensor (``e: "f"``): ``dtype:2`` (0 = F16, 1 = BF16, 2 = F32: the
  extension ``f32_fields``, which the header's ``required`` must list), then per field stream
  (3 for F16, 2 for BF16, 4 for F32, bytegroup) ``coded:1`` and, when coded, its table. Its section
  is the rANS stream of the coded fields followed by the stored fields (``numel`` bytes each).

Parsing validates everything a decoder needs before it touches the section: the table (sums to
2^P, alphabet within limits), the kernel cap of :data:`MAX_SYMBOLS_Q` symbols for a quantized
tensor, the ECSQ step and offsets, and that every reconstruction value is finite in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import ecsq
from .bitio import BitReader, BitstreamError, BitWriter
from .freqtable import FreqTable

__all__ = ["MAX_SYMBOLS_Q", "QuantSide", "FieldSide", "read_quant", "read_fields", "write_fields",
           "FIELD_DTYPES", "F32_EXTENSION", "SideInfoError"]

# The fused apply kernels read 8-bit index fields: a quantized tensor's alphabet is capped at 256
# symbols (the symbol, index - imin, is the kernel's field value).
MAX_SYMBOLS_Q = 256
FIELD_DTYPES = ("F16", "BF16", "F32")  # dtype codes 0, 1, 2 (3 is an error)
_N_FIELDS = {"F16": 3, "BF16": 2, "F32": 4}
#: The root ``required`` name a file with F32 field streams lists (spec 15).
F32_EXTENSION = "f32_fields"


class SideInfoError(ValueError):
    """Side information that breaks the spec (the container turns it into SldFormatError)."""


@dataclass(frozen=True, eq=False)
class QuantSide:
    """A quantized tensor's decoding facts: the table and the float32 value of every symbol."""

    method: str  # "ecsq" or "kmeans"
    table: FreqTable
    values: np.ndarray  # float32, table.size entries: value of symbol s = index imin + s
    bits: int  # kmeans: the codebook's bits; ecsq: ceil(log2 K), at least 1
    raw: bytes = b""  # the side information as stored: equality is equality of these bytes

    @property
    def nbytes(self) -> int:
        return len(self.raw)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, QuantSide) and self.raw == other.raw

    def __hash__(self) -> int:
        return hash(self.raw)

    @property
    def bound(self) -> float:
        return float(np.max(np.abs(self.values)))


@dataclass(frozen=True, eq=False)
class FieldSide:
    """A lossless float tensor: dtype (F16, BF16, F32) and, per field stream, its table (None:
    stored)."""

    dtype: str
    tables: tuple[FreqTable | None, ...]
    raw: bytes = b""  # the side information as stored: equality is equality of these bytes

    @property
    def stored(self) -> int:
        return sum(1 for t in self.tables if t is None)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FieldSide) and self.raw == other.raw

    def __hash__(self) -> int:
        return hash(self.raw)


def _reader(data: bytes) -> BitReader:
    if len(data) == 0:
        raise SideInfoError("empty side information")
    return BitReader(data)


def _finish(br: BitReader) -> None:
    try:
        br.finish()
    except BitstreamError as exc:
        raise SideInfoError(str(exc)) from None


def read_quant(data: bytes) -> QuantSide:
    """Parse and validate a quantized tensor's side information (raises SideInfoError)."""
    br = _reader(data)
    try:
        method = "kmeans" if br.bits(1) else "ecsq"
        table = FreqTable.read(br)
        if table.size > MAX_SYMBOLS_Q:
            raise SideInfoError(f"alphabet of {table.size} symbols ({table.imin}..{table.imax}), over the "
                                f"cap of {MAX_SYMBOLS_Q} (8-bit kernel fields)")
        if method == "ecsq":
            step_bits, t1, t2 = ecsq.read_params(br)
            with np.errstate(over="ignore", invalid="ignore"):
                values = ecsq.recon_values(table.imin, table.imax, step_bits, t1, t2)
            bits = max(1, math.ceil(math.log2(table.size)))
        else:
            bits = br.bits(3) + 1
            scale_u = br.bits(32)
            cb = np.array([br.bits(16) for _ in range(1 << bits)], dtype=np.uint16)
            if table.imin < 0 or table.imax >= 1 << bits:
                raise SideInfoError(f"k-means indices {table.imin}..{table.imax} outside the "
                                    f"{1 << bits}-entry codebook")
            c16 = cb.view(np.float16)
            if not np.isfinite(c16).all():
                raise SideInfoError("the codebook holds NaN or Inf")
            scale = np.array(scale_u, dtype=np.uint32).view(np.float32)
            if not (np.isfinite(scale) and scale >= 0):
                raise SideInfoError(f"codebook scale {float(scale)!r} is not a finite float32 >= 0")
            with np.errstate(over="ignore", invalid="ignore"):
                full = c16.astype(np.float32) * np.float32(scale)
            values = full[table.imin:table.imax + 1].copy()
    except BitstreamError as exc:
        raise SideInfoError(str(exc)) from None
    _finish(br)
    if not np.isfinite(values).all():
        s = int(np.flatnonzero(~np.isfinite(values))[0])
        raise SideInfoError(f"the value of index {table.imin + s} is not finite in float32")
    return QuantSide(method, table, values.astype(np.float32), bits, bytes(data))


def read_fields(data: bytes) -> FieldSide:
    """Parse a lossless float tensor's side information (raises SideInfoError). Dtype code 2
    (F32) parses here; the header checks that the file lists its extension."""
    br = _reader(data)
    try:
        code = br.bits(2)
        if code >= len(FIELD_DTYPES):
            raise SideInfoError(f"field dtype code {code} is not 0 (F16), 1 (BF16) or 2 (F32)")
        dtype = FIELD_DTYPES[code]
        tables: list[FreqTable | None] = []
        for _ in range(_N_FIELDS[dtype]):
            if br.bits(1):
                t = FreqTable.read(br)
                if t.imin < 0 or t.imax > 255:
                    raise SideInfoError(f"field table alphabet {t.imin}..{t.imax} is not within 0..255")
                tables.append(t)
            else:
                tables.append(None)
    except BitstreamError as exc:
        raise SideInfoError(str(exc)) from None
    _finish(br)
    return FieldSide(dtype, tuple(tables), bytes(data))


def write_fields(dtype: str, tables: list[FreqTable | None]) -> bytes:
    bw = BitWriter()
    bw.bits(FIELD_DTYPES.index(dtype), 2)
    for t in tables:
        bw.bits(0 if t is None else 1, 1)
        if t is not None:
            t.write(bw)
    return bw.getvalue()
