"""Offline by construction: hub/dataset/wandb switches off, non-loopback sockets refused."""

import os
import socket

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "disabled"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.pop("HYDRA_FULL_ERROR", None)
os.environ["COLUMNS"] = "400"  # rich wraps log lines at 80 columns off a terminal; keep each message on one line

_connect = socket.socket.connect


def _guarded_connect(self, address):
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and not (host.startswith("127.") or host in ("localhost", "::1") or host.startswith("/")):
        raise RuntimeError(f"tests must not use the network (tried to connect to {address!r})")
    return _connect(self, address)


socket.socket.connect = _guarded_connect


@pytest.fixture(autouse=True, scope="session")
def _torch_threads_session():
    """One torch thread before any module-scoped fixture trains (a run and its resume must share
    the thread count to be bit-exact; run alone, a module's fixture ran at the default count)."""
    import torch

    torch.set_num_threads(1)
    yield


@pytest.fixture(autouse=True)
def _torch_threads():
    import torch

    torch.set_num_threads(1)
    yield


from helpers_real import tiny_ckpts  # noqa: E402,F401 - session fixture: tiny Llama/Qwen3 checkpoints on disk
