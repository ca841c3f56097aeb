"""A second task mixture for the convergence benchmark, written as JSONL for `data=jsonl`.

Target task: sort four distinct letters (`sort cadb=` -> `abcd`). Sources mirror the embedded
stream so the comparison reads the same way: `related` (sort three letters: helpful),
`noisy` (target format sorted the wrong way round: a systematic, harmful error),
`irrelevant` (2-digit additions: another task), `duplicate` (four target rows repeated).
Deterministic from the seed; target rows never occur in the stream.

    python benchmarks/mixtures.py OUT_DIR [--rows 16000]   # writes OUT_DIR/train.jsonl, target.jsonl
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np

LETTERS = "abcdefgh"
MIXTURE = {"target": 0.1, "related": 0.2, "noisy": 0.2, "irrelevant": 0.3, "duplicate": 0.2}


def _row(source: str, word: str, answer: str) -> dict:
    return {"prompt": f"sort {word}=", "response": answer, "source": source}


def write_sort_mixture(out: str | Path, rows: int = 16000, target_rows: int = 320, seed: int = 0) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    words = ["".join(p) for p in itertools.permutations(LETTERS, 4)]
    order = rng.permutation(len(words))
    held = [words[i] for i in order[:target_rows]]  # the target set (select + eval), never streamed
    pool = [words[i] for i in order[target_rows:]]
    dups = [pool[i] for i in rng.choice(len(pool), 4, replace=False)]
    names, probs = list(MIXTURE), np.array(list(MIXTURE.values()))
    with open(out / "target.jsonl", "w") as f:
        for w in held:
            f.write(json.dumps(_row("target", w, "".join(sorted(w)))) + "\n")
    with open(out / "train.jsonl", "w") as f:
        for src in rng.choice(names, rows, p=probs / probs.sum()):
            if src in ("target", "noisy", "duplicate"):
                w = dups[rng.integers(4)] if src == "duplicate" else pool[rng.integers(len(pool))]
                f.write(json.dumps(_row(src, w, "".join(sorted(w, reverse=src == "noisy")))) + "\n")
            elif src == "related":
                w = "".join(rng.choice(list(LETTERS), 3, replace=False))
                f.write(json.dumps(_row(src, w, "".join(sorted(w)))) + "\n")
            else:
                a, b = (int(x) for x in rng.integers(10, 100, 2))
                f.write(json.dumps({"prompt": f"{a}+{b}=", "response": str(a + b), "source": src}) + "\n")
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--rows", type=int, default=16000)
    a = p.parse_args()
    print(write_sort_mixture(a.out, a.rows))
