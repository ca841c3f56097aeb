"""SelectiveTrainer under torchrun (2 CPU ranks, gloo): the job test_hf_dist_slow.py launches.

    torchrun --nproc_per_node=2 tests/hf_dist_entry.py OUT_DIR
3 plain SGD steps (no clipping) of ftw; each rank saves its initial and final parameters and the
update it formed from its own pool at each step (before the ranks average) to OUT_DIR/params.rank<r>.pt.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from test_hf import EX, selective  # noqa: E402

from fwsel.hf import SelectionMixin  # noqa: E402

local = []
update = SelectionMixin._update


def keep_local_update(self, *args):
    """This rank's own update: `_update` runs inside the averaging block, before the all-reduce."""
    loss = update(self, *args)
    local.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).clone()
                            for p in self.model.parameters() if p.requires_grad]))
    return loss


SelectionMixin._update = keep_local_update
out = sys.argv[1]
tr = selective(out, EX.mixture(96)[0].to_list(), EX.mixture(1)[1].to_list(), selector="ftw", max_steps=3,
               ddp_backend="gloo", optim="sgd", learning_rate=0.05, max_grad_norm=0.0)
init = torch.cat([p.detach().reshape(-1).clone() for p in tr.model.parameters()])
tr.train()
rank = tr.args.process_index
final = torch.cat([p.detach().reshape(-1) for p in tr.model.parameters()])
torch.save({"init": init, "final": final, "world": tr.args.world_size, "local": local, "lr": 0.05},
           os.path.join(out, f"params.rank{rank}.pt"))
