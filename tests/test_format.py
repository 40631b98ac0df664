"""The container reader against spec/sld-format.md: one test per MUST, named in the spec."""

from __future__ import annotations

import struct
import zlib

import msgpack
import numpy as np
import pytest
import zstandard

from deltacodec import SldChecksumError, SldError, SldFormatError, SldVersionError, load
from deltacodec.format import MAX_HEADER_DECODED, SldFile

from sldtools import (
    MAGIC,
    assemble,
    codebook_tensor,
    f16_codebook,
    header_bytes_file,
    lora_module,
    raw_tensor,
    ref_pack,
    simple_file,
)


def write(tmp_path, data: bytes, name: str = "f.sld"):
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


def rebuild_with_metadata(data: bytes, metadata: dict) -> bytes:
    """The same file with its header's metadata replaced (sections untouched)."""
    (hlen,) = struct.unpack_from("<I", data, 12)
    header = msgpack.unpackb(zstandard.ZstdDecompressor().decompress(data[20:20 + hlen]), raw=False)
    header["metadata"] = metadata
    raw = zstandard.ZstdCompressor().compress(msgpack.packb(header, use_bin_type=True))
    return header_bytes_file(raw, data[20 + hlen:])


def open_all(path: str) -> None:
    """Open and decode every tensor (what a full decode does)."""
    f = SldFile(path)
    for e in f.entries():
        f.tensor(e)


def test_valid_simple_file_decodes_to_codebook_at_indices(tmp_path):
    data, info = simple_file()
    f = load(write(tmp_path, data))
    (m,) = f.modules
    A, B = f.dequantize(m.name)
    cb = np.array([-1.0, -0.25, 0.25, 1.0], dtype=np.float32)
    np.testing.assert_array_equal(A, (cb * np.float32(0.5))[info["a_idx"]].reshape(2, 5))
    np.testing.assert_array_equal(B, (cb * np.float32(0.125))[info["b_idx"]].reshape(3, 2))



def test_metadata_is_not_needed_to_decode(tmp_path):
    # metadata is informational: any content, or none, decodes to the same tensors.
    data, info = simple_file()
    base = load(write(tmp_path, data))
    m = lora_module()
    odd = {"encoder": 7, "method": None, "adapter_config": {"nested": [1, 2.5, b"x"]}, "x": {}}
    for metadata in ({}, odd):
        f = SldFile(write(tmp_path, rebuild_with_metadata(data, metadata), "meta.sld"))
        for got, want in zip(f.dequantize(m["name"]), base.dequantize(m["name"])):
            np.testing.assert_array_equal(got, want)


def test_reader_rejects_bad_magic(tmp_path):
    data, _ = simple_file()
    bad = b"\x89SLX" + data[4:]
    with pytest.raises(SldFormatError, match="not an .sld file"):
        load(write(tmp_path, bad))
    with pytest.raises(SldFormatError, match="not an .sld file"):
        load(write(tmp_path, b"PK\x03\x04" + b"\0" * 40))


def test_reader_rejects_truncated_preamble(tmp_path):
    data, _ = simple_file()
    for n in (0, 1, 8, 19):
        with pytest.raises(SldFormatError, match="truncated"):
            load(write(tmp_path, data[:n]))


def test_reader_rejects_future_version(tmp_path):
    data, _ = simple_file()
    bad = data[:8] + struct.pack("<I", 2) + data[12:]
    with pytest.raises(SldVersionError) as exc:
        load(write(tmp_path, bad))
    assert exc.value.found == 2 and exc.value.supported == (1,)
    assert "version 2" in str(exc.value) and "supports 1" in str(exc.value) and "newer" in str(exc.value)
    bad0 = data[:8] + struct.pack("<I", 0) + data[12:]
    with pytest.raises(SldVersionError):
        load(write(tmp_path, bad0))


def test_reader_rejects_bad_header_length(tmp_path):
    data, _ = simple_file()
    rest = len(data) - 20
    for hlen in (0, rest + 1, (16 << 20) + 1, 0xFFFFFFFF):
        bad = data[:12] + struct.pack("<I", hlen) + data[16:]
        with pytest.raises(SldFormatError, match="header length"):
            load(write(tmp_path, bad))


def test_reader_detects_header_corruption(tmp_path):
    data, _ = simple_file()
    bad = bytearray(data)
    bad[25] ^= 0x40
    with pytest.raises(SldChecksumError, match="header CRC-32"):
        load(write(tmp_path, bytes(bad)))


def test_header_decompression_is_bounded(tmp_path):
    # A frame that declares more than the cap.
    big = zstandard.ZstdCompressor(level=1).compress(b"\x80" + b"\0" * MAX_HEADER_DECODED)
    with pytest.raises(SldFormatError, match="cap"):
        load(write(tmp_path, header_bytes_file(big, b"")))
    # The same without a declared size: decompression stops at the cap.
    big2 = zstandard.ZstdCompressor(level=1, write_content_size=False).compress(b"\0" * (MAX_HEADER_DECODED + 10))
    with pytest.raises(SldFormatError, match="zstd"):
        load(write(tmp_path, header_bytes_file(big2, b"")))
    # Trailing bytes after the frame, inside the header.
    ok = zstandard.ZstdCompressor().compress(msgpack.packb({"metadata": {}, "modules": [], "tensors": []}))
    with pytest.raises(SldFormatError, match="zstd"):
        load(write(tmp_path, header_bytes_file(ok + b"\0", b"")))
    # Not a zstd frame at all.
    with pytest.raises(SldFormatError, match="zstd"):
        load(write(tmp_path, header_bytes_file(b"hello world", b"")))


def _header_file(obj) -> bytes:
    raw = msgpack.packb(obj, use_bin_type=True) if not isinstance(obj, bytes) else obj
    return header_bytes_file(zstandard.ZstdCompressor().compress(raw), b"")


def test_reader_rejects_wrong_header_types(tmp_path):
    cases = [
        (b"\xc1garbage", "not valid msgpack"),
        ([1, 2, 3], "must be a msgpack map"),
        ({"metadata": {}, "modules": {}, "tensors": []}, "expected list"),
        ({"metadata": [], "modules": [], "tensors": []}, "expected dict"),
        ({"metadata": {}, "modules": [5], "tensors": []}, "expected a map"),
        ({1: 2}, "not valid msgpack"),  # non-string map key
    ]
    for obj, msg in cases:
        with pytest.raises(SldFormatError, match=msg):
            load(write(tmp_path, _header_file(obj)))
    ext = msgpack.packb({"metadata": {"x": msgpack.ExtType(5, b"abc")}, "modules": [], "tensors": []})
    with pytest.raises(SldFormatError, match="extension"):
        load(write(tmp_path, _header_file(ext)))


def test_reader_rejects_unknown_keys(tmp_path):
    with pytest.raises(SldFormatError, match="unknown keys"):
        load(write(tmp_path, _header_file({"metadata": {}, "modules": [], "tensors": [], "x": 1})))
    m = lora_module()
    m["A"], sa = codebook_tensor((2, 5), 2, 2, [0] * 10, f16_codebook([0, 1, 2, 3]))
    m["B"], sb = codebook_tensor((3, 2), 2, 2, [0] * 6, f16_codebook([0, 1, 2, 3]))
    m["A"]["surprise"] = True
    with pytest.raises(SldFormatError, match="unknown keys"):
        load(write(tmp_path, assemble([m], [], [sa, sb])))


def test_reader_rejects_empty_file(tmp_path):
    with pytest.raises(SldFormatError, match="empty adapter"):
        load(write(tmp_path, _header_file({"metadata": {}, "modules": [], "tensors": []})))


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
        (dict(kind="sine", omega=0.0), "non-zero omega"),
        (dict(kind="sine", gamma=0.0), "must be > 0"),
        (dict(kind="sine", gamma=-2.0), "must be > 0"),
        (dict(kind="sine", drop=("omega",)), "missing key 'omega'"),
        (dict(kind="lora", omega=3.0), "no omega or gamma"),
        (dict(kind="dora"), "not one of lora, sine"),
        (dict(a_shape=(3, 5)), r"A.shape.*expected \[rank, in_features\]"),
        (dict(rank=0), r"outside \[1,"),
        (dict(scale=float("nan")), "not finite"),
        (dict(fan_in_fan_out=1), "expected bool"),
        (dict(rank=True), "got bool"),
    ]
    for over, msg in cases:
        with pytest.raises(SldFormatError, match=msg):
            load(write(tmp_path, _module_file(**over)))


def test_reader_rejects_duplicate_names(tmp_path):
    t1, s1 = raw_tensor(np.ones(3, np.float32))
    t2, s2 = raw_tensor(np.ones(3, np.float32))
    t1["name"] = t2["name"] = "same"
    with pytest.raises(SldFormatError, match="duplicate name 'same'"):
        load(write(tmp_path, assemble([], [t1, t2], [s1, s2])))


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
        (dict(cb=f16_codebook([0, 1, float("nan"), 3])), "NaN or Inf"),
        (dict(cb=f16_codebook([0, 1, float("inf"), 3])), "NaN or Inf"),
        (dict(codebook_scale=-1.0), "non-negative float32"),
        (dict(codebook_scale=0.1), "non-negative float32"),  # 0.1 is not a float32 value
        (dict(codebook_scale=float("inf")), "not finite"),
        (dict(bits=9), r"outside \[1, 8\]"),
        (dict(width=1), r"outside \[2, 8\]"),
        (dict(quantizer="magic"), "not one of kmeans, uniform"),
        (dict(compression="lz4"), "not one of zstd, none"),
        (dict(shape=[2, 0]), "dimension 0"),
        (dict(shape=[]), "1..8 dimensions"),
    ]
    for over, msg in cases:
        with pytest.raises(SldFormatError, match=msg):
            load(write(tmp_path, file_with(**over)))


def test_reader_checks_offset_invariant(tmp_path):
    m = lora_module()
    cb = f16_codebook([0, 1, 2, 3])
    m["A"], sa = codebook_tensor((2, 5), 2, 2, [1] * 10, cb)
    m["B"], sb = codebook_tensor((3, 2), 2, 2, [1] * 6, cb)
    m["B"]["offset"] = 0  # overlaps A
    with pytest.raises(SldFormatError, match="sections are contiguous"):
        load(write(tmp_path, assemble([m], [], [sa, sb])))


def test_reader_rejects_truncated_file(tmp_path):
    data, _ = simple_file()
    with pytest.raises(SldFormatError, match="runs past the end|header length|truncated"):
        load(write(tmp_path, data[:-1]))


def test_reader_rejects_trailing_bytes(tmp_path):
    data, _ = simple_file()
    with pytest.raises(SldFormatError, match="trailing bytes"):
        load(write(tmp_path, data + b"\0"))


def test_reader_rejects_wrong_uncompressed_length(tmp_path):
    m = lora_module()
    cb = f16_codebook([0, 1, 2, 3])
    m["A"], sa = codebook_tensor((2, 5), 2, 2, [1] * 10, cb)
    m["B"], sb = codebook_tensor((3, 2), 2, 2, [1] * 6, cb)
    sa = sa + b"\0"  # 4 bytes needed for 10 2-bit fields: store 5
    with pytest.raises(SldFormatError, match="stored uncompressed, shape needs 3"):
        load(write(tmp_path, assemble([m], [], [sa, sb])))


def test_reader_detects_section_corruption(tmp_path):
    data, _ = simple_file(compression="zstd")
    bad = bytearray(data)
    bad[-1] ^= 0x01
    f = load(write(tmp_path, bytes(bad)))  # the header is intact
    with pytest.raises(SldChecksumError, match="CRC-32 mismatch"):
        f.dequantize(f.modules[0].name)


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
        # declares a bigger content size than the header allows
        (zstandard.ZstdCompressor().compress(payload + b"\0" * 1000), "declares 1003 bytes"),
        # no declared size, expands to more
        (zstandard.ZstdCompressor(write_content_size=False).compress(payload + b"\0" * 10_000_000), "corrupt|expands"),
        # expands to fewer
        (zstandard.ZstdCompressor(write_content_size=False).compress(payload[:2]), "expands to 2"),
        # trailing byte after the frame
        (zstandard.ZstdCompressor().compress(payload) + b"\0", "trailing"),
        # a second frame
        (zstandard.ZstdCompressor().compress(payload) * 2, "trailing"),
        # not a frame
        (b"\x00\x01\x02\x03\x04\x05", "not a zstd frame"),
    ]
    for section, msg in cases:
        f = load(write(tmp_path, _zstd_module_file(section)))
        with pytest.raises(SldFormatError, match=msg):
            f.tensor(f.modules[0].A)


def test_codebook_dequantization_is_exact(tmp_path):
    rng = np.random.default_rng(3)
    c16 = rng.normal(0, 1, 16).astype("<f2")
    scale = float(np.float32(rng.uniform(1e-6, 10)))
    m = lora_module(rank=2, in_f=8, out_f=8)
    m["A"], sa = codebook_tensor((2, 8), 4, 4, list(range(16)), c16.tobytes(), scale)
    m["B"], sb = codebook_tensor((8, 2), 4, 4, list(range(16)), c16.tobytes(), scale)
    f = load(write(tmp_path, assemble([m], [], [sa, sb])))
    A, _ = f.dequantize("m")
    # An fp16 (11-bit significand) times an fp32 (24-bit) is exact in float64; one rounding to
    # float32 then equals the spec's single float32 multiplication.
    expect = np.array([np.float32(float(v) * scale) for v in c16], dtype=np.float32)
    assert A.reshape(-1).view(np.uint32).tolist() == expect.view(np.uint32).tolist()


def test_reader_rejects_nonzero_padding(tmp_path):
    m = lora_module()
    cb = f16_codebook([0, 1, 2, 3])
    m["A"], sa = codebook_tensor((2, 5), 2, 2, [1] * 10, cb)  # 20 bits: 4 padding bits
    m["B"], sb = codebook_tensor((3, 2), 2, 2, [1] * 6, cb)
    sa = sa[:-1] + bytes([sa[-1] | 0x80])
    f = load(write(tmp_path, assemble([m], [], [sa, sb])))
    with pytest.raises(SldFormatError, match="padding bits"):
        f.tensor(f.modules[0].A)


def test_reader_rejects_index_out_of_range(tmp_path):
    m = lora_module()
    cb = f16_codebook([0, 1, 2, 3, 4, 5, 6, 7])
    m["A"], sa = codebook_tensor((2, 5), 3, 4, [1] * 9 + [9], cb)  # 3-bit codebook, 4-bit fields
    m["B"], sb = codebook_tensor((3, 2), 3, 4, [1] * 6, cb)
    f = load(write(tmp_path, assemble([m], [], [sa, sb])))
    with pytest.raises(SldFormatError, match="index 9 out of range for a 3-bit codebook"):
        f.tensor(f.modules[0].A)


def test_reader_rejects_nonfinite_raw(tmp_path):
    t, s = raw_tensor(np.array([1.0, np.nan], np.float32))
    t["name"] = "x"
    f = load(write(tmp_path, assemble([], [t], [s])))
    with pytest.raises(SldFormatError, match="NaN or Inf"):
        f.tensor("x")


def test_raw_tensors_decode_exactly_in_every_dtype(tmp_path):
    rng = np.random.default_rng(5)
    vals = rng.normal(0, 3, (4, 3)).astype(np.float32)
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
    f = load(write(tmp_path, assemble([], tensors, sections)))
    for dt in expect:
        got = f.tensor(dt)
        np.testing.assert_array_equal(got, expect[dt])


def test_errors_name_the_file(tmp_path):
    data, _ = simple_file()
    p = write(tmp_path, data[:10], "named-file.sld")
    with pytest.raises(SldError, match="named-file.sld"):
        load(p)


def test_missing_file_is_a_format_error(tmp_path):
    with pytest.raises(SldFormatError, match="cannot read"):
        load(str(tmp_path / "nope.sld"))
