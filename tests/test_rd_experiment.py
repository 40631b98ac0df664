"""benchmarks/rd_experiment.py --quick runs end to end and writes its RD points in `sld bd` format.

Checks the pipeline and the shape of its output, not its numbers. Minutes on 2 cores: it runs in
the `slow` step of .ci/run, not in the default suite."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("bjontegaard")
pytest.importorskip("matplotlib")

from deltacodec.analysis import read_points_csv  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
QUICK_RANKS = ("2", "8")
QUICK_BITS = ("2", "3", "16")
METHODS = ("LoRA", "SineLoRA")


@pytest.mark.slow
def test_quick_run_writes_every_rd_point(tmp_path):
    out = tmp_path / "rd"
    proc = subprocess.run(
        [sys.executable, "benchmarks/rd_experiment.py", "--quick", "--out", str(out),
         "--cache-dir", str(tmp_path / "cache")],
        cwd=REPO, capture_output=True, text=True, timeout=3600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    by_bits = read_points_csv(out / "rd_bits.csv")
    keys = [(p.method, p.group) for p in by_bits]
    # group = bit width: one point per rank; group fp32: the unquantized adapters, one per rank
    for m in METHODS:
        for g in QUICK_BITS + ("fp32",):
            assert keys.count((m, g)) == len(QUICK_RANKS), (m, g, keys)
    assert len(by_bits) == len(METHODS) * len(QUICK_RANKS) * (len(QUICK_BITS) + 1)
    assert all(p.rate > 0 for p in by_bits)

    by_rank = read_points_csv(out / "rd_ranks.csv")
    keys = [(p.method, p.group) for p in by_rank]
    for m in METHODS:
        for g in QUICK_RANKS:
            assert keys.count((m, g)) == len(QUICK_BITS), (m, g, keys)
    assert len(by_rank) == len(METHODS) * len(QUICK_RANKS) * len(QUICK_BITS)

    for name in ("measurements.json", "measurements.csv", "bd_bits.csv", "bd_ranks.csv", "rd_bits.png",
                 "rd_ranks.png", "sld_bd_cli.json"):
        assert (out / name).is_file(), name

    # --reuse measures the codec again on the same adapters without training: every point comes
    # back identical (encoding is byte-deterministic, evaluation the same ops on the same weights)
    import json

    before = (out / "rd_bits.csv").read_text()
    proc = subprocess.run(
        [sys.executable, "benchmarks/rd_experiment.py", "--quick", "--out", str(out),
         "--cache-dir", str(tmp_path / "cache"), "--reuse"],
        cwd=REPO, capture_output=True, text=True, timeout=3600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    import re

    assert not re.search(r"lr=\S+: trained in", proc.stderr) and "--reuse: 4 adapters" in proc.stderr  # none trained
    assert (out / "rd_bits.csv").read_text() == before
    summary = json.loads((out / "measurements.json").read_text())
    assert len(summary["adapters"]) == len(METHODS) * len(QUICK_RANKS)

    # a grid trained with other settings is refused, naming what differs
    proc = subprocess.run(
        [sys.executable, "benchmarks/rd_experiment.py", "--quick", "--out", str(out),
         "--cache-dir", str(tmp_path / "cache"), "--reuse", "--steps", "7"],
        cwd=REPO, capture_output=True, text=True, timeout=3600,
    )
    assert proc.returncode != 0 and "other settings (steps)" in proc.stderr


def _reuse_main(out, capsys) -> tuple[int, str]:
    sys.path.insert(0, str(REPO / "benchmarks"))
    import rd_experiment

    code = rd_experiment.main(["--quick", "--out", str(out), "--reuse"])
    return code, capsys.readouterr().err


def test_reuse_without_an_earlier_run_fails_before_any_work(tmp_path, capsys):
    code, err = _reuse_main(tmp_path / "none", capsys)
    assert code == 2 and "does not exist (run without --reuse first)" in err
    assert not (tmp_path / "none").exists()  # nothing pretrained or written


@pytest.mark.parametrize("record", ["{not json", "[]", '{"adapter": {}}', '{"settings": 3, "adapter": {}}',
                                    '{"settings": {}, "adapter": {"method": "LoRA"}}'])
def test_reuse_of_a_damaged_grid_record_names_it(tmp_path, capsys, record):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import rd_experiment

    st = rd_experiment.quick_settings(0)
    out = tmp_path / "rd"
    (out / "grid").mkdir(parents=True)
    for rank in st.ranks:
        for m in METHODS:
            (out / "grid" / f"{m}-r{rank}.json").write_text(record)
    code, err = _reuse_main(out, capsys)
    assert code == 2 and f"{out / 'grid' / 'LoRA-r2.json'}" in err and "is not a grid record" in err
