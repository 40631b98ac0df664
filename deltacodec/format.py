"""The ``.sld`` container: writer and validating reader (spec/sld-format.md is normative).

This layer needs only numpy, msgpack and zstandard, so ``sld inspect`` never imports torch.

Layout::

    0   magic            8 bytes  89 53 4C 44 0D 0A 1A 0A
    8   version          u32 LE   container version (1)
    12  header_length    u32 LE   H, bytes of the compressed header
    16  header_crc32     u32 LE   CRC-32 of those H bytes
    20  header           H bytes  one zstd frame holding a msgpack map
    20+H data            sections, contiguous, in header order; the file ends with the last one
"""

from __future__ import annotations

import math
import os
import struct
import tempfile
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import msgpack
import numpy as np
import zstandard

from . import entropy
from .errors import SldChecksumError, SldFormatError, SldLimitError, SldVersionError
from .pack import packed_nbytes, padding_is_zero, unpack_indices

__all__ = [
    "MAGIC",
    "VERSION",
    "SUPPORTED_VERSIONS",
    "PREAMBLE_SIZE",
    "TensorEntry",
    "ModuleEntry",
    "SldFile",
    "build_container",
    "atomic_write",
    "dequantize_codebook",
]

MAGIC = b"\x89SLD\r\n\x1a\n"
VERSION = 1
SUPPORTED_VERSIONS = (1,)
PREAMBLE_SIZE = 20
_PREAMBLE = struct.Struct("<8sIII")

# Caps a reader applies before allocating anything a file asks for.
MAX_HEADER_BYTES = 16 << 20
MAX_HEADER_DECODED = 64 << 20
MAX_ENTRIES = 1 << 20
MAX_NAME_BYTES = 1024
MAX_NDIM = 8
MAX_DIM = (1 << 31) - 1
MAX_NUMEL = 1 << 33
HEADER_LEVEL = 19
# What decoding a whole file may allocate, by default: every tensor as float32 (F64 extras as
# float64). A caller that trusts a larger file raises it: SldFile(path, max_decoded_bytes=N).
DEFAULT_MAX_DECODED_BYTES = 16 << 30

RAW_DTYPES = {
    "F16": (np.dtype("<f2"), 16),
    "BF16": (np.dtype("<u2"), 16),
    "F32": (np.dtype("<f4"), 32),
    "F64": (np.dtype("<f8"), 64),
}
QUANTIZERS = ("kmeans", "uniform")
COMPRESSIONS = ("zstd", "none")


@dataclass(frozen=True)
class TensorEntry:
    """One stored tensor as the header describes it (no payload).

    ``encoding`` is ``"codebook"`` (indices into ``2**bits`` values) or ``"raw"`` (``dtype``
    values as they are). ``offset`` counts from the start of the data area.
    """

    name: str
    shape: tuple[int, ...]
    encoding: str
    bits: int
    width: int
    quantizer: str | None
    dtype: str | None
    codebook_f16: bytes | None
    codebook_scale: float | None
    compression: str
    offset: int
    length: int
    crc32: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def payload_nbytes(self) -> int:
        """Size of the payload once the entropy stage is undone, derived from shape and format."""
        if self.encoding == "codebook":
            return packed_nbytes(self.numel, self.width)
        return self.numel * RAW_DTYPES[self.dtype][1] // 8

    @property
    def codebook(self) -> np.ndarray | None:
        """The dequantized codebook, float32, ``2**bits`` values (None for raw tensors)."""
        if self.codebook_f16 is None:
            return None
        return dequantize_codebook(self.codebook_f16, self.codebook_scale)


@dataclass(frozen=True)
class ModuleEntry:
    """One adapted linear module: ΔW (out×in) = scale·sin(ω·B@A)/γ, or scale·B@A for LoRA."""

    name: str
    sine: bool
    out_features: int
    in_features: int
    rank: int
    scale: float
    omega: float | None
    gamma: float | None
    fan_in_fan_out: bool
    A: TensorEntry
    B: TensorEntry

    @property
    def bits(self) -> tuple[int, int]:
        return (self.A.bits, self.B.bits)


def dequantize_codebook(codebook_f16: bytes, scale: float) -> np.ndarray:
    """float32(f16 value) × float32(scale), one correctly rounded fp32 multiply per entry."""
    return np.frombuffer(codebook_f16, dtype="<f2").astype(np.float32) * np.float32(scale)


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
    metadata: dict[str, Any], modules: list[dict[str, Any]], tensors: list[dict[str, Any]]
) -> bytes:
    """Serialise a whole file. Deterministic: same arguments, same bytes.

    Each module dict has name, sine, out_features, in_features, rank, scale, omega, gamma,
    fan_in_fan_out and A/B tensor dicts; each tensor dict has shape, encoding and its fields plus
    ``section`` (the stored bytes, after the entropy stage). Sections are laid out in header
    order: for each module A then B, then the extra tensors.
    """
    sections: list[bytes] = []
    offset = 0

    def place(t: dict[str, Any]) -> dict[str, Any]:
        nonlocal offset
        sec = t["section"]
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
    packed = msgpack.packb(header, use_bin_type=True)
    hdr = zstandard.ZstdCompressor(
        level=HEADER_LEVEL, write_checksum=False, write_content_size=True, write_dict_id=False
    ).compress(packed)
    pre = _PREAMBLE.pack(MAGIC, VERSION, len(hdr), zlib.crc32(hdr))
    return b"".join([pre, hdr, *sections])


def atomic_write(path: str | os.PathLike[str], data: bytes | Iterable[bytes]) -> None:
    """Write ``data`` to a temp file in the target directory, fsync, then rename over ``path``."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".sld-", suffix=".tmp", dir=directory)
    try:
        # mkstemp creates 0600; the result should have the permissions open() would give it.
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            if isinstance(data, (bytes, bytearray, memoryview)):
                fh.write(data)
            else:
                for chunk in data:
                    fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ----------------------------------------------------------------------------------------------
# Reader


def _ext_hook(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} is not allowed")


class _Validator:
    """Checks header types and ranges; every failure names the file and the key path."""

    def __init__(self, path: str) -> None:
        self.path = path

    def fail(self, where: str, msg: str) -> SldFormatError:
        return SldFormatError(f"{self.path}: header {where}: {msg}")

    def get(self, m: dict[str, Any], key: str, types: type | tuple[type, ...], where: str) -> Any:
        if key not in m:
            raise self.fail(where, f"missing key '{key}'")
        v = m[key]
        if isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
            raise self.fail(f"{where}.{key}", f"expected {_tname(types)}, got bool")
        if not isinstance(v, types):
            raise self.fail(f"{where}.{key}", f"expected {_tname(types)}, got {type(v).__name__}")
        return v

    def keys(self, m: dict[str, Any], allowed: set[str], where: str) -> None:
        extra = set(m) - allowed
        if extra:
            raise self.fail(where, f"unknown keys {sorted(map(str, extra))}")

    def integer(self, m: dict[str, Any], key: str, lo: int, hi: int, where: str) -> int:
        v = self.get(m, key, int, where)
        if not lo <= v <= hi:
            raise self.fail(f"{where}.{key}", f"{v} is outside [{lo}, {hi}]")
        return v

    def real(self, m: dict[str, Any], key: str, where: str) -> float:
        v = self.get(m, key, (int, float), where)
        v = float(v)
        if not math.isfinite(v):
            raise self.fail(f"{where}.{key}", f"{v} is not finite")
        return v


def _tname(types: type | tuple[type, ...]) -> str:
    if isinstance(types, tuple):
        return " or ".join(t.__name__ for t in types)
    return types.__name__


_TENSOR_KEYS_CODEBOOK = {
    "shape", "encoding", "bits", "width", "quantizer", "codebook", "codebook_scale",
    "compression", "offset", "length", "crc32",
}
_TENSOR_KEYS_RAW = {"shape", "encoding", "dtype", "compression", "offset", "length", "crc32"}
_MODULE_KEYS = {
    "name", "kind", "out_features", "in_features", "rank", "scale", "omega", "gamma",
    "fan_in_fan_out", "A", "B",
}


class SldFile:
    """A validated ``.sld`` file: header parsed and checked, tensors decoded on request.

    Opening reads the 20-byte preamble and the header only. Every size in the header is checked
    against fixed caps and the file size before anything is allocated, and the sections must be
    contiguous, in header order, and end exactly at the end of the file.
    """

    def __init__(self, path: str | os.PathLike[str], *, max_decoded_bytes: int | None = None) -> None:
        self.path = os.fspath(path)
        self.max_decoded_bytes = DEFAULT_MAX_DECODED_BYTES if max_decoded_bytes is None else int(max_decoded_bytes)
        try:
            self.file_size = os.path.getsize(self.path)
            with open(self.path, "rb") as fh:
                pre = fh.read(PREAMBLE_SIZE)
                if len(pre) < PREAMBLE_SIZE:
                    raise SldFormatError(
                        f"{self.path}: truncated: {len(pre)} bytes, an .sld file has at least "
                        f"{PREAMBLE_SIZE} (offset 0)"
                    )
                magic, version, hlen, hcrc = _PREAMBLE.unpack(pre)
                if magic != MAGIC:
                    raise SldFormatError(
                        f"{self.path}: not an .sld file: bytes 0-7 are {magic!r}, expected {MAGIC!r}"
                    )
                if version not in SUPPORTED_VERSIONS:
                    newer = " (written by a newer deltacodec)" if version > max(SUPPORTED_VERSIONS) else ""
                    raise SldVersionError(
                        f"{self.path}: container version {version}{newer} at offset 8; this reader "
                        f"supports {', '.join(map(str, SUPPORTED_VERSIONS))}",
                        found=version,
                        supported=SUPPORTED_VERSIONS,
                    )
                avail = self.file_size - PREAMBLE_SIZE
                if hlen == 0 or hlen > MAX_HEADER_BYTES or hlen > avail:
                    raise SldFormatError(
                        f"{self.path}: header length {hlen} at offset 12 is invalid: expected "
                        f"1..{min(MAX_HEADER_BYTES, avail)} (file has {self.file_size} bytes)"
                    )
                raw_header = fh.read(hlen)
        except OSError as exc:
            raise SldFormatError(f"{self.path}: cannot read: {exc.strerror or exc}") from None
        if len(raw_header) != hlen:
            raise SldFormatError(f"{self.path}: truncated inside the header (offset {PREAMBLE_SIZE})")
        if zlib.crc32(raw_header) != hcrc:
            raise SldChecksumError(
                f"{self.path}: header CRC-32 mismatch (header at offset {PREAMBLE_SIZE}, "
                f"{hlen} bytes): the file is corrupt"
            )
        self.version = version
        self.header_size = PREAMBLE_SIZE + hlen
        self.data_offset = PREAMBLE_SIZE + hlen
        header = self._parse_header(raw_header)
        self._validate(header)
        need = self.decoded_nbytes
        if need > self.max_decoded_bytes:
            raise SldLimitError(
                f"{self.path}: decoding needs {need:,} bytes, over the limit of "
                f"{self.max_decoded_bytes:,} (max_decoded_bytes / --max-decoded-bytes raises it)",
                limit=self.max_decoded_bytes,
                requested=need,
            )

    @property
    def decoded_nbytes(self) -> int:
        """Bytes every tensor takes decoded: float32 each, float64 for F64 extras."""
        return sum(e.numel * (8 if e.dtype == "F64" else 4) for e in self.entries())

    # -- header -------------------------------------------------------------------------------

    def _parse_header(self, raw: bytes) -> dict[str, Any]:
        try:
            params = zstandard.get_frame_parameters(raw)
            declared = params.content_size
            if declared != zstandard.CONTENTSIZE_UNKNOWN and declared > MAX_HEADER_DECODED:
                raise SldFormatError(
                    f"{self.path}: header declares {declared} decoded bytes, the cap is {MAX_HEADER_DECODED}"
                )
            decoded = zstandard.ZstdDecompressor().decompress(
                raw, max_output_size=MAX_HEADER_DECODED, allow_extra_data=False
            )
        except zstandard.ZstdError as exc:
            raise SldFormatError(
                f"{self.path}: header at offset {PREAMBLE_SIZE} is not a valid zstd frame: {exc}"
            ) from None
        try:
            obj = msgpack.unpackb(
                decoded,
                raw=False,
                strict_map_key=True,
                use_list=True,
                ext_hook=_ext_hook,
                max_str_len=MAX_HEADER_DECODED,
                max_bin_len=MAX_HEADER_DECODED,
                max_array_len=MAX_ENTRIES,
                max_map_len=MAX_ENTRIES,
                max_ext_len=MAX_HEADER_DECODED,
            )
        except Exception as exc:  # msgpack raises several unrelated types on bad input
            raise SldFormatError(f"{self.path}: header is not valid msgpack: {exc}") from None
        if not isinstance(obj, dict):
            raise SldFormatError(f"{self.path}: header must be a msgpack map, got {type(obj).__name__}")
        return obj

    def _validate(self, header: dict[str, Any]) -> None:
        v = _Validator(self.path)
        v.keys(header, {"metadata", "modules", "tensors"}, "root")
        meta = v.get(header, "metadata", dict, "root")
        mods = v.get(header, "modules", list, "root")
        tens = v.get(header, "tensors", list, "root")
        if len(mods) + len(tens) > MAX_ENTRIES:
            raise v.fail("root", f"{len(mods) + len(tens)} entries exceed the cap {MAX_ENTRIES}")
        if not mods and not tens:
            raise v.fail("root", "no modules and no tensors: an empty adapter")
        self.metadata: dict[str, Any] = meta
        data_size = self.file_size - self.data_offset
        cursor = 0
        names: set[str] = set()

        def name_of(m: dict[str, Any], where: str) -> str:
            n = v.get(m, "name", str, where)
            if not n or len(n.encode()) > MAX_NAME_BYTES:
                raise v.fail(f"{where}.name", f"must be 1..{MAX_NAME_BYTES} bytes")
            if n in names:
                raise v.fail(f"{where}.name", f"duplicate name '{n}'")
            names.add(n)
            return n

        def tensor(m: Any, name: str, where: str) -> TensorEntry:
            nonlocal cursor
            if not isinstance(m, dict):
                raise v.fail(where, f"expected a map, got {type(m).__name__}")
            enc = v.get(m, "encoding", str, where)
            if enc == "codebook":
                v.keys(m, _TENSOR_KEYS_CODEBOOK, where)
            elif enc == "raw":
                v.keys(m, _TENSOR_KEYS_RAW, where)
            else:
                raise v.fail(f"{where}.encoding", f"'{enc}' is not one of codebook, raw")
            shape = v.get(m, "shape", list, where)
            if not 1 <= len(shape) <= MAX_NDIM:
                raise v.fail(f"{where}.shape", f"must have 1..{MAX_NDIM} dimensions")
            for d in shape:
                if isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= MAX_DIM:
                    raise v.fail(f"{where}.shape", f"dimension {d!r} is not an integer in [1, {MAX_DIM}]")
            if math.prod(shape) > MAX_NUMEL:
                raise v.fail(f"{where}.shape", f"{math.prod(shape)} elements exceed the cap {MAX_NUMEL}")
            comp = v.get(m, "compression", str, where)
            if comp not in COMPRESSIONS:
                raise v.fail(f"{where}.compression", f"'{comp}' is not one of {', '.join(COMPRESSIONS)}")
            if enc == "codebook":
                bits = v.integer(m, "bits", 1, 8, where)
                width = v.integer(m, "width", bits, 8, where)
                quant = v.get(m, "quantizer", str, where)
                if quant not in QUANTIZERS:
                    raise v.fail(f"{where}.quantizer", f"'{quant}' is not one of {', '.join(QUANTIZERS)}")
                cb = v.get(m, "codebook", bytes, where)
                if len(cb) != 2 * (1 << bits):
                    raise v.fail(f"{where}.codebook", f"{len(cb)} bytes, expected {2 * (1 << bits)} (2**bits float16)")
                scale = v.real(m, "codebook_scale", where)
                if scale < 0 or float(np.float32(scale)) != scale:
                    raise v.fail(f"{where}.codebook_scale", f"{scale!r} is not a non-negative float32 value")
                if not np.isfinite(np.frombuffer(cb, dtype="<f2")).all():
                    raise v.fail(f"{where}.codebook", "contains NaN or Inf")
                dtype = None
            else:
                dtype = v.get(m, "dtype", str, where)
                if dtype not in RAW_DTYPES:
                    raise v.fail(f"{where}.dtype", f"'{dtype}' is not one of {', '.join(RAW_DTYPES)}")
                bits, width, quant, cb, scale = RAW_DTYPES[dtype][1], 0, None, None, None
            off = v.integer(m, "offset", 0, MAX_NUMEL * 4, where)
            length = v.integer(m, "length", 0, MAX_NUMEL * 4, where)
            crc = v.integer(m, "crc32", 0, 0xFFFFFFFF, where)
            if off != cursor:
                raise v.fail(
                    f"{where}.offset",
                    f"section starts at {off}, expected {cursor} (sections are contiguous in header order)",
                )
            if cursor + length > data_size:
                raise SldFormatError(
                    f"{self.path}: tensor '{name}': section [{self.data_offset + off}, "
                    f"{self.data_offset + off + length}) runs past the end of the file ({self.file_size} bytes): truncated?"
                )
            entry = TensorEntry(name, tuple(shape), enc, bits, width, quant, dtype, cb, scale, comp, off, length, crc)
            if comp == "none" and length != entry.payload_nbytes:
                raise v.fail(f"{where}.length", f"{length} bytes stored uncompressed, shape needs {entry.payload_nbytes}")
            if comp == "zstd" and length == 0:
                raise v.fail(f"{where}.length", "a zstd section cannot be empty")
            cursor += length
            return entry

        modules: list[ModuleEntry] = []
        for i, m in enumerate(mods):
            where = f"modules[{i}]"
            if not isinstance(m, dict):
                raise v.fail(where, f"expected a map, got {type(m).__name__}")
            v.keys(m, _MODULE_KEYS, where)
            name = name_of(m, where)
            where = f"module '{name}'"
            kind = v.get(m, "kind", str, where)
            if kind not in ("lora", "sine"):
                raise v.fail(f"{where}.kind", f"'{kind}' is not one of lora, sine")
            out_f = v.integer(m, "out_features", 1, MAX_DIM, where)
            in_f = v.integer(m, "in_features", 1, MAX_DIM, where)
            rank = v.integer(m, "rank", 1, MAX_DIM, where)
            scale = v.real(m, "scale", where)
            omega = gamma = None
            if kind == "sine":
                omega = v.real(m, "omega", where)
                gamma = v.real(m, "gamma", where)
                if omega == 0:
                    raise v.fail(f"{where}.omega", "a sine module needs a non-zero omega")
                if gamma <= 0:
                    raise v.fail(f"{where}.gamma", f"{gamma} must be > 0")
            elif "omega" in m or "gamma" in m:
                raise v.fail(where, "a lora module has no omega or gamma")
            fifo = v.get(m, "fan_in_fan_out", bool, where)
            a = tensor(m.get("A"), f"{name}.lora_A.weight", f"{where}.A")
            b = tensor(m.get("B"), f"{name}.lora_B.weight", f"{where}.B")
            if a.shape != (rank, in_f):
                raise v.fail(f"{where}.A.shape", f"{list(a.shape)}, expected [rank, in_features] = {[rank, in_f]}")
            if b.shape != (out_f, rank):
                raise v.fail(f"{where}.B.shape", f"{list(b.shape)}, expected [out_features, rank] = {[out_f, rank]}")
            modules.append(ModuleEntry(name, kind == "sine", out_f, in_f, rank, scale, omega, gamma, fifo, a, b))
        tensors: list[TensorEntry] = []
        for i, m in enumerate(tens):
            where = f"tensors[{i}]"
            if not isinstance(m, dict):
                raise v.fail(where, f"expected a map, got {type(m).__name__}")
            name = name_of(m, where)
            rest = {k: val for k, val in m.items() if k != "name"}
            tensors.append(tensor(rest, name, f"tensor '{name}'"))
        if cursor != data_size:
            raise SldFormatError(
                f"{self.path}: sections end at offset {self.data_offset + cursor} but the file has "
                f"{self.file_size} bytes: {data_size - cursor} trailing bytes"
            )
        self.modules: list[ModuleEntry] = modules
        self.tensors: list[TensorEntry] = tensors
        self._by_module = {m.name: m for m in modules}
        self._by_tensor = {t.name: t for t in tensors}

    # -- access -------------------------------------------------------------------------------

    def module(self, name: str) -> ModuleEntry:
        try:
            return self._by_module[name]
        except KeyError:
            raise KeyError(f"{self.path}: no module named '{name}'") from None

    def entries(self) -> Iterator[TensorEntry]:
        """Every stored tensor in file order."""
        for m in self.modules:
            yield m.A
            yield m.B
        yield from self.tensors

    def read_section(self, entry: TensorEntry) -> bytes:
        """The tensor's payload: section read, CRC-checked, entropy stage undone (bounded)."""
        start = self.data_offset + entry.offset
        try:
            with open(self.path, "rb") as fh:
                fh.seek(start)
                sec = fh.read(entry.length)
        except OSError as exc:
            raise SldFormatError(f"{self.path}: cannot read tensor '{entry.name}': {exc}") from None
        if len(sec) != entry.length:
            raise SldFormatError(
                f"{self.path}: tensor '{entry.name}': section at offset {start} is truncated "
                f"({len(sec)} of {entry.length} bytes)"
            )
        if zlib.crc32(sec) != entry.crc32:
            raise SldChecksumError(
                f"{self.path}: tensor '{entry.name}': CRC-32 mismatch in the section at offset "
                f"{start} ({entry.length} bytes): the file is corrupt"
            )
        if entry.compression == "none":
            return sec
        try:
            return entropy.decompress_exact(sec, entry.payload_nbytes)
        except entropy.DecompressError as exc:
            raise SldFormatError(f"{self.path}: tensor '{entry.name}' (section at offset {start}): {exc}") from None

    def indices(self, entry: TensorEntry) -> np.ndarray:
        """Codebook indices of a codebook tensor, uint8, flat in row-major order."""
        if entry.encoding != "codebook":
            raise ValueError(f"tensor '{entry.name}' is stored raw, it has no indices")
        payload = np.frombuffer(self.read_section(entry), dtype=np.uint8)
        start = self.data_offset + entry.offset
        if not padding_is_zero(payload, entry.numel, entry.width):
            raise SldFormatError(
                f"{self.path}: tensor '{entry.name}' (section at offset {start}): padding bits "
                "after the last index are not zero"
            )
        idx = unpack_indices(payload, entry.numel, entry.width)
        if entry.width > entry.bits and idx.size and int(idx.max()) >= (1 << entry.bits):
            raise SldFormatError(
                f"{self.path}: tensor '{entry.name}' (section at offset {start}): index "
                f"{int(idx.max())} out of range for a {entry.bits}-bit codebook"
            )
        return idx

    def raw_array(self, entry: TensorEntry) -> np.ndarray:
        """A raw tensor's stored values: float16/float32 as stored; BF16 widened exactly to float32."""
        if entry.encoding != "raw":
            raise ValueError(f"tensor '{entry.name}' is codebook-coded, not raw")
        payload = self.read_section(entry)
        dt = RAW_DTYPES[entry.dtype][0]
        arr = np.frombuffer(payload, dtype=dt).reshape(entry.shape)
        if entry.dtype == "BF16":
            arr = (arr.astype(np.uint32) << np.uint32(16)).view(np.float32)
        else:
            arr = arr.astype(dt.newbyteorder("="), copy=True)
        if not np.isfinite(arr).all():
            raise SldFormatError(
                f"{self.path}: tensor '{entry.name}' (section at offset "
                f"{self.data_offset + entry.offset}) contains NaN or Inf"
            )
        return arr

    def tensor(self, entry_or_name: TensorEntry | str) -> np.ndarray:
        """Decode one tensor: codebook tensors to float32 codebook[indices]; raw as :meth:`raw_array`."""
        entry = self._lookup(entry_or_name)
        if entry.encoding == "raw":
            return self.raw_array(entry)
        return entry.codebook[self.indices(entry)].reshape(entry.shape)

    def dequantize(self, module_name: str) -> tuple[np.ndarray, np.ndarray]:
        """Q(A) (r×in) and Q(B) (out×r) of one module, float32."""
        m = self.module(module_name)
        return (
            np.asarray(self.tensor(m.A), dtype=np.float32),
            np.asarray(self.tensor(m.B), dtype=np.float32),
        )

    def nbytes_module(self, name: str) -> int:
        """Bytes the module's two sections occupy in the file (header share not included)."""
        m = self.module(name)
        return m.A.length + m.B.length

    def _lookup(self, entry_or_name: TensorEntry | str) -> TensorEntry:
        if isinstance(entry_or_name, TensorEntry):
            return entry_or_name
        if entry_or_name in self._by_tensor:
            return self._by_tensor[entry_or_name]
        for m in self.modules:
            if entry_or_name == m.A.name:
                return m.A
            if entry_or_name == m.B.name:
                return m.B
        raise KeyError(f"{self.path}: no tensor named '{entry_or_name}'")

    def __repr__(self) -> str:
        return (
            f"SldFile({self.path!r}, version={self.version}, modules={len(self.modules)}, "
            f"tensors={len(self.tensors)}, bytes={self.file_size})"
        )
