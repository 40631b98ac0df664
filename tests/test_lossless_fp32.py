"""Lossless float32 (``bits=32``, spec 13.5 dtype 2 under the extension ``f32_fields``): every
factor comes back bit for bit through the reader, the plain reference decoder (tests/v2ref.py),
``sld decode`` and ``deltacodec.apply``; each factor is stored in its smallest exact form; the
reader refuses F32 fields a file does not announce; bad option combinations are refused."""

from __future__ import annotations

import copy

import numpy as np
import pytest

import deltacodec
from deltacodec.adapter import Adapter, AdapterModule
from deltacodec.errors import EncodeError, SldFormatError

import v2ref

SIZES = (1, 7, 1000, 70_000)


def fp32_values(dist: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` float32 values of a distribution; the random ones are (almost surely) neither
    bfloat16 nor float16 values, so they need F32 fields."""
    if dist == "gauss":
        x = rng.standard_normal(n) * 0.02
    elif dist == "laplace":
        x = rng.laplace(0, 0.01, n)
    elif dist == "heavy":  # Student t with 1.5 degrees of freedom: values over many octaves
        x = rng.standard_t(1.5, n) * 1e-3
    elif dist == "constant":
        x = np.full(n, 0.1)  # 0.1 is not exact in bf16 nor fp16
    elif dist == "zero":
        x = np.zeros(n)
    elif dist == "subnormal":  # float32 subnormals of both signs: the exponent field is 0
        bits = rng.integers(1, 1 << 23, n, dtype=np.uint32) | (rng.integers(0, 2, n, dtype=np.uint32) << 31)
        return bits.view(np.float32)
    else:
        raise ValueError(dist)
    return x.astype(np.float32)


def adapter_of(dist: str, seed: int = 0) -> Adapter:
    """One module per size: A is 1 × n, B is n × 1 (rank 1), both from ``dist``."""
    rng = np.random.default_rng(seed)
    mods = [AdapterModule(name=f"base_model.model.l{k}.q", A=fp32_values(dist, n, rng).reshape(1, n),
                          B=fp32_values(dist, n, rng).reshape(n, 1), scale=0.5)
            for k, n in enumerate(SIZES)]
    return Adapter(modules=mods, config={"peft_type": "LORA", "r": 1, "lora_alpha": 1})


def expected_dtype(x: np.ndarray) -> set[str]:
    """The stored dtypes the smallest-exact rule allows, computed plainly: 16-bit forms only when
    every value round-trips through them bit for bit."""
    b = x.reshape(-1).view(np.uint32)
    exact = set()
    if not np.any(b & 0xFFFF):
        exact.add("BF16")
    with np.errstate(over="ignore"):
        if np.array_equal(x.astype(np.float16).astype(np.float32).view(np.uint32), x.view(np.uint32)):
            exact.add("F16")
    return exact or {"F32"}


def entry_named(f, name: str):
    return next(e for e in f.entries() if e.name == name)


def same_bits(got: np.ndarray, want: np.ndarray, what: str) -> None:
    got = np.asarray(got, dtype=np.float32).reshape(-1)  # float16 widens exactly
    np.testing.assert_array_equal(got.view(np.uint32), np.asarray(want, np.float32).reshape(-1).view(np.uint32),
                                  err_msg=what)


def check_file(path: str, ad: Adapter) -> None:
    """Reader, pieces and the reference decoder all give the source bits back."""
    f = deltacodec.load(path)
    assert f.version == 2
    ref = v2ref.decode(open(path, "rb").read())
    for m in ad.modules:
        entry = f.module(m.name)
        for e, x in ((entry.A, m.A), (entry.B, m.B)):
            assert e.dtype in expected_dtype(x), e.name
            same_bits(f.tensor(e), x, e.name)
            same_bits(np.concatenate(list(f.iter_chunks(e, 4097))), x, e.name)
            same_bits(ref[e.name], x, f"reference: {e.name}")
    f.verify()


@pytest.mark.parametrize("dist", ["gauss", "laplace", "heavy", "constant", "zero", "subnormal"])
def test_bits_32_is_bit_exact_for_every_distribution_and_size(tmp_path, dist):
    ad = adapter_of(dist)
    p = deltacodec.encode(ad, bits=32, out=str(tmp_path / "a.sld"))
    check_file(p, ad)
    h, _ = v2ref.parse(open(p, "rb").read())
    uses_f32 = any(e.dtype == "F32" for e in deltacodec.load(p).entries())
    assert (h.get("required") == ["f32_fields"]) == uses_f32
    assert uses_f32 == (dist != "zero")


def test_f32_fields_are_smaller_than_raw_float32_on_laplace_values(tmp_path):
    """Not a benchmark (benchmarks/bench_v2_lossless.py is): only that the exponent stream is
    coded, so Laplace-like values take clearly under 4 bytes each."""
    ad = adapter_of("laplace")
    p = deltacodec.encode(ad, bits=32, out=str(tmp_path / "a.sld"))
    f = deltacodec.load(p)
    big = f.module(ad.modules[-1].name).A
    assert big.dtype == "F32" and big.length < 0.9 * 4 * big.numel


def test_smallest_exact_form_is_chosen(tmp_path):
    rng = np.random.default_rng(3)
    fp32 = rng.laplace(0, 0.01, (4, 64)).astype(np.float32)
    bf16 = (rng.laplace(0, 0.01, (64, 4)).astype(np.float32).view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)
    # exactly fp16 but not bf16: 11 significant bits
    f16 = rng.standard_normal((4, 64)).astype(np.float16).astype(np.float32)
    f16[0, 0] = np.float32(1 + 2.0**-10)
    # exactly both: few significant bits (multiples of 1/64 below 4)
    both = (rng.integers(-256, 256, (64, 4)) / 64).astype(np.float32)
    mods = [AdapterModule(name="base_model.model.a.q", A=fp32, B=bf16, scale=1.0),
            AdapterModule(name="base_model.model.b.q", A=f16, B=both, scale=1.0)]
    ad = Adapter(modules=mods, config={"peft_type": "LORA"})
    p = deltacodec.encode(ad, bits=32, out=str(tmp_path / "a.sld"))
    f = deltacodec.load(p)
    got = {e.name.split(".")[2] + "." + e.name.split(".")[4]: e for e in f.entries()}
    assert got["a.lora_A"].dtype == "F32" and got["a.lora_B"].dtype == "BF16" and got["b.lora_A"].dtype == "F16"
    # both exact: the writer keeps whichever codes smaller; check against both, coded here
    from deltacodec.encode_v2 import lossless_tensor

    sizes = {dt: len(t["section"]) + len(t["side"])
             for dt in ("BF16", "F16") for t in [lossless_tensor(both, dt, 4)]}
    e = got["b.lora_B"]
    assert e.dtype in sizes and sizes[e.dtype] == min(sizes.values())
    assert e.length == len(lossless_tensor(both, e.dtype, 4)["section"])
    check_file(p, ad)


def test_a_file_without_f32_fields_is_the_bits_16_file_byte_for_byte(tmp_path):
    """``required`` is written only when used: a bf16 adapter's bits=32 file is its bits=16 file."""
    rng = np.random.default_rng(4)
    bf = lambda s: (rng.standard_normal(s).astype(np.float32).view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)  # noqa: E731
    ad = Adapter(modules=[AdapterModule(name="base_model.model.a.q", A=bf((4, 50)), B=bf((30, 4)), scale=1.0)],
                 config={"peft_type": "LORA"})
    p16 = deltacodec.encode(ad, bits=16, out=str(tmp_path / "a16.sld"))
    p32 = deltacodec.encode(ad, bits=32, out=str(tmp_path / "a32.sld"))
    assert open(p16, "rb").read() == open(p32, "rb").read()
    assert "required" not in v2ref.parse(open(p32, "rb").read())[0]


def test_bits_32_is_deterministic_and_ignores_the_quantizer(tmp_path):
    ad = adapter_of("laplace")
    a = deltacodec.encode(ad, bits=32, out=str(tmp_path / "a.sld"))
    b = deltacodec.encode(ad, bits=32, quantizer="ecsq", out=str(tmp_path / "b.sld"))
    assert open(a, "rb").read() == open(b, "rb").read()


def test_f32_extras_use_fields_when_smaller(tmp_path):
    rng = np.random.default_rng(5)
    big = rng.laplace(0, 0.01, 3000).astype(np.float32)
    tiny = rng.standard_normal(3).astype(np.float32)
    bf = (rng.standard_normal(200).astype(np.float32).view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)
    ad = adapter_of("gauss")
    ad.extras = {"base_model.model.big": (big, "F32"), "base_model.model.tiny": (tiny, "F32"),
                 "base_model.model.bf": (bf, "BF16")}
    p = deltacodec.encode(ad, bits=32, out=str(tmp_path / "a.sld"))
    f = deltacodec.load(p)
    e_big, e_tiny = entry_named(f, "base_model.model.big"), entry_named(f, "base_model.model.tiny")
    assert (e_big.dtype, e_big.compression) == ("F32", "fields")
    assert e_big.length < 4 * big.size
    assert e_tiny.dtype == "F32" and e_tiny.compression != "fields"  # 12 raw bytes beat any stream
    for name, (x, _) in ad.extras.items():
        same_bits(f.tensor(name), x, name)
    ref = v2ref.decode(open(p, "rb").read())
    for name, (x, _) in ad.extras.items():
        same_bits(ref[name], x, f"reference: {name}")
    # bits=16 leaves F32 extras raw: no F32 fields, no 'required'
    p16 = deltacodec.encode(ad, bits=16, out=str(tmp_path / "b.sld"))
    assert entry_named(deltacodec.load(p16), "base_model.model.big").compression != "fields"


def test_sld_decode_gives_the_fp32_source_back_bit_for_bit(tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    from cli_helpers import run_sld

    rng = np.random.default_rng(6)
    src = tmp_path / "src"
    src.mkdir()
    state = {
        "base_model.model.l0.q_proj.lora_A.weight": fp32_values("laplace", 4 * 300, rng).reshape(4, 300),
        "base_model.model.l0.q_proj.lora_B.weight": fp32_values("heavy", 200 * 4, rng).reshape(200, 4),
        "base_model.model.l1.q_proj.lora_A.weight": fp32_values("subnormal", 4 * 300, rng).reshape(4, 300),
        # exactly bf16: stored as BF16 fields, decoded to F32 all the same
        "base_model.model.l1.q_proj.lora_B.weight": (fp32_values("gauss", 200 * 4, rng).view(np.uint32)
                                                      & np.uint32(0xFFFF0000)).view(np.float32).reshape(200, 4),
    }
    save_file(state, str(src / "adapter_model.safetensors"))
    (src / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 8}')
    out = str(tmp_path / "a.sld")
    rc, _, err = run_sld(capsys, "encode", str(src), "--bits", "32", "-o", out, "-q")
    assert rc == 0, err
    f = deltacodec.load(out)
    assert {e.dtype for e in f.entries()} == {"F32", "BF16"}
    rc, _, err = run_sld(capsys, "decode", out, "-o", str(tmp_path / "dec"), "-q")
    assert rc == 0, err
    back = load_file(str(tmp_path / "dec" / "adapter_model.safetensors"))
    assert sorted(back) == sorted(state)
    for k, x in state.items():
        assert back[k].dtype == np.float32 and back[k].shape == x.shape
        np.testing.assert_array_equal(back[k].view(np.uint32), x.view(np.uint32), err_msg=k)
    rc, stdout, _ = run_sld(capsys, "verify", out)
    assert rc == 0 and "OK" in stdout


def test_bad_uses_of_bits_32_are_refused(tmp_path, capsys):
    from cli_helpers import run_sld

    ad = adapter_of("gauss")
    with pytest.raises(EncodeError, match="bits=32.*container=1"):
        deltacodec.encode(ad, bits=32, container=1, out=str(tmp_path / "x.sld"))
    with pytest.raises(EncodeError, match="refit applies"):
        deltacodec.encode(ad, bits=32, refit=True, out=str(tmp_path / "x.sld"))
    with pytest.raises(EncodeError, match="bits must be 1..8, 16 or 32"):
        deltacodec.encode(ad, bits=24, out=str(tmp_path / "x.sld"))
    ad.modules[2].A[0, 5] = np.inf
    with pytest.raises(EncodeError, match="l2.q.lora_A.weight.*NaN or Inf"):
        deltacodec.encode(ad, bits=32, out=str(tmp_path / "x.sld"))
    assert not (tmp_path / "x.sld").exists()
    src = "examples/tiny-sine-adapter"
    rc, _, err = run_sld(capsys, "encode", src, "-o", str(tmp_path / "y.sld"), "--bits", "32", "--container", "1")
    assert rc == 1 and "container" in err
    rc, _, err = run_sld(capsys, "encode", src, "-o", str(tmp_path / "y.sld"), "--bits", "24")
    assert rc == 2 and "1..8, 16 or 32" in err
    rc, _, err = run_sld(capsys, "encode", src, "-o", str(tmp_path / "y.sld"), "--bits", "32", "--size", "9kB")
    assert rc == 2 and "not allowed with" in err
    rc, _, err = run_sld(capsys, "encode", src, "-o", str(tmp_path / "z.sld"), "--bits", "32", "-q")
    assert rc == 0, err
    assert not (tmp_path / "y.sld").exists()


# ------------------------------------------------------------------------------------------------
# the reader's rules (spec 13.5, 15)


def f32_file(tmp_path) -> bytes:
    ad = adapter_of("laplace")
    ad.modules = ad.modules[:3]
    return open(deltacodec.encode(ad, bits=32, out=str(tmp_path / "ok.sld")), "rb").read()


def rejects(tmp_path, data: bytes, match: str, stage: str = "open") -> None:
    p = tmp_path / "bad.sld"
    p.write_bytes(data)
    if stage == "open":
        with pytest.raises(SldFormatError, match=match):
            deltacodec.load(str(p))
    else:
        f = deltacodec.load(str(p))
        with pytest.raises(SldFormatError, match=match):
            f.verify()


def test_reader_refuses_f32_fields_the_file_does_not_announce(tmp_path):
    h, secs = v2ref.parse(f32_file(tmp_path))
    assert h["required"] == ["f32_fields"]

    def changed(fn) -> bytes:
        h2 = copy.deepcopy(h)
        fn(h2)
        return v2ref.build(h2, secs)

    rejects(tmp_path, changed(lambda h: h.pop("required")),
            match=r"tensor 'base_model\.model\.l0\.q\.lora_A\.weight'.*F32 field streams.*'f32_fields'")
    rejects(tmp_path, changed(lambda h: h.__setitem__("required", [])), match="'f32_fields'")
    rejects(tmp_path, changed(lambda h: h.__setitem__("required", ["f32_fields", "zfp"])),
            match="requires the extension 'zfp'")
    # the extension announced before the entries, or listed twice: still a valid file
    for fn in (lambda h: h.__setitem__("required", ["f32_fields", "f32_fields"]),
               lambda h: h.update({"required": h.pop("required")})):
        (tmp_path / "ok2.sld").write_bytes(changed(fn))
        deltacodec.load(str(tmp_path / "ok2.sld")).verify()
    # announcing the extension in a file without F32 fields is allowed
    (tmp_path / "ok3.sld").write_bytes(changed(lambda h: None))
    deltacodec.load(str(tmp_path / "ok3.sld")).verify()


def test_reader_refuses_bad_f32_side_information_and_sections(tmp_path):
    from deltacodec.sideinfo import read_fields

    h, secs = v2ref.parse(f32_file(tmp_path))
    side = h["modules"][2]["A"][2]
    fs = read_fields(side)
    assert fs.dtype == "F32" and len(fs.tables) == 4

    def with_side(x: bytes) -> bytes:
        h2 = copy.deepcopy(h)
        h2["modules"][2]["A"][2] = x
        return v2ref.build(h2, secs)

    # dtype code 3: the two low bits of the first byte
    rejects(tmp_path, with_side(bytes([side[0] | 3]) + side[1:]), match="field dtype code 3")
    # a section one stored stream short, and a stream cut by 2 bytes (same stored streams)
    n = SIZES[2]  # module 2's lora_A is section 4
    sec = secs[4]
    assert fs.stored >= 1 and len(sec) >= fs.stored * n
    short = copy.deepcopy(h)
    s2 = list(secs)
    s2[4] = sec[: fs.stored * n - 1]
    rejects(tmp_path, v2ref.build(short, s2), match="cannot hold")
    s3 = list(secs)
    s3[4] = sec[2:]
    rejects(tmp_path, v2ref.build(copy.deepcopy(h), s3), match="rANS stream", stage="verify")


# ------------------------------------------------------------------------------------------------
# apply: the patched weight is W + scale·B@A of the original float32 factors


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_apply_adds_the_exact_fp32_factors(tmp_path, backend):
    torch = pytest.importorskip("torch")
    from deltacodec import kernels

    if backend == "triton" and not kernels.triton_available():
        pytest.skip("triton is not installed")
    rng = np.random.default_rng(7)
    shapes = [("a.q", 24, 40, 4), ("a.v", 40, 24, 4)]
    mods, root = [], torch.nn.Module()
    root.add_module("a", torch.nn.Module())
    for name, o, i, r in shapes:
        A = fp32_values("laplace", r * i, rng).reshape(r, i) * 10
        B = fp32_values("gauss", o * r, rng).reshape(o, r) * 5
        mods.append(AdapterModule(name=f"base_model.model.{name}", A=A, B=B, scale=2.0))
        root.a.add_module(name.split(".")[1], torch.nn.Linear(i, o, bias=False))
    with torch.no_grad():
        for prm in root.parameters():
            prm.copy_(torch.from_numpy(rng.standard_normal(tuple(prm.shape)).astype(np.float32) * 0.02))
    ad = Adapter(modules=mods, config={"peft_type": "LORA", "r": 4, "lora_alpha": 8})
    f = deltacodec.load(deltacodec.encode(ad, bits=32, out=str(tmp_path / "a.sld")))
    assert {e.dtype for e in f.entries()} == {"F32"}
    W0 = {k: v.detach().double().numpy().copy() for k, v in root.state_dict().items()}
    deltacodec.apply(root, f, backend=backend)
    for m in mods:
        key = m.name[len("base_model.model."):] + ".weight"
        A, B = m.A.astype(np.float64), m.B.astype(np.float64)
        want = W0[key] + m.scale * (B @ A)
        got = root.state_dict()[key].double().numpy()
        # fp32 arithmetic: the rank-4 sum and the scale (at most 6 roundings of |terms| ≤
        # scale·Σ|B||A|) and the final rounding of W + ΔW; 8 float32 ulps of those magnitudes
        bound = 8 * 2.0**-24 * (m.scale * (np.abs(B) @ np.abs(A)) + np.abs(want))
        assert np.all(np.abs(got - want) <= bound)
        # the bound is tight enough to see a factor rounded to float16 (what --bits 16 would store)
        A16 = m.A.astype(np.float16).astype(np.float64)
        off = W0[key] + m.scale * (B @ A16)
        assert np.any(np.abs(off - want) > bound)


# ------------------------------------------------------------------------------------------------
# the field layout itself (bytegroup), against the spec's bit formulas written out here


def reference_f32_fields(word: int) -> tuple[int, int, int, int]:
    s, e, m = word >> 31, (word >> 23) & 0xFF, word & 0x7FFFFF
    return e, s * 128 + (m >> 16), (m >> 8) % 256, m % 256


def test_f32_fields_follow_the_spec_layout_and_join_back():
    from deltacodec import bytegroup

    rng = np.random.default_rng(8)
    specials = [0x00000000, 0x80000000, 0x00000001, 0x807FFFFF, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F800000,
                0xFF800000, 0x7FC00000, 0x7F800001, 0xFFFFFFFF, 0x3F800000]
    words = np.concatenate([np.array(specials, np.uint32), rng.integers(0, 1 << 32, 2000, dtype=np.uint32)])
    fields = bytegroup.split_fields(words, "F32")
    assert len(fields) == 4 and all(f.dtype == np.uint8 for f in fields)
    for k, w in enumerate(words.tolist()):
        assert tuple(int(f[k]) for f in fields) == reference_f32_fields(w)
    assert np.array_equal(bytegroup.join_fields(fields, "F32"), words)
    # NaN payloads, infinities, signed zeros: the coder is lossless for every pattern
    for n in (0, 1, 5, len(words)):
        g = bytegroup.encode_fields(words[:n], "F32")
        back = bytegroup.decode_fields(g)
        assert back.dtype == np.uint32 and np.array_equal(back, words[:n])


def test_sld_apply_adds_the_exact_fp32_factors_to_a_safetensors_base(tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    from cli_helpers import run_sld

    rng = np.random.default_rng(9)
    A = fp32_values("laplace", 4 * 40, rng).reshape(4, 40) * 10
    B = fp32_values("gauss", 24 * 4, rng).reshape(24, 4) * 50
    ad = Adapter(modules=[AdapterModule(name="base_model.model.model.q", A=A, B=B, scale=2.0)],
                 config={"peft_type": "LORA"})
    p = deltacodec.encode(ad, bits=32, out=str(tmp_path / "a.sld"))
    W = rng.standard_normal((24, 40)).astype(np.float32)
    save_file({"model.q.weight": W}, str(tmp_path / "base.safetensors"))
    rc, _, err = run_sld(capsys, "apply", str(tmp_path / "base.safetensors"), p, "-o", str(tmp_path / "out.safetensors"),
                         "-q")
    assert rc == 0, err
    got = load_file(str(tmp_path / "out.safetensors"))["model.q.weight"].astype(np.float64)
    A64, B64 = A.astype(np.float64), B.astype(np.float64)
    want = W + 2.0 * (B64 @ A64)
    bound = 8 * 2.0**-24 * (2.0 * (np.abs(B64) @ np.abs(A64)) + np.abs(want))  # as in the apply test above
    assert np.all(np.abs(got - want) <= bound)


def test_damaged_f32_side_information_and_sections_fail_only_with_sld_errors(tmp_path):
    """Random bit flips in an F32 tensor's side information and section, with the CRCs and
    lengths made consistent again (so the reader's own rules, not the checksum, must catch them):
    opening and verifying either succeeds or raises an SldError, never anything else."""
    from deltacodec.errors import SldError

    h, secs = v2ref.parse(f32_file(tmp_path))
    rng = np.random.default_rng(10)
    outcomes = {"ok": 0, "refused": 0}
    for trial in range(150):
        h2, s2 = copy.deepcopy(h), list(secs)
        if trial % 2:
            side = bytearray(h2["modules"][1]["B"][2])
            side[rng.integers(len(side))] ^= 1 << int(rng.integers(8))
            h2["modules"][1]["B"][2] = bytes(side)
        else:
            sec = bytearray(s2[3])
            sec[rng.integers(len(sec))] ^= 1 << int(rng.integers(8))
            s2[3] = bytes(sec)
        p = tmp_path / "d.sld"
        p.write_bytes(v2ref.build(h2, s2))
        try:
            deltacodec.load(str(p)).verify()
            outcomes["ok"] += 1
        except SldError:
            outcomes["refused"] += 1
    # flips in a stored mantissa byte are undetectable (any byte is a valid value); flips in the
    # side information or the coded stream mostly are
    assert outcomes["refused"] > 0 and outcomes["ok"] > 0
