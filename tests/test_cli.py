"""The `sld` command run as a subprocess, with good and bad inputs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from test_codec import make_adapter

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "tiny-sine-adapter")


def sld(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deltacodec.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def assert_one_line_error(res: subprocess.CompletedProcess, *fragments: str) -> None:
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("sld: error:"), res.stderr
    for frag in fragments:
        assert frag in res.stderr, res.stderr


def test_version_and_help():
    res = sld("--version")
    assert res.returncode == 0 and "0.1.0" in res.stdout
    res = sld("--help")
    assert res.returncode == 0
    for verb in ("encode", "decode", "inspect"):
        assert verb in res.stdout
        sub = sld(verb, "--help")
        assert sub.returncode == 0 and "usage: sld " + verb in sub.stdout


def test_encode_inspect_decode_on_the_shipped_example(tmp_path):
    src = tmp_path / "tiny"
    shutil.copytree(EXAMPLE, src)
    res = sld("encode", str(src), "--bits", "3", "-q")
    assert res.returncode == 0, res.stderr
    assert res.stdout == "" and res.stderr == ""  # -q: silent
    out = tmp_path / "tiny.sld"
    assert out.exists()

    res = sld("inspect", str(out))
    assert res.returncode == 0, res.stderr
    assert "method      sine" in res.stdout and "omega       100.0" in res.stdout
    assert "mlp.down_proj.lora_A.weight" in res.stdout and "bits/param" in res.stdout
    assert "smaller than fp16" in res.stdout

    res = sld("inspect", str(out), "--json")
    info = json.loads(res.stdout)
    assert info["method"] == "sine" and info["omega"] == 100.0 and info["gamma"] == "sqrt(in_features)"
    assert len(info["tensors"]) == 20 and all(t["bits"] == 3 for t in info["tensors"])
    assert info["bytes"] == os.path.getsize(out)
    assert info["ratio_vs_fp16"] > 4

    res = sld("decode", str(out), "-o", str(tmp_path / "dec"), "--dtype", "fp16")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "dec" / "adapter_model.safetensors").exists()
    assert (tmp_path / "dec" / "adapter_config.json").exists()


def test_inspect_never_imports_torch(tmp_path):
    src = tmp_path / "a"
    make_adapter(src)
    assert sld("encode", str(src), "-o", str(tmp_path / "a.sld"), "-q").returncode == 0
    code = (
        "import sys; from deltacodec.cli import main; rc = main(['inspect', sys.argv[1]]); "
        "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)"
    )
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "a.sld")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_bad_inputs_give_one_line_errors(tmp_path):
    assert_one_line_error(sld("inspect", str(tmp_path / "missing.sld")), "missing.sld")
    (tmp_path / "junk.sld").write_bytes(b"not an sld file at all, just text")
    assert_one_line_error(sld("inspect", str(tmp_path / "junk.sld")), "not an .sld file")
    assert_one_line_error(sld("decode", str(tmp_path / "junk.sld")), "junk.sld")
    assert_one_line_error(sld("encode", str(tmp_path / "nowhere")), "no such file")
    make_adapter(tmp_path / "s", config={"peft_type": "SINLORA"})
    assert_one_line_error(sld("encode", str(tmp_path / "s")), "non-zero frequency")
    assert not (tmp_path / "s.sld").exists()


def test_argument_errors_exit_non_zero(tmp_path):
    for args in (("encode", "x", "--bits", "9"), ("encode", "x", "--gamma", "abc"), ("frobnicate",), ()):
        res = sld(*args)
        assert res.returncode == 2 and "Traceback" not in res.stderr


def test_encode_flags_reach_the_file(tmp_path):
    make_adapter(tmp_path / "a")
    res = sld("encode", str(tmp_path / "a"), "--bits", "2", "--omega", "40", "--gamma", "3", "--quantizer",
              "uniform", "--level", "0", "-o", str(tmp_path / "o.sld"))
    assert res.returncode == 0, res.stderr
    assert "wrote" in res.stdout
    info = json.loads(sld("inspect", str(tmp_path / "o.sld"), "--json").stdout)
    assert info["omega"] == 40.0 and info["gamma"] == [3.0]
    assert all(t["quantizer"] == "uniform" and t["compression"] == "none" for t in info["tensors"])


def test_encode_report_prints_weight_space_error(tmp_path):
    make_adapter(tmp_path / "a")
    res = sld("encode", str(tmp_path / "a"), "--bits", "8", "--report", "-o", str(tmp_path / "o.sld"))
    assert res.returncode == 0, res.stderr
    assert "rel. error" in res.stdout and "relative weight-space error mean" in res.stdout


def test_inspect_says_larger_than_fp16_and_shows_the_transposed_layout(tmp_path):
    # 16 bits on a tiny adapter: header and framing make the file larger than the raw fp16 factors,
    # which the summary must not call "0.9x smaller".
    make_adapter(tmp_path / "a", config={"fan_in_fan_out": True})
    assert sld("encode", str(tmp_path / "a"), "--bits", "16", "-q", "-o", str(tmp_path / "o.sld")).returncode == 0
    info = json.loads(sld("inspect", str(tmp_path / "o.sld"), "--json").stdout)
    assert info["ratio_vs_fp16"] < 1
    text = sld("inspect", str(tmp_path / "o.sld")).stdout
    assert f"{1 / info['ratio_vs_fp16']:.2f}x larger than fp16" in text and "smaller" not in text
    assert "W is in×out (fan_in_fan_out) in 2 of 2 modules" in text
