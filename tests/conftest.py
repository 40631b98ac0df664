"""Shared fixtures. Hypothesis: a fast default profile, and a 'slow' one (HYPOTHESIS_PROFILE=slow)."""

from __future__ import annotations

import os

# Triton's CPU interpreter must be on before triton is first imported by anything (transformers
# and peft import it too): the jit functions of triton.language are bound at import time, and
# ones bound without the interpreter fail inside an interpreted kernel. Subprocesses that use
# the real compiler (AOT compile, GPU test) set DELTACODEC_TEST_NATIVE_TRITON=1.
if os.environ.get("DELTACODEC_TEST_NATIVE_TRITON") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default", max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "slow", max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
