"""Text-to-image LoRAs end to end against diffusers itself, on tiny pipelines built from configs:
Stable-Diffusion-shaped (UNet2DConditionModel + CLIPTextModel; LoRA saved as
train_dreambooth_lora.py saves it, and as a kohya-ss file) and SD3-shaped
(SD3Transformer2DModel + two CLIPTextModelWithProjection; saved as train_dreambooth_lora_sd3.py
saves it).

* the decoded file loads with `pipe.load_lora_weights` without a warning, and diffusers' LoRA
  layers then hold exactly the dequantized factors;
* at 16 bits `deltacodec.apply(pipe, f)` gives the weights `load_lora_weights(original);
  fuse_lora()` gives, within the rounding bound stated below, and the same denoising step;
* apply's guarantees across components: all-or-nothing, bit-exact remove(), one component at
  a time, the same content twice refused.

Slow: importing diffusers and transformers takes tens of seconds on a loaded CPU."""

from __future__ import annotations

import logging
import os
import warnings

import numpy as np
import pytest

pytestmark = pytest.mark.slow
torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import deltacodec  # noqa: E402
from deltacodec.errors import ApplyError  # noqa: E402

import diffusers_tiny as dt  # noqa: E402
from layout_files import read_st  # noqa: E402

U = 2.0**-24  # float32 unit roundoff


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(f"{record.name}: {record.getMessage()}")


def load_quietly(pipe, path: str) -> None:
    """pipe.load_lora_weights(path), failing on any warning (Python's or diffusers/PEFT logs)."""
    h = _Records()
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft", "transformers")]
    for lg in loggers:
        lg.addHandler(h)
    try:
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            pipe.load_lora_weights(path)
    finally:
        for lg in loggers:
            lg.removeHandler(h)
    ours = [str(w.message) for w in rec if not issubclass(w.category, FutureWarning)]
    assert ours == [] and h.records == [], (ours, h.records)


def fused(make, lora_path: str):
    """A fresh pipeline with diffusers' own load_lora_weights + fuse_lora (LoRA layers removed)."""
    pipe = make()
    pipe.load_lora_weights(lora_path)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    return pipe


def state(module) -> dict[str, "torch.Tensor"]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def delta_bound(f, comp_weight_of, scale_of=None) -> dict[str, "torch.Tensor"]:
    """Per patched weight, a bound on |apply's W' − diffusers' fused W'| elementwise.

    Both sides form W + scale·B@A in float32 from the same factors (the LoRA is built with
    float16-exact factors, so the 16-bit file holds them exactly): each float32 product B@A of
    r terms is off the exact one by at most r·u·(|B|@|A|), the scale multiply and diffusers'
    separate rounding of ΔW add u·|ΔW| each, and each side rounds W + ΔW once more (half an ulp
    of the result each). Two sides: 2·((r + 2)·u·scale·(|B|@|A|) + ulp(|W'|)/2)."""
    out = {}
    for m in f.modules:
        A, B = (torch.from_numpy(x).double() for x in f.dequantize(m.name))
        key = comp_weight_of(m.name)
        out[key] = 2 * (m.rank + 2) * U * abs(m.scale) * (B.abs() @ A.abs())
    return out


def assert_weights_match(got: dict, ref: dict, bound: dict) -> int:
    """Every tensor equal, except patched weights within bound + 1 ulp; returns how many
    patched weights differ from the unpatched model at all (so the test is not vacuous)."""
    for k, v in ref.items():
        g = got[k]
        if k in bound:
            ulp = torch.finfo(v.dtype).eps * torch.maximum(v.abs(), g.abs()).double()
            assert ((g.double() - v.double()).abs() <= bound[k] + ulp).all(), k
        else:
            assert torch.equal(g, v), k
    return len(bound)


def denoise_step(pipe, *, sd3: bool = False) -> "torch.Tensor":
    """One denoising step's model output: text encoders on fixed token ids, then the UNet /
    transformer on fixed latents (what the pipeline's loop computes per step)."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(2, 90, (1, 6), generator=g)
    with torch.no_grad():
        if not sd3:
            hidden = pipe.text_encoder(ids)[0]
            lat = torch.randn(1, 4, 8, 8, generator=g)
            return pipe.unet(lat, torch.tensor([10]), encoder_hidden_states=hidden).sample
        o1 = pipe.text_encoder(ids, output_hidden_states=True)
        o2 = pipe.text_encoder_2(ids, output_hidden_states=True)
        prompt = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1)
        pooled = torch.cat([o1.text_embeds, o2.text_embeds], dim=-1)
        lat = torch.randn(1, 4, 8, 8, generator=g)
        return pipe.transformer(hidden_states=lat, encoder_hidden_states=prompt, pooled_projections=pooled,
                                timestep=torch.tensor([10.0])).sample


def assert_outputs_close(got: "torch.Tensor", ref: "torch.Tensor") -> None:
    # The weights agree to a few float32 ulps (checked before); a two-block network of this size
    # changes its output by at most a small multiple of that, far below 1e-5 of its scale.
    assert float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


# ----------------------------------------------------------------------------------------------
# Stable Diffusion shaped


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    pipe = dt.sd_pipeline()
    dt.add_lora(pipe.unet, dt.UNET_TARGETS, 4, 8, seed=1)
    dt.add_lora(pipe.text_encoder, dt.TE_TARGETS, 2, 1, seed=2)
    wf = dt.save_sd_lora(pipe, str(root / "lora"))
    slds = {bits: deltacodec.encode(wf, bits=bits, out=str(root / f"sd{bits}.sld")) for bits in (3, 16)}
    return root, wf, slds


def _unet_or_te(name: str) -> str:
    comp, _, rest = name.partition(".")
    return f"{comp}:{rest}.weight"


def _bound_by_component(f):
    b = delta_bound(f, _unet_or_te)
    return {c: {k.split(":", 1)[1]: v for k, v in b.items() if k.startswith(c + ":")} for c in ("unet", "text_encoder")}


@pytest.mark.parametrize("bits", [3, 16])
def test_decoded_sd_lora_loads_in_diffusers_without_warnings_and_holds_the_dequantized_factors(sd, tmp_path, bits):
    root, wf, slds = sd
    f = deltacodec.load(slds[bits])
    assert f.metadata["layout"] == "diffusers"
    (path,) = deltacodec.decode(slds[bits], str(tmp_path / "dec"))
    assert os.path.basename(path) == "pytorch_lora_weights.safetensors"
    got, meta = read_st(path)
    orig, orig_meta = read_st(wf)
    assert sorted(got) == sorted(orig) and meta == orig_meta
    pipe = dt.sd_pipeline()
    load_quietly(pipe, str(tmp_path / "dec"))
    from peft.utils import get_peft_model_state_dict

    for comp in ("unet", "text_encoder"):
        loaded = get_peft_model_state_dict(getattr(pipe, comp), adapter_name=pipe.get_active_adapters()[0])
        for m in (m for m in f.modules if m.name.startswith(comp + ".")):
            A, B = f.dequantize(m.name)
            short = m.name[len(comp) + 1:]
            np.testing.assert_array_equal(loaded[f"{short}.lora_A.weight"].numpy(), A)
            np.testing.assert_array_equal(loaded[f"{short}.lora_B.weight"].numpy(), B)


def test_apply_to_the_pipeline_matches_diffusers_fuse_at_16_bits(sd):
    root, wf, slds = sd
    f = deltacodec.load(slds[16])
    ref = fused(dt.sd_pipeline, wf)
    pipe = dt.sd_pipeline()
    base = {c: state(getattr(pipe, c)) for c in ("unet", "text_encoder")}
    h = deltacodec.apply(pipe, slds[16])
    assert len(h.patched) == len(f.modules) and h.missing == [] and h.unexpected == []
    bounds = _bound_by_component(f)
    for comp in ("unet", "text_encoder"):
        n = assert_weights_match(state(getattr(pipe, comp)), state(getattr(ref, comp)), bounds[comp])
        changed = sum(not torch.equal(base[comp][k], v) for k, v in state(getattr(pipe, comp)).items())
        assert n == changed > 0
    assert_outputs_close(denoise_step(pipe), denoise_step(ref))
    h.remove()
    for comp in ("unet", "text_encoder"):  # bit-exact restore
        assert all(torch.equal(base[comp][k], v) for k, v in state(getattr(pipe, comp)).items())


def test_apply_to_one_component_patches_only_its_entries(sd):
    root, wf, slds = sd
    f = deltacodec.load(slds[3])
    pipe, whole = dt.sd_pipeline(), dt.sd_pipeline()
    te_before = state(pipe.text_encoder)
    h = deltacodec.apply(pipe.unet, slds[3])
    assert len(h.patched) == sum(m.name.startswith("unet.") for m in f.modules) and h.missing == []
    assert all(torch.equal(te_before[k], v) for k, v in state(pipe.text_encoder).items())
    deltacodec.apply(whole, slds[3])
    assert all(torch.equal(state(whole.unet)[k], v) for k, v in state(pipe.unet).items())
    h2 = deltacodec.apply(pipe.text_encoder, slds[3])
    assert all(torch.equal(state(whole.text_encoder)[k], v) for k, v in state(pipe.text_encoder).items())
    h2.remove()
    h.remove()


def test_a_mismatched_component_changes_no_weight_in_any_component(sd):
    root, wf, slds = sd
    pipe = dt.sd_pipeline()
    torch.manual_seed(3)
    pipe.text_encoder = dt.CLIPTextModel(dt.clip_config(12))  # another width: every TE entry mismatched
    before = {c: state(getattr(pipe, c)) for c in ("unet", "text_encoder")}
    with pytest.raises(ApplyError, match=r"mismatched.*text_encoder\..*no weight was changed"):
        deltacodec.apply(pipe, slds[3])
    for c in ("unet", "text_encoder"):
        assert all(torch.equal(before[c][k], v) for k, v in state(getattr(pipe, c)).items())


def test_the_same_file_twice_is_refused_and_a_plain_peft_file_needs_its_component(sd, tmp_path):
    root, wf, slds = sd
    pipe = dt.sd_pipeline()
    h = deltacodec.apply(pipe, slds[3])
    with pytest.raises(ApplyError, match="already applied"):
        deltacodec.apply(pipe, slds[3])
    h.remove()
    # a file whose names carry no component: the pipeline cannot tell where it goes
    a = deltacodec.read_adapter(wf)
    for m in a.modules:
        m.name = m.name.split(".", 1)[1]
    a.layout, a.layout_info = "peft", None
    bare = deltacodec.encode(a, bits=3, out=str(tmp_path / "bare.sld"))
    with pytest.raises(ApplyError, match="carry no pipeline component.*deltacodec.apply\\(pipe.unet"):
        deltacodec.apply(pipe, bare)


@pytest.fixture(scope="module")
def sd_kohya(sd):
    root, wf, _ = sd
    k = str(root / "tiny_kohya.safetensors")
    dt.to_kohya(wf, k, {"unet": 3.0, "text_encoder": 5.0})
    return k, deltacodec.encode(k, bits=16, out=str(root / "kohya16.sld"))


def test_kohya_file_applied_to_the_pipeline_matches_diffusers_loading_it(sd_kohya):
    k, sld = sd_kohya
    f = deltacodec.load(sld)
    assert f.metadata["layout"] == "kohya" and {m.scale for m in f.modules} == {3.0 / 4, 5.0 / 2}
    ref = fused(dt.sd_pipeline, k)
    pipe = dt.sd_pipeline()
    h = deltacodec.apply(pipe, sld)
    assert len(h.patched) == len(f.modules)
    comp_of = {"lora_unet": "unet", "lora_te": "text_encoder"}
    bounds: dict = {"unet": {}, "text_encoder": {}}
    for name, b in delta_bound(f, lambda n: n).items():
        stem_comp = "lora_unet" if name.startswith("lora_unet_") else "lora_te"
        comp = comp_of[stem_comp]
        modules = dict(getattr(pipe, comp).named_modules())
        key = next(n for n in modules if n.replace(".", "_") in (name[len(stem_comp) + 1:], name[len(stem_comp) + 1 + len("text_model_"):]))
        bounds[comp][key + ".weight"] = b
    for comp in ("unet", "text_encoder"):
        assert assert_weights_match(state(getattr(pipe, comp)), state(getattr(ref, comp)), bounds[comp]) > 0
    assert_outputs_close(denoise_step(pipe), denoise_step(ref))


# sd-scripts names SDXL UNet modules as the original UNet does; for this 2-block, 1-layer UNet the
# correspondence, written out by hand from the original UNet's block order (input_blocks.0 is
# conv_in, then one per layer and one per downsampler; output_blocks: layers + 1 per up block):
SGM_OF_TINY = {
    "lora_unet_down_blocks_0_attentions_0_": "lora_unet_input_blocks_1_1_",
    "lora_unet_mid_block_attentions_0_": "lora_unet_middle_block_1_",
    "lora_unet_up_blocks_1_attentions_0_": "lora_unet_output_blocks_2_1_",
    "lora_unet_up_blocks_1_attentions_1_": "lora_unet_output_blocks_3_1_",
}


def test_kohya_file_in_original_unet_names_applies_like_the_diffusers_named_one(sd_kohya, tmp_path):
    from safetensors.numpy import load_file, save_file

    k, sld = sd_kohya
    renamed = {}
    for key, v in load_file(k).items():
        for old, new in SGM_OF_TINY.items():
            if key.startswith(old):
                key = new + key[len(old):]
                break
        else:
            assert not key.startswith("lora_unet_"), key
        renamed[key] = v
    sgm_path = str(tmp_path / "tiny_sgm.safetensors")
    save_file(renamed, sgm_path, metadata={"ss_network_module": "networks.lora"})
    sgm = deltacodec.encode(sgm_path, bits=16, out=str(tmp_path / "sgm.sld"))
    ref = dt.sd_pipeline()
    deltacodec.apply(ref, sld)
    pipe = dt.sd_pipeline()
    h = deltacodec.apply(pipe, sgm)
    assert len(h.patched) == len(deltacodec.load(sgm).modules) == len(deltacodec.load(sld).modules)
    for comp in ("unet", "text_encoder"):
        got, want = state(getattr(pipe, comp)), state(getattr(ref, comp))
        assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
    h.remove()
    fresh = dt.sd_pipeline()
    assert all(torch.equal(v, state(fresh.unet)[n]) for n, v in state(pipe.unet).items())


def test_decoded_kohya_file_loads_in_diffusers_like_the_original(sd_kohya, tmp_path):
    k, sld = sd_kohya
    (path,) = deltacodec.decode(sld, str(tmp_path / "dec"), dtype="fp16")
    assert os.path.basename(path) == "tiny_kohya.safetensors"
    got, meta = read_st(path)
    orig, orig_meta = read_st(k)
    assert meta == orig_meta and {n: (v.shape, d) for n, (v, d) in got.items()} == {n: (v.shape, d) for n, (v, d) in orig.items()}
    assert all(np.array_equal(got[n][0], orig[n][0]) for n in orig)  # 16 bits, float16 factors: exact
    a, b = dt.sd_pipeline(), dt.sd_pipeline()
    load_quietly(a, path)
    b.load_lora_weights(k)
    assert_outputs_close(denoise_step(a), denoise_step(b))


# ----------------------------------------------------------------------------------------------
# SD3 shaped: transformer + two text encoders, PEFT-style keys


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3")
    pipe = dt.sd3_pipeline()
    dt.add_lora(pipe.transformer, ["to_q", "to_k", "to_v", "add_q_proj", "to_out.0"], 4, 4, seed=3)
    dt.add_lora(pipe.text_encoder, dt.TE_TARGETS, 2, 4, seed=4)
    dt.add_lora(pipe.text_encoder_2, dt.TE_TARGETS, 2, 2, seed=5)
    wf = dt.save_sd3_lora(pipe, str(root / "lora"))
    return wf, deltacodec.encode(wf, bits=16, out=str(root / "sd3.sld"))


def test_sd3_lora_applies_like_diffusers_fuse_and_decodes_to_a_loadable_file(sd3, tmp_path):
    wf, sld = sd3
    f = deltacodec.load(sld)
    comps = {m.name.split(".")[0] for m in f.modules}
    assert comps == {"transformer", "text_encoder", "text_encoder_2"}
    ref = fused(dt.sd3_pipeline, wf)
    pipe = dt.sd3_pipeline()
    h = deltacodec.apply(pipe, sld)
    assert len(h.patched) == len(f.modules)
    b = delta_bound(f, _unet_or_te)
    for comp in comps:
        bound = {k.split(":", 1)[1]: v for k, v in b.items() if k.startswith(comp + ":")}
        assert assert_weights_match(state(getattr(pipe, comp)), state(getattr(ref, comp)), bound) > 0
    assert_outputs_close(denoise_step(pipe, sd3=True), denoise_step(ref, sd3=True))
    h.remove()
    # one text encoder alone: both CLIPs have the same module names, their widths tell them apart
    te1_before = state(pipe.text_encoder)
    h2 = deltacodec.apply(pipe.text_encoder_2, sld)
    assert len(h2.patched) == sum(m.name.startswith("text_encoder_2.") for m in f.modules)
    bound = {k.split(":", 1)[1]: v for k, v in b.items() if k.startswith("text_encoder_2:")}
    assert assert_weights_match(state(pipe.text_encoder_2), state(ref.text_encoder_2), bound) > 0
    assert all(torch.equal(te1_before[k], v) for k, v in state(pipe.text_encoder).items())
    h2.remove()
    deltacodec.decode(sld, str(tmp_path / "dec"))
    load_quietly(dt.sd3_pipeline(), str(tmp_path / "dec"))


@pytest.mark.parametrize("bits", [16, 4])
def test_kohya_conv_lora_applies_to_the_unet_as_its_kernel_reshaped(tmp_path, bits):
    # kohya's conv LoRA: down r×in×kh×kw, up out×r×1×1, ΔW[o,i,y,x] = alpha/r·Σ_k up[o,k]·down[k,i,y,x]
    from safetensors.numpy import save_file

    rng = np.random.default_rng(3)
    mods = {"lora_unet_down_blocks_0_resnets_0_conv1": ("down_blocks.0.resnets.0.conv1", 4, 4, (3, 3)),
            "lora_unet_up_blocks_1_resnets_0_conv_shortcut": ("up_blocks.1.resnets.0.conv_shortcut", 4, 12, (1, 1)),
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (
                "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 4, 4, None)}
    t, r, alpha = {}, 2, 3.0
    for stem, (_, out, inp, k) in mods.items():
        t[f"{stem}.lora_down.weight"] = (rng.standard_normal((r, inp, *k) if k else (r, inp)) * 0.3).astype(np.float16)
        t[f"{stem}.lora_up.weight"] = (rng.standard_normal((out, r, 1, 1) if k else (out, r)) * 0.1).astype(np.float16)
        t[f"{stem}.alpha"] = np.array(alpha, np.float16)
    src = str(tmp_path / "conv.safetensors")
    save_file(t, src, metadata={"ss_network_module": "networks.lora"})
    sld = deltacodec.encode(src, bits=bits, out=str(tmp_path / "conv.sld"))
    f = deltacodec.load(sld)
    pipe, ref = dt.sd_pipeline(), dt.sd_pipeline()
    before = state(pipe.unet)
    h = deltacodec.apply(pipe, sld)
    assert len(h.patched) == 3
    for stem, (name, out, inp, k) in mods.items():
        A, B = (x.astype(np.float64) for x in f.dequantize(stem))  # what the file holds (exact at 16 bits)
        if bits == 16:
            assert np.array_equal(A, t[f"{stem}.lora_down.weight"].astype(np.float64).reshape(r, -1))
        delta = (alpha / r) * np.einsum("ok,kj->oj", B, A)
        W0 = before[name + ".weight"].double().numpy()
        want = W0 + delta.reshape(W0.shape)
        got = state(pipe.unet)[name + ".weight"].double().numpy()
        # W + ΔW formed in float32 and rounded once: a few float32 ulps of the larger of |W|, |ΔW|
        tol = 4 * np.finfo(np.float32).eps * (np.abs(W0) + np.abs(delta.reshape(W0.shape)))
        assert (np.abs(got - want) <= tol + 1e-30).all(), name
    h.remove()
    assert all(torch.equal(v, state(ref.unet)[n]) for n, v in state(pipe.unet).items())


def test_attention_processor_keys_apply_like_the_same_lora_in_todays_keys(sd, tmp_path):
    # diffusers < 0.19 named UNet LoRA factors by attention processor: <attn>.processor.to_q_lora.down.weight
    from safetensors.numpy import load_file, save_file
    from safetensors import safe_open

    root, wf, slds = sd
    with safe_open(wf, "np") as fh:
        meta = fh.metadata() or {}
    old = {}
    for key, v in load_file(wf).items():
        comp = key.split(".", 1)[0]
        if comp == "unet":
            for suffix, part in ((".lora.down.weight", "down"), (".lora.up.weight", "up"),
                                 (".lora_A.weight", "down"), (".lora_B.weight", "up")):
                if key.endswith(suffix):
                    attn, proj = key[: -len(suffix)].rsplit(".", 1)
                    if proj == "0":  # to_out.0
                        attn, proj = attn.rsplit(".", 1)
                    key = f"{attn}.processor.{proj}_lora.{part}.weight"
                    break
            else:
                raise AssertionError(key)
        old[key] = v
    src = str(tmp_path / "old" / "pytorch_lora_weights.safetensors")
    os.makedirs(os.path.dirname(src))
    save_file(old, src, metadata=meta)
    sld = deltacodec.encode(src, bits=16, out=str(tmp_path / "old.sld"))
    ref, pipe = dt.sd_pipeline(), dt.sd_pipeline()
    deltacodec.apply(ref, slds[16])
    h = deltacodec.apply(pipe, sld)
    assert len(h.patched) == len(deltacodec.load(slds[16]).modules)
    for comp in ("unet", "text_encoder"):
        got, want = state(getattr(pipe, comp)), state(getattr(ref, comp))
        assert all(torch.equal(got[n], want[n]) for n in want), comp
