"""Selection inside `transformers.Trainer` and TRL's `SFTTrainer`: `SelectiveTrainer`, `SelectionMixin`.

A few changed lines in a Trainer script (README "Use it from your Trainer"):

    from fwsel.hf import SelectiveTrainer
    trainer = SelectiveTrainer(model=model, args=args, train_dataset=rows, processing_class=tok,
                               target_dataset=target_rows, selector="ftw", budget=0.25)

or `class MySFT(SelectionMixin, SFTTrainer)` for any Trainer subclass. What one optimizer step does:

* the pool is what the Trainer's loop fetched for that step on this device: its
  `gradient_accumulation_steps` micro-batches, `N = per_device_train_batch_size * accumulation`
  rows (so accumulation 2 over batches of 8 selects exactly as one batch of 16); the engine scores
  it in micro-batches of `per_device_train_batch_size` rows, so memory stays per micro-batch
  except for the per-sample gradient products;
* the selector keeps `k = round(budget * N)` rows with mean-1 weights and the engine writes the
  one-pass weighted update `(1/|S|) sum_S w_i g_i` (g_i: row i's mean-token loss) into `.grad`
  inside the Trainer's own `training_step`; the Trainer then clips, steps its optimizer and
  scheduler, and runs its callbacks as usual. Selectors that score nothing (`random`, `full`) or
  only losses (`maxloss`) get one weighted backward over the chosen rows instead;
* the AdamW geometry reads the Trainer's optimizer state; another optimizer falls back to the SGD
  metric with a warning.

Several processes (torchrun / accelerate): selection is per rank. Each rank selects from its
own pool (its own batches) and the ranks' updates are averaged, as DDP averages gradients; rank
r writes `selected.jsonl` (rank 0) or `selected.rank<r>.jsonl`, and the logged diagnostics are
rank 0's. The CLI's global selection over every rank's rows is not what this does.

Differences from a plain Trainer to know: the loss is the mean over rows of each row's
mean-token loss (the Trainer's default is a token mean over the batch; they agree when rows
have equal supervised lengths), and a step whose selector chooses no row makes no update.
"""

from fwsel.hf.configs import build_selector, engine_config, group_config
from fwsel.hf.rows import RowCollator
from fwsel.hf.trainer import SelectionMixin, SelectiveTrainer, selections

__all__ = ["RowCollator", "SelectionMixin", "SelectiveTrainer", "build_selector", "engine_config", "group_config",
           "selections"]
