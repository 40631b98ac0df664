"""README.md's two set-up commands stay true: CI runs the test command verbatim, and the
example the first command encodes is in the repository."""

from __future__ import annotations

import os
import re

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _bash_blocks() -> list[str]:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_ci_runs_the_readme_test_command_verbatim():
    test_cmd = _bash_blocks()[1]
    assert "pytest" in test_cmd
    ci = [line.strip() for line in open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8")]
    assert test_cmd in ci
    # The default run leaves out the long and the hour-long markers; CI runs `slow` on its own.
    assert "not slow" in test_cmd and "not exhaustive" in test_cmd
    assert any(line.startswith("timeout") and '-m "slow' in line for line in ci[ci.index(test_cmd):])


def test_readme_example_command_uses_the_shipped_example():
    run_cmd = _bash_blocks()[0]
    # The core needs no torch; the test extras do, and a bare torch requirement would pull the
    # multi-GB CUDA build: the test command installs the pinned wheel first.
    assert "torch" not in run_cmd and "pip install -e ." in run_cmd
    assert "pip install torch==2.13.0 && pip install -e \".[test]\"" in _bash_blocks()[1]
    for verb in ("sld encode examples/tiny-sine-adapter", "sld inspect", "sld decode"):
        assert verb in run_cmd
    assert os.path.isfile(os.path.join(ROOT, "examples", "tiny-sine-adapter", "adapter_model.safetensors"))
    assert os.path.isfile(os.path.join(ROOT, "examples", "tiny-sine-adapter", "adapter_config.json"))
