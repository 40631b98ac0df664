"""Container version 2 (spec part 2): what the writer makes decodes, under deltacodec's reader
and under a plain reference decoder written from the spec (tests/v2ref.py), to the values the
encoder chose; rate targets land where asked; lossless 16-bit is bit-exact; the reader rejects
what the spec says it must."""

from __future__ import annotations

import copy
import os
import struct
import zlib

import numpy as np
import pytest

import deltacodec
from deltacodec import format as fmt
from deltacodec.adapter import Adapter, AdapterModule
from deltacodec.errors import EncodeError, SldError, SldFormatError, SldVersionError
from deltacodec.quantize import quantize

import v2ref

SHAPES = [("base_model.model.model.layers.0.self_attn.q_proj", 48, 64, 4),
          ("base_model.model.model.layers.0.self_attn.v_proj", 16, 64, 4),
          ("base_model.model.model.layers.1.mlp.down_proj", 64, 96, 4)]


def adapter(sine: bool = True, seed: int = 0, k: int = 1) -> Adapter:
    """Three modules; ``k`` scales their sizes (k = 4: 22,528 parameters)."""
    rng = np.random.default_rng(seed)
    mods = []
    for name, o, i, r in SHAPES:
        o, i = o * k, i * k
        A = (rng.uniform(-1, 1, (r, i)) / np.sqrt(i)).astype(np.float32)
        B = (rng.standard_t(4, (o, r)) * 1e-2).astype(np.float32)
        mods.append(AdapterModule(name=name, A=A, B=B, scale=2.0, sine=sine,
                                  omega=100.0 if sine else None, gamma=float(np.sqrt(i)) if sine else None))
    return Adapter(modules=mods, config={"peft_type": "SINLORA" if sine else "LORA", "r": 4, "lora_alpha": 8})


def params(ad: Adapter) -> int:
    return sum(m.A.size + m.B.size for m in ad.modules)


def rel_errors(ad: Adapter, f) -> list[float]:
    """‖ΔŴ−ΔW‖/‖ΔW‖ per module, plainly in float64."""
    out = []
    for m in ad.modules:
        A, B = f.dequantize(m.name)
        q = AdapterModule(name=m.name, A=A, B=B, scale=m.scale, sine=m.sine, omega=m.omega, gamma=m.gamma)
        d = m.delta()
        out.append(float(np.linalg.norm(q.delta() - d) / np.linalg.norm(d)))
    return out


def reference_matches(path: str) -> None:
    """deltacodec's reader and the plain reference decoder agree bit for bit on every tensor."""
    ref = v2ref.decode(open(path, "rb").read())
    f = deltacodec.load(path)
    names = [e.name for e in f.entries()]
    assert sorted(names) == sorted(ref)
    for e in f.entries():
        got = np.asarray(f.tensor(e)).reshape(-1)
        want = ref[e.name]
        assert got.dtype.itemsize <= want.dtype.itemsize or e.dtype == "F16"
        np.testing.assert_array_equal(got.astype(want.dtype).view(np.uint8), want.view(np.uint8), err_msg=e.name)
        np.testing.assert_array_equal(np.concatenate(list(f.iter_chunks(e, 37))).astype(want.dtype), want)
    f.verify()


@pytest.mark.parametrize("opts", [dict(bits=3, quantizer="ecsq"), dict(bits=2, quantizer="auto"),
                                  dict(bits=3, quantizer="kmeans", container=2), dict(bits_per_param=5.0),
                                  dict(bits=1, quantizer="ecsq", refit=False), dict(bits=8, quantizer="ecsq")])
@pytest.mark.parametrize("sine", [True, False])
def test_v2_file_decodes_as_the_reference_decoder_says(tmp_path, opts, sine):
    ad = adapter(sine)
    p = deltacodec.encode(ad, out=str(tmp_path / "a.sld"), **opts)
    assert deltacodec.load(p).version == 2
    reference_matches(p)


def test_v2_kmeans_is_exactly_the_v1_quantization(tmp_path):
    """k-means in version 2 quantizes each factor as quantize.quantize does (what version 1 and
    QAT export rely on): the same values, only coded differently."""
    ad = adapter(False)
    for bits in (1, 3, 5):
        p1 = deltacodec.encode(ad, bits=bits, out=str(tmp_path / f"v1_{bits}.sld"), container=1)
        p2 = deltacodec.encode(ad, bits=bits, out=str(tmp_path / f"v2_{bits}.sld"), container=2)
        f1, f2 = deltacodec.load(p1), deltacodec.load(p2)
        assert (f1.version, f2.version) == (1, 2)
        for m in ad.modules:
            for key, x in ((m.name + ".lora_A.weight", m.A), (m.name + ".lora_B.weight", m.B)):
                np.testing.assert_array_equal(f1.tensor(key), f2.tensor(key))
                if f2._lookup(key).encoding == "codebook":
                    q = quantize(x, bits, "kmeans")
                    np.testing.assert_array_equal(f2.tensor(key).reshape(-1), q.codebook[q.indices].reshape(-1))


def test_v2_is_deterministic(tmp_path):
    ad = adapter()
    for opts in (dict(bits=3, quantizer="ecsq"), dict(size=3000), dict(bits=16, container=2)):
        a = open(deltacodec.encode(ad, out=str(tmp_path / "a.sld"), force=True, **opts), "rb").read()
        b = open(deltacodec.encode(adapter(), out=str(tmp_path / "b.sld"), force=True, **opts), "rb").read()
        assert a == b, opts


def test_a_version_1_reader_refuses_version_2_as_a_future_version(tmp_path, monkeypatch):
    p = deltacodec.encode(adapter(), bits=2, quantizer="ecsq", out=str(tmp_path / "a.sld"))
    monkeypatch.setattr(fmt, "SUPPORTED_VERSIONS", (1,))
    with pytest.raises(SldVersionError) as exc:
        deltacodec.load(p)
    assert exc.value.found == 2 and "version 2" in str(exc.value) and "newer" in str(exc.value)


# ------------------------------------------------------------------------------------------------
# rate targets


@pytest.mark.parametrize("frac", [0.35, 0.6])
def test_size_target_lands_at_or_under_within_5_percent(tmp_path, frac):
    ad = adapter(k=4)
    big = deltacodec.encode(ad, bits=8, quantizer="ecsq", out=str(tmp_path / "big.sld"))
    target = int(frac * deltacodec.load(big).file_size)
    p = deltacodec.encode(ad, size=target, out=str(tmp_path / "s.sld"))
    got = deltacodec.load(p).file_size
    assert 0.95 * target <= got <= target, (got, target)


def test_bits_per_param_target(tmp_path):
    ad = adapter()
    p = deltacodec.encode(ad, bits_per_param=4.0, out=str(tmp_path / "s.sld"))
    got = 8.0 * deltacodec.load(p).file_size / params(ad)
    assert 0.95 * 4.0 <= got <= 4.0, got
    with pytest.raises(EncodeError, match="unreachable"):
        deltacodec.encode(ad, bits_per_param=1.0, out=str(tmp_path / "t.sld"))


def test_max_error_target_bounds_every_module(tmp_path):
    ad = adapter(False)
    for goal in (0.2, 0.05):
        p = deltacodec.encode(ad, max_error=goal, out=str(tmp_path / f"e{goal}.sld"))
        errs = rel_errors(ad, deltacodec.load(p))
        assert max(errs) <= goal, errs


def test_unreachable_max_error_says_why(tmp_path):
    rng = np.random.default_rng(3)
    ad = Adapter(modules=[AdapterModule(name="m", A=rng.standard_t(1.5, (4, 2048)).astype(np.float32),
                                        B=rng.standard_t(1.5, (256, 4)).astype(np.float32), scale=1.0)], config={})
    with pytest.raises(EncodeError, match="unreachable with at most 256 quantizer levels"):
        deltacodec.encode(ad, max_error=1e-4, out=str(tmp_path / "x.sld"))


def test_more_bits_means_less_error_and_refit_is_on_by_default(tmp_path):
    ad = adapter(False)
    errs = []
    for b in (1, 2, 4):
        p = deltacodec.encode(ad, bits=b, quantizer="ecsq", out=str(tmp_path / f"b{b}.sld"))
        errs.append(np.mean(rel_errors(ad, deltacodec.load(p))))
    assert errs[0] > errs[1] > errs[2]
    on = open(deltacodec.encode(ad, bits=2, quantizer="ecsq", out=str(tmp_path / "on.sld")), "rb").read()
    off = open(deltacodec.encode(ad, bits=2, quantizer="ecsq", refit=False, out=str(tmp_path / "off.sld")), "rb").read()
    assert on != off


def test_unreachable_size_names_the_minimum(tmp_path):
    with pytest.raises(EncodeError, match=r"unreachable: the smallest this adapter encodes to is [0-9,]+ bytes"):
        deltacodec.encode(adapter(), size=100, out=str(tmp_path / "s.sld"))
    assert not (tmp_path / "s.sld").exists()


@pytest.mark.parametrize("kw,match", [
    (dict(bits=3, size=1000), "exactly one target"),
    (dict(size=1000, max_error=0.1), "exactly one target"),
    (dict(bits=3, quantizer="ecsq", container=1), "needs container version 2"),
    (dict(size=10000, quantizer="kmeans"), "needs rate control"),
    (dict(bits=3, refit=True), "refit applies to the ecsq/auto"),
    (dict(bits=9), "bits must be"),
    (dict(max_error=-1.0), "positive finite"),
    (dict(bits=3, container=3), "container must be 1 or 2"),
])
def test_bad_encode_options_are_refused(tmp_path, kw, match):
    with pytest.raises(EncodeError, match=match):
        deltacodec.encode(adapter(), out=str(tmp_path / "x.sld"), **kw)


# ------------------------------------------------------------------------------------------------
# lossless 16-bit


def special_values(dtype: str, n: int, rng) -> np.ndarray:
    """float32 values that are exactly ``dtype``: normals, subnormals, ±0, the extremes."""
    if dtype == "F16":
        x = (rng.standard_normal(n) * 0.05).astype(np.float16)
        x[:8] = np.array([0.0, -0.0, 6e-8, -6e-8, 6.1e-5, 65504, -65504, 1e-6], dtype=np.float16)
        return x.astype(np.float32)
    x = (rng.laplace(0, 0.01, n).astype(np.float32).view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)
    special = np.array([0x0000, 0x8000, 0x0001, 0x8001, 0x007F, 0x0080, 0x4B7F, 0xCB7F], dtype=np.uint32) << 16
    x[:8] = special.view(np.float32)
    return x


@pytest.mark.parametrize("dtype", ["F16", "BF16"])
def test_bits_16_is_bit_exact_for_fp16_and_bf16(tmp_path, dtype):
    rng = np.random.default_rng(5)
    mods = [AdapterModule(name=f"base_model.model.l{i}.q", A=special_values(dtype, 4 * 300, rng).reshape(4, 300),
                          B=special_values(dtype, 200 * 4, rng).reshape(200, 4), scale=1e-30) for i in range(2)]
    ad = Adapter(modules=mods, config={"peft_type": "LORA"})
    p = deltacodec.encode(ad, bits=16, container=2, out=str(tmp_path / "x.sld"))
    f = deltacodec.load(p)
    for m in mods:
        for e, x in ((f.module(m.name).A, m.A), (f.module(m.name).B, m.B)):
            assert (e.encoding, e.dtype, e.compression) == ("raw", dtype, "fields")
            got = f.tensor(e)
            assert got.dtype == (np.float16 if dtype == "F16" else np.float32)
            np.testing.assert_array_equal(got.astype(np.float32).view(np.uint32), x.view(np.uint32))
    reference_matches(p)
    # decoded back to its own dtype (decode's rounding step), the bits are the source's
    from deltacodec.codec import _to_dtype

    for m in mods:
        got = _to_dtype(f.tensor(f.module(m.name).A), dtype, "x")
        want = m.A.astype(np.float16).view(np.uint16) if dtype == "F16" else (m.A.view(np.uint32) >> 16).astype(np.uint16)
        np.testing.assert_array_equal(np.asarray(got).view(np.uint16), want)


def test_bits_16_of_an_fp32_factor_stores_it_as_fp16(tmp_path):
    """fp32 values that are neither exactly bf16 nor fp16 are rounded to float16 (as version 1)."""
    ad = adapter(False)
    p = deltacodec.encode(ad, bits=16, container=2, out=str(tmp_path / "x.sld"))
    f = deltacodec.load(p)
    m = ad.modules[0]
    np.testing.assert_array_equal(f.tensor(f.module(m.name).A), m.A.astype(np.float16))


def test_bits_16_is_smaller_than_raw(tmp_path):
    ad = adapter(False)
    for m in ad.modules:
        m.A, m.B = (x.astype(np.float16).astype(np.float32) for x in (m.A, m.B))
    p = deltacodec.encode(ad, bits=16, container=2, out=str(tmp_path / "x.sld"))
    f = deltacodec.load(p)
    assert sum(e.length for e in f.entries()) < 2 * params(ad)


def test_non_finite_source_is_refused_naming_the_input(tmp_path):
    ad = adapter(False)
    ad.modules[1].B[3, 1] = np.nan
    ad.source = "my-adapter"
    with pytest.raises(EncodeError, match="my-adapter.*v_proj.lora_B.weight.*NaN"):
        deltacodec.encode(ad, bits=16, container=2, out=str(tmp_path / "x.sld"))


def test_a_refused_value_names_the_input_adapter(tmp_path):
    """What build_container refuses (here a module whose ΔW cannot be guaranteed finite) is
    reported naming the input adapter as well as the output."""
    ad = adapter(False)
    ad.modules[0].scale = 2.6e33
    ad.source = "the-input-adapter"
    for container in (1, 2):
        with pytest.raises(EncodeError, match="the-input-adapter") as exc:
            deltacodec.encode(ad, bits=16, container=container, out=str(tmp_path / "x.sld"))
        assert "x.sld" in str(exc.value)


# ------------------------------------------------------------------------------------------------
# apply's view


def test_kernel_factor_gives_8_bit_indices_into_float32_values(tmp_path):
    ad = adapter()
    for opts in (dict(bits=8, quantizer="ecsq"), dict(bits=3, quantizer="auto"), dict(bits=4, container=1)):
        p = deltacodec.encode(ad, out=str(tmp_path / "k.sld"), force=True, **opts)
        f = deltacodec.load(p)
        for e in f.entries():
            if e.encoding != "codebook":
                continue
            idx, values = f.kernel_factor(e)
            assert idx.dtype == np.uint8 and idx.size == e.numel
            assert values.dtype == np.float32 and values.size == 1 << e.bits and e.bits <= 8
            np.testing.assert_array_equal(values[idx].reshape(e.shape), f.tensor(e))


def test_ecsq_alphabet_is_capped_at_256_levels(tmp_path):
    rng = np.random.default_rng(3)
    A = rng.standard_t(2, (4, 4096)).astype(np.float32)  # heavy tails: many levels at 8 bits
    B = rng.standard_t(2, (512, 4)).astype(np.float32)
    ad = Adapter(modules=[AdapterModule(name="m", A=A, B=B, scale=1.0)], config={})
    p = deltacodec.encode(ad, bits=8, quantizer="ecsq", out=str(tmp_path / "x.sld"))
    f = deltacodec.load(p)
    for e in f.entries():
        assert e.coder[1].table.size <= 256


# ------------------------------------------------------------------------------------------------
# the reader's rules


def v2_file(tmp_path) -> bytes:
    p = deltacodec.encode(adapter(), bits=3, quantizer="ecsq", out=str(tmp_path / "good.sld"), force=True)
    return open(p, "rb").read()


def rejects(tmp_path, data: bytes, cls=SldFormatError, match: str | None = None, stage: str = "open"):
    p = tmp_path / "bad.sld"
    p.write_bytes(data)
    with pytest.raises(SldError) as exc:
        f = deltacodec.load(str(p))
        assert stage == "verify", "opened"
        f.verify()
    assert type(exc.value) is cls, f"{type(exc.value).__name__}: {exc.value}"
    assert "bad.sld" in str(exc.value)
    if match:
        assert match in str(exc.value), str(exc.value)
    return exc.value


def test_reader_rejects_corrupt_streams(tmp_path):
    h, secs = v2ref.parse(v2_file(tmp_path))
    # a flipped byte in a stream (CRC recomputed): the final-state check or the word count
    bad = [bytearray(s) for s in secs]
    bad[1][len(bad[1]) // 2] ^= 0x5A
    rejects(tmp_path, v2ref.build(copy.deepcopy(h), [bytes(b) for b in bad]), match="rANS", stage="verify")
    # truncated stream
    short = list(secs)
    short[0] = short[0][:-2]
    rejects(tmp_path, v2ref.build(copy.deepcopy(h), short), match="rANS", stage="verify")
    # an initial state below 2^16
    low = list(secs)
    low[0] = struct.pack("<I", 5) + low[0][4:]
    rejects(tmp_path, v2ref.build(copy.deepcopy(h), low), match="rANS", stage="verify")
    # CRC mismatch is a checksum error
    from deltacodec.errors import SldChecksumError

    h2 = copy.deepcopy(h)
    data = v2ref.build(h2, secs)
    rejects(tmp_path, data[:-1] + bytes([data[-1] ^ 1]), SldChecksumError, stage="verify")


def side(h: dict) -> bytes:
    return h["modules"][0]["A"][2]


def test_reader_rejects_bad_side_information(tmp_path):
    from deltacodec.bitio import BitWriter

    h, secs = v2ref.parse(v2_file(tmp_path))

    def with_side(x: bytes, which: str = "A") -> bytes:
        h2 = copy.deepcopy(h)
        h2["modules"][0][which][2] = x
        return v2ref.build(h2, secs)

    # a table whose frequencies do not sum to 2^P: explicit, P = 4, two symbols, f0 = 16
    bw = BitWriter()
    bw.bits(0, 1), bw.bits(0, 1), bw.bits(3, 4), bw.seg0(0), bw.seg0(1), bw.seg0(0), bw.eg0(16)
    bw.bits(0x3F80, 16), bw.bits(0, 8), bw.seg0(0)
    rejects(tmp_path, with_side(bw.getvalue()), match="side information")
    # an alphabet of 300 symbols (over the kernel cap of 256), param table
    bw = BitWriter()
    bw.bits(0, 1), bw.bits(1, 1), bw.bits(13, 4), bw.seg0(-150), bw.seg0(149 + -150), bw.bits(0, 4), bw.seg0(0), bw.seg0(1)
    bw.bits(0x3F80, 16), bw.bits(0, 8), bw.seg0(0)
    rejects(tmp_path, with_side(bw.getvalue()), match="cap of 256")
    # a step whose largest level overflows float32: Δ = 2^127 (bf16 0x7F00), index 200
    bw = BitWriter()
    bw.bits(0, 1), bw.bits(1, 1), bw.bits(13, 4), bw.seg0(-200), bw.seg0(0 + -200), bw.bits(0, 4), bw.seg0(0), bw.seg0(1)
    bw.bits(0x7F00, 16), bw.bits(0, 8), bw.seg0(0)
    rejects(tmp_path, with_side(bw.getvalue()), match="not finite")
    # side information that ends early, and trailing bytes after it
    rejects(tmp_path, with_side(side(h)[:2]), match="side information")
    rejects(tmp_path, with_side(side(h) + b"\x01"), match="side information")


def test_reader_rejects_bad_v2_headers(tmp_path):
    h, secs = v2ref.parse(v2_file(tmp_path))

    def changed(fn) -> bytes:
        h2 = copy.deepcopy(h)
        fn(h2)
        return v2ref.build(h2, secs)

    rejects(tmp_path, changed(lambda h: h.__setitem__("required", ["zfp"])), match="requires the extension")
    rejects(tmp_path, changed(lambda h: h.__setitem__("lanes", 33)), match="lanes")
    rejects(tmp_path, changed(lambda h: h.pop("defaults")), match="'defaults'")
    rejects(tmp_path, changed(lambda h: h["modules"][0].__setitem__("shape", [48, 64])), match="shape")
    rejects(tmp_path, changed(lambda h: h["modules"][1].__setitem__("p", 10_000)), match=".p")
    rejects(tmp_path, changed(lambda h: h["modules"][0]["A"].__setitem__(0, 7)), match="encoding 7 is not one of")
    rejects(tmp_path, changed(lambda h: h["modules"][0]["A"].append(1)), match="has 3 elements, got 4")
    rejects(tmp_path, changed(lambda h: h["modules"][0]["A"].__setitem__(2, "x")), match="expected bin")
    rejects(tmp_path, changed(lambda h: h["defaults"].__setitem__("omega", 0.0)), match="omega")
    rejects(tmp_path, changed(lambda h: h["defaults"].__setitem__("scale", "2")), match="defaults.scale")
    rejects(tmp_path, changed(lambda h: h["defaults"].__setitem__("kind", "dora")), match="defaults.kind")
    rejects(tmp_path, changed(lambda h: h["defaults"].__setitem__("fan_in_fan_out", 0)), match="expected bool")
    rejects(tmp_path, changed(lambda h: h["modules"][0].__setitem__("color", 1)), match="unknown key")
    # duplicate names after prefix expansion
    def dup(h):
        h["modules"][1]["name"] = h["modules"][0]["name"]
        h["modules"][1].pop("p", None)
    rejects(tmp_path, changed(dup), match="duplicate name")
    # an unknown root key (not required) and an empty 'required' are ignored
    ok = changed(lambda h: h.update({"x-note": {"a": [1, 2]}, "required": []}))
    (tmp_path / "ok.sld").write_bytes(ok)
    deltacodec.load(str(tmp_path / "ok.sld")).verify()
    # entries before defaults/lanes: the map is written in this order
    import msgpack
    import zstandard

    h2 = {"modules": h["modules"], "metadata": h["metadata"], "defaults": h["defaults"], "lanes": h["lanes"],
          "tensors": h["tensors"]}
    hdr = zstandard.ZstdCompressor().compress(msgpack.packb(h2, use_bin_type=True))
    data = struct.pack("<8sIII", v2ref.MAGIC, 2, len(hdr), zlib.crc32(hdr)) + hdr + b"".join(secs)
    rejects(tmp_path, data, match="comes before 'defaults'")


def container_bytes(path: str) -> int:
    """Header bytes without the quantizers' side information: what the container itself costs,
    measured as benchmarks/bench_v2_header.py measures it for the README's table."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_v2_header import container_bytes as measured

    return measured(path)


def test_v2_container_overhead_is_at_most_half_of_v1(tmp_path):
    """32 layers × 4 modules of a LLaMA-like naming scheme (small shapes: the header does not
    depend on them): the container's own bytes (side information aside) drop by over half."""
    rng = np.random.default_rng(0)
    mods = [AdapterModule(name=f"base_model.model.model.layers.{i}.self_attn.{p}_proj",
                          A=rng.normal(0, 0.1, (2, 32)).astype(np.float32),
                          B=rng.normal(0, 0.01, (24, 2)).astype(np.float32), scale=2.0, sine=True, omega=100.0,
                          gamma=float(np.sqrt(32)))
            for i in range(32) for p in "qkvo"]
    ad = Adapter(modules=mods, config={"peft_type": "SINLORA", "r": 2, "lora_alpha": 4})
    p1 = deltacodec.encode(ad, bits=3, out=str(tmp_path / "v1.sld"), container=1)
    p2 = deltacodec.encode(ad, bits=3, out=str(tmp_path / "v2.sld"), container=2)
    c1, c2 = container_bytes(p1), container_bytes(p2)
    assert c2 <= 0.5 * c1, (c1, c2)
    assert deltacodec.load(p2).header_size < deltacodec.load(p1).header_size


# ------------------------------------------------------------------------------------------------
# the command line


def test_cli_rate_targets(tmp_path, capsys):
    from cli_helpers import run_sld

    src = "examples/tiny-sine-adapter"
    out = str(tmp_path / "a.sld")
    rc, stdout, _ = run_sld(capsys, "encode", src, "-o", out, "--size", "9kB", "--report", "-q")
    assert rc == 0 and 0.95 * 9000 <= deltacodec.load(out).file_size <= 9000
    assert "rel. error" in stdout and "bits/param" in stdout
    rc, _, err = run_sld(capsys, "encode", src, "-o", str(tmp_path / "b.sld"), "--bits", "3", "--size", "3MB")
    assert rc == 2 and "not allowed with" in err
    rc, _, err = run_sld(capsys, "encode", src, "-o", str(tmp_path / "c.sld"), "--size", "100")
    assert rc == 1 and "unreachable" in err and "smallest" in err
    rc, _, _ = run_sld(capsys, "encode", src, "-o", str(tmp_path / "d.sld"), "--bits-per-param", "3.5",
                       "--quantizer", "auto", "--no-refit", "-q")
    assert rc == 0 and deltacodec.load(str(tmp_path / "d.sld")).version == 2
    rc, _, _ = run_sld(capsys, "encode", src, "-o", str(tmp_path / "e.sld"), "--bits", "3", "--container", "2", "-q")
    assert rc == 0 and deltacodec.load(str(tmp_path / "e.sld")).modules[0].A.quantizer == "kmeans"
    rc, _, err = run_sld(capsys, "encode", src, "-o", str(tmp_path / "f.sld"), "--quantizer", "ecsq",
                         "--container", "1")
    assert rc == 1 and "needs container version 2" in err
    rc, stdout, _ = run_sld(capsys, "verify", out)
    assert rc == 0 and "OK" in stdout


# ------------------------------------------------------------------------------------------------
# apply (torch backend; the Triton kernel reads the same uint8 index stream and values)


def _model_for(ad: Adapter):
    torch = pytest.importorskip("torch")

    root = torch.nn.Module()
    for m in ad.modules:
        parent = root
        parts = m.name[len("base_model.model."):].split(".")
        for p in parts[:-1]:
            if not hasattr(parent, p):
                parent.add_module(p, torch.nn.Module())
            parent = getattr(parent, p)
        parent.add_module(parts[-1], torch.nn.Linear(m.in_features, m.out_features, bias=False))
    torch.manual_seed(0)
    for p in root.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return root


@pytest.mark.parametrize("opts", [dict(bits=3, quantizer="ecsq"), dict(bits=2, quantizer="auto"),
                                  dict(bits=3, container=2), dict(bits=16, container=2)])
def test_apply_adds_the_decoded_delta_for_v2_files(tmp_path, opts):
    pytest.importorskip("torch")
    ad = adapter(sine=True)
    for m in ad.modules:  # exactly float16 values: --bits 16 stores them as F16 field streams
        m.A, m.B = (x.astype(np.float16).astype(np.float32) for x in (m.A, m.B))
    p = deltacodec.encode(ad, out=str(tmp_path / "a.sld"), **opts)
    f = deltacodec.load(p)
    model = _model_for(ad)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    deltacodec.apply(model, p, backend="torch")
    after = model.state_dict()
    for m in ad.modules:
        A, B = f.dequantize(m.name)
        e = f.module(m.name)
        d = AdapterModule(name=m.name, A=A, B=B, scale=e.scale, sine=e.sine, omega=e.omega, gamma=e.gamma).delta()
        key = m.name[len("base_model.model."):] + ".weight"
        got = (after[key].double() - before[key].double()).numpy()
        # apply forms ΔW in float32 and adds it to a float32 W of ~0.02: float32 rounding of the
        # rank-4 sums, the sine and the addition stays far below 1e-6 of max |ΔW|
        np.testing.assert_allclose(got, d, rtol=0, atol=1e-6 * max(1.0, float(np.abs(d).max())))


def test_inspect_and_decode_of_a_v2_file(tmp_path, capsys):
    from cli_helpers import run_sld
    from safetensors.numpy import load_file

    ad = adapter()
    p = deltacodec.encode(ad, bits=2, quantizer="ecsq", out=str(tmp_path / "a.sld"))
    f = deltacodec.load(p)
    rc, out, _ = run_sld(capsys, "inspect", p)
    assert rc == 0 and ".sld version 2" in out and "rANS-coded quantized tensors" in out
    rc, out, _ = run_sld(capsys, "inspect", p, "--json")
    import json

    rows = json.loads(out)["tensors"]
    assert all(r["levels"] == f._lookup(r["name"]).coder[1].table.size for r in rows)
    assert sum(r["side_bytes"] for r in rows) < f.header_size
    # decode to PEFT: the values decode gives (streamed, iter_chunks) are the tensors' values
    (path,) = [q for q in deltacodec.decode(p, str(tmp_path / "dec.safetensors")) if q.endswith(".safetensors")]
    t = load_file(path)
    for e in f.entries():
        np.testing.assert_array_equal(t[e.name], f.tensor(e))


def test_v2_without_the_compiled_coder(tmp_path, monkeypatch):
    """The pure-Python coder writes and reads the same bytes (no compiler on the machine)."""
    import warnings

    from deltacodec import _native

    ad = adapter()
    p1 = deltacodec.encode(ad, bits=2, quantizer="ecsq", out=str(tmp_path / "c.sld"))
    monkeypatch.setattr(_native, "_LIB", None)
    monkeypatch.setattr(_native, "_TRIED", True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p2 = deltacodec.encode(ad, bits=2, quantizer="ecsq", out=str(tmp_path / "py.sld"))
        assert open(p1, "rb").read() == open(p2, "rb").read()
        reference_matches(p2)


def test_v2_weight_shape_rules(tmp_path):
    """A conv module's weight_shape (spec 12.2): [out, in, kernel...], out = out_features and the
    product of the rest = in_features, never with fan_in_fan_out; a fitting one is read back."""
    h, secs = v2ref.parse(v2_file(tmp_path))
    out_f, in_f, _ = h["modules"][0]["shape"]

    def changed(fn) -> bytes:
        h2 = copy.deepcopy(h)
        fn(h2)
        return v2ref.build(h2, secs)

    def ws(value):
        return changed(lambda h: h["modules"][0].__setitem__("weight_shape", value))

    divisor = next(d for d in (2, 3, 4, 1) if in_f % d == 0)
    good = [out_f, in_f // divisor, divisor]
    (tmp_path / "ok.sld").write_bytes(ws(good))
    f = deltacodec.load(str(tmp_path / "ok.sld"))
    f.verify()
    assert f.modules[0].weight_shape == tuple(good) and f.modules[1].weight_shape is None
    for bad in ([out_f, in_f], [out_f, in_f, 1, 1, 1, 1], [out_f + 1, in_f, 1], [out_f, in_f + 1, 1],
                [out_f, in_f, 0], [out_f, in_f, "1"], "x", [out_f, in_f, 2 ** 31]):
        rejects(tmp_path, ws(bad), match="weight_shape")

    def fifo(h):
        h["modules"][0]["weight_shape"] = good
        h["modules"][0]["fan_in_fan_out"] = True
    rejects(tmp_path, changed(fifo), match="fan_in_fan_out")


def test_size_targets_try_minimax_first_and_fall_back_to_the_sum_allocation(tmp_path, monkeypatch):
    """Rate control puts every module under one relative-error bound (minimax) first; a size it
    cannot reach that way is retried with the shared-λ sum allocation, which reaches lower sizes
    by zeroing the modules that cost most per unit of error. Every file met lands at or under its
    target, and the deterministic adapter here has targets only the fallback reaches."""
    import re

    import deltacodec.ratecontrol as rc
    from test_codec import make_adapter

    make_adapter(str(tmp_path / "a"), rank=8)
    with pytest.raises(deltacodec.EncodeError, match="unreachable") as info:
        deltacodec.encode(str(tmp_path / "a"), size=10, out=str(tmp_path / "x.sld"))
    floor = int(re.search(r"encodes to is ([\d,]+) bytes", str(info.value)).group(1).replace(",", ""))
    calls: list = []
    real = rc.encode_modules
    monkeypatch.setattr(rc, "encode_modules", lambda *a, **k: calls.append(k["allocation"]) or real(*a, **k))
    by_fallback = 0
    for target in range(int(floor * 1.3), int(floor * 1.8), 8):
        calls.clear()
        try:
            p = deltacodec.encode(str(tmp_path / "a"), size=target, out=str(tmp_path / f"{target}.sld"))
        except deltacodec.EncodeError as exc:
            assert "unreachable" in str(exc) and calls[-1] == "sum"  # both were tried
            continue
        assert os.path.getsize(p) <= target and calls[0] == "minimax"
        by_fallback += "sum" in calls
        deltacodec.load(p).verify()
    assert by_fallback > 0


@pytest.mark.parametrize("flag,value", [
    ("--bits-per-param", "nan"), ("--bits-per-param", "0"), ("--bits-per-param", "-1"), ("--bits-per-param", "inf"),
    ("--bits-per-param", "two"), ("--max-error", "0"), ("--max-error", "1e999"), ("--max-error", ""),
    ("--size", "0"), ("--size", "3XB"), ("--size", "-5"), ("--container", "3"), ("--quantizer", "zip"),
])
def test_cli_rate_target_values_that_are_not_targets_are_usage_errors(tmp_path, capsys, flag, value):
    from cli_helpers import assert_usage_error, run_sld

    rc, _, err = run_sld(capsys, "encode", "examples/tiny-sine-adapter", "-o", str(tmp_path / "x.sld"), flag, value)
    assert_usage_error(rc, err, flag)
    assert not (tmp_path / "x.sld").exists()


@pytest.mark.parametrize("kw,why", [
    ({"bits_per_param": "2"}, "bits_per_param must be a positive finite number"),
    ({"bits_per_param": True}, "bits_per_param must be a positive finite number"),
    ({"max_error": float("nan")}, "max_error must be a positive finite number"),
    ({"size": -1}, "size must be a positive finite number"),
    ({"size": 1000, "bits_per_param": 2.0}, "exactly one target"),
    ({"bits_per_param": 2.0, "quantizer": "kmeans"}, "needs rate control"),
    ({"bits": 3, "container": 4}, "container must be 1 or 2"),
])
def test_api_rate_targets_of_the_wrong_type_or_range_are_encode_errors(tmp_path, kw, why):
    with pytest.raises(deltacodec.EncodeError, match=why):
        deltacodec.encode("examples/tiny-sine-adapter", out=str(tmp_path / "x.sld"), **kw)
    assert not (tmp_path / "x.sld").exists()
