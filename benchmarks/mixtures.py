"""Task mixtures for the benchmark suite, written as JSONL for `data=jsonl`.

Every family has the five sources of the embedded stream, so the tables read the same way:
`target` (the task the target set measures), `related` (the same rule on shorter inputs:
helpful), `noisy` (target-format rows that follow a CONSISTENT WRONG RULE: systematic
mislabels, the realistic and hard case), `irrelevant` (another task in another format), and
`duplicate` (four target rows repeated). Target rows (select + eval) never occur in the
stream, not even with a wrong answer. Everything is a pure function of the seed.

- `sort`: sort four of eight letters (`sort cadb=` -> `abcd`); noisy: sorted the wrong way round.
- `shift`: move each of four letters one on in the alphabet (`shift abcz=` -> `bcda`); noisy:
  two on (`cdeb`), the same format and length, every letter wrong.
- `reverse`: reverse five letters (`rev abcde=` -> `edcba`); noisy: rotate left by one
  (`bcdea`), the letters right, their order wrong.
- `cipher`: replace each of four digits through a fixed table (`enc 4821=` -> `9452`); noisy:
  the last digit through a second table, the first three right (a near miss: early in training
  its gradient is almost a target row's).

`SUITE` names the benchmark suite's mixtures: a family (or the embedded stream) and where the
model starts: `scratch` (the tiny model's random init) or `ckpt`, a checkpoint first trained on
a broad, unselected mix of every family's rows and the embedded stream's (`write_pretrain`,
made once, seeded, under the git-ignored `benchmarks/data/`), so that selection there is
about content, not format. `suite_overrides(name)` makes what a mixture needs and returns
its `fwsel train` overrides.

    python benchmarks/mixtures.py OUT_DIR [--family sort] [--rows 16000]   # OUT_DIR/train.jsonl, target.jsonl
    python benchmarks/mixtures.py --overrides shift     # prints the overrides (makes data and checkpoint first)
"""

from __future__ import annotations

import argparse
import json
import os
import string
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MIXTURE = {"target": 0.1, "related": 0.2, "noisy": 0.2, "irrelevant": 0.3, "duplicate": 0.2}
LOWER = string.ascii_lowercase
CIPHER = "7305918264"  # digit d -> CIPHER[d]
CIPHER_WRONG = "2817364059"  # the noisy rows' table for the last digit (differs from CIPHER on every digit)


def _letters(rng, n: int, alphabet: str = LOWER, distinct: bool = False) -> str:
    return "".join(rng.choice(list(alphabet), n, replace=not distinct))


def _digits(rng, n: int) -> str:
    return "".join(str(int(d)) for d in rng.integers(0, 10, n))


def _shift(w: str, k: int) -> str:
    return "".join(LOWER[(LOWER.index(c) + k) % 26] for c in w)


def _add(rng) -> tuple[str, str]:
    a, b = (int(x) for x in rng.integers(10, 100, 2))
    return f"{a}+{b}=", str(a + b)


def _rev(rng) -> tuple[str, str]:
    w = _letters(rng, int(rng.integers(3, 7)))
    return f"rev {w}=", w[::-1]


@dataclass(frozen=True)
class Family:
    """A target rule, a consistent wrong rule in the same format, and the other sources."""

    op: str  # the prompt's tag: `<op> <input>=`
    word: Callable  # rng -> a target input
    right: Callable[[str], str]
    wrong: Callable[[str], str]
    related: Callable  # rng -> a shorter input (the right rule applies)
    irrelevant: Callable  # rng -> (prompt, response) in another format

    def row(self, source: str, w: str, rule: Callable[[str], str] | None = None) -> dict:
        return {"prompt": f"{self.op} {w}=", "response": (rule or self.right)(w), "source": source}


FAMILIES = {
    "sort": Family("sort", lambda r: _letters(r, 4, "abcdefgh", distinct=True), lambda w: "".join(sorted(w)),
                   lambda w: "".join(sorted(w, reverse=True)), lambda r: _letters(r, 3, "abcdefgh", distinct=True),
                   _add),
    "shift": Family("shift", lambda r: _letters(r, 4), lambda w: _shift(w, 1), lambda w: _shift(w, 2),
                    lambda r: _letters(r, int(r.integers(1, 4))), _add),
    "reverse": Family("rev", lambda r: _letters(r, 5), lambda w: w[::-1], lambda w: w[1:] + w[0],
                      lambda r: _letters(r, 3), _add),
    "cipher": Family("enc", lambda r: _digits(r, 4), lambda w: "".join(CIPHER[int(d)] for d in w),
                     lambda w: "".join(CIPHER[int(d)] for d in w[:-1]) + CIPHER_WRONG[int(w[-1])],
                     lambda r: _digits(r, int(r.integers(1, 4))), _rev),
}


def _held(fam: Family, n: int, seed: int) -> list[str]:
    """The target set's inputs (fixed per family, whatever the stream seed)."""
    rng, held = np.random.default_rng([seed, 7]), []
    while len(held) < n:
        w = fam.word(rng)
        if w not in held and fam.right(w) != fam.wrong(w):
            held.append(w)
    return held


def family_rows(name: str, rows: int, seed: int = 0, target_rows: int = 320, split_seed: int = 0):
    """(target rows, stream rows) of one family; the stream never holds a target input."""
    fam = FAMILIES[name]
    held = _held(fam, target_rows, split_seed)
    banned = set(held)
    rng = np.random.default_rng([seed, 11])

    def fresh() -> str:
        while True:
            w = fam.word(rng)
            if w not in banned and fam.right(w) != fam.wrong(w):
                return w

    dups = [fresh() for _ in range(4)]
    names, probs = list(MIXTURE), np.array(list(MIXTURE.values()))
    stream = []
    for src in rng.choice(names, rows, p=probs / probs.sum()):
        if src == "target":
            stream.append(fam.row(src, fresh()))
        elif src == "duplicate":
            stream.append(fam.row(src, dups[int(rng.integers(4))]))
        elif src == "noisy":
            stream.append(fam.row(src, fresh(), fam.wrong))
        elif src == "related":
            stream.append(fam.row(src, fam.related(rng)))
        else:
            p, r = fam.irrelevant(rng)
            stream.append({"prompt": p, "response": r, "source": src})
    return [fam.row("target", w) for w in held], stream


def _write(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def write_mixture(out: str | Path, name: str, rows: int = 16000, seed: int = 0) -> Path:
    """OUT/train.jsonl and OUT/target.jsonl of one family (idempotent: same seed, same files)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    target, stream = family_rows(name, rows, seed)
    _write(out / "target.jsonl", target)
    _write(out / "train.jsonl", stream)
    return out


def write_sort_mixture(out: str | Path, rows: int = 16000, seed: int = 0) -> Path:
    return write_mixture(out, "sort", rows, seed)


def write_pretrain(out: str | Path, rows: int = 24000, seed: int = 1000) -> Path:
    """OUT/train.jsonl: every family's stream (all five sources, unselected) and the embedded
    stream's rows in equal shares, shuffled; OUT/target.jsonl: a few rows of each, to watch.
    The families' target inputs stay out (their stream never holds them)."""
    from omegaconf import OmegaConf

    from fwsel.data import synthetic

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    per = rows // (len(FAMILIES) + 1)
    parts = [family_rows(name, per, seed)[1] for name in FAMILIES]
    conf = Path(__file__).resolve().parents[1] / "conf" / "data" / "synthetic.yaml"
    cfg = OmegaConf.create({"seed": seed, "data": OmegaConf.load(conf),
                            "target": {"split_seed": 0, "select_size": 64, "eval_size": 256}})
    emb = synthetic(cfg)[0]
    parts.append([{k: r[k] for k in ("prompt", "response", "source")} for r in emb.pool(0, per)])
    mixed = [r for part in parts for r in part]
    order = np.random.default_rng(seed).permutation(len(mixed))
    _write(out / "train.jsonl", [mixed[i] for i in order])
    _write(out / "target.jsonl", [r for part in parts for r in part[:64]])
    return out


ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "benchmarks" / "data"  # git-ignored: generated mixtures, the checkpoint, raw runs
SUITE = {  # name -> (family, or None for the embedded stream; where the model starts)
    "embedded": (None, "scratch"),
    "sort": ("sort", "scratch"),
    "cipher": ("cipher", "scratch"),
    "shift": ("shift", "ckpt"),
    "reverse": ("reverse", "ckpt"),
}
PRETRAIN = ["selector=random", "budget=1.0", "batch_size=32", "steps=600", "eval_every=100", "seed=1000",
            "data.max_len=32", "save_model=true", "progress=false"]  # the checkpoint's run: ~1 min on one core


def ensure_checkpoint(data: Path = DATA) -> Path:
    """The pretrained tiny model (made once: pretraining rows, then one `fwsel train` run)."""
    model = data / "ckpt" / "run" / "model"
    if (model / "model.safetensors").is_file():
        return model
    mix = write_pretrain(data / "ckpt" / "mix")
    cmd = [str(Path(sys.executable).with_name("fwsel")), "train", *PRETRAIN, "data=jsonl",
           f"data.files={mix / 'train.jsonl'}", f"data.target_files={mix / 'target.jsonl'}",
           f"hydra.run.dir={data / 'ckpt' / 'run'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    subprocess.run(cmd, env=env, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return model


def suite_overrides(name: str, data: Path = DATA) -> list[str]:
    """`fwsel train` overrides of one suite mixture (writes its files and the checkpoint if missing)."""
    family, start = SUITE[name]
    ov = []
    if family is not None:
        mix = data / "mix" / family
        if not (mix / "train.jsonl").is_file():
            write_mixture(mix, family)
        ov += ["data=jsonl", f"data.files={mix / 'train.jsonl'}", f"data.target_files={mix / 'target.jsonl'}",
               "data.max_len=32"]
    if start == "ckpt":
        ov += ["model=hf", f"model.name_or_path={ensure_checkpoint(data)}", "lora.enabled=false", "save_model=false"]
    return ov


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", nargs="?")
    p.add_argument("--family", default="sort", choices=[*FAMILIES, "pretrain"])
    p.add_argument("--rows", type=int, default=16000)
    p.add_argument("--overrides", choices=list(SUITE), help="print a suite mixture's fwsel train overrides")
    a = p.parse_args()
    if a.overrides:
        print(" ".join(suite_overrides(a.overrides)))
    elif a.family == "pretrain":
        print(write_pretrain(a.out, a.rows))
    else:
        print(write_mixture(a.out, a.family, a.rows))
