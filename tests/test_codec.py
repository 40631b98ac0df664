"""encode / decode / load end to end on adapters written by the tests themselves."""

from __future__ import annotations

import json
import math
import os

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
    rng = np.random.default_rng(1)
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
