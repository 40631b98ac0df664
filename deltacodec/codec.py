"""Encode and decode: adapter tensors → quantize → pack → entropy → container, and back."""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator

import numpy as np

from . import __version__ as _version
from .adapter import Adapter, read_adapter
from .entropy import DEFAULT_LEVEL, MAX_LEVEL, compress
from .errors import DecodeError, EncodeError
from .format import SldFile, TensorEntry, build_container
from .layouts import write_decoded
from .layouts.peft import decoded_config
from .outputs import check_output, write_bytes
from .pack import default_width, pack_indices, packed_nbytes
from .quantize import QUANTIZERS, quantize
from .safetensors_io import TensorSpec

__all__ = ["encode", "decode", "load", "default_output", "decoded_config", "float32_to_bfloat16_bits", "Progress"]

Progress = Callable[[int, int, str], None]
PASSTHROUGH_BITS = 16
# bits=32: every factor bit-exact in its smallest exact form, float32 field streams when it
# needs them (container 2 with the extension f32_fields)
F32_BITS = 32
LOSSLESS_BITS = (PASSTHROUGH_BITS, F32_BITS)
# The container written when neither the quantizer nor the caller asks for one: version 1
# for now, so that files made with today's options (k-means at fixed bits) stay byte-identical
# for the readers and tools built on version 1; ecsq/auto and the rate targets write version 2.
DEFAULT_CONTAINER = 1
V2_QUANTIZERS = ("ecsq", "auto")
LANES = 4
_F16_MAX = 65504.0


def load(path: str | os.PathLike[str], *, max_decoded_bytes: int | None = None) -> SldFile:
    """Open an ``.sld`` file: the header is read and validated, tensors decode on request.

    ``max_decoded_bytes`` caps what decoding the whole file may allocate (every tensor as
    float32); a file that asks for more is refused with :class:`SldLimitError` before anything
    is decoded. None means the library default, ``format.DEFAULT_MAX_DECODED_BYTES``.
    """
    return SldFile(path, max_decoded_bytes=max_decoded_bytes)


def default_output(src: str | os.PathLike[str]) -> str:
    """Where ``encode`` writes without ``out``: beside the input, ``<name>.sld``."""
    src = os.fspath(src).rstrip("/\\")
    base, ext = os.path.splitext(src)
    return (base if ext in (".safetensors", ".bin") else src) + ".sld"


def _raw_section(values: np.ndarray, dtype: str) -> bytes:
    if dtype == "BF16":
        bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
        return (bits >> np.uint32(16)).astype("<u2").tobytes()
    return np.ascontiguousarray(values, dtype={"F16": "<f2", "F32": "<f4", "F64": "<f8"}[dtype]).tobytes()


def _f16_factor(values: np.ndarray, level: int) -> dict[str, Any]:
    section, comp = compress(_raw_section(values, "F16"), level)
    return {"shape": values.shape, "encoding": "raw", "dtype": "F16", "compression": comp, "section": section}


def _factor(values: np.ndarray, name: str, bits: int, quantizer: str, level: int) -> dict[str, Any]:
    """One module factor as a section dict for :func:`build_container`.

    A codebook costs 2·2^bits bytes whatever the tensor's size, so a small tensor (a rank-1 lora_A
    of a narrow layer, any tensor at 7-8 bits with a few hundred values) can be cheaper as float16.
    It is then stored as raw F16 when that is no larger and, in SSE, either no less accurate than
    the codebook or within float16's own precision (each value off by at most 2^-11 of itself).
    The second clause keeps float16 for a 64-value tensor at 8 bits whose codebook holds every
    value exactly up to the same rounding; the first keeps the codebook for values so small that
    float16 is subnormal and loses relative precision.
    """
    peak = float(np.max(np.abs(values)))
    if bits == PASSTHROUGH_BITS:
        if peak > _F16_MAX:
            raise EncodeError(f"tensor '{name}': |value| up to {peak:g} does not fit float16 (--bits 16)")
        return _f16_factor(values, level)
    q = quantize(values, bits, quantizer)
    width = default_width(bits, entropy_coded=level > 0)
    section, comp = compress(pack_indices(q.indices, width).tobytes(), level)
    if width != bits and packed_nbytes(values.size, bits) < len(section):
        # Byte-aligned fields let zstd reach the index entropy, but when the indices are close to
        # uniform (lora_A near its init) or the tensor is small (frame overhead), dense fields
        # with no entropy stage are smaller: keep whichever is.
        section, comp, width = pack_indices(q.indices, bits).tobytes(), "none", bits
    coded_bytes = len(section) + len(q.codebook_f16)
    if 2 * values.size <= coded_bytes and peak <= _F16_MAX:
        raw = _f16_factor(values, level)
        x = values.astype(np.float64).reshape(-1)
        sse_f16 = float(np.sum((values.astype(np.float16).astype(np.float64).reshape(-1) - x) ** 2))
        sse_cb = float(np.sum((q.codebook.astype(np.float64)[q.indices] - x) ** 2))
        sse_normal = float(np.sum((x * 2.0**-11) ** 2))
        if len(raw["section"]) <= coded_bytes and sse_f16 <= max(sse_cb, sse_normal):
            return raw
    return {
        "shape": values.shape,
        "encoding": "codebook",
        "bits": bits,
        "width": width,
        "quantizer": quantizer,
        "codebook_f16": q.codebook_f16,
        "codebook_scale": q.codebook_scale,
        "compression": comp,
        "section": section,
    }


def encode(
    src: str | os.PathLike[str] | Adapter,
    bits: int | None = None,
    *,
    out: str | os.PathLike[str] | None = None,
    omega: float | None = None,
    gamma: float | str | None = None,
    alpha: float | None = None,
    quantizer: str | None = None,
    level: int = DEFAULT_LEVEL,
    progress: Progress | None = None,
    force: bool = False,
    layout: str | None = None,
    container: int | None = None,
    size: int | None = None,
    bits_per_param: float | None = None,
    max_error: float | None = None,
    refit: bool | None = None,
) -> str:
    """Encode an adapter into an ``.sld`` file and return its path.

    ``src``: an adapter directory, a ``.safetensors``/``.bin`` file (PEFT, diffusers or kohya-ss
    layout, detected; ``layout`` overrides), or an :class:`Adapter`. A non-PEFT layout is
    recorded in the metadata (``layout``, ``layout_info``) so that decode writes it back.

    The target, exactly one of (default ``bits=3``):

    * ``bits``: 1..8, or 16 (lossless: a factor whose values are exactly bfloat16 or float16, as a
      bf16/fp16 adapter's are, is kept bit-exact; an fp32 factor is rounded to float16), or 32
      (lossless for every factor: bf16/fp16 fields where exact, else float32 fields; container 2
      only, ``quantizer`` ignored as for 16). With
      k-means/uniform a ``2**bits``-entry codebook per tensor; with ecsq/auto the same average
      bits per parameter (index and side information bits of the factors);
    * ``size``: the file's size in bytes (it lands at or under it, within 5 %);
    * ``bits_per_param``: the file's bits over the factors' parameter count;
    * ``max_error``: the largest relative ΔW error of any module (‖ΔŴ−ΔW‖/‖ΔW‖).

    ``quantizer``: ``"kmeans"`` (default with ``bits``), ``"uniform"``, ``"ecsq"`` (entropy-
    constrained uniform-step quantizer, one rate–distortion multiplier for the adapter; default
    for the other targets) or ``"auto"`` (ECSQ or k-means per tensor). ``refit`` (ecsq/auto,
    default on): refit B by least squares against the quantized A before quantizing B.
    ``container``: 2 (rANS-coded indices, lighter header; bit-exact ``bits=16``) or 1 (readable
    by older deltacodec; k-means/uniform/16-bit only). Default: 2 for ecsq/auto (and so for
    every rate target), 1 for k-means/uniform at fixed bits (:data:`DEFAULT_CONTAINER`).
    ``omega``/``gamma``/``alpha`` override the adapter's config (``gamma`` a number or
    ``"sqrt-in"``). ``level``: zstd level 1..22, or 0 to
    store packed indices without the entropy stage (version 1; version 2 uses zstd only for raw
    extras). Tensors that are not lora_A/lora_B pairs are stored losslessly. The file is
    written atomically; the same input and options give byte-identical output.

    An existing ``out`` is refused unless ``force``; an ``out`` that is or lies inside the input
    (or its ``adapter_config.json``) is refused even with ``force`` (:class:`OutputError`,
    raised before any work is done).
    """
    targets = {k: v for k, v in (("bits", bits), ("size", size), ("bits_per_param", bits_per_param),
                                 ("max_error", max_error)) if v is not None}
    if len(targets) > 1:
        raise EncodeError(f"give exactly one target, got {', '.join(targets)}")
    if not targets:
        bits = 3
        targets = {"bits": 3}
    kind, value = next(iter(targets.items()))
    if quantizer is None:
        quantizer = "kmeans" if kind == "bits" else "ecsq"
    if quantizer not in QUANTIZERS + V2_QUANTIZERS:
        raise EncodeError(f"unknown quantizer '{quantizer}', expected one of {', '.join(QUANTIZERS + V2_QUANTIZERS)}")
    container_asked = container
    if container is None:
        # 16/32 bits mean lossless, which only version 2 is for bf16 and fp32 sources
        lossless = kind == "bits" and value in LOSSLESS_BITS
        container = 2 if quantizer in V2_QUANTIZERS or lossless else DEFAULT_CONTAINER
    if container not in (1, 2):
        raise EncodeError(f"container must be 1 or 2, got {container!r}")
    if kind == "bits":
        if isinstance(bits, bool) or not isinstance(bits, int) or not (1 <= bits <= 8 or bits in LOSSLESS_BITS):
            raise EncodeError(f"bits must be 1..8, 16 or 32, got {bits!r}")
        if bits == F32_BITS and container == 1:
            raise EncodeError("bits=32 (lossless float32) needs container version 2 (float32 field streams); "
                              "container=1 stores at most float16: use container=2 or bits=16")
    else:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and value < float("inf")):
            raise EncodeError(f"{kind} must be a positive finite number, got {value!r}")
        if quantizer in QUANTIZERS:
            raise EncodeError(f"a {kind} target needs rate control: quantizer 'ecsq' or 'auto', not '{quantizer}' "
                              "(k-means takes a fixed number of bits)")
    rate_controlled = quantizer in V2_QUANTIZERS and bits not in LOSSLESS_BITS
    if container == 1 and quantizer in V2_QUANTIZERS:
        raise EncodeError(f"quantizer '{quantizer}' needs container version 2 (rANS-coded indices); container 1 "
                          "holds k-means/uniform codebooks and 16-bit factors only")
    if refit is not None and not rate_controlled:
        if refit:
            raise EncodeError("refit applies to the ecsq/auto quantizers; k-means at fixed bits quantizes each factor "
                              "as it is")
    if not 0 <= level <= MAX_LEVEL:
        raise EncodeError(f"level must be 0..{MAX_LEVEL}, got {level}")
    if isinstance(src, Adapter):
        adapter = src
        if out is None:
            raise EncodeError("out is required when encoding an in-memory Adapter")
    out = os.fspath(out) if out is not None else default_output(src)
    inputs = _encode_inputs(src)
    check_output(out, inputs, force=force, kind="file")  # before the slow part
    if not isinstance(src, Adapter):
        adapter = read_adapter(src, omega=omega, gamma=gamma, alpha=alpha, layout=layout)
    for m in adapter.modules:
        for which, arr in (("lora_A", m.A), ("lora_B", m.B)):
            if arr.size and not np.isfinite(arr).all():
                raise EncodeError(f"{_src_name(src)}: tensor '{m.name}.{which}.weight' holds NaN or Inf")
    conv = [m.name for m in adapter.modules if m.weight_shape is not None]
    if conv and container == 1:
        if container_asked == 1:
            raise EncodeError(f"{_src_name(src)}: module '{conv[0]}' is a conv LoRA module ({len(conv)} in all): "
                              "container version 1 cannot record kernel shapes; use container 2 (the default here)")
        container = 2  # only version 2 records kernel shapes
    metadata = _metadata(adapter)
    if container == 2:
        data = _encode_v2(adapter, metadata, out, kind, value, quantizer, level, progress,
                          True if refit is None else refit, src)
        write_bytes(out, data, inputs=inputs, force=force)
        return out

    modules = []
    total = len(adapter.modules)
    for i, m in enumerate(adapter.modules):
        if progress:
            progress(i, total, m.name)
        modules.append(
            {
                "name": m.name,
                "sine": m.sine,
                "out_features": m.out_features,
                "in_features": m.in_features,
                "rank": m.rank,
                "scale": m.scale,
                "omega": m.omega,
                "gamma": m.gamma,
                "fan_in_fan_out": m.fan_in_fan_out,
                "weight_shape": m.weight_shape,
                "A": _factor(m.A, f"{m.name}.lora_A.weight", bits, quantizer, level),
                "B": _factor(m.B, f"{m.name}.lora_B.weight", bits, quantizer, level),
            }
        )
    if progress:
        progress(total, total, "")
    tensors = []
    for name in sorted(adapter.extras):
        values, dt = adapter.extras[name]
        section, comp = compress(_raw_section(values, dt), level)
        tensors.append(
            {"name": name, "shape": values.shape, "encoding": "raw", "dtype": dt, "compression": comp, "section": section}
        )
    try:
        data = build_container(metadata, modules, tensors, name=out)
    except EncodeError as exc:
        raise EncodeError(f"encoding {_src_name(src)}: {exc}") from None
    write_bytes(out, data, inputs=inputs, force=force)
    return out


def _src_name(src: str | os.PathLike[str] | Adapter) -> str:
    if isinstance(src, Adapter):
        return src.source or "the in-memory adapter"
    return os.fspath(src)


def _metadata(adapter: Adapter) -> dict[str, Any]:
    config = _portable_config(adapter.config)
    metadata: dict[str, Any] = {
        "encoder": f"deltacodec {_version}",
        "method": "sine" if adapter.sine else "lora",
        "base_model": config.get("base_model_name_or_path"),
        "adapter_config": config,
    }
    if adapter.layout != "peft":  # absent means PEFT (spec 3.3): PEFT files stay as they were
        metadata["layout"] = adapter.layout
        metadata["layout_info"] = _jsonable(adapter.layout_info)
    return metadata


def _extras(adapter: Adapter, level: int, version: int, lanes: int, f32_fields: bool = False) -> list[dict[str, Any]]:
    """The tensors stored losslessly beside the factors: raw (zstd when it pays); in version 2
    F16/BF16 ones as field streams when that is smaller, and with ``f32_fields`` (``bits=32``)
    F32 ones too."""
    from .encode_v2 import lossless_tensor

    tensors = []
    for name in sorted(adapter.extras):
        values, dt = adapter.extras[name]
        section, comp = compress(_raw_section(values, dt), level)
        t = {"name": name, "shape": values.shape, "encoding": "raw", "dtype": dt, "compression": comp,
             "section": section}
        fields = ("F16", "BF16", "F32") if f32_fields else ("F16", "BF16")
        if version == 2 and dt in fields and values.size and np.isfinite(values).all():
            f = lossless_tensor(values, dt, lanes)
            if len(f["section"]) + len(f["side"]) < len(section):
                f["name"] = name
                t = f
        tensors.append(t)
    return tensors


def _module_dict(m: Any, A: dict[str, Any], B: dict[str, Any]) -> dict[str, Any]:
    return {"name": m.name, "sine": m.sine, "out_features": m.out_features, "in_features": m.in_features,
            "rank": m.rank, "scale": m.scale, "omega": m.omega, "gamma": m.gamma,
            "fan_in_fan_out": m.fan_in_fan_out, "weight_shape": m.weight_shape, "A": A, "B": B}


def _v2_fixed_factor(values: np.ndarray, name: str, bits: int, quantizer: str) -> dict[str, Any]:
    """A factor at fixed bits in version 2: k-means/uniform exactly as in version 1 (the same
    codebook and indices), indices rANS-coded; float16 field streams instead when no larger and
    no less accurate (the rule of :func:`_factor`). ``bits`` 16 and 32: lossless (see encode)."""
    from .encode_v2 import f16_tensor, kmeans_tensor, lossless_dtype, lossless_tensor, smallest_exact_tensor

    if bits == F32_BITS:
        return smallest_exact_tensor(values, LANES)
    if bits == PASSTHROUGH_BITS:
        dt = lossless_dtype(values)
        return lossless_tensor(values, dt, LANES) if dt else f16_tensor(values, name, LANES)
    t = kmeans_tensor(values, name, bits, quantizer, LANES)
    coded = len(t["section"]) + len(t["side"])
    peak = float(np.max(np.abs(values)))
    if 2 * values.size <= coded and peak <= _F16_MAX:
        raw = f16_tensor(values, name, LANES)
        x = values.astype(np.float64).reshape(-1)
        sse_f16 = float(np.sum((values.astype(np.float16).astype(np.float64).reshape(-1) - x) ** 2))
        sse_cb = float(np.sum((t["values"].astype(np.float64) - x) ** 2))
        sse_normal = float(np.sum((x * 2.0**-11) ** 2))
        if len(raw["section"]) + len(raw["side"]) <= coded and sse_f16 <= max(sse_cb, sse_normal):
            return raw
    return t


def _encode_v2(adapter: Adapter, metadata: dict[str, Any], out: str, kind: str, value: float, quantizer: str,
               level: int, progress: Progress | None, refit: bool, src: Any) -> bytes:
    """The bytes of a version-2 file (checked by the reader's rules before they are returned)."""
    extras = _extras(adapter, level, 2, LANES, f32_fields=kind == "bits" and value == F32_BITS)
    mods = adapter.modules
    total = len(mods)

    def build(modules: list[dict[str, Any]]) -> bytes:
        try:
            return build_container(metadata, modules, extras, name=out, version=2, lanes=LANES)
        except EncodeError as exc:
            raise EncodeError(f"encoding {_src_name(src)}: {exc}") from None

    if quantizer in QUANTIZERS or value in LOSSLESS_BITS and kind == "bits":
        modules = []
        for i, m in enumerate(mods):
            if progress:
                progress(i, total, m.name)
            modules.append(_module_dict(
                m, _v2_fixed_factor(m.A, f"{m.name}.lora_A.weight", int(value), quantizer),
                _v2_fixed_factor(m.B, f"{m.name}.lora_B.weight", int(value), quantizer)))
        if progress:
            progress(total, total, "")
        return build(modules)
    if not mods:
        return build([])

    # What the container adds around the plan's streams and side information: the header
    # (measured with every factor at its smallest: a stream of 4·LANES bytes and a few side bytes)
    floor = build([_module_dict(m, _min_tensor(m.A), _min_tensor(m.B)) for m in mods])
    overhead = len(floor) - sum(2 * (4 * LANES + 2) for _ in mods)
    if kind == "size" and value < len(floor):
        raise EncodeError(f"encoding {_src_name(src)}: a file of {int(value):,} bytes is unreachable: the smallest "
                          f"this adapter encodes to is {len(floor):,} bytes (header and container "
                          f"{overhead:,} bytes, every factor at its lowest rate)")
    if kind == "bits_per_param":
        params = sum(m.A.size + m.B.size for m in mods)
        if value * params / 8.0 < len(floor):
            raise EncodeError(f"encoding {_src_name(src)}: {value} bits/param is unreachable: the smallest file is "
                              f"{len(floor):,} bytes = {8.0 * len(floor) / params:.4g} bits/param")
    # Allocation: every module under one relative-error bound (minimax) first. On both RD
    # testbeds' held-out loss it beat the shared-λ sum of relative errors (testbed 2, 2 seeds × 6
    # adapters: BD-rate vs k-means −4.1 % against +2.0 % on average, better in 10 of 12), which
    # zeroes whole modules at low rates. Below the smallest minimax file, the sum allocation
    # still reaches the target (zeroing the modules that cost most per unit of error).
    allocations = ("minimax", "sum") if kind in ("size", "bits_per_param") else ("minimax",)
    for allocation in allocations:
        data, met = _rate_controlled(mods, kind, value, quantizer, refit, overhead, build, src, allocation)
        if met:
            break
    else:
        raise EncodeError(f"encoding {_src_name(src)}: {kind} {value:g} is unreachable: the smallest file rate "
                          f"control reached is {len(data):,} bytes (the container alone, every factor "
                          f"zero, is {len(floor):,} bytes)")
    if progress:
        progress(total, total, "")
    return data


def _rate_controlled(mods: list[Any], kind: str, value: float, quantizer: str, refit: bool, overhead: int,
                     build: Any, src: Any, allocation: str) -> tuple[bytes, bool]:
    """(the file, whether it meets the target) for a rate target with one allocation, the goal
    corrected up to 4 times until a size-like target is met."""
    from .encode_v2 import coded_tensor
    from .ratecontrol import MAX_LEVELS, Target, encode_modules

    goal = float(value)
    data = b""
    for attempt in range(4):
        t_kind = "bits" if kind == "bits" else kind
        with one_blas_thread():
            plan = encode_modules(mods, Target(t_kind, goal), method=quantizer, refit=refit,
                                  overhead_bytes=overhead if kind in ("size", "bits_per_param") else 0,
                                  lanes=LANES, max_levels=MAX_LEVELS, per_tensor=True, errors=False,
                                  allocation=allocation)
        st = plan.streams
        modules = [_module_dict(m, coded_tensor(plan.tensors[2 * i], LANES, st[2 * i]),
                                coded_tensor(plan.tensors[2 * i + 1], LANES, st[2 * i + 1]))
                   for i, m in enumerate(mods)]
        data = build(modules)
        if kind == "size" and len(data) > value:
            goal *= (value / len(data)) * 0.995
            continue
        if kind == "bits_per_param":
            got = 8.0 * len(data) / sum(m.A.size + m.B.size for m in mods)
            if got > value:
                goal *= (value / got) * 0.995
                continue
        if kind == "max_error" and plan.max_error > value:
            worst = max(plan.modules, key=lambda r: r.rel_error)
            raise EncodeError(f"encoding {_src_name(src)}: max_error {value:g} is unreachable with at most "
                              f"{MAX_LEVELS} quantizer levels per tensor (the apply kernels' 8-bit indices): "
                              f"module '{worst.name}' reaches {worst.rel_error:.4g}; use --bits 16 for lossless")
        break
    else:
        if kind in ("size", "bits_per_param"):
            return data, False
    return data, True


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """BLAS limited to one thread (where threadpoolctl is installed), for rate control.

    Its linear algebra is r×r Gram products over inner dimensions up to 14k (refit, module
    weights): far too small to gain from threads, and on a busy 2-core machine the threads'
    spin-waiting made a ``size=`` encode 3-15× slower than with one (6-37 s against 3.7-3.9 s,
    benchmarks/bench_size_target.py)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _min_tensor(values: np.ndarray) -> dict[str, Any]:
    """The cheapest quantized tensor (every value 0: one symbol, a 1-symbol table)."""
    from .bitio import BitWriter
    from .freqtable import best_table
    from .ecsq import bf16_bits, write_params
    from . import rans

    table = best_table(np.array([values.size]), 0)
    bw = BitWriter()
    bw.bits(0, 1)
    table.write(bw)
    write_params(bw, bf16_bits(1.0), 0, 0)
    return {"shape": values.shape, "encoding": "q", "side": bw.getvalue(),
            "section": rans.encode([(np.zeros(values.size, np.int32), table)], lanes=LANES)}


def _encode_inputs(src: str | os.PathLike[str] | Adapter) -> list[str]:
    """The paths encode reads: a directory (everything in it), or a weights file and the
    adapter_config.json beside it; for an in-memory Adapter, the path it was read from."""
    if isinstance(src, Adapter):
        return [src.source] if src.source and os.path.exists(src.source) else []
    src = os.fspath(src)
    if os.path.isdir(src):
        return [src]
    return [src, os.path.join(os.path.dirname(os.path.abspath(src)), "adapter_config.json")]


# PEFT keeps these as sets and writes them in hash order, which changes from run to run.
_SET_VALUED_KEYS = ("target_modules", "exclude_modules", "modules_to_save", "layers_to_transform")


def _portable_config(config: dict[str, Any]) -> dict[str, Any]:
    """The adapter config as the header stores it: plain msgpack types, set-valued keys sorted
    (so the same adapter gives the same bytes), and a local absolute base-model path reduced to
    its last component (the file is shipped to other machines; the path means nothing there)."""
    cfg = _jsonable(config)
    for key in _SET_VALUED_KEYS:
        v = cfg.get(key)
        if isinstance(v, list) and len({type(x) for x in v}) <= 1:
            cfg[key] = sorted(v)
    base = cfg.get("base_model_name_or_path")
    if isinstance(base, str) and os.path.isabs(base):
        cfg["base_model_name_or_path"] = os.path.basename(base.rstrip("/\\")) or base
    return cfg


def _jsonable(obj: Any) -> Any:
    """Config values as plain msgpack/JSON types (sets and tuples become sorted/plain lists)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, set):
        return sorted(_jsonable(v) for v in obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


_OUT_DTYPES = {"fp32": "F32", "fp16": "F16", "bf16": "BF16"}
_FLOAT_MAX = {"F16": 65504.0, "BF16": 3.3895313892515355e38}


def float32_to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) of float32 values, rounded to nearest, ties to even (as
    torch's ``.to(torch.bfloat16)``, bit for bit on every finite value and ±inf); a NaN becomes
    the quiet NaN 0x7FC0."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    # Adding 0x7FFF plus the lowest kept bit rounds half to even; uint32 cannot overflow for a
    # finite value (at most 0xFF7FFFFF + 0x8000) and NaNs are replaced below.
    out = ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def _to_dtype(values: np.ndarray, dtype: str, where: str) -> np.ndarray:
    """float32 ``values`` as ``dtype`` (F32, F16, or BF16 bit patterns), each rounded to nearest
    even; a finite value that the rounding turns into ±inf is a DecodeError, not a weight."""
    x = np.asarray(values, dtype=np.float32)
    if dtype == "F32":
        return x
    if dtype == "F16":
        with np.errstate(over="ignore"):  # reported below, as a DecodeError
            y = x.astype(np.float16)
        over = np.isinf(y)
    else:
        y = float32_to_bfloat16_bits(x)
        over = (y & np.uint16(0x7FFF)) == np.uint16(0x7F80)
    if over.any():
        peak = float(np.max(np.abs(x)))
        name = {"F16": "fp16", "BF16": "bf16"}[dtype]
        raise DecodeError(
            f"{where}: max |value| {peak:g} overflows {name} (largest finite {_FLOAT_MAX[dtype]:g}); "
            f"decode with --dtype fp32{' or bf16' if dtype == 'F16' else ''}"
        )
    return y


def _stored(values: np.ndarray, dtype: str) -> np.ndarray:
    """A losslessly stored tensor in its stored dtype (BF16 was widened exactly to float32)."""
    if dtype == "BF16":
        return (np.ascontiguousarray(values, dtype=np.float32).view(np.uint32) >> np.uint32(16)).astype(np.uint16)
    return np.asarray(values, dtype={"F16": "<f2", "F32": "<f4", "F64": "<f8"}[dtype])


def decode(
    path: str | os.PathLike[str] | SldFile,
    out: str | os.PathLike[str] | None = None,
    *,
    dtype: str = "fp32",
    force: bool = False,
    max_decoded_bytes: int | None = None,
    progress: Progress | None = None,
    format: str = "adapter",
    arch: str | None = None,
    base_config: str | os.PathLike[str] | dict[str, Any] | None = None,
) -> list[str]:
    """Write the dequantized adapter back in the layout it was encoded from; returns the paths
    written.

    ``format="gguf"`` writes a llama.cpp LoRA adapter instead (one file, default
    ``<file>.gguf``; ``dtype`` fp32 or fp16; ``arch``/``base_config`` name the base model's
    architecture, see :func:`deltacodec.export.gguf.export`; needs the ``gguf`` extra).

    PEFT (and any file whose ``layout`` metadata is missing or unusable, with a warning for the
    latter: metadata is informational): ``out`` ending in ``.safetensors`` gives one file
    (config in its metadata); otherwise a directory with ``adapter_model.safetensors`` and
    ``adapter_config.json`` (default: ``<file>-decoded/`` beside the input), which appears whole
    or not at all. diffusers and kohya-ss: the original file name (``pytorch_lora_weights.safetensors``,
    ...) inside ``out``, or ``out`` itself when it ends in ``.safetensors``, with the original
    keys and safetensors metadata (see :mod:`deltacodec.layouts`). ``dtype`` (fp32,
    fp16, bf16) applies to lora_A/B, rounded to nearest even; a value the rounding would turn
    into inf is a :class:`DecodeError` naming the tensor. Losslessly stored tensors keep their
    stored dtype. Tensors are decoded and written one at a time: peak memory is about one
    tensor, not the file. Needs no torch, and no metadata (a config is rebuilt from the header
    when the stored one is missing or unusable). An existing ``out`` is refused unless
    ``force``; an ``out`` that is the input or contains it is always refused (OutputError).
    ``max_decoded_bytes`` is passed to :class:`SldFile` (ignored when ``path`` is one).
    """
    if format != "adapter":
        from .export import export

        return export(format, path, out, dtype=dtype, force=force, max_decoded_bytes=max_decoded_bytes,
                      progress=progress, arch=arch, base_config=base_config)
    if arch is not None or base_config is not None:
        raise DecodeError("arch and base_config describe a llama.cpp base model: they apply to format='gguf' only")
    if dtype not in _OUT_DTYPES:
        raise DecodeError(f"dtype must be one of {', '.join(_OUT_DTYPES)}, got '{dtype}'")
    f = path if isinstance(path, SldFile) else SldFile(path, max_decoded_bytes=max_decoded_bytes)
    if out is None:
        out = os.path.splitext(f.path)[0] + "-decoded"
    out = os.fspath(out)
    kind = "file" if out.endswith(".safetensors") else "dir"
    check_output(out, [f.path], force=force, kind=kind)  # before any decoding
    target = _OUT_DTYPES[dtype]
    specs: dict[str, TensorSpec] = {}

    def add(e: TensorEntry, spec: TensorSpec) -> None:
        if e.name in specs:
            raise DecodeError(f"{f.path}: two tensors would be written as '{e.name}'")
        specs[e.name] = spec

    for m in f.modules:
        for e in (m.A, m.B):
            where = f"{f.path}: tensor '{e.name}'"
            add(e, TensorSpec(target, e.shape, lambda e=e, w=where: (_to_dtype(c, target, w) for c in f.iter_chunks(e))))
    for e in f.tensors:
        stored = e.dtype or "F32"  # a codebook-coded extra decodes to float32
        add(e, TensorSpec(stored, e.shape, lambda e=e, d=stored: (_stored(c, d) for c in f.iter_chunks(e))))
    return write_decoded(f, out, specs, force=force, inputs=[f.path], progress=progress)
