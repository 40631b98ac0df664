"""Mutated files: the reader raises only deltacodec's own errors, never crashes, never hangs,
never allocates what a corrupt size asks for, and what it accepts decodes to finite values.

Byte-level mutations (flips, cuts, insertions) mostly stop at a CRC; structure-aware ones decode
the header, replace, delete, add or rename keys and values (random msgpack values of every type),
or change section bytes, then re-encode with valid CRCs so the mutation reaches the schema, the
layout and the section checks. The default profile runs a few hundred cases in seconds;
``HYPOTHESIS_PROFILE=slow pytest -m exhaustive`` runs tens of thousands."""

from __future__ import annotations

import copy
import zlib

import msgpack
import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from deltacodec import SldError
from deltacodec.format import SldFile, build_container
from deltacodec.pack import pack_indices

from sldtools import file_from_header, parse_file, simple_file, zstd_frame

MAX_DECODED = 64 << 20  # what a fuzz case may make the reader decode


def _valid_files() -> list[bytes]:
    files = [simple_file()[0], simple_file(kind="sine", compression="zstd")[0]]
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 8, 64).astype(np.uint8)
    payload = pack_indices(idx, 4).tobytes()
    sec = zstandard.ZstdCompressor(level=1).compress(payload)
    t = {"shape": (8, 8), "encoding": "codebook", "bits": 3, "width": 4, "quantizer": "kmeans",
         "codebook_f16": np.linspace(-1, 1, 8).astype("<f2").tobytes(), "codebook_scale": 0.5,
         "compression": "zstd", "section": sec}
    mod = {"name": "layer.q", "sine": True, "out_features": 8, "in_features": 8, "rank": 8, "scale": 1.0,
           "omega": 30.0, "gamma": 2.0, "fan_in_fan_out": False, "A": t, "B": dict(t)}
    raw = {"name": "bias", "shape": (5,), "encoding": "raw", "dtype": "BF16", "compression": "none",
           "section": np.ones(5, "<u2").tobytes()}
    f64 = {"name": "lm_head.weight", "shape": (2, 3), "encoding": "raw", "dtype": "F64", "compression": "zstd",
           "section": zstd_frame([("raw", np.arange(6, dtype="<f8").tobytes())], content_size=None)}
    files.append(build_container({"method": "sine", "adapter_config": {"r": 8, "target_modules": ["q"]}},
                                 [mod], [raw, f64]))
    return files


VALID = _valid_files()


def read_everything(path: str) -> None:
    """Everything a consumer does: open, verify, decode each tensor whole and in pieces, and the
    module factors; what is accepted is finite."""
    f = SldFile(path, max_decoded_bytes=MAX_DECODED)
    try:
        f.verify()
        for e in f.entries():
            whole = f.tensor(e)
            assert np.isfinite(whole).all()
            pieces = list(f.iter_chunks(e, 5))
            assert np.concatenate(pieces).tobytes() == whole.reshape(-1).tobytes()
        for m in f.modules:
            A, B = f.dequantize(m.name)
            assert np.isfinite(A).all() and np.isfinite(B).all()
    finally:
        f.close()


def _check(tmp_path_factory, data: bytes) -> None:
    p = tmp_path_factory.mktemp("fz") / "fuzzed.sld"
    p.write_bytes(data)
    try:
        read_everything(str(p))
    except SldError as exc:
        msg = str(exc)
        assert "fuzzed.sld" in msg, msg
        assert "\n" not in msg and "\x1b" not in msg, msg


# ---------------------------------------------------------------------------------------------
# Byte-level


@given(
    which=st.integers(0, len(VALID) - 1),
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), min_size=1, max_size=4),
)
def test_flipped_bytes_raise_only_library_errors(tmp_path_factory, which, flips):
    data = bytearray(VALID[which])
    for pos, mask in flips:
        data[pos % len(data)] ^= mask
    _check(tmp_path_factory, bytes(data))


@given(which=st.integers(0, len(VALID) - 1), cut=st.integers(0, 10_000))
def test_truncated_files_raise_only_library_errors(tmp_path_factory, which, cut):
    data = VALID[which]
    p = tmp_path_factory.mktemp("tr") / "f.sld"
    p.write_bytes(data[: cut % len(data)])
    with pytest.raises(SldError):
        read_everything(str(p))


@given(which=st.integers(0, len(VALID) - 1), junk=st.binary(min_size=1, max_size=64), pos=st.integers(0, 10_000))
def test_inserted_bytes_raise_only_library_errors(tmp_path_factory, which, junk, pos):
    data = VALID[which]
    i = pos % len(data)
    _check(tmp_path_factory, data[:i] + junk + data[i:])


# ---------------------------------------------------------------------------------------------
# Structure-aware: mutate the decoded header, re-encode with valid CRCs

# Values a header field might plausibly (or implausibly) hold: every msgpack type, the edges of
# the ranges the spec states, and the strings the schema knows.
_EDGE_INTS = [0, 1, -1, 2, 7, 8, 9, 16, 2**31 - 1, 2**31, 2**32, 2**33, 2**33 + 1, 2**63 - 1, -(2**63), 2**64 - 1]
_EDGE_FLOATS = [0.0, -0.0, 1.0, -1.0, 0.1, 65504.0, 3.4e38, 1e39, 2.0**127, 2.0**-149, 1e300, float("nan"),
                float("inf"), float("-inf")]
_WORDS = ["lora", "sine", "codebook", "raw", "zstd", "none", "F16", "BF16", "F32", "F64", "kmeans", "", "m",
          "base_model.model.", "m.weight", "layer.q.lora_A.weight", "a\nb", "\x1b[31m", "\u0085", "x" * 1025]
_KEYS = ["name", "kind", "shape", "bits", "width", "codebook", "codebook_scale", "offset", "length", "crc32",
         "omega", "gamma", "scale", "rank", "A", "B", "dtype", "encoding", "compression", "quantizer",
         "metadata", "modules", "tensors", "fan_in_fan_out", "in_features", "out_features"]

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from(_EDGE_INTS),
    st.integers(-(2**63), 2**64 - 1),
    st.sampled_from(_EDGE_FLOATS),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(_WORDS),
    st.text(max_size=12),
    st.binary(max_size=24),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.sampled_from(_KEYS) | st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


def _slots(obj, out: list) -> list:
    """(container, key) of every value in the header, containers included."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.append((obj, k))
            _slots(v, out)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.append((obj, i))
            _slots(v, out)
    return out


def _mutate_header(data, h: dict) -> None:
    for _ in range(data.draw(st.integers(1, 3))):
        slots = _slots(h, [])
        container, key = slots[data.draw(st.integers(0, len(slots) - 1))]
        op = data.draw(st.sampled_from(["set", "set", "set", "delete", "add", "rename"]))
        if op == "set":
            container[key] = data.draw(_values)
        elif op == "delete":
            del container[key]
        elif op == "add":
            if isinstance(container, dict):
                container[data.draw(st.sampled_from(_KEYS) | st.text(max_size=6))] = data.draw(_values)
            else:
                container.insert(key, data.draw(_values))
        elif isinstance(container, dict):
            new = data.draw(st.sampled_from(_KEYS))
            container[new] = container.pop(key)


def _items(h: dict) -> list:
    out = []
    for m in h.get("modules", []) if isinstance(h.get("modules"), list) else []:
        for k in ("A", "B"):
            if isinstance(m, dict) and isinstance(m.get(k), dict):
                out.append(m[k])
    for t in h.get("tensors", []) if isinstance(h.get("tensors"), list) else []:
        if isinstance(t, dict):
            out.append(t)
    return out


def _structured_case(data) -> bytes:
    h, secs = parse_file(VALID[data.draw(st.integers(0, len(VALID) - 1))])
    h = copy.deepcopy(h)
    secs = list(secs)
    if data.draw(st.booleans()):
        _mutate_header(data, h)
    if data.draw(st.booleans()):
        # change a section's bytes and fix its CRC, so the change reaches the decoder
        items = _items(h)
        i = data.draw(st.integers(0, len(secs) - 1))
        s = bytearray(secs[i])
        for _ in range(data.draw(st.integers(1, 3))):
            s[data.draw(st.integers(0, len(s) - 1))] ^= data.draw(st.integers(1, 255))
        secs[i] = bytes(s)
        if i < len(items) and isinstance(items[i], dict):
            items[i]["crc32"] = zlib.crc32(secs[i])
    try:
        packed = msgpack.packb(h, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        packed = msgpack.packb({"metadata": {}, "modules": [], "tensors": []})
    return file_from_header(packed, secs, packer=lambda b: b)


@given(data=st.data())
def test_structure_aware_mutations_raise_only_library_errors(tmp_path_factory, data):
    _check(tmp_path_factory, _structured_case(data))


@pytest.mark.exhaustive
@settings(max_examples=20_000)
@given(data=st.data())
def test_structure_aware_mutations_long_run(tmp_path_factory, data):
    _check(tmp_path_factory, _structured_case(data))


@pytest.mark.exhaustive
@settings(max_examples=20_000)
@given(which=st.integers(0, len(VALID) - 1), flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), min_size=1, max_size=8))
def test_flipped_bytes_long_run(tmp_path_factory, which, flips):
    data = bytearray(VALID[which])
    for pos, mask in flips:
        data[pos % len(data)] ^= mask
    _check(tmp_path_factory, bytes(data))
