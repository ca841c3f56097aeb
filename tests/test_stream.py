"""The embedded stream: deterministic, the configured proportions, disjoint target splits,
no eval row in the stream."""

import collections

import pytest

from fwsel.data import split_target
from fwsel.data.synthetic import SyntheticStream, TargetSplit

MIX = {"target": 0.1, "related": 0.2, "noisy": 0.2, "irrelevant": 0.3, "duplicate": 0.2}


def stream(seed=0, split=None):
    return SyntheticStream(seed, MIX, 4, split or TargetSplit(0, 64, 256))


def test_pool_is_a_pure_function_of_seed_and_step():
    a, b = stream(), stream()
    b.pool(5, 32)  # touching other steps changes nothing
    assert a.pool(3, 32) == b.pool(3, 32)
    assert a.pool(3, 32) != a.pool(4, 32)
    assert stream(seed=1).pool(3, 32) != a.pool(3, 32)
    assert a.pool(3, 16) == a.pool(3, 32)[:16]  # a row depends on (seed, t, pos) only: shards regenerate


def test_proportions_match_the_mixture():
    counts = collections.Counter(r["source"] for t in range(300) for r in stream().pool(t, 32))
    n = sum(counts.values())
    for src, p in MIX.items():
        assert abs(counts[src] / n - p) < 0.02, (src, counts[src] / n)


def test_target_splits_are_disjoint_and_fixed_by_split_seed():
    s = TargetSplit(0, 64, 256)
    sel = {(r["prompt"], r["response"]) for r in s.select}
    ev = {(r["prompt"], r["response"]) for r in s.eval}
    assert len(sel) == 64 and len(ev) == 256 and not sel & ev
    assert [r["prompt"] for r in TargetSplit(0, 64, 256).eval] == [r["prompt"] for r in s.eval]
    assert [r["prompt"] for r in TargetSplit(1, 64, 256).eval] != [r["prompt"] for r in s.eval]


def test_no_eval_row_in_the_first_10k_stream_rows():
    split = TargetSplit(0, 64, 256)
    ev = {(r["prompt"], r["response"]) for r in split.eval}
    st = stream(split=split)
    rows = [r for t in range(313) for r in st.pool(t, 32)]
    assert len(rows) >= 10_000
    assert not [r for r in rows if (r["prompt"], r["response"]) in ev]


def test_duplicates_repeat_a_handful_of_target_rows_and_noisy_rows_are_wrong():
    rows = [r for t in range(100) for r in stream().pool(t, 32)]
    dups = {r["prompt"] for r in rows if r["source"] == "duplicate"}
    assert len(dups) == 4
    for r in rows:
        a, b = r["prompt"].rstrip("=").split("+") if "+" in r["prompt"] else (None, None)
        if r["source"] in ("target", "duplicate", "related"):
            assert int(r["response"]) == int(a) + int(b)
        if r["source"] == "noisy":
            assert int(r["response"]) != int(a) + int(b)
            true = str(int(a) + int(b))
            assert r["response"] == true[::-1] or true == true[::-1]  # reversed digits (palindromes: random)
    with pytest.raises(ValueError, match="noisy_mode must be one of reversed|random"):
        SyntheticStream(0, MIX, 4, TargetSplit(0, 64, 256), "bogus")


def test_file_target_split_rule():
    from omegaconf import OmegaConf

    rows = [{"id": str(i)} for i in range(10)]
    t = OmegaConf.create({"select_size": 64, "eval_size": 256, "split_seed": 0})
    sel, ev = split_target(rows, t)
    assert len(sel) == 5 and len(ev) == 5 and not {r["id"] for r in sel} & {r["id"] for r in ev}
    with pytest.raises(Exception, match="at least 2"):
        split_target(rows[:1], t)


def test_key_task_rows_follow_the_key_and_noisy_rows_the_reversed_rule():
    from fwsel.data.synthetic import KEY

    split = TargetSplit(0, 64, 256, "key")
    st = SyntheticStream(0, MIX, 4, split)
    ev = {r["prompt"] for r in split.eval}
    assert len(ev) == 256 and not ev & {r["prompt"] for r in split.select}
    rows = [r for t in range(100) for r in st.pool(t, 32)]
    for r in rows:
        if r["prompt"].startswith("key "):
            digits = r["prompt"][4:-1]
            right = "".join(KEY[int(d)] for d in digits)
            if r["source"] == "noisy":
                assert r["response"] != right and (r["response"] == right[::-1] or right == right[::-1])
            else:
                assert r["source"] in ("target", "related", "duplicate") and r["response"] == right
                assert len(digits) == 4 or r["source"] == "related"
        if r["source"] in ("target", "duplicate"):
            assert r["prompt"] not in ev
    assert len({r["prompt"] for r in rows if r["source"] == "duplicate"}) == 4
    with pytest.raises(ValueError, match="data.task must be one of key|add"):
        TargetSplit(0, 64, 256, "bogus")
