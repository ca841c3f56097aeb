"""The benchmark suite's task families: noisy rows follow the family's consistent wrong rule in the
target format, and no target input (select or eval) ever occurs in the stream."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from mixtures import FAMILIES, family_rows  # noqa: E402


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_rows_follow_their_rules(name):
    fam = FAMILIES[name]
    target, stream = family_rows(name, 2000, seed=3, target_rows=64)
    held = {r["prompt"] for r in target}
    assert len(held) == 64
    sources = {r["source"] for r in stream}
    assert sources == {"target", "related", "noisy", "irrelevant", "duplicate"}
    for r in stream:
        assert r["prompt"] not in held
        if r["source"] in ("target", "noisy", "duplicate"):
            w = r["prompt"][len(fam.op) + 1:-1]
            right, wrong = fam.right(w), fam.wrong(w)
            assert right != wrong and len(right) == len(wrong)
            assert r["response"] == (wrong if r["source"] == "noisy" else right)
    assert len({r["prompt"] for r in stream if r["source"] == "duplicate"}) == 4
    assert family_rows(name, 2000, seed=3, target_rows=64) == (target, stream)  # a pure function of the seed
