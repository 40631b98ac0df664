"""spec/vectors/invalid: files a reader MUST reject (spec section 9.3). Each is refused with
exactly the error class its JSON states, at the stated stage, with a message naming the file;
and spec/vectors/make_vectors.py regenerates every one of them byte for byte."""

from __future__ import annotations

import json
import os
import re
import sys

import pytest

import deltacodec
from deltacodec import SldError

HERE = os.path.dirname(os.path.abspath(__file__))
VECTORS = os.path.join(HERE, "..", "spec", "vectors")
INVALID = os.path.join(VECTORS, "invalid")
NAMES = sorted(n[:-4] for n in os.listdir(INVALID) if n.endswith(".sld"))
SPEC = open(os.path.join(HERE, "..", "spec", "sld-format.md"), encoding="utf-8").read()


def test_there_are_invalid_vectors():
    assert len(NAMES) >= 100
    assert sorted(n[:-5] for n in os.listdir(INVALID) if n.endswith(".json")) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_invalid_vector_is_rejected_as_stated(name):
    meta = json.load(open(os.path.join(INVALID, f"{name}.json")))
    assert set(meta) == {"error", "rule", "reason", "stage"} and meta["reason"]
    cls = getattr(deltacodec, meta["error"])
    path = os.path.join(INVALID, f"{name}.sld")
    if meta["stage"] == "verify":
        f = deltacodec.load(path)  # the header is fine: only decoding the sections finds it
        call = f.verify
    else:
        assert meta["stage"] == "open"
        call = lambda: deltacodec.load(path)  # noqa: E731
    with pytest.raises(SldError) as exc:
        call()
    assert type(exc.value) is cls, f"{name}: {type(exc.value).__name__}: {exc.value}"
    assert path in str(exc.value)
    assert "\n" not in str(exc.value) and "\x1b" not in str(exc.value)


@pytest.mark.parametrize("name", NAMES)
def test_invalid_vector_names_a_spec_section(name):
    rule = json.load(open(os.path.join(INVALID, f"{name}.json")))["rule"]
    m = re.fullmatch(r"§(\d+)\.(\d+)", rule)
    assert m, rule
    assert re.search(rf"^### {m[1]}\.{m[2]}\. ", SPEC, re.M), f"{name}: no section {rule} in the spec"


def test_invalid_vectors_are_reproducible():
    sys.path.insert(0, VECTORS)
    try:
        import make_vectors
    finally:
        sys.path.remove(VECTORS)
    made = make_vectors.invalid()
    assert sorted(made) == NAMES
    for name, (data, cls, rule, reason, stage) in made.items():
        assert open(os.path.join(INVALID, f"{name}.sld"), "rb").read() == data, name
        assert json.load(open(os.path.join(INVALID, f"{name}.json"))) == {
            "error": cls, "rule": f"§{rule}", "reason": reason, "stage": stage}


def test_the_spec_lists_every_invalid_vector():
    listed = set(re.findall(r"`invalid/(\w+)`", SPEC))
    assert listed == set(NAMES), (sorted(set(NAMES) - listed), sorted(listed - set(NAMES)))
