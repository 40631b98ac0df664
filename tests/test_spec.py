"""spec/sld-format.md is normative: every MUST in it names a test, and every named test exists."""

from __future__ import annotations

import ast
import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))
SPEC = os.path.join(HERE, "..", "spec", "sld-format.md")


def defined_tests() -> set[str]:
    names = set()
    for fn in os.listdir(HERE):
        if fn.endswith(".py"):
            tree = ast.parse(open(os.path.join(HERE, fn), encoding="utf-8").read())
            names |= {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}
    return names


def spec_paragraphs() -> list[str]:
    text = open(SPEC, encoding="utf-8").read()
    # Bullets are paragraphs of their own; table rows restate what the paragraph below them requires.
    chunks = re.split(r"\n\s*\n|\n(?=\* )", text)
    return [c for c in chunks if "RFC 2119" not in c and not c.lstrip().startswith("|")]


def test_every_must_in_the_spec_names_a_test():
    unnamed = [p.strip()[:80] for p in spec_paragraphs() if "MUST" in p and not re.search(r"\[`test_\w+`", p)]
    assert not unnamed, unnamed


def test_every_test_the_spec_names_exists():
    named = set(re.findall(r"`(test_\w+)`", open(SPEC, encoding="utf-8").read()))
    assert named and not named - defined_tests(), sorted(named - defined_tests())
