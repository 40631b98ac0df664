"""Loading the compiled rANS coder (deltacodec/_rans.c) through ctypes.

The library has no Python API, so one build serves every interpreter. It is looked for, in order:

1. ``deltacodec/_rans_native*.so|.dylib|.dll`` beside this file (what a wheel or
   ``python -m deltacodec._native`` builds);
2. a copy compiled on first use into the user cache (``$DELTACODEC_CACHE``, else
   ``$XDG_CACHE_HOME/deltacodec``, else ``~/.cache/deltacodec``), keyed by a hash of the source,
   when a C compiler (``$CC`` or ``cc``) is on the PATH; ``DELTACODEC_NO_BUILD=1`` turns this off.

When neither works, :func:`library` returns None and :mod:`deltacodec.rans` falls back to its
plain Python reference coder (correct, about 1000x slower).
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile

__all__ = ["library", "build", "SOURCE"]

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_rans.c")
_LIB: ctypes.CDLL | None = None
_TRIED = False
_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_I32 = ctypes.c_int32


def _suffix() -> str:
    if sys.platform == "darwin":
        return ".dylib"
    if os.name == "nt":
        return ".dll"
    return ".so"


def _cache_dir() -> str:
    root = os.environ.get("DELTACODEC_CACHE")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "deltacodec")
    return root


def build(dest: str | None = None) -> str:
    """Compile ``_rans.c`` into a shared library at ``dest`` (default: beside this module) and
    return its path. Raises OSError/CalledProcessError when no compiler works."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise OSError("no C compiler found (set CC)")
    if dest is None:
        dest = os.path.join(os.path.dirname(SOURCE), "_rans_native" + _suffix())
    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=_suffix(), dir=os.path.dirname(dest) or ".")
    os.close(fd)
    try:
        flags = ["-O2", "-std=c99", "-shared", "-fPIC"]
        subprocess.run([cc, *flags, "-o", tmp, SOURCE], check=True, capture_output=True)
        os.replace(tmp, dest)  # atomic: concurrent builders never expose a half-written library
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    lib.sld_rans_encode.restype = _I64
    lib.sld_rans_encode.argtypes = [_I32, _P, _P, _P, _P, _P, _P, _P, _I32, _P, _I64, _P, _I64]
    lib.sld_rans_decode.restype = _I32
    lib.sld_rans_decode.argtypes = [_P, _I64, _I32, _P, _P, _P, _P, _I32, _P, _P]
    lib.sld_ecsq_assign.restype = _I32
    lib.sld_ecsq_assign.argtypes = [_P, _I64, ctypes.c_double, _I32, _I32, _P, _I64, _I64, _P, _P]
    lib.sld_build_slots.restype = _I32
    lib.sld_build_slots.argtypes = [_I32, _I32, _P, _P, _P]
    lib.sld_read_explicit_freqs.restype = _I32
    lib.sld_read_explicit_freqs.argtypes = [_P, _I64, _P, _I32, _I32, _I32, _P]
    return lib


def _candidates() -> list[str]:
    here = os.path.dirname(SOURCE)
    found = sorted(glob.glob(os.path.join(here, "_rans_native*" + _suffix())))
    if os.environ.get("DELTACODEC_NO_BUILD") == "1":
        return found
    with open(SOURCE, "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()[:16]
    tag = sysconfig.get_platform().replace("-", "_").replace(".", "_")
    return found + [os.path.join(_cache_dir(), f"rans-{digest}-{tag}{_suffix()}")]


def library() -> ctypes.CDLL | None:
    """The loaded coder library, building it into the cache if needed; None if unavailable."""
    global _LIB, _TRIED
    if _TRIED:
        return _LIB
    _TRIED = True
    for path in _candidates():
        try:
            if not os.path.exists(path):
                if not path.startswith(_cache_dir()):
                    continue
                build(path)
            _LIB = _bind(ctypes.CDLL(path))
            return _LIB
        except (OSError, subprocess.CalledProcessError, AttributeError):
            continue
    return None


if __name__ == "__main__":
    print(build())
