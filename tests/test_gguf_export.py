"""GGUF export: ``sld decode --format gguf`` writes a llama.cpp LoRA adapter.

The expectations here are written from llama.cpp's side, plainly, not from the exporter:
* names: llama.cpp's tensor names for each Hugging Face layer, as a table in this file;
* layout: lora_a (r, in), lora_b (out, r) in numpy order (ggml: a.ne = [in, r], b.ne = [r, out]),
  matching the base matrix llama.cpp holds, which for GPT-2's Conv1D is HF's weight transposed;
* values: llama.cpp adds ΔW = (alpha / r) · lora_b @ lora_a with r = lora_b's column count
  (``llama_adapter_lora_weight::get_scale``), which must equal the adapter's own
  ΔW = scale · B @ A (scale from the LoraConfig the test made), with the q/k rows of LLaMA-family
  models in llama.cpp's RoPE order (per head: rows 0, d/2, 1, d/2+1, ...), written here by index.
Adapters are made with PEFT on tiny models built from configs (no downloads).
"""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
gguf = pytest.importorskip("gguf")

from safetensors.numpy import load_file  # noqa: E402

import deltacodec  # noqa: E402
from cli_helpers import assert_one_line_error, assert_usage_error, lora_module, raw_tensor, run_sld, write_sld  # noqa: E402
from deltacodec import DecodeError, OutputError  # noqa: E402
from deltacodec.export import gguf_arch  # noqa: E402
from deltacodec.outputs import TEMP_PREFIX  # noqa: E402

RANK, ALPHA = 4, 8
SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)

# llama.cpp's tensor names (llama-arch.cpp) for the HF layer names of each family.
LLAMA_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}
PHI3_NAMES = {"self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output", "mlp.gate_up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}
GPT2_NAMES = {"attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}


def _models():
    T = transformers
    head = dict(SMALL, head_dim=8)
    return {
        # HF class: (config class, model class, config kwargs, llama.cpp arch, layer-name table, q/k RoPE reorder)
        "LlamaForCausalLM": (T.LlamaConfig, T.LlamaForCausalLM, SMALL, "llama", LLAMA_NAMES, True),
        "LlamaModel": (T.LlamaConfig, T.LlamaModel, SMALL, "llama", LLAMA_NAMES, True),
        "MistralForCausalLM": (T.MistralConfig, T.MistralForCausalLM, SMALL, "llama", LLAMA_NAMES, True),
        "Qwen2ForCausalLM": (T.Qwen2Config, T.Qwen2ForCausalLM, SMALL, "qwen2", LLAMA_NAMES, False),
        "Qwen2Model": (T.Qwen2Config, T.Qwen2Model, SMALL, "qwen2", LLAMA_NAMES, False),
        "Qwen3ForCausalLM": (T.Qwen3Config, T.Qwen3ForCausalLM, head, "qwen3", LLAMA_NAMES, False),
        "GemmaForCausalLM": (T.GemmaConfig, T.GemmaForCausalLM, head, "gemma", LLAMA_NAMES, False),
        "Gemma2ForCausalLM": (T.Gemma2Config, T.Gemma2ForCausalLM, head, "gemma2", LLAMA_NAMES, False),
        "Phi3ForCausalLM": (T.Phi3Config, T.Phi3ForCausalLM, SMALL, "phi3", PHI3_NAMES, False),
        "GPT2LMHeadModel": (T.GPT2Config, T.GPT2LMHeadModel,
                            dict(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
                                 eos_token_id=2), "gpt2", GPT2_NAMES, False),
    }


def make_adapter(root, hf_class: str, *, task_type=None, seed: int = 0, **lora_kwargs):
    """(adapter dir, base config dir, PEFT model) for a tiny ``hf_class`` with a random LoRA
    (init_lora_weights=False: B is not zero, so ΔW is) on every linear layer."""
    cfg_cls, model_cls, kwargs, *_ = _models()[hf_class]
    torch.manual_seed(seed)
    cfg = cfg_cls(**kwargs)
    model = model_cls(cfg)
    lora = dict(r=RANK, lora_alpha=ALPHA, target_modules="all-linear", init_lora_weights=False, task_type=task_type)
    lora.update(lora_kwargs)
    pm = peft.get_peft_model(model, peft.LoraConfig(**lora))
    adir, bdir = os.path.join(root, f"{hf_class}-adapter"), os.path.join(root, f"{hf_class}-base")
    pm.save_pretrained(adir)
    cfg.architectures = [hf_class]  # as a checkpoint's config.json has it
    cfg.save_pretrained(bdir)
    return adir, bdir, pm


def rope_rows(n_heads: int, head_dim: int) -> list[int]:
    """The HF row each llama.cpp row of a q/k projection holds: per head, 0, d/2, 1, d/2+1, ..."""
    rows = []
    for h in range(n_heads):
        for i in range(head_dim // 2):
            rows += [h * head_dim + i, h * head_dim + head_dim // 2 + i]
    return rows


def read_gguf(path):
    """(metadata {key: value}, tensors {name: (numpy array in numpy order, GGML type name)})."""
    r = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: (np.array(t.data), t.tensor_type.name) for t in r.tensors}
    return meta, tensors


def llamacpp_delta(meta, tensors, name: str) -> np.ndarray:
    """ΔW llama.cpp adds for base tensor ``name``: alpha / r · b @ a (alpha = 0: scale 1)."""
    a, b = (tensors[f"{name}.lora_{x}"][0].astype(np.float64) for x in "ab")
    alpha = meta["adapter.lora.alpha"]
    scale = alpha / b.shape[1] if alpha else 1.0
    return scale * (b @ a)


def f16_bound(A: np.ndarray, B: np.ndarray, scale: float) -> np.ndarray:
    """Largest |error| of each entry of scale·B@A when A and B are rounded to float16: each value
    moves by at most 2^-11 of itself (normal range) or 2^-25 (subnormal range), so an entry moves by
    at most scale·Σ_k (|b||δa| + |δb||a| + |δb||δa|)."""
    A, B = np.abs(A.astype(np.float64)), np.abs(B.astype(np.float64))
    da, db = 2.0**-11 * A + 2.0**-25, 2.0**-11 * B + 2.0**-25
    return scale * (B @ da + db @ A + db @ da)


def gguf_name(hf_module: str, table: dict[str, str]) -> str:
    """llama.cpp's name of a PEFT module name, from the table above."""
    short = hf_module.removeprefix("base_model.model.")
    layer = next(int(p) for p in short.split(".") if p.isdigit())
    suffix = next(v for k, v in table.items() if short.endswith(k))
    return f"blk.{layer}.{suffix}.weight"


# --------------------------------------------------------------------------------------------------
# fixtures: two architectures, 3 and 16 bits


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("gguf"))
    out = {}
    for hf in ("LlamaForCausalLM", "Qwen2ForCausalLM"):
        adir, bdir, pm = make_adapter(root, hf)
        for bits in (3, 16):
            sld = deltacodec.encode(adir, bits=bits, out=os.path.join(root, f"{hf}-{bits}.sld"))
            peft_file = deltacodec.decode(sld, os.path.join(root, f"{hf}-{bits}.safetensors"))[0]
            out[hf, bits] = (sld, bdir, load_file(peft_file), pm)
    return out


def expected_deltas(peft_tensors, scale_of, rope: tuple[int, int, int] | None):
    """{PEFT module: ΔW (out, in) llama.cpp must add}: scale·B@A of the decoded PEFT tensors,
    q/k rows in RoPE order when ``rope`` = (n_head, n_head_kv, head_dim)."""
    out = {}
    for key in peft_tensors:
        if not key.endswith(".lora_A.weight"):
            continue
        mod = key[: -len(".lora_A.weight")]
        A = peft_tensors[key].astype(np.float64)
        B = peft_tensors[f"{mod}.lora_B.weight"].astype(np.float64)
        dw = scale_of(mod) * (B @ A)
        if rope and mod.endswith(("q_proj", "k_proj")):
            heads = rope[0] if mod.endswith("q_proj") else rope[1]
            dw = dw[rope_rows(heads, rope[2])]
        out[mod] = dw
    return out


# --------------------------------------------------------------------------------------------------
# the file llama.cpp reads


@pytest.mark.parametrize("hf,arch", [("LlamaForCausalLM", "llama"), ("Qwen2ForCausalLM", "qwen2")])
@pytest.mark.parametrize("bits", [3, 16])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_export_has_llamacpp_keys_names_layout_and_the_peft_delta(made, tmp_path, hf, arch, bits, dtype):
    sld, bdir, peft_tensors, _ = made[hf, bits]
    out = str(tmp_path / "adapter.gguf")
    assert deltacodec.decode(sld, out, format="gguf", base_config=bdir, dtype=dtype) == [out]
    meta, tensors = read_gguf(out)
    assert meta["general.architecture"] == arch
    assert meta["general.type"] == "adapter"
    assert meta["adapter.type"] == "lora"
    assert meta["adapter.lora.alpha"] == ALPHA
    ggml_type = {"fp32": "F32", "fp16": "F16"}[dtype]
    want = expected_deltas(peft_tensors, lambda m: ALPHA / RANK, (4, 2, 8) if arch == "llama" else None)
    assert len(tensors) == 2 * len(want) == 2 * 14
    for mod, dw in want.items():
        name = gguf_name(mod, LLAMA_NAMES)
        a, a_type = tensors[f"{name}.lora_a"]
        b, b_type = tensors[f"{name}.lora_b"]
        assert (a_type, b_type) == (ggml_type, ggml_type)
        assert a.shape == (RANK, dw.shape[1]) and b.shape == (dw.shape[0], RANK)
        got = llamacpp_delta(meta, tensors, name)
        if dtype == "fp32":
            # Factors are the decoded float32 values (rows reordered): exact but for the float64
            # products' order of summation.
            np.testing.assert_allclose(got, dw, rtol=1e-12, atol=1e-12 * np.abs(dw).max())
        else:
            # fp16 factors: within the rounding bound of A and B (rows in the expected order)
            bound = f16_bound(peft_tensors[f"{mod}.lora_A.weight"], peft_tensors[f"{mod}.lora_B.weight"], ALPHA / RANK)
            if arch == "llama" and mod.endswith(("q_proj", "k_proj")):
                bound = bound[rope_rows(4 if mod.endswith("q_proj") else 2, 8)]
            assert np.all(np.abs(got - dw) <= bound + 1e-30), mod


def test_untouched_factors_are_the_decoded_values_bit_for_bit(made, tmp_path):
    sld, bdir, peft_tensors, _ = made["LlamaForCausalLM", 3]
    out = str(tmp_path / "a.gguf")
    deltacodec.decode(sld, out, format="gguf", base_config=bdir)
    _, tensors = read_gguf(out)
    mod = "base_model.model.model.layers.1.mlp.down_proj"
    assert np.array_equal(tensors["blk.1.ffn_down.weight.lora_a"][0], peft_tensors[f"{mod}.lora_A.weight"])
    assert np.array_equal(tensors["blk.1.ffn_down.weight.lora_b"][0], peft_tensors[f"{mod}.lora_B.weight"])
    # q: lora_a unchanged, lora_b rows reordered, nothing else
    mod = "base_model.model.model.layers.0.self_attn.q_proj"
    assert np.array_equal(tensors["blk.0.attn_q.weight.lora_a"][0], peft_tensors[f"{mod}.lora_A.weight"])
    assert np.array_equal(tensors["blk.0.attn_q.weight.lora_b"][0], peft_tensors[f"{mod}.lora_B.weight"][rope_rows(4, 8)])


def test_sixteen_bit_export_is_peft_own_delta(made, tmp_path):
    """At 16 bits the factors are PEFT's own to float16 rounding: the exported ΔW equals PEFT's
    get_delta_weight (of the live model) within the float16 rounding of A and B."""
    sld, bdir, _, pm = made["Qwen2ForCausalLM", 16]
    out = str(tmp_path / "q.gguf")
    deltacodec.decode(sld, out, format="gguf", base_config=bdir)
    meta, tensors = read_gguf(out)
    for name, module in pm.named_modules():
        if isinstance(module, peft.tuners.lora.Linear):
            want = module.get_delta_weight("default").detach().double().numpy()
            got = llamacpp_delta(meta, tensors, gguf_name(name, LLAMA_NAMES))
            A = module.lora_A["default"].weight.detach().numpy()
            B = module.lora_B["default"].weight.detach().numpy()
            bound = f16_bound(A, B, ALPHA / RANK) + 1e-6 * np.abs(want).max()  # + PEFT's own fp32 matmul
            assert np.all(np.abs(got - want) <= bound), name


# --------------------------------------------------------------------------------------------------
# one alpha for the whole file: per-module scales fold into lora_b


@pytest.mark.parametrize(
    "lora_kwargs,scale_of",
    [
        # alpha_pattern: mlp modules alpha 32, attention 8 (most common: 8 modules of 14 are... see below)
        (dict(alpha_pattern={"down_proj": 2.0, "up_proj": 64.0}),
         lambda m: (2.0 if m.endswith("down_proj") else 64.0 if m.endswith("up_proj") else ALPHA) / RANK),
        # rsLoRA with two ranks: scale = alpha/√r, so scale·r differs between ranks
        (dict(use_rslora=True, rank_pattern={"o_proj": 2}),
         lambda m: ALPHA / math.sqrt(2 if m.endswith("o_proj") else RANK)),
    ],
    ids=["alpha_pattern", "rslora_rank_pattern"],
)
def test_per_module_scales_are_folded_so_llamacpp_gives_each_module_its_scale(tmp_path, lora_kwargs, scale_of):
    adir, bdir, _ = make_adapter(str(tmp_path), "Qwen2ForCausalLM", **lora_kwargs)
    sld = deltacodec.encode(adir, bits=16, out=str(tmp_path / "a.sld"))
    peft_tensors = load_file(deltacodec.decode(sld, str(tmp_path / "a.safetensors"))[0])
    out = str(tmp_path / "a.gguf")
    deltacodec.decode(sld, out, format="gguf", base_config=bdir)
    meta, tensors = read_gguf(out)
    # the alpha that needs no folding for the most modules: scale·rank of the majority
    products = [scale_of(k[: -len(".lora_A.weight")]) * peft_tensors[k].shape[0] for k in peft_tensors if "lora_A" in k]
    common = max(set(products), key=products.count)
    assert meta["adapter.lora.alpha"] == pytest.approx(common, rel=1e-7)  # stored as float32
    for mod, dw in expected_deltas(peft_tensors, scale_of, None).items():
        got = llamacpp_delta(meta, tensors, gguf_name(mod, LLAMA_NAMES))
        # one float32 rounding of the folded lora_b and of alpha: a few 2^-24 relative
        np.testing.assert_allclose(got, dw, rtol=0, atol=4e-7 * np.abs(dw).max(), err_msg=mod)


def test_all_zero_scales_give_alpha_zero_and_zero_lora_b(tmp_path):
    mod = lora_module("model.layers.0.self_attn.v_proj", out_f=16, in_f=32, rank=2)
    mod["scale"] = 0.0
    sld = write_sld(tmp_path / "z.sld", modules=[mod])
    out = str(tmp_path / "z.gguf")
    deltacodec.decode(sld, out, format="gguf", arch="qwen2")
    meta, tensors = read_gguf(out)
    assert meta["adapter.lora.alpha"] == 0.0  # llama.cpp: scale = user scale
    assert not np.any(tensors["blk.0.attn_v.weight.lora_b"][0])


# --------------------------------------------------------------------------------------------------
# every architecture in the table


@pytest.mark.parametrize("hf", sorted(gguf_arch.HF_ARCHITECTURES))
def test_every_listed_architecture_maps_every_linear_layer_to_a_tensor_of_that_llamacpp_arch(tmp_path, hf):
    _, model_cls, _, arch, table, rope = _models()[hf]
    adir, bdir, pm = make_adapter(str(tmp_path), hf)
    assert gguf_arch.HF_ARCHITECTURES[hf].name == arch
    sld = deltacodec.encode(adir, bits=16, out=str(tmp_path / "a.sld"))
    out = str(tmp_path / "a.gguf")
    deltacodec.decode(sld, out, format="gguf", base_config=bdir)
    meta, tensors = read_gguf(out)
    assert meta["general.architecture"] == arch
    enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    arch_tensors = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[enum]}
    n = 0
    for name, module in pm.named_modules():
        if not isinstance(module, peft.tuners.lora.LoraLayer):
            continue
        n += 1
        base = module.get_base_layer().weight
        # llama.cpp's matrix: HF's (out, in), or GPT-2's Conv1D (in, out) transposed by the converter
        w_out, w_in = base.shape[::-1] if module.fan_in_fan_out else base.shape
        g = gguf_name(name, table)
        assert any(g == t.format(bid=int(g.split(".")[1])) + ".weight" for t in arch_tensors), g
        a, b = tensors[f"{g}.lora_a"][0], tensors[f"{g}.lora_b"][0]
        assert a.shape == (RANK, w_in) and b.shape == (w_out, RANK), g
        want = module.get_delta_weight("default").detach().double().numpy()
        if module.fan_in_fan_out:
            want = want.T  # PEFT returns the Conv1D layout; llama.cpp holds (out, in)
        # the 16-bit file holds A and B rounded to float16; PEFT's own product is float32
        bound = f16_bound(module.lora_A["default"].weight.detach().numpy(),
                          module.lora_B["default"].weight.detach().numpy(), ALPHA / RANK) + 1e-6 * np.abs(want).max()
        if rope and name.endswith(("q_proj", "k_proj")):
            rows = rope_rows(4 if name.endswith("q_proj") else 2, 8)
            want, bound = want[rows], bound[rows]
        got = llamacpp_delta(meta, tensors, g)
        assert np.all(np.abs(got - want) <= bound), g
    assert n and len(tensors) == 2 * n


def test_one_llamacpp_name_means_one_conversion_in_the_table():
    by_name: dict[str, gguf_arch.GgufArch] = {}
    for a in gguf_arch.HF_ARCHITECTURES.values():
        assert by_name.setdefault(a.name, a) == a, a.name
        assert a.name in gguf.MODEL_ARCH_NAMES.values(), a.name


def test_gguf_architecture_name_is_accepted_for_arch(made, tmp_path):
    sld, bdir, _, _ = made["LlamaForCausalLM", 16]
    a, b = str(tmp_path / "a.gguf"), str(tmp_path / "b.gguf")
    deltacodec.decode(sld, a, format="gguf", base_config=bdir)
    deltacodec.decode(sld, b, format="gguf", base_config=bdir, arch="llama")
    with open(a, "rb") as fa, open(b, "rb") as fb:
        assert fa.read() == fb.read()


def test_architecture_recorded_by_peft_needs_no_option_where_no_rope_reorder_is_needed(made, tmp_path):
    # PEFT records auto_mapping.base_model_class when saved without a task type
    sld, _, _, _ = made["Qwen2ForCausalLM", 3]
    out = str(tmp_path / "a.gguf")
    deltacodec.decode(sld, out, format="gguf")
    assert read_gguf(out)[0]["general.architecture"] == "qwen2"


# --------------------------------------------------------------------------------------------------
# refused: what llama.cpp cannot express, each naming what is at fault


def test_sine_adapter_is_refused_naming_the_module(tmp_path):
    adir, bdir, _ = make_adapter(str(tmp_path), "Qwen2ForCausalLM")
    sld = deltacodec.encode(adir, bits=3, out=str(tmp_path / "s.sld"), omega=100.0)
    with pytest.raises(DecodeError, match=r"module '.*' is a sine-LoRA module.*--format peft"):
        deltacodec.decode(sld, str(tmp_path / "s.gguf"), format="gguf", base_config=bdir)
    assert os.listdir(tmp_path).count("s.gguf") == 0


def test_unknown_architecture_is_refused_naming_it_and_listing_the_known_ones(made, tmp_path):
    sld = made["Qwen2ForCausalLM", 3][0]
    with pytest.raises(DecodeError, match=r"--arch: architecture 'FalconForCausalLM' is not one.*LlamaForCausalLM"):
        deltacodec.decode(sld, str(tmp_path / "a.gguf"), format="gguf", arch="FalconForCausalLM")
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"architectures": ["BertModel"]}))
    with pytest.raises(DecodeError, match=r"config.json: architectures: architecture 'BertModel'"):
        deltacodec.decode(sld, str(tmp_path / "a.gguf"), format="gguf", base_config=str(cfg))


def test_file_without_a_recorded_architecture_asks_for_arch(tmp_path):
    adir, _, _ = make_adapter(str(tmp_path), "Qwen2ForCausalLM", task_type="CAUSAL_LM")  # no auto_mapping
    sld = deltacodec.encode(adir, bits=3, out=str(tmp_path / "a.sld"))
    with pytest.raises(DecodeError, match=r"does not record its base model's architecture.*pass --arch"):
        deltacodec.decode(sld, str(tmp_path / "a.gguf"), format="gguf")
    deltacodec.decode(sld, str(tmp_path / "a.gguf"), format="gguf", arch="Qwen2ForCausalLM")


def test_arch_and_base_config_that_disagree_are_refused(made, tmp_path):
    sld, bdir, _, _ = made["LlamaForCausalLM", 3]
    with pytest.raises(DecodeError, match=r"--arch qwen2 is llama.cpp's 'qwen2', but .* 'LlamaForCausalLM'"):
        deltacodec.decode(sld, str(tmp_path / "a.gguf"), format="gguf", arch="qwen2", base_config=bdir)


def test_llama_q_and_k_without_head_counts_are_refused_naming_the_module(made, tmp_path):
    sld = made["LlamaForCausalLM", 3][0]
    with pytest.raises(DecodeError, match=r"module '.*self_attn\.[qk]_proj'.*RoPE.*--base-config"):
        deltacodec.decode(sld, str(tmp_path / "a.gguf"), format="gguf")


def test_head_counts_that_do_not_divide_the_rows_are_refused(made, tmp_path):
    sld = made["LlamaForCausalLM", 3][0]
    with pytest.raises(DecodeError, match=r"module '.*[qk]_proj': (32|16) rows are not 3 heads of even size \(n_head(_kv)? = 3 from base_config\)"):
        deltacodec.decode(sld, str(tmp_path / "a.gguf"), format="gguf",
                          base_config={"architectures": ["LlamaForCausalLM"], "num_attention_heads": 3})


@pytest.mark.parametrize(
    "name,why",
    [
        ("model.layers.0.self_attn.rotary_emb", r"weight 'model.layers.0.self_attn.rotary_emb.weight' has no llama.cpp tensor in architecture 'qwen2'"),
        ("transformer.h.0.attn.c_attn", r"weight '.*' has no llama.cpp tensor in architecture 'qwen2'"),  # GPT-2's name
        ("lora_unet_down_blocks_0_attentions_0_proj_in", r"weight '.*' has no llama.cpp tensor"),  # kohya image LoRA
        ("model.layers.4096.mlp.up_proj", r"weight '.*' has no llama.cpp tensor"),  # beyond any real block count
        ("model.embed_tokens", r"maps to 'token_embd.weight', not a linear layer's matrix"),
        ("model.norm", r"maps to 'output_norm.weight', not a linear layer's matrix"),
    ],
)
def test_modules_llamacpp_cannot_hold_are_refused_naming_the_module(tmp_path, name, why):
    sld = write_sld(tmp_path / "a.sld", modules=[lora_module("model.layers.0.mlp.up_proj"), lora_module(name)])
    with pytest.raises(DecodeError, match=rf"module '{__import__('re').escape(name)}': {why}"):
        deltacodec.decode(sld, str(tmp_path / "a.gguf"), format="gguf", arch="qwen2")
    assert not os.path.exists(tmp_path / "a.gguf")


def test_two_modules_of_one_llamacpp_tensor_are_refused_naming_both(tmp_path):
    sld = write_sld(tmp_path / "a.sld", modules=[lora_module("layers.0.self_attn.v_proj"),
                                                 lora_module("model.layers.0.self_attn.v_proj")])
    with pytest.raises(DecodeError, match=r"'model.layers.0.self_attn.v_proj': maps to 'blk.0.attn_v.weight', as does module 'layers.0.self_attn.v_proj'"):
        deltacodec.decode(sld, str(tmp_path / "a.gguf"), format="gguf", arch="qwen2")


def test_fan_in_fan_out_must_match_what_the_converter_transposes(tmp_path):
    m = lora_module("model.layers.0.mlp.up_proj")
    m["fan_in_fan_out"] = True
    sld = write_sld(tmp_path / "a.sld", modules=[m])
    with pytest.raises(DecodeError, match=r"up_proj': its base weight is stored \(in, out\) \(fan_in_fan_out\)"):
        deltacodec.decode(sld, str(tmp_path / "a.gguf"), format="gguf", arch="qwen2")
    sld = write_sld(tmp_path / "b.sld", modules=[lora_module("transformer.h.0.attn.c_attn")])
    with pytest.raises(DecodeError, match=r"c_attn': llama.cpp's converter transposes its base weight, but the module is not fan_in_fan_out"):
        deltacodec.decode(sld, str(tmp_path / "b.gguf"), format="gguf", arch="gpt2")


def test_lm_head_of_a_tied_model_is_refused(tmp_path):
    sld = write_sld(tmp_path / "a.sld", modules=[lora_module("lm_head", out_f=64, in_f=32)])
    with pytest.raises(DecodeError, match=r"module 'lm_head': maps to 'output.weight', but .* ties the output"):
        deltacodec.decode(sld, str(tmp_path / "a.gguf"), format="gguf",
                          base_config={"architectures": ["Qwen2ForCausalLM"], "tie_word_embeddings": True})
    deltacodec.decode(sld, str(tmp_path / "a.gguf"), format="gguf", arch="qwen2")  # untied: output.weight


def test_losslessly_stored_tensors_are_refused_naming_the_tensor(tmp_path):
    sld = write_sld(tmp_path / "a.sld", modules=[lora_module("model.layers.0.mlp.up_proj")],
                    tensors=[dict(raw_tensor(np.ones(3, np.float32), "F32"), name="lm_head.weight")])
    with pytest.raises(DecodeError, match=r"tensor 'lm_head.weight' is stored losslessly.*only lora_a/lora_b pairs"):
        deltacodec.decode(sld, str(tmp_path / "a.gguf"), format="gguf", arch="qwen2")


def test_file_without_modules_is_refused(tmp_path):
    sld = write_sld(tmp_path / "a.sld", modules=[], tensors=[dict(raw_tensor(np.ones(3, np.float32), "F32"), name="x")])
    with pytest.raises(DecodeError, match=r"stored losslessly|holds no LoRA module"):
        deltacodec.decode(sld, str(tmp_path / "a.gguf"), format="gguf", arch="qwen2")


def test_fp16_overflow_is_refused_naming_the_tensor_and_nothing_is_left(tmp_path):
    m = lora_module("model.layers.0.mlp.up_proj", out_f=4, in_f=3, rank=1)
    m["B"] = raw_tensor(np.array([[1.0], [2.0], [1e5], [3.0]]), "F32")
    sld = write_sld(tmp_path / "a.sld", modules=[lora_module("model.layers.0.mlp.down_proj"), m])
    with pytest.raises(DecodeError, match=r"tensor 'blk.0.ffn_up.weight.lora_b': max \|value\| 100000 overflows fp16"):
        deltacodec.decode(sld, str(tmp_path / "a.gguf"), format="gguf", arch="qwen2", dtype="fp16")
    assert sorted(os.listdir(tmp_path)) == ["a.sld"]  # no output, no temporary
    deltacodec.decode(sld, str(tmp_path / "a.gguf"), format="gguf", arch="qwen2", dtype="fp32")


@pytest.mark.parametrize(
    "text,why",
    [
        ("{not json", r"not a JSON config"),
        ("[1, 2]", r"expected a JSON object"),
        ('{"architectures": "LlamaForCausalLM"}', r"'architectures' is 'LlamaForCausalLM'; expected a list"),
        ('{"architectures": ["LlamaForCausalLM"], "num_attention_heads": 0}', r"'num_attention_heads' is 0; expected a positive integer"),
        ('{"architectures": ["LlamaForCausalLM"], "num_key_value_heads": true}', r"'num_key_value_heads' is True"),
    ],
)
def test_bad_base_configs_are_refused_naming_the_file_and_key(made, tmp_path, text, why):
    cfg = tmp_path / "config.json"
    cfg.write_text(text)
    with pytest.raises(DecodeError, match=rf"config.json: {why}"):
        deltacodec.decode(made["LlamaForCausalLM", 3][0], str(tmp_path / "a.gguf"), format="gguf", base_config=str(cfg))


def test_bad_options_are_refused(made, tmp_path):
    sld, bdir, _, _ = made["Qwen2ForCausalLM", 3]
    with pytest.raises(DecodeError, match=r"GGUF export writes lora_a/lora_b as fp32 or fp16, got 'bf16'"):
        deltacodec.decode(sld, str(tmp_path / "a.gguf"), format="gguf", dtype="bf16")
    with pytest.raises(DecodeError, match=r"format must be one of adapter, gguf, got 'onnx'"):
        deltacodec.decode(sld, str(tmp_path / "a.gguf"), format="onnx")
    with pytest.raises(DecodeError, match=r"apply to format='gguf' only"):
        deltacodec.decode(sld, str(tmp_path / "d"), arch="qwen2")


def test_missing_gguf_package_says_which_extra_to_install(made, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf raises ImportError
    with pytest.raises(ImportError, match=r"GGUF export needs the 'gguf' package: pip install 'deltacodec\[gguf\]'"):
        deltacodec.decode(made["Qwen2ForCausalLM", 3][0], str(tmp_path / "a.gguf"), format="gguf")


# --------------------------------------------------------------------------------------------------
# outputs


def test_outputs_follow_the_output_rules(made, tmp_path):
    sld, bdir, _, _ = made["Qwen2ForCausalLM", 3]
    out = str(tmp_path / "a.gguf")
    deltacodec.decode(sld, out, format="gguf")
    with pytest.raises(OutputError, match="already exists"):
        deltacodec.decode(sld, out, format="gguf")
    os.truncate(out, 0)
    deltacodec.decode(sld, out, format="gguf", force=True)
    assert read_gguf(out)[0]["general.type"] == "adapter"
    with pytest.raises(OutputError, match="is the input"):
        deltacodec.decode(sld, sld, format="gguf", force=True)
    cfg = os.path.join(bdir, "config.json")
    with pytest.raises(OutputError, match="is the input"):
        deltacodec.decode(sld, cfg, format="gguf", base_config=bdir, force=True)
    # beside the config in the model directory is fine: only config.json is read there
    beside = os.path.join(bdir, "adapter.gguf")
    assert deltacodec.decode(sld, beside, format="gguf", base_config=bdir) == [beside]
    os.remove(beside)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(TEMP_PREFIX)]


def test_default_output_is_beside_the_file_with_gguf_suffix(made, tmp_path):
    import shutil

    src = shutil.copy(made["Qwen2ForCausalLM", 3][0], tmp_path / "x.sld")
    assert deltacodec.decode(src, format="gguf") == [str(tmp_path / "x.gguf")]


# --------------------------------------------------------------------------------------------------
# the command line


def test_cli_decode_format_gguf(made, tmp_path, capsys):
    sld, bdir, _, _ = made["LlamaForCausalLM", 3]
    out = str(tmp_path / "a.gguf")
    rc, so, err = run_sld(capsys, "decode", sld, "--format", "gguf", "--base-config", bdir, "-o", out, "--dtype", "fp16")
    assert rc == 0, err
    assert so.strip() == f"wrote {out}"
    meta, tensors = read_gguf(out)
    assert meta["general.architecture"] == "llama" and tensors["blk.0.attn_q.weight.lora_a"][1] == "F16"
    rc, so, err = run_sld(capsys, "decode", sld, "--format", "gguf", "-o", str(tmp_path / "b.gguf"))
    assert_one_line_error(rc, err, "self_attn.k_proj", "RoPE", "--base-config")
    rc, so, err = run_sld(capsys, "decode", sld, "--arch", "llama", "-o", str(tmp_path / "c"))
    assert_one_line_error(rc, err, "format='gguf'")
    rc, so, err = run_sld(capsys, "decode", sld, "--format", "onnx")
    assert_usage_error(rc, err, "--format")


# --------------------------------------------------------------------------------------------------
# llama.cpp itself (llama-cpp-python compiles it from source)


def _write_llama_base(path: str, model, cfg) -> None:
    """A GGUF LLaMA base model from the HF weights, as convert_hf_to_gguf.py lays it out: llama.cpp
    names, q/k rows in RoPE order, no tokenizer (token ids fed directly)."""
    w = gguf.GGUFWriter(path, "llama")
    hd = cfg.hidden_size // cfg.num_attention_heads
    w.add_context_length(64)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"] if getattr(cfg, "rope_parameters", None) else cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("none")
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = dict(LLAMA_NAMES, input_layernorm="attn_norm", post_attention_layernorm="ffn_norm")
    for key, t in model.state_dict().items():
        if "lora_" in key:
            continue
        key = key.replace(".base_layer.", ".")  # PEFT's wrapper around the base Linear
        x = t.detach().float().numpy()
        if key in names:
            w.add_tensor(names[key], x)
            continue
        parts = key.split(".")  # model.layers.<i>.<sub...>.weight
        sub = ".".join(parts[3:-1])
        if sub.endswith("q_proj"):
            x = x[rope_rows(cfg.num_attention_heads, hd)]
        elif sub.endswith("k_proj"):
            x = x[rope_rows(cfg.num_key_value_heads, hd)]
        w.add_tensor(f"blk.{parts[2]}.{per_layer[sub]}.weight", np.ascontiguousarray(x))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.slow
def test_llamacpp_loads_the_adapter_and_changes_logits_as_peft_merge_predicts(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (it builds llama.cpp from source)")
    adir, bdir, pm = make_adapter(str(tmp_path), "LlamaForCausalLM", lora_dropout=0.0)
    sld = deltacodec.encode(adir, bits=16, out=str(tmp_path / "a.sld"))
    lora = str(tmp_path / "a.gguf")
    deltacodec.decode(sld, lora, format="gguf", base_config=bdir)
    # the reference: the same base with the 16-bit adapter's dequantized factors merged by PEFT
    peft_tensors = load_file(deltacodec.decode(sld, str(tmp_path / "d.safetensors"))[0])
    sd = pm.state_dict()
    with torch.no_grad():
        for k, v in peft_tensors.items():
            sd[k.replace(".weight", ".default.weight")].copy_(torch.from_numpy(v))
        pm.load_state_dict(sd)
    base_model = pm.get_base_model()
    tokens = [5, 17, 3, 42, 8, 29, 11, 60]
    ids = torch.tensor([tokens])
    pm.eval()
    with torch.no_grad():
        with pm.disable_adapter():
            hf_base = pm(ids).logits[0].double().numpy()
        hf_lora = pm(ids).logits[0].double().numpy()
    base_gguf = str(tmp_path / "base.gguf")
    _write_llama_base(base_gguf, base_model, base_model.config)

    def logits(**kw):
        llm = llama_cpp.Llama(model_path=base_gguf, n_ctx=64, n_batch=64, logits_all=True, n_threads=1,
                              verbose=False, **kw)
        llm.eval(tokens)
        out = np.array(llm.scores[: len(tokens)], dtype=np.float64)
        llm.close()
        return out

    cpp_base, cpp_lora = logits(), logits(lora_path=lora)
    change = hf_lora - hf_base
    assert np.abs(change).max() > 0.05  # the adapter moves the logits visibly
    # llama.cpp computes in float32 with its own kernels (and may round K/V to fp16): 2e-3 of the
    # logits' range for the base model, and the adapter's change within 0.5% of its own size
    # (measured: 5e-5 of 0.33, and 0.05%; without lora_b's RoPE row order the change is off by 14%).
    span = np.abs(hf_base).max()
    print(f"\nlogits span {span:.4g}, |base diff| {np.abs(cpp_base - hf_base).max():.3g}, "
          f"adapter change {np.abs(change).max():.4g}, |change diff| {np.abs(cpp_lora - cpp_base - change).max():.3g}")
    np.testing.assert_allclose(cpp_base, hf_base, rtol=0, atol=2e-3 * span)
    np.testing.assert_allclose(cpp_lora - cpp_base, change, rtol=0, atol=0.005 * np.abs(change).max())


def test_importing_deltacodec_and_its_export_package_does_not_import_gguf():
    import subprocess

    code = ("import sys, deltacodec, deltacodec.export, deltacodec.export.gguf_arch; "
            "assert 'gguf' not in sys.modules, 'gguf imported'")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
