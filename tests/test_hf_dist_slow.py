"""SelectiveTrainer under torchrun with 2 CPU ranks (gloo): per-rank selection, averaged updates
(tests/hf_dist_entry.py is the job)."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow

ENTRY = os.path.join(os.path.dirname(__file__), "hf_dist_entry.py")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_select_from_their_own_pools_and_stay_in_sync(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(_port()),
           ENTRY, str(tmp_path)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    p0, p1 = (torch.load(tmp_path / f"params.rank{r}.pt") for r in (0, 1))
    assert p0["world"] == 2 and torch.equal(p0["init"], p1["init"])
    assert torch.equal(p0["final"], p1["final"]) and not torch.equal(p0["init"], p0["final"])
    # plain SGD, no clipping: the step is -lr times the mean of the two ranks' own updates
    assert len(p0["local"]) == len(p1["local"]) == 3 and not torch.equal(p0["local"][0], p1["local"][0])
    expected = p0["init"] - p0["lr"] * sum((a + b) / 2 for a, b in zip(p0["local"], p1["local"]))
    torch.testing.assert_close(p0["final"], expected, atol=1e-6, rtol=0)
    sel = [[json.loads(x) for x in open(tmp_path / name)] for name in ("selected.jsonl", "selected.rank1.jsonl")]
    for a, b in zip(*sel):
        assert a["step"] == b["step"] and 0 < len(a["ids"]) <= 2 and 0 < len(b["ids"]) <= 2  # k = 0.25 * 8 per rank
        assert not set(a["ids"]) & set(b["ids"])  # each rank's pool is its own share of the data
    assert [r["step"] for r in sel[0]] == [1, 2, 3]
