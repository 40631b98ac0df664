"""The `sld` command on good and bad inputs, mostly in-process (``main([...])``; the real entry
point as a process where that is the point: no torch import for inspect, see also
test_cli_errors.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest

from cli_helpers import assert_one_line_error, run_sld, write_sld
from test_codec import make_adapter

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "tiny-sine-adapter")


@pytest.fixture
def sld(capsys):
    """``sld ARGS`` in this process, as (returncode, stdout, stderr)."""

    def call(*args: str) -> SimpleNamespace:
        rc, out, err = run_sld(capsys, *args)
        return SimpleNamespace(returncode=rc, stdout=out, stderr=err)

    return call


def assert_process_error(res: SimpleNamespace, *fragments: str) -> None:
    assert_one_line_error(res.returncode, res.stderr, *fragments)


def test_version_and_help(sld):
    res = sld("--version")
    assert res.returncode == 0 and "0.1.0" in res.stdout
    res = sld("--help")
    assert res.returncode == 0
    for verb in ("encode", "decode", "inspect", "verify"):
        assert verb in res.stdout
        sub = sld(verb, "--help")
        assert sub.returncode == 0 and "usage: sld " + verb in sub.stdout


def test_encode_inspect_decode_on_the_shipped_example(tmp_path, sld):
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
    write_sld(tmp_path / "a.sld")
    code = (
        "import sys; from deltacodec.cli import main; rc = main(['inspect', sys.argv[1]]); "
        "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)"
    )
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "a.sld")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_bad_inputs_give_one_line_errors(tmp_path, sld):
    assert_process_error(sld("inspect", str(tmp_path / "missing.sld")), "missing.sld")
    (tmp_path / "junk.sld").write_bytes(b"not an sld file at all, just text")
    assert_process_error(sld("inspect", str(tmp_path / "junk.sld")), "not an .sld file")
    assert_process_error(sld("decode", str(tmp_path / "junk.sld")), "junk.sld")
    assert_process_error(sld("encode", str(tmp_path / "nowhere")), "no such file")
    make_adapter(tmp_path / "s", config={"peft_type": "SINLORA"})
    assert_process_error(sld("encode", str(tmp_path / "s")), "non-zero frequency")
    assert not (tmp_path / "s.sld").exists()


def test_argument_errors_exit_non_zero(tmp_path, sld):
    for args in (("encode", "x", "--bits", "9"), ("encode", "x", "--gamma", "abc"), ("frobnicate",), ()):
        res = sld(*args)
        assert res.returncode == 2 and "Traceback" not in res.stderr


def test_encode_flags_reach_the_file(tmp_path, sld):
    make_adapter(tmp_path / "a")
    res = sld("encode", str(tmp_path / "a"), "--bits", "2", "--omega", "40", "--gamma", "3", "--quantizer",
              "uniform", "--level", "0", "-o", str(tmp_path / "o.sld"))
    assert res.returncode == 0, res.stderr
    assert "wrote" in res.stdout
    info = json.loads(sld("inspect", str(tmp_path / "o.sld"), "--json").stdout)
    assert info["omega"] == 40.0 and info["gamma"] == [3.0]
    assert all(t["quantizer"] == "uniform" and t["compression"] == "none" for t in info["tensors"])


def test_encode_report_prints_weight_space_error(tmp_path, sld):
    make_adapter(tmp_path / "a")
    res = sld("encode", str(tmp_path / "a"), "--bits", "8", "--report", "-o", str(tmp_path / "o.sld"))
    assert res.returncode == 0, res.stderr
    assert "rel. error" in res.stdout and "relative weight-space error mean" in res.stdout


def test_inspect_says_larger_than_fp16_and_shows_the_transposed_layout(tmp_path, sld):
    # 16 bits on a tiny adapter: header and framing make the file larger than the raw fp16 factors,
    # which the summary must not call "0.9x smaller".
    make_adapter(tmp_path / "a", config={"fan_in_fan_out": True})
    assert sld("encode", str(tmp_path / "a"), "--bits", "16", "-q", "-o", str(tmp_path / "o.sld")).returncode == 0
    info = json.loads(sld("inspect", str(tmp_path / "o.sld"), "--json").stdout)
    assert info["ratio_vs_fp16"] < 1
    text = sld("inspect", str(tmp_path / "o.sld")).stdout
    assert f"{1 / info['ratio_vs_fp16']:.2f}x larger than fp16" in text and "smaller" not in text
    assert "W is in×out (fan_in_fan_out) in 2 of 2 modules" in text


# --------------------------------------------------------------------------------------------------
# options reach the library: --force and --max-decoded-bytes (library defaults when not given)


def _recorder(monkeypatch, module, name, result):
    calls = []

    def fake(*args, **kwargs):
        calls.append((args, kwargs))
        return result

    monkeypatch.setattr(module, name, fake)
    return calls


@pytest.mark.parametrize(
    "extra, passed",
    [((), {}), (("--force",), {"force": True}), (("--max-decoded-bytes", "1.5GiB"), {"max_decoded_bytes": 3 << 29}),
     (("--force", "--max-decoded-bytes", "3MB"), {"force": True, "max_decoded_bytes": 3_000_000})],
)
def test_decode_passes_force_and_limit(capsys, monkeypatch, tmp_path, extra, passed):
    import deltacodec.codec

    calls = _recorder(monkeypatch, deltacodec.codec, "decode", [str(tmp_path / "o" / "adapter_model.safetensors")])
    rc, out, err = run_sld(capsys, "decode", "f.sld", "-o", tmp_path / "o", "--dtype", "bf16", *extra)
    assert rc == 0 and err == "" and out == f"wrote {tmp_path / 'o' / 'adapter_model.safetensors'}\n"
    (args, kwargs), = calls
    assert args == ("f.sld", str(tmp_path / "o"))
    assert {k: kwargs[k] for k in ("force", "max_decoded_bytes")} == {"force": False, "max_decoded_bytes": None, **passed}
    assert kwargs["dtype"] == "bf16" and callable(kwargs["progress"])


@pytest.mark.parametrize("extra, passed", [((), {}), (("--force",), {"force": True})])
def test_encode_passes_force(capsys, monkeypatch, tmp_path, extra, passed):
    import deltacodec.codec

    out_path = tmp_path / "o.sld"
    out_path.write_bytes(b"x" * 10)
    calls = _recorder(monkeypatch, deltacodec.codec, "encode", str(out_path))
    rc, out, err = run_sld(capsys, "encode", "adapter", "-o", out_path, "--omega", "30", "--alpha", "-2", *extra)
    assert rc == 0 and err == "" and out == f"wrote {out_path} (10 bytes)\n"
    (args, kwargs), = calls
    assert kwargs["force"] == passed.get("force", False)
    assert kwargs["omega"] == 30.0 and kwargs["alpha"] == -2.0 and kwargs["out"] == str(out_path)


def test_stats_passes_the_limit_to_the_reader_only_when_given(capsys, monkeypatch, tmp_path):
    import deltacodec

    seen = []

    def load(path, **kwargs):
        seen.append(kwargs)
        raise deltacodec.SldLimitError(f"{path}: over the limit", limit=1, requested=2)

    monkeypatch.setattr(deltacodec, "load", load)
    (tmp_path / "f.sld").write_bytes(b"x")
    for extra in ((), ("--max-decoded-bytes", "2KiB")):
        rc, _, err = run_sld(capsys, "stats", tmp_path / "f.sld", *extra)
        assert_one_line_error(rc, err, str(tmp_path / "f.sld"), "over the limit")
    assert seen == [{}, {"max_decoded_bytes": 2048}]


@pytest.mark.parametrize("verb", ["inspect", "verify", "stats", "decode"])
def test_max_decoded_bytes_below_the_files_need_is_a_one_line_error(capsys, tmp_path, verb):
    import inspect

    import deltacodec.codec

    if verb == "decode" and "max_decoded_bytes" not in inspect.signature(deltacodec.codec.decode).parameters:
        pytest.skip("this deltacodec.decode() has no max_decoded_bytes keyword yet")
    path = write_sld(tmp_path / "a.sld")
    rc, out, err = run_sld(capsys, verb, path, "--max-decoded-bytes", "8", *(["-o", tmp_path / "o"] if verb == "decode" else []))
    assert_one_line_error(rc, err, path, "over the limit of 8")
    assert not (tmp_path / "o").exists()


def test_encode_refuses_an_sld_file_whatever_its_name(capsys, tmp_path):
    src = tmp_path / "looks-like-weights.safetensors"
    write_sld(src)
    rc, out, err = run_sld(capsys, "encode", src, "-o", tmp_path / "o.sld")
    assert_one_line_error(rc, err, str(src), "is an .sld file already", "sld decode")
    assert not (tmp_path / "o.sld").exists()
