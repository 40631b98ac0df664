"""safetensors files without torch: a streaming writer and a bounded, validating header reader.

The format: an unsigned 64-bit little-endian header length N, N bytes of JSON (padded with
spaces to a multiple of 8), then the data buffer. The JSON maps each tensor name to
``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets into the data buffer, little-endian
values, row-major) and may hold ``"__metadata__"``, a map of strings to strings.

The writer computes the header up front from each tensor's dtype and shape, then writes the
tensors one by one from chunks produced on demand, so peak memory is one tensor (one chunk),
not the file. With ``order="safetensors"`` it lays tensors out as the ``safetensors`` library
does (dtype descending, then name), so a file with at most one metadata key is byte-identical
to ``safetensors.torch.save`` of the same tensors.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Iterable, Mapping

import numpy as np

from .errors import OutputError

__all__ = ["DTYPE_SIZES", "TensorSpec", "StEntry", "StHeader", "write_safetensors", "read_header", "MAX_HEADER_BYTES"]

# Bytes per element of the dtypes this package reads and writes.
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "I64": 8, "U64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1,
}
# The safetensors library's Dtype enum order (it sorts by dtype, descending, then by name).
_DTYPE_RANK = {
    "BOOL": 0, "U8": 4, "I8": 5, "F8_E5M2": 6, "F8_E4M3": 7, "I16": 9, "U16": 10, "F16": 11,
    "BF16": 12, "I32": 13, "U32": 14, "F32": 15, "F64": 17, "I64": 18, "U64": 19,
}
# The safetensors library refuses larger headers; so does this reader, before allocating.
MAX_HEADER_BYTES = 100_000_000
_NUMPY = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2"}


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to write: safetensors ``dtype``, ``shape``, and ``chunks``, a function returning
    its values in row-major order as an iterable of numpy arrays (of ``dtype``'s item size; BF16
    as uint16 bit patterns) or of raw little-endian bytes. ``nbytes`` must be given for dtypes
    not in :data:`DTYPE_SIZES`."""

    dtype: str
    shape: tuple[int, ...]
    chunks: Callable[[], Iterable[Any]]
    nbytes: int | None = None

    @property
    def size(self) -> int:
        if self.nbytes is not None:
            return self.nbytes
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]


def _header_bytes(entries: list[tuple[str, TensorSpec]], metadata: Mapping[str, str] | None) -> bytes:
    head: dict[str, Any] = {}
    if metadata is not None:
        head["__metadata__"] = dict(metadata)
    pos = 0
    for name, spec in entries:
        head[name] = {"dtype": spec.dtype, "shape": [int(d) for d in spec.shape], "data_offsets": [pos, pos + spec.size]}
        pos += spec.size
    text = json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _as_bytes(chunk: Any, dtype: str) -> memoryview | bytes:
    if isinstance(chunk, (bytes, bytearray, memoryview)):
        return memoryview(chunk).cast("B")
    arr = np.asarray(chunk)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    want = _NUMPY.get(dtype)
    if want is not None and arr.dtype != np.dtype(want):
        if arr.dtype.itemsize != np.dtype(want).itemsize or arr.dtype.kind != np.dtype(want).kind:
            raise OutputError(f"a chunk of dtype {arr.dtype} for a {dtype} tensor")
        arr = arr.astype(want)  # byte order only
    return memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))


def write_safetensors(
    fh: BinaryIO,
    tensors: Mapping[str, TensorSpec],
    metadata: Mapping[str, str] | None = None,
    *,
    order: str = "safetensors",
    progress: Callable[[int, int, str], None] | None = None,
) -> None:
    """Write a safetensors file to ``fh``, tensor by tensor (see the module doc).

    ``order``: ``"safetensors"`` (dtype descending, then name: the safetensors library's layout)
    or ``"given"`` (the mapping's order). Raises :class:`OutputError` when a tensor's chunks do
    not add up to its declared size (a bug in the caller: the header is already written; the
    caller's atomic_file/staged_directory discards the partial file).
    """
    items = list(tensors.items())
    if order == "safetensors":
        items.sort(key=lambda kv: (-_DTYPE_RANK.get(kv[1].dtype, -1), kv[0]))
    elif order != "given":
        raise OutputError(f"order must be 'safetensors' or 'given', got {order!r}")
    fh.write(_header_bytes(items, metadata))
    for i, (name, spec) in enumerate(items):
        if progress:
            progress(i, len(items), name)
        written = 0
        for chunk in spec.chunks():
            buf = _as_bytes(chunk, spec.dtype)
            written += buf.nbytes
            if written > spec.size:
                break
            fh.write(buf)
        if written != spec.size:
            raise OutputError(f"tensor '{name}': its chunks hold {written} bytes, the header declares {spec.size}")
    if progress:
        progress(len(items), len(items), "")


# ----------------------------------------------------------------------------------------------
# Reading a header


@dataclass(frozen=True)
class StEntry:
    """One tensor of a safetensors file: dtype, shape and absolute byte range in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class StHeader:
    """A validated safetensors header: entries in data order, metadata, and the data start."""

    path: str
    entries: list[StEntry]
    metadata: dict[str, str] | None
    data_start: int
    file_size: int


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def read_header(path: str, fail: Callable[[str], Exception]) -> StHeader:
    """Read and check the header of the safetensors file ``path``, bounded before allocating.

    Every problem raises ``fail(message)``, the message naming what was expected: a file too
    short or empty, a header length beyond the file or the 100 MB cap, a header that is not a
    JSON object of the documented shape (a key twice included), a tensor whose byte range does
    not match its dtype and shape or runs past the end of the file (truncated), two tensors whose
    byte ranges overlap.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            pre = fh.read(8)
            if size == 0:
                raise fail("is empty (0 bytes), expected a safetensors file")
            if len(pre) < 8:
                raise fail(f"is {size} bytes: too short for a safetensors file (8-byte header length, then the header)")
            (n,) = struct.unpack("<Q", pre)
            if n == 0 or n > MAX_HEADER_BYTES or n > size - 8:
                raise fail(
                    f"header length {n} at offset 0 is invalid (expected 1..{min(MAX_HEADER_BYTES, size - 8)} "
                    f"for a {size}-byte file): not a safetensors file, or truncated"
                )
            raw = fh.read(n)
    except OSError as exc:
        raise fail(f"cannot read: {exc.strerror or exc}") from None
    if len(raw) != n:
        raise fail(f"truncated inside the header ({len(raw)} of {n} bytes)")
    try:
        head = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except _DuplicateKey as dup:
        # json.loads would keep the last of two entries silently; a tensor named twice (or two
        # __metadata__ maps) means two readers could see different files.
        raise fail(f"header names {json.dumps(dup.key)[:120]} twice") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise fail(f"header is not JSON ({type(exc).__name__}): not a safetensors file") from None
    if not isinstance(head, dict):
        raise fail(f"header is a JSON {type(head).__name__}, expected an object")
    meta = head.pop("__metadata__", None)
    if meta is not None and not (
        isinstance(meta, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    ):
        raise fail("header '__metadata__' must be an object of strings to strings")
    data_start = 8 + n
    data_size = size - data_start
    entries = []
    for name, info in head.items():
        where = f"tensor '{name}'"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise fail(f"{where}: expected an object with dtype, shape, data_offsets")
        dtype, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str):
            raise fail(f"{where}: dtype must be a string")
        if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < 2**53 for d in shape):
            raise fail(f"{where}: shape must be a list of non-negative integers")
        if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)):
            raise fail(f"{where}: data_offsets must be [begin, end]")
        begin, end = offs
        if not 0 <= begin <= end:
            raise fail(f"{where}: data_offsets {offs} are not 0 <= begin <= end")
        if dtype in DTYPE_SIZES and end - begin != math.prod(shape) * DTYPE_SIZES[dtype]:
            raise fail(
                f"{where}: {end - begin} bytes, but {dtype} {shape} needs {math.prod(shape) * DTYPE_SIZES[dtype]}"
            )
        if end > data_size:
            raise fail(
                f"{where}: its data ends at byte {data_start + end} but the file has {size} bytes: truncated"
            )
        entries.append(StEntry(name, dtype, tuple(shape), data_start + begin, data_start + end))
    entries.sort(key=lambda e: (e.start, e.end))
    for a, b in zip(entries, entries[1:]):
        if b.start < a.end:
            raise fail(f"tensors '{a.name}' and '{b.name}' overlap in the data buffer")
    return StHeader(path, entries, meta, data_start, size)
