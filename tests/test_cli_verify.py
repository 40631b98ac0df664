"""``sld verify``: every section checked, one OK line per good file, exit 1 naming the first bad
file and tensor. Each class of damage below leaves the header valid, so ``inspect`` (header only)
cannot see it; ``verify`` must."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zstandard

import deltacodec
from cli_helpers import assert_one_line_error, lora_module, raw_tensor, run_sld, write_sld
from deltacodec.format import SldFile
from test_codec import make_adapter


def codebook_tensor(indices_bytes: bytes, *, shape, bits, width, codebook, scale=1.0, compression="none"):
    """A codebook section dict for build_container with the packed indices given as bytes."""
    section = indices_bytes
    if compression == "zstd":
        section = zstandard.ZstdCompressor(level=3).compress(indices_bytes)
    return {
        "shape": list(shape), "encoding": "codebook", "bits": bits, "width": width, "quantizer": "kmeans",
        "codebook_f16": np.asarray(codebook, "<f2").tobytes(), "codebook_scale": float(scale),
        "compression": compression, "section": section,
    }


def zstd_raw(values: np.ndarray, payload: bytes | None = None) -> dict:
    """A raw F32 tensor whose zstd section holds ``payload`` (default: the values' bytes)."""
    t = raw_tensor(values, "F32")
    data = t["section"] if payload is None else payload
    return {**t, "compression": "zstd", "section": zstandard.ZstdCompressor(level=3).compress(data)}


DAMAGE = {
    # name of the class: the damaged tensor's section dict (the header stays valid)
    "zstd-frame-is-garbage": {**raw_tensor(np.ones(64), "F32"), "compression": "zstd", "section": b"\x28\xb5\x2f\xfd" + b"\x00" * 20},
    "zstd-decodes-to-more-than-the-shape": zstd_raw(np.ones(64), b"\x00" * 4 * 64 * 1000),
    "zstd-decodes-to-less-than-the-shape": zstd_raw(np.ones(64), b"\x00" * 4 * 60),
    "padding-bits-not-zero": codebook_tensor(b"\x00\x80", shape=[5], bits=3, width=3, codebook=range(8)),
    "index-beyond-the-codebook": codebook_tensor(bytes([0, 1, 2, 200]), shape=[4], bits=2, width=8,
                                                 codebook=[0, 1, 2, 3], compression="zstd"),
    "raw-f32-nan": raw_tensor(np.array([1.0, np.nan]), "F32"),
    "raw-f16-inf": raw_tensor(np.array([1.0, np.inf]), "F16"),
    "codebook-times-scale-overflows": codebook_tensor(bytes([0, 1]), shape=[2], bits=1, width=8,
                                                      codebook=[1.0, 65504.0], scale=3e38),
}


def damaged_file(path, kind: str) -> str:
    return write_sld(path, modules=[lora_module("layers.0.q_proj")], tensors=[{"name": "bad.weight", **DAMAGE[kind]}],
                     checked=False)


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_verify_names_file_and_tensor_for_each_class_of_section_damage(capsys, tmp_path, kind):
    path = damaged_file(tmp_path / f"{kind}.sld", kind)
    rc, out, err = run_sld(capsys, "verify", path)
    assert_one_line_error(rc, err, path, "bad.weight")
    assert out == ""
    rc, out, err = run_sld(capsys, "inspect", path)
    if rc != 0:  # a reader may also catch this class from the header alone: then as one line
        assert_one_line_error(rc, err, path, "bad.weight")


def test_verify_crc_mismatch_in_any_section(capsys, tmp_path):
    path = write_sld(tmp_path / "a.sld", modules=[lora_module("m0"), lora_module("m1", seed=1)],
                     tensors=[{"name": "extra", **raw_tensor(np.ones(3), "F32")}])
    data = open(path, "rb").read()
    f = SldFile(path)
    for e in f.entries():
        bad = bytearray(data)
        bad[f.data_offset + e.offset + e.length // 2] ^= 0x01
        target = tmp_path / "bad.sld"
        target.write_bytes(bytes(bad))
        rc, _, err = run_sld(capsys, "verify", target)
        assert_one_line_error(rc, err, str(target), f"'{e.name}'", "CRC")


@pytest.mark.parametrize("bits", [1, 3, 8, 16])
@pytest.mark.parametrize("level", [0, 1])
def test_verify_passes_every_file_the_encoder_writes(capsys, tmp_path, bits, level):
    make_adapter(tmp_path / "a", rank=8)
    path = deltacodec.encode(str(tmp_path / "a"), bits=bits, out=str(tmp_path / "a.sld"), level=level)
    rc, out, err = run_sld(capsys, "verify", path)
    assert rc == 0 and err == ""
    assert out == f"{path}: OK (4 tensors in 2 modules, {SldFile(path).file_size:,} bytes, every section checked)\n"


def test_verify_several_files_stops_at_the_first_bad_one(capsys, tmp_path):
    good = write_sld(tmp_path / "good.sld")
    bad = damaged_file(tmp_path / "bad.sld", "raw-f32-nan")
    rc, out, err = run_sld(capsys, "verify", good, good, bad, good)
    assert_one_line_error(rc, err, bad, "bad.weight")
    assert out.splitlines() == [f"{good}: OK (2 tensors in 1 modules, {SldFile(good).file_size:,} bytes, every section checked)"] * 2
    rc, out, err = run_sld(capsys, "verify", good, good)
    assert rc == 0 and err == "" and len(out.splitlines()) == 2


def test_verify_json_reports_each_file_and_the_failure(capsys, tmp_path):
    good = write_sld(tmp_path / "good.sld")
    bad = damaged_file(tmp_path / "bad.sld", "padding-bits-not-zero")
    rc, out, err = run_sld(capsys, "verify", "--json", good, bad, good)
    line = assert_one_line_error(rc, err, bad)
    doc = json.loads(out)
    assert doc["ok"] is False and [f["file"] for f in doc["files"]] == [good, bad]
    assert doc["files"][0] == {"file": good, "ok": True, "modules": 1, "tensors": 2,
                               "bytes": SldFile(good).file_size, "decoded_bytes": 4 * (3 + 2)}
    assert doc["files"][1]["ok"] is False and line == "sld: error: " + doc["files"][1]["error"]
    rc, out, err = run_sld(capsys, "verify", "--json", good)
    assert rc == 0 and err == "" and json.loads(out)["ok"] is True


def test_verify_max_decoded_bytes(capsys, tmp_path):
    path = write_sld(tmp_path / "a.sld", tensors=[{"name": "big", **raw_tensor(np.ones(1000), "F32")}])
    need = SldFile(path).decoded_nbytes
    rc, out, err = run_sld(capsys, "verify", path, "--max-decoded-bytes", str(need - 1))
    assert_one_line_error(rc, err, path, f"{need:,}", "--max-decoded-bytes")
    rc, out, err = run_sld(capsys, "verify", path, "--max-decoded-bytes", str(need))
    assert rc == 0 and "OK" in out
