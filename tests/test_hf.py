"""fwsel.hf: selection inside transformers.Trainer (tiny Llama, char tokenizer, CPU, fp32)."""

import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import binomtest

ROOT = Path(__file__).resolve().parents[1]


def load_example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


EX = load_example("hf_trainer")


def fixed_rows(n, seed=0):
    """Additions with 3-digit answers: every row has 4 supervised tokens, so the Trainer's token-mean
    loss equals fwsel's row mean and a plain Trainer is an exact reference."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a, b = (int(x) for x in rng.integers(10, 100, 2))
        out.append({"id": f"r{i}", "source": "target" if i % 3 == 0 else "other",
                    "prompt": f"{a}+{b}=", "response": f"{a + b:03d}"})
    return out


def args(out, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(out), per_device_train_batch_size=8, learning_rate=1e-2, lr_scheduler_type="constant",
                save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True, logging_steps=1)
    return TrainingArguments(**{**base, **kw})


def params(model):
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])


def selective(out, rows, target=None, **kw):
    import datasets

    from fwsel.data.tokenizer import char_tokenizer
    from fwsel.hf import SelectiveTrainer

    tok = char_tokenizer()
    import dataclasses

    from transformers import TrainingArguments

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    targs = {k: kw.pop(k) for k in list(kw) if k in fields}
    model = kw.pop("model", None)
    return SelectiveTrainer(model=EX.tiny_model(tok) if model is None else model, args=args(out, **targs),
                            train_dataset=datasets.Dataset.from_list(rows), processing_class=tok,
                            target_dataset=target or fixed_rows(16, seed=1), **kw)


class AllByGrads:
    """Every row, uniform weights, through the gradient engine (needs = grads): its update must
    equal the Trainer's own backward."""

    @staticmethod
    def make():
        from fwsel.selectors.base import Selector, uniform

        class _All(Selector):
            name = "all_by_grads"

            def needs(self, step):
                return "grads"

            def select(self, pool):
                return uniform(range(len(pool.rows)))

        return _All()


def test_full_selection_equals_a_plain_trainer(tmp_path):
    """`full` gives a plain Trainer's parameters after 3 AdamW steps with clipping (1e-6, fp32)."""
    import datasets
    from transformers import DataCollatorForSeq2Seq, Trainer

    from fwsel.data.collate import Collator
    from fwsel.data.tokenizer import char_tokenizer

    rows, tok = fixed_rows(24), char_tokenizer()
    enc = Collator(tok, 64)
    tokenized = [dict(zip(("input_ids", "labels"), enc.encode(r)[:2])) for r in rows]
    plain = Trainer(model=EX.tiny_model(tok), args=args(tmp_path / "plain", max_steps=3, max_grad_norm=0.5),
                    train_dataset=datasets.Dataset.from_list(tokenized),
                    data_collator=DataCollatorForSeq2Seq(tok, padding=True))
    plain.train()
    sel = selective(tmp_path / "sel", rows, selector="full", max_steps=3, max_grad_norm=0.5)
    sel.train()
    assert [len(r["ids"]) for r in read(tmp_path / "sel")] == [8, 8, 8]
    a, b = params(plain.model), params(sel.model)
    assert not torch.equal(a, params(EX.tiny_model(tok)))  # it trained
    assert torch.allclose(a, b, atol=1e-6, rtol=0), float((a - b).abs().max())


def test_the_engine_update_equals_the_weighted_backward(tmp_path):
    """All rows through the gradient engine's one-pass update (needs = grads) and `full` (one
    weighted backward) reach the same parameters after 3 AdamW steps with clipping (fp64, 1e-10).
    Not against a plain Trainer in fp64: its loss casts the logits to float32."""
    from fwsel.data.tokenizer import char_tokenizer

    rows, tok = fixed_rows(24), char_tokenizer()
    out = []
    for name, sel in (("full", "full"), ("engine", AllByGrads.make())):
        tr = selective(tmp_path / name, rows, selector=sel, model=EX.tiny_model(tok).double(), max_steps=3,
                       max_grad_norm=0.5)
        tr.train()
        out.append(params(tr.model))
    assert out[0].dtype == torch.float64 and torch.allclose(out[0], out[1], atol=1e-10, rtol=0)
    assert read(tmp_path / "full") == read(tmp_path / "engine")


def read(out, name="selected.jsonl"):
    with open(Path(out) / name) as f:
        return [json.loads(line) for line in f]


def test_random_trains_exactly_the_k_selected_rows(tmp_path):
    """budget 0.25 of 16 rows: 4 distinct rows of that step's batch, and the SGD step is the
    gradient of exactly those rows' mean loss."""
    from fwsel.data.collate import Collator
    from fwsel.grads.loss import sequence_losses

    rows = fixed_rows(16)
    tr = selective(tmp_path, rows, selector="random", max_steps=1, per_device_train_batch_size=16, optim="sgd",
                   max_grad_norm=0.0, learning_rate=0.1)
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    tr.train()
    (step,) = read(tmp_path)
    assert step["step"] == 1 and len(step["ids"]) == 4 == len(set(step["ids"])) and step["weights"] == [1.0] * 4
    ref = EX.tiny_model(tr.processing_class)
    ref.load_state_dict(before)
    by_id = {r["id"]: r for r in rows}
    batch = Collator(tr.processing_class, 64)([by_id[i] for i in step["ids"]])
    sequence_losses(ref, batch).losses.mean().backward()
    for n, p in ref.named_parameters():
        torch.testing.assert_close(dict(tr.model.named_parameters())[n].detach(), p.detach() - 0.1 * p.grad,
                                   atol=1e-6, rtol=0)


def picks(out, lora):
    tr = selective(out, EX.mixture(640)[0].to_list(), target=EX.mixture(1)[1].to_list(), selector="ftw",
                   model=EX.tiny_model(EX.char_tokenizer(), lora=lora), max_steps=20, per_device_train_batch_size=32,
                   learning_rate=3e-3)
    tr.train()
    return tr.selected_per_source()


@pytest.mark.slow  # ~4 s each: 20 steps over pools of 32
@pytest.mark.parametrize("lora", [False, True], ids=["full_ft", "lora"])
def test_ftw_prefers_target_rows_over_random(tmp_path, lora):
    """Random takes `target` rows at their share of the pools (0.1 here); ftw at a clearly higher
    rate (one-sided binomial, p < 1e-3; measured ~0.2 with and without LoRA)."""
    rows = EX.mixture(640)[0].to_list()
    share = sum(r["source"] == "target" for r in rows) / len(rows)  # 20 steps x 32 rows: every row is a candidate once
    got = picks(tmp_path, lora)
    n = sum(got.values())
    assert n > 100
    p = binomtest(got.get("target", 0), n, share, alternative="greater").pvalue
    assert p < 1e-3, (got, share, p)


def test_accumulation_selects_as_one_batch(tmp_path):
    """Accumulation 2 over batches of 8 and one batch of 16 see the same 16-row pools: the same
    selections and the same parameters."""
    rows = EX.mixture(64)[0].to_list()
    target = EX.mixture(1)[1].to_list()
    a = selective(tmp_path / "a", rows, target, selector="ftw", max_steps=3, per_device_train_batch_size=8,
                  gradient_accumulation_steps=2)
    b = selective(tmp_path / "b", rows, target, selector="ftw", max_steps=3, per_device_train_batch_size=16)
    a.train()
    b.train()
    sa, sb = read(tmp_path / "a"), read(tmp_path / "b")
    assert [r["ids"] for r in sa] == [r["ids"] for r in sb] and len(sa) == 3
    assert all(len(r["ids"]) <= 4 for r in sa)
    np.testing.assert_allclose(np.concatenate([r["weights"] for r in sa]), np.concatenate([r["weights"] for r in sb]),
                               rtol=1e-4)
    torch.testing.assert_close(params(a.model), params(b.model), atol=1e-5, rtol=0)


def test_gradient_checkpointing_changes_nothing(tmp_path):
    """The Trainer's gradient checkpointing (non-reentrant in transformers 5) recomputes the same
    activations: the same selections and parameters."""
    rows, target = EX.mixture(32)[0].to_list(), EX.mixture(1)[1].to_list()
    runs = []
    for name, gc in (("plain", False), ("gc", True)):
        tr = selective(tmp_path / name, rows, target, selector="ftw", max_steps=2, gradient_checkpointing=gc)
        tr.train()
        assert getattr(tr.model, "is_activation_checkpointing", False) == gc
        runs.append((read(tmp_path / name), params(tr.model)))
    assert runs[0][0] == runs[1][0]
    torch.testing.assert_close(runs[0][1], runs[1][1], atol=1e-6, rtol=0)


def test_bf16_mixed_precision_runs_the_selection(tmp_path):
    tr = selective(tmp_path, EX.mixture(16)[0].to_list(), EX.mixture(1)[1].to_list(), selector="ftw", max_steps=2,
                   bf16=True)
    before = params(tr.model)
    tr.train()
    assert tr.accelerator.mixed_precision == "bf16" and [len(r["ids"]) > 0 for r in read(tmp_path)] == [True, True]
    assert torch.isfinite(params(tr.model)).all() and not torch.equal(before, params(tr.model))


def test_resume_continues_the_same_selections(tmp_path):
    rows = EX.mixture(64)[0].to_list()
    target = EX.mixture(1)[1].to_list()
    kw = dict(selector="ftw", max_steps=4, save_strategy="steps", save_steps=2)
    selective(tmp_path, rows, target, **kw).train()
    whole = read(tmp_path)
    assert json.loads((tmp_path / "checkpoint-2" / "fwsel_selection.json").read_text())["totals"]["examples_seen"] == 16
    shutil.rmtree(tmp_path / "checkpoint-4")
    tr = selective(tmp_path, rows, target, **kw)
    tr.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert read(tmp_path) == whole and [r["step"] for r in whole] == [1, 2, 3, 4]
    assert tr.selection_totals["examples_seen"] == 32


def test_evaluate_reports_the_target_eval_loss(tmp_path):
    rows = fixed_rows(16)
    tr = selective(tmp_path, rows, selector="random", max_steps=1, target_eval_dataset=fixed_rows(8, seed=2))
    m = tr.evaluate()
    assert m["eval_target_loss"] > 0 and 0 <= m["eval_target_acc"] <= 1 and "eval_loss" in m
    assert any("eval_target_loss" in h for h in tr.state.log_history)


def test_sel_diagnostics_go_through_trainer_log(tmp_path):
    tr = selective(tmp_path, EX.mixture(32)[0].to_list(), EX.mixture(1)[1].to_list(), selector="ftw", max_steps=2)
    tr.train()
    logged = [h for h in tr.state.log_history if "loss" in h]
    assert len(logged) == 2 and all("sel_explained" in h and "sel_examples_trained" in h for h in logged)
    assert sum(v for k, v in logged[-1].items() if k.startswith("sel_source_")) == logged[-1]["sel_examples_trained"]


@pytest.mark.parametrize("user_collator", [False, True])
def test_rows_without_id_are_named_by_index_and_pretokenized_rows_train(tmp_path, user_collator):
    """Pre-tokenized rows (input_ids, labels), padded by fwsel or by the script's own collator."""
    from transformers import DataCollatorForSeq2Seq

    from fwsel.data.collate import Collator
    from fwsel.data.tokenizer import char_tokenizer

    tok = char_tokenizer()
    enc = Collator(tok, 64)
    rows = [dict(zip(("input_ids", "labels"), enc.encode(r)[:2])) for r in fixed_rows(8)]
    extra = {"data_collator": DataCollatorForSeq2Seq(tok, padding=True)} if user_collator else {}
    tr = selective(tmp_path, rows, selector="random", max_steps=1, budget=0.5, **extra)
    assert (tr.data_collator.inner is not None) == user_collator
    tr.train()
    (step,) = read(tmp_path)
    assert len(step["ids"]) == 4 and set(step["ids"]) <= set(range(8))


def test_bad_selector_input_is_one_clear_error():
    from fwsel.errors import ConfigError
    from fwsel.hf import build_selector, engine_config

    with pytest.raises(ConfigError, match="not one of fwsel's selector configs"):
        build_selector("nope")
    with pytest.raises(ConfigError, match=r"\['omp_tolerance'\] are not keys of selector 'ftw'"):
        build_selector("ftw", {"omp_tolerance": 1})
    with pytest.raises(ConfigError, match="geometry"):
        build_selector("ftw", {"geometry": "lbfgs"})
    assert build_selector("ftw_sgd").geometry == "sgd"  # a config built on another one
    with pytest.raises(ConfigError, match="engine.grad_path must be one of"):
        engine_config({"grad_path": "fast"}, 8)
    with pytest.raises(ConfigError, match=r"engine_kwargs \['chunk'\] are not keys"):
        engine_config({"chunk": 1}, 8)
    assert engine_config({}, 8).micro_batch_size == 8  # scored a per-device batch at a time


def test_a_non_adam_optimizer_scores_in_the_sgd_metric(tmp_path):
    tr = selective(tmp_path, EX.mixture(16)[0].to_list(), EX.mixture(1)[1].to_list(), selector="ftw", max_steps=1,
                   optim="sgd")
    with pytest.warns(UserWarning, match="SGD metric"):
        tr.train()
    assert tr._engine.metric == "sgd" and len(read(tmp_path)) == 1


def test_example_script_runs(tmp_path):
    res = EX.main([str(tmp_path), "--steps", "2"])
    assert res["eval_target_loss"] > 0 and sum(res["selected_per_source"].values()) > 0
    assert os.path.exists(tmp_path / "selected.jsonl")


@pytest.mark.slow  # ~6 s: a Trainer per selector config
def test_every_selector_config_runs_in_the_trainer(tmp_path):
    """Each of fwsel's selector configs, one step on a pool of 8 (k = 2; full: 8)."""
    names = sorted(p.stem for p in (ROOT / "conf" / "selector").glob("*.yaml"))
    rows, target = EX.mixture(8)[0].to_list(), EX.mixture(1)[1].to_list()
    for name in names:
        selective(tmp_path / name, rows, target, selector=name, max_steps=1).train()
        (step,) = read(tmp_path / name)
        assert 0 < len(step["ids"]) <= (8 if name == "full" else 2), name


def test_a_non_finite_row_is_dropped_from_the_weighted_backward(tmp_path, monkeypatch):
    """A row whose loss is NaN gets no zero weight (0 * NaN still poisons every gradient): the
    forward is redone without it and the step stays finite."""
    import fwsel.hf.trainer as hf_trainer

    real, calls = hf_trainer.sequence_losses, []

    def first_row_nan(model, batch, *a, **kw):
        out = real(model, batch, *a, **kw)
        calls.append(len(out.losses))
        if len(calls) == 1:  # the first forward of the update: row 0's loss is NaN (in the graph)
            poison = torch.ones_like(out.losses)
            poison[0] = float("nan")
            out.losses = out.losses * poison
        return out

    monkeypatch.setattr(hf_trainer, "sequence_losses", first_row_nan)
    tr = selective(tmp_path, fixed_rows(16), selector="random", max_steps=1, per_device_train_batch_size=16,
                   optim="sgd", max_grad_norm=0.0, learning_rate=0.1)
    before = params(tr.model)
    tr.train()
    after = params(tr.model)
    assert calls[:2] == [4, 3]  # the 4 chosen rows, then the 3 finite ones again
    assert torch.isfinite(after).all() and not torch.equal(after, before)
