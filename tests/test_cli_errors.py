"""The error convention of every ``sld`` verb, over classes of bad input.

0 ok; 1 error with exactly one line ``sld: error: ...`` naming the path, no traceback; 2 usage
error (argparse's usage text); 130 interrupted; warnings one line ``sld: warning: ...`` each;
a closed stdout (``| head``) is quiet. Most cases run ``main([...])`` in-process (fast); a few
run the real entry point as a process.
"""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
from safetensors.numpy import save_file

from cli_helpers import (
    REPO,
    assert_one_line_error,
    assert_usage_error,
    lora_module,
    run_sld,
    sld_process,
    write_sld,
)
from deltacodec import cli_progress
from deltacodec.cli import main, run
from deltacodec.errors import DeltacodecWarning, SldChecksumError, SldError
from test_codec import make_adapter

ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False
skip_if_root = pytest.mark.skipif(ROOT, reason="root reads a chmod-000 file anyway")


# --------------------------------------------------------------------------------------------------
# run(): the one dispatcher, against each class of exception a verb may raise


def _verb(action):
    """A parsed namespace whose verb runs ``action`` (raise, warn, print...)."""

    def func(args):
        return action()

    return argparse.Namespace(func=func)


def _raise(exc):
    def action():
        raise exc

    return action


@pytest.mark.parametrize(
    "exc, expected",
    [
        (SldError("/p/x.sld: header CRC-32 mismatch"), "sld: error: /p/x.sld: header CRC-32 mismatch"),
        (SldChecksumError("/p/x.sld: tensor 'a\nb\x1b[2J': bad"), "sld: error: /p/x.sld: tensor 'a\\nb\\x1b[2J': bad"),
        (OSError(errno.ENOENT, "No such file or directory", "/p/in"), "sld: error: /p/in: No such file or directory"),
        (PermissionError(errno.EACCES, "Permission denied", "/p/in"), "sld: error: /p/in: Permission denied"),
        (IsADirectoryError(errno.EISDIR, "Is a directory", "/p/d"), "sld: error: /p/d: Is a directory"),
        (OSError(errno.ENOSPC, "No space left on device", "/p/a", None, "/p/b"),
         "sld: error: /p/a -> /p/b: No space left on device"),
        (ValueError("/p/f: line 1\n  line 2\n"), "sld: error: /p/f: line 1\\n  line 2\n"),
        (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), "sld: error: 'utf-8' codec can't decode"),
        (ModuleNotFoundError("No module named 'bjontegaard'", name="bjontegaard"),
         "sld: error: No module named 'bjontegaard': an optional dependency is missing"),
        (MemoryError(), "sld: error: out of memory"),
        (RecursionError("maximum recursion depth exceeded"), "sld: error: input nested too deeply"),
        (ImportError("BD analysis needs the 'bjontegaard' package"), "sld: error: BD analysis needs the 'bjontegaard'"),
        (SldError(""), "sld: error: SldError"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else "",
)
def test_run_reports_every_class_of_library_error_as_one_line(capsys, exc, expected):
    assert run(_verb(_raise(exc))) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.splitlines()) == 1 and err.startswith(expected), err
    assert err.rstrip("\n").isprintable()


def test_run_interrupt_exits_130_with_one_line(capsys):
    assert run(_verb(_raise(KeyboardInterrupt()))) == 130
    assert capsys.readouterr().err == "sld: interrupted\n"


def test_run_closed_stdout_is_quiet(capsys):
    assert run(_verb(_raise(BrokenPipeError(errno.EPIPE, "Broken pipe")))) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("exc", [TypeError("bug"), AttributeError("bug"), KeyError("bug"), AssertionError("bug")])
def test_run_lets_a_bug_keep_its_traceback(exc):
    # Only the library's own errors (and bad-input OS/value errors) are one line; anything else
    # is a defect in deltacodec that must stay visible.
    with pytest.raises(type(exc)):
        run(_verb(_raise(exc)))


def test_run_prints_each_warning_as_one_escaped_line_and_keeps_the_status(capsys):
    def action():
        warnings.warn("first\nsecond line \x1b[31mred", DeltacodecWarning, stacklevel=1)
        warnings.warn("a warning the library let through", UserWarning, stacklevel=1)
        for _ in range(3):  # the same warning from the same place: shown once
            warnings.warn("repeated", DeltacodecWarning, stacklevel=1)
        print("result")
        return 0

    assert run(_verb(action)) == 0
    out, err = capsys.readouterr()
    assert out == "result\n"
    assert err.splitlines() == [
        "sld: warning: first\\nsecond line \\x1b[31mred",
        "sld: warning: a warning the library let through",
        "sld: warning: repeated",
    ]


def test_run_warnings_and_errors_start_on_their_own_line_after_a_progress_bar(capsys, monkeypatch):
    class Tty:
        def __init__(self):
            self.text = ""

        def isatty(self):
            return True

        def write(self, s):
            self.text += s
            sys.stderr.write(s)

        def flush(self):
            pass

    def action():
        ticks = iter(range(100))  # one second a call: every call may redraw
        bar = cli_progress.ProgressBar("decode", stream=Tty(), delay=0.0, clock=lambda: float(next(ticks)))
        bar(1, 4, "m")
        warnings.warn("careful", DeltacodecWarning, stacklevel=1)
        bar(2, 4, "m")
        raise SldError("/p/x.sld: broken")

    assert run(_verb(action)) == 1
    err = capsys.readouterr().err
    lines = err.split("\n")
    assert lines[1] == "sld: warning: careful" and lines[0].startswith("\rdecode [")
    assert lines[3] == "sld: error: /p/x.sld: broken" and lines[2].startswith("\rdecode [")


# --------------------------------------------------------------------------------------------------
# usage errors: exit 2, argparse's usage text


@pytest.mark.parametrize(
    "args, fragment",
    [
        ((), "required: VERB"),
        (("frobnicate",), "invalid choice: 'frobnicate'"),
        (("encode",), "ADAPTER"),
        (("encode", "a", "--bits", "9"), "bits must be 1..8, 16 or 32, got 9"),
        (("encode", "a", "--bits", "three"), "bits: expected an integer, got 'three'"),
        (("encode", "a", "--level", "23"), "level must be 0..22, got 23"),
        (("encode", "a", "--level", "-1"), "level must be 0..22"),
        (("encode", "a", "--omega", "nan"), "omega must be a finite non-zero number, got 'nan'"),
        (("encode", "a", "--omega", "inf"), "omega must be a finite non-zero number, got 'inf'"),
        (("encode", "a", "--omega=-Infinity"), "omega must be a finite non-zero number"),
        (("encode", "a", "--omega", "0"), "omega must be a finite non-zero number, got '0'"),
        (("encode", "a", "--omega", "fast"), "omega must be a finite non-zero number, got 'fast'"),
        (("encode", "a", "--alpha", "nan"), "alpha must be a finite number, got 'nan'"),
        (("encode", "a", "--alpha", "1e400"), "alpha must be a finite number, got '1e400'"),
        (("encode", "a", "--gamma", "abc"), "gamma must be a positive finite number or 'sqrt-in', got 'abc'"),
        (("encode", "a", "--gamma", "0"), "gamma must be a positive finite number"),
        (("encode", "a", "--gamma", "-2"), "gamma must be a positive finite number"),
        (("encode", "a", "--gamma", "nan"), "gamma must be a positive finite number"),
        (("encode", "a", "--quantizer", "gptq"), "invalid choice: 'gptq'"),
        (("encode", "a", "--frobnicate"), "unrecognized arguments: --frobnicate"),
        (("decode",), "FILE.sld"),
        (("decode", "f.sld", "--dtype", "fp8"), "invalid choice: 'fp8'"),
        (("decode", "f.sld", "--max-decoded-bytes", "0"), "size must be 1 byte"),
        (("decode", "f.sld", "--max-decoded-bytes", "lots"), "expected a size such as"),
        (("inspect", "f.sld", "--max-decoded-bytes", "3XB"), "expected a size such as"),
        (("inspect",), "FILE.sld"),
        (("verify",), "FILE.sld"),
        (("verify", "f.sld", "--max-decoded-bytes", "-5"), "expected a size such as"),
        (("stats", "f.sld", "--max-decoded-bytes", "1e9"), "expected a size such as"),
        (("stats",), "FILE"),
        (("bd", "p.csv", "--method", "linear"), "invalid choice: 'linear'"),
        (("bd", "p.csv", "--min-overlap", "x"), "--min-overlap"),
        (("apply", "base", "f.sld"), "-o/--output"),
    ],
)
def test_usage_errors_exit_2_with_usage_text(capsys, args, fragment):
    rc, out, err = run_sld(capsys, *args)
    assert_usage_error(rc, err, fragment)
    assert out == ""


def test_help_documents_the_exit_statuses(capsys):
    rc, out, _ = run_sld(capsys, "--help")
    assert rc == 0
    for line in ("0    success", "1    error: one line 'sld: error: ...'", "2    usage error", "130  interrupted"):
        assert line in out
    for verb in ("encode", "decode", "inspect", "verify", "stats", "bd", "apply"):
        assert verb in out


# --------------------------------------------------------------------------------------------------
# classes of bad input, every verb: exit 1, one line naming the path, no output left behind


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """One file per class of bad input, plus good inputs for the other arguments."""
    z = tmp_path_factory.mktemp("zoo")
    make_adapter(z / "adapter")
    weights = (z / "adapter" / "adapter_model.safetensors").read_bytes()
    good = write_sld(z / "good.sld", modules=[lora_module("layers.0.q_proj"), lora_module("layers.0.k_proj", seed=1)])
    data = open(good, "rb").read()
    rng = np.random.default_rng(9)
    files = {
        "empty": b"",
        "text-11-bytes": b"hello world",
        "random-bytes": rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "truncated-header": data[:40],
        "truncated-sections": data[:-7],
        "crc-corrupt-section": data[:-3] + bytes([data[-3] ^ 0x40]) + data[-2:],
    }
    for name, blob in files.items():
        (z / f"{name}.sld").write_bytes(blob)
        (z / f"{name}.safetensors").write_bytes(blob)
        (z / f"{name}.csv").write_bytes(blob)
    (z / "truncated-weights.safetensors").write_bytes(weights[:-10])
    (z / "random.bin").write_bytes(files["random-bytes"])
    (z / "adapter.sld.safetensors").write_bytes(data)  # an .sld under an adapter's extension
    (z / "weights-named.sld").write_bytes(weights)  # safetensors under the .sld extension
    (z / "weights.txt").write_bytes(weights)
    (z / "truncated.csv").write_text("method,group,rate,quality\nA,1,1,1\nA,1,2,")
    (z / "empty-dir").mkdir()
    (z / "dir.sld").mkdir()
    shutil.copytree(z / "adapter", z / "bad-config")
    (z / "bad-config" / "adapter_config.json").write_text("{not json")
    shutil.copyfile(good, z / "unreadable.sld")
    os.chmod(z / "unreadable.sld", 0)
    shutil.copytree(z / "adapter", z / "unreadable-adapter")
    os.chmod(z / "unreadable-adapter" / "adapter_model.safetensors", 0)
    save_file({"layers.0.q_proj.weight": np.zeros((2, 3), np.float32),
               "layers.0.k_proj.weight": np.zeros((2, 3), np.float32)}, str(z / "base.safetensors"))
    base = (z / "base.safetensors").read_bytes()
    (z / "truncated-base.safetensors").write_bytes(base[:-5])
    return z


SLD_CLASSES = [
    "missing.sld", "dir.sld", "empty.sld", "text-11-bytes.sld", "random-bytes.sld", "truncated-header.sld",
    "truncated-sections.sld", "weights-named.sld", pytest.param("unreadable.sld", marks=skip_if_root),
]


def _sld_verb_args(verb, path, out):
    return {
        "inspect": ["inspect", path],
        "verify": ["verify", path],
        "decode": ["decode", path, "-o", out],
        "stats": ["stats", path],
    }[verb]


@pytest.mark.parametrize("bad", SLD_CLASSES)
@pytest.mark.parametrize("verb", ["inspect", "verify", "decode", "stats"])
def test_every_sld_verb_gives_one_line_naming_the_file_on_each_class_of_bad_file(capsys, zoo, tmp_path, verb, bad):
    path, out = str(zoo / bad), str(tmp_path / "out")
    if verb == "stats" and bad == "dir.sld":
        path = str(zoo / "empty-dir")  # a directory is an adapter to stats: one without weights
    rc, stdout, err = run_sld(capsys, *_sld_verb_args(verb, path, out))
    assert_one_line_error(rc, err, path)
    assert stdout == "" and not os.path.exists(out)


@pytest.mark.parametrize("bad", SLD_CLASSES + ["crc-corrupt-section.sld"])
def test_apply_gives_one_line_naming_a_bad_sld_file(capsys, zoo, tmp_path, bad):
    out = tmp_path / "out.safetensors"
    rc, stdout, err = run_sld(capsys, "apply", zoo / "base.safetensors", zoo / bad, "-o", out, "-q")
    assert_one_line_error(rc, err, str(zoo / bad))
    assert stdout == "" and not out.exists()


@pytest.mark.parametrize(
    "bad", ["missing.safetensors", "empty-dir", "empty.safetensors", "text-11-bytes.safetensors",
            "random-bytes.safetensors", "truncated-base.safetensors"],
)
def test_apply_gives_one_line_naming_a_bad_base_checkpoint(capsys, zoo, tmp_path, bad):
    # Damaged shards are reported by apply_checkpoint (cli_apply.py); the CLI adds the convention.
    out = tmp_path / "out.safetensors"
    rc, stdout, err = run_sld(capsys, "apply", zoo / bad, zoo / "good.sld", "-o", out, "-q")
    assert_one_line_error(rc, err, str(zoo / bad))
    assert not out.exists()


def test_crc_corrupt_section_passes_inspect_and_fails_every_verb_that_reads_sections(capsys, zoo, tmp_path):
    bad = str(zoo / "crc-corrupt-section.sld")
    rc, out, err = run_sld(capsys, "inspect", bad)
    assert rc == 0 and err == "" and "run 'sld verify'" in out
    for verb in ("verify", "decode", "stats"):
        rc, out, err = run_sld(capsys, *_sld_verb_args(verb, bad, str(tmp_path / "out")))
        assert_one_line_error(rc, err, bad, "layers.0.k_proj.lora_B.weight", "CRC")


@pytest.mark.parametrize(
    "bad", ["missing", "empty-dir", "empty.safetensors", "text-11-bytes.safetensors", "random-bytes.safetensors",
            "truncated-weights.safetensors", "random.bin", "weights.txt", "good.sld", "adapter.sld.safetensors",
            "bad-config", pytest.param("unreadable-adapter", marks=skip_if_root)],
)
def test_encode_gives_one_line_naming_a_bad_adapter(capsys, zoo, tmp_path, bad):
    out = tmp_path / "out.sld"
    rc, stdout, err = run_sld(capsys, "encode", zoo / bad, "-o", out, "-q")
    assert_one_line_error(rc, err, str(zoo / bad))
    assert stdout == "" and not out.exists()


@pytest.mark.parametrize(
    "bad", ["missing.csv", "empty-dir", "empty.csv", "text-11-bytes.csv", "random-bytes.csv", "truncated.csv",
            "good.sld", pytest.param("unreadable.sld", marks=skip_if_root)],
)
def test_bd_gives_one_line_naming_a_bad_points_file(capsys, zoo, bad):
    rc, stdout, err = run_sld(capsys, "bd", zoo / bad)
    assert_one_line_error(rc, err, str(zoo / bad))
    assert stdout == ""


# --------------------------------------------------------------------------------------------------
# the real entry point, as a process


def test_entry_point_error_and_usage_error(tmp_path):
    res = sld_process("inspect", tmp_path / "missing.sld")
    assert_one_line_error(res.returncode, res.stderr, str(tmp_path / "missing.sld"))
    res = sld_process("verify")
    assert_usage_error(res.returncode, res.stderr, "FILE.sld")


def test_entry_point_closed_stdout_ends_quietly(tmp_path):
    # ~20,000 table lines: far more than a pipe buffer, so the writer meets the closed pipe.
    tensors = [{"name": f"t{i:05d}", **_tiny_raw()} for i in range(20000)]
    path = write_sld(tmp_path / "many.sld", modules=[], tensors=tensors)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "deltacodec.cli", "inspect", path], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd=str(REPO))
    first = proc.stdout.readline()  # like `| head -1`
    proc.stdout.close()
    err = proc.stderr.read()
    proc.stderr.close()
    assert proc.wait(timeout=300) == 0
    assert first.startswith(path.encode()) and err == b""


def _tiny_raw():
    return {"shape": [1], "encoding": "raw", "dtype": "F32", "compression": "none",
            "section": np.zeros(1, "<f4").tobytes()}


def test_entry_point_sigint_exits_130_with_one_line(tmp_path):
    # A real SIGINT delivered while a verb runs (the verb sends it to its own process).
    script = textwrap.dedent(
        """
        import os, signal, sys, time
        from deltacodec import cli_inspect
        def interrupted(args):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(30)
        cli_inspect._cmd_inspect = interrupted
        from deltacodec.cli import main
        sys.exit(main(["inspect", "x.sld"]))
        """
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 130 and res.stderr == "sld: interrupted\n" and res.stdout == ""


@pytest.mark.parametrize("args,usage", [
    (["decode", "F.sld", "--bogus"], "usage: sld decode "),
    (["stats", "--bogus", "F.sld"], "usage: sld stats "),
    (["batch", "encode", "a", "b", "--bogus"], "usage: sld batch encode "),
    (["inspect", "F.sld", "extra.sld"], "usage: sld inspect "),
])
def test_unrecognized_arguments_show_the_usage_of_the_verb_typed(capsys, args, usage):
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(usage), err
    assert err.splitlines()[-1].endswith("error: unrecognized arguments: " + " ".join(a for a in args if a in ("--bogus", "extra.sld")))
