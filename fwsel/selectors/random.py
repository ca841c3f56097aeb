"""`random`: k of the N candidates uniformly (seeded), uniform weights."""

import torch

from fwsel.selectors.base import Pool, Selection, Selector, uniform


class RandomSelector(Selector):
    name = "random"

    def select(self, pool: Pool) -> Selection:
        perm = torch.randperm(len(pool.rows), generator=pool.rng)
        return uniform(perm[: pool.k].tolist())
