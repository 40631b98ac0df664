"""deltacodec.apply's guarantees: one weight takes one delta, nothing non-finite reaches a weight,
live handles stack and unstack correctly, and every failure is the library's error with the
model left bit-exactly as it was.

Files are crafted with tests/sldtools.py (raw float16 factors, so every delta is exactly
scale·B@A) on three kinds of model: a plain ``nn.Module`` tree, a tiny Llama built from a
config, and the same Llama wrapped by PEFT. Files whose entry names collide are made by renaming
entries of a loaded file in memory: a reader may (and the hardened one does) reject such files
on its own, and apply must not rely on that.
"""

from __future__ import annotations

import gc
import shutil
import warnings
import weakref

import numpy as np
import pytest
import torch

import deltacodec
from deltacodec import ApplyError, DeltacodecWarning, SldFile, SldLimitError
from deltacodec import kernels
from deltacodec.patch import resolve_names
from sldtools import assemble, codebook_tensor, f16_codebook, lora_module, raw_tensor

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


# ----------------------------------------------------------------------------------------------
# Models and files
# ----------------------------------------------------------------------------------------------


class Tiny(torch.nn.Module):
    """lin, other: 4x6 linears; emb (6x4) is tied to head (the same Parameter); a buffer."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(6, 4, bias=False)
        self.other = torch.nn.Linear(6, 4)
        self.emb = torch.nn.Embedding(6, 4)
        self.head = torch.nn.Linear(4, 6, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("gain", torch.ones(4))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        self.to(dtype)


def tiny_llama(tie: bool = False):
    cfg = transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=16, tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


Q, O = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj"


def model_kinds():
    """(id, factory, two module names with 2-D weights of the same shape, that shape (out, in))."""
    return [
        ("plain", Tiny, ("lin", "other"), (4, 6)),
        ("llama", tiny_llama, (Q, O), (16, 16)),
        ("peft-llama", lambda: peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj", "o_proj"])),
         ("base_model.model." + Q, "base_model.model." + O), (16, 16)),
    ]


MODEL_KINDS = model_kinds()


def factors(out_f: int, in_f: int, rank: int = 2, seed: int = 0, spread: float = 0.5):
    """A (rank x in), B (out x rank), float16-exact."""
    g = np.random.default_rng(seed)
    A = (g.standard_normal((rank, in_f)) * spread).astype(np.float16)
    B = (g.standard_normal((out_f, rank)) * spread).astype(np.float16)
    return A, B


def ones_factor(shape: tuple[int, int]) -> tuple[dict, bytes]:
    """A factor of ones as a 1-bit codebook: its bound is 1, where a raw float16 factor's bound is
    float16's largest value, which the reader multiplies into the module's finiteness bound."""
    return codebook_tensor(shape, 1, 1, [1] * (shape[0] * shape[1]), f16_codebook([0.5, 1.0]), 1.0)


def write_sld(path, modules=(), tensors=()) -> str:
    """modules: (name, A, B, scale) stored as raw float16 factors (plain LoRA), or as
    :func:`ones_factor` when A or B is a shape tuple; tensors: (name, values, dtype) stored raw."""
    mods, sections, tens = [], [], []
    for name, A, B, scale in modules:
        ta, sa = ones_factor(A) if isinstance(A, tuple) else raw_tensor(A, "F16")
        tb, sb = ones_factor(B) if isinstance(B, tuple) else raw_tensor(B, "F16")
        (rank, in_f), out_f = (A if isinstance(A, tuple) else A.shape), (B if isinstance(B, tuple) else B.shape)[0]
        m = lora_module(name, out_f=out_f, in_f=in_f, rank=rank, scale=float(scale))
        m["A"], m["B"] = ta, tb
        mods.append(m)
        sections += [sa, sb]
    for name, values, dtype in tensors:
        t, s = raw_tensor(values, dtype)
        tens.append({"name": name, **t})
        sections.append(s)
    path.write_bytes(assemble(mods, tens, sections))
    return str(path)


def renamed(path: str, modules: dict | None = None, tensors: dict | None = None) -> SldFile:
    """The file at ``path`` with entries renamed in memory (old name -> new name)."""
    f = SldFile(path)
    f.modules = [m._replace(name=(modules or {}).get(m.name, m.name)) for m in f.modules]
    f.tensors = [t._replace(name=(tensors or {}).get(t.name, t.name)) for t in f.tensors]
    return f


def snapshot(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def assert_unchanged(model, before: dict) -> None:
    now = model.state_dict(keep_vars=True)
    assert now.keys() == before.keys()
    for k, v in before.items():
        assert now[k].dtype == v.dtype and torch.equal(now[k].detach(), v), k


def weight(model, module_name: str) -> torch.Tensor:
    mod = dict(model.named_modules())[module_name]
    while hasattr(mod, "base_layer"):
        mod = mod.base_layer
    return mod.weight


def expected(W0: torch.Tensor, *deltas: tuple) -> torch.Tensor:
    """W0 with each (A, B, scale) added in turn: the fp32 sum rounded once to W's dtype per
    delta (plain LoRA, float16 factors: the float64 product is what the fp32 path computes
    to within the tolerance of the caller)."""
    W = W0.double()
    for A, B, scale in deltas:
        W = (W + scale * (torch.from_numpy(B.astype(np.float64)) @ torch.from_numpy(A.astype(np.float64)))).to(W0.dtype).double()
    return W.to(W0.dtype)


# ----------------------------------------------------------------------------------------------
# One weight, one delta
# ----------------------------------------------------------------------------------------------

COLLISIONS = {
    # id: (file modules, file tensors as (name, shape), renames {modules}, {tensors}, names in the message)
    "prefixed-and-bare-module": (["lin", "other"], [], {"other": "base_model.model.lin"}, {}, ["base_model.model.lin", "'lin'", "lin.weight"]),
    "module-and-its-weight": (["lin"], [("gain2", (4, 6))], {}, {"gain2": "lin.weight"}, ["module 'lin'", "stored tensor 'lin.weight'"]),
    "module-and-prefixed-weight": (["lin"], [("gain2", (4, 6))], {}, {"gain2": "base_model.model.lin.weight"}, ["module 'lin'", "base_model.model.lin.weight"]),
    "two-names-for-one-tensor": ([], [("a", (4,)), ("b", (4,))], {}, {"a": "gain", "b": "base_model.model.gain"}, ["'base_model.model.gain'", "'gain'"]),
    "extra-named-like-a-factor": (["lin"], [("x", (2, 6))], {}, {"x": "lin.lora_A.weight"}, ["lin.lora_A.weight", "module 'lin'"]),
    "tied-module-and-tensor": (["head"], [("x", (6, 4))], {}, {"x": "emb.weight"}, ["module 'head'", "stored tensor 'emb.weight'", "tied"]),
    "tied-two-modules": (["head", "x"], [], {"x": "emb"}, {}, ["module 'head'", "module 'emb'", "tied"]),
}


def collision_file(tmp_path, case: str) -> SldFile:
    mods, tens, rn_m, rn_t, _ = COLLISIONS[case]
    shapes = {"lin": (4, 6), "other": (4, 6), "head": (6, 4), "x": (6, 4)}
    modules = [(n, *factors(*shapes[n], seed=i), 1.0) for i, n in enumerate(mods)]
    tensors = [(n, np.full(shape, 0.5, np.float32), "F32") for n, shape in tens]
    return renamed(write_sld(tmp_path / "c.sld", modules, tensors), rn_m, rn_t)


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "non-strict"])
@pytest.mark.parametrize("case", list(COLLISIONS))
def test_entries_reaching_one_weight_are_refused_in_every_mode(tmp_path, case, strict):
    model = Tiny()
    before = snapshot(model)
    f = collision_file(tmp_path, case)
    with pytest.raises(ApplyError) as exc:
        deltacodec.apply(model, f, strict=strict)
    msg = str(exc.value)
    assert msg.startswith(f.path) and "one weight takes one delta" in msg and "no weight was changed" in msg
    for part in COLLISIONS[case][4]:
        assert part in msg, (part, msg)
    assert_unchanged(model, before)


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "non-strict"])
def test_prefixed_and_bare_module_collide_on_a_peft_wrapped_model_too(tmp_path, strict):
    pm = peft.get_peft_model(Tiny(), peft.LoraConfig(r=2, target_modules=["lin", "other"]))
    before = snapshot(pm)
    f = collision_file(tmp_path, "prefixed-and-bare-module")
    with pytest.raises(ApplyError, match=r"lin\.base_layer\.weight"):
        deltacodec.apply(pm, f, strict=strict)
    assert_unchanged(pm, before)


def test_tied_lm_head_and_embedding_of_a_transformers_model_are_one_weight(tmp_path):
    model = tiny_llama(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    before = snapshot(model)
    A, B = factors(32, 16)
    path = write_sld(tmp_path / "t.sld", [("lm_head", A, B, 1.0)], [("model.embed_tokens.weight", np.zeros((32, 16), np.float32), "F32")])
    with pytest.raises(ApplyError, match="tied or shared"):
        deltacodec.apply(model, path, strict=False)
    assert_unchanged(model, before)


def test_resolve_names_maps_checkpoint_keys_and_refuses_collisions(tmp_path):
    A, B = factors(4, 6)
    path = write_sld(tmp_path / "n.sld", [("base_model.model.a", A, B, 1.0), ("b", A, B, 1.0), ("c", A, B, 1.0)],
                     [("base_model.model.n.weight", np.ones(3, np.float32), "F32"), ("gone", np.ones(3, np.float32), "F32")])
    keys = {"a.weight", "base_model.model.b.base_layer.weight", "n.weight", "other.weight"}
    got = resolve_names(SldFile(path), keys)
    assert [(e.name, k) for e, k in got.modules] == [("base_model.model.a", "a.weight"), ("b", "base_model.model.b.base_layer.weight")]
    assert [(t.name, k) for t, k in got.tensors] == [("base_model.model.n.weight", "n.weight")]
    assert [e.name for e in got.missing_modules] == ["c"] and [t.name for t in got.missing_tensors] == ["gone"]
    for mods, tens, want in [({"c": "a"}, {}, "module 'base_model.model.a' and module 'a'"),
                             ({}, {"gone": "a.weight"}, "module 'base_model.model.a' and stored tensor 'a.weight'"),
                             ({}, {"gone": "n.weight"}, "stored tensor 'base_model.model.n.weight' and stored tensor 'n.weight'")]:
        with pytest.raises(ApplyError, match=want):
            resolve_names(renamed(path, mods, tens), keys)


# ----------------------------------------------------------------------------------------------
# Live handles: the same file twice, stacking, removal order
# ----------------------------------------------------------------------------------------------


def two_files(tmp_path, names, shape):
    AX, BX = factors(*shape, seed=1)
    AY, BY = factors(*shape, seed=2)
    x = write_sld(tmp_path / "x.sld", [(names[0], AX, BX, 0.5), (names[1], AX, BX, 0.25)])
    y = write_sld(tmp_path / "y.sld", [(names[0], AY, BY, 0.5)])
    return x, y, (AX, BX, 0.5), (AY, BY, 0.5)


@pytest.mark.parametrize("kind", MODEL_KINDS, ids=lambda k: k[0])
def test_the_same_content_twice_is_refused_unless_stacking_is_allowed(tmp_path, kind):
    _, factory, names, shape = kind
    model = factory()
    x, _, dx, _ = two_files(tmp_path, names, shape)
    W = weight(model, names[0])
    W0 = W.detach().clone()
    before = snapshot(model)
    hx = deltacodec.apply(model, x)
    patched = snapshot(model)
    copy = shutil.copy(x, tmp_path / "copy-of-x.sld")  # same content, another path
    for source in (x, copy, SldFile(copy)):
        with pytest.raises(ApplyError, match=r"already applied .* by handle #\d+ .*x\.sld.*allow_stacking=True"):
            deltacodec.apply(model, source)
        assert_unchanged(model, patched)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeltacodecWarning)  # allow_stacking=True: deliberate, no warning
        hx2 = deltacodec.apply(model, copy, allow_stacking=True)
    torch.testing.assert_close(W.detach(), expected(W0, dx, dx), rtol=1e-5, atol=1e-6)
    hx2.remove()
    assert_unchanged(model, patched)
    hx.remove()
    assert_unchanged(model, before)
    deltacodec.apply(model, x).remove()  # removed handles no longer count


@pytest.mark.parametrize("kind", MODEL_KINDS, ids=lambda k: k[0])
def test_a_different_adapter_stacks_with_a_warning(tmp_path, kind):
    _, factory, names, shape = kind
    model = factory()
    x, y, dx, dy = two_files(tmp_path, names, shape)
    W = weight(model, names[0])
    W0 = W.detach().clone()
    hx = deltacodec.apply(model, x)
    with pytest.warns(DeltacodecWarning, match=r"y\.sld: stacking on weights .*handle #\d+ \(.*x\.sld\) on 1 weight"):
        hy = deltacodec.apply(model, y)
    torch.testing.assert_close(W.detach(), expected(W0, dx, dy), rtol=1e-5, atol=1e-6)
    hy.remove()
    hx.remove()
    assert torch.equal(W.detach(), W0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", MODEL_KINDS, ids=lambda k: k[0])
def test_removing_out_of_order_is_refused_and_in_order_is_bit_exact(tmp_path, kind, dtype):
    _, factory, names, shape = kind
    model = factory().to(dtype)
    x, y, _, _ = two_files(tmp_path, names, shape)
    before = snapshot(model)
    hx = deltacodec.apply(model, x)
    hy = deltacodec.apply(model, y, allow_stacking=True)
    both = snapshot(model)
    with pytest.raises(ApplyError, match=rf"{hx.label.replace('(', '.').replace(')', '.')}.*cannot be removed while {hy.label.replace('(', '.').replace(')', '.')}"):
        hx.remove()
    assert_unchanged(model, both)  # the refused removal changed nothing
    hy.remove()
    hx.remove()
    assert_unchanged(model, before)
    hx.remove()  # a second remove() does nothing
    assert_unchanged(model, before)


def test_with_blocks_nest(tmp_path):
    model = Tiny()
    x, y, dx, dy = two_files(tmp_path, ("lin", "other"), (4, 6))
    before = snapshot(model)
    W0 = model.lin.weight.detach().clone()
    with deltacodec.apply(model, x):
        with deltacodec.apply(model, y, allow_stacking=True):
            torch.testing.assert_close(model.lin.weight.detach(), expected(W0, dx, dy), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.lin.weight.detach(), expected(W0, dx), rtol=1e-5, atol=1e-6)
    assert_unchanged(model, before)
    with pytest.raises(RuntimeError, match="inside"):  # an exception inside the blocks still unwinds them
        with deltacodec.apply(model, x):
            with deltacodec.apply(model, y, allow_stacking=True):
                raise RuntimeError("inside")
    assert_unchanged(model, before)


def test_a_dropped_handle_leaves_its_delta_and_its_record(tmp_path):
    model = Tiny()
    x, _, _, _ = two_files(tmp_path, ("lin", "other"), (4, 6))
    deltacodec.apply(model, x)  # the handle is dropped at once: the delta stays in the weights
    with pytest.raises(ApplyError, match="already applied"):
        deltacodec.apply(model, x)


def test_keep_original_false_is_permanent_for_stacking_and_removal(tmp_path):
    model = Tiny()
    x, y, _, _ = two_files(tmp_path, ("lin", "other"), (4, 6))
    hy = deltacodec.apply(model, y, keep_original=False)
    with pytest.raises(ApplyError, match=r"y\.sld.*keep_original=False: it cannot be removed"):
        hy.remove()
    with pytest.raises(ApplyError, match=r"already applied .*keep_original=False: permanent"):
        deltacodec.apply(model, y)
    model2 = Tiny()
    hx = deltacodec.apply(model2, x)
    with pytest.warns(DeltacodecWarning, match="stacking"):
        deltacodec.apply(model2, y, keep_original=False)
    with pytest.raises(ApplyError, match=r"cannot be removed while handle #\d+ \(.*y\.sld\) \(keep_original=False: permanent\)"):
        hx.remove()


def test_a_weight_written_by_someone_else_forgets_its_handles(tmp_path):
    model = Tiny()
    x, _, _, _ = two_files(tmp_path, ("lin", "other"), (4, 6))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    deltacodec.apply(model, x, keep_original=False)
    model.load_state_dict(before)  # the original weights again, written by torch
    h = deltacodec.apply(model, x)  # not "already applied": the weights no longer carry it
    h.remove()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_weight_converted_after_apply_cannot_be_restored(tmp_path):
    model = Tiny()
    x, _, _, _ = two_files(tmp_path, ("lin", "other"), (4, 6))
    h = deltacodec.apply(model, x)
    model.half()
    with pytest.raises(ApplyError, match=r"now torch\.float16 .* was torch\.float32 .*converted or replaced"):
        h.remove()


def test_a_handle_follows_its_weights_into_a_peft_wrapper(tmp_path):
    # The registry knows weights by identity, not by name: wrapping the patched model with PEFT
    # renames them (base_model.model.…base_layer.weight) and the same file is still recognised.
    model = tiny_llama()
    A, B = factors(16, 16)
    x = write_sld(tmp_path / "x.sld", [(Q, A, B, 1.0)])
    h = deltacodec.apply(model, x)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ApplyError, match=r"already applied to 1 of these weights .*q_proj\.base_layer\.weight"):
        deltacodec.apply(pm, x)
    h.remove()
    deltacodec.apply(pm, x).remove()


def test_the_registry_does_not_keep_models_alive(tmp_path):
    model = Tiny()
    x, _, _, _ = two_files(tmp_path, ("lin", "other"), (4, 6))
    h = deltacodec.apply(model, x)
    refs = [weakref.ref(model), weakref.ref(model.lin.weight)]
    del model, h
    gc.collect()
    assert all(r() is None for r in refs)


# ----------------------------------------------------------------------------------------------
# PEFT adapters on the patched weights
# ----------------------------------------------------------------------------------------------


def test_applying_onto_an_active_peft_adapter_warns_and_names_it(tmp_path):
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    pm.save_pretrained(str(tmp_path / "a"))
    sld = deltacodec.encode(str(tmp_path / "a"), bits=16, out=str(tmp_path / "a.sld"))
    # The file holds this very adapter: applying it onto the PeftModel would count it twice.
    with pytest.warns(DeltacodecWarning, match=r"base_model\.model\.model\.layers\.0\.self_attn\.q_proj \('default' active\).*counts twice"):
        h = deltacodec.apply(pm, sld)
    h.remove()
    pm.merge_adapter()
    with pytest.warns(DeltacodecWarning, match=r"q_proj \('default' merged\)"):
        deltacodec.apply(pm, sld).remove()
    pm.unmerge_adapter()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeltacodecWarning)
        with pm.disable_adapter():  # disabled adapters add nothing
            deltacodec.apply(pm, sld).remove()
        fresh = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
        deltacodec.apply(fresh, sld).remove()  # PEFT's default init: B = 0, nothing counts twice


# ----------------------------------------------------------------------------------------------
# Nothing non-finite reaches a weight
# ----------------------------------------------------------------------------------------------

BF16_MAX = float(torch.finfo(torch.bfloat16).max)  # (2 - 2**-7) * 2**127
OVERFLOWS = {
    # W dtype: (W value, scale, largest |W + ΔW| as reported) with B = A = 1 (rank 1), so
    # W + ΔW = W + scale exactly. fp16 holds at most 65504. bf16: its largest value plus 2**119
    # is (2 - 2**-8) * 2**127, finite in fp32, exactly halfway to 2**128, and rounds to inf (the
    # largest bf16 has an odd significand). fp32: the sum itself is inf.
    torch.float16: (3e4, 6e4, "90000"),
    torch.bfloat16: (BF16_MAX, 2.0**119, "3.39618e+38"),
    torch.float32: (3e38, 1e38, "inf"),
}


def overflow_file(tmp_path, scale: float, extra_module: bool = True) -> str:
    mods = [("lin", *factors(4, 6), 1.0)] if extra_module else []
    mods.append(("other", (1, 6), (4, 1), scale))
    return write_sld(tmp_path / "big.sld", mods)


@pytest.mark.parametrize("keep_original", [True, False])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", list(OVERFLOWS), ids=str)
def test_a_delta_that_overflows_the_weight_dtype_is_refused_and_rolled_back(tmp_path, dtype, backend, keep_original):
    if backend == "triton" and not kernels.triton_available():
        pytest.skip("triton is not installed")
    w0, scale, largest = OVERFLOWS[dtype]
    model = Tiny().to(dtype)
    with torch.no_grad():
        model.other.weight.fill_(w0)
    before = snapshot(model)
    path = overflow_file(tmp_path, scale)
    with pytest.raises(ApplyError) as exc:
        deltacodec.apply(model, path, backend=backend, keep_original=keep_original)
    msg = str(exc.value)
    dt = str(dtype).removeprefix("torch.")
    assert msg.startswith(path) and "module 'other'" in msg and f"not finite in {dt}" in msg
    # keep_original=True: lin, patched first, is restored bit-exactly from its copy. False: the
    # weights not proven finite (other) are patched first, lin (proven) was never written.
    assert f"|W + ΔW| is {largest}" in msg and f"rolled back {int(keep_original)} patched tensor" in msg, msg
    assert_unchanged(model, before)


STORED_OVERFLOWS = [
    # (target dtype, stored values, stored dtype): finite as stored, not once cast to the target
    (torch.float32, 1e300, "F64"),
    (torch.float16, 7e4, "F32"),
    (torch.bfloat16, 3.4e38, "F32"),
    (torch.float16, -1e5, "BF16"),
]


@pytest.mark.parametrize("case", STORED_OVERFLOWS, ids=lambda c: f"{c[2]}-into-{c[0]}".replace("torch.", ""))
def test_a_replacement_not_finite_in_the_target_dtype_is_refused_before_any_change(tmp_path, monkeypatch, case):
    dtype, value, stored = case
    model = Tiny().to(dtype)
    before = snapshot(model)
    values = np.zeros((4, 6), np.float64)
    values[2, 3] = value
    path = write_sld(tmp_path / "r.sld", [("lin", *factors(4, 6), 1.0)], [("other.weight", values, stored)])
    calls = []
    monkeypatch.setattr(kernels, "delta_add", lambda *a, **k: calls.append(1))
    with pytest.raises(ApplyError, match=rf"'other\.weight' cannot replace 'other\.weight': .* not finite in {str(dtype).removeprefix('torch.')}"):
        deltacodec.apply(model, path, strict=False)
    assert calls == []  # refused before the first module was patched
    assert_unchanged(model, before)


# ----------------------------------------------------------------------------------------------
# Every failure is the library's error; warnings for what does not stop the apply
# ----------------------------------------------------------------------------------------------


def test_nothing_matched_with_strict_false_warns(tmp_path):
    model = Tiny()
    before = snapshot(model)
    path = write_sld(tmp_path / "n.sld", [("nowhere", *factors(4, 6), 1.0)])
    with pytest.warns(DeltacodecWarning, match=r"n\.sld: nothing in the file matched the model \(1 module\(s\) missing"):
        missing, unexpected = deltacodec.apply(model, path, strict=False)
    assert missing == ["nowhere"] and unexpected == []
    assert_unchanged(model, before)


def meta_model():
    with torch.device("meta"):
        return Tiny()


def wrong_shape_model():
    m = Tiny()
    m.lin = torch.nn.Linear(3, 4, bias=False)
    return m


def int8_model():
    m = Tiny()
    m.lin.weight = torch.nn.Parameter(torch.zeros(4, 6, dtype=torch.int8), requires_grad=False)
    return m


BAD_TARGETS = {
    # id: (model factory, what the message says)
    "meta-device": (meta_model, "meta device"),
    "int8-weight": (int8_model, "torch.int8"),
    "float64-weight": (lambda: Tiny().double(), "float64"),
    "wrong-shape": (lambda: wrong_shape_model(), "[4, 3]"),
}


@pytest.mark.parametrize("case", list(BAD_TARGETS))
def test_weights_that_cannot_take_a_delta_are_the_librarys_error(tmp_path, case):
    factory, says = BAD_TARGETS[case]
    model = factory()
    path = write_sld(tmp_path / "b.sld", [("lin", *factors(4, 6), 1.0)], [("gain", np.ones(4, np.float32), "F32")])
    with pytest.raises(ApplyError, match="cannot apply") as exc:
        deltacodec.apply(model, path)
    assert str(exc.value).startswith(path) and "lin" in str(exc.value) and says in str(exc.value)
    handle = deltacodec.apply(model, path, strict=False)
    assert "lin" in handle.unexpected and "lin" not in handle.patched


@pytest.mark.parametrize("model", [None, object(), "not a model"], ids=["None", "object", "str"])
def test_something_that_is_not_a_model_is_the_librarys_error(tmp_path, model):
    path = write_sld(tmp_path / "m.sld", [("lin", *factors(4, 6), 1.0)])
    with pytest.raises(ApplyError, match=r"m\.sld: cannot read the model's tensors"):
        deltacodec.apply(model, path)


def test_an_unknown_backend_is_the_librarys_error_naming_the_file(tmp_path):
    model = Tiny()
    before = snapshot(model)
    path = write_sld(tmp_path / "m.sld", [("lin", *factors(4, 6), 1.0)])
    with pytest.raises(ApplyError, match=r"m\.sld: module 'lin': unknown backend 'fast'"):
        deltacodec.apply(model, path, backend="fast")
    assert_unchanged(model, before)


def test_max_decoded_bytes_bounds_what_the_file_may_decode_to(tmp_path):
    path = write_sld(tmp_path / "m.sld", [("lin", *factors(4, 6), 1.0)])  # 2x6 + 4x2 values: 80 bytes as fp32
    for source in (path, SldFile(path)):
        with pytest.raises(SldLimitError, match=r"m\.sld: decoding needs 80 bytes") as exc:
            deltacodec.apply(Tiny(), source, max_decoded_bytes=79)
        assert exc.value.limit == 79 and exc.value.requested == 80
        deltacodec.apply(Tiny(), source, max_decoded_bytes=80)
