"""Target evaluation: mean per-sample loss and exact match (teacher-forced argmax) on `eval`."""

from __future__ import annotations

import torch

from fwsel.grads.loss import sequence_losses


@torch.no_grad()
def evaluate(model, collate, rows: list[dict], device, chunk_tokens: int, batch_rows: int = 64) -> dict:
    was_training = model.training
    model.eval()  # no dropout: evaluation draws nothing from the training RNG
    losses, correct = [], []
    try:
        for i in range(0, len(rows), batch_rows):
            batch = {k: v.to(device) for k, v in collate(rows[i:i + batch_rows]).items()}
            out = sequence_losses(model, batch, chunk_tokens=chunk_tokens, with_correct=True)
            losses.append(out.losses.double().cpu())
            correct.append(out.correct.cpu())
    finally:
        model.train(was_training)
    return {"target_eval_loss": torch.cat(losses).mean().item(),
            "target_eval_acc": torch.cat(correct).double().mean().item()}
