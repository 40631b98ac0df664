"""``sld batch encode|decode|verify`` and ``deltacodec.batch`` on the local process pool.

The main tree holds a couple of hundred tiny adapters in every layout the listing knows (PEFT
directories with safetensors or .bin, sine and plain LoRA, standalone .safetensors with the
config in their metadata or beside them, a diffusers-named directory, nested directories), a
broken adapter of each kind, and things that are not adapters (hidden directories, text
files). The reference for every item is a single-file ``sld encode`` (``decode``, ``verify``)
of the same input, run through the CLI in this process: the batch must give the same bytes for
every item that succeeds and the same one-line error for every item that fails.

Kill tests stop the driver with a test-only hook (``DELTACODEC_BATCH_TEST_PAUSE_AFTER``: after N
results are recorded, the driver stops and waits to be killed) and SIGKILL it: no race, no
sleep. The rerun must finish every item exactly once: nothing recorded before the kill is
redone (same manifest lines, same inode and mtime), nothing is left partial.
"""

from __future__ import annotations

import hashlib
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from adapter_dirs import save_tensors
from cli_helpers import REPO, assert_one_line_error, assert_usage_error, raw_tensor, lora_module, run_captured, write_sld
import deltacodec
from deltacodec import batch
from deltacodec.batch.driver import PAUSE_ENV, PAUSE_MARK, output_rel
from deltacodec.batch.engines.local import LocalPool
from deltacodec.batch.listing import open_source
from deltacodec.errors import DecodeError, DeltacodecWarning, EncodeError, OutputError, SldError
from deltacodec.outputs import TEMP_PREFIX, _host_tag

PY = sys.executable
GOOD_DIRS = 150  # PEFT directories (plain and sine, safetensors and .bin)
GOOD_FILES = 40  # standalone .safetensors
MODS = (("model.layers.0.self_attn.q_proj", 8, 12), ("model.layers.0.mlp.down_proj", 12, 8))


# ----------------------------------------------------------------------------------------------
# A tree of tiny adapters, written plainly


def _factors(seed: int, rank: int = 2, prefix: str = "base_model.model.") -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for mod, o, i in MODS:
        out[f"{prefix}{mod}.lora_A.weight"] = rng.uniform(-0.3, 0.3, (rank, i)).astype(np.float32)
        out[f"{prefix}{mod}.lora_B.weight"] = (rng.standard_normal((o, rank)) * 0.05).astype(np.float32)
    return out


def _config(seed: int, rank: int = 2) -> dict[str, Any]:
    cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "base_model_name_or_path": "tiny",
           "target_modules": ["q_proj", "down_proj"]}
    if seed % 3 == 0:
        cfg.update(use_sinelora=True, sinelora_frequency=float(20 + seed % 50))
    return cfg


def _peft_dir(path: Path, seed: int, *, fmt: str = "safetensors", weights: str | None = None) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(_config(seed)))
    name = weights or f"adapter_model.{fmt}"
    if name.endswith(".safetensors"):
        save_file(_factors(seed), str(path / name))
    else:
        save_tensors(str(path / name), _factors(seed))


def build_tree(root: Path) -> dict[str, str]:
    """The tree; returns rel -> path of every item the listing must find (good and broken)."""
    items: dict[str, str] = {}

    def add(rel: str) -> None:
        items[rel] = str(root / rel)

    for i in range(GOOD_DIRS):
        rel = f"team{i % 4}/user{i % 7}/adapter{i:03d}"
        _peft_dir(root / rel, i, fmt="bin" if i % 25 == 7 else "safetensors")
        add(rel)
    loose = root / "loose"
    loose.mkdir()
    for i in range(GOOD_FILES // 2):  # config in the safetensors metadata
        save_file(_factors(1000 + i), str(loose / f"lora{i:02d}.safetensors"),
                  metadata={"adapter_config": json.dumps(_config(1000 + i))})
        add(f"loose/lora{i:02d}.safetensors")
    shared = root / "shared-config"  # one adapter_config.json beside several standalone files
    shared.mkdir()
    (shared / "adapter_config.json").write_text(json.dumps(_config(1)))
    for i in range(GOOD_FILES - GOOD_FILES // 2):
        save_file(_factors(2000 + i), str(shared / f"variant{i:02d}.safetensors"))
        add(f"shared-config/variant{i:02d}.safetensors")
    # The diffusers name: read_adapter decides (today it refuses it; with diffusers layouts it reads it).
    _peft_dir(root / "diffusers" / "pipe-lora", 7, weights="pytorch_lora_weights.safetensors")
    add("diffusers/pipe-lora")

    broken = root / "broken"
    broken.mkdir()
    (broken / "truncated.safetensors").write_bytes(b"\x10\x00\x00")
    add("broken/truncated.safetensors")
    (broken / "no-weights").mkdir()
    (broken / "no-weights" / "adapter_config.json").write_text(json.dumps(_config(2)))
    add("broken/no-weights")
    _peft_dir(broken / "bad-json", 4)
    (broken / "bad-json" / "adapter_config.json").write_text('{"r": 2,')
    add("broken/bad-json")
    _peft_dir(broken / "nan", 5)
    t = _factors(5)
    next(iter(t.values()))[0, 0] = np.nan
    save_file(t, str(broken / "nan" / "adapter_model.safetensors"))
    add("broken/nan")
    _peft_dir(broken / "rank-mismatch", 8)
    (broken / "rank-mismatch" / "adapter_config.json").write_text(json.dumps({**_config(8), "r": 4}))
    add("broken/rank-mismatch")
    (broken / "model").mkdir()  # a model shard, not an adapter
    save_file({"model.embed_tokens.weight": np.ones((4, 4), np.float32)}, str(broken / "model" / "shard.safetensors"))
    add("broken/model/shard.safetensors")
    (broken / "not-torch").mkdir()
    (broken / "not-torch" / "adapter_config.json").write_text(json.dumps(_config(10)))
    (broken / "not-torch" / "adapter_model.bin").write_bytes(b"not a torch file")
    add("broken/not-torch")

    # Not adapters: skipped without a record.
    _peft_dir(root / ".cache" / "hidden-adapter", 3)
    (root / "README.md").write_text("adapters\n")
    (root / "team0" / "notes.txt").write_text("x\n")
    return items


BROKEN = 7  # items under broken/ (the diffusers one is counted with whatever sld encode does)


def encode_reference(path: str, out: Path) -> tuple[bytes | None, str | None]:
    """``sld encode PATH -o OUT``: (the file's bytes, None) or (None, the error message)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc, _, err = run_captured("encode", path, "-o", str(out), "-q")
    if rc == 0:
        return out.read_bytes(), None
    line = [ln for ln in err.splitlines() if ln.startswith("sld: error: ")]
    assert rc == 1 and len(line) == 1, err
    return None, line[0][len("sld: error: "):]


def dir_bytes(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------
# Running sld batch as a process, and killing it


def sld_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env.pop(PAUSE_ENV, None)
    env.update(extra)
    return env


def sld_batch(*args: str, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "deltacodec.cli", "batch", *map(str, args)], capture_output=True, text=True,
                          env=sld_env(**extra), cwd=str(REPO), timeout=600)


def run_and_kill(*args: str, after: int) -> None:
    """Start ``sld batch ARGS``, let it record ``after`` results, SIGKILL the driver, and wait
    until every process it started (fork server, workers) is gone."""
    proc = subprocess.Popen([PY, "-m", "deltacodec.cli", "batch", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=sld_env(**{PAUSE_ENV: str(after)}), cwd=str(REPO),
                            start_new_session=True)
    seen = b""
    try:
        sel = selectors.DefaultSelector()
        sel.register(proc.stderr, selectors.EVENT_READ)
        deadline = time.monotonic() + 600
        while PAUSE_MARK.encode() not in seen:
            assert time.monotonic() < deadline and proc.poll() is None, f"no pause mark: {seen.decode()[-2000:]}"
            if sel.select(timeout=1.0):
                chunk = os.read(proc.stderr.fileno(), 65536)
                if not chunk:
                    break
                seen += chunk
        assert PAUSE_MARK.encode() in seen, seen.decode()[-2000:]
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # the driver only: its workers must follow it by themselves
        proc.wait()
        proc.stderr.close()
    wait_group_gone(proc.pid)


def wait_group_gone(pgid: int) -> None:
    """Wait (up to two minutes) until no process of group ``pgid`` is left: the workers, the
    fork server and the resource tracker follow a dead driver by themselves."""
    deadline = time.monotonic() + 120
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        assert time.monotonic() < deadline, "processes of the batch are still running after its driver ended"
        time.sleep(0.05)


def read_manifest(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def results(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in recs if r["status"] != "started"]


def stat_key(p: Path) -> tuple[int, int]:
    st = p.stat()
    return st.st_ino, st.st_mtime_ns


def outputs_in(dst: Path) -> set[str]:
    """Output paths (files and decoded directories' files) under DST, '/'-separated."""
    return {str(p.relative_to(dst)) for p in dst.rglob("*") if p.is_file() and not p.name.startswith((".", "sld-batch-"))}


# ----------------------------------------------------------------------------------------------
# Fixtures: the tree with its references, one encode killed and resumed


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("batch")
    src = root / "src"
    items = build_tree(src)
    refdir = root / "ref"
    refs = {}
    for rel, path in items.items():
        refs[rel] = encode_reference(path, refdir / output_rel("encode", _item(rel, path)))
    return {"root": root, "src": src, "items": items, "refs": refs}


def _item(rel: str, path: str):
    from deltacodec.batch.listing import Item

    return Item(rel, path)


@pytest.fixture(scope="module")
def encoded(tree) -> dict[str, Any]:
    """``sld batch encode`` killed after 60 results, the state then, and the rerun."""
    dst = tree["root"] / "dst"
    run_and_kill("encode", tree["src"], dst, "--workers", "2", after=60)
    man = dst / "sld-batch-encode.jsonl"
    first = read_manifest(man)
    after_kill = {rel: stat_key(dst / rel) for rel in outputs_in(dst)}
    bytes_after_kill = {rel: (dst / rel).read_bytes() for rel in after_kill}
    second = sld_batch("encode", tree["src"], dst, "--workers", "2", "--json")
    return {"dst": dst, "manifest": man, "first": first, "after_kill": after_kill, "bytes_after_kill": bytes_after_kill,
            "second": second, "summary": json.loads(second.stdout), "all": read_manifest(man)}


@pytest.fixture(scope="module")
def pool():
    """One local pool for the in-process runs of this module (workers start once)."""
    with LocalPool(2, preload=("torch",)) as p:
        yield p


# ----------------------------------------------------------------------------------------------
# Listing


def test_listing_finds_every_adapter_by_layout_and_nothing_else(tree):
    found = [it for it in open_source(str(tree["src"]), "adapters").items()]
    assert all(it.problem is None for it in found)
    assert sorted(it.rel for it in found) == sorted(tree["items"])
    assert {it.path for it in found} == set(tree["items"].values())
    # The progress bar's total (counted only on a terminal) is the same listing.
    from deltacodec.batch.driver import count_items

    assert count_items("encode", str(tree["src"])) == len(tree["items"])


def test_listing_streams_without_reading_a_directory_whole(tmp_path, monkeypatch):
    # A wide directory: the walk yields its first adapter after reading one entry of it, not the
    # whole listing (a directory of a million adapters is never held as a list).
    for i in range(50):
        _peft_dir(tmp_path / f"a{i:02d}", i)
    pulled: list[str] = []
    real = os.scandir

    class Counting:
        def __init__(self, path):
            self._it = real(path)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._it.close()

        def __iter__(self):
            return self

        def __next__(self):
            e = next(self._it)
            pulled.append(e.name)
            return e

    monkeypatch.setattr(os, "scandir", Counting)
    it = open_source(str(tmp_path), "adapters").items()
    first = next(it)
    assert len(pulled) == 1 and first.rel == pulled[0]
    assert len(list(it)) == 49 and len(pulled) == 50


# ----------------------------------------------------------------------------------------------
# encode: killed, resumed, compared with sld encode


def test_killed_encode_leaves_only_whole_outputs(tree, encoded):
    done = {r["output"] for r in results(encoded["first"]) if r["status"] == "ok"}
    assert len(results(encoded["first"])) >= 60 and done
    # Every file under a final name is whole: the bytes of sld encode for its adapter (the items
    # recorded before the kill, and any in flight that a worker had renamed into place), and
    # there is no other file.
    by_out = {output_rel("encode", _item(rel, p)): rel for rel, p in tree["items"].items()}
    assert done <= set(encoded["bytes_after_kill"]) <= set(by_out)
    for rel_out, data in encoded["bytes_after_kill"].items():
        assert data == tree["refs"][by_out[rel_out]][0], rel_out


def test_resumed_encode_does_each_item_once_and_matches_sld_encode(tree, encoded):
    dst, summary = encoded["dst"], encoded["summary"]
    ok_first = {r["source"] for r in results(encoded["first"]) if r["status"] == "ok"}
    good = {rel for rel, (data, _) in tree["refs"].items() if data is not None}
    failed = {rel for rel, (data, _) in tree["refs"].items() if data is None}
    assert len(good) >= GOOD_DIRS + GOOD_FILES and len(failed) >= BROKEN
    # Counts: the items recorded before the kill are skipped, the rest done now.
    assert summary["skipped"] == len(ok_first)
    assert summary["succeeded"] == len(good - ok_first)
    assert summary["failed"] == len(failed)
    assert summary["total"] == len(tree["items"])
    # Each good item has exactly one ok record over both runs: nothing was done twice.
    oks: dict[str, int] = {}
    for r in results(encoded["all"]):
        if r["status"] == "ok":
            oks[r["source"]] = oks.get(r["source"], 0) + 1
    assert oks == {rel: 1 for rel in good}
    # Outputs finished before the kill were not rewritten: same inode, same mtime.
    for r in results(encoded["first"]):
        if r["status"] == "ok":
            assert stat_key(dst / r["output"]) == encoded["after_kill"][r["output"]]
    # Every output: the bytes of a single-file sld encode, and its recorded checksum and size.
    latest = {r["source"]: r for r in results(encoded["all"])}
    for rel in good:
        rec = latest[rel]
        data = (dst / rec["output"]).read_bytes()
        assert data == tree["refs"][rel][0], rel
        assert rec["output_sha256"] == hashlib.sha256(data).hexdigest() and rec["bytes"] == len(data)
    assert outputs_in(dst) == {latest[rel]["output"] for rel in good}
    # The temporaries of the items in flight at the kill (if any) are gone after the rerun.
    assert not list(dst.rglob(f"{TEMP_PREFIX}*"))


def test_broken_adapters_are_recorded_with_the_library_error_and_the_batch_goes_on(tree, encoded):
    second = encoded["second"]
    assert_one_line_error(second.returncode, second.stderr.replace(_warning_lines(second.stderr), ""),
                          f"{encoded['summary']['failed']} of {len(tree['items'])} items failed", "sld-batch-encode.jsonl")
    latest = {r["source"]: r for r in results(encoded["all"])}
    for rel, (data, error) in tree["refs"].items():
        if data is None:
            assert latest[rel]["status"] == "failed"
            assert latest[rel]["error"] == error, rel
            assert not (encoded["dst"] / output_rel("encode", _item(rel, tree["items"][rel]))).exists()
    listed = {f["source"]: f["error"] for f in encoded["summary"]["failures"]}
    assert listed == {rel: e for rel, (d, e) in tree["refs"].items() if d is None}


def _warning_lines(stderr: str) -> str:
    return "".join(line + "\n" for line in stderr.splitlines() if line.startswith("sld: warning: "))


def test_rerun_with_nothing_changed_does_nothing(tree, encoded, pool):
    dst = encoded["dst"]
    before = {rel: stat_key(dst / rel) for rel in outputs_in(dst)}
    n_lines = len(encoded["manifest"].read_text().splitlines())
    s = batch.encode(tree["src"], dst, engine=pool)
    failed = sum(1 for d, _ in tree["refs"].values() if d is None)
    assert (s.succeeded, s.failed, s.skipped) == (0, failed, len(tree["items"]) - failed)
    assert {rel: stat_key(dst / rel) for rel in outputs_in(dst)} == before
    new = read_manifest(encoded["manifest"])[n_lines:]
    assert {r["source"] for r in new} == {rel for rel, (d, _) in tree["refs"].items() if d is None}
    assert all(r["status"] == "failed" for r in new)


# ----------------------------------------------------------------------------------------------
# Reruns on a small tree: touched, changed, options changed, force


@pytest.fixture
def small(tmp_path) -> dict[str, Any]:
    src = tmp_path / "src"
    for i in range(6):
        _peft_dir(src / f"d{i}", i)
    return {"src": src, "dst": tmp_path / "dst", "rels": [f"d{i}" for i in range(6)]}


def test_rerun_skips_touched_redoes_changed_and_force_redoes_all(small, pool, tmp_path):
    src, dst = small["src"], small["dst"]
    s = batch.encode(src, dst, engine=pool)
    assert (s.succeeded, s.failed, s.skipped) == (6, 0, 0)
    keys = {rel: stat_key(dst / f"{rel}.sld") for rel in small["rels"]}
    # Touched (same bytes, new mtime): the checksum says unchanged; nothing rewritten.
    os.utime(src / "d0" / "adapter_config.json", ns=(1, 10**18))
    # Changed bytes: redone.
    save_file(_factors(99), str(src / "d1" / "adapter_model.safetensors"))
    # Output deleted by hand: redone.
    (dst / "d2.sld").unlink()
    s = batch.encode(src, dst, engine=pool)
    assert (s.succeeded, s.failed, s.skipped) == (2, 0, 4)
    recs = results(read_manifest(dst / "sld-batch-encode.jsonl"))[6:]
    assert sorted((r["source"], r["status"]) for r in recs) == [("d0", "unchanged"), ("d1", "ok"), ("d2", "ok")]
    assert stat_key(dst / "d0.sld") == keys["d0"] and stat_key(dst / "d1.sld") != keys["d1"]
    assert (dst / "d1.sld").read_bytes() == encode_reference(str(src / "d1"), tmp_path / "r1.sld")[0]
    # A touched item recorded as unchanged is skipped on the stat fingerprint next time.
    s = batch.encode(src, dst, engine=pool)
    assert (s.succeeded, s.skipped) == (0, 6)
    # Other options: every item redone (their output differs).
    s = batch.encode(src, dst, engine=pool, bits=2)
    assert (s.succeeded, s.skipped) == (6, 0)
    assert (dst / "d3.sld").read_bytes() == run_ref(src / "d3", tmp_path / "r3.sld", "--bits", "2")
    # Back to the first options: redone again (the options of the last result count).
    s = batch.encode(src, dst, engine=pool, bits=3)
    assert (s.succeeded, s.skipped) == (6, 0)
    # --force: every item redone and replaced, the same bytes.
    before = {rel: (dst / f"{rel}.sld").read_bytes() for rel in small["rels"]}
    inodes = {rel: stat_key(dst / f"{rel}.sld") for rel in small["rels"]}
    s = batch.encode(src, dst, engine=pool, force=True)
    assert (s.succeeded, s.skipped) == (6, 0)
    assert {rel: (dst / f"{rel}.sld").read_bytes() for rel in small["rels"]} == before
    assert all(stat_key(dst / f"{rel}.sld") != inodes[rel] for rel in small["rels"])


def run_ref(src: Path, out: Path, *opts: str) -> bytes:
    rc, _, err = run_captured("encode", str(src), "-o", str(out), "-q", *opts)
    assert rc == 0, err
    return out.read_bytes()


def test_existing_output_not_written_by_the_batch_is_kept_without_force(small, pool):
    src, dst = small["src"], small["dst"]
    dst.mkdir()
    (dst / "d0.sld").write_bytes(b"mine")
    s = batch.encode(src, dst, engine=pool)
    assert (s.succeeded, s.failed) == (5, 1)
    assert "d0.sld: already exists" in s.failures[0]["error"] and s.failures[0]["source"] == "d0"
    assert (dst / "d0.sld").read_bytes() == b"mine"
    s = batch.encode(src, dst, engine=pool, force=True)
    assert (s.succeeded, s.failed) == (6, 0) and (dst / "d0.sld").read_bytes() != b"mine"


def test_two_inputs_with_the_same_output_one_is_refused_and_reruns_are_stable(tmp_path, pool):
    src, dst = tmp_path / "src", tmp_path / "dst"
    _peft_dir(src / "a", 1)
    save_file(_factors(2), str(src / "a.safetensors"), metadata={"adapter_config": json.dumps(_config(2))})
    s = batch.encode(src, dst, engine=pool)
    assert (s.succeeded, s.failed) == (1, 1)
    assert "already claimed its output a.sld" in s.failures[0]["error"]
    winner = {r["source"] for r in results(read_manifest(dst / "sld-batch-encode.jsonl")) if r["status"] == "ok"}
    key = stat_key(dst / "a.sld")
    s = batch.encode(src, dst, engine=pool)
    assert (s.succeeded, s.failed, s.skipped) == (0, 1, 1) and stat_key(dst / "a.sld") == key
    assert winner and all(r["status"] == "failed" for r in results(read_manifest(dst / "sld-batch-encode.jsonl"))[2:])


def test_leftover_temporaries_of_a_killed_run_are_removed(small, pool):
    src, dst = small["src"], small["dst"]
    batch.encode(src, dst, engine=pool)
    p = subprocess.Popen([PY, "-c", "pass"])
    p.wait()
    stale = dst / f"{TEMP_PREFIX}{p.pid}-{_host_tag()}-0123abcd"
    stale.write_bytes(b"half an .sld")
    (src / "d4" / "adapter_config.json").write_text(json.dumps(_config(40)))  # changed: redone
    with pytest.warns(DeltacodecWarning, match="leftover"):
        batch.encode(src, dst, engine=pool)
    assert not stale.exists()


# ----------------------------------------------------------------------------------------------
# Sources: glob and listing file


def test_glob_source_mirrors_paths_below_its_fixed_prefix(tree, pool, tmp_path):
    pattern = str(tree["src"] / "team1" / "**" / "adapter*")
    s = batch.encode(pattern, tmp_path / "g", engine=pool)
    want = sorted(rel[len("team1/"):] for rel in tree["items"] if rel.startswith("team1/"))
    assert s.succeeded == len(want) and s.failed == 0
    got = sorted(str(p.relative_to(tmp_path / "g"))[:-4] for p in (tmp_path / "g").rglob("*.sld"))
    assert got == want
    for rel in want[:5]:
        assert (tmp_path / "g" / f"{rel}.sld").read_bytes() == tree["refs"][f"team1/{rel}"][0]


def test_listing_file_source_and_its_bad_entries(tree, pool, tmp_path):
    lst = tree["src"] / "todo.txt"
    lst.write_text("# adapters to re-encode\nteam0/user0/adapter000\n\nloose/lora01.safetensors\n"
                   "missing/adapter\n/elsewhere/x.safetensors\nteam0/user0/adapter000\n")
    try:
        s = batch.encode(str(lst), tmp_path / "l", engine=pool)
    finally:
        lst.unlink()
    assert (s.succeeded, s.failed) == (2, 3)
    errors = sorted(f["error"] for f in s.failures)
    assert any("missing/adapter: no such file or directory" in e for e in errors)
    assert any("lies outside" in e and "--root" in e for e in errors)
    assert any("already claimed" in e for e in errors)
    assert (tmp_path / "l" / "team0" / "user0" / "adapter000.sld").read_bytes() == tree["refs"]["team0/user0/adapter000"][0]
    assert (tmp_path / "l" / "loose" / "lora01.sld").read_bytes() == tree["refs"]["loose/lora01.safetensors"][0]


def test_root_mirrors_listed_paths_from_another_directory(tree, pool, tmp_path):
    lst = tmp_path / "todo.txt"
    lst.write_text(f"{tree['src'] / 'team2' / 'user2' / 'adapter002'}\n{tree['src'] / 'loose' / 'lora05.safetensors'}\n")
    s = batch.encode(str(lst), tmp_path / "r", engine=pool, root=str(tree["src"]))
    assert (s.succeeded, s.failed) == (2, 0)
    assert (tmp_path / "r" / "team2" / "user2" / "adapter002.sld").read_bytes() == tree["refs"]["team2/user2/adapter002"][0]
    assert (tmp_path / "r" / "loose" / "lora05.sld").exists()
    with pytest.raises(SldError, match="--root applies to a glob or a listing"):
        batch.encode(tree["src"], tmp_path / "r2", root=str(tree["src"]))


def test_progress_counts_every_item_once(small, pool):
    seen = []
    batch.run("encode", small["src"], small["dst"], engine=pool, progress=lambda i, n, name: seen.append((i, n)), total=6)
    assert seen[-1] == (6, 6) and [i for i, _ in seen] == list(range(1, 7))
    seen.clear()
    batch.run("encode", small["src"], small["dst"], engine=pool, progress=lambda i, n, name: seen.append((i, n)), total=6)
    assert [i for i, _ in seen] == list(range(1, 7))  # skipped items count too


def test_ctrl_c_stops_the_batch_with_status_130_and_leaves_no_worker(small):
    proc = subprocess.Popen([PY, "-m", "deltacodec.cli", "batch", "encode", str(small["src"]), str(small["dst"]),
                             "--workers", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=sld_env(**{PAUSE_ENV: "2"}), cwd=str(REPO), start_new_session=True)
    err = b""
    while PAUSE_MARK.encode() not in err:
        line = proc.stderr.readline()
        assert line, err.decode()
        err += line
    os.kill(proc.pid, signal.SIGINT)
    out, rest = proc.communicate(timeout=300)
    assert proc.returncode == 130 and rest.decode().splitlines() == ["sld: interrupted"], rest
    wait_group_gone(proc.pid)
    recs = results(read_manifest(small["dst"] / "sld-batch-encode.jsonl"))
    assert len(recs) >= 2
    s = batch.encode(small["src"], small["dst"], workers=1)
    assert s.skipped == len([r for r in recs if r["status"] == "ok"]) and s.succeeded + s.skipped == 6


# ----------------------------------------------------------------------------------------------
# decode: killed, resumed, compared with sld decode


@pytest.fixture(scope="module")
def decoded(tree, encoded) -> dict[str, Any]:
    src = encoded["dst"]
    dst = tree["root"] / "decoded"
    run_and_kill("decode", src, dst, "--workers", "2", "--dtype", "fp16", after=40)
    first = read_manifest(dst / "sld-batch-decode.jsonl")
    after_kill = {rel: stat_key(dst / rel) for rel in outputs_in(dst)}
    second = sld_batch("decode", src, dst, "--workers", "2", "--dtype", "fp16", "--json")
    return {"src": src, "dst": dst, "first": first, "after_kill": after_kill, "second": second,
            "all": read_manifest(dst / "sld-batch-decode.jsonl")}


def test_resumed_decode_does_each_file_once_and_matches_sld_decode(tree, decoded, tmp_path):
    second = decoded["second"]
    assert second.returncode == 0, second.stderr
    summary = json.loads(second.stdout)
    slds = sorted(str(p.relative_to(decoded["src"])) for p in decoded["src"].rglob("*.sld"))
    ok_first = {r["source"] for r in results(decoded["first"]) if r["status"] == "ok"}
    assert len(results(decoded["first"])) >= 40
    assert (summary["succeeded"], summary["skipped"], summary["failed"]) == (len(slds) - len(ok_first), len(ok_first), 0)
    oks = [r["source"] for r in results(decoded["all"]) if r["status"] == "ok"]
    assert sorted(oks) == slds  # each once
    for r in results(decoded["first"]):
        if r["status"] == "ok":
            for f in (decoded["dst"] / r["output"]).iterdir():
                rel = str(f.relative_to(decoded["dst"]))
                assert stat_key(f) == decoded["after_kill"][rel]
    for i, rel in enumerate(slds):
        if i % 10 and i != len(slds) - 1:
            continue  # every tenth against sld decode (the rest share the code path)
        ref = tmp_path / f"ref{i}"
        rc, _, err = run_captured("decode", str(decoded["src"] / rel), "-o", str(ref), "--dtype", "fp16", "-q")
        assert rc == 0, err
        assert dir_bytes(decoded["dst"] / rel[:-4]) == dir_bytes(ref), rel
    assert not list(decoded["dst"].rglob(f"{TEMP_PREFIX}*"))


def test_decode_to_single_files(tree, encoded, pool, tmp_path):
    src = encoded["dst"] / "loose"
    s = batch.decode(src, tmp_path / "st", engine=pool, single_file=True)
    assert s.failed == 0 and s.succeeded == GOOD_FILES // 2
    rc, _, err = run_captured("decode", str(src / "lora03.sld"), "-o", str(tmp_path / "ref.safetensors"), "-q")
    assert rc == 0, err
    assert (tmp_path / "st" / "lora03.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


# ----------------------------------------------------------------------------------------------
# verify: a DST with damaged files, killed and resumed


def _damage(dst: Path) -> dict[str, str]:
    """Damage a few files in place, one per class; returns rel -> how."""
    files = sorted(dst.rglob("*.sld"))
    how = {}
    f = files[3]  # a flipped byte in the last section: CRC
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))
    how[str(f.relative_to(dst))] = "crc"
    f = files[10]  # cut short
    f.write_bytes(f.read_bytes()[:-20])
    how[str(f.relative_to(dst))] = "truncated"
    f = files[20]  # not an .sld at all
    f.write_bytes(b"PK\x03\x04 not an sld")
    how[str(f.relative_to(dst))] = "magic"
    f = files[30]  # sections with valid CRCs whose values are not finite
    write_sld(f, modules=[lora_module("layers.0.q_proj")],
              tensors=[{"name": "bad.weight", **raw_tensor(np.array([1.0, np.nan]), "F32")}], checked=False)
    how[str(f.relative_to(dst))] = "nan"
    return how


@pytest.fixture(scope="module")
def verified(tree, encoded) -> dict[str, Any]:
    src = tree["root"] / "to-verify"
    shutil.copytree(encoded["dst"], src, ignore=shutil.ignore_patterns("sld-batch-*"))
    damaged = _damage(src)
    dst = tree["root"] / "verify-report"
    run_and_kill("verify", src, dst, "--workers", "2", after=30)
    first = read_manifest(dst / "sld-batch-verify.jsonl")
    second = sld_batch("verify", src, dst, "--workers", "2", "--json")
    return {"src": src, "dst": dst, "damaged": damaged, "first": first, "second": second,
            "all": read_manifest(dst / "sld-batch-verify.jsonl")}


def test_verify_reports_exactly_the_damaged_files_with_sld_verify_errors(verified):
    second = verified["second"]
    summary = json.loads(second.stdout)
    assert second.returncode == 1
    assert summary["failed"] == len(verified["damaged"])
    latest = {r["source"]: r for r in results(verified["all"])}
    assert {rel for rel, r in latest.items() if r["status"] == "failed"} == set(verified["damaged"])
    for rel in verified["damaged"]:
        rc, _, err = run_captured("verify", str(verified["src"] / rel))
        line = assert_one_line_error(rc, err)
        assert latest[rel]["error"] == line[len("sld: error: "):]
    kinds = {how: latest[rel]["error"] for rel, how in verified["damaged"].items()}
    assert "CRC" in kinds["crc"] or "checksum" in kinds["crc"].lower()
    # Each file checked once over both runs, except the damaged ones (checked again).
    oks = [r["source"] for r in results(verified["all"]) if r["status"] == "ok"]
    assert len(oks) == len(set(oks))
    ok_first = {r["source"] for r in results(verified["first"]) if r["status"] == "ok"}
    assert summary["skipped"] == len(ok_first) and len(ok_first) >= 20


def test_verify_rerun_rechecks_only_failed_and_changed_files(verified, pool):
    src, dst = verified["src"], verified["dst"]
    s = batch.verify(src, dst, engine=pool)
    total = len(list(src.rglob("*.sld")))
    assert (s.succeeded, s.failed, s.skipped) == (0, len(verified["damaged"]), total - len(verified["damaged"]))
    # Without DST nothing is recorded and every file is checked.
    s = batch.verify(src, engine=pool)
    assert (s.succeeded, s.failed, s.skipped) == (total - len(verified["damaged"]), len(verified["damaged"]), 0)
    assert s.manifest is None


# ----------------------------------------------------------------------------------------------
# Options, paths, CLI conventions


def test_every_sld_encode_option_is_a_batch_encode_option():
    from deltacodec.batch.cli import ENCODE_EXCLUDED
    from deltacodec.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "verb")
    enc = {a.dest: a for a in sub.choices["encode"]._actions if a.option_strings}
    bat_sub = next(a for a in sub.choices["batch"]._actions if a.dest == "batch_op")
    bat = {a.dest: a for a in bat_sub.choices["encode"]._actions if a.option_strings}
    for dest, a in enc.items():
        if dest in ENCODE_EXCLUDED:
            continue
        assert dest in bat, f"sld encode {a.option_strings} is missing from sld batch encode"
        assert bat[dest].option_strings == a.option_strings and bat[dest].default == a.default


def test_bad_options_fail_once_before_any_item(small, tmp_path):
    with pytest.raises(EncodeError, match="unknown encode option 'bitz'"):
        batch.encode(small["src"], small["dst"], bitz=3)
    with pytest.raises(EncodeError, match="bits must be"):
        batch.encode(small["src"], small["dst"], bits=9)
    with pytest.raises(DecodeError, match="dtype"):
        batch.decode(small["src"], small["dst"], dtype="fp8")
    with pytest.raises(SldError, match="max_decoded_bytes"):
        batch.verify(small["src"], max_decoded_bytes=0)
    assert not small["dst"].exists()


def test_dst_inside_src_or_src_inside_dst_is_refused(small):
    with pytest.raises(OutputError, match="lies inside the input"):
        batch.encode(small["src"], small["src"] / "out")
    with pytest.raises(OutputError, match="contains the input"):
        batch.encode(small["src"], small["src"].parent)


def test_cli_usage_and_error_conventions(small, capsys):
    rc, out, err = _run(capsys, "batch", "encode", small["src"], small["dst"], "--workers", "0")
    assert_usage_error(rc, err, "workers must be at least 1")
    rc, out, err = _run(capsys, "batch", "encode", small["src"], small["dst"], "--bits", "9")
    assert_usage_error(rc, err, "bits must be 1..8, 16 or 32")
    rc, out, err = _run(capsys, "batch", "encode", small["src"] / "nope", small["dst"])
    assert_one_line_error(rc, err, "nope: no such file or directory")
    rc, out, err = _run(capsys, "batch", "encode", small["src"] / "d0" / "adapter_model.safetensors", small["dst"])
    assert_one_line_error(rc, err, "is a single adapter; SRC of a batch is a directory")
    rc, out, err = _run(capsys, "batch", "encode", small["src"], small["dst"], "--ray", "--ray-address", "auto")
    assert_usage_error(rc, err, "not allowed with argument")
    rc, out, err = _run(capsys, "batch", "encode", small["src"], small["src"] / "x")
    assert_one_line_error(rc, err, "lies inside the input")


def _run(capsys, *args):
    from cli_helpers import run_sld

    return run_sld(capsys, *map(str, args))


def test_cli_text_summary_and_failure_lines(tmp_path, capsys, pool):
    src = tmp_path / "src"
    _peft_dir(src / "good", 1)
    (src / "bad").mkdir(parents=True)
    (src / "bad" / "adapter_config.json").write_text("{}")
    rc, out, err = _run(capsys, "batch", "encode", src, tmp_path / "dst", "--workers", "1")
    lines = out.splitlines()
    assert lines[0].startswith("failed: bad: ") and "no adapter_model" in lines[0]
    assert lines[1].startswith("batch encode: 1 succeeded, 1 failed, 0 skipped (2 items)")
    assert "on 1 local worker;" in lines[1] and len(lines) == 2
    assert_one_line_error(rc, err, "1 of 2 items failed", "sld-batch-encode.jsonl")
    rc, out, err = _run(capsys, "batch", "encode", src, tmp_path / "dst", "-q")
    assert out == "" and rc == 1
    assert_one_line_error(rc, err, "1 of 2 items failed")
    rc, out, err = _run(capsys, "batch", "encode", src, tmp_path / "dst", "--json")
    summary = json.loads(out)
    assert (summary["succeeded"], summary["failed"], summary["skipped"], summary["ok"]) == (0, 1, 1, False)
    with pytest.raises(deltacodec.AdapterError) as exc:  # the batch records the library's own message
        deltacodec.read_adapter(str(src / "bad"))
    assert summary["failures"] == [{"source": "bad", "error": str(exc.value)}]
    (src / "bad" / "adapter_config.json").unlink()
    (src / "bad").rmdir()
    rc, out, err = _run(capsys, "batch", "encode", src, tmp_path / "dst")
    assert rc == 0 and err == "" and out.startswith("batch encode: 0 succeeded, 0 failed, 1 skipped (1 items)")


# ----------------------------------------------------------------------------------------------
# Manifest and engine details


def test_manifest_line_cut_short_by_a_kill_is_ignored_and_its_item_redone(small, pool):
    src, dst = small["src"], small["dst"]
    batch.encode(src, dst, engine=pool)
    man = dst / "sld-batch-encode.jsonl"
    lines = man.read_text().splitlines(keepends=True)
    last = max(i for i, ln in enumerate(lines) if '"status":"ok"' in ln)
    cut = json.loads(lines[last])["source"]
    man.write_text("".join(lines[:last]) + lines[last][: len(lines[last]) // 2])  # no newline
    with pytest.warns(DeltacodecWarning, match="1 unreadable line"):
        s = batch.encode(src, dst, engine=pool)
    assert (s.succeeded, s.skipped) == (1, 5)
    now = man.read_text().splitlines()
    assert now[last] == lines[last][: len(lines[last]) // 2]  # ended by a newline, left as it was
    recs = [json.loads(line) for line in now[last + 1:]]
    assert [r["source"] for r in results(recs)] == [cut] and results(recs)[0]["status"] == "ok"


def test_index_last_record_wins_ownership_sticks_and_refused_inputs_shadow_nothing():
    from deltacodec.batch.manifest import Index

    def rec(status, source="a", output="a.sld", **kw):
        return {"op": "encode", "source": source, "output": output, "status": status, "fingerprint": "01" * 8,
                "options_id": "02" * 8, "source_sha256": "03" * 32, "bytes": 7, **kw}

    idx = Index()
    idx.update(rec("started"))
    idx.update(rec("ok"))
    idx.update(rec("failed"))  # the adapter broke later: not done, but its old output is still ours
    idx.update(rec("failed", source="b", output="b.sld"))  # never written: not ours
    idx.update(rec("failed", source="c.sld", output=None))  # refused before it had an output
    st = idx.claim("a.sld")
    assert (st.done, st.owned) == (False, True)
    st = idx.claim("b.sld")
    assert (st.done, st.owned) == (False, False)
    assert idx.claim("c.sld") is None  # the output c.sld of some other input is not shadowed
    assert idx.claim("a.sld") is False  # a second claim in the same run
    idx = Index()
    idx.update(rec("ok"))
    st = idx.claim("a.sld")
    assert (st.done, st.owned, st.fingerprint, st.options_id, st.source_id, st.out_bytes) == (
        True, True, bytes([1] * 8), bytes([2] * 8), bytes([3] * 8), 7)


def _die_on_two(task: int) -> dict:
    if task == 2:
        os._exit(3)
    return {"n": task}


def test_a_worker_that_dies_fails_the_items_in_flight_and_the_pool_goes_on():
    with LocalPool(1) as p:
        out = list(p.run(_die_on_two, iter(range(6))))
    ok = sorted(r["n"] for _, r in out if isinstance(r, dict))
    died = sorted(t for t, r in out if not isinstance(r, dict))
    assert 2 in died and sorted(ok + died) == list(range(6))
    assert all("worker process died" in str(r) for _, r in out if not isinstance(r, dict))


def _echo(task: int) -> dict:
    return {"n": task}


def test_engine_keeps_a_bounded_number_of_tasks_in_flight():
    pulled = []

    def tasks():
        for i in range(40):
            pulled.append(i)
            yield i

    with LocalPool(2) as p:
        it = p.run(_echo, tasks())
        first = next(it)
        assert len(pulled) == 4  # the window: two per worker, whatever the number of tasks
        rest = list(it)
    assert sorted(r["n"] for _, r in [first, *rest]) == list(range(40))
