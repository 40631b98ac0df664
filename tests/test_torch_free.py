"""The core works without torch: in a subprocess where torch (and safetensors, kmeans1d,
transformers, peft, diffusers) cannot be imported, `sld encode / inspect / verify / decode` run
on safetensors adapters in each layout, and what does need torch (.bin files, `sld apply`) says
which extra to install, on one line, exit status 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from adapter_dirs import BASE_CONFIG, lora_tensors
from layout_files import diffusers_module, kohya_file, write_st

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
HERE = os.path.dirname(os.path.abspath(__file__))
BLOCKED = ("torch", "safetensors", "kmeans1d", "transformers", "peft", "diffusers", "triton")

# Imported by Python at start-up (site), before anything else runs: a finder that refuses the
# blocked packages the way a missing package is refused.
BLOCKER = f'''
import sys

class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
        return None

sys.meta_path.insert(0, _Blocked())
'''

CHILD = r'''
import contextlib, io, json, sys
from deltacodec.cli import main

def run(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return {"argv": list(argv), "rc": rc, "out": out.getvalue(), "err": err.getvalue()}

results = []
for src, sld, dec in json.loads(sys.argv[1]):
    results.append(run("encode", src, "--bits", "3", "-o", sld, "-q"))
    results.append(run("inspect", sld, "--json"))
    results.append(run("verify", sld))
    results.append(run("decode", sld, "-o", dec, "-q"))
bin_src, base, base_sld, applied = json.loads(sys.argv[2])
results.append(run("encode", bin_src, "-o", bin_src + ".sld"))
results.append(run("apply", base, base_sld, "-o", applied))
results.append(sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED))
print(json.dumps(results))
'''.replace("BLOCKED", repr(BLOCKED))


def test_encode_inspect_verify_decode_need_no_torch_and_the_rest_names_its_extra(tmp_path, rng):
    import torch

    peft_dir = tmp_path / "peft"
    write_st(str(peft_dir / "adapter_model.safetensors"), lora_tensors())
    (peft_dir / "adapter_config.json").write_text(json.dumps(BASE_CONFIG))
    diff = write_st(str(tmp_path / "db" / "pytorch_lora_weights.safetensors"),
                    diffusers_module("unet.down_blocks.0.attn1.to_q", 8, 8, 2, rng, "lora"))
    kohya = str(tmp_path / "k.safetensors")
    kohya_file(kohya, rng)
    jobs = [(str(peft_dir), str(tmp_path / "p.sld"), str(tmp_path / "p-dec")),
            (diff, str(tmp_path / "d.sld"), str(tmp_path / "d-dec")),
            (kohya, str(tmp_path / "k.sld"), str(tmp_path / "k-dec"))]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    torch.save({k: torch.from_numpy(v) for k, v in lora_tensors().items()}, str(bin_dir / "adapter_model.bin"))
    (bin_dir / "adapter_config.json").write_text(json.dumps(BASE_CONFIG))
    base = write_st(str(tmp_path / "base.safetensors"), {"layers.0.q_proj.weight": np.ones((32, 48), np.float32),
                                                         "layers.0.down_proj.weight": np.ones((48, 64), np.float32)})
    (tmp_path / "blocker").mkdir()
    (tmp_path / "blocker" / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "blocker"), ROOT, HERE])}
    extra = [str(bin_dir / "adapter_model.bin"), base, jobs[0][1], str(tmp_path / "applied.safetensors")]
    res = subprocess.run([sys.executable, "-c", CHILD, json.dumps(jobs), json.dumps(extra)], capture_output=True,
                         text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    *runs, imported = json.loads(res.stdout.strip().splitlines()[-1])
    assert imported == []  # nothing blocked was imported (or tried and swallowed)
    for r in runs[:-2]:
        assert r["rc"] == 0 and r["err"] == "", r
    layouts = [json.loads(r["out"])["metadata"].get("layout", "peft") for r in runs[:-2] if r["argv"][0] == "inspect"]
    assert layouts == ["peft", "diffusers", "kohya"]
    assert os.path.isfile(tmp_path / "d-dec" / "pytorch_lora_weights.safetensors")
    assert os.path.isfile(tmp_path / "k-dec" / "k.safetensors")
    for r in runs[-2:]:  # a .bin adapter, sld apply: torch needed, and the error says how to get it
        assert r["rc"] == 1 and r["out"] == "", r
        lines = r["err"].strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("sld: error: ") and "pip install 'deltacodec[torch]'" in lines[0], r
    assert not os.path.exists(str(bin_dir / "adapter_model.bin") + ".sld") and not os.path.exists(tmp_path / "applied.safetensors")
