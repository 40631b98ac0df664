"""The container reader against spec/sld-format.md: one test per MUST, named in the spec.

Bad files are made by hand (tests/sldtools.py: its own msgpack maps, bit packer and zstd frames),
so the reader is checked against the spec, not against the writer."""

from __future__ import annotations

import copy
import struct
import zlib

import msgpack
import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from deltacodec import EncodeError, SldChecksumError, SldError, SldFormatError, SldLimitError, SldVersionError, load
from deltacodec.format import MAGIC, SldFile, build_container

from sldtools import (
    assemble,
    codebook_tensor,
    f16_codebook,
    file_from_header,
    header_bytes_file,
    lora_module,
    parse_file,
    raw_tensor,
    ref_pack,
    relayout,
    simple_file,
    wide_pack,
    zstd_frame,
)


def write(tmp_path, data: bytes, name: str = "f.sld"):
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


def open_all(path: str) -> SldFile:
    """Open and check every section (what a full decode does)."""
    f = SldFile(path)
    f.verify()
    return f


def rejects(tmp_path, data: bytes, cls=SldFormatError, match: str | None = None, name: str = "f.sld"):
    """The file is refused with exactly ``cls`` (on open or when its sections are checked), and
    the message names the file."""
    p = write(tmp_path, data, name)
    with pytest.raises(SldError) as exc:
        open_all(p)
    assert type(exc.value) is cls, f"{type(exc.value).__name__}: {exc.value}"
    assert name in str(exc.value)
    if match is not None:
        import re

        assert re.search(match, str(exc.value)), str(exc.value)
    return exc.value


def base() -> tuple[dict, list[bytes]]:
    """A valid file's header object and sections: module 'm' (2-bit codebooks) and a raw F32
    extra 'x', to change one thing in."""
    data, _ = simple_file()
    h, secs = parse_file(data)
    t, s = raw_tensor(np.array([1.0, -2.0, 3.0], np.float32))
    t["name"] = "x"
    h["tensors"].append(t)
    secs.append(s)
    return relayout(h, secs), secs


def rebuild(h: dict, secs: list[bytes], **kw) -> bytes:
    return file_from_header(relayout(h, secs), secs, **kw)


def test_valid_simple_file_decodes_to_codebook_at_indices(tmp_path):
    data, info = simple_file()
    f = load(write(tmp_path, data))
    (m,) = f.modules
    A, B = f.dequantize(m.name)
    cb = np.array([-1.0, -0.25, 0.25, 1.0], dtype=np.float32)
    np.testing.assert_array_equal(A, (cb * np.float32(0.5))[info["a_idx"]].reshape(2, 5))
    np.testing.assert_array_equal(B, (cb * np.float32(0.125))[info["b_idx"]].reshape(3, 2))


METADATA_OF_EVERY_KIND = [
    {},
    {"encoder": 7, "method": None, "adapter_config": {"nested": [1, 2.5, b"x"]}, "x": {}},
    {"adapter_config": [1, 2, 3], "base_model": b"\xff\xfe", "method": 3.5, "encoder": True},
    {"adapter_config": {"a": {"b": {"c": {"d": [[[[None]]]]}}}}, "weird\nkey": "\x1b[31mred"},
    {"k" * 5000: "v" * 100_000, "big": list(range(1000)), "neg": -(2**63), "u64": 2**64 - 1},
]


@pytest.mark.parametrize("metadata", METADATA_OF_EVERY_KIND, ids=range(len(METADATA_OF_EVERY_KIND)))
def test_metadata_is_not_needed_to_decode(tmp_path, metadata):
    # Metadata is informational: whatever it holds (any type, within the limits), the file opens
    # and decodes to the same tensors, and the value is handed back as it was stored.
    h, secs = base()
    ref = open_all(write(tmp_path, rebuild(h, secs), "ref.sld"))
    h["metadata"] = metadata
    f = open_all(write(tmp_path, rebuild(h, secs), "meta.sld"))
    assert f.metadata == metadata
    for e, r in zip(f.entries(), ref.entries()):
        np.testing.assert_array_equal(f.tensor(e), ref.tensor(r))


# ---------------------------------------------------------------------------------------------
# Preamble and check order (sections 2 and 7.2)


def test_reader_rejects_bad_magic(tmp_path):
    data, _ = simple_file()
    rejects(tmp_path, b"\x89SLX" + data[4:], match="not an .sld file")
    rejects(tmp_path, b"PK\x03\x04" + b"\0" * 40, match="not an .sld file")


def test_text_file_is_not_an_sld_file(tmp_path):
    # The magic is checked on whatever bytes exist before the length: a short text file is not
    # "truncated", it is not an .sld file at all.
    for text in (b"hello world", b"{", b"x" * 19, b"#!/bin/sh\n"):
        rejects(tmp_path, text, match="not an .sld file")


def test_reader_rejects_truncated_preamble(tmp_path):
    data, _ = simple_file()
    for n in (1, 7, 8, 11, 12, 19):  # prefixes of a valid preamble
        rejects(tmp_path, data[:n], match="truncated")
    rejects(tmp_path, b"", match="empty file")


def test_reader_rejects_future_version(tmp_path):
    data, _ = simple_file()
    # version 3 is the future since container version 2 exists (tests/test_v2_container.py checks
    # that a version-1-only reader refuses version 2 the same way)
    bad = data[:8] + struct.pack("<I", 3) + data[12:]
    exc = rejects(tmp_path, bad, SldVersionError)
    assert exc.found == 3 and exc.supported == (1, 2)
    assert "version 3" in str(exc) and "supports 1, 2" in str(exc) and "newer" in str(exc)
    rejects(tmp_path, data[:8] + struct.pack("<I", 0) + data[12:], SldVersionError)
    # The version is read as soon as 12 bytes exist: a future file with a shorter preamble
    # gets the version error, not "truncated".
    rejects(tmp_path, data[:8] + struct.pack("<I", 7), SldVersionError)


CHECK_ORDER = [
    # (bytes, expected class, message): each file breaks the rule named and every later one.
    (b"hello world", SldFormatError, "not an .sld file"),
    (b"\x89SLD\r\n\x1a", SldFormatError, "truncated"),
    (MAGIC + struct.pack("<I", 9), SldVersionError, "version 9"),
    (MAGIC + struct.pack("<III", 9, 0, 0), SldVersionError, "version 9"),
    (MAGIC + struct.pack("<I", 1) + b"\0" * 4, SldFormatError, "truncated"),
    (MAGIC + struct.pack("<III", 1, (1 << 28) + 1, 0), SldLimitError, "header length"),
    (MAGIC + struct.pack("<III", 1, 0, 0), SldFormatError, "header length 0"),
    (MAGIC + struct.pack("<III", 1, 5, 0) + b"abc", SldFormatError, "header length 5"),
    (MAGIC + struct.pack("<III", 1, 3, 0) + b"abc", SldChecksumError, "header CRC-32"),
    (MAGIC + struct.pack("<III", 1, 3, zlib.crc32(b"abc")) + b"abc", SldFormatError, "zstd"),
]


@pytest.mark.parametrize("data,cls,msg", CHECK_ORDER, ids=[m for _, _, m in CHECK_ORDER])
def test_check_order_is_magic_version_length_header(tmp_path, data, cls, msg):
    rejects(tmp_path, data, cls, msg)


def test_reader_rejects_bad_header_length(tmp_path):
    data, _ = simple_file()
    rest = len(data) - 20
    for hlen in (0, rest + 1):
        rejects(tmp_path, data[:12] + struct.pack("<I", hlen) + data[16:], SldFormatError, "header length")
    for hlen in ((1 << 28) + 1, 0xFFFFFFFF):
        exc = rejects(tmp_path, data[:12] + struct.pack("<I", hlen) + data[16:], SldLimitError, "header length")
        assert exc.limit == 1 << 28 and exc.requested == hlen


def test_crc32_is_the_iso_hdlc_crc(tmp_path):
    # The check value of CRC-32/ISO-HDLC, and the reader computes exactly that on a header.
    assert zlib.crc32(b"123456789") == 0xCBF43926
    raw = b"123456789"
    data = MAGIC + struct.pack("<III", 1, len(raw), 0xCBF43926) + raw
    rejects(tmp_path, data, SldFormatError, "not a zstd frame")  # past the CRC check
    rejects(tmp_path, data[:16] + struct.pack("<I", 0xCBF43927) + raw, SldChecksumError, "computed 0xcbf43926")


def test_reader_detects_header_corruption(tmp_path):
    data, _ = simple_file()
    for pos in (20, 25, 20 + struct.unpack_from("<I", data, 12)[0] - 1):
        bad = bytearray(data)
        bad[pos] ^= 0x40
        rejects(tmp_path, bytes(bad), SldChecksumError, "header CRC-32")


def test_header_decompression_is_bounded(tmp_path):
    cap = 1 << 28
    # Declares more than the cap (the blocks really hold that much: 2049 RLE blocks, 8 KB).
    exc = rejects(tmp_path, header_bytes_file(zstd_frame([("rle", 0x80, cap + 1)]), b""), SldLimitError, "declares")
    assert exc.limit == cap and exc.requested == cap + 1
    # The same without a declared size: the RLE blocks alone say it expands past the cap.
    rejects(tmp_path, header_bytes_file(zstd_frame([("rle", 0x80, cap + 1)], content_size=None), b""),
            SldLimitError, "expands")
    # A compressed frame without a declared size: decompression stops at the cap (lowered here
    # to 1 MiB so the test does not hold 256 MiB).
    import deltacodec.format as fmt

    small = 1 << 20
    cobj = zstandard.ZstdCompressor(level=1, write_content_size=False).compressobj()
    big = b"".join(cobj.compress(b"\0" * (1 << 16)) for _ in range(small // (1 << 16) + 1)) + cobj.flush()
    mp = pytest.MonkeyPatch()
    mp.setattr(fmt, "MAX_HEADER_DECODED", small)
    try:
        exc = rejects(tmp_path, header_bytes_file(big, b""), SldLimitError, "expands to more than")
        assert exc.limit == small
    finally:
        mp.undo()
    # Trailing bytes after the frame, inside the header; a second frame; not a zstd frame.
    ok = zstd_frame([("raw", msgpack.packb({"metadata": {}, "modules": [], "tensors": []}))])
    rejects(tmp_path, header_bytes_file(ok + b"\0", b""), SldFormatError, "after the end of the zstd frame")
    rejects(tmp_path, header_bytes_file(ok + ok, b""), SldFormatError, "after the end of the zstd frame")
    rejects(tmp_path, header_bytes_file(b"hello world", b""), SldFormatError, "not a zstd frame")


# ---------------------------------------------------------------------------------------------
# msgpack (section 3.1)


def _header_file(obj) -> bytes:
    raw = msgpack.packb(obj, use_bin_type=True) if not isinstance(obj, bytes) else obj
    return header_bytes_file(zstd_frame([("raw", raw)]), b"")


def test_reader_rejects_wrong_header_types(tmp_path):
    cases = [
        (b"\xc1garbage", "invalid byte 0xc1"),
        ([1, 2, 3], "must be a msgpack map, got array"),
        (b"\xa3abc", "must be a msgpack map, got str"),
        ({"metadata": {}, "modules": {}, "tensors": []}, "expected array, got map"),
        ({"metadata": [], "modules": [], "tensors": []}, "expected map, got array"),
        ({"metadata": {}, "modules": [5], "tensors": []}, "expected a map, got int"),
        ({"metadata": {}, "modules": [], "tensors": [[1]]}, "expected a map, got array"),
        (msgpack.packb({"metadata": {"x": msgpack.ExtType(5, b"abc")}, "modules": [], "tensors": []}), "extension type 5"),
        (msgpack.packb({"metadata": {"t": msgpack.Timestamp(1)}, "modules": [], "tensors": []}), "extension type -1"),
        (b"\x83\xa8metadata\x80\xa7modules\x90\xa7tensors\x91\x81\xa4name", "ends inside a value|ends before"),
    ]
    for obj, msg in cases:
        rejects(tmp_path, _header_file(obj), SldFormatError, msg)
    h, secs = base()
    h["modules"][0]["A"]["codebook"] = msgpack.ExtType(1, b"\0" * 8)
    rejects(tmp_path, rebuild(h, secs), SldFormatError, "extension type 1")


def test_reader_rejects_invalid_utf8(tmp_path):
    h, secs = base()
    raw = msgpack.packb(relayout(h, secs), use_bin_type=True).replace(b"\xa1m", b"\xa1\xff", 1)
    rejects(tmp_path, header_bytes_file(zstd_frame([("raw", raw)]), b"".join(secs)), SldFormatError, "not valid UTF-8")


def test_reader_rejects_bytes_after_header_map(tmp_path):
    h, secs = base()
    for junk in (b"\x00", b"\xc0", msgpack.packb({"metadata": {}}), b"\0" * 100):
        data = rebuild(h, secs, packer=lambda o: msgpack.packb(o, use_bin_type=True) + junk)
        rejects(tmp_path, data, SldFormatError, f"{len(junk)} bytes after the header map")


def test_reader_rejects_duplicate_keys(tmp_path):
    # msgpack-python keeps the last of duplicate keys, other decoders the first: a file whose
    # meaning depends on that is refused, in any map at any depth.
    h, secs = base()

    def kv(k, v):
        return msgpack.packb(k) + msgpack.packb(v, use_bin_type=True)

    rest = kv("modules", h["modules"]) + kv("tensors", h["tensors"])
    cases = {
        "root": b"\x84" + kv("metadata", {}) + kv("metadata", {}) + rest,
        "metadata": b"\x83\xa8metadata\x82" + kv("a", 1) + kv("a", 2) + rest,
        "nested": b"\x83\xa8metadata\x81\xa1c\x82" + kv("a", 1) + kv("a", 1) + rest,
    }
    for where, raw in cases.items():
        rejects(tmp_path, header_bytes_file(zstd_frame([("raw", raw)]), b"".join(secs)), SldFormatError,
                "duplicate map key 'a'|duplicate map key 'metadata'")
    for path in (("modules", 0), ("modules", 0, "A"), ("tensors", 0)):
        h2 = copy.deepcopy(h)
        target = h2[path[0]][path[1]] if len(path) == 2 else h2[path[0]][path[1]][path[2]]
        key = next(iter(target))
        items = list(target.items()) + [(key, target[key])]
        body = b"\xde" + struct.pack(">H", len(items)) + b"".join(kv(k, v) for k, v in items)
        marker = msgpack.packb(target, use_bin_type=True)
        raw = msgpack.packb(h2, use_bin_type=True).replace(marker, body, 1)
        rejects(tmp_path, header_bytes_file(zstd_frame([("raw", raw)]), b"".join(secs)), SldFormatError,
                f"duplicate map key '{key}'")


def test_reader_rejects_non_string_keys(tmp_path):
    h, secs = base()
    rest = msgpack.packb("modules") + msgpack.packb(h["modules"], use_bin_type=True) + \
        msgpack.packb("tensors") + msgpack.packb(h["tensors"], use_bin_type=True)
    for key in (b"\x01", b"\xc0", b"\xc3", b"\xcb" + struct.pack(">d", 1.0), b"\xc4\x01a", b"\x90", b"\x80"):
        raw = b"\x83\xa8metadata\x81" + key + b"\x01" + rest
        rejects(tmp_path, header_bytes_file(zstd_frame([("raw", raw)]), b"".join(secs)), SldFormatError,
                "key .*is not a string|not a string")
    raw = b"\x84\x01\x02" + msgpack.packb("metadata") + b"\x80" + rest
    rejects(tmp_path, header_bytes_file(zstd_frame([("raw", raw)]), b"".join(secs)), SldFormatError, "not a string")


def test_reader_accepts_any_msgpack_encoding(tmp_path):
    # The same header in the widest encodings (map 32, array 32, str 32, bin 32, uint 64, float 64)
    # and with codebook_scale as float 32: the same file to a reader.
    h, secs = base()
    ref = open_all(write(tmp_path, rebuild(h, secs), "ref.sld"))
    wide = open_all(write(tmp_path, rebuild(h, secs, packer=wide_pack), "wide.sld"))

    def f32_scale(o):
        raw = msgpack.packb(o, use_bin_type=True)
        return raw.replace(b"\xcb" + struct.pack(">d", 0.5), b"\xca" + struct.pack(">f", 0.5))

    f32 = open_all(write(tmp_path, rebuild(h, secs, packer=f32_scale), "f32.sld"))
    for f in (wide, f32):
        assert f.modules == ref.modules and f.tensors == ref.tensors
        for e, r in zip(f.entries(), ref.entries()):
            np.testing.assert_array_equal(f.tensor(e), ref.tensor(r))


# ---------------------------------------------------------------------------------------------
# Root, module and tensor maps (sections 3.2-3.5)


def test_reader_rejects_unknown_keys(tmp_path):
    h, secs = base()
    for where in ("root", "module", "A", "B", "tensor"):
        h2 = copy.deepcopy(h)
        target = {"root": h2, "module": h2["modules"][0], "A": h2["modules"][0]["A"], "B": h2["modules"][0]["B"],
                  "tensor": h2["tensors"][0]}[where]
        target["surprise"] = True
        rejects(tmp_path, rebuild(h2, secs), SldFormatError, "unknown key 'surprise'")
    # codebook keys on a raw map, dtype on a codebook map, name on a factor map
    h2 = copy.deepcopy(h)
    h2["tensors"][0]["bits"] = 2
    rejects(tmp_path, rebuild(h2, secs), SldFormatError, "unknown key 'bits'")
    h2 = copy.deepcopy(h)
    h2["modules"][0]["A"]["dtype"] = "F32"
    rejects(tmp_path, rebuild(h2, secs), SldFormatError, "unknown key 'dtype'")
    h2 = copy.deepcopy(h)
    h2["modules"][0]["A"]["name"] = "a"
    rejects(tmp_path, rebuild(h2, secs), SldFormatError, "unknown key 'name'")
    for key in ("tensors", "metadata"):
        data = rebuild(h, secs, packer=lambda o: msgpack.packb({k: v for k, v in o.items() if k != key}))
        rejects(tmp_path, data, SldFormatError, f"missing key '{key}'")
    for key in ("A", "name", "fan_in_fan_out"):
        h2 = relayout(copy.deepcopy(h), secs)
        del h2["modules"][0][key]
        rejects(tmp_path, file_from_header(h2, secs), SldFormatError, f"missing key '{key}'")


def test_reader_rejects_empty_file(tmp_path):
    rejects(tmp_path, _header_file({"metadata": {}, "modules": [], "tensors": []}), SldFormatError, "empty adapter")


def _module_file(**over) -> bytes:
    m = lora_module(**{k: v for k, v in over.items() if k not in ("a_shape", "drop")})
    a_shape = over.get("a_shape", (m["rank"], m["in_features"]))
    b_shape = (m["out_features"], m["rank"])
    cb = f16_codebook([0, 1, 2, 3])
    m["A"], sa = codebook_tensor(a_shape, 2, 2, [1] * int(np.prod(a_shape)), cb)
    m["B"], sb = codebook_tensor(b_shape, 2, 2, [1] * int(np.prod(b_shape)), cb)
    for k in over.get("drop", ()):
        del m[k]
    return assemble([m], [], [sa, sb])


def test_reader_rejects_inconsistent_module(tmp_path):
    cases = [
        (dict(drop=("scale",)), "missing key 'scale'"),
        (dict(drop=("kind",)), "missing key 'kind'"),
        (dict(kind="sine", omega=0.0), "non-zero omega"),
        (dict(kind="sine", gamma=0.0), "must be > 0"),
        (dict(kind="sine", gamma=-2.0), "must be > 0"),
        (dict(kind="sine", drop=("omega",)), "missing key 'omega'"),
        (dict(kind="lora", omega=3.0), "no omega or gamma"),
        (dict(kind="dora"), "not one of lora, sine"),
        (dict(kind=1), "not one of lora, sine"),
        (dict(a_shape=(3, 5)), r"A.shape.*expected \[rank, in_features\]"),
        (dict(rank=0), r"outside \[1,"),
        (dict(scale=float("nan")), "not finite"),
        (dict(fan_in_fan_out=1), "expected bool, got int"),
    ]
    for over, msg in cases:
        rejects(tmp_path, _module_file(**over), SldFormatError, msg)
    h, secs = base()
    for key in ("in_features", "out_features", "rank"):
        h2 = copy.deepcopy(h)
        h2["modules"][0][key] = 2**31
        rejects(tmp_path, file_from_header(h2, secs), SldFormatError, rf"{key}: 2147483648 is outside \[1, 2147483647\]")


SCALAR_FIELDS = {
    # field path -> (valid value, wrong values of other msgpack types)
    ("modules", "rank"): [8.0, True, "2", None, b"\x02", [2]],
    ("modules", "out_features"): [3.0, False, "3"],
    ("modules", "scale"): [2, True, "2.0", None, [2.0]],
    ("modules", "fan_in_fan_out"): [0, 1, "false", None, 0.0],
    ("modules", "name"): [b"m", 5, None, ["m"]],
    ("modules", "kind"): [b"lora", None],
    ("A", "bits"): [2.0, True, "2"],
    ("A", "width"): [2.0, True],
    ("A", "codebook"): ["\x00" * 8, [0] * 8, None],
    ("A", "codebook_scale"): [1, True, "0.5", None],
    ("A", "quantizer"): [b"kmeans", 1, None],
    ("A", "shape"): [{"0": 2}, "2x5", 10, [2.0, 5.0], [True, 5]],
    ("A", "offset"): [0.0, False, None],
    ("A", "length"): [3.0, True],
    ("A", "crc32"): [float(1), None, "0"],
    ("A", "compression"): [b"none", None, 0],
    ("A", "encoding"): [b"codebook", 1],
    ("tensors", "dtype"): [b"F32", 32, None],
    ("tensors", "name"): [b"x", 1],
}


@pytest.mark.parametrize("path", list(SCALAR_FIELDS), ids=[".".join(p) for p in SCALAR_FIELDS])
def test_reader_rejects_wrong_scalar_types(tmp_path, path):
    # ints are msgpack ints only (not bool, not float), floats are msgpack floats only (not int),
    # bools are true/false, strings are str (not bin), byte strings are bin (not str).
    h, secs = base()
    for bad in SCALAR_FIELDS[path] + [[], {"a": 1}, [[1]]]:  # unhashable values too
        h2 = copy.deepcopy(h)
        target = {"modules": h2["modules"][0], "A": h2["modules"][0]["A"], "tensors": h2["tensors"][0]}[path[0]]
        target[path[1]] = bad
        data = file_from_header(h2, secs)  # offsets left as they were: only the one field differs
        rejects(tmp_path, data, SldFormatError)


def test_reader_rejects_duplicate_names(tmp_path):
    t1, s1 = raw_tensor(np.ones(3, np.float32))
    t2, s2 = raw_tensor(np.ones(3, np.float32))
    t1["name"] = t2["name"] = "same"
    rejects(tmp_path, assemble([], [t1, t2], [s1, s2]), SldFormatError, "duplicate name 'same'")
    h, secs = base()
    h["tensors"][0]["name"] = "m"  # a module and an extra tensor of the same name
    rejects(tmp_path, rebuild(h, secs), SldFormatError, "duplicate name 'm'")


NAME_COLLISIONS = [
    # (module names, extra tensor names): each pair claims the same model-side tensor
    (["base_model.model.lin", "lin"], []),
    (["lin", "base_model.model.lin"], []),
    (["m"], ["m.weight"]),
    (["m"], ["base_model.model.m.weight"]),
    (["base_model.model.m"], ["m.weight"]),
    (["m"], ["m.lora_A.weight"]),
    (["m"], ["base_model.model.m.lora_B.weight"]),
    ([], ["lm_head.bias", "base_model.model.lm_head.bias"]),
    (["m", "m.lora_A"], []),  # m.lora_A.weight is both module m's factor and module m.lora_A's weight
]


@pytest.mark.parametrize("modules,extras", NAME_COLLISIONS, ids=[" + ".join(a + b) for a, b in NAME_COLLISIONS])
def test_reader_rejects_name_collisions(tmp_path, modules, extras):
    h, secs = base()
    mod0, (sa, sb), x, sx = h["modules"][0], secs[:2], h["tensors"][0], secs[2]
    h["modules"], h["tensors"], secs = [], [], []
    for n in modules:
        m = copy.deepcopy(mod0)
        m["name"] = n
        h["modules"].append(m)
        secs += [sa, sb]
    tsecs = []
    for n in extras:
        t = copy.deepcopy(x)
        t["name"] = n
        h["tensors"].append(t)
        tsecs.append(sx)
    rejects(tmp_path, rebuild(h, secs + tsecs), SldFormatError, "maps onto the same model tensor")


def test_distinct_names_do_not_collide(tmp_path):
    # Near misses are fine: different stems, a bias beside its module's weight, a prefix only in part.
    h, secs = base()
    mod0, x, sx = h["modules"][0], h["tensors"][0], secs[2]
    h["modules"] = [dict(copy.deepcopy(mod0), name=n) for n in ("a.q", "a.k", "base_model.model.a.v")]
    h["tensors"] = [dict(copy.deepcopy(x), name=n) for n in ("a.q.bias", "base_model.a.q.weight", "lora_A.weight")]
    secs = secs[:2] * 3 + [sx] * 3
    open_all(write(tmp_path, rebuild(h, secs)))


BAD_NAMES = (
    [("", "0 bytes"), ("a" * 1025, "1025 bytes"), ("é" * 513, "1026 bytes"), ("base_model.model.", "only the prefix")]
    + [(f"a{chr(c)}b", f"U\\+{c:04X}") for c in list(range(0x20)) + [0x7F] + list(range(0x80, 0xA0))]
)


@pytest.mark.parametrize("name,msg", BAD_NAMES, ids=[repr(n[:12]) for n, _ in BAD_NAMES])
def test_reader_rejects_bad_names(tmp_path, name, msg):
    # Names are 1..1024 bytes of UTF-8 without control characters (C0, DEL, C1), for modules and
    # extra tensors alike; the message shows the name escaped, never raw.
    for which in ("modules", "tensors"):
        h, secs = base()
        h[which][0]["name"] = name
        exc = rejects(tmp_path, rebuild(h, secs), SldFormatError, msg)
        assert not any(ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0 for ch in str(exc))


def test_names_are_compared_as_utf8_bytes(tmp_path):
    # No Unicode normalisation: NFC and NFD spellings are different names; 1024 bytes of
    # multi-byte characters is the limit, whatever the character count.
    h, secs = base()
    mod0 = h["modules"][0]
    h["modules"] = [dict(copy.deepcopy(mod0), name="caf\u00e9"), dict(copy.deepcopy(mod0), name="cafe\u0301")]
    h["tensors"][0]["name"] = "\u00e9" * 512
    f = open_all(write(tmp_path, rebuild(h, secs[:2] * 2 + secs[2:])))
    assert [m.name for m in f.modules] == ["caf\u00e9", "cafe\u0301"]


def test_reader_accepts_any_quantizer_name(tmp_path):
    # quantizer is informational: any 1..64-byte string without control characters decodes the
    # same (a new quantizer does not need a new version).
    h, secs = base()
    ref = open_all(write(tmp_path, rebuild(h, secs), "ref.sld"))
    for q in ("gptq-like", "x", "ü" * 32, "k" * 64):
        h["modules"][0]["A"]["quantizer"] = q
        f = open_all(write(tmp_path, rebuild(h, secs)))
        assert f.modules[0].A.quantizer == q
        np.testing.assert_array_equal(f.tensor(f.modules[0].A), ref.tensor(ref.modules[0].A))
    for q in ("", "k" * 65, "a\nb"):
        h["modules"][0]["A"]["quantizer"] = q
        rejects(tmp_path, rebuild(h, secs), SldFormatError, "quantizer")


def test_reader_rejects_bad_codebook(tmp_path):
    def file_with(**over):
        m = lora_module()
        cb = over.pop("cb", f16_codebook([0, 1, 2, 3]))
        m["A"], sa = codebook_tensor((2, 5), 2, 2, [1] * 10, cb)
        m["B"], sb = codebook_tensor((3, 2), 2, 2, [1] * 6, f16_codebook([0, 1, 2, 3]))
        m["A"].update(over)
        return assemble([m], [], [sa, sb])

    cases = [
        (dict(cb=f16_codebook([0, 1, 2])), "expected 8"),
        (dict(cb=f16_codebook([0, 1, 2, 3, 4])), "expected 8"),
        (dict(cb=f16_codebook([0, 1, float("nan"), 3])), "NaN or Inf"),
        (dict(cb=f16_codebook([0, 1, float("inf"), 3])), "NaN or Inf"),
        (dict(cb=f16_codebook([0, 1, float("-inf"), 3]), codebook_scale=0.0), "NaN or Inf"),
        (dict(codebook_scale=-1.0), "non-negative float32"),
        (dict(codebook_scale=0.1), "non-negative float32"),  # 0.1 is not a float32 value
        (dict(codebook_scale=3.5e38), "non-negative float32"),
        (dict(codebook_scale=float("inf")), "not finite"),
        (dict(bits=9), r"outside \[1, 8\]"),
        (dict(bits=0), r"outside \[1, 8\]"),
        (dict(width=1), r"outside \[2, 8\]"),
        (dict(width=9), r"outside \[2, 8\]"),
        (dict(compression="lz4"), "not one of zstd, none"),
        (dict(shape=[2, 0]), "dimension 0"),
        (dict(shape=[]), "0 dimensions"),
        (dict(shape=[1] * 9), "9 dimensions"),
        (dict(shape=[-1, 5]), "dimension -1"),
        (dict(encoding="huffman"), "not one of codebook, raw"),
    ]
    for over, msg in cases:
        rejects(tmp_path, file_with(**over), SldFormatError, msg)


def test_codebook_scale_zero_and_negative_zero_decode_to_zeros(tmp_path):
    h, secs = base()
    for scale in (0.0, -0.0):
        h["modules"][0]["A"]["codebook_scale"] = scale
        f = open_all(write(tmp_path, rebuild(h, secs)))
        A = f.tensor(f.modules[0].A)
        assert (A == 0).all()


# ---------------------------------------------------------------------------------------------
# Sections (section 4)


def test_reader_checks_offset_invariant(tmp_path):
    h, secs = base()
    for i, off in ((1, 0), (1, 4), (2, 0), (2, 100)):
        h2 = relayout(copy.deepcopy(h), secs)
        items = [h2["modules"][0]["A"], h2["modules"][0]["B"], h2["tensors"][0]]
        items[i]["offset"] = off
        rejects(tmp_path, file_from_header(h2, secs), SldFormatError, "sections are contiguous")


def test_reader_rejects_truncated_file(tmp_path):
    data, _ = simple_file()
    for cut in (1, 2, 5):
        rejects(tmp_path, data[:-cut], SldFormatError, "runs past the end|truncated")


def test_reader_rejects_trailing_bytes(tmp_path):
    data, _ = simple_file()
    rejects(tmp_path, data + b"\0", SldFormatError, "1 trailing bytes")
    rejects(tmp_path, data + data, SldFormatError, "trailing bytes")


def test_reader_rejects_wrong_uncompressed_length(tmp_path):
    m = lora_module()
    cb = f16_codebook([0, 1, 2, 3])
    m["A"], sa = codebook_tensor((2, 5), 2, 2, [1] * 10, cb)
    m["B"], sb = codebook_tensor((3, 2), 2, 2, [1] * 6, cb)
    rejects(tmp_path, assemble([m], [], [sa + b"\0", sb]), SldFormatError, "stored uncompressed, shape needs 3")
    h, secs = base()
    secs[2] = secs[2][:-4]
    rejects(tmp_path, rebuild(h, secs), SldFormatError, "8 bytes stored uncompressed, shape needs 12")


def test_sections_may_start_at_any_offset(tmp_path):
    # Sections are unaligned: header lengths and section lengths of every residue mod 8 put each
    # section at every alignment; values still decode exactly (little-endian, unaligned loads).
    vals = np.array([1.5, -2.25, 3.0e-3, 7.0], np.float64)
    residues = set()
    for pad in range(8):
        h, secs = base()
        t, s = raw_tensor(vals, "F64")
        t["name"] = "f64"
        h["tensors"].append(t)
        secs.append(s)
        h["metadata"] = {"pad": "x" * pad}
        f = open_all(write(tmp_path, rebuild(h, secs)))
        residues.add((f.data_offset + f.tensors[1].offset) % 8)
        np.testing.assert_array_equal(f.tensor("f64"), vals)
    assert residues == set(range(8))


def test_reader_detects_section_corruption(tmp_path):
    data, _ = simple_file(compression="zstd")
    bad = bytearray(data)
    bad[-1] ^= 0x01
    f = load(write(tmp_path, bytes(bad)))  # the header is intact
    with pytest.raises(SldChecksumError, match="CRC-32 mismatch"):
        f.dequantize(f.modules[0].name)
    with pytest.raises(SldChecksumError, match="CRC-32 mismatch"):
        f.verify()


def test_crc_is_checked_before_decompressing(tmp_path):
    # A section whose bytes are both corrupt and not a valid zstd frame gets the checksum error:
    # the CRC is checked first, on the bytes as stored.
    h, secs = base()
    h["modules"][0]["A"]["compression"] = "zstd"
    secs[0] = zstd_frame([("raw", secs[0])])
    good = rebuild(h, secs)
    open_all(write(tmp_path, good))
    h = relayout(h, secs)
    for broken in (b"\0" * len(secs[0]), secs[0][:4] + b"\xff" * (len(secs[0]) - 4)):
        data = file_from_header(h, [broken] + secs[1:])
        rejects(tmp_path, data, SldChecksumError, "CRC-32 mismatch")


def _zstd_module_file(section_a: bytes) -> bytes:
    m = lora_module()
    cb = f16_codebook([0, 1, 2, 3])
    m["A"], _ = codebook_tensor((2, 5), 2, 2, [1] * 10, cb)
    m["A"]["compression"] = "zstd"
    m["B"], sb = codebook_tensor((3, 2), 2, 2, [1] * 6, cb)
    return assemble([m], [], [section_a, sb])


def test_section_decompression_is_bounded(tmp_path):
    payload = ref_pack([1] * 10, 2)  # 3 bytes
    cases = [
        # declares a content size other than P
        (zstandard.ZstdCompressor().compress(payload + b"\0" * 1000), "declares 1003 bytes"),
        (zstd_frame([("raw", payload)], content_size=2), "declares 2 bytes"),
        (zstd_frame([("raw", payload)], content_size=1 << 40), "declares 1099511627776 bytes"),
        # no declared size; the blocks say it expands to more (RLE: 10 MB in 4 bytes) or fewer
        (zstd_frame([("raw", payload), ("rle", 0, 10_000_000)], content_size=None), "expands to at least"),
        (zstd_frame([("raw", payload[:2])], content_size=None), "expands to at most 2"),
        # a compressed block that expands to more, without a declared size
        (zstandard.ZstdCompressor(write_content_size=False).compress(payload + b"\0" * 100_000), "expands to more"),
        # trailing byte after the frame; a second frame
        (zstandard.ZstdCompressor().compress(payload) + b"\0", "after the end of the zstd frame"),
        (zstandard.ZstdCompressor().compress(payload) * 2, "after the end of the zstd frame"),
        # not a frame
        (b"\x00\x01\x02\x03\x04\x05", "not a zstd frame"),
        (b"\x28\xb5", "not a zstd frame"),
    ]
    for section, msg in cases:
        rejects(tmp_path, _zstd_module_file(section), SldFormatError, msg)


ZSTD_RECIPE = [
    # (frame holding the 3-byte payload, error or None)
    (lambda p: zstd_frame([("raw", p)]), None),
    (lambda p: zstd_frame([("raw", p)], content_size=None), None),
    (lambda p: zstd_frame([("raw", p)], single_segment=True), None),
    (lambda p: zstd_frame([("raw", p[:1]), ("raw", p[1:])]), None),
    (lambda p: zstandard.ZstdCompressor(write_checksum=True).compress(p), None),
    (lambda p: zstd_frame([("raw", p)], magic=0x184D2A50), "skippable"),
    (lambda p: zstd_frame([("raw", p)], magic=0x184D2A5F), "skippable"),
    (lambda p: zstd_frame([("raw", p)], dict_id=0), "dictionary"),
    (lambda p: zstd_frame([("raw", p)], dict_id=7), "dictionary"),
    (lambda p: zstd_frame([("raw", p)], reserved_bit=True), "reserved bit"),
    (lambda p: zstd_frame([("raw", p)])[: -3 - len(p)] + ((len(p) << 3) | (3 << 1) | 1).to_bytes(3, "little") + p,
     "reserved block type"),
    (lambda p: zstandard.ZstdCompressor(write_checksum=True).compress(p)[:-1] + b"\0", "corrupt"),
    (lambda p: zstd_frame([("raw", p)], window_log=10)[:5] + bytes([0xFF]) + zstd_frame([("raw", p)])[6:], "window"),
]


@pytest.mark.parametrize("make,err", ZSTD_RECIPE, ids=[str(e) for _, e in ZSTD_RECIPE])
def test_zstd_frame_recipe(tmp_path, make, err):
    # One zstd data frame per section: raw, RLE and compressed blocks, with or without a content
    # size and a content checksum (checked when present); no dictionary, no skippable frame, no
    # reserved bit or block type, a window within the limit.
    section = make(ref_pack([1] * 10, 2))
    data = _zstd_module_file(section)
    if err is None:
        A = open_all(write(tmp_path, data)).dequantize("m")[0]
        assert (A == 1).all()
    else:
        rejects(tmp_path, data, SldLimitError if err == "window" else SldFormatError, err)


# ---------------------------------------------------------------------------------------------
# Decoding (section 5) and values that cannot be finite (section 6)


def test_codebook_dequantization_is_exact(tmp_path):
    rng = np.random.default_rng(3)
    # normal, subnormal (2^-24 .. 2^-14), ±0 and the extremes of float16
    c16 = np.concatenate([rng.normal(0, 1, 10), [2.0**-24, -(2.0**-20), 6.1e-5, 0.0, -0.0, 65504.0]]).astype("<f2")
    for scale in (float(np.float32(rng.uniform(1e-6, 10))), 1.0, 2.0**-126, 0.0, float(np.float32(3e33))):
        t, s = codebook_tensor((16,), 4, 4, list(range(16)), c16.tobytes(), scale)  # an extra tensor:
        t["name"] = "t"  # no module rule in the way of large products
        f = open_all(write(tmp_path, assemble([], [t], [s])))
        # An fp16 (11-bit significand, subnormals included: each is an exact float64) times an
        # fp32 (24-bit) is exact in float64; one rounding to float32 then equals the spec's
        # single float32 multiplication. No flush to zero: 2^-24 × 1.0 stays 2^-24.
        expect = np.array([np.float32(float(v) * scale) for v in c16], dtype=np.float32)
        assert f.tensor("t").view(np.uint32).tolist() == expect.view(np.uint32).tolist()


def test_reader_rejects_nonzero_padding(tmp_path):
    for bits, n in ((2, 10), (3, 7), (5, 9), (6, 3), (7, 1)):
        m = lora_module(rank=1, in_f=n, out_f=1)
        cb = f16_codebook(list(range(1 << bits)))
        m["A"], sa = codebook_tensor((1, n), bits, bits, [1] * n, cb)
        m["B"], sb = codebook_tensor((1, 1), bits, bits, [0], cb)
        pad = 8 - (n * bits) % 8
        for bit in range(8 - pad, 8):
            bad = sa[:-1] + bytes([sa[-1] | (1 << bit)])
            rejects(tmp_path, assemble([copy.deepcopy(m)], [], [bad, sb]), SldFormatError, "padding bits")


def test_reader_rejects_index_out_of_range(tmp_path):
    for bits, width in ((3, 4), (1, 2), (5, 8), (7, 8)):
        m = lora_module()
        cb = f16_codebook(list(range(1 << bits)))
        m["A"], sa = codebook_tensor((2, 5), bits, width, [1] * 9 + [1 << bits], cb)
        m["B"], sb = codebook_tensor((3, 2), bits, width, [1] * 6, cb)
        rejects(tmp_path, assemble([m], [], [sa, sb]), SldFormatError,
                f"index {1 << bits} at element 9 out of range for a {bits}-bit codebook")


@pytest.mark.parametrize("dtype", ["F16", "BF16", "F32", "F64"])
def test_reader_rejects_nonfinite_raw(tmp_path, dtype):
    for bad in (np.nan, np.inf, -np.inf):
        vals = np.array([1.0, 2.0, bad, 3.0], np.float64)
        t, s = raw_tensor(vals.astype(np.float32) if dtype != "F64" else vals, dtype)
        t["name"] = "x"
        rejects(tmp_path, assemble([], [t], [s]), SldFormatError, "element 2 is NaN or Inf")


def test_raw_tensors_decode_exactly_in_every_dtype(tmp_path):
    rng = np.random.default_rng(5)
    vals = rng.normal(0, 3, (4, 3)).astype(np.float32)
    vals[0, 0] = 6e-8  # float16 subnormal
    tensors, sections, expect = [], [], {}
    for dt in ("F16", "BF16", "F32", "F64"):
        t, s = raw_tensor(vals, dt)
        t["name"] = dt
        tensors.append(t)
        sections.append(s)
        if dt == "BF16":
            expect[dt] = (vals.view(np.uint32) & 0xFFFF0000).view(np.float32)
        else:
            expect[dt] = vals.astype({"F16": np.float16, "F32": np.float32, "F64": np.float64}[dt])
    f = open_all(write(tmp_path, assemble([], tensors, sections)))
    for dt in expect:
        got = f.tensor(dt)
        assert got.dtype == expect[dt].dtype and got.shape == (4, 3)
        assert got.tobytes() == expect[dt].tobytes()


def test_reader_rejects_codebook_overflow(tmp_path):
    # float16 65504 × a float32 scale: finite alone, the float32 product overflows.
    h, secs = base()
    for c16, scale in (([0, 1, 2, 65504], 2.0**113), ([0, -65504, 1, 2], 2.0**113), ([0, 1, 2, 2.0**-24], 2.0**127 * 1.5)):
        h2 = copy.deepcopy(h)
        h2["modules"][0]["A"]["codebook"] = f16_codebook(c16)
        h2["modules"][0]["A"]["codebook_scale"] = scale
        if max(map(abs, c16)) * scale < 2.0**128 - 2.0**103:
            continue
        rejects(tmp_path, rebuild(h2, secs), SldFormatError, "overflows float32")
    # Just below the threshold is fine: 65504 × 2^112 = (2 - 2^-10)·2^127 < FLT_MAX. (On a
    # codebook-coded extra tensor: in a module the module rule would refuse such a factor.)
    h2 = copy.deepcopy(h)
    t = copy.deepcopy(h2["modules"][0]["A"])
    t.update(name="big", codebook=f16_codebook([0, 1, 2, 65504]), codebook_scale=2.0**112)
    h2["tensors"].append(t)
    f = open_all(write(tmp_path, rebuild(h2, secs + [secs[0]])))
    assert float(f.tensor("big").max()) <= float(np.finfo(np.float32).max)


FINITENESS = [
    # (module overrides, factor overrides, expected message or None); A, B codebooks max 1.0, rank 2
    (dict(scale=1e39), {}, "scale 1e\\+39 is not finite in float32"),
    (dict(scale=3.4e38), {}, "cannot be guaranteed finite"),  # rank 2 × 3.4e38 > 2^127
    (dict(scale=2.0**126), {}, None),  # 2 × 2^126 = 2^127: the bound itself is allowed
    (dict(scale=2.0**127), {}, "cannot be guaranteed finite"),
    (dict(kind="sine", scale=1e300, gamma=1e-10), {}, "scale/gamma"),
    (dict(kind="sine", scale=1.0, gamma=1e-300), {}, "scale/gamma"),
    (dict(kind="sine", omega=1e39), {}, "omega 1e\\+39 is not finite"),
    (dict(kind="sine", omega=2.0**127), {}, "cannot be guaranteed finite"),
    (dict(kind="sine", scale=3e38, omega=2.0**126), {}, None),  # |ΔW| <= |scale|/γ: scale is not in the bound
    (dict(scale=2.0**64), dict(A_scale=2.0**63), "cannot be guaranteed finite"),
    (dict(scale=1.0), dict(A_scale=2.0**62, B_scale=2.0**65), "cannot be guaranteed finite"),
    (dict(scale=1.0), dict(A_scale=2.0**62, B_scale=2.0**64), None),
    (dict(scale=0.5), dict(A_scale=2.0**-100, B_scale=2.0**100), None),
]


@pytest.mark.parametrize("mod,fac,msg", FINITENESS, ids=[str(m or "ok") for _, _, m in FINITENESS])
def test_reader_rejects_modules_that_cannot_be_finite(tmp_path, mod, fac, msg):
    # Section 6.2: float32(scale) (LoRA) / float32(scale/γ) and float32(ω) (sine) finite, and
    # rank · max(1,|k|) · max(1,max|A|) · max(1,max|B|) <= 2^127, k = scale (LoRA) or ω (sine).
    # Here rank 2, codebooks {-1, -.25, .25, 1} × codebook_scale.
    h, secs = base()
    m = h["modules"][0]
    if mod.get("kind") == "sine":
        m.update(kind="sine", omega=100.0, gamma=2.0)
    m.update(mod)
    m["A"]["codebook_scale"] = fac.get("A_scale", 1.0)
    m["B"]["codebook_scale"] = fac.get("B_scale", 1.0)
    data = rebuild(h, secs)
    if msg is None:
        open_all(write(tmp_path, data))
    else:
        exc = rejects(tmp_path, data, SldFormatError, msg)
        assert "module 'm'" in str(exc)


@pytest.mark.parametrize("dtype", ["BF16", "F32", "F64"])
def test_raw_factors_are_checked_when_decoded(tmp_path, dtype):
    # A raw BF16/F32/F64 factor's largest value is known only once decoded: the module rule is
    # checked then (verify, dequantize), with the float32 values (an F64 1e300 is inf there).
    for big, ok in ((1e30, True), (3e38, False), (1e300, False)):
        if dtype != "F64" and big > 3.4e38:
            continue
        h, secs = base()
        m = h["modules"][0]
        vals = np.full((2, 5), 0.5)
        vals[1, 3] = big
        m["A"], secs[0] = raw_tensor(vals if dtype == "F64" else vals.astype(np.float32), dtype)
        p = write(tmp_path, rebuild(h, secs))
        f = load(p)  # the header alone cannot tell
        if ok:
            f.verify()
            f.dequantize("m")
            continue
        for check in (f.verify, lambda: f.dequantize("m")):
            with pytest.raises(SldFormatError, match="module 'm': .*cannot be guaranteed finite") as exc:
                check()
            assert type(exc.value) is SldFormatError


def test_verify_checks_every_section(tmp_path):
    # verify() reports a problem in any section, first one first; open alone does not see them.
    h, secs = base()
    good = rebuild(h, secs)
    open_all(write(tmp_path, good))
    n = len(good)
    lengths = [len(s) for s in secs]
    starts = [n - sum(lengths) + sum(lengths[:i]) for i in range(3)]
    for i, start in enumerate(starts):
        bad = bytearray(good)
        bad[start] ^= 0x10
        f = load(write(tmp_path, bytes(bad)))
        with pytest.raises(SldChecksumError, match=["lora_A", "lora_B", "'x'"][i]):
            f.verify()


def test_check_tensor_checks_one_section(tmp_path):
    h, secs = base()
    f = open_all(write(tmp_path, rebuild(h, secs)))
    assert f.check_tensor("x") == 3.0 and f.check_tensor(f.modules[0].A) == 0.5
    secs[2] = np.array([1, np.nan, 3], "<f4").tobytes()
    f = load(write(tmp_path, rebuild(h, secs)))
    assert f.check_tensor(f.modules[0].B) == 0.125
    with pytest.raises(SldFormatError, match="'x'.*element 1 is NaN"):
        f.check_tensor("x")


# ---------------------------------------------------------------------------------------------
# Decoding in pieces


@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(1, 8),
    extra_width=st.integers(0, 7),
    n=st.integers(1, 300),
    max_elements=st.integers(1, 70),
    zstd=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_iter_chunks_concatenate_to_the_tensor(tmp_path_factory, bits, extra_width, n, max_elements, zstd, seed):
    width = min(8, bits + extra_width)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, 1 << bits, n).tolist()
    cb = rng.normal(0, 1, 1 << bits).astype("<f2")
    t, s = codebook_tensor((n,), bits, width, idx, cb.tobytes(), 0.5, "zstd" if zstd else "none")
    t["name"] = "t"
    r, rs = raw_tensor(rng.normal(0, 1, n).astype(np.float32), "BF16")
    r["name"] = "r"
    p = tmp_path_factory.mktemp("ch") / "f.sld"
    p.write_bytes(assemble([], [t, r], [s, rs]))
    f = SldFile(str(p))
    for e in f.entries():
        pieces = list(f.iter_chunks(e, max_elements))
        assert all(q.size == max_elements for q in pieces[:-1]) and 1 <= pieces[-1].size <= max_elements
        assert all(q.dtype == e.decoded_dtype for q in pieces)
        whole = np.concatenate(pieces)
        assert whole.tobytes() == f.tensor(e).reshape(-1).tobytes()
    expect = (cb.astype(np.float32) * np.float32(0.5))[np.array(idx)]
    assert f.tensor("t").tobytes() == expect.tobytes()


def test_iter_chunks_rejects_a_bad_piece_size(tmp_path):
    from deltacodec import DecodeError

    data, _ = simple_file()
    f = load(write(tmp_path, data))
    for bad in (0, -1, 2.5, None):
        with pytest.raises(DecodeError):
            next(f.iter_chunks(f.modules[0].A, bad))


# ---------------------------------------------------------------------------------------------
# The writer (section 8)


def _writer_inputs():
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 4, 10).astype(np.uint8)
    from deltacodec.pack import pack_indices

    t = {"shape": (2, 5), "encoding": "codebook", "bits": 2, "width": 2, "quantizer": "kmeans",
         "codebook_f16": f16_codebook([-1, -0.5, 0.5, 1]), "codebook_scale": 0.5, "compression": "none",
         "section": pack_indices(idx, 2).tobytes()}
    tb = dict(t, shape=(3, 2), section=pack_indices(idx[:6], 2).tobytes())
    mod = {"name": "layer.q", "sine": False, "out_features": 3, "in_features": 5, "rank": 2, "scale": 2.0,
           "omega": None, "gamma": None, "fan_in_fan_out": False, "A": t, "B": tb}
    extra = {"name": "lm_head.bias", "shape": (3,), "encoding": "raw", "dtype": "F32", "compression": "none",
             "section": np.ones(3, "<f4").tobytes()}
    return {"method": "lora"}, [mod], [extra]


WRITER_REFUSALS = [
    ("name", lambda mods, ex: mods[0].update(name="a\nb"), "U\\+000A"),
    ("long name", lambda mods, ex: ex[0].update(name="x" * 1025), "1025 bytes"),
    ("empty name", lambda mods, ex: ex[0].update(name=""), "0 bytes"),
    ("collision", lambda mods, ex: ex[0].update(name="layer.q.weight"), "same model tensor"),
    ("factor name", lambda mods, ex: ex[0].update(name="base_model.model.layer.q.lora_A.weight"), "same model tensor"),
    ("nan scale", lambda mods, ex: mods[0].update(scale=float("nan")), "not finite"),
    ("inf scale", lambda mods, ex: mods[0].update(scale=1e39), "not finite in float32"),
    ("0-d extra", lambda mods, ex: ex[0].update(shape=()), "0 dimensions"),
    ("9-d extra", lambda mods, ex: ex[0].update(shape=(1,) * 8 + (3,)), "9 dimensions"),
    ("nan extra", lambda mods, ex: ex[0].update(section=np.array([1, np.nan, 2], "<f4").tobytes()), "NaN or Inf"),
    ("bad padding", lambda mods, ex: mods[0]["A"].update(section=b"\xff\xff\xff"), "padding"),
    ("codebook overflow", lambda mods, ex: mods[0]["A"].update(codebook_f16=f16_codebook([0, 1, 2, 65504]),
                                                               codebook_scale=2.0**115), "overflows float32"),
    ("metadata", lambda mods, ex: None, "metadata"),
]


@pytest.mark.parametrize("what,change,msg", WRITER_REFUSALS, ids=[w for w, _, _ in WRITER_REFUSALS])
def test_writer_refuses_what_the_reader_rejects(what, change, msg):
    meta, mods, extras = _writer_inputs()
    build_container(meta, copy.deepcopy(mods), copy.deepcopy(extras), name="out.sld")  # the valid one
    change(mods, extras)
    if what == "metadata":
        deep: list = [1]
        for _ in range(33):
            deep = [deep]
        meta = {"deep": deep}
        msg = "nest deeper"
    with pytest.raises(EncodeError, match=msg) as exc:
        build_container(meta, mods, extras, name="out.sld")
    assert "out.sld" in str(exc.value) and "refusing to write" in str(exc.value)


def test_errors_name_the_file(tmp_path):
    data, _ = simple_file()
    p = write(tmp_path, data[:10], "named-file.sld")
    with pytest.raises(SldError, match="named-file.sld"):
        load(p)


def test_missing_file_is_a_format_error(tmp_path):
    with pytest.raises(SldFormatError, match="cannot read"):
        load(str(tmp_path / "nope.sld"))
    with pytest.raises(SldFormatError, match="not a regular file"):
        load(str(tmp_path))
