"""RD testbed 2 (benchmarks/rd_text.py) and the machinery it shares with testbed 1 (rdlib.py).

The pieces are checked against plain references written here; the pipeline is run once in
``--quick`` mode in process (a tiny model: tens of seconds on a busy 2-core machine) and its
output is checked for shape and sanity, not for particular numbers."""

from __future__ import annotations

import csv
import inspect
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("bjontegaard")
pytest.importorskip("matplotlib")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import rd_text  # noqa: E402
import rdlib  # noqa: E402

import deltacodec  # noqa: E402
from deltacodec.analysis import RDPoint  # noqa: E402

SOURCE = '''"""Module doc."""
import os  # a comment


class C:
    """Class doc.

    More."""

    def f(self):
        """Only a docstring."""

    def g(self):
        x = "not a docstring"
        return x
'''


def test_code_and_docstrings_splits_prose_from_code():
    code, docs = rd_text.code_and_docstrings(SOURCE)
    assert docs == ["Module doc.", "Class doc.\n\nMore.", "Only a docstring."]
    assert "doc" not in code.replace("not a docstring", "")  # every docstring is gone
    assert "#" not in code  # comments dropped by the parser
    assert '"not a docstring"' in code.replace("'", '"')  # other string literals stay
    ns: dict = {}
    exec(compile(code, "<code>", "exec"), ns)  # still a valid module: f's empty body got `pass`
    assert ns["C"]().f() is None and ns["C"]().g() == "not a docstring"


def test_split_is_a_deterministic_function_of_the_path():
    spec = rd_text.CorpusSpec()
    _, files = rd_text.stdlib_files()
    assert files and all(not f.startswith("test/") and "/test_" not in f for f in files)
    splits = [rd_text.split_of(f, spec) for f in files]
    assert splits == [rd_text.split_of(f, spec) for f in files]
    share = {s: splits.count(s) / len(splits) for s in ("train", "val", "test")}
    # ~661 files hashed into 1000 buckets: shares within a few standard errors of 10% / 5%
    assert 0.05 < share["test"] < 0.16 and 0.02 < share["val"] < 0.09


def test_windows_are_the_stream_cut_in_order():
    stream = np.arange(100, dtype=np.uint8)
    w = rd_text.windows(stream, 3, 10)
    assert w.shape == (3, 10) and w.dtype.is_floating_point is False
    assert w.flatten().tolist() == list(range(30))
    assert rd_text.windows(stream, 50, 10).shape == (10, 10)  # capped by the stream
    r = rd_text.random_windows(stream, np.random.default_rng(0), 5, 7)
    assert r.shape == (5, 7) and all((row[1:] - row[:-1] == 1).all() for row in r)


def test_monotone_frontier_keeps_strict_improvements_only():
    pts = [RDPoint("a", "g", 300, 2.0), RDPoint("a", "g", 100, 1.0), RDPoint("a", "g", 200, 1.0),
           RDPoint("a", "g", 400, 3.0), RDPoint("b", "g", 50, 0.5)]
    kept, dropped = rdlib.monotone_frontier(pts)
    assert dropped == [RDPoint("a", "g", 200, 1.0)]
    assert kept == [p for p in pts if p not in dropped]  # input order preserved


def test_arm_detection_follows_the_encoder_signature(monkeypatch):
    assert rdlib.encoder_supports(rdlib.KMEANS) == (True, "")
    assert rdlib.encoder_supports(rdlib.arm_named("uniform"))[0]
    has_v2 = "bits_per_param" in inspect.signature(deltacodec.encode).parameters
    assert rdlib.encoder_supports(rdlib.arm_named("ecsq"))[0] == has_v2
    with pytest.raises(ValueError, match="unknown quantizer arm"):
        rdlib.arm_named("gptq")

    def v2_encode(src, bits=3, *, out=None, quantizer="kmeans", bits_per_param=None, refit=False):
        return str(out)

    monkeypatch.setattr(deltacodec, "encode", v2_encode)
    arm = rdlib.arm_named("ecsq")
    assert rdlib.encoder_supports(arm) == (True, "")
    assert [a.name for a in rdlib.supported_arms(["ecsq", "kmeans"], lambda m: None)] == ["kmeans", "ecsq"]
    assert arm.settings((2, 3), (1.5,)) == (1.5,)
    assert rdlib.KMEANS.settings((2, 3), (1.5,)) == (2, 3)


def test_encode_arm_passes_the_rate_setting(monkeypatch, tmp_path):
    calls = []

    def fake_encode(src, bits=3, *, out=None, quantizer="kmeans", bits_per_param=None, refit=False,
                    container=None):
        calls.append((bits, quantizer, bits_per_param, refit, container))
        return str(out)

    monkeypatch.setattr(deltacodec, "encode", fake_encode)
    rdlib.encode_arm("src", rdlib.arm_named("ecsq"), 1.5, tmp_path / "a.sld")
    rdlib.encode_arm("src", rdlib.arm_named("uniform"), 3, tmp_path / "b.sld")
    rdlib.encode_arm("src", rdlib.KMEANS, 2, tmp_path / "c.sld")
    rdlib.encode_arm("src", rdlib.arm_named("kmeans_v2"), 4, tmp_path / "d.sld")
    assert calls == [(3, "ecsq", 1.5, True, None), (3, "uniform", None, False, None),
                     (2, "kmeans", None, False, None), (4, "kmeans", None, False, 2)]
    assert rdlib.setting_tag(rdlib.arm_named("ecsq"), 1.5) == "p1.5"
    assert rdlib.setting_tag(rdlib.KMEANS, 3) == "b3"


def test_unsupported_arm_is_skipped_with_a_note(monkeypatch, capsys):
    def old_encode(src, bits=3, *, out=None, quantizer="kmeans"):
        return str(out)

    monkeypatch.setattr(deltacodec, "encode", old_encode)
    arms = rdlib.supported_arms(["ecsq", "auto", "kmeans_v2", "uniform"], lambda m: None)
    assert arms == [rdlib.KMEANS, rdlib.arm_named("uniform")]
    assert capsys.readouterr().out.count("skipped") == 3


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_quick_run_gives_finite_points_and_a_bd_table(tmp_path, capsys):
    out = tmp_path / "rdt"
    assert rd_text.main(["--quick", "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
                         "--quantizers", "kmeans,uniform", "--threads", "1"]) == 0
    st = rd_text.quick_settings(0)
    rows = _read_csv(out / "points.csv")
    # every (method, rank, arm, bits) once
    keys = sorted((r["method"], int(r["rank"]), r["arm"], int(float(r["setting"]))) for r in rows)
    want = sorted((m, k, a, b) for m in rd_text.METHODS for k in st.ranks for a in ("kmeans", "uniform")
                  for b in st.bits)
    assert keys == want
    summary = json.loads((out / "measurements.json").read_text())
    before = summary["base"]["prose_test_before"]["bits_per_byte"]
    fp32 = {(a["method"], a["rank"]): a for a in summary["adapters"]}
    for r in rows:
        loss, acc, size = float(r["bits_per_byte"]), float(r["accuracy"]), int(r["bytes"])
        assert math.isfinite(loss) and 0 < loss < 8.5 and 0 <= acc <= 100 and size > 0
        assert int(r["params"]) == fp32[(r["method"], int(r["rank"]))]["params"] > 0
        if int(float(r["setting"])) == 16:
            # float16 factors: ΔW within ~1e-3 relative of the float32 adapter, so the held-out
            # loss moves by far less than the 1e-2 bits/byte allowed here
            assert abs(loss - fp32[(r["method"], int(r["rank"]))]["test"]["bits_per_byte"]) < 1e-2
    # adaptation helps: every unquantized adapter beats the base on the held-out docstrings
    assert all(a["test"]["bits_per_byte"] < before for a in summary["adapters"])
    # files grow with bits within each (method, rank, arm)
    for m in rd_text.METHODS:
        for k in st.ranks:
            sizes = [int(r["bytes"]) for r in rows if (r["method"], int(r["rank"]), r["arm"]) == (m, k, "kmeans")]
            assert sizes == sorted(sizes)
    bd = _read_csv(out / "bd_kmeans_bits_loss.csv")
    assert bd, "no BD row: the quick grid must give at least one sine-vs-LoRA comparison"
    assert all(math.isfinite(float(r["bd_rate_percent"])) and r["method"] == "SineLoRA" for r in bd)
    assert (out / "bd_arms_loss.csv").is_file() and (out / "sld_bd_cli.json").is_file()
    # the envelope pools every rank and setting of an arm into one curve per method
    env = _read_csv(out / "rd_envelope_loss.csv")
    assert {r["group"] for r in env} == set(rd_text.METHODS)
    assert len(env) == len(rows) and {r["method"] for r in env} == {r["arm"] for r in rows}
    assert json.loads((out / "sld_bd_cli.json").read_text())
    assert "BD kmeans_bits_loss" in capsys.readouterr().out

    # --reuse measures the codec again on the same adapters: the k-means points come back identical
    # (encoding is byte-deterministic and evaluation runs the same ops on the same weights)
    args = ["--quick", "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--threads", "1"]
    assert rd_text.main(args + ["--reuse"]) == 0
    again = _read_csv(out / "points.csv")
    def timeless(rs):
        return [{k: v for k, v in r.items() if k != "encode_seconds"} for r in rs]

    assert timeless(again) == timeless(r for r in rows if r["arm"] == "kmeans")
    capsys.readouterr()
    assert rd_text.main(args + ["--reuse", "--steps", "7"]) == 2  # other training settings: refused
    assert "trained with other settings (steps)" in capsys.readouterr().err
    assert rd_text.main(["--quick", "--out", str(tmp_path / "none"), "--reuse"]) == 2
    assert "does not exist" in capsys.readouterr().err
