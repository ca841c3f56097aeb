"""The prefilter signal: TracIn on the output head, from one no-grad forward."""

from test_grads import relerr

from fwsel.grads.prefilter import head_alignment

from helpers_models import oracle_grads, random_batch, tiny_model


def test_head_alignment_is_tracin_on_the_output_head():
    model = tiny_model()  # untied head, float64
    pool, target = random_batch(5, seed=3), random_batch(3, seed=4, max_len=9)
    head = [model.get_output_embeddings().weight]
    G, _ = oracle_grads(model, pool, head)
    gT = oracle_grads(model, target, head)[0].mean(0)
    a = head_alignment(model, pool, target, chunk_tokens=7)  # several chunks, rows split across them
    assert relerr(a, G @ gT) <= 1e-10 and not any(p.grad is not None for p in model.parameters())


def test_prefilter_shortlists_the_pool_and_refuses_a_bad_fraction(tmp_path, monkeypatch, capsys):
    from fwsel import loop

    from helpers_runs import FAST, run_cli

    seen = []
    orig = loop.Trainer.score
    def score(self, t, rows, need):
        seen.append(len(rows))
        return orig(self, t, rows, need)

    monkeypatch.setattr(loop.Trainer, "score", score)
    run = ["train", *FAST, "selector=tracin", "steps=2", "budget=0.25"]
    code, _ = run_cli([*run, "selector.prefilter_keep=0.5", f"hydra.run.dir={tmp_path}/a"])
    assert code == 0 and seen == [8, 8]  # N = 16 rows, half of them scored by gradients
    code, _ = run_cli([*run, "selector.prefilter_keep=0.1", f"hydra.run.dir={tmp_path}/b"])
    assert code == 0 and seen[2:] == [4, 4]  # never fewer than k = 4
    code, out = run_cli([*run, "selector.prefilter_keep=1.5", f"hydra.run.dir={tmp_path}/c"], capsys)
    assert code == 1 and "Traceback" not in out
    assert ("selector.prefilter_keep must be null or a fraction in (0, 1], got 1.5 "
            "(nothing started: no run dir kept)") in out
    assert not (tmp_path / "c").exists() and seen[4:] == []  # refused with the config checks, before any step
