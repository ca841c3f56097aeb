"""REPORT.md of the benchmark suite, rendered from the committed per-mixture jobs.csv files.

A cross-mixture table first (one screen), then per mixture: final target loss and exact match
per arm, paired per-seed differences with sign counts, steps and seconds to random's final
loss, and the share of rows and of weight per source. Hand-written analysis lives in
`benchmarks/results/suite/analysis.md` and ftw's option table in `ftw_options.md`; both are
included verbatim.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

REFERENCE = ("full", "source_oracle")
ORDER = ("ftw", "ftw_v1", "greats", "tracin", "random", "full", "source_oracle")  # ftw_v1: the first version's defaults
RIVALS = ("greats", "tracin", "random")
SOURCES = ("target", "related", "noisy", "irrelevant", "duplicate")
LAST_EVALS = 3  # random's final loss = mean of its last this-many evals (as fwsel compare)


def _by(jobs, budget):
    return {(j["selector"], int(j["seed"])): j for j in jobs if j["ok"] and j["budget"] == budget}


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def _f(x, d=3):
    return "—" if x is None else f"{x:.{d}f}"


def paired(jobs, budget, arm="ftw"):
    """{rival: (per-seed diffs arm - rival, wins of arm)}."""
    by, out = _by(jobs, budget), {}
    for rival in RIVALS:
        seeds = sorted(s for (a, s) in by if a == arm and (rival, s) in by)
        diffs = [by[(arm, s)]["loss"] - by[(rival, s)]["loss"] for s in seeds]
        out[rival] = (seeds, diffs, sum(d < 0 for d in diffs))
    return out


def reach(jobs, budget):
    """{arm: (median fraction of steps, median seconds) to reach random's final loss, same seed}."""
    by = _by(jobs, budget)
    out = {}
    for arm in ORDER:
        fr, secs = [], []
        for (a, seed), j in by.items():
            if a != arm or ("random", seed) not in by:
                continue
            tail = [lo for _, lo, _ in by[("random", seed)]["evals"][-LAST_EVALS:]]
            target = sum(tail) / len(tail)
            hit = next(((st, se) for st, lo, se in j["evals"] if lo <= target), None)
            fr.append(hit[0] / j["steps"] if hit else math.inf)
            secs.append(hit[1] if hit else math.inf)
        if fr:
            out[arm] = (statistics.median(fr), statistics.median(secs))
    return out


def cross_table(suite: dict, starts: dict) -> list[str]:
    head = ("| mixture (start) | budget | ftw | ftw v1 | greats | tracin | random | full* | oracle* | exact match "
            "ftw / ftw v1 / greats / random | ftw below greats / tracin / random "
            "| ftw v1 below greats / tracin / random |")
    lines = [head, "|---" * 12 + "|"]
    for m, jobs in suite.items():
        for b in sorted({j["budget"] for j in jobs}, reverse=True):
            by = _by(jobs, b)
            loss = {a: _mean([j["loss"] for (x, _), j in by.items() if x == a]) for a in ORDER}
            acc = {a: _mean([j["acc"] for (x, _), j in by.items() if x == a]) for a in ORDER}
            present = [a for a in ORDER if a not in REFERENCE and loss[a] is not None]
            best = min(present, key=lambda a: loss[a]) if present else None
            cells = [(f"**{_f(loss[a])}**" if a == best else _f(loss[a])) for a in ORDER]
            wins = []
            for arm in ("ftw", "ftw_v1"):
                p = paired(jobs, b, arm)
                wins.append(" / ".join(f"{p[r][2]}/{len(p[r][0])}" if p[r][0] else "—" for r in RIVALS))
            em = " / ".join(_f(acc[a], 2) for a in ("ftw", "ftw_v1", "greats", "random"))
            lines.append(f"| {m} ({starts[m]}) | {b:g} | " + " | ".join(cells) + f" | {em} | {wins[0]} | {wins[1]} |")
    return lines


def mixture_section(m: str, jobs: list[dict]) -> list[str]:
    out = [f"### {m}", "", (f"`fwsel compare` over the raw jobs (git-ignored: benchmarks/data/runs/suite/test/{m}) "
           f"wrote [summary.csv](suite/{m}/summary.csv); per job: [jobs.csv](suite/{m}/jobs.csv)."), "",
           f"![curves](suite/{m}/curves.png) ![selection](suite/{m}/selection.png)", ""]
    for b in sorted({j["budget"] for j in jobs}, reverse=True):
        by, r = _by(jobs, b), reach(jobs, b)
        out += [(f"Budget {b:g}: final target loss and exact match (mean ± std over seeds), steps (fraction of "
                "the run, median) and seconds of training to reach random's final loss, rows trained per step."), "",
                "| arm | final loss | exact match | → random: steps | seconds | rows/step |",
                "|---|---|---|---|---|---|"]
        for a in ORDER:
            js = [j for (x, _), j in by.items() if x == a]
            if not js:
                continue
            ls, ac = [j["loss"] for j in js], [j["acc"] for j in js]
            sd = statistics.stdev(ls) if len(ls) > 1 else 0.0
            sa = statistics.stdev(ac) if len(ac) > 1 else 0.0
            st, se = r.get(a, (None, None))
            reach_s = "—" if st is None else ("> 1" if math.isinf(st) else f"{st:.2f}")
            sec_s = "—" if se is None else ("not reached" if math.isinf(se) else f"{se:.1f} s")
            label = f"{a} (reference)" if a in REFERENCE else a
            out.append(f"| {label} | {statistics.fmean(ls):.4f} ± {sd:.4f} | {statistics.fmean(ac):.3f} ± {sa:.3f} "
                       f"| {reach_s} | {sec_s} | {_mean([j['rows_per_step'] for j in js]):.1f} |")
        out += ["", ("Paired: ftw's final loss minus the rival's, same seed (negative = ftw better); sign count = "
                "seeds where ftw is lower."), "", "| arm − rival | per-seed differences | mean | arm lower |",
                "|---|---|---|---|"]
        for arm in ("ftw", "ftw_v1"):
            for rival, (seeds, diffs, wins) in paired(jobs, b, arm).items():
                if seeds:
                    out.append(f"| {arm} − {rival} | " + " ".join(f"{d:+.3f}" for d in diffs)
                               + f" | {statistics.fmean(diffs):+.4f} | {wins}/{len(seeds)} |")
        out += ["", "Share of selected rows / share of weight per source (mean over seeds):", "",
                "| arm | " + " | ".join(SOURCES) + " |", "|---" * (len(SOURCES) + 1) + "|"]
        for a in ORDER:
            js = [j for (x, _), j in by.items() if x == a]
            if js:
                out.append(f"| {a} | " + " | ".join(
                    f"{_mean([j[f'rows_{s}'] for j in js]):.2f} / {_mean([j[f'weight_{s}'] for j in js]):.2f}"
                    for s in SOURCES) + " |")
        out.append("")
    return out


def render(suite: dict, starts: dict, header: list[str], extra: dict[str, Path], dev_table: list[str]) -> str:
    lines = ["# Benchmark suite", "", *header, "", *cross_table(suite, starts), "",
             ("Final target eval loss, mean over test seeds 0-4 (bold: lowest of the budget-matched arms); "
             "\\* `full` and `source_oracle` are references (full trains on the whole pool, oracle reads the "
             "source labels), not budget-matched arms. Last column: seeds on which ftw's final loss is below "
             "the rival's."), ""]
    for title, path in extra.items():
        if path.is_file():
            lines += [f"## {title}", "", path.read_text().rstrip(), ""]
    lines += ["## GREATS interaction scale (dev seeds 100-102, budget 0.25)", "",
              ("Mean final target loss per mixture; the scale with the lowest mean log loss over the suite runs "
              "on the test seeds."), "", *dev_table, "", "## Per mixture", ""]
    for m, jobs in suite.items():
        lines += mixture_section(m, jobs)
    return "\n".join(lines) + "\n"
