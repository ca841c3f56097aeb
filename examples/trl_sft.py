"""TRL's `SFTTrainer` with FTW selection through `SelectionMixin`: offline, a tiny Llama, a task mixture.

    pip install -e '.[trl]'
    python examples/trl_sft.py [OUT_DIR] [--steps 20] [--selector ftw] [--lora]

The changes against the same script on a plain SFTTrainer are marked `# fwsel`. TRL tokenizes
the rows (here its prompt/completion format, loss on the completion only); `id` and `source`
columns ride along to selected.jsonl and the per-source counts. Target rows may be in TRL's
prompt/completion format too (fwsel reads prompt/response, prompt/completion, messages, ...).
"""

from __future__ import annotations

import sys

from trl import SFTConfig, SFTTrainer

from fwsel.data.tokenizer import char_tokenizer
from fwsel.hf import SelectionMixin  # fwsel
from fwsel.hf.demo import as_trl, example_args, mixture, report, tiny_model


class SelectiveSFT(SelectionMixin, SFTTrainer):  # fwsel
    """SFTTrainer that trains each step on the rows FTW keeps."""


def main(argv=None) -> dict:
    a = example_args(__doc__.splitlines()[0], "outputs/trl_sft", argv)
    tok = char_tokenizer()
    train, target, target_eval = mixture(32 * a.steps, a.seed, convert=as_trl)
    args = SFTConfig(output_dir=a.out, max_steps=a.steps, per_device_train_batch_size=32, learning_rate=3e-3,
                     lr_scheduler_type="constant", logging_steps=5, save_strategy="no", report_to=[], use_cpu=True,
                     seed=a.seed, disable_tqdm=True, max_length=64)
    trainer = SelectiveSFT(model=tiny_model(tok, a.seed, a.lora), args=args, train_dataset=train, processing_class=tok,
                           target_dataset=target, target_eval_dataset=target_eval,  # fwsel
                           selector=a.selector, budget=a.budget)  # fwsel
    trainer.train()
    return report(trainer, a.out)  # target metrics and rows trained per source


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
