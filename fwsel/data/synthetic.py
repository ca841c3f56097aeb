"""The embedded task-mixture stream: generated in code, endless, offline.

Sources (each row tagged): `target` (the task the target set measures), `related` (the
same rule on shorter inputs: helpful), `noisy` (target-format rows with wrong answers: by
default the true answer's digits reversed, a consistent wrong rule a model can learn and that
costs it target loss; `random` wrong answers mostly teach the answers' digit distribution and
hurt far less), `irrelevant` (reverse a word), and `duplicate` (a handful of target rows
repeated: redundancy a selector can win or lose on).

Two target tasks (`data.task`): `key` (the default: map each of four digits through a fixed
key, `key 4821=` -> `0168`, which the tiny model learns within the default run) and `add`
(2-digit addition, `47+85=` -> `132`, which it does not: its runs measure early format
learning). Row `(t, pos)` is a pure function of `(seed, t, pos)`, so any pool, shard or
exported id can be regenerated without replaying the stream.
"""

from __future__ import annotations

import string

import numpy as np

from fwsel.rng import np_rng

SOURCES = ("target", "related", "noisy", "irrelevant", "duplicate")
LO, HI = 10, 100  # add: target operands are 2-digit numbers
KEY = "3869027415"  # key: digit d -> KEY[d]
KEY_LEN = 4  # key: target inputs have this many digits
NOISY_MODES = ("reversed", "random")
TASKS = ("key", "add")


class AddTask:
    """2-digit addition; inputs are operand pairs (a, b)."""

    def universe(self) -> np.ndarray:
        a, b = np.meshgrid(np.arange(LO, HI), np.arange(LO, HI), indexing="ij")
        return np.stack([a.ravel(), b.ravel()], 1)

    def key(self, x) -> tuple:
        return int(x[0]), int(x[1])

    def draw(self, rng) -> tuple:
        return tuple(int(v) for v in rng.integers(LO, HI, 2))

    def text(self, x) -> tuple[str, str]:
        return f"{x[0]}+{x[1]}=", f"{x[0] + x[1]}"

    def random_wrong(self, x, rng) -> str:
        wrong = int(rng.integers(2 * LO, 2 * HI - 1))
        return str(wrong if wrong != x[0] + x[1] else wrong + 1)

    def related(self, rng) -> tuple[str, str]:
        a, b = int(rng.integers(0, 10)), int(rng.integers(0, HI))
        return self.text((a, b) if rng.random() < 0.5 else (b, a))


class KeyTask:
    """Each digit through a fixed key; inputs are digit strings."""

    def universe(self) -> np.ndarray:
        return np.array([f"{i:0{KEY_LEN}d}" for i in range(10**KEY_LEN)])

    def key(self, x) -> str:
        return str(x)

    def draw(self, rng) -> str:
        return "".join(str(int(d)) for d in rng.integers(0, 10, KEY_LEN))

    def text(self, x) -> tuple[str, str]:
        return f"key {x}=", "".join(KEY[int(d)] for d in x)

    def random_wrong(self, x, rng) -> str:
        right = self.text(x)[1]
        while True:
            wrong = self.text(self.draw(rng))[1]
            if wrong != right:
                return wrong

    def related(self, rng) -> tuple[str, str]:
        return self.text("".join(str(int(d)) for d in rng.integers(0, 10, int(rng.integers(1, KEY_LEN)))))


def make_task(name: str):
    if name not in TASKS:
        raise ValueError(f"data.task must be one of {'|'.join(TASKS)}, got {name!r}")
    return KeyTask() if name == "key" else AddTask()


class TargetSplit:
    """Fixed select/eval split of the target task, from `split_seed` alone."""

    def __init__(self, split_seed: int, select_size: int, eval_size: int, task: str = "add") -> None:
        self.task = make_task(task)
        universe = self.task.universe()
        inputs = universe[np_rng(split_seed, "target-split").permutation(len(universe))]
        if select_size + eval_size > len(inputs) // 2:
            raise ValueError(f"target.select_size + target.eval_size must be <= {len(inputs) // 2}")
        self.select_inputs = inputs[:select_size]
        self.eval_inputs = inputs[select_size:select_size + eval_size]
        self.eval_keys = {self.task.key(x) for x in self.eval_inputs}
        self.select = [self._row(f"target-select:{i}", x) for i, x in enumerate(self.select_inputs)]
        self.eval = [self._row(f"target-eval:{i}", x) for i, x in enumerate(self.eval_inputs)]

    def _row(self, rid: str, x) -> dict:
        p, r = self.task.text(self.task.key(x))
        return {"id": rid, "source": "target", "prompt": p, "response": r}


class SyntheticStream:
    """Endless stream; `pool(t, n)` is a pure function of (seed, t). The task is the split's."""

    known_size = None  # endless

    def __init__(self, seed: int, mixture: dict, n_duplicates: int, target: TargetSplit,
                 noisy_mode: str = "reversed") -> None:
        if noisy_mode not in NOISY_MODES:
            raise ValueError(f"data.noisy_mode must be one of {'|'.join(NOISY_MODES)}, got {noisy_mode!r}")
        self.seed, self.noisy_mode = int(seed), noisy_mode
        self.target, self.task = target, target.task
        names = list(mixture)
        unknown = set(names) - set(SOURCES)
        if unknown:
            raise ValueError(f"data.mixture has unknown sources {sorted(unknown)}; allowed: {list(SOURCES)}")
        p = np.array([float(mixture[s]) for s in names])
        if (p < 0).any() or p.sum() <= 0:
            raise ValueError("data.mixture shares must be >= 0 with a positive sum")
        self.names, self.probs = names, p / p.sum()
        rng = np_rng(0, "duplicates")  # the repeated rows are fixed for every seed
        self.dups = [self._target_input(rng) for _ in range(max(1, int(n_duplicates)))]

    def _target_input(self, rng):
        while True:  # eval rows never occur verbatim in the stream
            x = self.task.draw(rng)
            if x not in self.target.eval_keys:
                return x

    def row(self, t: int, pos: int) -> dict:
        rng = np_rng(self.seed, "pool", t, pos)
        src = self.names[int(rng.choice(len(self.names), p=self.probs))]
        if src == "target":
            p, r = self.task.text(self._target_input(rng))
        elif src == "duplicate":
            p, r = self.task.text(self.dups[int(rng.integers(len(self.dups)))])
        elif src == "noisy":
            x = self.task.draw(rng)
            p, r = self.task.text(x)
            if self.noisy_mode == "reversed" and r[::-1] != r:  # palindromic answers fall through to random
                r = r[::-1]
            else:
                r = self.task.random_wrong(x, rng)
        elif src == "related":
            p, r = self.task.related(rng)
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
