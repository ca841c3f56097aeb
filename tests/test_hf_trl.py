"""SelectionMixin combined with TRL's SFTTrainer (skipped without trl; CI installs it through the dev extra)."""

import json

import pytest

pytest.importorskip("trl")

from test_hf import load_example  # noqa: E402

EX = load_example("trl_sft")


def test_selection_mixin_with_sft_trainer(tmp_path):
    """TRL tokenizes the prompt/completion rows; ids and sources survive its column pruning, each
    step keeps k = 0.25 * 32 rows of its own pool, and evaluate() adds the target eval loss."""
    res = EX.main([str(tmp_path), "--steps", "3", "--lora"])
    with open(tmp_path / "selected.jsonl") as f:
        steps = [json.loads(line) for line in f]
    train_ids = set(EX.mixture(96)[0]["id"])
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert all(0 < len(s["ids"]) <= 8 and set(s["ids"]) <= train_ids for s in steps)
    assert sum(res["selected_per_source"].values()) == sum(len(s["ids"]) for s in steps)
    assert res["eval_target_loss"] > 0 and "eval_loss" in res
