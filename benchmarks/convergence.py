"""Convergence benchmark suite: does selection help, on which mixtures, by how much, at what cost.

    python benchmarks/convergence.py --suite                  # everything: greats dev, test arms, report
    python benchmarks/convergence.py --suite --phase dev      # GREATS's interaction scale on dev seeds only
    python benchmarks/convergence.py --suite --arms ftw       # one arm on the test seeds (others kept)
    python benchmarks/convergence.py --suite --phase prefilter  # ftw at budget 0.05, with and without the prefilter
    python benchmarks/convergence.py --report-only            # re-render REPORT.md from the committed CSVs

The mixtures are `benchmarks/mixtures.py`'s SUITE. Dev seeds (100-102) decide options: here
GREATS's interaction scale, one value for the whole suite (ftw's options are decided the same
way by its own ablations); test seeds (0-4) make the report. Every job is one `fwsel train`
run, two at a time, one torch thread each; its dir (git-ignored, under `benchmarks/data/runs/`)
is kept when finished, so a re-run only runs what is missing. Per mixture the committed sweep
summary is `benchmarks/results/suite/<mixture>/`: `fwsel compare`'s summary.csv, curves.png and
selection.png, plus jobs.csv (one line per job: final numbers, shares of rows and of weight
per source) from which REPORT.md is rendered.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from mixtures import DATA, SUITE, suite_overrides  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"  # in git: REPORT.md and the per-mixture summaries
SUITE_OUT = RESULTS / "suite"
RAW = DATA / "runs" / "suite"  # git-ignored job dirs
BUDGETS = {"embedded": (0.25, 0.1), "shift": (0.25, 0.1)}  # the others: 0.25 only
DEV_SEEDS, TEST_SEEDS = (100, 101, 102), (0, 1, 2, 3, 4)
GREATS_SCALES = (10.0, 45.0, 150.0)  # 45 was best on the first version's dev seeds (upstream 1 ~ tracin there)
ARMS = ("random", "source_oracle", "tracin", "full", "greats", "ftw_v1", "ftw")  # cheapest first
PREFILTER = (0.05, 0.25)  # (budget, selector.prefilter_keep): the cheap first stage against unfiltered ftw
# arms that are a selector plus overrides: ftw_v1 = ftw without its v2 default changes (clip_q=prev, ridge 1e-3)
ARM_OVERRIDES = {"ftw_v1": ["selector=ftw", "selector.name=ftw_v1", "selector.clip_q=none", "selector.ridge=1.0e-4"]}
RIVALS = ("greats", "tracin", "random")
SOURCES = ("target", "related", "noisy", "irrelevant", "duplicate")
KEEP = {"summary.json", "metrics.jsonl", "fwsel_config.yaml", "overrides.yaml"}


def budgets(mixture: str) -> tuple[float, ...]:
    return BUDGETS.get(mixture, (0.25,))


def fwsel_multirun(sweep_dir: Path, overrides: list[str], n_jobs: int) -> None:
    """One `fwsel train -m` into `sweep_dir` (joblib: `n_jobs` workers that import torch once; finished
    jobs with the same config are skipped), then drop what the report does not read."""
    cmd = [str(Path(sys.executable).with_name("fwsel")), "train", "-m", *overrides, "progress=false",
           f"hydra.sweep.dir={sweep_dir}", "hydra/launcher=joblib", f"hydra.launcher.n_jobs={n_jobs}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    print("$", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, env=env, cwd=ROOT, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for p in sorted(sweep_dir.rglob("*"), reverse=True):
        if p.is_dir() and p.name == "checkpoints":
            shutil.rmtree(p)
        elif p.is_file() and p.parent != sweep_dir and p.name not in KEEP and ".hydra" not in p.parts:
            p.unlink()


def common(args) -> list[str]:
    return [f"steps={args.steps}", f"eval_every={args.eval_every}", f"target.eval_size={args.eval_size}"]


def seeds(xs) -> str:
    return "seed=" + ",".join(map(str, xs))


def run_dev(mixtures, args) -> None:
    for m in mixtures:
        fwsel_multirun(RAW / "dev" / m, [*suite_overrides(m), "selector=greats",
                                         "selector.interaction_scale=" + ",".join(f"{s:g}" for s in GREATS_SCALES),
                                         "budget=0.25", seeds(DEV_SEEDS), *common(args)], args.n_jobs)


def dev_greats_scale(mixtures) -> tuple[float, list[str]]:
    """The scale with the lowest mean over mixtures of log(mean dev-seed final loss); the table."""
    table, score = [], {}
    for scale in GREATS_SCALES:
        logs, cells = [], []
        for m in mixtures:
            losses = [r["loss"] for r in read_jobs(RAW / "dev" / m, f"interaction_scale-{scale:g}_") if r["ok"]]
            if losses:
                logs.append(math.log(statistics.fmean(losses)))
                cells.append(f"{statistics.fmean(losses):.4f} (n={len(losses)})")
            else:
                cells.append("—")
        if len(logs) == len(mixtures):
            score[scale] = statistics.fmean(logs)
        table.append(f"| {scale:g} | " + " | ".join(cells) + f" | {score.get(scale, float('nan')):.4f} |")
    head = ["| interaction scale | " + " | ".join(mixtures) + " | mean log loss |", "|---" * (len(mixtures) + 2) + "|"]
    best = min(score, key=score.get) if score else 45.0
    return best, head + table


def run_test(m: str, arm: str, args, greats_scale: float) -> None:
    """One arm on one mixture, test seeds, every budget of the mixture (`full` at 0.25 only: at 0.1 it
    trains on 80 rows a step, ten times a budget-matched arm's work, for a reference row)."""
    bs = (0.25,) if arm == "full" else budgets(m)
    extra = [f"selector.interaction_scale={greats_scale:g}"] if arm == "greats" else []
    extra += args.ftw_overrides if arm == "ftw" else []
    sel = ARM_OVERRIDES.get(arm, [f"selector={arm}"])
    fwsel_multirun(RAW / "test" / m, [*suite_overrides(m), *sel, *extra,
                                      "budget=" + ",".join(f"{b:g}" for b in bs), seeds(TEST_SEEDS), *common(args)],
                   args.n_jobs)


def run_prefilter(m: str, args) -> None:
    """ftw at budget 0.05 (N = 160) without and with `selector.prefilter_keep`, test seeds. A file
    mixture holds 16000 rows, so it is read twice (`data.epochs=2`, reshuffled): 200 x 160 rows."""
    budget, keep = PREFILTER
    common_ov = [*suite_overrides(m), "selector=ftw", f"budget={budget:g}", seeds(TEST_SEEDS), *common(args),
                 *(["data.epochs=2"] if SUITE[m][0] is not None else [])]
    for extra in ([], ["selector.name=ftw_prefilter", f"selector.prefilter_keep={keep:g}"]):
        fwsel_multirun(RAW / "prefilter" / m, [*common_ov, *extra], args.n_jobs)


def prefilter_table(mixtures) -> list[str]:
    """Per mixture: unfiltered vs prefiltered ftw, final loss, paired per-seed differences, training
    seconds per step (each arm's own runs: not side by side; benchmarks/step_cost.py has that)."""
    budget, keep = PREFILTER
    out = [f"ftw at budget {budget:g} (N = 160 for k = 8) without and with `selector.prefilter_keep={keep:g}` "
           f"(gradients for the best-aligned {keep:.0%} of the pool by the output head), test seeds "
           f"{', '.join(map(str, TEST_SEEDS))}; final target loss mean, prefiltered minus unfiltered per seed "
           "(negative = the prefilter is better), seconds of a training step (mean over the run; the arms ran "
           "one after another, so this ratio is indicative: the interleaved one is in benchmarks/results/"
           "step_cost.md).", "",
           "| mixture | ftw | ftw + prefilter | per-seed differences | prefilter lower | s/step ftw | "
           "s/step prefilter | ratio |",
           "|---|---|---|---|---|---|---|---|"]
    for m in mixtures:
        jobs = {(j["selector"], j["seed"]): j for j in read_jobs(RAW / "prefilter" / m) if j["ok"]}
        pairs = [(jobs[("ftw", s)], jobs[("ftw_prefilter", s)]) for s in TEST_SEEDS
                 if ("ftw", s) in jobs and ("ftw_prefilter", s) in jobs]
        if not pairs:
            continue
        d = [b["loss"] - a["loss"] for a, b in pairs]
        sec = [statistics.fmean(j["sec_train"] / max(j["steps"], 1) for j in arm) for arm in zip(*pairs)]
        out.append(f"| {m} | {statistics.fmean(a['loss'] for a, _ in pairs):.3f} | "
                   f"{statistics.fmean(b['loss'] for _, b in pairs):.3f} | {' '.join(f'{x:+.3f}' for x in d)} | "
                   f"{sum(x < 0 for x in d)}/{len(d)} | {sec[0] * 1e3:.0f} ms | {sec[1] * 1e3:.0f} ms | "
                   f"{sec[1] / sec[0]:.2f} |")
    return out


# ---- per-job numbers (jobs.csv) -------------------------------------------------------------

def read_jobs(d: Path, name_has: str = "") -> list[dict]:
    """One dict per job dir under `d` (whose name holds `name_has`): final numbers, evals, shares of
    rows and of weight per source."""
    out = []
    for s_path in sorted(p for p in d.glob("*/summary.json") if name_has in p.parent.name):
        s = json.loads(s_path.read_text())
        rows, evals, sec = [], [], 0.0
        picks = {src: 0.0 for src in SOURCES}
        weights = {src: 0.0 for src in SOURCES}
        for line in s_path.with_name("metrics.jsonl").read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            sec += float(r.get("sec_step") or 0.0)
            if r.get("target_eval_loss") is not None:
                evals.append((int(r["step"]), float(r["target_eval_loss"]), sec))
            for src, n in (r.get("selected_per_source") or {}).items():
                picks[src] = picks.get(src, 0.0) + float(n)
            for src, w in (r.get("weight_per_source") or {}).items():
                weights[src] = weights.get(src, 0.0) + float(w)
            rows.append(r)
        n_p, n_w = sum(picks.values()) or 1.0, sum(weights.values()) or 1.0
        steps = int(s.get("steps_done") or 0)
        out.append({"selector": s["selector"], "budget": float(s["budget"]), "seed": int(s["seed"]),
                    "ok": s.get("status") in ("ok", "exhausted"), "loss": s.get("target_eval_loss"),
                    "acc": s.get("target_eval_acc"), "loss0": s.get("target_eval_loss_initial"),
                    "steps": steps, "sec_train": round(sec, 2), "wall_s": s.get("wall_s"),
                    "rows_per_step": sum(picks.values()) / max(steps, 1),
                    "evals": json.dumps([[st, round(lo, 5), round(se, 2)] for st, lo, se in evals]),
                    **{f"rows_{k}": v / n_p for k, v in picks.items()},
                    **{f"weight_{k}": v / n_w for k, v in weights.items()}})
    return out


def write_jobs_csv(jobs: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(jobs[0]))
        w.writeheader()
        w.writerows(jobs)


def load_jobs_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for r in rows:
        job = {k: (float(v) if v not in ("", "None") else None) for k, v in r.items()
               if k not in ("selector", "ok", "evals")}
        job.update(selector=r["selector"], ok=r["ok"] == "True", evals=json.loads(r["evals"]))
        out.append(job)
    return out


def summarise(mixture: str) -> list[dict]:
    """fwsel compare's summary for the mixture's test jobs, and jobs.csv; returns the jobs."""
    from fwsel.compare import compare_dirs

    d, out = RAW / "test" / mixture, SUITE_OUT / mixture
    out.mkdir(parents=True, exist_ok=True)
    jobs = read_jobs(d)
    if jobs:
        # compare sees each job's summary and metrics but not its config: the arms of one suite run
        # may span code versions whose config keys differ, which compare would list as variants
        with tempfile.TemporaryDirectory() as tmp:
            for s in d.glob("*/summary.json"):
                (Path(tmp) / s.parent.name).mkdir()
                for name in ("summary.json", "metrics.jsonl"):
                    shutil.copy(s.with_name(name), Path(tmp) / s.parent.name / name)
            compare_dirs([tmp], out)
        write_jobs_csv(jobs, out / "jobs.csv")
    return jobs


# ---- the report ---------------------------------------------------------------------------------

def report(mixtures, args, greats_scale: float, dev_table: list[str]) -> Path:
    from suite_report import render

    suite = {}
    for m in mixtures:
        f = SUITE_OUT / m / "jobs.csv"
        if f.is_file():
            suite[m] = load_jobs_csv(f)
    wall = json.loads((SUITE_OUT / "wall.json").read_text()) if (SUITE_OUT / "wall.json").is_file() else {}
    header = [f"Command: `python benchmarks/convergence.py --suite` on 2 shared cores (two jobs at a time, one "
              f"torch thread each). {args.steps} steps, k = 8, eval every {args.eval_every} steps on "
              f"{args.eval_size} held-out "
              f"target rows; test seeds {', '.join(map(str, TEST_SEEDS))}; budget 0.25 on every mixture, 0.1 on "
              f"{' and '.join(m for m in BUDGETS)}. GREATS runs at interaction scale {greats_scale:g} (chosen on "
              "dev seeds below). Wall time: " + (", ".join(f"{k} {v / 60:.1f} min" for k, v in wall.items()) or "—")
              + (f" (total {sum(wall.values()) / 60:.0f} min)" if wall else "")
              + ". Mixtures: `benchmarks/mixtures.py` (start: `scratch` = the tiny model's random init, `ckpt` = "
              "a checkpoint first trained on an unselected mix of every format). `ftw`: ftw's defaults (v2: "
              "`selector.clip_q=prev`, `selector.ridge=1e-3`); `ftw v1`: the same code with the first version's "
              "defaults (`selector.clip_q=none`, `selector.ridge=1e-4`)."]
    extra = {"Where ftw wins, where it does not, and why": SUITE_OUT / "analysis.md",
             "The prefilter at budget 0.05": SUITE_OUT / "prefilter.md",
             "ftw options (paired, dev seeds) and the defaults chosen": SUITE_OUT / "ftw_options.md"}
    starts = {m: SUITE[m][1] for m in mixtures}
    out = RESULTS / "REPORT.md"
    out.write_text(render(suite, starts, header, extra, dev_table))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description="fwsel benchmark suite")
    p.add_argument("--suite", action="store_true", help="run the suite (what is missing), then the report")
    p.add_argument("--phase", default="dev,test,prefilter",
                   help="comma list: dev (GREATS scale), test (the arms), prefilter (ftw at 0.05, with and without)")
    p.add_argument("--arms", default=",".join(ARMS), help="arms run on the test seeds")
    p.add_argument("--mixtures", default=",".join(SUITE))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--eval-size", type=int, default=256, help="target eval rows (target.eval_size)")
    p.add_argument("--n-jobs", type=int, default=2)
    p.add_argument("--greats-scale", type=float, default=None, help="skip the dev choice and use this scale")
    p.add_argument("--ftw-overrides", nargs="*", default=[], help="extra overrides for the ftw arm")
    p.add_argument("--report-only", action="store_true", help="re-render REPORT.md from the committed CSVs")
    args = p.parse_args()
    mixtures, phases, arms = args.mixtures.split(","), args.phase.split(","), args.arms.split(",")
    SUITE_OUT.mkdir(parents=True, exist_ok=True)
    wall_f = SUITE_OUT / "wall.json"
    wall = json.loads(wall_f.read_text()) if wall_f.is_file() else {}
    if args.suite and "dev" in phases:
        t = time.time()
        run_dev(mixtures, args)
        wall["greats dev"] = time.time() - t
    scale, dev_table = dev_greats_scale(list(SUITE))  # one scale for the whole suite, whatever runs now
    if (RAW / "dev").is_dir():
        (SUITE_OUT / "greats_dev.md").write_text("\n".join(dev_table) + f"\n\nchosen: {scale:g}\n")
    elif (SUITE_OUT / "greats_dev.md").is_file():  # report-only on a fresh clone: the committed choice
        text = (SUITE_OUT / "greats_dev.md").read_text().split("\n\nchosen: ")
        dev_table, scale = text[0].splitlines(), float(text[1])
    scale = args.greats_scale if args.greats_scale is not None else scale
    if args.suite and "test" in phases:
        for m in mixtures:
            for arm in arms:
                t = time.time()
                run_test(m, arm, args, scale)
                key = " ".join([arm, *args.ftw_overrides]) if arm == "ftw" else arm
                wall[key] = wall.get(key, 0.0) + time.time() - t
            summarise(m)
            wall_f.write_text(json.dumps({k: round(v, 1) for k, v in wall.items()}) + "\n")
            print(f"{m} done", flush=True)
    if args.suite and "prefilter" in phases:
        t = time.time()
        for m in mixtures:
            run_prefilter(m, args)
        wall["prefilter"] = wall.get("prefilter", 0.0) + time.time() - t
    if (RAW / "prefilter").is_dir():
        (SUITE_OUT / "prefilter.md").write_text("\n".join(prefilter_table(list(SUITE))) + "\n")
    wall_f.write_text(json.dumps({k: round(v, 1) for k, v in wall.items()}) + "\n")
    print(report(mixtures, args, scale, dev_table))


if __name__ == "__main__":
    main()
