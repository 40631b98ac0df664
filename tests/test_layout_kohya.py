"""kohya-ss / A1111 LoRA files: per-module alpha, key-for-key and metadata-for-metadata round
trips, conv LoRA (kept as it is in a version-1 container; with weight_shape where the container
records kernels), and every malformed file a clear AdapterError naming the key. numpy only."""

from __future__ import annotations

import math
import os
import re
import types
import warnings

import numpy as np
import pytest

import deltacodec
from deltacodec.errors import AdapterError, DeltacodecWarning
from deltacodec.layouts import kohya
from deltacodec.cli_inspect import inspect_summary
from deltacodec.safetensors_io import TensorSpec

from layout_files import KOHYA_META, kohya_file, kohya_module, read_st, write_st

ATTN = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def quiet_read(path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeltacodecWarning)
        return deltacodec.read_adapter(path, **kw)


def as_f64(v) -> np.ndarray:
    return np.asarray(v, np.float64)


def test_kohya_modules_take_scale_alpha_over_r_per_module(tmp_path, rng):
    t = kohya_file(str(tmp_path / "k.safetensors"), rng)
    a = quiet_read(str(tmp_path / "k.safetensors"))
    assert a.layout == "kohya" and sorted(m.name for m in a.modules) == sorted({k.split(".")[0] for k in t})
    for m in a.modules:
        down, up, alpha = (as_f64(t[f"{m.name}.{p}"]) for p in ("lora_down.weight", "lora_up.weight", "alpha"))
        r = down.shape[0]
        assert m.scale == float(alpha) / r and m.weight_shape is None and not m.sine
        # the reference: ΔW = alpha/r · up @ down, from the file's float16 values (exact in float32)
        np.testing.assert_array_equal(m.delta(), float(alpha) / r * (up @ down))
    assert a.layout_info["metadata"] == KOHYA_META and a.layout_info["alpha_dtype"] == "F16"


@pytest.mark.parametrize("bits", [3, 16])
@pytest.mark.parametrize("out_kind", ["dir", "file"])
def test_kohya_round_trip_is_key_for_key_and_metadata_for_metadata(tmp_path, rng, bits, out_kind):
    src = str(tmp_path / "my_style.safetensors")
    t = kohya_file(src, rng)
    sld = deltacodec.encode(src, bits=bits, out=str(tmp_path / "k.sld"))
    f = deltacodec.load(sld)
    assert f.metadata["layout"] == "kohya"
    out = str(tmp_path / ("dec" if out_kind == "dir" else "x.safetensors"))
    paths = deltacodec.decode(sld, out)
    assert paths == [os.path.join(out, "my_style.safetensors") if out_kind == "dir" else out]
    got, meta = read_st(paths[0])
    assert meta == KOHYA_META
    assert sorted(got) == sorted(t)
    for k, v in t.items():
        values, dtype = got[k]
        assert values.shape == v.shape, k
        if k.endswith(".alpha"):  # alpha = scale·r comes back exactly, in its own dtype and shape
            assert dtype == "F16" and values.tobytes() == v.tobytes(), k
        elif bits == 16:  # float16 factors pass through exactly
            np.testing.assert_array_equal(values, v.astype(np.float32))
        else:
            stem, ab = k.split(".")[0], ("A" if k.endswith(".lora_down.weight") else "B")
            want = f.dequantize(stem)[0 if ab == "A" else 1]
            np.testing.assert_array_equal(values.reshape(want.shape), want)


@pytest.mark.parametrize(
    "dtype,shape",
    [(np.float32, (1,)), (np.float64, ()), ("BF16", ()), (np.float16, (1,))],
    ids=["f32-[1]", "f64-0d", "bf16-0d", "f16-[1]"],
)
def test_alpha_dtype_and_shape_come_back_per_module(tmp_path, rng, dtype, shape):
    t = kohya_file(str(tmp_path / "base.safetensors"), rng)  # F16 0-d alphas for the others
    key = f"{ATTN}.alpha"
    alpha = np.full(shape, 3.0, np.float32)
    t[key] = (alpha, "BF16") if dtype == "BF16" else alpha.astype(dtype)
    src = write_st(str(tmp_path / "k.safetensors"), t, KOHYA_META)
    a = quiet_read(src)
    assert {m.name: m.scale for m in a.modules}[ATTN] == 3.0 / 4
    deltacodec.decode(deltacodec.encode(src, bits=8, out=str(tmp_path / "k.sld")), str(tmp_path / "dec"))
    got, _ = read_st(str(tmp_path / "dec" / "k.safetensors"))
    want = "BF16" if dtype == "BF16" else {np.float32: "F32", np.float64: "F64", np.float16: "F16"}[dtype]
    assert got[key][1] == want and got[key][0].shape == shape and float(got[key][0].reshape(-1)[0]) == 3.0
    assert got["lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha"][1] == "F16"


def test_awkward_alpha_values_survive_scale_times_rank(tmp_path, rng):
    # alpha/r then ·r in float64 is within 2 ulps of alpha, which rounding to the alpha's own
    # dtype removes: every float16 value a trainer might write comes back bit for bit.
    t = {}
    alphas = np.array([0.1, 1 / 3, 7.7, 65504.0, 6.1e-5, 0.999], np.float16)
    for i, (al, r) in enumerate(zip(alphas, (3, 7, 5, 6, 1, 9))):
        t.update(kohya_module(f"lora_unet_m{i}", 4, 4, r, float(al), rng))
    src = write_st(str(tmp_path / "k.safetensors"), t)
    deltacodec.decode(deltacodec.encode(src, bits=16, out=str(tmp_path / "k.sld")), str(tmp_path / "dec"))
    got, _ = read_st(str(tmp_path / "dec" / "k.safetensors"))
    for i, al in enumerate(alphas):
        assert got[f"lora_unet_m{i}.alpha"][0].tobytes() == np.float16(al).tobytes()


@pytest.mark.parametrize("kernel", [(3, 3), (1, 1)])
def test_conv_modules_are_quantized_in_a_version_2_file_and_decode_to_their_kernel_shapes(tmp_path, rng, kernel):
    t = kohya_file(str(tmp_path / "base.safetensors"), rng)
    stem = "lora_unet_down_blocks_0_resnets_0_conv1"
    conv = kohya_module(stem, 8, 4, 2, 1.0, rng, kernel=kernel)
    src = write_st(str(tmp_path / "k.safetensors"), {**t, **conv}, KOHYA_META)
    assert kohya.container_records_kernels()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeltacodecWarning)
        sld = deltacodec.encode(src, bits=8, out=str(tmp_path / "k.sld"))  # k-means: version 2 for the kernels
    f = deltacodec.load(sld)
    assert f.version == 2 and not f.tensors
    (m,) = [m for m in f.modules if m.name == stem]
    assert m.weight_shape == (8, 4, *kernel) and (m.in_features, m.rank) == (4 * math.prod(kernel), 2)
    assert all(e.weight_shape is None for e in f.modules if e.name != stem)
    shown = {m["name"]: m["weight_shape"] for m in inspect_summary(sld)["modules"]}  # sld inspect --json
    assert shown[stem] == [8, 4, *kernel] and sum(v is not None for v in shown.values()) == 1
    # the quantized factors are the source ones to 8-bit k-means precision, in the kernel's layout
    A, B = f.dequantize(stem)
    down, up = as_f64(conv[f"{stem}.lora_down.weight"]), as_f64(conv[f"{stem}.lora_up.weight"])
    assert np.abs(A - down.reshape(2, -1)).max() <= 0.02 * np.abs(down).max()
    assert np.abs(B - up.reshape(8, 2)).max() <= 0.02 * np.abs(up).max()
    deltacodec.decode(sld, str(tmp_path / "dec"))
    got, meta = read_st(str(tmp_path / "dec" / "k.safetensors"))
    assert meta == KOHYA_META
    for k, v in conv.items():  # the same keys and shapes (factors in decode's fp32); alpha exact, in its dtype
        assert got[k][0].shape == v.shape, k
    assert got[f"{stem}.alpha"][0].tobytes() == conv[f"{stem}.alpha"].tobytes()
    assert np.array_equal(got[f"{stem}.lora_down.weight"][0].reshape(2, -1), A)
    # version 1 cannot record kernel shapes: asked for, it is refused, naming the input and module
    with pytest.raises(deltacodec.EncodeError, match=f"k.safetensors.*{stem}.*container version 1"):
        deltacodec.encode(src, bits=8, out=str(tmp_path / "k1.sld"), container=1)
    assert not os.path.exists(tmp_path / "k1.sld")


@pytest.mark.parametrize("kernel", [(3, 3), (1, 1), (3, 1)])
def test_conv_modules_with_a_kernel_recording_container_are_modules_with_weight_shape(tmp_path, rng, monkeypatch, kernel):
    monkeypatch.setattr(kohya, "container_records_kernels", lambda: True)
    out_c, in_c, r = 8, 4, 2
    t = kohya_module("lora_unet_down_blocks_0_resnets_0_conv1", out_c, in_c, r, 3.0, rng, kernel=kernel)
    a = quiet_read(write_st(str(tmp_path / "k.safetensors"), t))
    (m,) = a.modules
    assert m.weight_shape == (out_c, in_c, *kernel)
    assert m.A.shape == (r, in_c * math.prod(kernel)) and m.B.shape == (out_c, r)
    # the reference: ΔW[o, i, y, x] = alpha/r · Σ_k up[o, k, 0, 0] · down[k, i, y, x]
    up, down = as_f64(t["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"]), as_f64(
        t["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"])
    ref = 3.0 / r * np.einsum("ok,kiyx->oiyx", up[:, :, 0, 0], down)
    np.testing.assert_allclose(m.delta().reshape(m.weight_shape), ref, rtol=1e-12, atol=0)

    # written back: the writer reshapes the 2-D factors to the kernel shapes again
    entry = types.SimpleNamespace(name=m.name, rank=r, out_features=out_c, in_features=m.in_features, scale=m.scale,
                                  sine=False, omega=None, gamma=None, weight_shape=m.weight_shape,
                                  A=types.SimpleNamespace(name=f"{m.name}.lora_A.weight"),
                                  B=types.SimpleNamespace(name=f"{m.name}.lora_B.weight"))
    f = types.SimpleNamespace(path="x.sld", modules=[entry], tensors=[], metadata={})
    specs = {entry.A.name: TensorSpec("F32", m.A.shape, lambda: [m.A]), entry.B.name: TensorSpec("F32", m.B.shape, lambda: [m.B])}
    kohya.write(str(tmp_path / "out.safetensors"), f, specs, a.layout_info, force=False, inputs=[], progress=None)
    got, _ = read_st(str(tmp_path / "out.safetensors"))
    for k, v in t.items():
        assert got[k][0].shape == v.shape and np.array_equal(got[k][0].astype(np.float32), v.astype(np.float32)), k


def test_a_sine_adapter_keeps_omega_and_gamma_through_the_kohya_layout(tmp_path, rng):
    src = str(tmp_path / "k.safetensors")
    kohya_file(src, rng)
    sld = deltacodec.encode(src, bits=8, out=str(tmp_path / "k.sld"), omega=200.0, gamma="2*sqrt-in")
    f = deltacodec.load(sld)
    assert all(m.sine and m.omega == 200.0 and m.gamma == 2 * math.sqrt(m.in_features) for m in f.modules)
    deltacodec.decode(sld, str(tmp_path / "dec"))
    got, meta = read_st(str(tmp_path / "dec" / "k.safetensors"))
    assert meta == {**KOHYA_META, "deltacodec": '{"gamma": "2.0*sqrt-in", "omega": 200.0}'}
    again = quiet_read(str(tmp_path / "dec" / "k.safetensors"))
    assert {(m.name, m.omega, m.gamma) for m in again.modules} == {(m.name, m.omega, m.gamma) for m in f.modules}


# ----------------------------------------------------------------------------------------------
# Bad inputs: each an AdapterError on one line naming the file and the key; no output written


def _refused(tmp_path, tensors, match, names=(), **kw):
    src = write_st(str(tmp_path / "bad.safetensors"), tensors, KOHYA_META)
    out = str(tmp_path / "bad.sld")
    with pytest.raises(AdapterError) as info:
        deltacodec.encode(src, bits=3, out=out, **kw)
    msg = str(info.value)
    assert "\n" not in msg and src in msg, msg
    assert re.search(match, msg), msg
    for n in names:
        assert n in msg, (n, msg)
    assert not os.path.exists(out)


def _good(rng, stem=ATTN, **kw):
    return kohya_module(stem, 16, 16, 4, 2.0, rng, **kw)


def test_a_module_without_alpha_is_refused_naming_the_key_unless_alpha_is_given(tmp_path, rng):
    t = _good(rng)
    del t[f"{ATTN}.alpha"]
    _refused(tmp_path, t, r"no '.*\.alpha'.*--alpha", names=(f"{ATTN}.alpha",))
    a = quiet_read(write_st(str(tmp_path / "ok.safetensors"), t), alpha=8.0)
    assert a.modules[0].scale == 8.0 / 4


@pytest.mark.parametrize(
    "down,up,why",
    [
        ((4, 16), (16, 3), "same r"),  # ranks disagree
        ((4, 16), (16, 4, 1, 1), "same r|expected"),  # linear down, conv up
        ((4, 16, 3, 3), (16, 4, 3, 3), "out×r×1×1"),  # conv up with a kernel
        ((4, 16, 3), (16, 4), "expected down"),  # 3-D
        ((4,), (16, 4), "expected down"),
    ],
    ids=["rank", "linear-down-conv-up", "up-kernel", "3d-down", "1d-down"],
)
def test_mismatched_up_and_down_shapes_are_refused_naming_both_keys(tmp_path, rng, down, up, why):
    t = {f"{ATTN}.lora_down.weight": np.ones(down, np.float16), f"{ATTN}.lora_up.weight": np.ones(up, np.float16),
         f"{ATTN}.alpha": np.array(1.0, np.float16)}
    _refused(tmp_path, t, why, names=(f"{ATTN}.lora_down.weight", f"{ATTN}.lora_up.weight"))


@pytest.mark.parametrize(
    "extra,match,name",
    [
        ({"lora_foo_down_blocks_0_to_q.lora_down.weight": np.ones((4, 16), np.float16)}, "unknown kohya-ss prefix.*lora_unet_",
         "lora_foo_down_blocks_0_to_q.lora_down.weight"),
        ({"lora_unet_x.hada_w1_a": np.ones((4, 16), np.float16)}, "LyCORIS", "lora_unet_x.hada_w1_a"),
        ({"lora_unet_x.lora_mid.weight": np.ones((4, 4, 3, 3), np.float16)}, "LyCORIS", "lora_unet_x.lora_mid.weight"),
        ({"lora_unet_y.lora_down.weight": np.ones((4, 16), np.float16)}, "no 'lora_unet_y.lora_up.weight'", "lora_unet_y"),
        ({"lora_unet_y.lora_up.weight": np.ones((4, 16), np.float16)}, "no 'lora_unet_y.lora_down.weight'", "lora_unet_y"),
        ({f"{ATTN}.alpha": np.ones((2,), np.float16)}, "scalar", f"{ATTN}.alpha"),
        ({"text_encoder.weird.weight": np.ones(3, np.float16)}, "not a kohya-ss LoRA key", "text_encoder.weird.weight"),
        ({"lora_unet_z.alpha": np.array(1.0, np.float16)}, "has 'lora_unet_z.alpha' but no", "lora_unet_z"),
    ],
    ids=["unknown-prefix", "loha", "tucker", "no-up", "no-down", "alpha-not-scalar", "stray-key", "alpha-alone"],
)
def test_malformed_kohya_files_are_refused_naming_the_key(tmp_path, rng, extra, match, name):
    _refused(tmp_path, {**_good(rng), **extra}, match, names=(name,))


@pytest.mark.parametrize(
    "other",
    ["base_model.model.layers.0.q_proj.lora_A.weight", "unet.down_blocks.0.attn1.to_q.lora.down.weight"],
    ids=["peft-key", "diffusers-key"],
)
def test_a_file_mixing_kohya_and_other_layouts_is_refused_naming_one_key_of_each(tmp_path, rng, other):
    _refused(tmp_path, {**_good(rng), other: np.ones((4, 16), np.float16)}, "mixes LoRA layouts",
             names=(f"{ATTN}.", other))


def test_layout_override_reads_a_kohya_file_as_another_layout_or_refuses(tmp_path, rng):
    src = str(tmp_path / "k.safetensors")
    kohya_file(src, rng)
    with pytest.raises(AdapterError, match="no lora_A/lora_B pairs"):
        deltacodec.read_adapter(src, layout="peft", alpha=1.0)
    with pytest.raises(AdapterError, match="layout must be one of peft, diffusers, kohya"):
        deltacodec.read_adapter(src, layout="lycoris")
    assert quiet_read(src, layout="kohya").layout == "kohya"


def test_kohya_non_finite_values_are_refused(tmp_path, rng):
    t = _good(rng)
    t[f"{ATTN}.alpha"] = np.array(np.inf, np.float16)
    _refused(tmp_path, t, "NaN/Inf", names=(f"{ATTN}.alpha",))
