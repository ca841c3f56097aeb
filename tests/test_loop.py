"""The online loop on `tiny`: it learns, its first losses are pinned, and it is deterministic by
construction (identical pools across arms, evaluation touches no training RNG, the stream needs
no state beyond the step)."""

import json

import pytest

from fwsel.data import build_data
from fwsel.data.files import FileReader, IterStream

from helpers_runs import read_run, train, train_losses

# seed 0, default config (selector=ftw, tiny, budget 0.25, k = 8): the first five training losses.
# A change here means the stream, the model init, the tokenizer or the default selector changed.
PINNED = [4.624659717106255, 4.669880022619746, 4.546756431987774, 4.424182326369124, 4.310483132609788]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    return train(tmp_path_factory.mktemp("default"))


def test_default_run_learns_and_first_losses_are_pinned(default_run):
    s = default_run["summary"]
    assert s["status"] == "ok" and s["steps_done"] == 200 and s["selector"] == "ftw"
    assert s["target_eval_loss"] <= 0.9 * s["target_eval_loss_initial"]
    assert s["target_eval_acc"] >= 0.5  # the default run learns the task itself, not only its format
    assert train_losses(default_run)[:5] == pytest.approx(PINNED, rel=1e-4)
    first = default_run["metrics"][0]
    assert first["step"] == 0 and first["train_loss"] is None and first["target_eval_loss"] is not None
    assert s["pool_size"] == 32 and s["effective_budget"] == 0.25
    assert (s["target_select_rows"], s["target_eval_rows"]) == (64, 256)


def test_metrics_rows_follow_the_contract(default_run):
    rows = default_run["metrics"]
    assert [r["step"] for r in rows] == list(range(201))
    for r in rows[1:]:
        assert r["examples_seen"] == 32 * r["step"]
        assert sum(r["selected_per_source"].values()) <= 8
        assert ("target_eval_loss" in r) == (r["step"] % 20 == 0)
    assert [r["step"] for r in default_run["selected"]] == list(range(1, 201))
    assert all(abs(sum(r["weights"]) / len(r["weights"]) - 1) < 1e-9 for r in default_run["selected"])


@pytest.mark.parametrize("seed", [0, 3])
def test_every_arm_sees_the_same_pools_and_target_batches(tmp_path, monkeypatch, seed):
    from fwsel.loop import Trainer

    seen, orig = {}, Trainer.train_step

    def recording_step(self, t):
        pool, target = self.data.stream.pool(t, self.N), self.target_rows(t)
        seen.setdefault(self.selector.name, []).append(([r["id"] for r in pool], [r["id"] for r in target]))
        return orig(self, t)

    monkeypatch.setattr(Trainer, "train_step", recording_step)
    for sel in ("random", "full", "ftw", "maxloss"):
        train(tmp_path / sel, f"selector={sel}", "steps=4", "eval_every=4", "target.eval_size=8", f"seed={seed}")
    assert seen["random"] == seen["full"] == seen["ftw"] == seen["maxloss"]
    assert len({tuple(p) for p, _ in seen["ftw"]}) == 4  # a new pool every step


@pytest.mark.parametrize("sel", ["random", "ftw"])
def test_evaluation_touches_no_training_rng(tmp_path, sel):
    """eval_every=1 and eval_every=10 train identically, with LoRA dropout drawing from the RNG."""
    common = [f"selector={sel}", "steps=10", "target.eval_size=16", "lora.enabled=true", "lora.dropout=0.1"]
    a = train(tmp_path / "a", *common, "eval_every=1")
    b = train(tmp_path / "b", *common, "eval_every=10")
    assert train_losses(a) == train_losses(b)
    assert a["selected"] == b["selected"]
    assert sum("target_eval_loss" in r for r in a["metrics"]) == 11


def test_stream_needs_no_state_beyond_the_step(tmp_path):
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="fwsel.conf", version_base="1.3"):
        cfg = compose("train")
    fresh = build_data(cfg).stream
    walked = build_data(cfg).stream
    for t in range(5):
        walked.pool(t, 32)
    assert fresh.pool(5, 32) == walked.pool(5, 32)  # no hidden iterator state

    f = tmp_path / "rows.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"{i}+1=", "response": str(i + 1)}) + "\n" for i in range(50)))
    a, b = (IterStream(FileReader([str(f)]), seed=1, shuffle_buffer=8) for _ in range(2))
    for t in range(3):
        a.pool(t, 5)
    assert a.pool(3, 5) == b.pool(3, 5)  # a file stream restores its position by replaying
    assert a.pool(1, 5) == b.pool(1, 5)  # and can go back


def test_a_short_file_stream_ends_exhausted(tmp_path):
    f = tmp_path / "rows.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"{i}+1=", "response": str(i + 1)}) + "\n" for i in range(40)))
    run = train(tmp_path / "run", "data=jsonl", f"data.files={f}", f"data.target_files={f}", "selector=random",
                "steps=10", "eval_every=5")
    s = run["summary"]
    assert s["status"] == "exhausted" and s["steps_done"] == 1  # 40 rows = one pool of 32
    assert s["target_eval_loss"] is not None
    assert read_run(tmp_path / "run")["metrics"][-1]["step"] == 1


@pytest.mark.parametrize("extra", [[], ["data.max_len=12", "target.select_size=6"]])
def test_cached_target_encodings_collate_exactly_as_fresh_rows(extra):
    """Each `select` row is tokenised once; every step's target batch equals collating its rows afresh."""
    import torch
    from hydra import compose, initialize_config_module

    from fwsel.loop import Trainer
    from fwsel.outputs import RunWriter
    from fwsel.tracking import NoTracker

    with initialize_config_module(config_module="fwsel.conf", version_base="1.3"):
        cfg = compose("train", overrides=["steps=4", "progress=false", "target.eval_size=8", *extra])
    tr = Trainer(cfg, RunWriter("", enabled=False), NoTracker())
    for t in [0, 1, 2, 0, 7]:
        cached, fresh = tr.target_batch(t), tr.batch(tr.target_rows(t))
        assert cached.keys() == fresh.keys()
        assert all(torch.equal(cached[k], fresh[k]) for k in fresh)
    assert 0 < len(tr._target_enc) <= len(tr.data.select)
    tr.close()
