"""The ``.sld`` header: msgpack parsed under the spec's caps, and the schema every entry must meet.

One set of rules for reader and writer: :func:`parse_header` is what ``SldFile`` runs on a file's
decoded header, and the writer runs the same reader on the bytes it is about to write
(``format.build_container``). spec/sld-format.md sections 3, 6 and 7 are normative.

Parsing is driven from Python only down to the entries: the root map, the metadata (walked
value by value, so nesting depth and value counts are checked *before* anything deeper is
built) and the two entry arrays. Each module or tensor map is then unpacked by msgpack's C code
with every inner map or array capped at 16 elements, validated at once and dropped, so what the
header costs in memory is the entries kept, not the msgpack objects.
"""

from __future__ import annotations

import gc
import io
import math
import re
import struct
from dataclasses import dataclass, field
from typing import Any, Iterator, NamedTuple

import msgpack
import numpy as np

from .errors import SldFormatError, SldLimitError
from .pack import packed_nbytes

__all__ = [
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
    "MODULE_BOUND",
    "TensorEntry",
    "ModuleEntry",
    "Header",
    "parse_header",
    "dequantize_codebook",
    "module_bound",
    "name_problem",
    "model_keys",
]

# --- limits (spec section 7.1) ---------------------------------------------------------------
MAX_HEADER_BYTES = 1 << 28  # H, the compressed header
MAX_HEADER_DECODED = 1 << 28  # the msgpack bytes
MAX_ENTRIES = 1 << 17  # modules + extra tensors
MAX_CONTAINER = 1 << 17  # elements of one map or array
MAX_DEPTH = 32  # maps and arrays nested, the root map being level 1
MAX_METADATA_VALUES = 1 << 20  # keys, values and elements inside metadata, all levels
MAX_NAME_BYTES = 1024
MAX_QUANTIZER_BYTES = 64
MAX_NDIM = 8
MAX_DIM = (1 << 31) - 1
MAX_NUMEL = 1 << 33
# Module rule (section 6.2): rank * max(1,|k|) * max(1,a) * max(1,b) <= 2^127 = FLT_MAX/2 leaves
# a factor of 2 for float32 rounding in the rank-r sums.
MODULE_BOUND = 2.0**127
F16_MAX = 65504.0
# float32(x) is finite iff |x| < 2^128 - 2^103 (FLT_MAX plus half an ulp; the tie rounds to inf).
_F32_OVERFLOW = 2.0**128 - 2.0**103
# Inside a module or tensor map no map or array has more than 13 elements; 16 bounds what msgpack
# may build for one entry however it nests (msgpack's own stack stops at 1024 levels).
_ENTRY_CONTAINER = 16
_U64_MAX = (1 << 64) - 1

PEFT_PREFIX = "base_model.model."
RAW_DTYPES = {"F16": ("<f2", 2), "BF16": ("<u2", 2), "F32": ("<f4", 4), "F64": ("<f8", 8)}
COMPRESSIONS = ("zstd", "none")
KINDS = ("lora", "sine")

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")

_CB_KEYS = frozenset(
    ("shape", "encoding", "bits", "width", "quantizer", "codebook", "codebook_scale", "compression", "offset", "length", "crc32")
)
_RAW_KEYS = frozenset(("shape", "encoding", "dtype", "compression", "offset", "length", "crc32"))
_LORA_KEYS = frozenset(("name", "kind", "out_features", "in_features", "rank", "scale", "fan_in_fan_out", "A", "B"))
_SINE_KEYS = _LORA_KEYS | {"omega", "gamma"}
_ROOT_KEYS = ("metadata", "modules", "tensors")
_SCALAR_TYPES = frozenset((type(None), bool, int, float, str, bytes))


class TensorEntry(NamedTuple):
    """One stored tensor as the header describes it (no payload).

    ``encoding`` is ``"codebook"`` (indices into ``2**bits`` values) or ``"raw"`` (``dtype``
    values as they are). ``offset`` counts from the start of the data area. ``value_bound`` is
    the largest |value| the encoding can decode to (max |codebook value|; 65504 for F16), None
    when only the decoded values tell (BF16, F32, F64). Immutable (a named tuple: cheap to
    build, which matters at 2^17 entries).
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
    value_bound: float | None = None
    # container version 2 (header_v2): (lanes, sideinfo.QuantSide or FieldSide); None in version 1
    coder: Any = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def payload_nbytes(self) -> int:
        """Size of the payload once the entropy stage is undone, derived from shape and format."""
        if self.encoding == "codebook":
            return packed_nbytes(self.numel, self.width)
        return self.numel * RAW_DTYPES[self.dtype][1]

    @property
    def decoded_dtype(self) -> np.dtype:
        """What decoding yields: float32, except float16 for raw F16 and float64 for raw F64."""
        return np.dtype({"F16": np.float16, "F64": np.float64}.get(self.dtype, np.float32))

    @property
    def codebook(self) -> np.ndarray | None:
        """The dequantized codebook, float32, ``2**bits`` values (None for raw tensors).

        Version 2 quantized tensors: the value of each symbol (index - imin), padded with zeros
        to ``2**bits`` entries (the rANS decoder never yields a symbol past the table)."""
        if self.coder is not None and self.encoding == "codebook":
            vals = self.coder[1].values
            out = np.zeros(1 << self.bits, dtype=np.float32)
            out[: vals.size] = vals
            return out
        if self.codebook_f16 is None:
            return None
        # validated at open: the products are finite (section 6.1), no overflow guard needed
        return np.frombuffer(self.codebook_f16, dtype="<f2").astype(np.float32) * np.float32(self.codebook_scale)


class ModuleEntry(NamedTuple):
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
    # A conv module's kernel shape (out, in, kh[, kw[, kd]]): ΔW is the out×in·kh·kw matrix
    # reshaped to it. None for a linear module, and always in a version-1 file.
    weight_shape: tuple[int, ...] | None = None

    @property
    def bits(self) -> tuple[int, int]:
        return (self.A.bits, self.B.bits)


@dataclass
class Header:
    metadata: dict[str, Any]
    modules: list[ModuleEntry] = field(default_factory=list)
    tensors: list[TensorEntry] = field(default_factory=list)
    decoded_nbytes: int = 0
    data_crc32: int | None = None  # version 2: CRC-32 of the whole data area (version 1: per section)


def dequantize_codebook(codebook_f16: bytes, scale: float) -> np.ndarray:
    """float32(f16 value) × float32(scale), one correctly rounded fp32 multiply per entry."""
    with np.errstate(over="ignore"):
        return np.frombuffer(codebook_f16, dtype="<f2").astype(np.float32) * np.float32(scale)


_F32 = struct.Struct("<f")


def _max_abs_f16(cb: bytes, bits: int) -> float:
    """max |value| of float16 values; NaN when one is NaN or ±inf."""
    if bits <= 5:  # up to 32 values: plain Python beats numpy's per-call overhead
        vals = struct.unpack(f"<{1 << bits}e", cb)
        return max(map(abs, vals)) if math.isfinite(sum(vals)) else math.nan
    return float(np.abs(np.frombuffer(cb, dtype="<f2")).max())


def f32_finite(x: float) -> bool:
    """Whether float32(x), rounded to nearest even, is finite."""
    return abs(x) < _F32_OVERFLOW


def module_bound(rank: int, k: float, a: float, b: float) -> float:
    """rank · max(1,|k|) · max(1,a) · max(1,b) in float64 (section 6.2): bounds every product and
    rank-r sum in forming ΔW, whatever the evaluation order. ``k`` is ω for sine modules and the
    scale for LoRA; ``a``, ``b`` bound |A| and |B|."""
    return rank * max(1.0, abs(k)) * max(1.0, a) * max(1.0, b)


def name_problem(name: str) -> str | None:
    """Why ``name`` is not a valid module or tensor name (section 3.6), or None."""
    n = len(name.encode("utf-8", "surrogatepass"))
    if not 1 <= n <= MAX_NAME_BYTES:
        return f"is {n} bytes, names are 1..{MAX_NAME_BYTES} bytes of UTF-8"
    m = _CONTROL.search(name)
    if m:
        return f"contains the control character U+{ord(m.group()):04X} at character {m.start()}"
    if name == PEFT_PREFIX:
        return f"is only the prefix '{PEFT_PREFIX}'"
    return None


def _strip(name: str) -> str:
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


def model_keys(name: str, module: bool) -> tuple[str, ...]:
    """The model-side tensor names an entry claims (section 3.6): a module patches
    ``<stem>.weight`` and its factors are ``<stem>.lora_A.weight``/``lora_B.weight``; an extra
    tensor replaces ``<stem>``; stem = the name without PEFT's ``base_model.model.`` prefix."""
    s = _strip(name)
    if module:
        return (s + ".weight", s + ".lora_A.weight", s + ".lora_B.weight")
    return (s,)


def show(v: Any, limit: int = 60) -> str:
    """A value for an error message: short, one line, control characters escaped, no recursion."""
    if isinstance(v, (dict, tuple)):
        return "a map"
    if isinstance(v, list):
        return "an array"
    r = repr(v)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _tname(v: Any) -> str:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (dict, tuple)):
        return "map"
    if isinstance(v, list):
        return "array"
    return {int: "int", float: "float", str: "str", bytes: "bin", type(None): "nil"}.get(type(v), type(v).__name__)


class _Ext(Exception):
    pass


def _ext_hook(code: int, data: bytes) -> Any:
    raise _Ext(code)


# msgpack type bytes (msgpack spec, "Formats")
def _is_map(b: int) -> bool:
    return 0x80 <= b <= 0x8F or b in (0xDE, 0xDF)


def _is_array(b: int) -> bool:
    return 0x90 <= b <= 0x9F or b in (0xDC, 0xDD)


def _byte_type(b: int) -> str:
    """The msgpack type a value starting with byte ``b`` has (for messages; nothing is parsed)."""
    if b <= 0x7F or b >= 0xE0 or 0xCC <= b <= 0xD3:
        return "int"
    if _is_map(b):
        return "map"
    if _is_array(b):
        return "array"
    if 0xA0 <= b <= 0xBF or 0xD9 <= b <= 0xDB:
        return "str"
    if 0xC4 <= b <= 0xC6:
        return "bin"
    if 0xC7 <= b <= 0xC9 or 0xD4 <= b <= 0xD8:
        return "ext"
    return {0xC0: "nil", 0xC2: "bool", 0xC3: "bool", 0xCA: "float", 0xCB: "float"}.get(b, "invalid byte 0xc1")


class _Parser:
    """One pass over the decoded header; every error names the file and the key path."""

    def __init__(self, data: bytes, label: str) -> None:
        self.data = data
        self.label = label
        self.u = msgpack.Unpacker(
            io.BytesIO(data),
            read_size=1 << 20,
            max_buffer_size=max(len(data), 1 << 20),
            raw=False,
            use_list=True,
            strict_map_key=True,
            object_pairs_hook=tuple,
            ext_hook=_ext_hook,
            max_str_len=MAX_HEADER_DECODED,
            max_bin_len=MAX_HEADER_DECODED,
            max_array_len=_ENTRY_CONTAINER,
            max_map_len=_ENTRY_CONTAINER,
            max_ext_len=MAX_HEADER_DECODED,
        )
        self.meta_values = 0
        self.names: dict[str, str] = {}

    # -- errors -------------------------------------------------------------------------------

    def fail(self, where: str, msg: str) -> SldFormatError:
        return SldFormatError(f"{self.label}: header {where}: {msg}")

    def limit(self, where: str, msg: str, limit: int, requested: int) -> SldLimitError:
        return SldLimitError(f"{self.label}: header {where}: {msg}", limit=limit, requested=requested)

    def _call(self, fn, where: str) -> Any:
        """Run one Unpacker step; msgpack's many exception types become the library's."""
        pos = self.u.tell()
        try:
            return fn()
        except msgpack.OutOfData:
            raise self.fail(where, f"the msgpack data ends inside a value (byte {pos} of {len(self.data)})") from None
        except msgpack.exceptions.StackError:
            raise self.limit(where, f"maps and arrays nest deeper than msgpack's stack (over {MAX_DEPTH} levels)",
                             MAX_DEPTH, 1025) from None
        except _Ext as exc:
            raise self.fail(where, f"msgpack extension type {exc.args[0]} at byte {pos} is not allowed") from None
        except UnicodeDecodeError:
            raise self.fail(where, f"a string at byte {pos} is not valid UTF-8") from None
        except Exception as exc:  # msgpack raises ValueError/TypeError/FormatError variants
            text = str(exc)
            if "exceeds max_" in text:
                raise self.fail(where, f"a map or array inside an entry has more than {_ENTRY_CONTAINER} elements "
                                       "(module and tensor maps have at most 13 keys)") from None
            if "not allowed for map key" in text:
                raise self.fail(where, f"a map key at byte {pos} is not a string") from None
            raise self.fail(where, f"not valid msgpack at byte {pos}: {text}") from None

    def peek(self, where: str) -> int:
        pos = self.u.tell()
        if pos >= len(self.data):
            raise self.fail(where, f"the msgpack data ends before a value (byte {pos})")
        return self.data[pos]

    def scalar(self, where: str) -> Any:
        return self._call(self.u.unpack, where)

    # -- the root -----------------------------------------------------------------------------

    def run(self) -> Header:
        b = self.peek("root")
        if not _is_map(b):
            raise SldFormatError(f"{self.label}: header must be a msgpack map, got {_byte_type(b)}")
        n = self._call(self.u.read_map_header, "root")
        seen: dict[str, Any] = {}
        hdr = Header(metadata={})
        for _ in range(n):
            key = self.key("root", seen)
            if key not in _ROOT_KEYS:
                raise self.fail("root", f"unknown key {show(key)} (expected exactly {', '.join(_ROOT_KEYS)})")
            if key == "metadata":
                b = self.peek("root.metadata")
                if not _is_map(b):
                    raise self.fail("root.metadata", f"expected map, got {_byte_type(b)}")
                hdr.metadata = self.value("metadata", 2)
            else:
                self.entries(key, hdr)
            seen[key] = True
        missing = [k for k in _ROOT_KEYS if k not in seen]
        if missing:
            raise self.fail("root", f"missing key '{missing[0]}'")
        end = self.u.tell()
        if end != len(self.data):
            raise self.fail("root", f"{len(self.data) - end} bytes after the header map (at byte {end}); "
                                    "the decoded header is exactly one msgpack map")
        if not hdr.modules and not hdr.tensors:
            raise self.fail("root", "no modules and no tensors: an empty adapter")
        self.collisions(hdr)
        return hdr

    def key(self, where: str, seen: dict[str, Any]) -> str:
        b = self.peek(where)
        if _is_map(b) or _is_array(b):
            raise self.fail(where, f"a map key at byte {self.u.tell()} is not a string")
        k = self.scalar(where)
        if type(k) is not str:
            raise self.fail(where, f"map key {show(k)} is not a string")
        if k in seen:
            raise self.fail(where, f"duplicate map key {show(k)}")
        return k

    def value(self, where: str, depth: int) -> Any:
        """A metadata value, walked container by container: depth and counts checked before
        anything inside a container is built."""
        b = self.peek(where)
        if _is_map(b) or _is_array(b):
            if depth > MAX_DEPTH:
                raise self.limit(where, f"maps and arrays nest deeper than {MAX_DEPTH} levels", MAX_DEPTH, depth)
            is_map = _is_map(b)
            n = self._call(self.u.read_map_header if is_map else self.u.read_array_header, where)
            if n > MAX_CONTAINER:
                raise self.limit(where, f"{'a map' if is_map else 'an array'} of {n:,} elements, over the limit of "
                                        f"{MAX_CONTAINER:,}", MAX_CONTAINER, n)
            self.meta_values += 2 * n if is_map else n
            if self.meta_values > MAX_METADATA_VALUES:
                raise self.limit(where, f"metadata holds over {MAX_METADATA_VALUES:,} values", MAX_METADATA_VALUES,
                                 self.meta_values)
            if is_map:
                d: dict[str, Any] = {}
                for _ in range(n):
                    k = self.key(where, d)
                    d[k] = self.value(f"{where}.{show(k, 40)}" if depth < 6 else where, depth + 1)
                return d
            return [self.value(where, depth + 1) for _ in range(n)]
        v = self.scalar(where)
        if type(v) not in _SCALAR_TYPES:  # msgpack-python decodes the timestamp extension itself
            raise self.fail(where, f"msgpack extension type -1 (timestamp) at byte {self.u.tell()} is not allowed")
        return v

    def entries(self, key: str, hdr: Header) -> None:
        where = f"root.{key}"
        b = self.peek(where)
        if not _is_array(b):
            raise self.fail(where, f"expected array, got {_byte_type(b)}")
        n = self._call(self.u.read_array_header, where)
        total = n + len(hdr.modules) + len(hdr.tensors)
        if total > MAX_ENTRIES:
            raise self.limit(where, f"{total:,} modules and tensors, over the limit of {MAX_ENTRIES:,}", MAX_ENTRIES, total)
        for i in range(n):
            w = f"{key}[{i}]"
            b = self.peek(w)
            if not _is_map(b):
                raise self.fail(w, f"expected a map, got {_byte_type(b)}")
            obj = self._call(self.u.unpack, w)
            if key == "modules":
                m = self.module(obj, w)
                hdr.modules.append(m)
                hdr.decoded_nbytes += 4 * (m.A.numel + m.B.numel)
            else:
                t = self.extra(obj, w)
                hdr.tensors.append(t)
                hdr.decoded_nbytes += t.numel * (8 if t.dtype == "F64" else 4)

    # -- entries ------------------------------------------------------------------------------

    def as_map(self, obj: Any, where: str) -> dict[str, Any]:
        if type(obj) is not tuple:
            raise self.fail(where, f"expected map, got {_tname(obj)}")
        d = dict(obj)
        if len(d) != len(obj):
            seen: set[Any] = set()
            dup = next(k for k, _ in obj if k in seen or seen.add(k))
            raise self.fail(where, f"duplicate map key {show(dup)}")
        return d

    def keys(self, d: dict[str, Any], allowed: frozenset[str], where: str) -> None:
        if d.keys() != allowed:
            extra = [k for k in d if k not in allowed]
            if extra:
                raise self.fail(where, f"unknown key {show(extra[0])}")
            missing = sorted(allowed - d.keys())
            raise self.fail(where, f"missing key '{missing[0]}'")

    def integer(self, d: dict[str, Any], key: str, lo: int, hi: int, where: str) -> int:
        v = d[key]
        if type(v) is not int:
            raise self.fail(f"{where}.{key}", f"expected int, got {_tname(v)}")
        if not lo <= v <= hi:
            raise self.fail(f"{where}.{key}", f"{v} is outside [{lo}, {hi}]")
        return v

    def real(self, d: dict[str, Any], key: str, where: str) -> float:
        v = d[key]
        if type(v) is not float:
            raise self.fail(f"{where}.{key}", f"expected float, got {_tname(v)}")
        if not math.isfinite(v):
            raise self.fail(f"{where}.{key}", f"{v} is not finite")
        return v

    def string(self, d: dict[str, Any], key: str, where: str, choices: tuple[str, ...] | None = None) -> str:
        v = d[key]
        if type(v) is not str:
            raise self.fail(f"{where}.{key}", f"expected str, got {_tname(v)}")
        if choices is not None and v not in choices:
            raise self.fail(f"{where}.{key}", f"{show(v)} is not one of {', '.join(choices)}")
        return v

    def shape_numel(self, shape: Any, where: str) -> int:
        """A tensor's ``shape`` (1..MAX_NDIM ints in [1, MAX_DIM]) checked, and its element count
        (at most MAX_NUMEL)."""
        if type(shape) is not list:
            raise self.fail(f"{where}.shape", f"expected array, got {_tname(shape)}")
        if not 1 <= len(shape) <= MAX_NDIM:
            raise self.fail(f"{where}.shape", f"has {len(shape)} dimensions, expected 1..{MAX_NDIM}")
        numel = 1
        for dim in shape:
            if type(dim) is not int or not 1 <= dim <= MAX_DIM:
                raise self.fail(f"{where}.shape", f"dimension {show(dim)} is not an int in [1, {MAX_DIM}]")
            numel *= dim
        if numel > MAX_NUMEL:
            raise self.limit(f"{where}.shape", f"{numel:,} elements, over the limit of {MAX_NUMEL:,}", MAX_NUMEL, numel)
        return numel

    def sine_coefficients(self, omega: float, gamma: float, where: str) -> None:
        """ω ≠ 0 and γ > 0 for a sine module (section 3.4)."""
        if omega == 0:
            raise self.fail(f"{where}.omega", "a sine module needs a non-zero omega")
        if not gamma > 0:
            raise self.fail(f"{where}.gamma", f"{gamma} must be > 0")

    def fan_in_fan_out(self, fifo: Any, where: str) -> bool:
        if type(fifo) is not bool:
            raise self.fail(f"{where}.fan_in_fan_out", f"expected bool, got {_tname(fifo)}")
        return fifo

    def name(self, d: dict[str, Any], where: str) -> str:
        n = self.string(d, "name", where)
        why = name_problem(n)
        if why:
            raise self.fail(f"{where}.name", f"{show(n)} {why}")
        if n in self.names:
            raise self.fail(f"{where}.name", f"duplicate name {show(n)}")
        self.names[n] = where
        return n

    def module(self, obj: Any, where: str) -> ModuleEntry:
        d = self.as_map(obj, where)
        kind = d.get("kind")
        if kind == "sine":
            sine, allowed = True, _SINE_KEYS
        elif kind == "lora":
            sine, allowed = False, _LORA_KEYS
            if "omega" in d or "gamma" in d:
                raise self.fail(where, "a lora module has no omega or gamma")
        elif "kind" not in d:
            raise self.fail(where, "missing key 'kind'")
        else:
            raise self.fail(f"{where}.kind", f"{show(kind)} is not one of lora, sine")
        if d.keys() != allowed:
            self.keys(d, allowed, where)
        name = self.name(d, where)
        where = f"module '{name}'"  # the name has no control characters by now
        out_f = self.integer(d, "out_features", 1, MAX_DIM, where)
        in_f = self.integer(d, "in_features", 1, MAX_DIM, where)
        rank = self.integer(d, "rank", 1, MAX_DIM, where)
        scale = self.real(d, "scale", where)
        omega = gamma = None
        if sine:
            omega = self.real(d, "omega", where)
            gamma = self.real(d, "gamma", where)
            self.sine_coefficients(omega, gamma, where)
        fifo = self.fan_in_fan_out(d["fan_in_fan_out"], where)
        a = self.tensor(self.as_map(d["A"], f"{where}.A"), name + ".lora_A.weight", f"{where}.A")
        b = self.tensor(self.as_map(d["B"], f"{where}.B"), name + ".lora_B.weight", f"{where}.B")
        if a.shape != (rank, in_f):
            raise self.fail(f"{where}.A.shape", f"{list(a.shape)}, expected [rank, in_features] = {[rank, in_f]}")
        if b.shape != (out_f, rank):
            raise self.fail(f"{where}.B.shape", f"{list(b.shape)}, expected [out_features, rank] = {[out_f, rank]}")
        m = ModuleEntry(name, sine, out_f, in_f, rank, scale, omega, gamma, fifo, a, b)
        problem = coefficient_problem(m)
        if problem is None and a.value_bound is not None and b.value_bound is not None:
            problem = bound_problem(m, a.value_bound, b.value_bound)
        if problem:
            raise self.fail(where, problem)
        return m

    def extra(self, obj: Any, where: str) -> TensorEntry:
        d = self.as_map(obj, where)
        if "name" not in d:
            raise self.fail(where, "missing key 'name'")
        name = self.name(d, where)
        del d["name"]
        return self.tensor(d, name, f"tensor '{name}'")

    def tensor(self, d: dict[str, Any], name: str, where: str) -> TensorEntry:
        enc = d.get("encoding")
        if enc == "codebook":
            if d.keys() != _CB_KEYS:
                self.keys(d, _CB_KEYS, where)
        elif enc == "raw":
            if d.keys() != _RAW_KEYS:
                self.keys(d, _RAW_KEYS, where)
        elif "encoding" not in d:
            raise self.fail(where, "missing key 'encoding'")
        else:
            raise self.fail(f"{where}.encoding", f"{show(enc)} is not one of codebook, raw")
        shape = d["shape"]
        numel = self.shape_numel(shape, where)
        comp = d["compression"]
        if comp != "none" and comp != "zstd":
            self.string(d, "compression", where, COMPRESSIONS)
        if enc == "codebook":
            bits, width = d["bits"], d["width"]
            if not (type(bits) is int and type(width) is int and 1 <= bits <= width <= 8):  # noqa: E721
                bits = self.integer(d, "bits", 1, 8, where)
                width = self.integer(d, "width", bits, 8, where)
            quant = d["quantizer"]
            if quant != "kmeans" and quant != "uniform":
                quant = self.string(d, "quantizer", where)
                if not 1 <= len(quant.encode()) <= MAX_QUANTIZER_BYTES or _CONTROL.search(quant):
                    raise self.fail(f"{where}.quantizer",
                                    f"{show(quant)} is not 1..{MAX_QUANTIZER_BYTES} bytes without control characters")
            cb = d["codebook"]
            if type(cb) is not bytes:
                raise self.fail(f"{where}.codebook", f"expected bin, got {_tname(cb)}")
            if len(cb) != 2 << bits:
                raise self.fail(f"{where}.codebook", f"{len(cb)} bytes, expected {2 << bits} (2**bits float16)")
            scale = self.real(d, "codebook_scale", where)
            if scale < 0 or not scale < _F32_OVERFLOW or _F32.unpack(_F32.pack(scale))[0] != scale:
                raise self.fail(f"{where}.codebook_scale", f"{scale!r} is not a non-negative float32 value")
            top = _max_abs_f16(cb, bits)
            # max |float32(c16) × scale| = float32(max|c16| × scale): rounding is monotonic, and the
            # product of an 11-bit and a 24-bit significand is exact in float64.
            prod = top * scale
            if not prod < _F32_OVERFLOW:
                c16 = np.frombuffer(cb, dtype="<f2")
                if not np.isfinite(c16).all():
                    raise self.fail(f"{where}.codebook", "contains NaN or Inf")
                j = int(np.abs(c16).argmax())
                raise self.fail(f"{where}.codebook", f"entry {j} ({float(c16[j])!r}) × codebook_scale {scale!r} "
                                                     "overflows float32")
            dtype, bound = None, _F32.unpack(_F32.pack(prod))[0]
            payload = (numel * width + 7) >> 3
        else:
            dtype = d["dtype"]
            if type(dtype) is not str or dtype not in RAW_DTYPES:
                self.string(d, "dtype", where, tuple(RAW_DTYPES))
            bits, width, quant, cb, scale = RAW_DTYPES[dtype][1] * 8, 0, None, None, None
            bound = F16_MAX if dtype == "F16" else None
            payload = numel * RAW_DTYPES[dtype][1]
        off, length, crc = d["offset"], d["length"], d["crc32"]
        if not (type(off) is int and type(length) is int and type(crc) is int  # noqa: E721
                and 0 <= off <= _U64_MAX and 1 <= length <= _U64_MAX and 0 <= crc <= 0xFFFFFFFF):
            off = self.integer(d, "offset", 0, _U64_MAX, where)
            length = self.integer(d, "length", 1, _U64_MAX, where)
            crc = self.integer(d, "crc32", 0, 0xFFFFFFFF, where)
        if comp == "none" and length != payload:
            raise self.fail(f"{where}.length", f"{length} bytes stored uncompressed, shape needs {payload}")
        return TensorEntry(name, tuple(shape), enc, bits, width, quant, dtype, cb, scale, comp, off, length, crc, bound)

    # -- names --------------------------------------------------------------------------------

    def collisions(self, hdr: Header) -> None:
        keys = [k for m in hdr.modules for k in model_keys(m.name, True)]
        keys += [_strip(t.name) for t in hdr.tensors]
        if len(set(keys)) == len(keys):
            return
        claims: dict[str, str] = {}
        for kind, items in (("module", hdr.modules), ("tensor", hdr.tensors)):
            for e in items:
                for key in model_keys(e.name, kind == "module"):
                    other = claims.get(key)
                    if other is not None:
                        raise self.fail(
                            f"{kind} '{e.name}'",
                            f"maps onto the same model tensor '{key}' as {other} "
                            f"(names are compared without the prefix '{PEFT_PREFIX}')",
                        )
                    claims[key] = f"{kind} '{e.name}'"


def coefficient_problem(m: ModuleEntry) -> str | None:
    """Section 6.2: the delta coefficient (and ω) must be finite in float32."""
    if m.sine:
        c = m.scale / m.gamma if m.gamma else math.inf
        if not f32_finite(c):
            return f"scale/gamma = {m.scale!r}/{m.gamma!r} is not finite in float32"
        if not f32_finite(m.omega):
            return f"omega {m.omega!r} is not finite in float32"
    elif not f32_finite(m.scale):
        return f"scale {m.scale!r} is not finite in float32"
    return None


def bound_problem(m: ModuleEntry, a: float, b: float) -> str | None:
    """Section 6.2: rank · max(1,|k|) · max(1,max|A|) · max(1,max|B|) <= 2^127."""
    k = m.omega if m.sine else m.scale
    bound = module_bound(m.rank, k, a, b)
    if bound > MODULE_BOUND:
        what = "omega" if m.sine else "scale"
        return (f"ΔW cannot be guaranteed finite in float32: rank {m.rank} × {what} {k!r} × max|A| {a!r} × "
                f"max|B| {b!r} (each at least 1) = {bound:.3g} > 2^127")
    return None


def parse_header(decoded: bytes, label: str) -> Header:
    """Parse and validate a decoded header (msgpack bytes) against sections 3, 6.1, 6.2 and 7.1;
    ``label`` names the file in messages. Offsets and lengths are checked against each other and
    the file by the caller (section 4.1). Raises SldFormatError, or SldLimitError for a limit.
    """
    return run_parser(_Parser, decoded, label)


def run_parser(parser: type[_Parser], decoded: bytes, label: str) -> Header:
    """``parser(decoded, label).run()`` with the cyclic GC off: the entries are acyclic tuples,
    and building 2^17 of them with it on triggers collections that rescan everything built so
    far (measured: 25% of the time at the cap)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return parser(decoded, label).run()
    finally:
        if enabled:
            gc.enable()


def iter_entries(hdr: Header) -> Iterator[TensorEntry]:
    for m in hdr.modules:
        yield m.A
        yield m.B
    yield from hdr.tensors
