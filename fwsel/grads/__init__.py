"""fwsel.grads: exact per-sample gradient products for data selection (docs/method.md#per-sample-gradient-products).

Imports only torch, numpy, transformers and peft (no hydra, datasets or wandb), so the GPU
scripts can use it on a bare image.

Typical training step::

    engine = GradEngine(model, optimizer, metric="adam")          # once; hooks stay registered
    scores = engine.score(pool_batch, target_batch, extra_dirs=(), k=k)
    indices, weights = selector(scores)                           # weights: mean 1
    engine.apply_update(indices, weights)                         # writes .grad, no extra pass
    clip_grad_norm_(...); optimizer.step(); scheduler.step()

Batches are dicts of `input_ids`, `attention_mask`, `labels` (aligned with `input_ids`, -100
where unsupervised, right-padded); pool and target may differ in width. `model` is a
transformers causal LM, plain or peft-LoRA-wrapped.

* `sequence_losses(model, batch, chunk_tokens=4096, with_correct=False, on_chunk=None)` ->
  `LossOut(losses, n_tokens, correct)`: per-row mean-token cross-entropy from one decoder
  pass and a head applied in chunks of supervised tokens (float32 for half models). Raises
  `ValueError` for a row with no supervised token. Note: it calls the decoder body and the
  output head, not the top-level module (a forward counter belongs on the decoder).
* `GradEngine.score(...)` -> `Scores`: `K = <g_i, M g_j>`, `b[:, 0] = <g_i, M g_T>` (g_T: the
  mean target gradient) and one column per extra direction (`"momentum"`: u = AdamW's
  exp_avg; `"decay"`: u = M^-1 theta, i.e. the column is `<g_i, theta>`), `y2`, `dir_gram`,
  losses, squared norms, a `finite` mask (non-finite candidates get zero rows and are never
  updated), Adam's `poor_frac` and the `aux` metrics. All on the CPU in float64. `g_i` is the
  gradient of row i's mean-token loss.
* `GradEngine.apply_update(indices, weights)`: adds `(1/|S|) sum w_i g_i` to `.grad` of the
  captured parameters from the kept per-sample gradients; embeddings and norms (row-wise
  modules owning their weights) from their kept inputs and output gradients, by a closed form
  once it has matched a re-run of the module alone on the selected rows (fwsel.grads.local);
  only what remains (a weight tied to the head) gets one
  weighted backward over the selected rows. It does not clip or step. Scoring itself never
  touches `.grad` (gradient accumulation is safe).

Metric `M`: `sgd` (identity), `adam` (the linearised AdamW diagonal `D` from the live
`torch.optim.AdamW` state; `adam_q` = pool | state | taylor picks the frozen second moment),
`adam2` (`D**2`).

What is captured: every trainable `nn.Linear` — peft's `lora_A`/`lora_B` (LoRA scaling and
dropout masks are inside what the hooks see), or in full fine-tuning every Linear including
an untied `lm_head`. Embeddings, norms and a head tied to the embedding are NOT in `K`/`b`
(they train through the update only: `cap.fallback`). DoRA and other LoRA variants, merged or
disabled adapters and LoRA on embeddings raise `ValueError`. Gradient checkpointing must be
non-reentrant (reentrant raises): a captured layer's input is a saved tensor of the capture
hook, so checkpointing drops it after the forward and recomputes it in backward like the
layer's own activations (the memory saving holds), and recomputed forwards are not captured twice.

What is formed (`products=`, a `fwsel.grads.needs.Product` or names): `k` (the Gram; its
diagonal gives the squared norms), `sq_norms` alone (one fused pass, no Gram), `b`, `y2`,
`nonzero` (`Scores.nonzero`, which rows have `g_i != 0`: `b_i != 0`, the rest by their norms).
A selector that reads only `b` and the non-zero mask (TracIn) costs no Gram and no norm pass;
in sgd geometry a row's finiteness then comes from its `b` (a NaN entry makes it NaN).

Two product paths per captured Linear (`grad_path`, fwsel.grads.ghost has the cost model):
materialise (the per-sample gradients as a `[N + v, P]` buffer, float32 or float64 for float64
models, until the update; exact in every metric) or token Gram (keeps each row's layer inputs
and output gradients; `K` from `(X_i X_j^T) ⊙ (E_i E_j^T)` in token chunks, `b` exact through
`M ⊙ g_T`, the update as one `E_S^T diag(w) X_S`). `auto` (default) takes the token Gram where it
is cheaper and exact (sgd metrics); `ghost` forces it, and in adam geometry its `K` then uses a
rank-1 `D` with `adam_q=state` on those layers (approximate, logged, `Scores.ghost`); with
`ghost_b="rank1"` their `b` and `y2` come from the same rank-1 Gram against the target rows
(cheaper: no `g_T`, no dot-product pass over the pool tokens; approximate like `K` there).

`fwsel.grads.prefilter.head_alignment(model, pool, target)`: TracIn on the output head alone
from one no-grad forward, the signal of the loop's `selector.prefilter_keep` shortlist.

Building one: `fwsel.grads.dist.build_engine(cfg.engine, needs, model, optimizer)` from the
`engine:` config group (how to compute) and a selector's `fwsel.grads.needs.EngineNeeds` (the
metric, the products it reads, aux metrics). It returns a `ShardedEngine` (each rank scores a
shard, rows are gathered, the update parts all-reduced) when the process group has several
ranks or `engine.projection_dim` is set (fwsel.grads.project); that one materialises every
layer (token-Gram factors are not gathered across ranks).
"""

from .engine import GradEngine, Scores
from .loss import LossOut, sequence_losses

__all__ = ["GradEngine", "Scores", "LossOut", "sequence_losses"]
