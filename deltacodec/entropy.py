"""The zstd entropy stage: compression, and the bounded frame recipe every reader applies.

A zstd frame may declare its content size and its window; a decoder that believed them would let
the file choose the allocation. So before any byte is decompressed, :func:`walk_frame` reads the
frame header and the 3-byte block headers (RFC 8878, section 3.1.1) without decompressing, and
rejects anything outside spec/sld-format.md section 4.2: a skippable frame, a dictionary, a
reserved bit, a window over :data:`MAX_WINDOW`, a declared content size other than expected, or
any byte after the frame. Decompression then runs with the window capped and the output capped at
the size the header derives (:class:`PayloadStream` streams it in pieces), so a frame can neither
allocate nor produce more than the header allows.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from typing import Callable

import zstandard

__all__ = [
    "DEFAULT_LEVEL",
    "MAX_LEVEL",
    "MAX_WINDOW",
    "compress",
    "DecompressError",
    "FrameLimitError",
    "Frame",
    "walk_frame",
    "decompress_bounded",
    "check_size",
    "PayloadStream",
]

# Measured on k-means indices in byte-aligned fields: level 1 lands within 1% of the index
# entropy; levels 3-9 sometimes do worse (their match finders spend bits on chance matches in
# what is really a memoryless source) and 19 is 50x slower for no gain.
DEFAULT_LEVEL = 1
MAX_LEVEL = 22

# zstd's own default decoder limit (ZSTD_WINDOWLOG_LIMIT_DEFAULT = 27) and the largest window any
# level up to 22 uses without --long: every frame the zstd library writes at a standard level fits.
MAX_WINDOW = 1 << 27
_BLOCK_MAX = 1 << 17  # RFC 8878: Block_Maximum_Size = min(Window_Size, 128 KiB)
_ZSTD_MAGIC = 0xFD2FB528
_SKIPPABLE_MASK, _SKIPPABLE_MAGIC = 0xFFFFFFF0, 0x184D2A50

Read = Callable[[int, int], bytes]  # read(offset, n) -> up to n bytes of the frame's bytes


def compress(payload: bytes, level: int) -> tuple[bytes, str]:
    """Entropy-code ``payload``; returns ``(section_bytes, compression)``.

    ``level`` 0 stores the payload as it is. Otherwise the zstd frame is kept only when it is
    smaller than the payload, so a section never grows. Frames carry their content size and no
    checksum or dictionary id. Output is deterministic for a given zstd release.
    """
    if level == 0 or len(payload) == 0:
        return bytes(payload), "none"
    cctx = zstandard.ZstdCompressor(
        level=level, write_checksum=False, write_content_size=True, write_dict_id=False
    )
    frame = cctx.compress(payload)
    if len(frame) < len(payload):
        return frame, "zstd"
    return bytes(payload), "none"


class DecompressError(ValueError):
    """A frame breaks the recipe; raised with a short reason (the container adds file and tensor)."""


class FrameLimitError(DecompressError):
    """A frame asks for more than a limit allows (window, decoded size): ``limit``/``requested``."""

    def __init__(self, message: str, *, limit: int, requested: int) -> None:
        super().__init__(message)
        self.limit = limit
        self.requested = requested


@dataclass(frozen=True)
class Frame:
    """What a frame's headers say: content size (None when not declared), window, total bytes."""

    content_size: int | None
    window_size: int
    checksum: bool
    size: int
    # Bounds on the decoded size from the block headers alone: raw and RLE blocks state their
    # decoded size, a compressed block decodes to at most Block_Maximum_Size.
    min_decoded: int
    max_decoded: int


def walk_frame(read: Read, length: int, *, max_window: int = MAX_WINDOW) -> Frame:
    """Parse one zstd frame occupying exactly ``length`` bytes, without decompressing it.

    Checks, in order: the frame magic (a skippable frame is an error), the reserved bit, no
    dictionary id, the window (``max_window``; for a single-segment frame the window is its
    content size), each block's type and size, and that the frame ends at byte ``length``.
    Raises :class:`DecompressError` (:class:`FrameLimitError` for the window).
    """
    head = read(0, 18)  # magic 4 + descriptor 1 + window 1 + dict id <= 4 + content size <= 8
    if len(head) < 5:
        raise DecompressError(f"not a zstd frame: {length} bytes, a frame needs at least 5")
    (magic,) = struct.unpack_from("<I", head, 0)
    if magic & _SKIPPABLE_MASK == _SKIPPABLE_MAGIC:
        raise DecompressError("a skippable zstd frame, expected one zstd data frame")
    if magic != _ZSTD_MAGIC:
        raise DecompressError(f"not a zstd frame: magic {magic:#010x}, expected {_ZSTD_MAGIC:#010x}")
    fhd = head[4]
    fcs_flag, single, reserved, checksum, dict_flag = fhd >> 6, (fhd >> 5) & 1, (fhd >> 3) & 1, (fhd >> 2) & 1, fhd & 3
    if reserved:
        raise DecompressError("zstd frame header has its reserved bit set")
    if dict_flag:
        raise DecompressError("zstd frame names a dictionary; sections are compressed without one")
    pos = 5
    window = 0
    if not single:
        if len(head) < 6:
            raise DecompressError("zstd frame header is truncated")
        wd = head[5]
        base = 1 << (10 + (wd >> 3))
        window = base + (base >> 3) * (wd & 7)
        pos = 6
    fcs_bytes = (1 if single else 0, 2, 4, 8)[fcs_flag]
    if len(head) < pos + fcs_bytes:
        raise DecompressError("zstd frame header is truncated")
    content: int | None = None
    if fcs_bytes:
        content = int.from_bytes(head[pos:pos + fcs_bytes], "little") + (256 if fcs_bytes == 2 else 0)
        pos += fcs_bytes
    if single:
        window = content  # type: ignore[assignment]
    if window > max_window:
        raise FrameLimitError(
            f"zstd window of {window:,} bytes exceeds the limit of {max_window:,}",
            limit=max_window, requested=window,
        )
    block_max = min(window, _BLOCK_MAX)
    lo = hi = 0
    while True:
        bh = read(pos, 3)
        if len(bh) < 3:
            raise DecompressError(f"zstd frame is truncated: block header at byte {pos} of {length}")
        v = bh[0] | bh[1] << 8 | bh[2] << 16
        last, btype, bsize = v & 1, (v >> 1) & 3, v >> 3
        if btype == 3:
            raise DecompressError(f"zstd block at byte {pos} has the reserved block type")
        if bsize > block_max:
            raise DecompressError(f"zstd block at byte {pos} is {bsize} bytes, over the frame's block maximum {block_max}")
        pos += 3 + (1 if btype == 1 else bsize)
        if btype == 2:
            hi += block_max
        else:
            lo += bsize
            hi += bsize
        if pos > length:
            raise DecompressError(f"zstd frame is truncated: a block runs to byte {pos}, the frame has {length}")
        if last:
            break
    if checksum:
        pos += 4
    if pos != length:
        if pos > length:
            raise DecompressError("zstd frame is truncated: its checksum is missing")
        raise DecompressError(f"{length - pos} bytes after the end of the zstd frame (at byte {pos})")
    return Frame(content, window, bool(checksum), pos, lo, hi)


def check_size(frame: Frame, expected: int) -> None:
    """The frame must be able to expand to exactly ``expected`` bytes: a declared content size
    equal to it, and block headers that allow it."""
    if frame.content_size is not None and frame.content_size != expected:
        raise DecompressError(f"zstd frame declares {frame.content_size} bytes, the header expects {expected}")
    if not frame.min_decoded <= expected <= frame.max_decoded:
        got = frame.min_decoded if frame.min_decoded > expected else frame.max_decoded
        raise DecompressError(f"zstd frame expands to {'at least' if got > expected else 'at most'} {got} bytes, the header expects {expected}")


def _bytes_reader(data: bytes | memoryview) -> Read:
    mv = memoryview(data)
    return lambda off, n: bytes(mv[off:off + n])


def decompress_bounded(frame_bytes: bytes, cap: int, *, max_window: int = MAX_WINDOW) -> bytes:
    """Decompress one zstd frame (the header's) whose content may not exceed ``cap`` bytes,
    declared or not: :class:`FrameLimitError` when it declares or expands to more."""
    frame = walk_frame(_bytes_reader(frame_bytes), len(frame_bytes), max_window=max_window)
    declared = frame.content_size
    if declared is not None and declared > cap:
        raise FrameLimitError(f"zstd frame declares {declared:,} decoded bytes, over the limit of {cap:,}",
                              limit=cap, requested=declared)
    if frame.min_decoded > cap:
        raise FrameLimitError(f"zstd frame expands to at least {frame.min_decoded:,} bytes, over the limit of {cap:,}",
                              limit=cap, requested=frame.min_decoded)
    if declared is not None:
        check_size(frame, declared)
        stream = PayloadStream(io.BytesIO(frame_bytes), declared, max_window=max_window)
        out = stream.read(declared) if declared else b""
        stream.finish()
        return out
    dctx = zstandard.ZstdDecompressor(max_window_size=max_window)
    reader = dctx.stream_reader(io.BytesIO(frame_bytes), read_size=1 << 17, read_across_frames=False)
    parts = []
    total = 0
    try:
        while True:
            chunk = reader.read(min(1 << 22, cap + 1 - total))
            if not chunk:
                break
            parts.append(chunk)
            total += len(chunk)
            if total > cap:
                raise FrameLimitError(f"zstd frame expands to more than the limit of {cap:,} bytes",
                                      limit=cap, requested=total)
    except zstandard.ZstdError as exc:
        raise DecompressError(f"zstd frame is corrupt ({exc})") from None
    return b"".join(parts)


class PayloadStream:
    """Decompress one zstd frame (already checked by :func:`walk_frame`) in pieces.

    ``read(n)`` returns exactly ``n`` more bytes of the payload or raises; :meth:`finish` confirms
    that the frame produced exactly ``expected`` bytes. Memory: the zstd window (at most
    ``max_window``) and the pieces asked for, never the whole payload.
    """

    def __init__(self, source: io.RawIOBase | io.BufferedIOBase, expected: int, *, max_window: int = MAX_WINDOW) -> None:
        dctx = zstandard.ZstdDecompressor(max_window_size=max_window)
        self._reader = dctx.stream_reader(source, read_size=1 << 17, read_across_frames=False, closefd=False)
        self.expected = expected
        self.done = 0

    def read(self, n: int) -> bytes:
        if self.done + n > self.expected:
            raise ValueError(f"read past the payload: {self.done} + {n} > {self.expected}")
        parts = []
        want = n
        try:
            while want:
                chunk = self._reader.read(want)
                if not chunk:
                    raise DecompressError(
                        f"zstd frame expands to {self.done + n - want} bytes, the header expects {self.expected}"
                    )
                parts.append(chunk)
                want -= len(chunk)
        except zstandard.ZstdError as exc:
            raise DecompressError(f"zstd frame is corrupt ({exc})") from None
        self.done += n
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def finish(self) -> None:
        if self.done != self.expected:
            raise ValueError(f"payload not fully read: {self.done} of {self.expected}")
        try:
            extra = self._reader.read(1)
        except zstandard.ZstdError as exc:
            raise DecompressError(f"zstd frame is corrupt ({exc})") from None
        if extra:
            raise DecompressError(f"zstd frame expands to more than the {self.expected} bytes the header expects")
