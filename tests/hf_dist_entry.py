"""SelectiveTrainer under torchrun (2 CPU ranks, gloo): the job test_hf_dist_slow.py launches.

    torchrun --nproc_per_node=2 tests/hf_dist_entry.py OUT_DIR
Each rank saves its final parameters to OUT_DIR/params.rank<r>.pt.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from test_hf import EX, selective  # noqa: E402

out = sys.argv[1]
tr = selective(out, EX.mixture(96)[0].to_list(), EX.mixture(1)[1].to_list(), selector="ftw", max_steps=3,
               ddp_backend="gloo")
init = torch.cat([p.detach().reshape(-1).clone() for p in tr.model.parameters()])
tr.train()
rank = tr.args.process_index
final = torch.cat([p.detach().reshape(-1) for p in tr.model.parameters()])
torch.save({"init": init, "final": final, "world": tr.args.world_size}, os.path.join(out, f"params.rank{rank}.pt"))
