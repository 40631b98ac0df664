"""deltacodec.qat (re-exported by deltacodec.sinelora): quantization-aware training of (sine-)LoRA
factors with the codec's own quantizer, and an export that decodes to the forward's factors.

Tiny Llama models built from a config (no download); every reference is computed plainly here."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch

import deltacodec
from deltacodec.errors import AdapterError, EncodeError, OutputError
from deltacodec.quantize import quantize

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
sl = pytest.importorskip("deltacodec.sinelora")
qat = pytest.importorskip("deltacodec.qat")

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def tiny_llama(seed: int = 0):
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def peft_model(method: str, base=None, r: int = 4):
    """B random (init_lora_weights=False) so that ΔW ≠ 0 from the start."""
    base = tiny_llama() if base is None else copy.deepcopy(base)
    kw = dict(r=r, lora_alpha=2 * r, target_modules=TARGETS, init_lora_weights=False)
    torch.manual_seed(1)
    if method == "sine":
        return sl.get_sinelora_model(base, sl.sinelora_config(omega=30.0, **kw))
    return peft.get_peft_model(base, peft.LoraConfig(**kw))


def ids(seed: int = 0, n: int = 3, t: int = 9) -> torch.Tensor:
    return torch.randint(0, 96, (n, t), generator=torch.Generator().manual_seed(seed))


def lora_linears(pm):
    """(name, lora_A module, lora_B module) of every LoRA layer."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(n, m.lora_A["default"], m.lora_B["default"]) for n, m in pm.named_modules()
            if isinstance(m, BaseTunerLayer) and "default" in getattr(m, "r", {})]


def latent(lin):
    return lin.parametrizations.weight.original


def train_steps(pm, n: int, lr: float = 1e-2):
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr)
    pm.train()
    for i in range(n):
        x = ids(100 + i)
        loss = pm(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    pm.eval()
    return opt


def nearest_reference(x: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """Each value's nearest codebook entry, a tie to the lower index (argmin takes the first)."""
    d = np.abs(x.astype(np.float64).reshape(-1, 1) - codebook.astype(np.float64).reshape(1, -1))
    return codebook[np.argmin(d, axis=1)].reshape(x.shape)


METHODS = ["lora", "sine"]


# ----------------------------------------------------------------------------------------------


def test_reexported_by_sinelora():
    for name in ("enable_qat", "disable_qat", "refresh_qat", "export_sld"):
        assert getattr(sl, name) is getattr(qat, name)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bits", [1, 3])
def test_forward_uses_exactly_quantize_reconstruction(method, bits):
    pm = peft_model(method)
    qat.enable_qat(pm, bits=bits)
    layers = lora_linears(pm)
    assert len(layers) == 5
    for name, la, lb in layers:
        for lin in (la, lb):
            x = latent(lin).detach().numpy()
            q = quantize(x, bits)
            want = q.codebook[q.indices].reshape(x.shape)
            assert np.array_equal(lin.weight.detach().numpy(), want), name


@pytest.mark.parametrize("method", METHODS)
def test_between_refits_each_value_takes_its_nearest_stored_entry(method):
    pm = peft_model(method)
    st = qat.enable_qat(pm, bits=2, refresh_every=1000)
    _, la, lb = lora_linears(pm)[0]
    cb_before = la.parametrizations.weight[0].codebook.clone()
    train_steps(pm, 3)
    assert st.refreshes == 1  # no refit: the codebook is the one fitted at enable_qat
    assert torch.equal(la.parametrizations.weight[0].codebook, cb_before)
    for lin in (la, lb):
        x = latent(lin).detach().numpy()
        cb = lin.parametrizations.weight[0].codebook.numpy()
        assert np.array_equal(lin.weight.detach().numpy(), nearest_reference(x, cb))


def test_refit_period_counts_training_forward_calls_only():
    pm = peft_model("lora")
    st = qat.enable_qat(pm, bits=2, refresh_every=2)
    assert st.refreshes == 1
    train_steps(pm, 5)  # refits before calls 3 and 5
    assert (st.steps, st.refreshes) == (5, 3)
    with torch.no_grad():
        pm(input_ids=ids())  # eval mode: not a step
    assert st.steps == 5


@pytest.mark.parametrize("method", METHODS)
def test_straight_through_gradient_reaches_the_latent_factors(method):
    pm = peft_model(method)
    qat.enable_qat(pm, bits=2)
    x = ids()
    pm.train()
    pm(input_ids=x, labels=x).loss.backward()
    # Reference: the same model with the quantized values as its plain (leaf) factors; STE means
    # the latent's gradient is exactly the gradient with respect to the quantized factor.
    ref = peft_model(method)
    qf = qat.quantized_factors(pm)
    with torch.no_grad():
        for (n, la, lb), (n2, ra, rb) in zip(lora_linears(pm), lora_linears(ref)):
            assert n == n2
            ra.weight.copy_(qf[n][0])
            rb.weight.copy_(qf[n][1])
    ref.train()
    ref(input_ids=x, labels=x).loss.backward()
    for (n, la, lb), (_, ra, rb) in zip(lora_linears(pm), lora_linears(ref)):
        for lin, r in ((la, ra), (lb, rb)):
            g = latent(lin).grad
            assert g is not None and float(g.abs().max()) > 0, n
            torch.testing.assert_close(g, r.weight.grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_optimizer_built_before_enable_trains_the_latent(method):
    pm = peft_model(method)
    _, la, _ = lora_linears(pm)[0]
    param = la.weight
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.1)
    qat.enable_qat(pm, bits=3)
    assert latent(la) is param
    before = param.detach().clone()
    x = ids()
    pm.train()
    pm(input_ids=x, labels=x).loss.backward()
    opt.step()
    assert not torch.equal(param.detach(), before)


@pytest.mark.parametrize("method", METHODS)
def test_disable_restores_the_plain_model(method):
    pm = peft_model(method)
    keys = sorted(pm.state_dict())
    params = [p for p in pm.parameters()]
    x = ids()
    with torch.no_grad():
        y0 = pm(input_ids=x).logits
    qat.enable_qat(pm, bits=1)
    with torch.no_grad():
        yq = pm(input_ids=x).logits
    assert not torch.equal(yq, y0)  # 1 bit changes the output
    qat.disable_qat(pm)
    assert not qat.qat_enabled(pm)
    with torch.no_grad():
        y1 = pm(input_ids=x).logits
    assert torch.equal(y1, y0)
    assert sorted(pm.state_dict()) == keys
    assert all(a is b for a, b in zip(pm.parameters(), params))
    pm.train()
    pm(input_ids=x)  # the step hook is gone too: no error, no state
    qat.enable_qat(pm, bits=2)  # and QAT can be turned on again


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bits", [1, 2, 3])
def test_export_decodes_bit_exactly_to_the_qat_forward(method, bits, tmp_path):
    base = tiny_llama()
    pm = peft_model(method, base)
    qat.enable_qat(pm, bits=bits, refresh_every=3)
    train_steps(pm, 4)
    path = qat.export_sld(pm, tmp_path / "a.sld")
    assert path == str(tmp_path / "a.sld")
    f = deltacodec.load(path)
    assert f.metadata["method"] == ("sine" if method == "sine" else "lora")
    qf = qat.quantized_factors(pm)
    assert sorted(m.name for m in f.modules) == sorted(qf)
    for m in f.modules:
        e = m.A
        assert e.encoding == "codebook" and e.bits == bits
        A, B = f.dequantize(m.name)
        assert np.array_equal(A.view(np.uint32), qf[m.name][0].numpy().view(np.uint32)), m.name
        assert np.array_equal(B.view(np.uint32), qf[m.name][1].numpy().view(np.uint32)), m.name
    # The same quantization, written independently: quantize() on the final latent factors.
    for n, la, lb in lora_linears(pm):
        for lin, got in ((la, qf[n][0]), (lb, qf[n][1])):
            q = quantize(latent(lin).detach().numpy(), bits)
            assert np.array_equal(got.numpy(), q.codebook[q.indices].reshape(got.shape))
    x = ids(7)
    with torch.no_grad():
        y = pm(input_ids=x).logits
    # A plain PEFT model holding the decoded factors computes exactly the QAT forward.
    plain = peft_model(method, base)
    with torch.no_grad():
        for n, la, lb in lora_linears(plain):
            A, B = f.dequantize(n)
            la.weight.copy_(torch.from_numpy(A))
            lb.weight.copy_(torch.from_numpy(B))
        assert torch.equal(plain(input_ids=x).logits, y)
    # The bare base patched with the file (ΔW merged into W, float32): the same function up to
    # float32 rounding of W + ΔW against the unmerged sum (relative ~1e-6 per layer; 1e-4 of
    # the logits' scale leaves a wide margin).
    b2 = copy.deepcopy(base)
    with deltacodec.apply(b2, path, backend="torch"):
        with torch.no_grad():
            ya = b2(input_ids=x).logits
    assert float((ya - y).abs().max()) <= 1e-4 * float(y.abs().max())


def test_export_raw_float16_factor_is_exact_too(tmp_path):
    """A factor of a handful of values is stored as raw float16 by the codec (smaller than a
    codebook): the export switches that factor's forward pass to float16 rounding."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.small = torch.nn.Linear(4, 3)
            self.big = torch.nn.Linear(64, 64)

        def forward(self, x):
            return self.big(torch.cat([self.small(x[:, :4]), x[:, 3:]], dim=1))

    torch.manual_seed(0)
    pm = peft.get_peft_model(Net(), peft.LoraConfig(r=1, lora_alpha=2, target_modules=["small", "big"],
                                                     init_lora_weights=False))
    qat.enable_qat(pm, bits=3)
    path = qat.export_sld(pm, tmp_path / "s.sld")
    f = deltacodec.load(path)
    enc = {m.name.split(".")[-1]: (m.A.encoding, m.B.encoding) for m in f.modules}
    assert enc["small"] == ("raw", "raw") and enc["big"] == ("codebook", "codebook")
    qf = qat.quantized_factors(pm)
    for m in f.modules:
        A, B = f.dequantize(m.name)
        assert np.array_equal(A, qf[m.name][0].numpy()) and np.array_equal(B, qf[m.name][1].numpy())
    small = dict(pm.named_modules())["base_model.model.small"].lora_A["default"]
    x16 = latent(small).detach().to(torch.float16).to(torch.float32)
    assert torch.equal(small.weight.detach(), x16)


@pytest.mark.parametrize("target", [{"bits": 2}, {"bits_per_param": 8.0}], ids=["kmeans", "rate-controlled"])
def test_export_refuses_an_existing_file_without_force(tmp_path, target):
    pm = peft_model("lora")
    qat.enable_qat(pm, **target)
    p = tmp_path / "a.sld"
    p.write_bytes(b"keep")
    with pytest.raises(OutputError):
        qat.export_sld(pm, p)
    assert p.read_bytes() == b"keep"
    qat.export_sld(pm, p, force=True)
    assert deltacodec.load(p).modules


def test_model_without_lora_layers_is_a_library_error():
    with pytest.raises(AdapterError, match="no LoRA layers"):
        qat.enable_qat(tiny_llama(), bits=3)


@pytest.mark.parametrize("bits", [0, 9, 16, -1, True, 2.0, "3"])
def test_bits_out_of_range(bits):
    pm = peft_model("lora")
    with pytest.raises(EncodeError, match="bits"):
        qat.enable_qat(pm, bits=bits)
    assert not qat.qat_enabled(pm)


@pytest.mark.parametrize("kw", [{"quantizer": "ecsq"}, {"refresh_every": 0}, {"refresh_every": 1.5}])
def test_bad_options(kw):
    with pytest.raises(EncodeError):
        qat.enable_qat(peft_model("sine"), bits=2, **kw)


def test_state_errors(tmp_path):
    pm = peft_model("lora")
    with pytest.raises(EncodeError, match="not enabled"):
        qat.export_sld(pm, tmp_path / "x.sld")
    with pytest.raises(EncodeError, match="not enabled"):
        qat.disable_qat(pm)
    qat.enable_qat(pm, bits=2)
    with pytest.raises(EncodeError, match="already enabled"):
        qat.enable_qat(pm, bits=3)
    assert not os.path.exists(tmp_path / "x.sld")


def test_half_precision_factors_are_refused():
    pm = peft_model("lora").to(torch.bfloat16)
    with pytest.raises(AdapterError, match="float32"):
        qat.enable_qat(pm, bits=2)


def test_two_adapters_need_a_name():
    pm = peft_model("lora")
    pm.add_adapter("other", peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(AdapterError, match="several adapters"):
        qat.enable_qat(pm, bits=2)
    st = qat.enable_qat(pm, bits=2, adapter_name="other")
    assert len(st.layers) == 1


@pytest.mark.slow
def test_rd_qat_quick_run(tmp_path):
    """benchmarks/rd_qat.py end to end on a small grid: every arm writes its point, and each QAT
    file patched onto the base scores exactly what the QAT model itself scores."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("bjontegaard")
    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "rdq"
    proc = subprocess.run(
        [sys.executable, "benchmarks/rd_qat.py", "--quick", "--ranks", "2", "--bits", "1", "2", "--steps", "40",
         "--out", str(out), "--cache-dir", str(tmp_path / "cache")],
        cwd=repo, capture_output=True, text=True, timeout=3600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((out / "measurements.json").read_text())["measurements"]
    assert sorted((r["method"], r["arm"], r["bits"]) for r in rows) == sorted(
        (m, a, b) for m in ("LoRA", "SineLoRA") for a in ("PTQ", "QAT") for b in (1, 2))
    for r in rows:
        if r["arm"] == "QAT":
            assert r["accuracy"] == r["model_accuracy"]
            assert r["qat_steps"] == 10 and r["steps"] == 40
    assert (out / "rd_qat.csv").read_text().startswith("method,group,rate,quality")


@pytest.mark.slow
def test_rd_qat_text_quick_run(tmp_path):
    """benchmarks/rd_qat.py --testbed text on rd_text's quick model: every arm writes its point;
    each QAT file patched onto the base scores the QAT model's own held-out bits/byte up to float32
    rounding; the PTQ arm's unquantized adapter is the one rd_text.py trains with the same
    settings (bit for bit: equal test bits/byte)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("bjontegaard")
    repo = Path(__file__).resolve().parents[1]
    out, ref = tmp_path / "rdq", tmp_path / "rdt"
    common = ["--quick", "--ranks", "2", "--bits", "1", "2", "--steps", "12", "--threads", "1",
              "--cache-dir", str(tmp_path / "cache")]
    proc = subprocess.run([sys.executable, "benchmarks/rd_qat.py", "--testbed", "text", *common, "--out", str(out)],
                          cwd=repo, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((out / "measurements.json").read_text())["measurements"]
    assert sorted((r["method"], r["arm"], r["bits"]) for r in rows) == sorted(
        (m, a, b) for m in ("LoRA", "SineLoRA") for a in ("PTQ", "QAT") for b in (1, 2))
    for r in rows:
        assert r["quality"] == -r["bits_per_byte"]
        if r["arm"] == "QAT":
            # The file holds exactly the factors of the QAT forward pass (export_sld checks it bit
            # for bit); apply merges ΔW into W while PEFT adds the low-rank path, so the float32
            # logits differ in rounding only: ~1e-7 bpb in the full runs, 1e-5 leaves margin.
            assert abs(r["bits_per_byte"] - r["model_bits_per_byte"]) < 1e-5
            assert r["qat_steps"] == 3 and r["steps"] == 12
    proc = subprocess.run([sys.executable, "benchmarks/rd_text.py", *common, "--out", str(ref)],
                          cwd=repo, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained = {(a["method"], a["rank"]): a["test"]["bits_per_byte"]
               for a in json.loads((ref / "measurements.json").read_text())["adapters"]}
    for r in rows:
        assert r["unquantized_bits_per_byte"] == trained[(r["method"], r["rank"])]
    assert (out / "rd_qat.csv").read_text().startswith("method,group,rate,quality")


@pytest.mark.slow
def test_rd_qat_text_rate_controlled_arms(tmp_path):
    """rd_qat.py --bits-per-param: PTQ is the codec at the bits/param target, QAT trains through
    it; both files land at or under the target (rate control's contract), each QAT file scores the
    QAT model's own bits/byte, and a target the adapter cannot reach is a missing point for both
    arms, not a failed run."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("bjontegaard")
    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "rdq"
    proc = subprocess.run(
        [sys.executable, "benchmarks/rd_qat.py", "--testbed", "text", "--quick", "--ranks", "8", "--steps", "12",
         "--threads", "1", "--bits-per-param", "0.5", "3", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)],
        cwd=repo, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "measurements.json").read_text())
    assert summary["settings"]["bits_per_param"] is True and summary["settings"]["quantizer"] == "ecsq"
    rows = summary["measurements"]
    # 0.5 bits/param is below the container alone for a rank-8 quick adapter (~3,000 parameters)
    assert sorted((r["method"], r["arm"], r["bits"]) for r in rows) == sorted(
        (m, a, 3.0) for m in ("LoRA", "SineLoRA") for a in ("PTQ", "QAT"))
    assert "0.5b/p: no point" in proc.stderr + proc.stdout
    for r in rows:
        assert r["setting"] == "3b/p"
        f = deltacodec.load(out / "sld" / f"{r['method']}-r8-b3-{r['arm'].lower()}.sld")
        n = sum(m.A.numel + m.B.numel for m in f.modules)
        assert 0.95 * 3 * n <= r["bytes"] * 8 <= 3 * n
        if r["arm"] == "QAT":
            assert abs(r["bits_per_byte"] - r["model_bits_per_byte"]) < 1e-5  # as in the fixed-bits test
    assert len((out / "rd_qat.csv").read_text().splitlines()) == 1 + len(rows)


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_rd_qat_refuses_bad_bits_per_param_before_any_work(value, capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import rd_qat

    with pytest.raises(SystemExit, match=r"--bits-per-param must be positive and finite"):
        rd_qat.main(["--quick", "--bits-per-param", value, "2"])


def test_rd_qat_bits_and_bits_per_param_exclude_each_other(capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import rd_qat

    with pytest.raises(SystemExit) as exc:
        rd_qat.parse_args(["--bits", "2", "--bits-per-param", "2"])
    assert exc.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_rd_qat_envelope_pools_runs_and_measures_the_saving(tmp_path, capsys):
    """rd_qat.py --envelope: every file of an arm on one curve, pooled across a fixed-bits run and
    a bits/param run of the same seed; an arm whose files reach the same quality with 0.8× the
    bytes shows a BD-rate of −20 % against PTQ k-means (log-linear curves: exact up to the
    interpolation), and a worse arm a positive one."""
    import json
    import sys
    from pathlib import Path

    pytest.importorskip("bjontegaard")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import rd_qat

    def run(d, quantizer, arms):
        recs = [{"method": m, "rank": k, "arm": arm, "bits": 2, "bytes": rate * factor, "quality": float(np.log2(rate))}
                for arm, factor in arms for k, rate in enumerate((1000.0, 2000.0, 4000.0, 8000.0))
                for m in ("LoRA", "SineLoRA")]
        d.mkdir()
        settings = {"seed": 0, **({"quantizer": quantizer} if quantizer else {})}
        (d / "measurements.json").write_text(json.dumps({"settings": settings, "measurements": recs}))
        return d

    a = run(tmp_path / "fixed", None, [("PTQ", 1.0), ("QAT", 1.25)])
    b = run(tmp_path / "bpp", "ecsq", [("PTQ", 0.8)])
    rd_qat.envelope([a, b])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if "seed 0 LoRA" in line]
    assert len(rows) == 1
    assert "PTQ-ecsq -20.00%" in rows[0] and "QAT-kmeans +25.00%" in rows[0]


# ---------------------------------------------------------------------------------------------
# rate-controlled QAT: bits_per_param with the codec's ecsq/auto


@pytest.mark.parametrize("method", ["lora", "sine"])
def test_rate_controlled_forward_is_what_the_codec_writes_and_export_is_exact(method, tmp_path):
    pm = peft_model(method)
    pm.save_pretrained(str(tmp_path / "latent"))  # the latent factors as PEFT saves them
    a = deltacodec.read_adapter(str(tmp_path / "latent"))
    # save_pretrained's config differs from the live one in bookkeeping keys (inference_mode,
    # auto_mapping), which changes the header's size and so the allocation: take the live config
    a.config = qat._plain(pm.peft_config["default"].to_dict())
    ref = deltacodec.load(deltacodec.encode(a, bits_per_param=8.0, quantizer="ecsq", out=str(tmp_path / "ref.sld")))
    qat.enable_qat(pm, bits_per_param=8.0)
    got = qat.quantized_factors(pm)
    for m in ref.modules:  # independent: the codec run on what save_pretrained wrote
        name = m.name
        A, B = ref.dequantize(name)
        qa, qb = got[name]
        assert np.array_equal(qa.numpy(), A) and np.array_equal(qb.numpy(), B), name
    before = {n: (latent(a).detach().clone(), latent(b).detach().clone()) for n, a, b in lora_linears(pm)}
    train_steps(pm, 3)
    moved = [n for n, a, b in lora_linears(pm) if not torch.equal(latent(a), before[n][0])]
    assert moved  # straight-through gradients reach the latent factors
    out = qat.export_sld(pm, str(tmp_path / "qat.sld"))
    f = deltacodec.load(out)
    assert f.version == 2 and 8.0 * f.file_size / sum(m.rank * (m.in_features + m.out_features) for m in f.modules) <= 8.0
    now = qat.quantized_factors(pm)
    for m in f.modules:
        A, B = f.dequantize(m.name)
        assert np.array_equal(now[m.name][0].numpy(), A) and np.array_equal(now[m.name][1].numpy(), B)
    x = ids(7)
    with torch.no_grad():
        want = pm(input_ids=x).logits
    qat.disable_qat(pm)
    plain = peft_model(method)
    with torch.no_grad():  # a plain PEFT model holding the file's factors gives the QAT forward's logits
        for (n, a, b) in lora_linears(plain):
            A, B = f.dequantize(n)
            a.weight.copy_(torch.from_numpy(A))
            b.weight.copy_(torch.from_numpy(B))
        assert torch.equal(plain(input_ids=x).logits, want)


@pytest.mark.parametrize("kw,why", [
    ({"bits": 3, "bits_per_param": 2.0}, "not both"),
    ({"bits_per_param": 2.0, "quantizer": "kmeans"}, "ecsq or auto"),
    ({"bits_per_param": float("nan")}, "positive finite"),
    ({"bits_per_param": 0}, "positive finite"),
])
def test_rate_controlled_options_are_checked(kw, why):
    pm = peft_model("lora")
    with pytest.raises(EncodeError, match=why):
        qat.enable_qat(pm, **kw)
    assert not qat.qat_enabled(pm)
