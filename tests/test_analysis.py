"""Tests of deltacodec.analysis (stable rank, module stats, BD analysis, RD plot) and of the
``sld bd`` / ``sld stats`` verbs in deltacodec.cli_analysis."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the package may not be installed in the test environment
    sys.path.insert(0, str(REPO))

import deltacodec  # noqa: E402
from deltacodec.analysis import (  # noqa: E402
    AnalysisError,
    AnalysisWarning,
    RDPoint,
    bd_table,
    module_stats,
    plot_rd,
    read_points_csv,
    sigma_max,
    sine_product,
    stable_rank,
)
from deltacodec.cli import main as cli_main  # noqa: E402
from deltacodec.errors import SldError  # noqa: E402

PAPER_CSV = REPO / "benchmarks" / "data" / "paper_table1.csv"


@pytest.fixture(autouse=True, scope="module")
def _single_torch_thread():
    """The matrices here are small; on a shared 2-core machine OpenMP threads waiting for a busy core
    make each small matmul take a scheduler time slice, so run these tests single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

SR_TOL = 1e-4  # the tests' bound on relative error; measured errors are ~1e-7


def svd_stable_rank(M) -> tuple[float, float]:
    s = torch.linalg.svdvals(torch.as_tensor(np.asarray(M), dtype=torch.float64))
    return float(s[0]), float((s * s).sum() / (s[0] * s[0]))


def lora_factors(rng, out_dim, in_dim, r, dtype=np.float32):
    A = (rng.standard_normal((r, in_dim)) / math.sqrt(in_dim)).astype(dtype)
    B = (rng.standard_normal((out_dim, r)) / math.sqrt(out_dim)).astype(dtype)
    return A, B


# --------------------------------------------------------------------------------------------------
# stable rank / sigma_max against a direct SVD
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(100, 60), (300, 200), (1024, 512), (512, 1536), (2048, 1024)])
def test_sigma_max_and_stable_rank_match_svdvals_on_dense_gaussian(shape):
    M = np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)
    ref_s, ref_sr = svd_stable_rank(M)
    assert abs(sigma_max(M) - ref_s) / ref_s < SR_TOL
    assert abs(stable_rank(M) - ref_sr) / ref_sr < SR_TOL


@pytest.mark.parametrize("shape", [(400, 300), (257, 1000)])
def test_stable_rank_of_rank_one_matrix_is_one(shape):
    rng = np.random.default_rng(1)
    u = rng.standard_normal(shape[0]).astype(np.float32)
    v = rng.standard_normal(shape[1]).astype(np.float32)
    M = np.outer(u, v)
    ref_s, ref_sr = svd_stable_rank(M)
    assert ref_sr == pytest.approx(1.0, rel=1e-6)
    assert abs(sigma_max(M) - ref_s) / ref_s < SR_TOL
    assert stable_rank(M) == pytest.approx(1.0, rel=SR_TOL)
    assert stable_rank((u[:, None], v[None, :])) == pytest.approx(1.0, rel=1e-9)
    assert sigma_max((u[:, None], v[None, :])) == pytest.approx(ref_s, rel=1e-6)


@pytest.mark.parametrize("rank,omega", [(1, 3000.0), (2, 200.0), (4, 1000.0), (8, 5000.0), (16, 2000.0)])
def test_stable_rank_of_sine_products_matches_svdvals(rank, omega):
    rng = np.random.default_rng(rank)
    A, B = lora_factors(rng, 1024, 768, rank)
    S = sine_product(B, A, omega)
    assert isinstance(S, np.ndarray) and S.shape == (1024, 768) and S.dtype == np.float32
    np.testing.assert_allclose(S, np.sin(omega * (B.astype(np.float64) @ A)), atol=2e-4)
    ref_s, ref_sr = svd_stable_rank(S)
    assert abs(sigma_max(S) - ref_s) / ref_s < SR_TOL
    assert abs(stable_rank(S) - ref_sr) / ref_sr < SR_TOL


@pytest.mark.parametrize("rank", [1, 3, 8])
def test_stable_rank_of_factor_pair_equals_formed_product(rank):
    rng = np.random.default_rng(10 + rank)
    A, B = lora_factors(rng, 700, 500, rank)
    _, ref_sr = svd_stable_rank(B.astype(np.float64) @ A)
    assert stable_rank((B, A)) == pytest.approx(ref_sr, rel=1e-6)
    assert stable_rank(B @ A) == pytest.approx(ref_sr, rel=SR_TOL)
    assert sigma_max((B, A)) == pytest.approx(svd_stable_rank(B.astype(np.float64) @ A)[0], rel=1e-6)


def test_stable_rank_accepts_numpy_and_torch_alike():
    M = np.random.default_rng(3).standard_normal((600, 400)).astype(np.float32)
    assert stable_rank(M) == pytest.approx(stable_rank(torch.from_numpy(M)), rel=1e-9)
    assert stable_rank(M.astype(np.float64)) == pytest.approx(stable_rank(M), rel=1e-5)
    assert stable_rank(torch.from_numpy(M).to(torch.bfloat16)) == pytest.approx(stable_rank(M), rel=1e-2)


def test_stable_rank_is_deterministic_for_a_seed():
    M = np.random.default_rng(4).standard_normal((900, 700)).astype(np.float32)
    assert stable_rank(M) == stable_rank(M)
    assert sigma_max(M, seed=5) == sigma_max(M, seed=5)


def test_stable_rank_of_zero_matrix_is_zero_and_nonfinite_is_rejected():
    assert stable_rank(np.zeros((300, 200), np.float32)) == 0.0
    assert stable_rank((np.zeros((50, 4), np.float32), np.ones((4, 30), np.float32))) == 0.0
    bad = np.ones((300, 200), np.float32)
    bad[7, 9] = np.nan
    with pytest.raises(AnalysisError, match="NaN or Inf"):
        stable_rank(bad)
    with pytest.raises(AnalysisError, match="do not chain"):
        stable_rank((np.ones((5, 3)), np.ones((4, 6))))
    with pytest.raises(AnalysisError, match="2-D"):
        stable_rank(np.ones(5))


def test_analysis_error_is_an_sld_error_and_a_value_error():
    assert issubclass(AnalysisError, SldError) and issubclass(AnalysisError, ValueError)


# --------------------------------------------------------------------------------------------------
# module_stats
# --------------------------------------------------------------------------------------------------


def test_module_stats_sine_reports_all_four_stable_ranks_and_relative_error():
    rng = np.random.default_rng(20)
    A, B = lora_factors(rng, 512, 384, 4)
    Bq = (B * 1.01).astype(np.float32)
    omega, gamma, scale = 800.0, math.sqrt(384), 2.0
    st = module_stats(A, B, omega=omega, gamma=gamma, scale=scale, sine=True, A_q=A, B_q=Bq)
    assert set(st) == {"sr_lowrank", "sr_lowrank_q", "sr_sine", "sr_sine_q", "rel_error", "abs_error", "dw_norm"}
    S = np.sin(omega * (B.astype(np.float64) @ A))
    Sq = np.sin(omega * (Bq.astype(np.float64) @ A))
    assert st["sr_sine"] == pytest.approx(svd_stable_rank(S)[1], rel=1e-4)
    assert st["sr_sine_q"] == pytest.approx(svd_stable_rank(Sq)[1], rel=1e-4)
    assert st["sr_lowrank"] == pytest.approx(svd_stable_rank(B.astype(np.float64) @ A)[1], rel=1e-6)
    assert st["sr_lowrank_q"] == pytest.approx(st["sr_lowrank"], rel=1e-6)  # scaling B keeps SR
    rel = np.linalg.norm(Sq - S) / np.linalg.norm(S)
    assert st["rel_error"] == pytest.approx(rel, rel=1e-3)
    assert st["dw_norm"] == pytest.approx(scale / gamma * np.linalg.norm(S), rel=1e-5)
    assert st["abs_error"] == pytest.approx(st["rel_error"] * st["dw_norm"], rel=1e-9)


def test_module_stats_plain_lora_relative_error_is_exact_without_forming_products():
    rng = np.random.default_rng(21)
    A, B = lora_factors(rng, 300, 200, 8)
    st = module_stats(A, B, omega=None, gamma=None, scale=0.5, sine=False, A_q=A, B_q=(1.1 * B).astype(np.float32))
    assert "sr_sine" not in st and "sr_sine_q" not in st
    assert st["rel_error"] == pytest.approx(0.1, rel=1e-5)
    same = module_stats(A, B, omega=None, gamma=None, scale=1.0, sine=False, A_q=A.copy(), B_q=B.copy())
    assert same["rel_error"] == 0.0


def test_module_stats_computes_only_what_was_given():
    rng = np.random.default_rng(22)
    A, B = lora_factors(rng, 256, 192, 2)
    only_q = module_stats(None, None, omega=300.0, gamma=16.0, scale=1.0, sine=True, A_q=A, B_q=B)
    assert set(only_q) == {"sr_lowrank_q", "sr_sine_q"}
    only_full = module_stats(A, B, omega=None, gamma=None, scale=1.0, sine=False)
    assert set(only_full) == {"sr_lowrank"}
    with pytest.raises(AnalysisError, match="finite omega"):
        module_stats(A, B, omega=None, gamma=1.0, scale=1.0, sine=True)
    with pytest.raises(AnalysisError, match="shapes"):
        module_stats(A, B, omega=None, gamma=None, scale=1.0, sine=False, A_q=A[:1], B_q=B[:, :1])


def test_module_stats_zero_reference_update_gives_zero_or_infinite_relative_error():
    A = np.ones((2, 40), np.float32)
    B0 = np.zeros((30, 2), np.float32)
    st = module_stats(A, B0, omega=None, gamma=None, scale=1.0, sine=False, A_q=A, B_q=B0)
    assert st["rel_error"] == 0.0 and st["sr_lowrank"] == 0.0
    st = module_stats(A, B0, omega=None, gamma=None, scale=1.0, sine=False, A_q=A, B_q=B0 + 1)
    assert st["rel_error"] == math.inf


# --------------------------------------------------------------------------------------------------
# BD analysis
# --------------------------------------------------------------------------------------------------

ANCHOR_RATES = [0.6, 1.1, 2.2, 4.3, 8.6]
ANCHOR_QUAL = [69.7, 71.0, 74.7, 75.2, 77.3]


def curve(method, group, rates, quals):
    return [RDPoint(method, group, r, q) for r, q in zip(rates, quals)]


@pytest.mark.parametrize("interp", ["akima", "pchip", "cubic"])
@pytest.mark.parametrize("factor", [0.5, 0.8, 1.0, 1.25, 3.0])
def test_bd_rate_of_anchor_scaled_by_constant_rate_factor_is_exactly_that_factor(interp, factor):
    pts = curve("anchor", "g", ANCHOR_RATES, ANCHOR_QUAL) + curve(
        "test", "g", [factor * r for r in ANCHOR_RATES], ANCHOR_QUAL
    )
    # min_overlap=0: shifting in rate shrinks the overlap along the rate axis (used by BD-quality)
    (row,) = bd_table(pts, anchor="anchor", method=interp, min_overlap=0.0)
    assert row["bd_rate"] == pytest.approx(100.0 * (factor - 1.0), rel=1e-10, abs=1e-9)
    assert row["group"] == "g" and row["method"] == "test" and row["interpolation"] == interp


@pytest.mark.parametrize("interp", ["akima", "pchip", "cubic"])
@pytest.mark.parametrize("shift", [-0.7, 0.25, 2.0])
def test_bd_quality_of_anchor_shifted_in_quality_is_exactly_that_shift(interp, shift):
    pts = curve("anchor", 4, ANCHOR_RATES, ANCHOR_QUAL) + curve(
        "test", 4, ANCHOR_RATES, [q + shift for q in ANCHOR_QUAL]
    )
    (row,) = bd_table(pts, anchor="anchor", method=interp, min_overlap=0.0)
    assert row["bd_quality"] == pytest.approx(shift, abs=1e-9)


def test_bd_table_reproduces_paper_table2_with_akima():
    rows = bd_table(read_points_csv(PAPER_CSV), anchor="LoRA", method="akima")
    got = {r["group"]: (r["bd_rate"], r["bd_quality"]) for r in rows}
    paper = {"2": (-41.60, 1.29), "3": (-28.51, 0.88), "5": (-28.04, 0.96), "16": (-30.46, 0.69)}
    assert list(got) == list(paper)
    for g, (rate, acc) in paper.items():
        assert got[g][0] == pytest.approx(rate, abs=0.006)
        assert got[g][1] == pytest.approx(acc, abs=0.006)


def test_bd_table_orders_rows_and_accepts_dicts_tuples_and_unsorted_points():
    pts = [
        {"method": "B", "group": "y", "rate": 2.0, "quality": 2.5},
        ("A", "y", 4.0, 3.0),
        ("A", "y", 1.0, 1.0),
        ("A", "y", 2.0, 2.0),
        ("B", "y", 1.0, 1.5),
        ("B", "y", 4.0, 3.5),
        ("C", "y", 1.0, 1.2),
        ("C", "y", 2.0, 2.2),
        ("C", "y", 4.0, 3.2),
    ]
    rows = bd_table(pts, anchor="A", method="pchip", min_overlap=0.0)
    assert [r["method"] for r in rows] == ["B", "C"]
    assert all(r["bd_quality"] > 0 and r["bd_rate"] < 0 for r in rows)


def test_bd_table_too_few_points_for_the_interpolation_is_an_error_naming_group_and_method():
    pts = curve("A", "2", [1, 2, 4], [1, 2, 3]) + curve("B", "2", [1, 2, 4], [1.5, 2.5, 3.5])
    bd_table(pts, anchor="A", method="akima", min_overlap=0.0)  # 3 points are enough for akima
    with pytest.raises(AnalysisError, match=r"group '2', method 'A'.*'cubic' interpolation needs at least 4"):
        bd_table(pts, anchor="A", method="cubic")


@pytest.mark.parametrize(
    "rates,quals,pattern",
    [
        ([0.0, 2, 4, 8], [1, 2, 3, 4], "rates must be positive"),
        ([-1, 2, 4, 8], [1, 2, 3, 4], "rates must be positive"),
        ([1, 2, 2, 8], [1, 2, 3, 4], "duplicate rate 2"),
        ([1, 2, 4, 8], [1, 3, 2, 4], "quality does not increase strictly"),
        ([1, 2, 4, 8], [1, 2, 2, 4], "quality does not increase strictly"),
        ([1, 2, 4, float("nan")], [1, 2, 3, 4], "finite"),
    ],
)
def test_bd_table_bad_test_curve_is_an_error_naming_group_and_method(rates, quals, pattern):
    pts = curve("A", "5", [1, 2, 4, 8], [1, 2, 3, 4]) + curve("B", "5", rates, quals)
    with pytest.raises(AnalysisError, match=r"group '5', method 'B'.*" + pattern):
        bd_table(pts, anchor="A")


def test_bd_table_curves_without_overlap_are_an_error_not_nan():
    pts = curve("A", "2", [1, 2, 4, 8], [1, 2, 3, 4]) + curve("B", "2", [1, 2, 4, 8], [11, 12, 13, 14])
    with pytest.raises(AnalysisError, match=r"group '2', method 'B'.*do not overlap"):
        bd_table(pts, anchor="A")


def test_bd_table_partial_overlap_warns_naming_group_and_method():
    pts = curve("A", "2", [1, 2, 4, 8], [1, 2, 3, 4]) + curve("B", "2", [1, 2, 4, 8], [3, 4, 5, 6])
    with pytest.warns(AnalysisWarning, match=r"group '2', method 'B'.*(?i:overlap)"):
        rows = bd_table(pts, anchor="A")
    assert rows[0]["warnings"] and math.isfinite(rows[0]["bd_rate"]) and math.isfinite(rows[0]["bd_quality"])


def test_bd_table_warn_mode_leaves_out_bad_rows_with_a_warning_and_never_nan():
    pts = (
        curve("A", "2", [1, 2, 4, 8], [1, 2, 3, 4])
        + curve("B", "2", [1, 2, 4, 8], [1.5, 2.5, 3.5, 4.5])
        + curve("C", "2", [1, 2, 4, 8], [11, 12, 13, 14])
    )
    with pytest.warns(AnalysisWarning, match=r"group '2', method 'C'.*row left out"):
        rows = bd_table(pts, anchor="A", errors="warn", min_overlap=0.0)
    assert [r["method"] for r in rows] == ["B"]
    assert all(math.isfinite(r["bd_rate"]) and math.isfinite(r["bd_quality"]) for r in rows)


def test_bd_table_rejects_unknown_anchor_interpolation_and_groups_without_anchor():
    pts = curve("A", "2", [1, 2, 4, 8], [1, 2, 3, 4]) + curve("B", "2", [1, 2, 4, 8], [1.5, 2.5, 3.5, 4.5])
    with pytest.raises(AnalysisError, match="anchor 'Z' is not among"):
        bd_table(pts, anchor="Z")
    with pytest.raises(AnalysisError, match="unknown interpolation 'linear'"):
        bd_table(pts, anchor="A", method="linear")
    more = pts + curve("B", "3", [1, 2, 4, 8], [1, 2, 3, 4])
    with pytest.raises(AnalysisError, match="group '3', method 'B'.*anchor 'A' has no points"):
        bd_table(more, anchor="A", min_overlap=0.0)
    with pytest.raises(AnalysisError, match="nothing to compare"):
        bd_table(curve("A", "2", [1, 2, 4], [1, 2, 3]), anchor="A")


def test_read_points_csv_reads_any_column_order_skips_comments_and_reports_bad_lines(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text("# comment\nquality, rate ,group,method,extra\n70.1,0.6,2,LoRA,x\n\n71,1.1,2,LoRA,y\n")
    pts = read_points_csv(f)
    assert pts == [RDPoint("LoRA", "2", 0.6, 70.1), RDPoint("LoRA", "2", 1.1, 71.0)]
    f.write_text("method,group,rate\nLoRA,2,0.6\n")
    with pytest.raises(AnalysisError, match="missing quality"):
        read_points_csv(f)
    f.write_text("method,group,rate,quality\nLoRA,2,0.6,70\nLoRA,2,abc,71\n")
    with pytest.raises(AnalysisError, match=r"p\.csv:3: rate 'abc' is not a number"):
        read_points_csv(f)
    with pytest.raises(AnalysisError, match="cannot read"):
        read_points_csv(tmp_path / "missing.csv")


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_rd_writes_png_with_one_panel_per_group(tmp_path):
    pts = read_points_csv(PAPER_CSV)
    out = plot_rd(pts, tmp_path / "rd.png", rows=bd_table(pts, anchor="LoRA"))
    w, h = png_size(out)
    assert 600 <= w <= 3000 and 400 <= h <= 3000
    assert out.stat().st_size > 10_000
    with pytest.raises(AnalysisError, match="rate must be positive"):
        plot_rd([RDPoint("A", "1", 0.0, 1.0)], tmp_path / "bad.png")


def test_importing_deltacodec_analysis_does_not_import_bjontegaard_or_matplotlib():
    code = (
        "import sys; import deltacodec, deltacodec.analysis, deltacodec.cli_analysis;"
        "bad=[m for m in ('bjontegaard','matplotlib') if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr


# --------------------------------------------------------------------------------------------------
# CLI: sld bd
# --------------------------------------------------------------------------------------------------


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["MPLBACKEND"] = "Agg"
    return env


def sld(*args: str) -> SimpleNamespace:
    """``sld ARGS`` in this process, as (returncode, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli_main(list(args))
    return SimpleNamespace(returncode=rc, stdout=out.getvalue(), stderr=err.getvalue())


def sld_process(*args: str) -> subprocess.CompletedProcess:
    """``sld ARGS`` through the real entry point."""
    return subprocess.run(
        [sys.executable, "-m", "deltacodec.cli", *args],
        capture_output=True, text=True, env=_env(), cwd=REPO, timeout=120,
    )


def assert_one_line_error(r, pattern: str = "") -> None:
    """The convention of every verb: exit 1, one line ``sld: error: ...``, no traceback."""
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("sld: error: ")
    assert pattern in lines[0]


def test_cli_bd_prints_table2_and_writes_png_plot(tmp_path):
    png = tmp_path / "rd.png"
    r = sld("bd", str(PAPER_CSV), "--plot", str(png))
    assert r.returncode == 0, r.stderr
    assert "anchor 'LoRA'" in r.stdout and "akima" in r.stdout
    lines = {line.split()[0]: line for line in r.stdout.splitlines() if line[:2].strip() in {"2", "3", "5", "16"}}
    assert "-41.60%" in lines["2"] and "+1.292" in lines["2"]
    assert "-30.46%" in lines["16"]
    w, h = png_size(png)
    assert w >= 600 and h >= 400


def test_cli_bd_json_with_explicit_anchor_and_method():
    r = sld("bd", str(PAPER_CSV), "--anchor", "SineLoRA", "--method", "pchip", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["anchor"] == "SineLoRA" and out["interpolation"] == "pchip"
    assert [row["method"] for row in out["rows"]] == ["LoRA"] * 4
    assert all(row["bd_rate"] > 0 for row in out["rows"])  # LoRA needs more bytes than SineLoRA


def test_cli_bd_bad_inputs_give_one_line_errors(tmp_path):
    assert_one_line_error(sld("bd", str(tmp_path / "nope.csv")), "cannot read")
    bad = tmp_path / "bad.csv"
    bad.write_text("method,group,rate,quality\nA,1,1,1\nA,1,2,2\nA,1,2,3\nB,1,1,1\nB,1,2,2\nB,1,3,3\n")
    assert_one_line_error(sld("bd", str(bad)), "group '1', method 'A'")
    assert_one_line_error(sld("bd", str(PAPER_CSV), "--anchor", "DoRA"), "anchor 'DoRA'")
    r = sld("bd", str(PAPER_CSV), "--method", "linear")
    assert r.returncode == 2 and "invalid choice" in r.stderr and "Traceback" not in r.stderr


def test_cli_bd_skip_bad_prints_warnings_and_remaining_rows(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text(
        "method,group,rate,quality\n"
        + "".join(f"A,{g},{r},{q}\n" for g in (1, 2) for r, q in ((1, 1), (2, 2), (4, 3), (8, 4)))
        + "".join(f"B,1,{r},{q}\n" for r, q in ((1, 1.5), (2, 2.5), (4, 3.5), (8, 4.5)))
        + "".join(f"B,2,{r},{q}\n" for r, q in ((1, 1.5), (2, 2.5), (2, 3.5), (8, 4.5)))
    )
    r = sld("bd", str(f), "--skip-bad")
    assert r.returncode == 0, r.stderr
    assert "sld: warning: group '2', method 'B': duplicate rate 2" in r.stderr
    assert "Traceback" not in r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith(("1 ", "2 "))]
    assert len(rows) == 1 and rows[0].startswith("1 ")


# --------------------------------------------------------------------------------------------------
# CLI: sld stats (against a fake implementation of the reader interface)
# --------------------------------------------------------------------------------------------------


class FakeSld:
    """Implements the reader interface that ``sld stats`` codes against."""

    def __init__(self, modules, tensors, nbytes):
        self.modules = modules
        self._tensors = tensors
        self._nbytes = nbytes

    def dequantize(self, name):
        return self._tensors[name]

    def nbytes_module(self, name):
        return self._nbytes[name]


def make_fake(seed=0):
    rng = np.random.default_rng(seed)
    mods, tensors, nbytes, src = [], {}, {}, []
    for name, sine, (out_f, in_f, r) in [("q_proj", True, (256, 192, 4)), ("up_proj", False, (320, 192, 2))]:
        A, B = lora_factors(rng, out_f, in_f, r)
        Aq, Bq = A.copy(), (B * 1.05).astype(np.float32)
        omega, gamma = (600.0, math.sqrt(in_f)) if sine else (None, None)
        mods.append(SimpleNamespace(name=name, sine=sine, omega=omega, gamma=gamma, scale=2.0, rank=r,
                                    out_features=out_f, in_features=in_f, bits=(3, 4)))
        tensors[name] = (Aq, Bq)
        nbytes[name] = (r * (in_f + out_f) * 7) // 16  # 3.5 bits/param
        src.append(SimpleNamespace(name=name, A=A, B=B, sine=sine, omega=omega, gamma=gamma, scale=2.0))
    return FakeSld(mods, tensors, nbytes), SimpleNamespace(modules=src)


@pytest.fixture
def fake_reader(monkeypatch, tmp_path):
    fake, adapter = make_fake()
    sld_path = tmp_path / "a.sld"
    sld_path.write_bytes(b"\0" * 1234)
    adapter_dir = tmp_path / "adapter"
    adapter_dir.mkdir()
    monkeypatch.setattr(deltacodec, "load", lambda p: fake, raising=False)
    monkeypatch.setattr(deltacodec, "read_adapter", lambda p: adapter, raising=False)
    return sld_path, adapter_dir


def test_cli_stats_json_reports_stable_ranks_error_and_bits_per_param(fake_reader, capsys):
    sld_path, adapter_dir = fake_reader
    assert cli_main(["stats", str(sld_path), "--source", str(adapter_dir), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    q, up = out["modules"]
    assert q["name"] == "q_proj" and q["bits"] == [3, 4]
    assert q["bits_per_param"] == pytest.approx(3.5, rel=1e-3)
    assert {"sr_lowrank", "sr_lowrank_q", "sr_sine", "sr_sine_q", "rel_error"} <= set(q)
    assert "sr_sine" not in up
    assert up["rel_error"] == pytest.approx(0.05, rel=1e-4)  # B scaled by 1.05, plain LoRA
    assert out["total"]["file_bytes"] == 1234
    assert out["total"]["bits_per_param"] == pytest.approx(3.5, rel=1e-3)
    assert 0 < out["total"]["rel_error"] < 1


def test_cli_stats_text_without_source_and_on_an_adapter(fake_reader, capsys):
    sld_path, adapter_dir = fake_reader
    assert cli_main(["stats", str(sld_path)]) == 0
    text = capsys.readouterr().out
    assert "q_proj" in text and "up_proj" in text and "3.500" in text and "rel.err" in text
    assert cli_main(["stats", str(adapter_dir), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kind"] == "adapter" and out["modules"][0]["bits_per_param"] is None
    assert "sr_sine" in out["modules"][0] and "rel_error" not in out["modules"][0]


def test_cli_stats_treats_safetensors_path_as_adapter(fake_reader, capsys, tmp_path):
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(b"x")
    assert cli_main(["stats", str(weights), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "adapter"


def test_cli_stats_end_to_end_with_the_real_codec(tmp_path, capsys):
    """``sld stats`` on a file written by the real encoder agrees with a direct computation."""
    if not all(hasattr(deltacodec, n) for n in ("encode", "load", "read_adapter")):
        pytest.skip("the codec's reader/writer is not in this deltacodec yet")
    from deltacodec.adapter import write_adapter

    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for proj, (out_f, in_f) in {"q_proj": (256, 128), "up_proj": (384, 128)}.items():
        base = f"base_model.model.model.layers.0.mlp.{proj}"
        tensors[f"{base}.lora_A.weight"] = torch.randn(4, in_f, generator=gen) / 16
        tensors[f"{base}.lora_B.weight"] = torch.randn(out_f, 4, generator=gen) / 16
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "up_proj"]}
    write_adapter(tmp_path / "ad", tensors, cfg)
    sld_path = deltacodec.encode(tmp_path / "ad", 4, out=tmp_path / "a.sld", omega=100.0, gamma="sqrt-in",
                                 quantizer="uniform")
    assert cli_main(["stats", str(sld_path), "--source", str(tmp_path / "ad"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    f, src = deltacodec.load(sld_path), deltacodec.read_adapter(tmp_path / "ad", omega=100.0, gamma="sqrt-in")
    by_name = {m.name: m for m in src.modules}
    assert len(out["modules"]) == 2
    for row in out["modules"]:
        m = by_name[row["name"]]
        Aq, Bq = f.dequantize(row["name"])
        dq = m.scale * np.sin(m.omega * (Bq.astype(np.float64) @ Aq)) / m.gamma
        ref = m.delta()
        assert row["rel_error"] == pytest.approx(np.linalg.norm(dq - ref) / np.linalg.norm(ref), rel=1e-3)
        assert row["sr_sine_q"] == pytest.approx(svd_stable_rank(dq)[1], rel=1e-4)
        assert row["bits_per_param"] == pytest.approx(8 * f.nbytes_module(row["name"]) / (4 * (128 + row["out_features"])))


def test_cli_stats_errors_are_one_line(fake_reader, monkeypatch, capsys, tmp_path):
    sld_path, adapter_dir = fake_reader
    _, adapter = make_fake()
    adapter.modules = adapter.modules[:1]
    monkeypatch.setattr(deltacodec, "read_adapter", lambda p: adapter, raising=False)
    assert cli_main(["stats", str(sld_path), "--source", str(adapter_dir)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["sld: error: module 'up_proj' is in " + str(sld_path) + " but not in the --source adapter"]
    assert cli_main(["stats", str(tmp_path / "missing.sld")]) == 1
    assert "no such file" in capsys.readouterr().err

    def broken(path):
        raise deltacodec.errors.SldFormatError(f"{path}: bad magic b'XXXX'")

    monkeypatch.setattr(deltacodec, "load", broken, raising=False)
    assert cli_main(["stats", str(sld_path)]) == 1
    assert capsys.readouterr().err.strip() == f"sld: error: {sld_path}: bad magic b'XXXX'"


def test_cli_stats_text_with_source_and_a_missing_source(fake_reader, capsys, tmp_path):
    sld_path, adapter_dir = fake_reader
    assert cli_main(["stats", str(sld_path), "--source", str(adapter_dir)]) == 0
    out = capsys.readouterr().out
    assert "q_proj" in out and "whole-adapter relative weight error" in out
    assert cli_main(["stats", str(sld_path), "--source", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert err == f"sld: error: --source {tmp_path / 'nope'}: no such file or directory\n"


def test_cli_stats_warns_about_source_modules_missing_from_the_file(fake_reader, capsys, monkeypatch):
    sld_path, adapter_dir = fake_reader
    fake, adapter = make_fake()
    fake.modules = fake.modules[:1]
    monkeypatch.setattr(deltacodec, "load", lambda p: fake, raising=False)
    assert cli_main(["stats", str(sld_path), "--source", str(adapter_dir)]) == 0
    assert capsys.readouterr().err == f"sld: warning: 1 module(s) of --source are not in {sld_path}: up_proj\n"


def test_cli_stats_missing_file_subprocess_is_one_line_error(tmp_path):
    assert_one_line_error(sld_process("stats", str(tmp_path / "x.sld")), "no such file")


@pytest.mark.parametrize("sine", [False, True])
def test_relative_weight_error_matches_a_float64_computation(sine):
    from deltacodec.analysis import relative_weight_error

    rng = np.random.default_rng(5)
    A, B = lora_factors(rng, 96, 80, 4)
    A_q = A + rng.normal(0, 1e-3, A.shape).astype(np.float32)
    B_q = B + rng.normal(0, 1e-3, B.shape).astype(np.float32)
    omega = 300.0

    def dw(b, a):
        p = b.astype(np.float64) @ a.astype(np.float64)
        return np.sin(omega * p) if sine else p

    want = np.linalg.norm(dw(B_q, A_q) - dw(B, A)) / np.linalg.norm(dw(B, A))
    got = relative_weight_error(A, B, A_q, B_q, omega=omega if sine else None, sine=sine)
    # float32 sine matrices: each entry carries ~omega * 1e-7 absolute error, ~1e-4 of the difference
    assert got == pytest.approx(want, rel=1e-3 if sine else 1e-9)
    assert relative_weight_error(A, B, A, B, omega=omega, sine=sine) == 0.0
