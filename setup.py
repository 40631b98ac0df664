"""Build hook: the rANS/ECSQ coder (deltacodec/_rans.c) as an optional compiled library.

The library is plain C loaded through ctypes (deltacodec/_native.py), not a Python extension
module: building it here only saves the compile at first use. ``optional=True``: without a C
compiler the install still succeeds, and deltacodec compiles the library into its cache at first
use, or falls back to the pure-Python coder (same bytes, slower).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "deltacodec._rans_native",
            sources=["deltacodec/_rans.c"],
            extra_compile_args=["-O2", "-std=c99"],
            optional=True,
        )
    ]
)
