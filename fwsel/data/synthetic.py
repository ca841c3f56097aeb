"""The embedded task-mixture stream: generated in code, endless, offline.

Sources (each row tagged): `target` (2-digit addition, the task the target set measures),
`related` (easier additions in the same format: they teach the same carries), `noisy`
(target-format rows with wrong answers: by default the true sum's digits reversed, a
systematic error a model can learn and that costs it target loss; `random` wrong sums mostly
teach the answers' digit distribution and hurt far less), `irrelevant` (reverse a word), and
`duplicate` (a handful of target rows repeated: redundancy a selector can win or lose on).
Row `(t, pos)` is a pure function of `(seed, t, pos)`, so any pool, shard or exported id
can be regenerated without replaying the stream.
"""

from __future__ import annotations

import string

import numpy as np

from fwsel.rng import np_rng

SOURCES = ("target", "related", "noisy", "irrelevant", "duplicate")
LO, HI = 10, 100  # target operands: 2-digit numbers
NOISY_MODES = ("reversed", "random")


def _add(a: int, b: int) -> tuple[str, str]:
    return f"{a}+{b}=", f"{a + b}"


def _all_pairs() -> np.ndarray:
    a, b = np.meshgrid(np.arange(LO, HI), np.arange(LO, HI), indexing="ij")
    return np.stack([a.ravel(), b.ravel()], 1)


class TargetSplit:
    """Fixed select/eval split of the target task, from `split_seed` alone."""

    def __init__(self, split_seed: int, select_size: int, eval_size: int) -> None:
        pairs = _all_pairs()[np_rng(split_seed, "target-split").permutation(len(_all_pairs()))]
        if select_size + eval_size > len(pairs) // 2:
            raise ValueError(f"target.select_size + target.eval_size must be <= {len(pairs) // 2}")
        self.select_pairs = pairs[:select_size]
        self.eval_pairs = pairs[select_size:select_size + eval_size]
        self.eval_keys = {(int(a), int(b)) for a, b in self.eval_pairs}
        self.select = [self._row(f"target-select:{i}", a, b) for i, (a, b) in enumerate(self.select_pairs)]
        self.eval = [self._row(f"target-eval:{i}", a, b) for i, (a, b) in enumerate(self.eval_pairs)]

    @staticmethod
    def _row(rid: str, a: int, b: int) -> dict:
        p, r = _add(int(a), int(b))
        return {"id": rid, "source": "target", "prompt": p, "response": r}


class SyntheticStream:
    """Endless stream; `pool(t, n)` is a pure function of (seed, t)."""

    known_size = None  # endless

    def __init__(self, seed: int, mixture: dict, n_duplicates: int, target: TargetSplit,
                 noisy_mode: str = "reversed") -> None:
        if noisy_mode not in NOISY_MODES:
            raise ValueError(f"data.noisy_mode must be one of {'|'.join(NOISY_MODES)}, got {noisy_mode!r}")
        self.seed, self.noisy_mode = int(seed), noisy_mode
        self.target = target
        names = list(mixture)
        unknown = set(names) - set(SOURCES)
        if unknown:
            raise ValueError(f"data.mixture has unknown sources {sorted(unknown)}; allowed: {list(SOURCES)}")
        p = np.array([float(mixture[s]) for s in names])
        if (p < 0).any() or p.sum() <= 0:
            raise ValueError("data.mixture shares must be >= 0 with a positive sum")
        self.names, self.probs = names, p / p.sum()
        rng = np_rng(0, "duplicates")  # the repeated rows are fixed for every seed
        self.dups = [self._target_pair(rng) for _ in range(max(1, int(n_duplicates)))]

    def _target_pair(self, rng) -> tuple[int, int]:
        while True:  # eval rows never occur verbatim in the stream
            a, b = (int(x) for x in rng.integers(LO, HI, 2))
            if (a, b) not in self.target.eval_keys:
                return a, b

    def row(self, t: int, pos: int) -> dict:
        rng = np_rng(self.seed, "pool", t, pos)
        src = self.names[int(rng.choice(len(self.names), p=self.probs))]
        if src == "target":
            p, r = _add(*self._target_pair(rng))
        elif src == "duplicate":
            p, r = _add(*self.dups[int(rng.integers(len(self.dups)))])
        elif src == "noisy":
            a, b = (int(x) for x in rng.integers(LO, HI, 2))
            p, r = _add(a, b)
            if self.noisy_mode == "reversed" and r[::-1] != r:  # palindromic sums fall through to random
                r = r[::-1]
            else:
                wrong = int(rng.integers(2 * LO, 2 * HI - 1))
                r = str(wrong if wrong != a + b else wrong + 1)
        elif src == "related":
            a, b = int(rng.integers(0, 10)), int(rng.integers(0, HI))
            p, r = _add(*((a, b) if rng.random() < 0.5 else (b, a)))
        else:  # irrelevant
            w = "".join(rng.choice(list(string.ascii_lowercase), int(rng.integers(3, 8))))
            p, r = f"rev {w}=", w[::-1]
        return {"id": f"{self.seed}:{t}:{pos}", "source": src, "prompt": p, "response": r}

    def pool(self, t: int, n: int) -> list[dict]:
        return [self.row(t, pos) for pos in range(n)]

    def lookup(self, rid: str) -> dict:
        seed, t, pos = (int(x) for x in rid.split(":"))
        if seed != self.seed:
            raise ValueError(f"row id {rid!r} belongs to seed {seed}, not {self.seed}")
        return self.row(t, pos)
