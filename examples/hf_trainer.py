"""A plain `transformers.Trainer` script with FTW selection: offline, a tiny Llama, a task mixture.

    python examples/hf_trainer.py [OUT_DIR] [--steps 20] [--selector ftw] [--lora]

The changes against the same script on a plain Trainer are marked `# fwsel`. The mixture is
fwsel's embedded one (the `key` digit-mapping task is the target; related, noisy, irrelevant and
duplicate rows around it): replace `mixture()` with your own rows, in any of fwsel's formats
(prompt/response, messages, instruction/output, text) with optional `id` and `source` columns.
"""

from __future__ import annotations

import sys

from transformers import TrainingArguments

from fwsel.data.tokenizer import char_tokenizer
from fwsel.hf import SelectiveTrainer  # fwsel
from fwsel.hf.demo import example_args, mixture, report, tiny_model


def main(argv=None) -> dict:
    a = example_args(__doc__.splitlines()[0], "outputs/hf_trainer", argv)
    tok = char_tokenizer()
    train, target, target_eval = mixture(32 * a.steps, a.seed)
    args = TrainingArguments(output_dir=a.out, max_steps=a.steps, per_device_train_batch_size=32, learning_rate=3e-3,
                             lr_scheduler_type="constant", logging_steps=5, save_strategy="no", report_to=[],
                             use_cpu=True, seed=a.seed, disable_tqdm=True)
    trainer = SelectiveTrainer(model=tiny_model(tok, a.seed, a.lora), args=args, train_dataset=train,
                               processing_class=tok,
                               target_dataset=target, target_eval_dataset=target_eval,  # fwsel
                               selector=a.selector, budget=a.budget)  # fwsel
    trainer.train()
    return report(trainer, a.out)  # target metrics and rows trained per source


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
