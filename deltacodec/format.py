"""The ``.sld`` container: writer and validating, streaming reader (spec/sld-format.md is normative).

This layer needs only numpy, msgpack and zstandard, so ``sld inspect`` never imports torch.

Layout::

    0   magic            8 bytes  89 53 4C 44 0D 0A 1A 0A
    8   version          u32 LE   container version (1)
    12  header_length    u32 LE   H, bytes of the compressed header
    16  header_crc32     u32 LE   CRC-32 of those H bytes
    20  header           H bytes  one zstd frame holding a msgpack map
    20+H data            sections, contiguous, in header order; the file ends with the last one

Opening a file reads the preamble and the header only and checks them in the order of spec
section 7.2; every size the header states is bounded before anything is allocated. Tensors are
decoded on request, in pieces: :meth:`SldFile.iter_chunks` never holds more than one piece of a
tensor (nor of its decompressed payload), :meth:`SldFile.verify` checks every section that way.
"""

from __future__ import annotations

import io
import os
import stat
import struct
import weakref
import zlib
from typing import Any, Callable, Iterable, Iterator

import msgpack
import numpy as np

from . import bytegroup, entropy, rans
from .config_defaults import elide as elide_config_defaults
from .errors import DecodeError, EncodeError, SldChecksumError, SldError, SldFormatError, SldLimitError, SldVersionError
from .header import (
    MAX_CONTAINER,
    MAX_DEPTH,
    MAX_DIM,
    MAX_ENTRIES,
    MAX_HEADER_BYTES,
    MAX_HEADER_DECODED,
    MAX_METADATA_VALUES,
    MAX_NAME_BYTES,
    MAX_NDIM,
    MAX_NUMEL,
    RAW_DTYPES,
    ModuleEntry,
    TensorEntry,
    bound_problem,
    dequantize_codebook,
    iter_entries,
    parse_header,
)
from .header_v2 import parse_header_v2
from .pack import padding_is_zero, unpack_indices
from .sideinfo import F32_EXTENSION

__all__ = [
    "MAGIC",
    "VERSION",
    "SUPPORTED_VERSIONS",
    "PREAMBLE_SIZE",
    "DEFAULT_MAX_DECODED_BYTES",
    "CHUNK_ELEMENTS",
    "TensorEntry",
    "ModuleEntry",
    "SldFile",
    "open_sld",
    "build_container",
    "dequantize_codebook",
    "MAX_HEADER_BYTES",
    "MAX_HEADER_DECODED",
    "MAX_ENTRIES",
    "MAX_CONTAINER",
    "MAX_DEPTH",
    "MAX_METADATA_VALUES",
    "MAX_NAME_BYTES",
    "MAX_NDIM",
    "MAX_DIM",
    "MAX_NUMEL",
]

MAGIC = b"\x89SLD\r\n\x1a\n"
VERSION = 1  # what build_container writes with version=1 (the v1 layout)
VERSION_2 = 2
SUPPORTED_VERSIONS = (1, 2)
PREAMBLE_SIZE = 20
_PREAMBLE = struct.Struct("<8sIII")
HEADER_LEVEL = 19
# What decoding a whole file may allocate, by default: every tensor as float32 (F64 as float64).
# 16 GiB holds a rank-64 adapter on every linear layer of a 405B-parameter model (2.5e9
# parameters, 10 GB as float32); a caller that trusts a larger file raises it:
# SldFile(path, max_decoded_bytes=N).
DEFAULT_MAX_DECODED_BYTES = 16 << 30
# Pieces of one tensor decoded at a time: 4 MiB of float32, 8 MiB of index temporaries.
CHUNK_ELEMENTS = 1 << 20
# Sections up to this size are read whole (one read, one CRC pass); larger ones are CRC-checked
# in a first pass and then decoded from the file in pieces.
_WHOLE_SECTION = 4 << 20
_IO_CHUNK = 4 << 20
_NO_LIMIT = 1 << 62
_JOIN_RUN = 1 << 16  # version-2 field streams are joined into 16/32-bit words this many at a time


# ----------------------------------------------------------------------------------------------
# Where the bytes come from: a file (held open, read with pread) or memory (the writer's check)


class _FileBytes:
    def __init__(self, path: str) -> None:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise SldFormatError(f"{path}: not a regular file, not an .sld file")
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0))
        self._close = weakref.finalize(self, os.close, self.fd)
        self.size = os.fstat(self.fd).st_size

    def pread(self, offset: int, n: int) -> bytes:
        if hasattr(os, "pread"):
            parts = []
            while n > 0:
                b = os.pread(self.fd, min(n, 1 << 30), offset)
                if not b:
                    break
                parts.append(b)
                offset += len(b)
                n -= len(b)
            return parts[0] if len(parts) == 1 else b"".join(parts)
        os.lseek(self.fd, offset, os.SEEK_SET)  # pragma: no cover - platforms without pread
        return os.read(self.fd, n)

    def close(self) -> None:
        self._close()


class _MemoryBytes:
    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.size = len(data)

    def pread(self, offset: int, n: int) -> bytes:
        return bytes(self.data[offset:offset + n])

    def close(self) -> None:
        pass


class _Range(io.RawIOBase):
    """A byte range of a source as a file object (what zstd's stream reader pulls from)."""

    def __init__(self, src: _FileBytes | _MemoryBytes, start: int, length: int) -> None:
        self.src, self.pos, self.end = src, start, start + length

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = self.end - self.pos if n is None or n < 0 else min(n, self.end - self.pos)
        b = self.src.pread(self.pos, n) if n > 0 else b""
        self.pos += len(b)
        return b


class _Payload:
    """A section's payload read in pieces: ``read(n)`` exactly n bytes, ``finish()`` at the end."""

    def __init__(self, read: Callable[[int], bytes], finish: Callable[[], None]) -> None:
        self.read = read
        self.finish = finish


# ----------------------------------------------------------------------------------------------
# Reader


class SldFile:
    """A validated ``.sld`` file: header parsed and checked, tensors decoded on request.

    Opening reads the 20-byte preamble and the header only, checks them (spec section 7.2), and
    refuses a file whose tensors would decode to more than ``max_decoded_bytes`` (default
    :data:`DEFAULT_MAX_DECODED_BYTES`; every tensor counted as float32, F64 as float64) with
    :class:`SldLimitError` before anything is decoded. The file stays open (sections are read
    from the file that was validated, even if the path is replaced); :meth:`close` or a ``with``
    block releases it, as does garbage collection.
    """

    def __init__(self, path: str | os.PathLike[str], *, max_decoded_bytes: int | None = None) -> None:
        self.path = os.fspath(path)
        try:
            src = _FileBytes(self.path)
        except OSError as exc:
            raise SldFormatError(f"{self.path}: cannot read: {exc.strerror or exc}") from None
        try:
            self._open(src, max_decoded_bytes)
        except BaseException:
            src.close()
            raise

    @classmethod
    def from_bytes(cls, data: bytes, name: str, *, max_decoded_bytes: int | None = None) -> "SldFile":
        """Validate an in-memory file (``name`` is what messages call it): the writer's self-check."""
        self = cls.__new__(cls)
        self.path = name
        self._open(_MemoryBytes(data), max_decoded_bytes)
        return self

    def _open(self, src: _FileBytes | _MemoryBytes, max_decoded_bytes: int | None) -> None:
        self._src = src
        self.max_decoded_bytes = DEFAULT_MAX_DECODED_BYTES if max_decoded_bytes is None else int(max_decoded_bytes)
        self.file_size = src.size
        try:
            pre = src.pread(0, PREAMBLE_SIZE)
        except OSError as exc:
            raise SldFormatError(f"{self.path}: cannot read: {exc.strerror or exc}") from None
        self.version = _check_preamble(self.path, pre, self.file_size)
        _, _, hlen, hcrc = _PREAMBLE.unpack(pre)
        raw_header = src.pread(PREAMBLE_SIZE, hlen)
        if len(raw_header) != hlen:
            raise SldFormatError(f"{self.path}: truncated inside the header (offset {PREAMBLE_SIZE})")
        if zlib.crc32(raw_header) != hcrc:
            raise SldChecksumError(
                f"{self.path}: header CRC-32 mismatch (header at offset {PREAMBLE_SIZE}, "
                f"{hlen} bytes, stored {hcrc:#010x}, computed {zlib.crc32(raw_header):#010x}): the file is corrupt"
            )
        self.header_size = PREAMBLE_SIZE + hlen
        self.data_offset = PREAMBLE_SIZE + hlen
        decoded = self._decompress_header(raw_header)
        del raw_header
        data_size = self.file_size - self.data_offset
        hdr = (parse_header if self.version == 1 else parse_header_v2)(decoded, self.path)
        del decoded
        self.metadata: dict[str, Any] = hdr.metadata
        self.modules: list[ModuleEntry] = hdr.modules
        self.tensors: list[TensorEntry] = hdr.tensors
        self._check_layout(data_size)
        self.decoded_nbytes: int = hdr.decoded_nbytes
        if self.decoded_nbytes > self.max_decoded_bytes:
            raise SldLimitError(
                f"{self.path}: decoding needs {self.decoded_nbytes:,} bytes, over the limit of "
                f"{self.max_decoded_bytes:,} (max_decoded_bytes / --max-decoded-bytes raises it)",
                limit=self.max_decoded_bytes,
                requested=self.decoded_nbytes,
            )
        self.data_crc32: int | None = hdr.data_crc32
        self._data_checked = False
        self._by_module = {m.name: m for m in self.modules}
        self._by_tensor = {t.name: t for t in self.tensors}
        for m in self.modules:
            self._by_tensor.setdefault(m.A.name, m.A)
            self._by_tensor.setdefault(m.B.name, m.B)

    def _decompress_header(self, raw: bytes) -> bytes:
        where = f"{self.path}: header at offset {PREAMBLE_SIZE}"
        try:
            return entropy.decompress_bounded(raw, MAX_HEADER_DECODED)
        except entropy.FrameLimitError as exc:
            raise SldLimitError(f"{where}: {exc}", limit=exc.limit, requested=exc.requested) from None
        except entropy.DecompressError as exc:
            raise SldFormatError(f"{where}: {exc}") from None
        except MemoryError:
            raise self._oom(None, MAX_HEADER_DECODED) from None

    def _check_layout(self, data_size: int) -> None:
        cursor = 0
        for e in iter_entries(self):
            if e.offset != cursor:
                raise SldFormatError(
                    f"{self.path}: header tensor '{e.name}'.offset: section starts at {e.offset}, expected "
                    f"{cursor} (sections are contiguous in header order)"
                )
            if cursor + e.length > data_size:
                start = self.data_offset + cursor
                raise SldFormatError(
                    f"{self.path}: tensor '{e.name}': section [{start}, {start + e.length}) runs past the end "
                    f"of the file ({self.file_size} bytes): truncated?"
                )
            cursor += e.length
        if cursor != data_size:
            raise SldFormatError(
                f"{self.path}: sections end at offset {self.data_offset + cursor} but the file has "
                f"{self.file_size} bytes: {data_size - cursor} trailing bytes"
            )

    # -- lifetime -----------------------------------------------------------------------------

    def close(self) -> None:
        """Release the file (decoding afterwards is an error)."""
        self._src.close()

    def __enter__(self) -> "SldFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- access -------------------------------------------------------------------------------

    def module(self, name: str) -> ModuleEntry:
        try:
            return self._by_module[name]
        except KeyError:
            raise KeyError(f"{self.path}: no module named '{name}'") from None

    def entries(self) -> Iterator[TensorEntry]:
        """Every stored tensor in file order."""
        return iter_entries(self)

    def _lookup(self, entry_or_name: TensorEntry | str) -> TensorEntry:
        if isinstance(entry_or_name, TensorEntry):
            return entry_or_name
        try:
            return self._by_tensor[entry_or_name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named '{entry_or_name}'") from None

    def nbytes_module(self, name: str) -> int:
        """Bytes the module's two sections occupy in the file (header share not included)."""
        m = self.module(name)
        return m.A.length + m.B.length

    # -- sections -----------------------------------------------------------------------------

    def _where(self, e: TensorEntry) -> str:
        return f"{self.path}: tensor '{e.name}' (section at offset {self.data_offset + e.offset})"

    def _crc_fail(self, e: TensorEntry, got: int) -> SldChecksumError:
        return SldChecksumError(
            f"{self.path}: tensor '{e.name}': CRC-32 mismatch in the section at offset "
            f"{self.data_offset + e.offset} ({e.length} bytes, stored {e.crc32:#010x}, computed "
            f"{got:#010x}): the file is corrupt"
        )

    def _read(self, offset: int, n: int, e: TensorEntry) -> bytes:
        try:
            b = self._src.pread(offset, n)
        except OSError as exc:
            raise SldFormatError(f"{self._where(e)}: cannot read: {exc.strerror or exc}") from None
        if len(b) != n:
            raise SldFormatError(f"{self._where(e)}: the file is truncated (it changed after it was opened?)")
        return b

    def _payload(self, e: TensorEntry, sec: bytes | None = None) -> _Payload:
        """The section, CRC-checked before anything is decompressed, as a payload to read in pieces
        (``sec``: the section's bytes when the caller has already read them)."""
        start = self.data_offset + e.offset
        P = e.payload_nbytes
        if self.data_crc32 is not None:
            self._check_data_crc(e)
        if e.length <= _WHOLE_SECTION:
            if sec is None:
                sec = self._read(start, e.length, e)
            crc = zlib.crc32(sec)
            if self.data_crc32 is None and crc != e.crc32:
                raise self._crc_fail(e, crc)
            reader: Callable[[int, int], bytes] = lambda off, n: sec[off:off + n]  # noqa: E731
            source: io.RawIOBase | io.BufferedIOBase = io.BytesIO(sec)
        else:
            crc = 0
            if self.data_crc32 is None:
                for off in range(0, e.length, _IO_CHUNK):
                    crc = zlib.crc32(self._read(start + off, min(_IO_CHUNK, e.length - off), e), crc)
                if crc != e.crc32:
                    raise self._crc_fail(e, crc)
            reader = lambda off, n: self._read(start + off, max(0, min(n, e.length - off)), e)  # noqa: E731
            source = _Range(self._src, start, e.length)
        if e.compression in ("rans", "fields"):
            whole = sec if sec is not None else self._read(start, e.length, e)
            payload = self._decode_v2(e, whole)
            reader = lambda off, n: payload[off:off + n]  # noqa: E731
            e_none = True
        else:
            e_none = e.compression == "none"
        if e_none:
            pos = 0

            def read_raw(n: int) -> bytes:
                nonlocal pos
                b = reader(pos, n)
                pos += n
                return b

            return _Payload(read_raw, lambda: None)
        try:
            frame = entropy.walk_frame(reader, e.length)
            entropy.check_size(frame, P)
        except entropy.FrameLimitError as exc:
            raise SldLimitError(f"{self._where(e)}: {exc}", limit=exc.limit, requested=exc.requested) from None
        except entropy.DecompressError as exc:
            raise SldFormatError(f"{self._where(e)}: {exc}") from None
        stream = entropy.PayloadStream(source, P)

        def read_z(n: int) -> bytes:
            try:
                return stream.read(n)
            except entropy.DecompressError as exc:
                raise SldFormatError(f"{self._where(e)}: {exc}") from None

        def finish_z() -> None:
            try:
                stream.finish()
            except entropy.DecompressError as exc:
                raise SldFormatError(f"{self._where(e)}: {exc}") from None

        return _Payload(read_z, finish_z)

    def _tensor_rans(self, e: TensorEntry, need: int) -> np.ndarray:
        """A version-2 quantized tensor decoded straight to its values (one pass in the compiled
        decoder: symbol → value, no index array)."""
        self._check_data_crc(e)
        lanes, side = e.coder
        try:
            sec = self._read(self.data_offset + e.offset, e.length, e)
            out = np.empty(e.numel, dtype=np.float32)
            rans.decode_values(sec, [(e.numel, side.table, side.values)], lanes, out=out)
        except rans.RansError as exc:
            raise SldFormatError(f"{self._where(e)}: rANS stream: {exc}") from None
        except MemoryError:
            raise self._oom(e, need) from None
        return out.reshape(e.shape)

    def _check_data_crc(self, e: TensorEntry) -> None:
        """Version 2: the CRC-32 of the whole data area, checked once (streamed) before the first
        section is decoded, so no decoded value comes from a corrupt file."""
        if self._data_checked:
            return
        start, n = self.data_offset, self.file_size - self.data_offset
        crc = 0
        for off in range(0, n, _IO_CHUNK):
            crc = zlib.crc32(self._read(start + off, min(_IO_CHUNK, n - off), e), crc)
        if crc != self.data_crc32:
            raise SldChecksumError(
                f"{self.path}: data area CRC-32 mismatch (offset {start}, {n} bytes, stored "
                f"{self.data_crc32:#010x}, computed {crc:#010x}): the file is corrupt (found decoding "
                f"tensor '{e.name}')"
            )
        self._data_checked = True

    def _decode_v2(self, e: TensorEntry, sec: bytes) -> bytes:
        """A version-2 section (CRC already checked) decoded to the tensor's payload: one byte
        per symbol (index - imin) for a quantized tensor, the little-endian 16-bit words (32-bit
        for F32) for a lossless one. Memory: the section and the payload, about the tensor's size."""
        lanes, side = e.coder
        n = e.numel
        try:
            if e.compression == "rans":
                sym = rans.decode_symbols(sec, [(n, side.table)], lanes)
                return sym.astype(np.uint8).tobytes()
            coded = [t for t in side.tables if t is not None]
            n_stored = side.stored
            stream_len = len(sec) - n_stored * n
            if stream_len < 0 or (coded and stream_len == 0) or (not coded and stream_len != 0):
                raise rans.RansError(f"{len(sec)} bytes do not hold a stream and {n_stored} stored field "
                                     f"streams of {n} bytes")
            sym = rans.decode_symbols(sec[:stream_len], [(n, t) for t in coded], lanes) if coded else None
            out = np.empty(n, dtype="<u4" if side.dtype == "F32" else "<u2")
            # joined in runs, so the temporaries of the join stay small beside the symbols
            for lo in range(0, n, _JOIN_RUN):
                hi = min(n, lo + _JOIN_RUN)
                fields, ci, ri = [], 0, 0
                for t in side.tables:
                    if t is None:
                        off = stream_len + ri * n + lo
                        fields.append(np.frombuffer(sec, dtype=np.uint8, count=hi - lo, offset=off))
                        ri += 1
                    else:
                        fields.append((sym[ci * n + lo:ci * n + hi] + t.imin).astype(np.uint8))
                        ci += 1
                out[lo:hi] = bytegroup.join_fields(fields, side.dtype)
            del sym
            return out.tobytes()
        except rans.RansError as exc:
            raise SldFormatError(f"{self._where(e)}: rANS stream: {exc}") from None

    def kernel_factor(self, entry: TensorEntry | str) -> tuple[np.ndarray, np.ndarray]:
        """A quantized factor as the fused apply kernels take it: (indices, values) with
        ``indices`` uint8, flat, row-major, one per element, and ``values`` float32 of
        ``2**entry.bits`` entries, so that the tensor is ``values[indices]``. Works for version-1
        codebook tensors (indices into the codebook) and version-2 quantized tensors (symbols of
        at most 256, the encoder's cap). Validated as :meth:`indices` is."""
        e = self._lookup(entry)
        if e.encoding != "codebook":
            raise DecodeError(f"{self.path}: tensor '{e.name}' is stored losslessly ({e.dtype}), it has no indices")
        return self.indices(e), e.codebook

    def read_section(self, entry: TensorEntry) -> bytes:
        """The tensor's whole payload: section read, CRC-checked, entropy stage undone (exactly
        ``payload_nbytes`` bytes; the frame cannot make it more)."""
        e = self._lookup(entry)
        try:
            p = self._payload(e)
            out = p.read(e.payload_nbytes)
            p.finish()
            return out
        except MemoryError:
            raise self._oom(e, e.payload_nbytes) from None

    def _oom(self, e: TensorEntry | None, need: int) -> SldLimitError:
        what = f"tensor '{e.name}'" if e is not None else "the header"
        return SldLimitError(
            f"{self.path}: {what}: out of memory decoding it ({need:,} bytes needed); decode large tensors "
            f"in pieces (SldFile.iter_chunks), or lower max_decoded_bytes (--max-decoded-bytes, now "
            f"{self.max_decoded_bytes:,}) to refuse such files up front",
            limit=self.max_decoded_bytes,
            requested=need,
        )

    # -- decoding in pieces -------------------------------------------------------------------

    def _index_pieces(self, e: TensorEntry, step: int, sec: bytes | None = None,
                      check_only: bool = False) -> Iterator[np.ndarray | None]:
        """uint8 indices in runs of ``step`` (a multiple of 8, so each run starts on a byte).
        ``check_only``: validate without unpacking where the width makes that possible (fields of
        exactly ``bits`` bits cannot hold an index out of range); yields None then."""
        p = self._payload(e, sec)
        n, w = e.numel, e.width
        done = 0
        while done < n:
            k = min(step, n - done)
            raw = np.frombuffer(p.read((k * w + 7) // 8), dtype=np.uint8)
            if done + k == n and not padding_is_zero(raw, k, w):
                raise SldFormatError(f"{self._where(e)}: padding bits after the last index are not zero")
            if check_only and w == e.bits:
                done += k
                yield None
                continue
            idx = unpack_indices(raw, k, w)
            if w > e.bits:
                top = int(idx.max())
                if top >= 1 << e.bits:
                    raise SldFormatError(
                        f"{self._where(e)}: index {top} at element {done + int(idx.argmax())} out of range "
                        f"for a {e.bits}-bit codebook"
                    )
            yield idx
            done += k
        p.finish()

    def _raw_pieces(self, e: TensorEntry, step: int, sec: bytes | None = None) -> Iterator[np.ndarray]:
        """Raw values in the decoded dtype (BF16 widened exactly to float32), checked finite."""
        p = self._payload(e, sec)
        stored, size = RAW_DTYPES[e.dtype]
        n = e.numel
        done = 0
        while done < n:
            k = min(step, n - done)
            arr = np.frombuffer(p.read(k * size), dtype=stored)
            if e.dtype == "BF16":
                arr = (arr.astype(np.uint32) << np.uint32(16)).view(np.float32)
            else:
                arr = arr.astype(arr.dtype.newbyteorder("="))
            if not np.isfinite(arr).all():
                bad = done + int(np.flatnonzero(~np.isfinite(arr))[0])
                raise SldFormatError(f"{self._where(e)}: element {bad} is NaN or Inf")
            yield arr
            done += k
        p.finish()

    def _pieces(self, e: TensorEntry, step: int) -> Iterator[np.ndarray]:
        if e.encoding == "raw":
            yield from self._raw_pieces(e, step)
            return
        cb = e.codebook
        for idx in self._index_pieces(e, max(8, step - step % 8)):
            yield cb[idx]

    def iter_chunks(self, entry: TensorEntry | str, max_elements: int = CHUNK_ELEMENTS) -> Iterator[np.ndarray]:
        """Decode one tensor in pieces: consecutive runs of its values in row-major order.

        Yields new 1-D arrays of ``entry.decoded_dtype`` (float32; float16 for raw F16, float64
        for raw F64), each of exactly ``max_elements`` values except the last; concatenated they
        equal ``tensor(entry).reshape(-1)``. Memory: a few pieces and the zstd window (at most
        128 MiB, 512 KiB for this writer's sections), never the whole tensor or payload.

        The CRC and the zstd frame's structure are checked before the first piece; the payload's
        content (index range, padding, finite values, exact size) as it is decoded, so an error
        can come after some pieces were yielded: a caller writing them out discards them then.
        """
        e = self._lookup(entry)
        if not isinstance(max_elements, int) or max_elements < 1:
            raise DecodeError(f"max_elements must be a positive int, got {max_elements!r}")
        step = max_elements
        if e.encoding == "codebook" and step % 8:
            pieces = _rechunk(self._pieces(e, max(8, step + 8 - step % 8)), step)
        else:
            pieces = self._pieces(e, step)
        try:
            for piece in pieces:
                yield piece
        except MemoryError:
            raise self._oom(e, max_elements * e.decoded_dtype.itemsize) from None

    def tensor(self, entry_or_name: TensorEntry | str) -> np.ndarray:
        """Decode one tensor whole, shaped: codebook tensors to float32 ``codebook[indices]``,
        raw tensors to float16 (F16), float32 (BF16 widened exactly, F32) or float64 (F64)."""
        e = self._lookup(entry_or_name)
        need = e.numel * e.decoded_dtype.itemsize
        if e.compression == "rans":
            return self._tensor_rans(e, need)
        try:
            out = np.empty(e.numel, dtype=e.decoded_dtype)
            pos = 0
            for piece in self._pieces(e, CHUNK_ELEMENTS):
                out[pos:pos + piece.size] = piece
                pos += piece.size
        except MemoryError:
            raise self._oom(e, need) from None
        return out.reshape(e.shape)

    def indices(self, entry: TensorEntry) -> np.ndarray:
        """Codebook indices of a codebook tensor, uint8, flat in row-major order (validated:
        every index < 2**bits, padding bits zero)."""
        e = self._lookup(entry)
        if e.encoding != "codebook":
            raise DecodeError(f"{self.path}: tensor '{e.name}' is stored raw, it has no indices")
        try:
            out = np.empty(e.numel, dtype=np.uint8)
            pos = 0
            for idx in self._index_pieces(e, CHUNK_ELEMENTS):
                out[pos:pos + idx.size] = idx
                pos += idx.size
        except MemoryError:
            raise self._oom(e, e.numel) from None
        return out

    def raw_array(self, entry: TensorEntry) -> np.ndarray:
        """A raw tensor's stored values, shaped: float16/float32/float64 as stored, BF16 widened
        exactly to float32."""
        e = self._lookup(entry)
        if e.encoding != "raw":
            raise DecodeError(f"{self.path}: tensor '{e.name}' is codebook-coded, not raw")
        return self.tensor(e)

    def check_module(self, module: ModuleEntry | str, a_max: float, b_max: float) -> None:
        """Section 6.2 with the decoded maxima |A| and |B| (what a raw BF16/F32/F64 factor needs;
        codebook and F16 factors were checked when the file was opened)."""
        m = module if isinstance(module, ModuleEntry) else self.module(module)
        problem = bound_problem(m, a_max, b_max)
        if problem:
            raise SldFormatError(f"{self.path}: module '{m.name}': {problem}")

    def dequantize(self, module_name: str) -> tuple[np.ndarray, np.ndarray]:
        """Q(A) (r×in) and Q(B) (out×r) of one module, float32, checked to give a finite ΔW."""
        m = self.module(module_name)
        with np.errstate(over="ignore"):  # an F64 factor beyond float32: inf, refused just below
            A = np.asarray(self.tensor(m.A), dtype=np.float32)
            B = np.asarray(self.tensor(m.B), dtype=np.float32)
        if m.A.value_bound is None or m.B.value_bound is None:
            # float32 maxima: an F64 factor beyond float32's range shows up here as inf.
            self.check_module(m, float(np.abs(A).max()), float(np.abs(B).max()))
        return A, B

    def verify(self) -> None:
        """Decode and check every section in file order, in pieces (bounded memory): CRC, the zstd
        recipe, exact payload size, padding, index range, finite values, and the module rule with
        the decoded maxima of raw factors. Returns nothing; raises the first error found."""
        sections = self._small_sections()
        for m in self.modules:
            a = self._verify_entry(m.A, sections)
            b = self._verify_entry(m.B, sections)
            if m.A.value_bound is None or m.B.value_bound is None:
                self.check_module(m, a, b)
        for t in self.tensors:
            self._verify_entry(t, sections)

    def check_tensor(self, entry: TensorEntry | str) -> float:
        """Check one section as :meth:`verify` does (in pieces, nothing kept) and return the
        largest |value| it decodes to (for a codebook tensor, its codebook's largest |value|).
        What a caller that hands the packed stream to its own decoder runs first."""
        return self._verify_entry(self._lookup(entry), iter([None]))

    def _small_sections(self) -> Iterator[bytes | None]:
        """Each section in file order: its bytes when small (read in large sequential blocks, not
        one read per section), None when large (streamed by the caller)."""
        block, block_start = b"", 0
        for e in iter_entries(self):
            if e.length > _WHOLE_SECTION:
                yield None
                continue
            if e.offset + e.length > block_start + len(block):
                block_start = e.offset
                block = self._read(self.data_offset + e.offset,
                                   min(max(_IO_CHUNK, e.length), self.file_size - self.data_offset - e.offset), e)
            yield block[e.offset - block_start:e.offset - block_start + e.length]

    def _verify_entry(self, e: TensorEntry, sections: Iterator[bytes | None]) -> float:
        """Check one section; returns max |value| (the codebook's bound for codebook tensors)."""
        sec = next(sections)
        try:
            if e.encoding == "codebook":
                for _ in self._index_pieces(e, CHUNK_ELEMENTS, sec, check_only=True):
                    pass
                return float(e.value_bound)
            top = 0.0
            for piece in self._raw_pieces(e, CHUNK_ELEMENTS, sec):
                top = max(top, float(np.abs(piece).max()))
            return top
        except MemoryError:
            raise self._oom(e, CHUNK_ELEMENTS * 8) from None

    def __repr__(self) -> str:
        return (
            f"SldFile({self.path!r}, version={self.version}, modules={len(self.modules)}, "
            f"tensors={len(self.tensors)}, bytes={self.file_size})"
        )


def open_sld(source: "str | os.PathLike[str] | SldFile", max_decoded_bytes: int | None = None) -> SldFile:
    """``source`` opened (a path) or taken as it is (an open :class:`SldFile`), held either way to
    ``max_decoded_bytes`` (:class:`SldLimitError` when it decodes to more)."""
    if not isinstance(source, SldFile):
        return SldFile(os.fspath(source), max_decoded_bytes=max_decoded_bytes)
    if max_decoded_bytes is not None and source.decoded_nbytes > max_decoded_bytes:
        raise SldLimitError(
            f"{source.path}: decoding needs {source.decoded_nbytes:,} bytes, over the limit of "
            f"{max_decoded_bytes:,} (max_decoded_bytes)",
            limit=max_decoded_bytes,
            requested=source.decoded_nbytes,
        )
    return source


def _check_preamble(path: str, pre: bytes, file_size: int) -> int:
    """Section 7.2 steps 1-4, on whatever bytes exist: magic, version, preamble length, H."""
    n = len(pre)
    head = pre[:8]
    if head != MAGIC[: len(head)]:
        return _not_sld(path, head)
    if n == 0:
        raise SldFormatError(f"{path}: empty file (0 bytes), not an .sld file")
    if n >= 12:
        (version,) = struct.unpack_from("<I", pre, 8)
        if version not in SUPPORTED_VERSIONS:
            newer = " (written by a newer deltacodec)" if version > max(SUPPORTED_VERSIONS) else ""
            raise SldVersionError(
                f"{path}: container version {version}{newer} at offset 8; this reader supports "
                f"{', '.join(map(str, SUPPORTED_VERSIONS))}",
                found=version,
                supported=SUPPORTED_VERSIONS,
            )
    if n < PREAMBLE_SIZE:
        raise SldFormatError(f"{path}: truncated: {n} bytes, an .sld file has at least {PREAMBLE_SIZE} (offset 0)")
    _, version, hlen, _ = _PREAMBLE.unpack(pre)
    avail = file_size - PREAMBLE_SIZE
    if hlen > MAX_HEADER_BYTES:
        raise SldLimitError(
            f"{path}: header length {hlen:,} at offset 12 is over the limit of {MAX_HEADER_BYTES:,}",
            limit=MAX_HEADER_BYTES,
            requested=hlen,
        )
    if hlen == 0 or hlen > avail:
        raise SldFormatError(
            f"{path}: header length {hlen} at offset 12 is invalid: expected 1..{max(avail, 0)} "
            f"(the file has {file_size} bytes)"
        )
    return version


def _not_sld(path: str, head: bytes) -> int:
    shown = head.decode("ascii", "backslashreplace") if all(32 <= c < 127 for c in head) else head.hex(" ")
    raise SldFormatError(f"{path}: not an .sld file: it starts with {shown!r}, an .sld file with {MAGIC.hex(' ')}")


def _rechunk(pieces: Iterable[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """Re-cut consecutive pieces into pieces of exactly ``size`` (the last may be shorter)."""
    carry: list[np.ndarray] = []
    have = 0
    for p in pieces:
        carry.append(p)
        have += p.size
        if have >= size:
            buf = np.concatenate(carry)
            cut = (buf.size // size) * size
            for i in range(0, cut, size):
                yield buf[i:i + size].copy()
            carry = [buf[cut:]] if cut < buf.size else []
            have = buf.size - cut
    if have:
        yield np.concatenate(carry)


# ----------------------------------------------------------------------------------------------
# Writer


def _tensor_map(t: dict[str, Any], offset: int, section: bytes) -> dict[str, Any]:
    m: dict[str, Any] = {"shape": [int(d) for d in t["shape"]], "encoding": t["encoding"]}
    if t["encoding"] == "codebook":
        m["bits"] = int(t["bits"])
        m["width"] = int(t["width"])
        m["quantizer"] = t["quantizer"]
        m["codebook"] = bytes(t["codebook_f16"])
        m["codebook_scale"] = float(t["codebook_scale"])
    else:
        m["dtype"] = t["dtype"]
    m["compression"] = t["compression"]
    m["offset"] = offset
    m["length"] = len(section)
    m["crc32"] = zlib.crc32(section)
    return m


def build_container(
    metadata: dict[str, Any],
    modules: list[dict[str, Any]],
    tensors: list[dict[str, Any]],
    *,
    name: str = "the output",
    version: int = VERSION,
    lanes: int = 4,
) -> bytes:
    """Serialise a whole file, then check it with the reader's own rules before returning it.

    ``version`` 1 writes the version-1 layout; 2 the version-2 one (:func:`serialize_v2`: tensor
    dicts may then also be quantized, ``encoding: "q"``, or lossless 16-bit, ``"f"``, with
    ``side`` bytes and a rANS ``section`` coded with ``lanes`` lanes).

    Each module dict has name, sine, out_features, in_features, rank, scale, omega, gamma,
    fan_in_fan_out and A/B tensor dicts; each tensor dict has shape, encoding and its fields plus
    ``section`` (the stored bytes, after the entropy stage). Sections are laid out in header
    order: for each module A then B, then the extra tensors. Deterministic: same arguments, same
    bytes. Anything a reader would reject (a bad name, a collision, NaN, a value that cannot be
    finite, a limit) raises :class:`EncodeError` naming ``name`` and the tensor or module; the
    caller has then written nothing.
    """
    if version == VERSION_2:
        data = serialize_v2(metadata, modules, tensors, name=name, lanes=lanes)
    elif version == VERSION:
        conv = [m["name"] for m in modules if m.get("weight_shape")]
        if conv:
            raise EncodeError(f"{name}: module '{conv[0]}' is a conv module (weight_shape); container version 1 "
                              "cannot record kernel shapes: write version 2")
        data = serialize_unchecked(metadata, modules, tensors, name=name)
    else:
        raise EncodeError(f"{name}: container version must be 1 or 2, got {version!r}")
    try:
        SldFile.from_bytes(data, name, max_decoded_bytes=_NO_LIMIT).verify()
    except SldError as exc:
        raise EncodeError(f"{exc} (refusing to write a file the reader would reject)") from None
    return data


def serialize_unchecked(
    metadata: Any,
    modules: list[dict[str, Any]],
    tensors: list[dict[str, Any]],
    *,
    name: str = "the output",
) -> bytes:
    """The bytes :func:`build_container` would check, unchecked: only for crafting invalid files
    in tests and attack vectors. Anything shipped goes through :func:`build_container`."""
    sections: list[bytes] = []
    offset = 0

    def place(t: dict[str, Any]) -> dict[str, Any]:
        nonlocal offset
        sec = bytes(t["section"])
        m = _tensor_map(t, offset, sec)
        sections.append(sec)
        offset += len(sec)
        return m

    mods = []
    for mod in modules:
        m: dict[str, Any] = {
            "name": mod["name"],
            "kind": "sine" if mod["sine"] else "lora",
            "out_features": int(mod["out_features"]),
            "in_features": int(mod["in_features"]),
            "rank": int(mod["rank"]),
            "scale": float(mod["scale"]),
        }
        if mod["sine"]:
            m["omega"] = float(mod["omega"])
            m["gamma"] = float(mod["gamma"])
        m["fan_in_fan_out"] = bool(mod["fan_in_fan_out"])
        m["A"] = place(mod["A"])
        m["B"] = place(mod["B"])
        mods.append(m)
    extras = []
    for t in tensors:
        m = {"name": t["name"]}
        m.update(place(t))
        extras.append(m)
    header = {"metadata": metadata, "modules": mods, "tensors": extras}
    return _assemble(header, VERSION, sections, name)


def zstandard_compress_header(packed: bytes) -> bytes:
    """The header frame: zstd level 19 with its content size, no checksum, no dictionary id."""
    import zstandard

    return zstandard.ZstdCompressor(
        level=HEADER_LEVEL, write_checksum=False, write_content_size=True, write_dict_id=False
    ).compress(packed)


_MODULE_FIELDS = ("kind", "scale", "omega", "gamma", "fan_in_fan_out")


def _module_fields(mod: dict[str, Any]) -> dict[str, Any]:
    f: dict[str, Any] = {"kind": "sine" if mod["sine"] else "lora", "scale": float(mod["scale"])}
    if mod["sine"]:
        f["omega"] = float(mod["omega"])
        f["gamma"] = float(mod["gamma"])
    f["fan_in_fan_out"] = bool(mod["fan_in_fan_out"])
    return f


def _defaults(fields: list[dict[str, Any]]) -> dict[str, Any]:
    """Per module field, its most frequent value (ties: the first seen): stored once."""
    out: dict[str, Any] = {}
    for key in _MODULE_FIELDS:
        counts: dict[Any, int] = {}
        for f in fields:
            if key in f:
                v = f[key]
                k = (type(v).__name__, v)
                counts[k] = counts.get(k, 0) + 1
        if counts:
            best = max(counts.items(), key=lambda kv: kv[1])  # max keeps the first of equal counts
            out[key] = best[0][1]
    return out


def _prefix(prev: bytes, name: str) -> tuple[int, str]:
    raw = name.encode("utf-8", "surrogatepass")
    p = 0
    limit = min(len(prev), len(raw))
    while p < limit and prev[p] == raw[p]:
        p += 1
    while 0 < p < len(raw) and (raw[p] & 0xC0) == 0x80:  # never split a UTF-8 sequence
        p -= 1
    return p, raw[p:].decode("utf-8", "surrogatepass")


def _tensor_map_v2(t: dict[str, Any], section: bytes) -> list[Any]:
    """The version-2 tensor descriptor array (spec §12.2)."""
    enc = t["encoding"]
    if enc in ("q", "f"):
        return [0 if enc == "q" else 1, len(section), bytes(t["side"])]
    if enc == "raw":
        return [2, len(section), t["dtype"], t["compression"]]
    raise EncodeError(f"tensor encoding {enc!r} cannot be written in container version 2")


def serialize_v2(
    metadata: Any,
    modules: list[dict[str, Any]],
    tensors: list[dict[str, Any]],
    *,
    name: str = "the output",
    lanes: int = 4,
) -> bytes:
    """The version-2 bytes, unchecked (see :func:`build_container`, which checks them).

    Module fields shared by most modules go to ``defaults`` once; shapes are ``[out, in, rank]``
    (factor shapes implied); names are prefix-compressed against the previous entry's name;
    sections are back to back in entry order, their offsets implied.
    """
    metadata = elide_config_defaults(metadata)  # spec 12.5
    sections: list[bytes] = []
    fields = [_module_fields(m) for m in modules]
    defaults = _defaults(fields)
    prev = b""
    mods = []
    for mod, f in zip(modules, fields):
        p, suffix = _prefix(prev, mod["name"])
        prev = mod["name"].encode("utf-8", "surrogatepass")
        m: dict[str, Any] = {"name": suffix}
        if p:
            m["p"] = p
        m["shape"] = [int(mod["out_features"]), int(mod["in_features"]), int(mod["rank"])]
        if mod.get("weight_shape"):
            m["weight_shape"] = [int(v) for v in mod["weight_shape"]]
        for key, v in f.items():
            if key not in defaults or defaults[key] != v or type(defaults[key]) is not type(v):
                m[key] = v
        for which in ("A", "B"):
            sec = bytes(mod[which]["section"])
            m[which] = _tensor_map_v2(mod[which], sec)
            sections.append(sec)
        mods.append(m)
    extras = []
    for t in tensors:
        p, suffix = _prefix(prev, t["name"])
        prev = t["name"].encode("utf-8", "surrogatepass")
        m = {"name": suffix}
        if p:
            m["p"] = p
        m["shape"] = [int(d) for d in t["shape"]]
        sec = bytes(t["section"])
        m["t"] = _tensor_map_v2(t, sec)
        sections.append(sec)
        extras.append(m)
    crc = 0
    for sec in sections:
        crc = zlib.crc32(sec, crc)
    header = {"metadata": metadata, "defaults": defaults, "lanes": int(lanes), "crc32": crc, "modules": mods,
              "tensors": extras}
    every = [mod[w] for mod in modules for w in ("A", "B")] + list(tensors)
    if any(t["encoding"] == "f" and t.get("dtype") == "F32" for t in every):
        # spec 15: float32 field streams are an extension old version-2 readers must refuse;
        # written only when used, so every other file keeps its bytes
        header["required"] = [F32_EXTENSION]
    return _assemble(header, VERSION_2, sections, name)


def _assemble(header: dict[str, Any], version: int, sections: list[bytes], name: str) -> bytes:
    """Preamble, the compressed msgpack header and the sections, back to back."""
    try:
        packed = msgpack.packb(header, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise EncodeError(f"{name}: the header cannot be written as msgpack: {exc}") from None
    hdr = zstandard_compress_header(packed)
    pre = _PREAMBLE.pack(MAGIC, version, len(hdr), zlib.crc32(hdr))
    return b"".join([pre, hdr, *sections])
