"""Static-model interleaved rANS: the v2 entropy stage for quantization indices.

One *stream* codes a sequence of *segments* (one per tensor), each with its own
:class:`~deltacodec.freqtable.FreqTable`; the coder state runs on across segments, so a stream's
fixed cost (``4·lanes`` bytes of final state) is paid once, not per tensor. The stream layout
and the decoding procedure are specified in spec/sld-format.md part 2 (§13); in short:

* state ``x`` of each lane in ``[2^16, 2^32)``; symbol ``g`` of the stream (counted over all
  segments) uses lane ``g mod N``;
* the stream is the ``N`` initial decoder states (u32 little-endian), then 16-bit little-endian
  words read in order whenever a state falls below ``2^16``;
* decoding symbol: ``slot = x mod 2^P``; ``s`` with ``cum_s <= slot < cum_s + f_s``;
  ``x = f_s·(x >> P) + slot - cum_s``; refill ``x = x·2^16 + word`` if ``x < 2^16``;
* at the end every state is ``2^16`` and every word has been read.

Coding cost: within 2e-4 of the ideal code length under the table at P <= 14, plus ``4·N``
bytes per stream (measured in tests/test_rans.py and benchmarks/bench_v2_coder.py).

The compiled coder (:mod:`deltacodec._native`) does the work; :func:`encode_reference` and
:func:`decode_reference` are the plain-Python definition used when it is missing and as the
independent reference in tests.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np

from . import _native
from .freqtable import FreqTable

__all__ = [
    "LANES",
    "MAX_LANES",
    "RansError",
    "encode",
    "decode",
    "decode_values",
    "encode_reference",
    "decode_reference",
    "native_available",
]

LANES = 4
MAX_LANES = 32
RANS_L = 1 << 16
_ERRORS = {
    -1: "invalid lanes, precision or segment sizes",
    -2: "stream is shorter than its lane states or has an odd number of word bytes",
    -3: "an initial lane state is below 2^16",
    -4: "stream ends before the last symbol",
    -5: "a final lane state is not 2^16 (corrupt stream)",
    -6: "words left over after the last symbol",
    -7: "a symbol is outside its table or has frequency 0",
    -8: "output buffer too small",
}
_warned = False


class RansError(ValueError):
    """A stream or its segments are invalid; the container layer adds file and tensor."""


def native_available() -> bool:
    return _native.library() is not None


def _fallback_warning() -> None:
    global _warned
    if not _warned:
        _warned = True
        from .errors import DeltacodecWarning

        warnings.warn(
            "the compiled rANS coder is unavailable (no C compiler?); using the pure-Python "
            "coder, which is about 1000x slower",
            DeltacodecWarning,
            stacklevel=3,
        )


def _check_lanes(lanes: int) -> None:
    if not 1 <= lanes <= MAX_LANES:
        raise RansError(f"lanes must be 1..{MAX_LANES}, got {lanes}")


def _symbols_of(indices: np.ndarray, table: FreqTable) -> np.ndarray:
    idx = np.asarray(indices).reshape(-1)
    if idx.size and (int(idx.min()) < table.imin or int(idx.max()) > table.imax):
        raise RansError(f"indices {int(idx.min())}..{int(idx.max())} outside the table's {table.imin}..{table.imax}")
    return (idx.astype(np.int64) - table.imin).astype(np.uint16)


# ------------------------------------------------------------------------------------------------
# Encoding


def encode(segments: Sequence[tuple[np.ndarray, FreqTable]], lanes: int = LANES) -> bytes:
    """Code the indices of every segment, in order, into one stream.

    ``segments``: ``(indices, table)`` pairs; indices are integers in ``table.imin..table.imax``
    whose symbols have non-zero frequency. Returns the stream bytes (``4·lanes + 2·words``).
    """
    _check_lanes(lanes)
    lib = _native.library()
    if lib is None:
        _fallback_warning()
        return encode_reference(segments, lanes)
    syms = [_symbols_of(ix, t) for ix, t in segments]
    tables = [t for _, t in segments]
    nseg = len(segments)
    seg_n = np.array([s.size for s in syms], dtype=np.int64)
    seg_p = np.array([t.precision for t in tables], dtype=np.int32)
    seg_k = np.array([t.size for t in tables], dtype=np.int32)
    seg_tab = np.zeros(nseg, dtype=np.int64)
    if nseg > 1:
        np.cumsum(seg_k[:-1], out=seg_tab[1:])
    freq = np.concatenate([t.freqs for t in tables]).astype(np.uint32) if nseg else np.zeros(1, np.uint32)
    cum = np.concatenate([t.cum for t in tables]).astype(np.uint32) if nseg else np.zeros(1, np.uint32)
    allsym = np.concatenate(syms) if nseg else np.zeros(0, np.uint16)
    total = int(seg_n.sum())
    scratch = np.empty(max(total, 1), dtype=np.uint16)
    out = np.empty(4 * lanes + 2 * total, dtype=np.uint8)
    p = lambda a: a.ctypes.data_as(_native._P)  # noqa: E731
    rc = lib.sld_rans_encode(nseg, p(seg_n), p(seg_p), p(seg_tab), p(seg_k), p(freq), p(cum), p(allsym),
                             lanes, p(scratch), scratch.size, p(out), out.size)
    if rc < 0:
        raise RansError(_ERRORS.get(int(rc), f"encoder error {rc}"))
    return out[:rc].tobytes()


def encode_reference(segments: Sequence[tuple[np.ndarray, FreqTable]], lanes: int = LANES) -> bytes:
    """Plain-Python encoder (the definition; slow)."""
    _check_lanes(lanes)
    seq: list[tuple[int, FreqTable]] = []
    for ix, t in segments:
        for s in _symbols_of(ix, t).tolist():
            seq.append((s, t))
    x = [RANS_L] * lanes
    words: list[int] = []
    cums = {id(t): t.cum.tolist() for _, t in segments}
    for g in range(len(seq) - 1, -1, -1):
        s, t = seq[g]
        f = int(t.freqs[s])
        if f == 0:
            raise RansError(_ERRORS[-7])
        j = g % lanes
        v = x[j]
        if v >= f << (32 - t.precision):
            words.append(v & 0xFFFF)
            v >>= 16
        x[j] = ((v // f) << t.precision) + (v % f) + cums[id(t)][s]
    out = bytearray()
    for v in x:
        out += v.to_bytes(4, "little")
    for w in reversed(words):
        out += w.to_bytes(2, "little")
    return bytes(out)


# ------------------------------------------------------------------------------------------------
# Decoding


def _slot_entries(tables: Sequence[FreqTable], values: Sequence[np.ndarray] | None) -> tuple[np.ndarray, np.ndarray]:
    """Per-slot 64-bit entries of every table (low word ``f << 16 | (slot - cum)``, high word the
    symbol or the float32 bits of its value) and each table's offset (compiled coder only)."""
    lib = _native.library()
    sizes = np.array([1 << t.precision for t in tables], dtype=np.int64)
    offs = np.zeros(len(tables), dtype=np.int64)
    if len(tables) > 1:
        np.cumsum(sizes[:-1], out=offs[1:])
    ent = np.empty(max(int(sizes.sum()), 1), dtype=np.uint64)
    for k, t in enumerate(tables):
        f = np.ascontiguousarray(t.freqs, dtype=np.int64)
        if values is None:
            vp = None
        else:
            v = np.ascontiguousarray(values[k], dtype=np.float32).reshape(-1)
            if v.size != t.size:
                raise RansError(f"{v.size} reconstruction values for a table of {t.size} symbols")
            vp = v.ctypes.data_as(_native._P)
        dst = ent[offs[k]:]
        rc = lib.sld_build_slots(t.size, t.precision, f.ctypes.data_as(_native._P), vp, dst.ctypes.data_as(_native._P))
        if rc < 0:
            raise RansError("table frequencies do not sum to 2^P")
    return ent, offs


def _as_buffer(data: bytes) -> np.ndarray:
    """A uint8 view of ``data`` without copying (bytes, bytearray, memoryview or ndarray)."""
    if len(data) == 0:
        return np.zeros(1, np.uint8)
    return np.frombuffer(data, dtype=np.uint8)


def _check_segments(segments: Sequence[tuple]) -> None:
    for seg in segments:
        n, t = seg[0], seg[1]
        if n < 0:
            raise RansError(f"segment of {n} symbols")
        if int(t.freqs.sum()) != 1 << t.precision:
            raise RansError("table frequencies do not sum to 2^P")


def decode(data: bytes, segments: Sequence[tuple[int, FreqTable]], lanes: int = LANES) -> list[np.ndarray]:
    """Decode a stream into each segment's indices (int32 arrays, ``table.imin`` added back)."""
    symbols = decode_symbols(data, segments, lanes)
    res, pos = [], 0
    for n, t in segments:
        res.append(symbols[pos : pos + n].astype(np.int32) + t.imin)
        pos += n
    return res


def decode_symbols(data: bytes, segments: Sequence[tuple[int, FreqTable]], lanes: int = LANES) -> np.ndarray:
    """Decode a stream into the symbols (index - imin of each segment's table), concatenated
    over the segments, as one uint16 array (what a container decodes a tensor to)."""
    _check_lanes(lanes)
    _check_segments(segments)
    lib = _native.library()
    if lib is None:
        _fallback_warning()
        parts = decode_reference(data, segments, lanes)
        return np.concatenate([p - t.imin for p, (_, t) in zip(parts, segments)] or
                              [np.zeros(0, np.int32)]).astype(np.uint16)
    tables = [t for _, t in segments]
    ent, offs = _slot_entries(tables, None)
    seg_n = np.array([n for n, _ in segments], dtype=np.int64)
    seg_p = np.array([t.precision for t in tables], dtype=np.int32)
    total = int(seg_n.sum())
    out = np.empty(max(total, 1), dtype=np.uint16)
    buf = _as_buffer(data)
    p = lambda a: a.ctypes.data_as(_native._P)  # noqa: E731
    rc = lib.sld_rans_decode(p(buf), len(data), len(segments), p(seg_n), p(seg_p), p(offs), p(ent),
                             lanes, p(out), None)
    if rc < 0:
        raise RansError(_ERRORS.get(int(rc), f"decoder error {rc}"))
    return out[:total]


def decode_values(
    data: bytes,
    segments: Sequence[tuple[int, FreqTable, np.ndarray]],
    lanes: int = LANES,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Decode a stream straight into reconstruction values: ``segments`` are
    ``(n, table, values)`` with ``values[s]`` (float32, K entries) the value of symbol ``s``.
    Returns the concatenated float32 values of all segments (or fills ``out``)."""
    _check_lanes(lanes)
    _check_segments(segments)
    total = sum(int(s[0]) for s in segments)
    if out is None:
        out = np.empty(total, dtype=np.float32)
    if out.dtype != np.float32 or out.size != total or not out.flags.c_contiguous:
        raise RansError(f"out must be a contiguous float32 array of {total} values")
    lib = _native.library()
    if lib is None:
        _fallback_warning()
        pos = 0
        for (n, t, v), ix in zip(segments, decode_reference(data, [(s[0], s[1]) for s in segments], lanes)):
            out[pos : pos + n] = np.asarray(v, dtype=np.float32)[ix - t.imin]
            pos += n
        return out
    tables = [s[1] for s in segments]
    ent, offs = _slot_entries(tables, [s[2] for s in segments])
    seg_n = np.array([s[0] for s in segments], dtype=np.int64)
    seg_p = np.array([t.precision for t in tables], dtype=np.int32)
    buf = _as_buffer(data)
    dst = out if total else np.zeros(1, np.float32)
    p = lambda a: a.ctypes.data_as(_native._P)  # noqa: E731
    rc = lib.sld_rans_decode(p(buf), len(data), len(segments), p(seg_n), p(seg_p), p(offs), p(ent),
                             lanes, None, p(dst))
    if rc < 0:
        raise RansError(_ERRORS.get(int(rc), f"decoder error {rc}"))
    return out


def decode_reference(data: bytes, segments: Sequence[tuple[int, FreqTable]], lanes: int = LANES) -> list[np.ndarray]:
    """Plain-Python decoder (the definition; slow)."""
    _check_lanes(lanes)
    data = bytes(data)
    if len(data) < 4 * lanes or (len(data) - 4 * lanes) % 2:
        raise RansError(_ERRORS[-2])
    x = [int.from_bytes(data[4 * j : 4 * j + 4], "little") for j in range(lanes)]
    if min(x) < RANS_L:
        raise RansError(_ERRORS[-3])
    pos = 4 * lanes
    g = 0
    res = []
    for n, t in segments:
        p = t.precision
        mask = (1 << p) - 1
        cum = t.cum.tolist()
        freqs = t.freqs.tolist()
        slot_sym = np.repeat(np.arange(t.size), t.freqs).tolist()
        out = np.empty(n, dtype=np.int32)
        for i in range(n):
            j = g % lanes
            v = x[j]
            slot = v & mask
            s = slot_sym[slot]
            v = freqs[s] * (v >> p) + slot - cum[s]
            if v < RANS_L:
                if pos + 2 > len(data):
                    raise RansError(_ERRORS[-4])
                v = (v << 16) | int.from_bytes(data[pos : pos + 2], "little")
                pos += 2
            x[j] = v
            out[i] = s + t.imin
            g += 1
        res.append(out)
    if any(v != RANS_L for v in x):
        raise RansError(_ERRORS[-5])
    if pos != len(data):
        raise RansError(_ERRORS[-6])
    return res
