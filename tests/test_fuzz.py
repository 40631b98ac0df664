"""Mutated and truncated files: the reader raises only deltacodec's own errors, never crashes,
never hangs, never allocates what a corrupt size asks for. The default profile runs a few
hundred cases; HYPOTHESIS_PROFILE=slow with -m exhaustive runs thousands."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deltacodec import SldError
from deltacodec.codec import build_container
from deltacodec.format import SldFile
from deltacodec.pack import pack_indices

from sldtools import simple_file


def _valid_files() -> list[bytes]:
    files = [simple_file()[0], simple_file(kind="sine", compression="zstd")[0]]
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 8, 64).astype(np.uint8)
    import zstandard

    payload = pack_indices(idx, 4).tobytes()
    sec = zstandard.ZstdCompressor(level=1).compress(payload)
    t = {"shape": (8, 8), "encoding": "codebook", "bits": 3, "width": 4, "quantizer": "kmeans",
         "codebook_f16": np.linspace(-1, 1, 8).astype("<f2").tobytes(), "codebook_scale": 0.5,
         "compression": "zstd", "section": sec}
    mod = {"name": "layer.q", "sine": True, "out_features": 8, "in_features": 8, "rank": 8, "scale": 1.0,
           "omega": 30.0, "gamma": 2.0, "fan_in_fan_out": False, "A": t, "B": dict(t)}
    raw = {"name": "bias", "shape": (5,), "encoding": "raw", "dtype": "BF16", "compression": "none",
           "section": np.ones(5, "<u2").tobytes()}
    files.append(build_container({"method": "sine"}, [mod], [raw]))
    return files


VALID = _valid_files()


def read_everything(path: str) -> None:
    f = SldFile(path)
    for e in f.entries():
        f.tensor(e)


def _check(tmp_path_factory, data: bytes) -> None:
    p = tmp_path_factory.mktemp("fz") / "f.sld"
    p.write_bytes(data)
    try:
        read_everything(str(p))
    except SldError:
        pass


@given(
    which=st.integers(0, len(VALID) - 1),
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), min_size=1, max_size=4),
)
def test_flipped_bytes_raise_only_library_errors(tmp_path_factory, which, flips):
    data = bytearray(VALID[which])
    for pos, mask in flips:
        data[pos % len(data)] ^= mask
    _check(tmp_path_factory, bytes(data))


@given(which=st.integers(0, len(VALID) - 1), cut=st.integers(0, 10_000))
def test_truncated_files_raise_only_library_errors(tmp_path_factory, which, cut):
    data = VALID[which]
    p = tmp_path_factory.mktemp("tr") / "f.sld"
    p.write_bytes(data[: cut % len(data)])
    with pytest.raises(SldError):
        read_everything(str(p))


@given(which=st.integers(0, len(VALID) - 1), junk=st.binary(min_size=1, max_size=64), pos=st.integers(0, 10_000))
def test_inserted_bytes_raise_only_library_errors(tmp_path_factory, which, junk, pos):
    data = VALID[which]
    i = pos % len(data)
    _check(tmp_path_factory, data[:i] + junk + data[i:])


@pytest.mark.exhaustive
@settings(max_examples=20_000)
@given(which=st.integers(0, len(VALID) - 1), flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), min_size=1, max_size=8))
def test_flipped_bytes_long_run(tmp_path_factory, which, flips):
    data = bytearray(VALID[which])
    for pos, mask in flips:
        data[pos % len(data)] ^= mask
    _check(tmp_path_factory, bytes(data))
