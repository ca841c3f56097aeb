"""`fwsel` under torchrun with a fault injected: FWSEL_TEST_FAIL="<rank>:<step>" makes that rank
raise inside that training step (1-based) on the group's first attempt. A test helper only."""

import os
import sys

from fwsel.cli import main
from fwsel.loop import Trainer

rank, step = (int(x) for x in os.environ["FWSEL_TEST_FAIL"].split(":"))
orig = Trainer.train_step


def train_step(self, t):
    first = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if first and self.comm.rank == rank and t + 1 == step:
        raise RuntimeError(f"injected failure on rank {rank} at step {step}")
    return orig(self, t)


Trainer.train_step = train_step
sys.exit(main())
