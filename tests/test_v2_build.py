"""setup.py builds the rANS coder as an optional extension (a plain C library loaded by ctypes),
and the library it builds is the coder deltacodec loads: same bytes as the reference coder."""

from __future__ import annotations

import ctypes
import glob
import os
import subprocess
import sys

import numpy as np
import pytest

from deltacodec import _native, rans
from deltacodec.freqtable import best_table

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_setup_builds_the_coder_as_an_optional_extension(tmp_path, monkeypatch):
    pytest.importorskip("setuptools")
    if not (os.environ.get("CC") or any(os.path.exists(f"/usr/bin/{c}") for c in ("cc", "gcc", "clang"))):
        pytest.skip("no C compiler")
    r = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"),
                        "--build-temp", str(tmp_path / "tmp")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    (so,) = glob.glob(str(tmp_path / "lib" / "deltacodec" / "_rans_native*"))
    lib = _native._bind(ctypes.CDLL(so))
    monkeypatch.setattr(_native, "_LIB", lib)
    monkeypatch.setattr(_native, "_TRIED", True)
    rng = np.random.default_rng(0)
    idx = np.clip(np.rint(rng.laplace(0, 3, 5000)), -40, 40).astype(np.int32)
    lo = int(idx.min())
    table = best_table(np.bincount(idx - lo), lo)
    data = rans.encode([(idx, table)], lanes=4)
    assert data == rans.encode_reference([(idx, table)], lanes=4)
    np.testing.assert_array_equal(rans.decode(data, [(idx.size, table)], lanes=4)[0], idx)
