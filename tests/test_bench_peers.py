"""The peers of benchmarks/bench_peers.py, each against a plain reference written out here.

GGUF Q8_0 / Q4_0 block maths, NF4 (levels against the QLoRA paper's published table, coding
against a brute-force nearest level per block), the fp16/bf16 rounding and lossless coders,
ggml's K-quants (when the library is built: block sizes, error bounds, and ggml's Q8_0/Q4_0
bytes equal to the gguf package's), and the equal-distortion arithmetic.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

gguf = pytest.importorskip("gguf")
zstandard = pytest.importorskip("zstandard")

from peers import compare  # noqa: E402
from peers.ggml_lib import load_ggml  # noqa: E402
from peers.gguf_quants import block_size, code_factor, gguf_has_quantizer, quantize_flat  # noqa: E402
from peers.lossless import code_zipnn, code_zstd, from16, to16, zipnn_version  # noqa: E402
from peers.nf4 import BLOCK, DQ_GROUP, code_nf4, nf4_levels  # noqa: E402


def _heavy(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_t(4, n) * 1e-2).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# GGUF legacy types: the block maths written out
# --------------------------------------------------------------------------------------------------


def test_q8_0_matches_the_block_definition():
    # Q8_0: blocks of 32, d = absmax/127 stored as fp16, q = round(x/d) in int8; x̂ = fp16(d)·q.
    x = _heavy(32 * 7)
    blocks, x_hat, pad = quantize_flat(x, "Q8_0")
    assert pad == 0 and blocks.nbytes == 7 * (2 + 32)
    ref = np.empty_like(x)
    for b in range(7):
        v = x[32 * b : 32 * b + 32].astype(np.float64)
        d = np.abs(v).max() / 127
        q = np.rint(v / d)
        ref[32 * b : 32 * b + 32] = np.float16(d).astype(np.float64) * q
    # x/d vs x·(1/d) can differ in the last ulp; a flipped rounding would be off by a whole step
    np.testing.assert_allclose(x_hat, ref, rtol=0, atol=1e-9)
    # the bytes are the blocks: fp16 d then 32 int8
    d0 = blocks[0, :2].view(np.float16)[0]
    assert d0 == np.float16(np.abs(x[:32]).max() / 127)


def test_q4_0_matches_the_block_definition():
    # Q4_0: blocks of 32, m = the signed value of largest magnitude, d = m / -8 (fp16),
    # q = clamp(floor(x/d + 8.5), 0, 15), x̂ = (q - 8)·fp16(d).
    x = _heavy(32 * 5, seed=1)
    blocks, x_hat, _ = quantize_flat(x, "Q4_0")
    assert blocks.nbytes == 5 * (2 + 16)
    ref = np.empty_like(x)
    for b in range(5):
        v = x[32 * b : 32 * b + 32].astype(np.float64)
        m = v[np.argmax(np.abs(v))]
        d = m / -8
        q = np.clip(np.floor(v / d + 8.5), 0, 15)
        ref[32 * b : 32 * b + 32] = (q - 8) * np.float16(d).astype(np.float64)
    np.testing.assert_allclose(x_hat, ref, rtol=0, atol=1e-9)


def test_factor_orientation_and_padding():
    rng = np.random.default_rng(2)
    B = rng.normal(size=(10, 3)).astype(np.float32)  # out × r: quantized as Bᵀ's 30 values
    c = code_factor(B, "Q8_0", transpose=True)
    assert c.x_hat.shape == B.shape and c.pad == 2 and c.nbytes == 34
    flat = quantize_flat(np.ascontiguousarray(B.T).reshape(-1), "Q8_0")[1]
    np.testing.assert_array_equal(c.x_hat, flat.reshape(3, 10).T)


def test_gguf_package_quantizes_only_the_legacy_types():
    # the reason ggml is needed: if a gguf release adds K-quant quantizers this says so
    assert gguf_has_quantizer("Q8_0") and gguf_has_quantizer("Q4_0")
    assert block_size("Q2_K") == 256 and block_size("Q8_0") == 32


# --------------------------------------------------------------------------------------------------
# ggml's K-quants (only where the library has been built: bench_peers.py --llama-cpp-src)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ggml():
    q, how = load_ggml()
    if q is None:
        pytest.skip(how)
    return q


# bytes per 256 values (llama.cpp's block layouts) and a bound on max|x̂ - x| / max|x| per block
K_QUANTS = {"Q2_K": (84, 0.5), "Q3_K": (110, 0.25), "Q4_K": (144, 0.12), "Q5_K": (176, 0.06), "Q6_K": (210, 0.03)}


@pytest.mark.parametrize("name", sorted(K_QUANTS))
def test_k_quants_blocks_and_error(ggml, name):
    x = _heavy(256 * 4, seed=3)
    blocks, x_hat, pad = quantize_flat(x, name, ggml)
    nbytes, bound = K_QUANTS[name]
    assert pad == 0 and blocks.nbytes == 4 * nbytes
    for b in range(4):
        v, h = x[256 * b : 256 * b + 256], x_hat[256 * b : 256 * b + 256]
        assert np.abs(h - v).max() <= bound * np.abs(v).max()
    # more bits, less error: the types are what their names say
    errs = [float(np.linalg.norm(quantize_flat(x, t, ggml)[1] - x)) for t in sorted(K_QUANTS)]
    assert errs == sorted(errs, reverse=True)


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0"])
def test_ggml_and_gguf_package_write_the_same_blocks(ggml, name):
    x = _heavy(32 * 16, seed=4).reshape(1, -1)
    ours = gguf.quants.quantize(x, gguf.GGMLQuantizationType[name])
    theirs = ggml.quantize(x, int(gguf.GGMLQuantizationType[name]))
    np.testing.assert_array_equal(np.asarray(ours, np.uint8).reshape(-1), theirs.reshape(-1))


# --------------------------------------------------------------------------------------------------
# NF4
# --------------------------------------------------------------------------------------------------

# QLoRA (Dettmers et al. 2023), appendix E: the NF4 data type's values
PAPER_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]


def test_nf4_levels_are_the_papers():
    lv = nf4_levels()
    assert lv.shape == (16,) and np.all(np.diff(lv) > 0) and np.count_nonzero(lv == 0) == 1
    np.testing.assert_allclose(lv, PAPER_NF4, rtol=0, atol=1e-6)


def test_nf4_coding_is_nearest_level_per_block():
    x = _heavy(BLOCK * 3 + 10, seed=5).reshape(-1, 2)  # 202 values: the last block padded
    c = code_nf4(x)
    n_blocks = 4
    assert c.pad == n_blocks * BLOCK - x.size
    assert c.nbytes == n_blocks * BLOCK // 2 + 4 * n_blocks
    lv = nf4_levels().astype(np.float64)
    flat = x.reshape(-1).astype(np.float64)
    ref = np.empty_like(flat)
    for b in range(n_blocks):
        v = flat[BLOCK * b : BLOCK * b + BLOCK]
        a = np.abs(v).max()
        for i, val in enumerate(v):
            ref[BLOCK * b + i] = lv[np.argmin(np.abs(val / a - lv))] * a
    np.testing.assert_allclose(c.x_hat.reshape(-1), ref, rtol=1e-6, atol=0)


def test_nf4_double_quant_bytes_and_error():
    x = _heavy(BLOCK * 300, seed=6)
    plain, dq = code_nf4(x), code_nf4(x, double_quant=True)
    n_blocks = 300
    assert dq.nbytes == n_blocks * BLOCK // 2 + n_blocks + 4 * math.ceil(n_blocks / DQ_GROUP) + 4
    assert 8 * dq.nbytes / x.size == pytest.approx(4 + 8 / 64 + 32 * 2 / (64 * 300) + 32 / (64 * 300), abs=1e-9)
    e_plain = np.linalg.norm(plain.x_hat - x)
    e_dq = np.linalg.norm(dq.x_hat - x)
    # the rounded absmax moves each block's grid by < 1/254 of it: either way, a few percent at most
    assert abs(e_dq - e_plain) <= 0.05 * e_plain


# --------------------------------------------------------------------------------------------------
# 16-bit + lossless coders
# --------------------------------------------------------------------------------------------------


def test_bf16_and_fp16_rounding_match_torch():
    torch = pytest.importorskip("torch")
    x = np.concatenate([_heavy(5000, seed=7), np.array([0.0, -0.0, 1.0, 3.0e38, 1e-40], np.float32)])
    t = torch.from_numpy(x)
    np.testing.assert_array_equal(to16(x, "bf16"), t.bfloat16().view(torch.int16).numpy().view(np.uint16))
    with np.errstate(over="ignore"):  # 3e38 overflows fp16 to inf, in numpy as in torch
        fp16 = to16(x, "fp16")
    np.testing.assert_array_equal(fp16, t.half().view(torch.int16).numpy().view(np.uint16))
    np.testing.assert_array_equal(from16(to16(x, "bf16"), "bf16"), t.bfloat16().float().numpy())


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_zstd_peer_is_exact_and_counts_its_stream(dtype):
    x = _heavy(4096, seed=8)
    c = code_zstd(x, dtype, level=3)
    raw = to16(x, dtype).tobytes()
    assert c.exact is True
    assert c.nbytes == len(zstandard.ZstdCompressor(level=3).compress(raw))
    np.testing.assert_array_equal(c.x_hat, from16(to16(x, dtype), dtype))


def test_zipnn_peer_reports_its_round_trip():
    if zipnn_version() is None:
        pytest.skip("zipnn is not installed")
    x = _heavy(4096, seed=9)
    c = code_zipnn(x, "fp16")
    assert c.exact is True and 0 < c.nbytes < 2 * x.size
    # bf16: whatever zipnn does, the flag is the comparison of its output with the input
    assert code_zipnn(x, "bf16").exact in (True, False)


# --------------------------------------------------------------------------------------------------
# Equal-distortion arithmetic
# --------------------------------------------------------------------------------------------------


def test_pareto_front_drops_dominated_points():
    pts = [(100, 0.5), (200, 0.2), (150, 0.6), (300, 0.2), (400, 0.1)]
    assert compare.pareto_front(pts) == [(100, 0.5), (200, 0.2), (400, 0.1)]


def test_bytes_at_interpolates_log_bytes_in_log_distortion():
    front = [(100.0, 0.4), (400.0, 0.1)]
    # halfway in log(d) between 0.4 and 0.1 is 0.2: halfway in log(bytes) is 200
    assert compare.bytes_at(front, 0.2) == pytest.approx(200.0)
    assert compare.bytes_at(front, 0.4) == 100.0 and compare.bytes_at(front, 0.1) == 400.0
    assert compare.bytes_at(front, 0.5) is None and compare.bytes_at(front, 0.05) is None
    # linear distortion (losses): halfway between 2.0 and 1.0 is 1.5
    assert compare.bytes_at([(100.0, 2.0), (400.0, 1.0)], 1.5, log_d=False) == pytest.approx(200.0)
    assert compare.equal_distortion_ratio(150.0, 0.2, front) == pytest.approx(0.75)


def test_smallest_within_takes_a_real_setting():
    pts = [(100, 0.5), (200, 0.2), (400, 0.1)]
    assert compare.smallest_within(pts, 0.3) == 200
    assert compare.smallest_within(pts, 0.05) is None


def test_bench_rows_and_ratios_on_a_tiny_adapter(tmp_path):
    import bench_peers
    from deltacodec.adapter import Adapter, AdapterModule

    rng = np.random.default_rng(10)
    mods = [AdapterModule(name=f"base_model.model.l{i}.q_proj", A=rng.uniform(-0.1, 0.1, (4, 64)).astype(np.float32),
                          B=(rng.standard_t(4, (64, 4)) * 1e-2).astype(np.float32), scale=2.0) for i in range(2)]
    bed = bench_peers.Testbed(name="tiny", adapter=Adapter(modules=mods, config={"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    rows = []
    for bits in (2, 4, 8):
        res = bench_peers.deltacodec_arm(bed.adapter, f"dc kmeans {bits}b", {"bits": bits, "quantizer": "kmeans"}, str(tmp_path))
        rows.append(bench_peers.measure(bed, res, check_apply=False))
    res = bench_peers._factorwise(bed.adapter, "NF4", "nf4", lambda x, _: code_nf4(x))
    rows.append(bench_peers.measure(bed, res, check_apply=False))
    # the error column is the plain ΔW error of the dequantized factors
    m, q = mods[0], res.modules[0]
    want = np.linalg.norm(q.B.astype(np.float64) @ q.A - m.B.astype(np.float64) @ m.A) / np.linalg.norm(
        m.B.astype(np.float64) @ m.A)
    got = bench_peers.module_errors(bed.adapter, [q])[0]
    assert got == pytest.approx(want, rel=1e-9)
    assert rows[-1]["bytes"] == 2 * (4 * 64 // 2 + 4 * 4 + 64 * 4 // 2 + 4 * 4)
    errs = [r["dw_rel_error_mean"] for r in rows[:3]]
    assert errs == sorted(errs, reverse=True)
    ratios = bench_peers.ratio_rows(rows)
    vs_nf4 = [r for r in ratios if r["kind"] == "vs_peer" and r["arm"] == "NF4"]
    assert len(vs_nf4) == 1
    dc_front = compare.pareto_front((r["bytes"], r["dw_rel_error_mean"]) for r in rows[:3])
    b = compare.bytes_at(dc_front, rows[-1]["dw_rel_error_mean"])
    assert vs_nf4[0]["ratio"] == (None if b is None else pytest.approx(b / rows[-1]["bytes"]))
    assert dataclasses.is_dataclass(res) and res.exact is None


def _tiny_bed(seed: int = 11):
    import bench_peers
    from deltacodec.adapter import Adapter, AdapterModule

    rng = np.random.default_rng(seed)
    mods = [AdapterModule(name=f"base_model.model.l{i}.q_proj", A=rng.uniform(-0.1, 0.1, (4, 64)).astype(np.float32),
                          B=(rng.standard_t(4, (64, 4)) * 1e-2).astype(np.float32), scale=2.0) for i in range(2)]
    return bench_peers.Testbed(name="tiny", adapter=Adapter(modules=mods, config={"peft_type": "LORA", "r": 4, "lora_alpha": 8}))


def test_lossless_rows_flag_exactness_against_the_rounded_source(tmp_path):
    import bench_peers

    bed = _tiny_bed()
    rows = bench_peers.lossless_rows(bed, zipnn_ok=False, tmp=str(tmp_path))
    by = {(r["source_dtype"], r["arm"]): r for r in rows}
    # an fp16 source through float16 pass-through is bit-exact; zstd always is
    assert by[("fp16", "dc 16b on fp16")]["exact"] is True
    assert by[("fp16", "fp16+zstd")]["exact"] is True and by[("bf16", "bf16+zstd")]["exact"] is True
    for dt in ("fp16", "bf16"):
        dc = by[(dt, f"dc 16b on {dt}")]
        assert dc["ratio_vs_best_exact_peer"] == pytest.approx(dc["bytes"] / by[(dt, f"{dt}+zstd")]["bytes"])


def test_gguf_arm_writes_a_gguf_file_around_its_blocks(tmp_path):
    import bench_peers
    from peers.gguf_quants import code_factor

    bed = _tiny_bed()
    res = bench_peers._factorwise(bed.adapter, "GGUF Q8_0", "gguf",
                                  lambda x, is_b: code_factor(x, "Q8_0", transpose=is_b), gguf_type="Q8_0", tmp=str(tmp_path))
    assert res.nbytes == 2 * 2 * (256 // 32) * 34  # two modules, A and B, 256 values each
    reader = gguf.GGUFReader(str(tmp_path / "GGUF_Q8_0.gguf"))
    assert res.container_bytes == (tmp_path / "GGUF_Q8_0.gguf").stat().st_size > res.nbytes
    assert sum(int(t.n_bytes) for t in reader.tensors) == res.nbytes
    assert {t.name for t in reader.tensors} == {"blk.0.q_proj.weight.lora_a", "blk.0.q_proj.weight.lora_b",
                                                "blk.1.q_proj.weight.lora_a", "blk.1.q_proj.weight.lora_b"}


def test_csv_round_trip_keeps_numbers(tmp_path):
    import bench_peers

    rows = [{"adapter": "a", "arm": "GGUF Q2_K", "bytes": 10, "bits_per_param": 2.5, "exact": True, "file_bytes": ""},
            {"adapter": "a", "arm": "dc 16b", "bytes": 12, "bits_per_param": 3.0, "exact": False, "loss": 0.25}]
    bench_peers.write_csv(rows, tmp_path / "p.csv")
    back = bench_peers.read_csv(tmp_path / "p.csv")
    assert back[0] == {k: v for k, v in rows[0].items() if v != ""}
    assert back[1] == rows[1]


def test_ggml_build_failure_is_reported_not_raised(tmp_path, monkeypatch):
    monkeypatch.delenv("DELTACODEC_GGML_LIB", raising=False)
    (tmp_path / "src").mkdir()
    q, why = load_ggml(tmp_path / "src", cache_dir=tmp_path / "cache")
    assert q is None and "ggml-quants.c" in why
