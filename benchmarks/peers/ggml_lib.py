"""ggml's own quantizers (the code behind ``llama-quantize``), loaded through ctypes.

The ``gguf`` Python package can *dequantize* every K-quant but quantizes only the legacy types
(Q4_0, Q8_0, ...). For Q2_K..Q6_K the peers use ggml's C quantizers from the llama.cpp source
that llama-cpp-python vendors: four ggml source files compiled into a small shared library
(seconds, no CMake). Nothing is downloaded here; get the source once with

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /tmp/llama-src

and pass the tarball (or its extracted directory) as ``--llama-cpp-src``. The library is cached
under ``~/.cache/deltacodec-peers/`` keyed by the source's file digest; ``DELTACODEC_GGML_LIB``
names a prebuilt one.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tarfile
import re
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["GgmlQuantizer", "load_ggml", "build_ggml", "CACHE_DIR"]

CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "deltacodec-peers"
# ggml.c needs the backend symbols at load time even though quantization never calls them.
_C_SOURCES = ("ggml.c", "ggml-quants.c", "ggml-alloc.c")
_WANTED = re.compile(r"/vendor/llama\.cpp/ggml/(include/[^/]+|src/[^/]+|src/ggml-cpu/[^/]+\.h)$")
_CXX_SOURCES = ("ggml-threading.cpp", "ggml-backend.cpp", "ggml-backend-meta.cpp")


class GgmlQuantizer:
    """``ggml_quantize_chunk`` of one loaded library. ``quantize(x, type_id)``: ``x`` float32
    ``(rows, n_per_row)`` with ``n_per_row`` a multiple of the type's block size; returns the
    GGUF block bytes ``(rows, row_bytes)`` uint8, exactly what llama.cpp writes into a file."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = str(path)
        lib = ctypes.CDLL(self.path)
        self._chunk = lib.ggml_quantize_chunk
        self._chunk.restype = ctypes.c_size_t
        self._chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        self._row_size = lib.ggml_row_size
        self._row_size.restype = ctypes.c_size_t
        self._row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        self._type_name = lib.ggml_type_name
        self._type_name.restype = ctypes.c_char_p
        self._type_name.argtypes = [ctypes.c_int]
        self._needs_imatrix = lib.ggml_quantize_requires_imatrix
        self._needs_imatrix.restype = ctypes.c_bool
        self._needs_imatrix.argtypes = [ctypes.c_int]

    def type_name(self, type_id: int) -> str:
        return self._type_name(int(type_id)).decode()

    def quantize(self, x: np.ndarray, type_id: int) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2:
            raise ValueError(f"expected a 2-D array, got shape {x.shape}")
        if self._needs_imatrix(int(type_id)):
            raise ValueError(f"{self.type_name(type_id)} needs an importance matrix")
        rows, n = x.shape
        row_bytes = int(self._row_size(int(type_id), n))
        out = np.zeros((rows, row_bytes), dtype=np.uint8)
        written = int(self._chunk(int(type_id), x.ctypes.data, out.ctypes.data, 0, rows, n, None))
        if written != out.nbytes:
            raise RuntimeError(f"ggml wrote {written} bytes, expected {out.nbytes}")
        return out


def _ggml_root(src: Path, work: Path) -> Path:
    """The ``ggml`` directory of a llama-cpp-python sdist (tarball or extracted tree)."""
    if src.is_file():
        with tarfile.open(src) as tf:
            # only the top-level ggml sources and headers (the sdist is ~75 MB)
            members = [m for m in tf.getmembers() if _WANTED.search(m.name)]
            tf.extractall(work, members=members, filter="data")
        src = work
    hits = sorted(p.parent.parent for p in src.rglob("ggml/src/ggml-quants.c"))
    if not hits:
        raise FileNotFoundError(f"{src}: no vendor/llama.cpp/ggml/src/ggml-quants.c inside")
    return hits[0]


def _digest(src: Path) -> str:
    h = hashlib.sha256()
    if src.is_file():
        with open(src, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    else:
        for name in _C_SOURCES + _CXX_SOURCES:
            for p in sorted(src.rglob(f"ggml/src/{name}")):
                h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _compile(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:2])} ... {cmd[-3]} failed: {proc.stderr.strip()[-800:]}")


def build_ggml(src: str | os.PathLike[str], cache_dir: Path = CACHE_DIR) -> Path:
    """Compile ggml's quantizers from a llama-cpp-python sdist into ``cache_dir``; return the
    library's path (reused when already built from the same source)."""
    src = Path(src)
    lib = cache_dir / f"libggml-quants-{_digest(src)}.so"
    if lib.is_file():
        return lib
    cache_dir.mkdir(parents=True, exist_ok=True)
    cc, cxx = shutil.which("gcc") or shutil.which("cc"), shutil.which("g++") or shutil.which("c++")
    if not cc or not cxx:
        raise RuntimeError("no C/C++ compiler (gcc, g++) on PATH")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        root = _ggml_root(src, work / "src")
        gen = work / "gen"
        gen.mkdir()
        tpl = (root / "src" / "ggml-version.h.in").read_text()
        (gen / "ggml-version.h").write_text(tpl.replace("@GGML_VERSION@", "vendored")
                                            .replace("@GGML_BUILD_COMMIT@", "vendored"))
        inc = ["-I", str(root / "include"), "-I", str(root / "src"), "-I", str(gen)]
        objs = []
        for name in _C_SOURCES:
            o = work / (name + ".o")
            _compile([cc, "-O2", "-fPIC", *inc, "-c", str(root / "src" / name), "-o", str(o)])
            objs.append(str(o))
        for name in _CXX_SOURCES:
            o = work / (name + ".o")
            _compile([cxx, "-O2", "-fPIC", "-std=c++17", *inc, "-c", str(root / "src" / name), "-o", str(o)])
            objs.append(str(o))
        tmp_lib = work / lib.name
        _compile([cxx, "-shared", "-o", str(tmp_lib), *objs, "-lm", "-lpthread"])
        staged = lib.with_name(lib.name + f".{os.getpid()}.tmp")
        shutil.copyfile(tmp_lib, staged)
        os.replace(staged, lib)  # atomic: a concurrent run sees a whole library or none
    return lib


def load_ggml(src: str | os.PathLike[str] | None = None, cache_dir: Path = CACHE_DIR) -> tuple[GgmlQuantizer | None, str]:
    """(quantizer, how it was found) or (None, why not). Order: ``$DELTACODEC_GGML_LIB``, a build
    from ``src``, any library already in ``cache_dir``."""
    try:
        env = os.environ.get("DELTACODEC_GGML_LIB")
        if env:
            return GgmlQuantizer(env), f"DELTACODEC_GGML_LIB={env}"
        if src is not None:
            path = build_ggml(src, cache_dir)
            return GgmlQuantizer(path), f"built from {src} ({path})"
        cached = sorted(cache_dir.glob("libggml-quants-*.so")) if cache_dir.is_dir() else []
        if cached:
            return GgmlQuantizer(cached[-1]), f"cached {cached[-1]}"
        return None, ("no ggml library: pass --llama-cpp-src (a llama-cpp-python sdist, "
                      "`pip download --no-deps --no-binary :all: llama-cpp-python`)")
    except (OSError, RuntimeError, FileNotFoundError, subprocess.CalledProcessError, tarfile.TarError) as exc:
        return None, f"ggml library unavailable: {exc}"
