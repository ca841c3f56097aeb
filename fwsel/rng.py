"""Named, stateless seeding: every random stream is a pure function of (seed, name, ...).

Pools, target batches, model init, dropout and selector randomness each get their own
generator, so evaluation, resume and rank sharding never shift another stream.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def _key(seed: int, name: str, *more: int) -> list[int]:
    return [int(seed) & 0xFFFFFFFF, zlib.crc32(name.encode()), *[int(m) & 0xFFFFFFFF for m in more]]


def np_rng(seed: int, name: str, *more: int) -> np.random.Generator:
    return np.random.default_rng(_key(seed, name, *more))


def int_seed(seed: int, name: str, *more: int) -> int:
    return int(np.random.SeedSequence(_key(seed, name, *more)).generate_state(1, np.uint64)[0] >> 1)


def torch_gen(seed: int, name: str, *more: int) -> "torch.Generator":
    import torch  # here only: reading data (export, compare) never loads torch

    g = torch.Generator()
    g.manual_seed(int_seed(seed, name, *more))
    return g
