"""`sld apply` / apply_checkpoint: patching a safetensors checkpoint on disk.

Most tests use a small checkpoint written here (two shards, an index, other files and nested
subdirectories) and the two-module adapter of test_codec; two end-to-end tests use a tiny Llama
from transformers and compare with deltacodec.apply in memory. Damaged checkpoints are tested
as classes (every way a shard or the index can be wrong) and fuzzed with hypothesis.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import deltacodec
from deltacodec import ApplyError, OutputError, SldError, SldFormatError, SldLimitError
from deltacodec.cli_apply import INDEX_NAME, apply_checkpoint

import sldtools
from test_codec import make_adapter

PY = sys.executable
SHARD1 = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"
Q, DOWN = "layers.0.q_proj.weight", "layers.0.down_proj.weight"


def sld_cli(*args, cwd=None):
    return subprocess.run([PY, "-m", "deltacodec.cli", *args], capture_output=True, text=True, cwd=cwd)


def listing(d) -> dict[str, bytes | str | None]:
    """Every path under d: file bytes, link text, or None for a directory (links not followed)."""
    out = {}
    for root, dirs, files in os.walk(d):
        for n in dirs + files:
            p = os.path.join(root, n)
            rel = os.path.relpath(p, d)
            if os.path.islink(p):
                out[rel] = "-> " + os.readlink(p)
            elif os.path.isdir(p):
                out[rel] = None
            else:
                out[rel] = open(p, "rb").read()
    return out


def no_temps(*dirs) -> bool:
    return all(not n.startswith(".sld-") for d in dirs for n in os.listdir(d))


def weights(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        Q: torch.randn(32, 48, generator=g).to(dtype),
        DOWN: torch.randn(48, 64, generator=g).to(dtype),
        "embed.weight": torch.randn(10, 48, generator=g).to(dtype),
        "norm.weight": torch.randn(48, generator=g).to(torch.bfloat16),
        "position_ids": torch.arange(7, dtype=torch.int64),
    }


def make_checkpoint(d, dtype=torch.float32, *, seed=0):
    """Two shards + index, config, nested tokenizer files, an unlisted .safetensors."""
    w = weights(dtype, seed)
    os.makedirs(d)
    s1 = {Q: w[Q], "embed.weight": w["embed.weight"], "position_ids": w["position_ids"]}
    s2 = {DOWN: w[DOWN], "norm.weight": w["norm.weight"]}
    save_file(s1, str(d / SHARD1), metadata={"format": "pt", "note": "shard one"})
    save_file(s2, str(d / SHARD2), metadata={"format": "pt"})
    wmap = {k: SHARD1 for k in s1} | {k: SHARD2 for k in s2}
    (d / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": 1}, "weight_map": wmap}))
    (d / "config.json").write_text('{"model_type": "tiny"}')
    (d / "tokenizer").mkdir()
    (d / "tokenizer" / "vocab.txt").write_text("a\nb\n")
    (d / "tokenizer" / "deep").mkdir()
    (d / "tokenizer" / "deep" / "merges.txt").write_text("a b\n")
    (d / "empty_dir").mkdir()
    save_file({"stale": torch.ones(2)}, str(d / "consolidated.safetensors"))  # not in the index
    return w


@pytest.fixture(scope="module")
def adapter_sld(tmp_path_factory):
    d = tmp_path_factory.mktemp("adapter")
    make_adapter(d / "a", config={"lora_alpha": 16})
    return deltacodec.encode(str(d / "a"), bits=8, out=str(d / "a.sld"))


def reference(f, name, W):
    """W + ΔW in float64 from the file's decoded factors, plainly."""
    m = next(m for m in f.modules if m.name.endswith(name.rsplit(".", 1)[0]))
    A, B = f.dequantize(m.name)
    d = m.scale * (B.astype(np.float64) @ A.astype(np.float64))
    return W.double().numpy() + d


def raw_bytes(path, key):
    with open(path, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        head = json.loads(fh.read(n))
        b, e = head[key]["data_offsets"]
        fh.seek(8 + n + b)
        return fh.read(e - b)


# ----------------------------------------------------------------------------------------------
# What OUT receives


def test_out_gets_patched_shards_and_a_copy_of_every_other_file_and_subdirectory(tmp_path, adapter_sld):
    base = tmp_path / "base"
    w = make_checkpoint(base)
    written = apply_checkpoint(base, adapter_sld, tmp_path / "out")
    src, out = listing(base), listing(tmp_path / "out")
    assert set(out) == set(src)  # every file and directory, including empty ones and unlisted shards
    for rel, v in src.items():
        if rel not in (SHARD1, SHARD2):
            assert out[rel] == v, rel
    assert sorted(written) == sorted(str(tmp_path / "out" / r) for r, v in src.items() if v is not None)
    f = deltacodec.load(adapter_sld)
    got = load_file(str(tmp_path / "out" / SHARD1)) | load_file(str(tmp_path / "out" / SHARD2))
    assert set(got) == set(w)
    for key in (Q, DOWN):
        # W + ΔW formed in fp32 and rounded once: within a few fp32 ulps of the float64 sum
        ref = reference(f, key, w[key])
        np.testing.assert_allclose(got[key].double().numpy(), ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())
        assert not torch.equal(got[key], w[key])
    for key, shard in (("embed.weight", SHARD1), ("position_ids", SHARD1), ("norm.weight", SHARD2)):
        assert raw_bytes(tmp_path / "out" / shard, key) == raw_bytes(base / shard, key)  # untouched, bit for bit
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / SHARD1), framework="pt") as fh:
        assert fh.metadata() == {"format": "pt", "note": "shard one"}
    assert no_temps(tmp_path)


def test_single_file_checkpoint(tmp_path, adapter_sld):
    w = weights()
    save_file(w, str(tmp_path / "model.safetensors"))
    (p,) = apply_checkpoint(tmp_path / "model.safetensors", adapter_sld, tmp_path / "out.safetensors")
    got = load_file(p)
    ref = reference(deltacodec.load(adapter_sld), Q, w[Q])
    np.testing.assert_allclose(got[Q].double().numpy(), ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())
    assert torch.equal(got["position_ids"], w["position_ids"])
    with pytest.raises(ApplyError, match="OUT must end in .safetensors"):
        apply_checkpoint(tmp_path / "model.safetensors", adapter_sld, tmp_path / "outdir")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoints_are_patched_in_their_dtype(tmp_path, adapter_sld, dtype):
    w = make_checkpoint(tmp_path / "base", dtype)
    apply_checkpoint(tmp_path / "base", adapter_sld, tmp_path / "out")
    got = load_file(str(tmp_path / "out" / SHARD1))[Q]
    ref = torch.from_numpy(reference(deltacodec.load(adapter_sld), Q, w[Q]))
    assert got.dtype == dtype
    # one rounding of the fp32 sum to the dtype: within one spacing of the float64 value
    spacing = torch.finfo(dtype).eps * ref.abs().clamp_min(torch.finfo(dtype).tiny)
    assert ((got.double() - ref).abs() <= spacing + 1e-6 * ref.abs().max()).all()


# ----------------------------------------------------------------------------------------------
# Symbolic links


def test_hugging_face_cache_snapshot_links_are_followed(tmp_path, adapter_sld):
    # snapshots/<rev>/ holds links into ../../blobs: the usual layout of a downloaded model
    make_checkpoint(tmp_path / "tmp")
    blobs, snap = tmp_path / "hub" / "blobs", tmp_path / "hub" / "snapshots" / "abc"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for name in (SHARD1, SHARD2, INDEX_NAME, "config.json"):
        shutil.move(str(tmp_path / "tmp" / name), blobs / ("blob-" + name))
        os.symlink(os.path.join("..", "..", "blobs", "blob-" + name), snap / name)
    blob_bytes = listing(blobs)
    apply_checkpoint(snap, adapter_sld, tmp_path / "out")
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == sorted([SHARD1, SHARD2, INDEX_NAME, "config.json"])
    assert not any(os.path.islink(out / n) for n in os.listdir(out))  # content copied, not links
    assert (out / "config.json").read_text() == '{"model_type": "tiny"}'
    assert listing(blobs) == blob_bytes
    # replacing the directory that holds the blobs would delete what BASE links to
    with pytest.raises(OutputError, match="contains the input"):
        apply_checkpoint(snap, adapter_sld, tmp_path / "hub" / "blobs", force=True)
    with pytest.raises(OutputError, match="contains the input"):
        apply_checkpoint(snap, adapter_sld, tmp_path / "hub", force=True)
    assert listing(blobs) == blob_bytes


def test_directory_links_inside_base_are_recreated_and_others_refused(tmp_path, adapter_sld):
    base = tmp_path / "base"
    make_checkpoint(base)
    os.symlink("tokenizer", base / "tok")  # inside BASE: a relative link in OUT
    os.symlink("../tokenizer/deep", base / "empty_dir" / "up")
    apply_checkpoint(base, adapter_sld, tmp_path / "out")
    assert os.readlink(tmp_path / "out" / "tok") == "tokenizer"
    assert (tmp_path / "out" / "tok" / "vocab.txt").read_text() == "a\nb\n"
    assert os.path.realpath(tmp_path / "out" / "empty_dir" / "up") == os.path.realpath(tmp_path / "out" / "tokenizer" / "deep")

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    cases = {
        "outside": lambda b: os.symlink(str(outside), b / "ext"),
        "dangling": lambda b: os.symlink("nothing-here", b / "gone"),
        "loop": lambda b: (os.symlink("l2", b / "l1"), os.symlink("l1", b / "l2")),
        "fifo": lambda b: os.mkfifo(b / "pipe"),
    }
    for i, (what, make) in enumerate(cases.items()):
        b = tmp_path / f"b{i}"
        make_checkpoint(b)
        make(b)
        with pytest.raises(ApplyError, match=r"outside BASE|broken symbolic link|FIFO") as exc:
            apply_checkpoint(b, adapter_sld, tmp_path / f"o{i}")
        assert str(b) in str(exc.value), what
        assert not (tmp_path / f"o{i}").exists() and no_temps(tmp_path)


# ----------------------------------------------------------------------------------------------
# Damaged checkpoints: each an ApplyError naming the shard or the index, nothing written


def st_file(header, data: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _shard1_bytes(base):
    return (base / SHARD1).read_bytes()


def _header_len(data: bytes) -> int:
    return struct.unpack("<Q", data[:8])[0]


def _index(base, obj):
    (base / INDEX_NAME).write_text(obj if isinstance(obj, str) else json.dumps(obj))


def _wmap(base):
    return json.loads((base / INDEX_NAME).read_text())["weight_map"]


SHARD_DAMAGE = {
    "empty": lambda b, d: b"",
    "4 bytes": lambda b, d: d[:4],
    "only the length": lambda b, d: d[:8],
    "cut in the header": lambda b, d: d[: 8 + _header_len(d) // 2],
    "cut in the data": lambda b, d: d[: len(d) - 100],
    "one byte short": lambda b, d: d[:-1],
    "text": lambda b, d: b"this is not a safetensors file, it is a text file\n" * 4,
    "huge header length": lambda b, d: struct.pack("<Q", 1 << 40) + d[8:],
    "header not JSON": lambda b, d: st_file(b"{not json" + b" " * 7),
    "header not UTF-8": lambda b, d: st_file(b'{"\xff": 1}  '),
    "header a list": lambda b, d: st_file([1, 2, 3]),
    "deeply nested header": lambda b, d: st_file(b"[" * 100_000 + b"]" * 100_000),
    "entry not an object": lambda b, d: st_file({Q: [1, 2]}),
    "dtype not a string": lambda b, d: st_file({Q: {"dtype": 5, "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
    "shape not a list": lambda b, d: st_file({Q: {"dtype": "F32", "shape": "32x48", "data_offsets": [0, 4]}}, b"\0" * 4),
    "negative dim": lambda b, d: st_file({Q: {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4),
    "offsets reversed": lambda b, d: st_file({Q: {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4),
    "size not shape": lambda b, d: st_file({Q: {"dtype": "F32", "shape": [32, 48], "data_offsets": [0, 4]}}, b"\0" * 4),
    "data past the end": lambda b, d: st_file({Q: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 2),
    "overlapping tensors": lambda b, d: st_file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                                 "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12),
    "metadata not strings": lambda b, d: st_file({"__metadata__": {"a": 1}}),
}


@pytest.mark.parametrize("case", list(SHARD_DAMAGE))
def test_damaged_shards_are_apply_errors_naming_the_shard(tmp_path, adapter_sld, case):
    base = tmp_path / "base"
    make_checkpoint(base)
    (base / SHARD1).write_bytes(SHARD_DAMAGE[case](base, _shard1_bytes(base)))
    before = listing(base)
    with pytest.raises(ApplyError) as exc:
        apply_checkpoint(base, adapter_sld, tmp_path / "out")
    assert str(base / SHARD1) in str(exc.value)
    assert not (tmp_path / "out").exists() and no_temps(tmp_path) and listing(base) == before


INDEX_DAMAGE = {
    "not JSON": lambda b: _index(b, "{weight_map: oops"),
    "empty file": lambda b: _index(b, ""),
    "a list": lambda b: _index(b, [1, 2]),
    "no weight_map": lambda b: _index(b, {"metadata": {}}),
    "weight_map a list": lambda b: _index(b, {"weight_map": [SHARD1]}),
    "weight_map a string": lambda b: _index(b, {"weight_map": SHARD1}),
    "weight_map empty": lambda b: _index(b, {"weight_map": {}}),
    "value an int": lambda b: _index(b, {"weight_map": _wmap(b) | {Q: 1}}),
    "value null": lambda b: _index(b, {"weight_map": _wmap(b) | {Q: None}}),
    "value empty": lambda b: _index(b, {"weight_map": _wmap(b) | {Q: ""}}),
    "absolute path": lambda b: _index(b, {"weight_map": _wmap(b) | {Q: str(b / SHARD1)}}),
    "dot-dot": lambda b: _index(b, {"weight_map": _wmap(b) | {Q: "../" + SHARD1}}),
    "dot-dot inside": lambda b: _index(b, {"weight_map": _wmap(b) | {Q: "tokenizer/../../x.safetensors"}}),
    "missing shard": lambda b: os.remove(b / SHARD2),
    "listed shard absent": lambda b: _index(b, {"weight_map": _wmap(b) | {Q: "model-00003.safetensors"}}),
    "listed shard a directory": lambda b: (os.mkdir(b / "d.safetensors"), _index(b, {"weight_map": _wmap(b) | {Q: "d.safetensors"}})),
    "listed shard not safetensors": lambda b: _index(b, {"weight_map": _wmap(b) | {Q: "config.json"}}),
    "not UTF-8": lambda b: (b / INDEX_NAME).write_bytes(b'{"weight_map": {"\xff": 1}}'),
    "deeply nested": lambda b: _index(b, "[" * 100_000 + "]" * 100_000),
}


@pytest.mark.parametrize("case", list(INDEX_DAMAGE))
def test_damaged_indexes_are_apply_errors_naming_the_index(tmp_path, adapter_sld, case):
    base = tmp_path / "base"
    make_checkpoint(base)
    INDEX_DAMAGE[case](base)
    before = listing(base)
    with pytest.raises(ApplyError) as exc:
        apply_checkpoint(base, adapter_sld, tmp_path / "out")
    assert str(base / INDEX_NAME) in str(exc.value)
    assert not (tmp_path / "out").exists() and no_temps(tmp_path) and listing(base) == before


def test_a_damaged_checkpoint_through_the_cli_is_one_line(tmp_path, adapter_sld):
    base = tmp_path / "base"
    make_checkpoint(base)
    (base / SHARD2).write_bytes((base / SHARD2).read_bytes()[:50])
    res = sld_cli("apply", str(base), adapter_sld, "-o", str(tmp_path / "out"))
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("sld: error: ") and str(base / SHARD2) in res.stderr


# ----------------------------------------------------------------------------------------------
# One checkpoint tensor, one entry


def _sld_with(tmp_path, modules=(), extras=()):
    """An .sld with lora modules of the given names (32x48, rank 2) and F32 extras."""
    mods, tens, secs = [], [], []
    rng = np.random.default_rng(0)
    cb = sldtools.f16_codebook([-0.01, -0.002, 0.002, 0.01])
    for name in modules:
        m = sldtools.lora_module(name=name, out_f=32, in_f=48, rank=2)
        m["A"], sa = sldtools.codebook_tensor((2, 48), 2, 2, rng.integers(0, 4, 96), cb, 1.0)
        m["B"], sb = sldtools.codebook_tensor((32, 2), 2, 2, rng.integers(0, 4, 64), cb, 1.0)
        mods.append(m)
        secs += [sa, sb]
    for name, shape in extras:
        t, s = sldtools.raw_tensor(np.ones(shape, np.float32))
        tens.append({"name": name, **t})
        secs.append(s)
    p = tmp_path / "x.sld"
    p.write_bytes(sldtools.assemble(mods, tens, secs))
    return str(p)


@pytest.mark.parametrize("modules,extras", [
    (["layers.0.q_proj", "base_model.model.layers.0.q_proj"], []),
    (["layers.0.q_proj"], [(Q, (32, 48))]),
    (["base_model.model.layers.0.q_proj"], [("base_model.model." + Q, (32, 48))]),
    ([], [(Q, (32, 48)), ("base_model.model." + Q, (32, 48))]),
], ids=["two modules", "module and extra", "prefixed module and extra", "two extras"])
def test_two_entries_resolving_to_one_checkpoint_tensor_are_refused(tmp_path, modules, extras):
    base = tmp_path / "base"
    make_checkpoint(base)
    try:
        path = _sld_with(tmp_path, modules, extras)
        deltacodec.load(path)
    except SldFormatError:
        pytest.skip("the reader itself refuses names that collide after the name mapping")
    with pytest.raises(ApplyError, match="both resolve to the checkpoint tensor") as exc:
        apply_checkpoint(base, path, tmp_path / "out")
    names = modules + [e[0] for e in extras]
    assert all(f"'{n}'" in str(exc.value) for n in names)
    assert not (tmp_path / "out").exists()


def test_a_tensor_in_two_shards_is_refused(tmp_path, adapter_sld):
    base = tmp_path / "base"
    make_checkpoint(base)
    save_file({Q: torch.zeros(32, 48), "norm.weight": torch.ones(48)}, str(base / SHARD2))
    with pytest.raises(ApplyError, match="is in two shards") as exc:
        apply_checkpoint(base, adapter_sld, tmp_path / "out")
    assert str(base / SHARD1) in str(exc.value) and str(base / SHARD2) in str(exc.value)


def test_a_delta_that_overflows_the_weight_dtype_is_refused(tmp_path):
    make_adapter(tmp_path / "a", config={"lora_alpha": 4e7})  # scale 1e7: ΔW of order 1e4
    sld = deltacodec.encode(str(tmp_path / "a"), bits=8, out=str(tmp_path / "a.sld"))
    base = tmp_path / "base"
    make_checkpoint(base, torch.float16)
    save_file({Q: torch.full((32, 48), 60000.0, dtype=torch.float16)}, str(base / SHARD1))
    _index(base, {"weight_map": {Q: SHARD1, DOWN: SHARD2, "norm.weight": SHARD2}})
    with pytest.raises(ApplyError, match="not finite in float16.*nothing was written") as exc:
        apply_checkpoint(base, sld, tmp_path / "out")
    assert Q in str(exc.value) and str(base / SHARD1) in str(exc.value)
    assert not (tmp_path / "out").exists() and no_temps(tmp_path)


# ----------------------------------------------------------------------------------------------
# --force, and never over or into BASE


def test_existing_out_needs_force_and_is_replaced_whole(tmp_path, adapter_sld):
    base = tmp_path / "base"
    make_checkpoint(base)
    (tmp_path / "out").mkdir()
    apply_checkpoint(base, adapter_sld, tmp_path / "out")  # an empty directory is taken
    (tmp_path / "out" / "mine.txt").write_text("x")
    before = listing(tmp_path / "out")
    with pytest.raises(OutputError, match=r"already exists \(use --force"):
        apply_checkpoint(base, adapter_sld, tmp_path / "out")
    assert listing(tmp_path / "out") == before
    apply_checkpoint(base, adapter_sld, tmp_path / "out", force=True)
    assert "mine.txt" not in os.listdir(tmp_path / "out") and set(listing(tmp_path / "out")) == set(listing(base))


@pytest.mark.parametrize("spelling", ["P", "P/", "./P", "P/base/..", "linkP", "linkP/", "{abs}/P", ".",
                                      "P/base", "P/base/", "linkP/base", "P/base/sub", "P/base/tokenizer"])
def test_out_over_into_or_containing_base_is_refused_even_with_force(tmp_path, adapter_sld, monkeypatch, spelling):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "P").mkdir()
    make_checkpoint(tmp_path / "P" / "base")
    os.symlink("P", tmp_path / "linkP")
    shutil.copy(adapter_sld, tmp_path / "a.sld")
    before = listing(tmp_path / "P")
    with pytest.raises(OutputError, match="input") as exc:
        apply_checkpoint("P/base", "a.sld", spelling.format(abs=tmp_path), force=True)
    assert "even with --force" in str(exc.value)
    assert listing(tmp_path / "P") == before and no_temps(tmp_path, tmp_path / "P")


def test_out_containing_the_sld_is_refused(tmp_path, adapter_sld):
    make_checkpoint(tmp_path / "base")
    with pytest.raises(OutputError, match="contains the input"):
        apply_checkpoint(tmp_path / "base", adapter_sld, os.path.dirname(adapter_sld), force=True)


def test_max_decoded_bytes_reaches_the_reader(tmp_path, adapter_sld):
    make_checkpoint(tmp_path / "base")
    with pytest.raises(SldLimitError):
        apply_checkpoint(tmp_path / "base", adapter_sld, tmp_path / "out", max_decoded_bytes=1000)
    res = sld_cli("apply", str(tmp_path / "base"), adapter_sld, "-o", str(tmp_path / "out"), "--max-decoded-bytes", "1kB")
    assert res.returncode == 1 and "limit" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()
    res = sld_cli("apply", str(tmp_path / "base"), adapter_sld, "-o", str(tmp_path / "out2"), "--max-decoded-bytes", "lots")
    assert res.returncode == 2


# ----------------------------------------------------------------------------------------------
# Fuzz: damaged checkpoints give only library errors naming the damaged file (or BASE)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, adapter_sld):
    d = tmp_path_factory.mktemp("pristine")
    make_checkpoint(d / "base")
    return d / "base"


def _damage(data: bytes, op: str, pos: int, junk: bytes) -> bytes:
    if not data:
        return junk
    i = pos % (len(data) + 1)
    if op == "truncate":
        return data[:i]
    if op == "flip":
        b = bytearray(data)
        for k, x in enumerate(junk):
            b[(i + k) % len(b)] ^= x or 1
        return bytes(b)
    if op == "insert":
        return data[:i] + junk + data[i:]
    if op == "overwrite":
        return data[:i] + junk + data[i + len(junk):]
    return b""


def _fuzz_one(tmp_path_factory, pristine, adapter_sld, target, op, pos, junk):
    work = tmp_path_factory.mktemp("fz")
    base = work / "base"
    shutil.copytree(pristine, base)
    victim = base / target
    victim.write_bytes(_damage(victim.read_bytes(), op, pos, junk))
    before = listing(base)
    try:
        apply_checkpoint(base, adapter_sld, work / "out")
    except SldError as exc:
        msg = str(exc)
        assert isinstance(exc, ApplyError), msg
        assert str(victim) in msg or f"does not fit the checkpoint {base}" in msg, msg
        assert not (work / "out").exists()
    else:
        assert set(listing(work / "out")) == set(before)
    assert listing(base) == before and no_temps(work)
    shutil.rmtree(work)


_FUZZ_ARGS = dict(
    target=st.sampled_from([SHARD1, SHARD2, INDEX_NAME]),
    op=st.sampled_from(["truncate", "flip", "insert", "overwrite", "empty"]),
    pos=st.integers(0, 1 << 20),
    junk=st.binary(min_size=1, max_size=12),
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(**_FUZZ_ARGS)
def test_fuzzed_checkpoints_raise_only_apply_errors_naming_the_file(tmp_path_factory, pristine, adapter_sld, target, op, pos, junk):
    _fuzz_one(tmp_path_factory, pristine, adapter_sld, target, op, pos, junk)


@pytest.mark.exhaustive
@settings(max_examples=20_000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(**_FUZZ_ARGS)
def test_fuzzed_checkpoints_long_run(tmp_path_factory, pristine, adapter_sld, target, op, pos, junk):
    _fuzz_one(tmp_path_factory, pristine, adapter_sld, target, op, pos, junk)


# ----------------------------------------------------------------------------------------------
# End to end on a tiny Llama (moved here from test_apply.py), against deltacodec.apply in memory

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def tiny_llama(layers: int = 2, seed: int = 0):
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def sine_adapter_dir(tmp_path, omega=150.0):
    model = tiny_llama()
    g = torch.Generator().manual_seed(3)
    state = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.split(".")[-1] in ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj"):
            state[f"base_model.model.{name}.lora_A.weight"] = torch.randn(8, mod.in_features, generator=g) / mod.in_features ** 0.5
            state[f"base_model.model.{name}.lora_B.weight"] = torch.randn(mod.out_features, 8, generator=g) * 0.05
    d = tmp_path / "sine"
    d.mkdir()
    torch.save(state, d / "adapter_model.bin")
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "SINLORA", "r": 8, "lora_alpha": 16, "freq": omega}))
    return d


def test_sld_apply_patches_a_sharded_checkpoint(tmp_path):
    sld = deltacodec.encode(str(sine_adapter_dir(tmp_path)), bits=3, out=str(tmp_path / "s.sld"))
    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(str(base_dir), safe_serialization=True, max_shard_size="100KB")
    shards = sorted(p for p in os.listdir(base_dir) if p.endswith(".safetensors"))
    assert len(shards) > 1 and (base_dir / INDEX_NAME).exists()
    res = sld_cli("apply", str(base_dir), sld, "-o", str(tmp_path / "out"), "-q")
    assert res.returncode == 0, res.stderr
    assert sorted(os.listdir(tmp_path / "out")) == sorted(os.listdir(base_dir))
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(tmp_path / "out").st_mode & 0o777 == 0o777 & ~umask  # not a private temp dir's 0700
    from_disk = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "out"))
    in_memory = tiny_llama()
    deltacodec.apply(in_memory, sld)
    for (k, v), (k2, v2) in zip(sorted(from_disk.state_dict().items()), sorted(in_memory.state_dict().items())):
        assert k == k2 and torch.equal(v, v2), k
    res = sld_cli("apply", str(base_dir), sld, "-o", str(base_dir))
    assert res.returncode == 1 and "refusing" in res.stderr
    other = tmp_path / "other"
    tiny_llama(layers=1).save_pretrained(str(other), safe_serialization=True)
    res = sld_cli("apply", str(other), sld, "-o", str(tmp_path / "out2"))
    assert res.returncode == 1 and "nothing was written" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out2").exists() and no_temps(tmp_path)


def test_sld_apply_replaces_modules_to_save_and_refuses_dora(tmp_path):
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                           modules_to_save=["lm_head"], init_lora_weights=False))
    with torch.no_grad():
        pm.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    pm.save_pretrained(str(tmp_path / "a"))
    sld = deltacodec.encode(str(tmp_path / "a"), bits=8, out=str(tmp_path / "a.sld"))
    base = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_llama().state_dict().items()}, str(base))
    res = sld_cli("apply", "-q", str(base), sld, "-o", str(tmp_path / "out.safetensors"))
    assert res.returncode == 0, res.stderr
    in_memory = tiny_llama()
    deltacodec.apply(in_memory, sld)
    out = load_file(str(tmp_path / "out.safetensors"))
    assert all(torch.equal(out[k], v) for k, v in in_memory.state_dict().items())
    assert torch.equal(out["lm_head.weight"], pm.base_model.model.lm_head.modules_to_save["default"].weight)

    dora = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    dora.save_pretrained(str(tmp_path / "d"))
    dsld = deltacodec.encode(str(tmp_path / "d"), bits=8, out=str(tmp_path / "d.sld"))
    res = sld_cli("apply", "-q", str(base), dsld, "-o", str(tmp_path / "out2.safetensors"))
    assert res.returncode == 1 and "DoRA magnitude vector" in res.stderr and "nothing was written" in res.stderr
    assert not (tmp_path / "out2.safetensors").exists()
