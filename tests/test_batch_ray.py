"""``deltacodec.batch`` on a local Ray cluster (slow: a cluster takes seconds to start).

The same contract as the local pool (tests/test_batch.py): every output byte-identical to the
single-file CLI on the same input, every bad input recorded with the library's error, a rerun
that skips what is done; and ``sld batch ... --ray`` from the command line.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow
pytest.importorskip("ray", reason="the Ray engine needs the ray package (pip install 'deltacodec[ray]')")

from cli_helpers import run_captured  # noqa: E402
from deltacodec import batch  # noqa: E402
from deltacodec.batch.engines import make_engine  # noqa: E402
from test_batch import _peft_dir, dir_bytes, encode_reference, read_manifest, results, sld_batch, stat_key  # noqa: E402


@pytest.fixture(scope="module")
def ray_engine():
    with make_engine("ray", workers=2) as eng:
        yield eng


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    src = root / "src"
    rels = []
    for i in range(24):
        _peft_dir(src / f"group{i % 3}" / f"a{i:02d}", i, fmt="bin" if i == 5 else "safetensors")
        rels.append(f"group{i % 3}/a{i:02d}")
    (src / "bad" / "no-weights").mkdir(parents=True)
    (src / "bad" / "no-weights" / "adapter_config.json").write_text("{}")
    (src / "bad" / "cut.safetensors").write_bytes(b"\x08\x00")
    refs = {rel: encode_reference(str(src / rel), root / "ref" / f"{rel}.sld") for rel in rels}
    refs["bad/no-weights"] = encode_reference(str(src / "bad" / "no-weights"), root / "ref" / "nw.sld")
    refs["bad/cut.safetensors"] = encode_reference(str(src / "bad" / "cut.safetensors"), root / "ref" / "cut.sld")
    return {"root": root, "src": src, "rels": rels, "refs": refs}


def test_ray_encode_matches_sld_encode_and_reruns_skip(tree, ray_engine):
    dst = tree["root"] / "dst"
    s = batch.encode(tree["src"], dst, engine=ray_engine)
    assert (s.succeeded, s.failed, s.skipped, s.engine, s.workers) == (24, 2, 0, "ray", 2)
    latest = {r["source"]: r for r in results(read_manifest(dst / "sld-batch-encode.jsonl"))}
    for rel, (data, error) in tree["refs"].items():
        if data is None:
            assert latest[rel]["status"] == "failed" and latest[rel]["error"] == error
        else:
            assert (dst / f"{rel}.sld").read_bytes() == data, rel
    keys = {rel: stat_key(dst / f"{rel}.sld") for rel in tree["rels"]}
    s = batch.encode(tree["src"], dst, engine=ray_engine)
    assert (s.succeeded, s.failed, s.skipped) == (0, 2, 24)
    assert {rel: stat_key(dst / f"{rel}.sld") for rel in tree["rels"]} == keys


def test_ray_decode_and_verify_match_the_cli(tree, ray_engine, tmp_path):
    enc = tree["root"] / "enc"
    batch.encode(tree["src"], enc, engine=ray_engine)
    s = batch.decode(enc, tmp_path / "dec", engine=ray_engine, dtype="bf16")
    assert (s.succeeded, s.failed) == (24, 0)
    rel = tree["rels"][7]
    rc, _, err = run_captured("decode", str(enc / f"{rel}.sld"), "-o", str(tmp_path / "ref"), "--dtype", "bf16", "-q")
    assert rc == 0, err
    assert dir_bytes(tmp_path / "dec" / rel) == dir_bytes(tmp_path / "ref")
    victim = enc / f"{tree['rels'][3]}.sld"
    data = bytearray(victim.read_bytes())
    data[-2] ^= 0x55
    victim.write_bytes(bytes(data))
    s = batch.verify(enc, engine=ray_engine)
    assert (s.succeeded, s.failed) == (23, 1)
    rc, _, err = run_captured("verify", str(victim))
    assert rc == 1 and s.failures[0]["error"] == err.strip()[len("sld: error: "):]


def test_cli_ray_flag_runs_on_a_local_cluster(tree):
    res = sld_batch("encode", tree["src"], tree["root"] / "cli", "--ray", "--workers", "2", "--json")
    summary = json.loads(res.stdout)
    assert res.returncode == 1 and (summary["engine"], summary["succeeded"], summary["failed"]) == ("ray", 24, 2)
    rel = tree["rels"][0]
    assert (tree["root"] / "cli" / f"{rel}.sld").read_bytes() == tree["refs"][rel][0]
    assert np.all([Path(tree["root"] / "cli" / f"{r}.sld").exists() for r in tree["rels"]])
