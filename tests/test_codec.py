"""encode / decode / load end to end on adapters written by the tests themselves."""

from __future__ import annotations

import json
import math
import os
import warnings

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from safetensors.torch import load_file

import deltacodec
from deltacodec import Adapter, AdapterError, AdapterModule, EncodeError, SldFile
from deltacodec.quantize import quantize


def make_adapter(path, *, config=None, tensors=None, rank=4, seed=0, fmt="safetensors"):
    """A 2-module PEFT-layout adapter: q (32×48) and down (48×64)."""
    rng = np.random.default_rng(seed)
    if tensors is None:
        tensors = {}
        for mod, (o, i) in {"layers.0.q_proj": (32, 48), "layers.0.down_proj": (48, 64)}.items():
            tensors[f"base_model.model.{mod}.lora_A.weight"] = rng.uniform(-0.1, 0.1, (rank, i)).astype(np.float32)
            tensors[f"base_model.model.{mod}.lora_B.weight"] = (rng.standard_t(4, (o, rank)) * 1e-2).astype(np.float32)
    os.makedirs(path, exist_ok=True)
    if fmt == "safetensors":
        save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    else:
        torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, os.path.join(path, "adapter_model.bin"))
    cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": 8, "base_model_name_or_path": "tiny"}
    if config:
        cfg.update(config)
    with open(os.path.join(path, "adapter_config.json"), "w") as fh:
        json.dump(cfg, fh)
    return tensors


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("level", [0, 1])
def test_decode_equals_codebook_at_indices_of_the_quantizer(tmp_path, bits, level):
    src = tmp_path / "a"
    tensors = make_adapter(src, rank=32)  # >= 1024 values a tensor: the codebook form is the smaller
    out = deltacodec.encode(str(src), bits=bits, out=str(tmp_path / "a.sld"), level=level)
    f = deltacodec.load(out)
    for m in f.modules:
        A, B = f.dequantize(m.name)
        for got, key in ((A, m.A.name), (B, m.B.name)):
            q = quantize(tensors[key], bits, "kmeans")  # the encoder's own quantization, redone
            np.testing.assert_array_equal(got.reshape(-1), q.codebook[q.indices])
            e = f._lookup(key)
            aligned = [1, 2, 4, 4, 8, 8, 8, 8][bits - 1]
            assert e.bits == bits
            # with the entropy stage: byte-aligned fields, or dense ones stored plainly if smaller
            assert e.width == bits if level == 0 else (e.width == aligned or (e.width, e.compression) == (bits, "none"))


def test_dense_fields_are_kept_where_zstd_cannot_beat_them(tmp_path):
    rng = np.random.default_rng(3)
    uniform = rng.uniform(-1, 1, (16, 1024)).astype(np.float32)  # 3-bit indices near 3 bits of entropy
    peaked = (rng.standard_t(3, (1024, 16)) * 1e-2).astype(np.float32)  # far below 3 bits
    a = Adapter(modules=[AdapterModule("m", A=uniform, B=peaked, scale=1.0)])
    f = deltacodec.load(deltacodec.encode(a, bits=3, out=str(tmp_path / "a.sld")))
    A, B = f.modules[0].A, f.modules[0].B
    assert (A.width, A.compression, A.length) == (3, "none", 16 * 1024 * 3 // 8)
    assert (B.width, B.compression) == (4, "zstd") and B.length < 16 * 1024 * 3 // 8


def test_tensors_smaller_than_their_codebook_are_stored_as_float16(tmp_path):
    src = tmp_path / "a"
    tensors = make_adapter(src, rank=1)  # A: 1x48 and 1x64 values, B: 32x1 and 48x1
    f = deltacodec.load(deltacodec.encode(str(src), bits=8, out=str(tmp_path / "a.sld")))
    for e in (t for m in f.modules for t in (m.A, m.B)):
        # a 256-entry codebook (512 bytes) beats 2 bytes a value only past 256 values
        assert e.encoding == "raw" and e.dtype == "F16" and e.bits == 16, e.name
        np.testing.assert_array_equal(f.tensor(e), tensors[e.name].astype(np.float16))
    # at 2 bits the 8-byte codebook wins: float16 would be larger
    f2 = deltacodec.load(deltacodec.encode(str(src), bits=2, out=str(tmp_path / "b.sld")))
    assert all(t.encoding == "codebook" for m in f2.modules for t in (m.A, m.B))


def test_float16_fallback_is_refused_where_float16_is_subnormal(tmp_path):
    # 64 values near 1e-6, where float16 is subnormal (steps of 6e-8, ~3% of the values); the
    # 8-bit codebook holds both distinct values almost exactly, so it stays though it is larger.
    x = np.repeat(np.array([1.03e-6, -2.71e-6], dtype=np.float32), 32)
    a = Adapter(modules=[AdapterModule("m", A=x.reshape(1, 64), B=np.full((4, 1), 0.5, np.float32), scale=1.0)])
    f = deltacodec.load(deltacodec.encode(a, bits=8, out=str(tmp_path / "c.sld")))
    assert f.modules[0].A.encoding == "codebook" and f.modules[0].B.encoding == "raw"
    np.testing.assert_allclose(f.tensor(f.modules[0].A).reshape(-1), x, rtol=2.0**-11)


def test_sixteen_bit_passthrough_is_exact(tmp_path):
    src = tmp_path / "a"
    tensors = make_adapter(src)
    f = deltacodec.load(deltacodec.encode(str(src), bits=16, out=str(tmp_path / "a.sld")))
    for m in f.modules:
        A, B = f.dequantize(m.name)
        np.testing.assert_array_equal(A, tensors[m.A.name].astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(B, tensors[m.B.name].astype(np.float16).astype(np.float32))
        assert m.A.encoding == "raw" and m.A.dtype == "F16"


def test_sixteen_bit_rejects_values_beyond_float16(tmp_path):
    src = tmp_path / "a"
    t = make_adapter(src)
    k = next(iter(t))
    t[k][0, 0] = 1e6
    make_adapter(src, tensors=t)
    with pytest.raises(EncodeError, match="does not fit float16"):
        deltacodec.encode(str(src), bits=16, out=str(tmp_path / "a.sld"))


def test_header_records_scale_omega_gamma_per_module(tmp_path):
    src = tmp_path / "a"
    make_adapter(src, config={"peft_type": "SINLORA", "freq": 200.0, "s": 3.0, "lora_alpha": 8})
    f = deltacodec.load(deltacodec.encode(str(src), out=str(tmp_path / "a.sld")))
    for m in f.modules:
        assert m.sine and m.omega == 200.0
        assert m.gamma == pytest.approx(math.sqrt(m.in_features))  # 's' is ignored, as in the reference
        assert m.scale == 8 / 4
    assert f.metadata["method"] == "sine" and f.metadata["base_model"] == "tiny"


def test_config_variants_rslora_patterns_and_upstream_sine_keys(tmp_path):
    src = tmp_path / "a"
    make_adapter(
        src,
        config={
            "use_rslora": True,
            "alpha_pattern": {"down_proj": 32},
            "use_sinelora": True,
            "sinelora_frequency": 50.0,
            "sinelora_scaling": 7.0,
            "fan_in_fan_out": True,
        },
    )
    f = deltacodec.load(deltacodec.encode(str(src), out=str(tmp_path / "a.sld")))
    by = {m.name.split(".")[-1]: m for m in f.modules}
    assert by["q_proj"].scale == pytest.approx(8 / 2.0)  # alpha / sqrt(r), r = 4
    assert by["down_proj"].scale == pytest.approx(32 / 2.0)
    assert all(m.sine and m.omega == 50.0 and m.gamma == 7.0 and m.fan_in_fan_out for m in f.modules)


def test_cli_style_overrides_beat_the_config(tmp_path):
    src = tmp_path / "a"
    make_adapter(src, config={"peft_type": "SINLORA", "freq": 200.0})
    f = deltacodec.load(deltacodec.encode(str(src), out=str(tmp_path / "a.sld"), omega=30.0, gamma=2.5))
    assert all(m.omega == 30.0 and m.gamma == 2.5 for m in f.modules)
    # An omega on a plain LoRA adapter makes it a sine adapter.
    make_adapter(tmp_path / "b")
    f = deltacodec.load(deltacodec.encode(str(tmp_path / "b"), out=str(tmp_path / "b.sld"), omega=10.0))
    assert all(m.sine and m.gamma == pytest.approx(math.sqrt(m.in_features)) for m in f.modules)


def test_sine_adapter_without_omega_is_an_error(tmp_path):
    for cfg in ({"peft_type": "SINLORA"}, {"peft_type": "SINLORA", "freq": 0}, {"use_sinelora": True}):
        make_adapter(tmp_path / "a", config=cfg)
        with pytest.raises(AdapterError, match="needs a non-zero frequency"):
            deltacodec.encode(str(tmp_path / "a"), out=str(tmp_path / "a.sld"))
        assert not (tmp_path / "a.sld").exists()


def test_bad_adapters_get_specific_errors(tmp_path):
    rng = np.random.default_rng(0)
    A = rng.normal(size=(4, 8)).astype(np.float32)
    B = rng.normal(size=(6, 4)).astype(np.float32)
    cases = [
        ({"x.lora_A.weight": A}, "has lora_A but no lora_B"),
        ({"x.lora_B.weight": B}, "has lora_B but no lora_A"),
        ({"x.lora_A.weight": A, "x.lora_B.weight": B[:, :3].copy()}, "mismatched ranks"),
        ({"x.lora_A.weight": np.where(A > 1, np.nan, A).astype(np.float32), "x.lora_B.weight": B}, "NaN/Inf"),
        ({"x.lora_A.weight": A, "x.lora_B.weight": np.full_like(B, np.inf)}, "NaN/Inf"),
    ]
    for i, (tensors, msg) in enumerate(cases):
        d = tmp_path / f"bad{i}"
        make_adapter(d, tensors=tensors)
        with pytest.raises(AdapterError, match=msg):
            deltacodec.encode(str(d), out=str(tmp_path / f"bad{i}.sld"))
    d = tmp_path / "rank"
    make_adapter(d, tensors={"x.lora_A.weight": A, "x.lora_B.weight": B}, config={"r": 8})
    with pytest.raises(AdapterError, match="config says rank 8"):
        deltacodec.encode(str(d), out=str(tmp_path / "rank.sld"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="no adapter_model"):
        deltacodec.encode(str(tmp_path / "empty"), out=str(tmp_path / "e.sld"))
    with pytest.raises(AdapterError, match="no such file"):
        deltacodec.encode(str(tmp_path / "missing"), out=str(tmp_path / "m.sld"))


def test_empty_adapter_is_an_error(tmp_path):
    from safetensors.numpy import save_file as sf

    d = tmp_path / "e"
    d.mkdir()
    sf({}, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text("{}")
    with pytest.raises(AdapterError, match="no tensors"):
        deltacodec.encode(str(d), out=str(tmp_path / "e.sld"))


def test_failed_encode_leaves_no_file_behind(tmp_path):
    d = tmp_path / "a"
    t = make_adapter(d)
    t[next(iter(t))][0, 0] = np.nan
    make_adapter(d, tensors=t)
    with pytest.raises(AdapterError):
        deltacodec.encode(str(d), out=str(tmp_path / "a.sld"))
    assert sorted(os.listdir(tmp_path)) == ["a"]


def test_written_files_get_the_permissions_of_a_plain_open(tmp_path):
    # The temp file behind the atomic rename is created 0600; a shared .sld must not stay so.
    make_adapter(tmp_path / "a")
    old = os.umask(0o022)
    try:
        out = deltacodec.encode(str(tmp_path / "a"), out=str(tmp_path / "a.sld"))
        written = deltacodec.decode(out, str(tmp_path / "dec"))
    finally:
        os.umask(old)
    for p in [out, *written]:
        assert os.stat(p).st_mode & 0o777 == 0o644, p


def test_extras_are_kept_losslessly_in_their_dtype(tmp_path):
    d = tmp_path / "a"
    base = make_adapter(d)
    tt = {k: torch.from_numpy(v) for k, v in base.items()}
    tt["base_model.model.layers.0.q_proj.lora_magnitude_vector"] = torch.randn(32, dtype=torch.bfloat16)
    tt["base_model.model.score.weight"] = torch.randn(3, 5, dtype=torch.float16)
    tt["base_model.model.layers.0.q_proj.lora_B.bias"] = torch.randn(32, dtype=torch.float64)
    from safetensors.torch import save_file as tsave

    tsave(tt, str(d / "adapter_model.safetensors"))
    out = deltacodec.encode(str(d), bits=2, out=str(tmp_path / "a.sld"))
    dec = deltacodec.decode(out, str(tmp_path / "dec"))
    got = load_file(str(tmp_path / "dec" / "adapter_model.safetensors"))
    for k in ("base_model.model.layers.0.q_proj.lora_magnitude_vector", "base_model.model.score.weight",
              "base_model.model.layers.0.q_proj.lora_B.bias"):
        assert got[k].dtype == tt[k].dtype
        assert torch.equal(got[k], tt[k])
    assert len(dec) == 2


def test_decode_writes_peft_layout_that_re_encodes_identically(tmp_path):
    d = tmp_path / "a"
    make_adapter(d, config={"peft_type": "SINLORA", "freq": 120.0})
    first = deltacodec.encode(str(d), bits=16, out=str(tmp_path / "a.sld"))
    deltacodec.decode(first, str(tmp_path / "dec"))
    cfg = json.loads((tmp_path / "dec" / "adapter_config.json").read_text())
    assert cfg["deltacodec"] == {"omega": 120.0, "gamma": "sqrt-in"}
    # float16 values survive fp32 decode and a second 16-bit encode unchanged
    second = deltacodec.encode(str(tmp_path / "dec"), bits=16, out=str(tmp_path / "b.sld"))
    f1, f2 = SldFile(first), SldFile(second)
    assert f1.modules == f2.modules  # names, scale, ω, γ, every section's length and CRC
    assert open(first, "rb").read()[f1.data_offset:] == open(second, "rb").read()[f2.data_offset:]


def test_decode_to_single_safetensors_carries_the_config(tmp_path):
    d = tmp_path / "a"
    make_adapter(d, config={"peft_type": "SINLORA", "freq": 120.0})
    out = deltacodec.encode(str(d), bits=4, out=str(tmp_path / "a.sld"))
    (p,) = deltacodec.decode(out, str(tmp_path / "x.safetensors"), dtype="bf16")
    from safetensors import safe_open

    with safe_open(p, framework="pt") as fh:
        cfg = json.loads(fh.metadata()["adapter_config"])
        assert all(fh.get_tensor(k).dtype == torch.bfloat16 for k in fh.keys())
    assert cfg["deltacodec"]["omega"] == 120.0
    # and the single file encodes again, taking ω from its metadata
    f = deltacodec.load(deltacodec.encode(p, bits=8, out=str(tmp_path / "y.sld")))
    assert all(m.sine and m.omega == 120.0 for m in f.modules)


def test_torch_bin_adapters_load_weights_only(tmp_path):
    d = tmp_path / "a"
    tensors = make_adapter(d, fmt="bin", config={"peft_type": "SINLORA", "freq": 80.0})
    f = deltacodec.load(deltacodec.encode(str(d), bits=16, out=str(tmp_path / "a.sld")))
    assert {m.A.name for m in f.modules} | {m.B.name for m in f.modules} == set(tensors)
    # a pickle that is not a plain state dict is refused, not executed
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    with open(d / "adapter_model.bin", "wb") as fh:
        pickle.dump({"x": Evil()}, fh)
    with pytest.raises(AdapterError, match="weights-only"):
        deltacodec.encode(str(d), out=str(tmp_path / "b.sld"))
    assert not (tmp_path / "pwned").exists()


def test_encode_is_deterministic(tmp_path):
    d = tmp_path / "a"
    make_adapter(d, config={"peft_type": "SINLORA", "freq": 120.0})
    for bits in (1, 3, 8):  # force: x.sld and y.sld are replaced on each round
        a = deltacodec.encode(str(d), bits=bits, out=str(tmp_path / "x.sld"), force=True)
        b = deltacodec.encode(str(d), bits=bits, out=str(tmp_path / "y.sld"), force=True)
        assert open(a, "rb").read() == open(b, "rb").read()


def test_set_valued_config_keys_do_not_change_the_bytes_and_local_paths_are_not_shipped(tmp_path):
    # PEFT writes target_modules from a set: its order changes with the hash seed.
    outs = []
    for i, order in enumerate((["q_proj", "down_proj", "k_proj"], ["k_proj", "q_proj", "down_proj"])):
        d = tmp_path / f"a{i}"
        make_adapter(d, config={"target_modules": order, "base_model_name_or_path": "/home/alice/models/llama-3/"})
        outs.append(open(deltacodec.encode(str(d), bits=3, out=str(tmp_path / f"{i}.sld")), "rb").read())
    assert outs[0] == outs[1]
    f = deltacodec.load(str(tmp_path / "0.sld"))
    assert f.metadata["base_model"] == "llama-3" and "alice" not in json.dumps(f.metadata)
    assert f.metadata["adapter_config"]["target_modules"] == ["down_proj", "k_proj", "q_proj"]


def test_default_output_paths(tmp_path):
    d = tmp_path / "adapter"
    make_adapter(d)
    out = deltacodec.encode(str(d) + "/", bits=2)
    assert out == str(tmp_path / "adapter.sld") and os.path.exists(out)
    (p, c) = deltacodec.decode(out)
    assert os.path.dirname(p) == str(tmp_path / "adapter-decoded")


def test_uniform_quantizer_uses_evenly_spaced_levels(tmp_path):
    d = tmp_path / "a"
    tensors = make_adapter(d)
    f = deltacodec.load(deltacodec.encode(str(d), bits=3, quantizer="uniform", out=str(tmp_path / "a.sld")))
    m = f.modules[0]
    x = tensors[m.A.name]
    cb = m.A.codebook.astype(np.float64)
    levels = np.linspace(x.min(), x.max(), 8)
    # stored to float16 relative to the largest level: half an ulp at 1.0 is 2**-11
    assert np.all(np.abs(cb - levels) <= 2.0**-11 * np.abs(levels).max() * 1.0001)
    A, _ = f.dequantize(m.name)
    idx = np.abs(x.reshape(-1, 1) - cb.reshape(1, -1)).argmin(axis=1)
    np.testing.assert_allclose(A.reshape(-1), cb[idx], rtol=0, atol=0)


def test_bad_options_are_encode_errors(tmp_path):
    d = tmp_path / "a"
    make_adapter(d)
    for kw, msg in (({"bits": 0}, "bits"), ({"bits": 9}, "bits"), ({"bits": 3, "quantizer": "x"}, "quantizer"),
                    ({"bits": 3, "level": 23}, "level")):
        with pytest.raises(EncodeError, match=msg):
            deltacodec.encode(str(d), out=str(tmp_path / "a.sld"), **kw)


def test_import_deltacodec_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, deltacodec; assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


# ----------------------------------------------------------------------------------------------
# decode: streamed, torch-free, byte-identical to the torch path, no metadata needed

import struct
import zlib

import msgpack
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from deltacodec import DecodeError, DeltacodecWarning
from deltacodec.codec import float32_to_bfloat16_bits
from deltacodec.safetensors_io import TensorSpec, write_safetensors

_TORCH = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _spec_of(t: torch.Tensor) -> TensorSpec:
    dt = {v: k for k, v in _TORCH.items()}[t.dtype]
    arr = t.view(torch.int16).numpy().view("<u2") if t.dtype == torch.bfloat16 else t.numpy()
    return TensorSpec(dt, tuple(t.shape), lambda: [arr])


@given(
    tensors=st.dictionaries(
        st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=12).filter(
            lambda s: s != "__metadata__"),
        st.tuples(st.sampled_from(list(_TORCH)), st.lists(st.integers(0, 4), max_size=3), st.integers(0, 2**32 - 1)),
        min_size=1, max_size=5,
    )
)
def test_streaming_safetensors_writer_is_byte_identical_to_safetensors_save(tensors):
    import io

    from safetensors.torch import save

    made = {}
    for name, (dt, shape, seed) in tensors.items():
        g = torch.Generator().manual_seed(seed)
        made[name] = (torch.randn(shape, generator=g, dtype=torch.float64) * 100).to(_TORCH[dt])
    buf = io.BytesIO()
    write_safetensors(buf, {k: _spec_of(v) for k, v in made.items()}, {"format": "pt"})
    # one metadata key: safetensors writes its metadata from a hash map, in no fixed order
    assert buf.getvalue() == save(made, metadata={"format": "pt"})


def _torch_path_reference(f, dtype):
    """What decode wrote before it streamed: every tensor in torch, saved by safetensors."""
    tdt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    tensors = {}
    for m in f.modules:
        for e in (m.A, m.B):
            tensors[e.name] = torch.from_numpy(np.asarray(f.tensor(e), dtype=np.float32)).to(tdt)
    for e in f.tensors:
        t = torch.from_numpy(np.ascontiguousarray(f.tensor(e)))
        tensors[e.name] = t.to(torch.bfloat16) if e.dtype == "BF16" else t
    return tensors


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("bits", [2, 16])
def test_decode_is_byte_identical_to_the_torch_path_and_loads_with_safetensors(tmp_path, dtype, bits):
    from safetensors import safe_open
    from safetensors.torch import save

    d = tmp_path / "a"
    base = make_adapter(d, config={"peft_type": "SINLORA", "freq": 120.0})
    tt = {k: torch.from_numpy(v) for k, v in base.items()}
    tt["base_model.model.layers.0.q_proj.lora_magnitude_vector"] = torch.randn(32, dtype=torch.bfloat16)
    tt["base_model.model.score.weight"] = torch.randn(3, 5, dtype=torch.float16)
    tt["base_model.model.layers.0.q_proj.lora_B.bias"] = torch.randn(32, dtype=torch.float64)
    from safetensors.torch import save_file as tsave

    tsave(tt, str(d / "adapter_model.safetensors"))
    f = deltacodec.load(deltacodec.encode(str(d), bits=bits, out=str(tmp_path / "a.sld")))
    (w, c) = deltacodec.decode(f, str(tmp_path / "dec"), dtype=dtype)
    ref = _torch_path_reference(f, dtype)
    assert open(w, "rb").read() == save(ref, metadata={"format": "pt"})
    with safe_open(w, framework="pt") as fh:
        assert set(fh.keys()) == set(ref) and all(torch.equal(fh.get_tensor(k), ref[k]) for k in ref)
    (p,) = deltacodec.decode(f, str(tmp_path / "one.safetensors"), dtype=dtype)
    got = load_file(p)
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) and got[k].dtype == ref[k].dtype for k in ref)


def _float32_cases() -> np.ndarray:
    """Every kind of float32 a rounding can get wrong: halfway cases (ties to even, both
    parities), just above and below them, subnormals of both formats, values at and past each
    format's largest finite value, zeros of both signs, and random bit patterns."""
    rng = np.random.default_rng(0)
    bits = [rng.integers(0, 0x7F800000, 20000, dtype=np.uint32)]
    for hi in rng.integers(0, 0x7F80, 2000, dtype=np.uint32):
        base = hi << np.uint32(16)
        bits.append(np.array([base | 0x8000, base | 0x7FFF, base | 0x8001, base, base | 0xFFFF], np.uint32))
    x = np.concatenate(bits).view(np.float32)
    specials = np.array([0.0, -0.0, 65504, 65519.996, 65520, 1e-8, 6e-8, 3e-8, 2**-24, 2**-25, 1.4e-45, 1e-40,
                         3.3895313e38, 3.3961776e38, 3.4028235e38, np.inf, -np.inf, np.nan], np.float32)
    x = np.concatenate([x, specials])
    return np.concatenate([x, -x])


def test_bf16_and_fp16_rounding_match_torch_bit_for_bit():
    x = _float32_cases()
    # NaN: which NaN pattern torch writes differs between its scalar and vector paths; decode never
    # sees one (the reader rejects non-finite values), so a NaN need only stay a NaN.
    nan = np.isnan(x)
    want_bf16 = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    got_bf16 = float32_to_bfloat16_bits(x)
    np.testing.assert_array_equal(got_bf16[~nan], want_bf16[~nan])
    assert ((got_bf16[nan] & 0x7F80) == 0x7F80).all() and (got_bf16[nan] & 0x7F).all()
    want_f16 = torch.from_numpy(x).to(torch.float16).view(torch.int16).numpy().view(np.uint16)
    with np.errstate(over="ignore"):
        got_f16 = x.astype(np.float16).view(np.uint16)
    np.testing.assert_array_equal(got_f16[~nan], want_f16[~nan])
    assert np.isnan(got_f16.view(np.float16)[nan]).all()


def _one_value_file(tmp_path, value_bits: int) -> str:
    """A file whose lora_A holds one large float32 value (codebook [1, ...] × scale = value)."""
    import sldtools

    scale = float(np.uint32(value_bits).view(np.float32))
    m = sldtools.lora_module(name="big", out_f=2, in_f=2, rank=1)
    cb = sldtools.f16_codebook([1.0, 0.5])
    m["A"], sa = sldtools.codebook_tensor((1, 2), 1, 1, [0, 1], cb, scale)
    m["B"], sb = sldtools.codebook_tensor((2, 1), 1, 1, [0, 1], cb, 1.0)
    p = tmp_path / f"v{value_bits:x}.sld"
    p.write_bytes(sldtools.assemble([m], [], [sa, sb]))
    return str(p)


F16_OK = [np.float32(65504).view(np.uint32), np.float32(65519.996).view(np.uint32)]
F16_OVER = [np.float32(65520).view(np.uint32), np.float32(1e5).view(np.uint32)]
BF16_OK = [0x7F7F7FFF, 0x7F7F0000]  # rounds down to bf16's largest finite value
BF16_OVER = [0x7F7F8000, 0x7F7FFFFF]  # the tie rounds to even = up, to inf


@pytest.mark.parametrize("dtype,bits,ok", [("F16", int(v), True) for v in F16_OK] + [("F16", int(v), False) for v in F16_OVER]
                         + [("BF16", v, True) for v in BF16_OK] + [("BF16", v, False) for v in BF16_OVER])
def test_conversion_to_a_narrower_dtype_refuses_overflow_at_the_boundary(dtype, bits, ok):
    # Unit level: a factor beyond bf16's range cannot reach decode from a valid file (the reader
    # refuses factors whose ΔW bound exceeds 2^127), so bf16's boundary is checked here.
    from deltacodec.codec import _to_dtype

    x = np.array([1.0, np.uint32(bits).view(np.float32)], dtype=np.float32)
    if ok:
        assert (_to_dtype(x, dtype, "t") == _to_dtype(x[::-1], dtype, "t")[::-1]).all()
    else:
        with pytest.raises(DecodeError, match="overflows"):
            _to_dtype(x, dtype, "t")


@pytest.mark.parametrize("dtype,value_bits,ok", [("fp16", int(v), True) for v in F16_OK]
                         + [("fp16", int(v), False) for v in F16_OVER])
def test_decode_refuses_a_value_that_overflows_the_requested_dtype(tmp_path, dtype, value_bits, ok):
    path = _one_value_file(tmp_path, value_bits)
    value = float(np.uint32(value_bits).view(np.float32))
    out = str(tmp_path / "dec")
    if ok:
        deltacodec.decode(path, out, dtype=dtype)
        got = load_file(os.path.join(out, "adapter_model.safetensors"))["big.lora_A.weight"].float()
        assert torch.isfinite(got).all()
    else:
        with pytest.raises(DecodeError) as exc:
            deltacodec.decode(path, out, dtype=dtype)
        msg = str(exc.value)
        assert "big.lora_A.weight" in msg and f"{value:g}" in msg and dtype in msg and path in msg
        assert not os.path.exists(out) and [n for n in os.listdir(tmp_path) if n.startswith(".sld")] == []
    deltacodec.decode(path, str(tmp_path / "f32"), dtype="fp32")  # fp32 holds every stored value


def _with_metadata(data: bytes, metadata) -> bytes:
    """The same file with its header's metadata replaced (sections untouched)."""
    hlen = struct.unpack("<I", data[12:16])[0]
    header = msgpack.unpackb(zstandard.ZstdDecompressor().decompress(data[20:20 + hlen]), raw=False)
    if metadata is None:
        header["metadata"] = {}
    else:
        header["metadata"] = metadata
    raw = zstandard.ZstdCompressor(level=3).compress(msgpack.packb(header, use_bin_type=True))
    return data[:8] + struct.pack("<III", 1, len(raw), zlib.crc32(raw)) + raw + data[20 + hlen:]


BAD_METADATA = {
    "none": ({}, False),
    "list config": ({"adapter_config": [1, 2]}, True),
    "string config": ({"adapter_config": "r=4"}, True),
    "bytes in config": ({"adapter_config": {"r": b"\x04", "lora_alpha": 8}}, True),
    "nan alpha": ({"adapter_config": {"r": 4, "lora_alpha": float("nan")}}, True),
    "wrong rank": ({"adapter_config": {"r": 99, "lora_alpha": 8}}, True),
    "wrong alpha": ({"adapter_config": {"lora_alpha": 1e6}}, True),
    "bool rank": ({"adapter_config": {"r": True}}, True),
    "says sine": ({"adapter_config": {"peft_type": "SINLORA", "freq": 3.0}}, True),
    "bytes base model": ({"base_model": b"\xff", "encoder": 7, "method": None}, False),
    "deep, no alpha": ({"adapter_config": {"x": [[[[[[[[[[[]]]]]]]]]]]}}, True),
}


@pytest.mark.parametrize("sine", [False, True])
@pytest.mark.parametrize("case", list(BAD_METADATA))
def test_decode_needs_no_metadata_and_rebuilds_an_unusable_config(tmp_path, case, sine):
    # modules of different ranks and scales, so the rebuilt config needs rank/alpha patterns
    rng = np.random.default_rng(2)
    mods = [AdapterModule(f"base_model.model.layers.{i}.mlp.up_proj", A=rng.normal(size=(r, 16)).astype(np.float32),
                          B=rng.normal(size=(24, r)).astype(np.float32), scale=s,
                          sine=sine, omega=30.0 if sine else None, gamma=4.0 if sine else None)
            for i, (r, s) in enumerate([(4, 2.0), (4, 2.0), (8, 0.5), (2, 2.0)])]
    a = Adapter(modules=mods, config={"peft_type": "LORA"})
    path = deltacodec.encode(a, bits=16, out=str(tmp_path / "a.sld"), container=1)  # _with_metadata edits a v1 header
    metadata, warns = BAD_METADATA[case]
    data = _with_metadata(open(path, "rb").read(), metadata)
    (tmp_path / "b.sld").write_bytes(data)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        deltacodec.decode(str(tmp_path / "b.sld"), str(tmp_path / "dec"))
    ours = [w for w in rec if issubclass(w.category, DeltacodecWarning)]
    assert bool(ours) == warns, [str(w.message) for w in ours]
    if warns:
        assert "adapter_config" in str(ours[0].message) and "b.sld" in str(ours[0].message)
    # the decoded directory re-encodes to the same modules: rank, scale, kind, ω, γ
    f = deltacodec.load(deltacodec.encode(str(tmp_path / "dec"), bits=16, out=str(tmp_path / "c.sld")))
    orig = deltacodec.load(path)
    for m0, m1 in zip(orig.modules, f.modules):
        assert (m0.name, m0.rank, m0.sine, m0.omega, m0.gamma) == (m1.name, m1.rank, m1.sine, m1.omega, m1.gamma)
        assert m1.scale == pytest.approx(m0.scale, rel=1e-12)
        np.testing.assert_array_equal(orig.tensor(m0.A), f.tensor(m1.A))


@pytest.mark.parametrize("opts", [dict(bits=16, container=1, level=0), dict(bits=16, container=2),
                                  dict(bits=3, quantizer="ecsq")], ids=["v1-f16", "v2-fields", "v2-ecsq"])
def test_decode_keeps_peak_memory_near_the_largest_tensor(tmp_path, opts):
    """Tensor by tensor, in both container versions: a section, its payload or symbols, the
    values, never the file."""
    import tracemalloc

    rng = np.random.default_rng(5)
    n_in = 1 << 16  # A: 16 x 65536 float32 = 4 MiB decoded; 8 modules = 32 MiB in all
    # A exactly float16, so bits=16 keeps 2-byte fields in container 2 as in container 1
    mods = [AdapterModule(f"m{i}", A=rng.normal(size=(16, n_in)).astype(np.float16).astype(np.float32),
                          B=rng.normal(size=(8, 16)).astype(np.float32), scale=1.0) for i in range(8)]
    path = deltacodec.encode(Adapter(modules=mods), out=str(tmp_path / "big.sld"), **opts)
    f = deltacodec.load(path)
    largest, total = 16 * n_in * 4, sum(e.numel for e in f.entries()) * 4
    tracemalloc.start()
    try:
        deltacodec.decode(f, str(tmp_path / "dec"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # One tensor in flight: its 2-byte stored payload, the float32 values, and the byte view
    # written out; everything at once (the old path) would be `total` and more.
    assert peak < 2.5 * largest < total / 3, (peak, largest, total)


def test_decode_does_not_import_torch(tmp_path):
    import subprocess
    import sys

    make_adapter(tmp_path / "a")
    out = deltacodec.encode(str(tmp_path / "a"), bits=3, out=str(tmp_path / "a.sld"))
    code = ("import sys, deltacodec; deltacodec.decode(sys.argv[1], sys.argv[2], dtype='bf16'); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    res = subprocess.run([sys.executable, "-c", code, out, str(tmp_path / "dec")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_decode_reports_progress_per_tensor(tmp_path):
    make_adapter(tmp_path / "a")
    out = deltacodec.encode(str(tmp_path / "a"), bits=3, out=str(tmp_path / "a.sld"))
    calls = []
    deltacodec.decode(out, str(tmp_path / "dec"), progress=lambda i, n, name: calls.append((i, n, name)))
    assert [c[0] for c in calls] == list(range(5)) and all(c[1] == 4 for c in calls) and calls[-1][2] == ""
