"""Helpers of the CLI tests: run ``sld`` in-process or as a process, build small .sld files."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from deltacodec.cli import main
from deltacodec.format import build_container, serialize_unchecked

REPO = Path(__file__).resolve().parents[1]


def run_sld(capsys, *args: str) -> tuple[int, str, str]:
    """``sld ARGS`` in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def run_captured(*args: str) -> tuple[int, str, str]:
    """``sld ARGS`` in this process with stdout/stderr captured here (usable inside hypothesis
    tests, where the function-scoped capsys fixture is not)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def sld_process(*args: str, **kwargs: Any) -> subprocess.CompletedProcess:
    """``sld ARGS`` through the real entry point (``python -m deltacodec.cli``)."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "deltacodec.cli", *map(str, args)],
        capture_output=True, text=True, env=env, cwd=str(REPO), timeout=300, **kwargs,
    )


def assert_one_line_error(rc: int, err: str, *fragments: str) -> str:
    """Exit 1 and exactly one stderr line, ``sld: error: ...``, holding every fragment."""
    assert rc == 1, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), repr(err)
    assert lines[0].startswith("sld: error: "), lines[0]
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])
    return lines[0]


def assert_usage_error(rc: int, err: str, *fragments: str) -> None:
    """Exit 2 with argparse's usage text and its one ``error:`` line."""
    assert rc == 2, err
    assert "Traceback" not in err
    assert err.startswith("usage: sld"), err
    assert ": error: " in err.splitlines()[-1], err
    for frag in fragments:
        assert frag in err, (frag, err)


def raw_tensor(values: np.ndarray, dtype: str = "F16") -> dict[str, Any]:
    """A section dict of ``build_container`` for values stored raw and uncompressed."""
    np_dtype = {"F16": "<f2", "F32": "<f4", "F64": "<f8"}[dtype]
    return {
        "shape": list(values.shape), "encoding": "raw", "dtype": dtype, "compression": "none",
        "section": np.ascontiguousarray(values, dtype=np_dtype).tobytes(),
    }


def lora_module(name: str, out_f: int = 2, in_f: int = 3, rank: int = 1, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {
        "name": name, "sine": False, "out_features": out_f, "in_features": in_f, "rank": rank,
        "scale": 1.0, "omega": None, "gamma": None, "fan_in_fan_out": False,
        "A": raw_tensor(rng.uniform(-1, 1, (rank, in_f))), "B": raw_tensor(rng.uniform(-1, 1, (out_f, rank))),
    }


def write_sld(path: str | os.PathLike, *, metadata: Any = None, modules: list | None = None,
              tensors: list | None = None, checked: bool = True) -> str:
    """A small .sld (one LoRA module unless given) with the given header metadata. ``checked``:
    through the writer, which refuses what a reader would reject; False writes the bytes anyway
    (damaged sections, names or metadata a reader must refuse)."""
    if modules is None and tensors is None:
        modules = [lora_module("layers.0.q_proj")]
    meta = {"method": "lora", "encoder": "test"} if metadata is None else metadata
    build = build_container if checked else serialize_unchecked
    Path(path).write_bytes(build(meta, modules or [], tensors or []))
    return str(path)
