"""The container-version-2 header (spec/sld-format.md part 2): parsed under the same caps and
name rules as version 1 (header.py), with repeated module fields factored out, shapes implied,
names prefix-compressed and each tensor's side information carried in its map.

Root map: ``metadata`` (map), ``defaults`` (map: module fields shared by all modules),
``lanes`` (int 1..32: rANS lanes of every stream), ``modules`` and ``tensors`` (arrays), and
optionally ``required`` (array of extension names: this reader implements ``f32_fields``, float32
field streams, and rejects any other). Other root keys are ignored (section 15).

Entries become the same :class:`~deltacodec.header.TensorEntry` / ``ModuleEntry`` as version 1,
so every consumer works unchanged: a quantized tensor is a ``codebook`` entry of width 8 whose
"codebook" is its symbol → value table (compression ``"rans"``), a lossless float tensor a
``raw`` entry of its dtype (compression ``"fields"``); ``TensorEntry.coder`` holds the parsed
side information.
"""

from __future__ import annotations

import math
from typing import Any

from .header import (
    KINDS,
    MAX_DIM,
    MAX_NAME_BYTES,
    MAX_NUMEL,
    RAW_DTYPES,
    COMPRESSIONS,
    F16_MAX,
    Header,
    ModuleEntry,
    TensorEntry,
    _byte_type,
    _is_map,
    _Parser,
    _tname,
    bound_problem,
    coefficient_problem,
    name_problem,
    run_parser,
    show,
)
from .sideinfo import F32_EXTENSION, SideInfoError, read_fields, read_quant
from .config_defaults import restore as restore_config_defaults

__all__ = ["parse_header_v2", "ROOT_KEYS", "MODULE_FIELDS", "MAX_LANES"]

ROOT_KEYS = ("metadata", "defaults", "lanes", "crc32", "modules", "tensors")
OPTIONAL_ROOT = ("required",)
MODULE_FIELDS = ("kind", "scale", "omega", "gamma", "fan_in_fan_out")
MAX_LANES = 32
#: Extensions (spec 15) this reader implements: names a file's ``required`` may list.
EXTENSIONS = (F32_EXTENSION,)
_MOD_KEYS = frozenset(("name", "p", "shape", "A", "B", "weight_shape") + MODULE_FIELDS)
_EXTRA_KEYS = frozenset(("name", "p", "shape", "t"))
_U32 = 0xFFFFFFFF


class _ParserV2(_Parser):
    def run(self) -> Header:
        b = self.peek("root")
        if not _is_map(b):
            from .errors import SldFormatError

            raise SldFormatError(f"{self.label}: header must be a msgpack map, got {_byte_type(b)}")
        n = self._call(self.u.read_map_header, "root")
        seen: dict[str, Any] = {}
        hdr = Header(metadata={})
        self.defaults: dict[str, Any] | None = None
        self.lanes: int | None = None
        self.required: list[str] = []
        self.f32_fields: list[str] = []  # tensors stored as F32 field streams (extension f32_fields)
        self.prev_name = b""
        for _ in range(n):
            key = self.key("root", seen)
            seen[key] = True
            if key == "metadata":
                if not _is_map(self.peek("root.metadata")):
                    raise self.fail("root.metadata", f"expected map, got {_byte_type(self.peek('root.metadata'))}")
                # spec 12.5: a config stored without its default-valued keys gets them back here
                hdr.metadata = restore_config_defaults(self.value("metadata", 2))
            elif key in ("defaults", "lanes", "required", "crc32"):
                obj = self._call(self.u.unpack, f"root.{key}")
                self.root_value(key, obj)
            elif key in ("modules", "tensors"):
                if "defaults" not in seen or "lanes" not in seen:
                    raise self.fail("root", f"'{key}' comes before 'defaults' and 'lanes': entries are read "
                                            "against them, so those keys precede 'modules' and 'tensors'")
                self.entries(key, hdr)
            else:
                # an unknown root key: ignored (section 15), but still bounded like metadata
                self.value(f"root.{show(key, 40)}", 2)
        missing = [k for k in ROOT_KEYS if k not in seen]
        if missing:
            raise self.fail("root", f"missing key '{missing[0]}'")
        if self.f32_fields and F32_EXTENSION not in self.required:
            # spec 15: an old version-2 reader cannot decode F32 fields; only the file's
            # 'required' makes it refuse them, so a file that uses them without saying so is broken
            raise self.fail(f"tensor '{self.f32_fields[0]}'",
                            f"stored as F32 field streams (side-information dtype 2) but the root 'required' "
                            f"does not list {F32_EXTENSION!r} (spec 15); expected required "
                            f"[{F32_EXTENSION!r}]")
        end = self.u.tell()
        if end != len(self.data):
            raise self.fail("root", f"{len(self.data) - end} bytes after the header map (at byte {end}); "
                                    "the decoded header is exactly one msgpack map")
        self.place(hdr)
        hdr.data_crc32 = self.data_crc
        if not hdr.modules and not hdr.tensors:
            raise self.fail("root", "no modules and no tensors: an empty adapter")
        self.collisions(hdr)
        return hdr

    def place(self, hdr: Header) -> None:
        """Section offsets, implied: A then B of each module in order, then the extras."""
        cursor = 0
        for m_i, m in enumerate(hdr.modules):
            a = m.A._replace(offset=cursor)
            cursor += a.length
            b = m.B._replace(offset=cursor)
            cursor += b.length
            hdr.modules[m_i] = m._replace(A=a, B=b)
        for t_i, t in enumerate(hdr.tensors):
            hdr.tensors[t_i] = t._replace(offset=cursor)
            cursor += t.length

    def root_value(self, key: str, obj: Any) -> None:
        where = f"root.{key}"
        if key == "crc32":
            if type(obj) is not int or not 0 <= obj <= _U32:
                raise self.fail(where, f"{show(obj)} is not an int in [0, 2^32-1]")
            self.data_crc = obj
        elif key == "lanes":
            if type(obj) is not int or not 1 <= obj <= MAX_LANES:
                raise self.fail(where, f"{show(obj)} is not an int in [1, {MAX_LANES}]")
            self.lanes = obj
        elif key == "required":
            if type(obj) is not list or any(type(v) is not str for v in obj):
                raise self.fail(where, "expected an array of str")
            unknown = [v for v in obj if v not in EXTENSIONS]
            if unknown:
                raise self.fail(where, f"the file requires the extension {show(unknown[0])}, which this reader "
                                       f"does not implement (section 15; known: {', '.join(EXTENSIONS)})")
            self.required = list(obj)
        else:
            d = self.as_map(obj, where)
            for k in d:
                if k not in MODULE_FIELDS:
                    raise self.fail(where, f"unknown key {show(k)} (module fields: {', '.join(MODULE_FIELDS)})")
            # typed here, whether or not a module uses them (ranges that depend on the kind are
            # checked per module)
            if "kind" in d:
                self.string(d, "kind", where, KINDS)
            for k in ("scale", "omega", "gamma"):
                if k in d:
                    self.real(d, k, where)
            if "fan_in_fan_out" in d and type(d["fan_in_fan_out"]) is not bool:
                raise self.fail(f"{where}.fan_in_fan_out", f"expected bool, got {_tname(d['fan_in_fan_out'])}")
            self.defaults = d

    # -- names (prefix-compressed) ---------------------------------------------------------------

    def pname(self, d: dict[str, Any], where: str) -> str:
        p = d.get("p", 0)
        if type(p) is not int or not 0 <= p <= len(self.prev_name):
            raise self.fail(f"{where}.p", f"{show(p)} is not an int in [0, {len(self.prev_name)}] (bytes of the "
                                          "previous entry's name)")
        suffix = d.get("name")
        if type(suffix) is not str:
            raise self.fail(f"{where}.name", f"expected str, got {_tname(suffix)}")
        raw = self.prev_name[:p] + suffix.encode("utf-8", "surrogatepass")
        if len(raw) > MAX_NAME_BYTES:
            raise self.fail(f"{where}.name", f"is {len(raw)} bytes, names are 1..{MAX_NAME_BYTES} bytes of UTF-8")
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{where}.name", "the prefix and the suffix do not join into valid UTF-8") from None
        why = name_problem(name)
        if why:
            raise self.fail(f"{where}.name", f"{show(name)} {why}")
        if name in self.names:
            raise self.fail(f"{where}.name", f"duplicate name {show(name)}")
        self.names[name] = where
        self.prev_name = raw
        return name

    # -- entries ---------------------------------------------------------------------------------

    def field(self, d: dict[str, Any], key: str) -> Any:
        if key in d:
            return d[key], d
        if self.defaults is not None and key in self.defaults:
            return self.defaults[key], self.defaults
        return None, None

    def module(self, obj: Any, where: str) -> ModuleEntry:
        d = self.as_map(obj, where)
        for k in d:
            if k not in _MOD_KEYS:
                raise self.fail(where, f"unknown key {show(k)}")
        for k in ("name", "shape", "A", "B"):
            if k not in d:
                raise self.fail(where, f"missing key '{k}'")
        name = self.pname(d, where)
        where = f"module '{name}'"
        shape = d["shape"]
        if (type(shape) is not list or len(shape) != 3
                or any(type(v) is not int or not 1 <= v <= MAX_DIM for v in shape)):
            raise self.fail(f"{where}.shape", f"expected [out_features, in_features, rank], ints in [1, {MAX_DIM}]")
        out_f, in_f, rank = shape
        vals: dict[str, Any] = {}
        for k in MODULE_FIELDS:
            v, src = self.field(d, k)
            vals[k] = (v, src)
        kind, src = vals["kind"]
        if src is None:
            raise self.fail(where, "missing key 'kind' (neither in the module nor in defaults)")
        if kind not in KINDS:
            raise self.fail(f"{where}.kind", f"{show(kind)} is not one of lora, sine")
        sine = kind == "sine"
        if not sine and ("omega" in d or "gamma" in d):
            raise self.fail(where, "a lora module has no omega or gamma")
        need = ("scale", "fan_in_fan_out") + (("omega", "gamma") if sine else ())
        for k in need:
            if vals[k][1] is None:
                raise self.fail(where, f"missing key '{k}' (neither in the module nor in defaults)")
        scale = self.real(vals["scale"][1], "scale", where)
        omega = gamma = None
        if sine:
            omega = self.real(vals["omega"][1], "omega", where)
            gamma = self.real(vals["gamma"][1], "gamma", where)
            self.sine_coefficients(omega, gamma, where)
        fifo = self.fan_in_fan_out(vals["fan_in_fan_out"][0], where)
        if rank * in_f > MAX_NUMEL or out_f * rank > MAX_NUMEL:
            n = max(rank * in_f, out_f * rank)
            raise self.limit(f"{where}.shape", f"{n:,} elements, over the limit of {MAX_NUMEL:,}", MAX_NUMEL, n)
        a = self.tensor(d["A"], name + ".lora_A.weight", f"{where}.A", (rank, in_f))
        b = self.tensor(d["B"], name + ".lora_B.weight", f"{where}.B", (out_f, rank))
        m = ModuleEntry(name, sine, out_f, in_f, rank, scale, omega, gamma, fifo, a, b,
                        self.weight_shape(d, where, out_f, in_f, fifo))
        problem = coefficient_problem(m)
        if problem is None and a.value_bound is not None and b.value_bound is not None:
            problem = bound_problem(m, a.value_bound, b.value_bound)
        if problem:
            raise self.fail(where, problem)
        return m

    def weight_shape(self, d: dict[str, Any], where: str, out_f: int, in_f: int, fifo: bool) -> tuple[int, ...] | None:
        """A conv module's kernel shape (section 12.1): [out, in, k1 (, k2 (, k3))], out the module's
        out_features and the product of the rest its in_features."""
        if "weight_shape" not in d:
            return None
        ws = d["weight_shape"]
        w = f"{where}.weight_shape"
        if type(ws) is not list or not 3 <= len(ws) <= 5 or any(type(v) is not int or not 1 <= v <= MAX_DIM for v in ws):
            raise self.fail(w, f"expected an array of 3 to 5 ints in [1, {MAX_DIM}] (out, in, kernel sizes)")
        prod = 1
        for v in ws[1:]:
            prod *= v
        if ws[0] != out_f or prod != in_f:
            raise self.fail(w, f"{show(ws)} does not fit the module's shape [{out_f}, {in_f}, rank]: its first "
                               "entry is out_features and the product of the others in_features")
        if fifo:
            raise self.fail(w, "a conv module (weight_shape) cannot be fan_in_fan_out")
        return tuple(ws)

    def extra(self, obj: Any, where: str) -> TensorEntry:
        d = self.as_map(obj, where)
        if "name" not in d:
            raise self.fail(where, "missing key 'name'")
        name = self.pname(d, where)
        where = f"tensor '{name}'"
        if "shape" not in d:
            raise self.fail(where, "missing key 'shape'")
        shape = d["shape"]
        self.shape_numel(shape, where)
        for k in d:
            if k not in _EXTRA_KEYS:
                raise self.fail(where, f"unknown key {show(k)}")
        if "t" not in d:
            raise self.fail(where, "missing key 't'")
        return self.tensor(d["t"], name, f"{where}.t", tuple(shape))

    def tensor(self, t: Any, name: str, where: str, shape: tuple[int, ...]) -> TensorEntry:
        """A tensor descriptor: ``[0, length, side]`` quantized, ``[1, length, side]`` lossless
        float field streams (F16, BF16, F32), ``[2, length, dtype, compression]`` raw (the data
        area's CRC-32 is the root's)."""
        if type(t) is not list or not t:
            raise self.fail(where, f"expected a tensor descriptor array, got {_tname(t)}")
        enc = t[0]
        if type(enc) is not int or enc not in (0, 1, 2):
            raise self.fail(f"{where}[0]", f"encoding {show(enc)} is not one of 0 (quantized), 1 (16-bit fields), 2 (raw)")
        want = 4 if enc == 2 else 3
        if len(t) != want:
            raise self.fail(where, f"a descriptor of encoding {enc} has {want} elements, got {len(t)}")
        length, crc = t[1], -1  # no per-section CRC: the root's crc32 covers the data area
        if type(length) is not int or not 1 <= length <= (1 << 64) - 1:
            raise self.fail(f"{where}[1]", f"{show(length)} is not an int >= 1 (section length in bytes)")
        numel = math.prod(shape)
        offset = 0  # placed once every entry is read (place)
        if enc == 2:
            dtype, comp = t[2], t[3]
            if type(dtype) is not str or dtype not in RAW_DTYPES:
                raise self.fail(f"{where}[2]", f"dtype {show(dtype)} is not one of {', '.join(RAW_DTYPES)}")
            if comp not in COMPRESSIONS:
                raise self.fail(f"{where}[3]", f"compression {show(comp)} is not one of {', '.join(COMPRESSIONS)}")
            payload = numel * RAW_DTYPES[dtype][1]
            if comp == "none" and length != payload:
                raise self.fail(f"{where}[1]", f"{length} bytes stored uncompressed, shape needs {payload}")
            bound = F16_MAX if dtype == "F16" else None
            return TensorEntry(name, shape, "raw", RAW_DTYPES[dtype][1] * 8, 0, None, dtype, None, None, comp,
                               offset, length, crc, bound)
        side = t[2]
        if type(side) is not bytes:
            raise self.fail(f"{where}[2]", f"side information: expected bin, got {_tname(side)}")
        try:
            q = read_quant(side) if enc == 0 else read_fields(side)
        except SideInfoError as exc:
            raise self.fail(f"{where}[2]", f"side information: {exc}") from None
        if enc == 0:
            return TensorEntry(name, shape, "codebook", q.bits, 8, q.method, None, None, None, "rans",
                               offset, length, crc, q.bound, (self.lanes, q))
        if length < q.stored * numel:
            raise self.fail(f"{where}[1]", f"{length} bytes cannot hold {q.stored} stored field streams of {numel} bytes")
        bound = F16_MAX if q.dtype == "F16" else None
        if q.dtype == "F32":
            self.f32_fields.append(name)
        return TensorEntry(name, shape, "raw", RAW_DTYPES[q.dtype][1] * 8, 0, None, q.dtype, None, None, "fields",
                           offset, length, crc, bound, (self.lanes, q))


def parse_header_v2(decoded: bytes, label: str) -> Header:
    """Parse and validate a version-2 decoded header (msgpack bytes); like ``parse_header``."""
    return run_parser(_ParserV2, decoded, label)

