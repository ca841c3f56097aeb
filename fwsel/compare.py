"""`fwsel compare`: one table, one CSV and two pictures for a sweep of run dirs.

Every job is a directory holding `summary.json` (possibly nested at any depth); a directory
with `.hydra/` but no `summary.json` is a job that never got going ("missing"). Only jobs
whose status is `ok` or `exhausted` enter the numbers; the others are counted and listed so
a failed or killed (`running`) job is never silently dropped. A job that failed before its
first metrics line (a config error) is left out of the table and named below it.

Jobs are grouped by selector and budget, and also by every other config key whose value
differs between them (a re-run with `steps=50` in the same sweep dir becomes its own arm,
`random steps=50`, compared with the random of the same settings): numbers never mix.
`fwsel compare <run dir>` works on a single run too.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fwsel.outputs import FINISHED, RESUME_SAFE, read_jsonl

log = logging.getLogger(__name__)

REFERENCE = ("full", "source_oracle")  # diagnostic ceilings: shown apart, not budget-matched arms
BASELINE = "random"  # the arm whose final loss defines "steps to target"
STATUSES = (*FINISHED, "failed", "interrupted", "running", "missing")
LAST_EVALS = 3  # random's final loss = mean of its last this-many evals
# keys that do not change the numbers compared (besides the table's own axes: selector, budget, seed)
NOT_A_VARIANT = (*RESUME_SAFE, "seed", "budget", "selector.name", "threads", "eval_samples", "device",
                 "micro_batch_size", "loss_chunk_tokens",  # top-level in run dirs written before the engine group
                 "engine.micro_batch_size", "engine.loss_chunk_tokens", "diagnostics")


class CompareError(Exception):
    """A problem with the inputs that the user must fix (printed as one line, exit 1)."""


@dataclass
class Job:
    """What compare needs from one run dir."""

    path: Path
    status: str
    selector: str
    budget: float | None
    seed: Any
    steps: int | None = None
    eval_every: int | None = None
    loss: float | None = None
    acc: float | None = None
    error: str | None = None
    evals: list[tuple[int, float, float]] = field(default_factory=list)  # (step, examples_seen, loss)
    sec_cum: dict[int, float] = field(default_factory=dict)  # step -> cumulative sec_step
    picks: list[tuple[int, dict[str, float]]] = field(default_factory=list)  # (step, selected_per_source)
    rows: int = 0  # metrics lines read
    config: dict[str, Any] = field(default_factory=dict)  # flattened, from fwsel_config.yaml or .hydra/config.yaml
    variant: str = ""  # the differing keys outside selector.*, e.g. "steps=50" (the baseline must match it)
    sel_variant: str = ""  # the differing selector.* keys among jobs of this selector

    @property
    def done(self) -> bool:
        return self.status in FINISHED

    @property
    def started(self) -> bool:
        """False for a job that failed before its first metrics line (a config error)."""
        return not (self.status == "failed" and self.rows == 0)

    @property
    def arm(self) -> str:
        """The row label: the selector, plus whatever else differs."""
        return " ".join(x for x in (self.selector, self.variant, self.sel_variant) if x)


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _load_config(run_dir: Path) -> dict[str, Any]:
    """The job's config, flattened ({} when unreadable: such a job is never split off)."""
    from omegaconf import OmegaConf

    for path in (run_dir / "fwsel_config.yaml", run_dir / ".hydra" / "config.yaml"):
        if path.is_file():
            try:
                return {**_flat(OmegaConf.to_container(OmegaConf.load(path), resolve=False)),
                        **_group_choices(run_dir)}
            except Exception:  # noqa: BLE001 - a damaged config only loses the grouping
                return {}
    return {}


def _group_choices(run_dir: Path) -> dict[str, Any]:
    """The config groups chosen (`data` -> `jsonl`), from Hydra's record; the selector is the table's row."""
    from omegaconf import OmegaConf

    path = run_dir / ".hydra" / "hydra.yaml"
    if not path.is_file():
        return {}
    choices = OmegaConf.select(OmegaConf.load(path), "hydra.runtime.choices", default=None) or {}
    return {str(g): v for g, v in choices.items() if "/" not in str(g) and g != "selector"}


def _load_job(summary_path: Path) -> Job:
    d = summary_path.parent
    try:
        s = json.loads(summary_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return Job(d, "failed", "?", None, None, error=f"unreadable summary.json: {e}")
    job = Job(d, str(s.get("status") or "running"), str(s.get("selector") or "?"), s.get("budget"),
              s.get("seed"), s.get("steps"), s.get("eval_every"), s.get("target_eval_loss"),
              s.get("target_eval_acc"), s.get("error"))
    job.config = _load_config(d)
    total = 0.0
    last_acc = None
    for row in read_jsonl(d / "metrics.jsonl", on_bad="skip"):
        job.rows += 1
        step = row.get("step")
        if step is None:
            continue
        total += float(row.get("sec_step") or 0.0)
        job.sec_cum[int(step)] = total
        if row.get("target_eval_loss") is not None:
            job.evals.append((int(step), float(row.get("examples_seen") or 0), float(row["target_eval_loss"])))
            last_acc = row.get("target_eval_acc", last_acc)
        if row.get("selected_per_source"):
            job.picks.append((int(step), row["selected_per_source"]))
    if job.loss is None and job.evals:  # summary not final: fall back on the last eval logged
        job.loss = job.evals[-1][2]
    if job.acc is None:
        job.acc = last_acc
    return job


def _load_missing(run_dir: Path) -> Job:
    """A job that has a saved config but never wrote summary.json (an unreadable config still counts)."""
    config = _load_config(run_dir)
    return Job(run_dir, "missing", str(config.get("selector.name") or "?"), config.get("budget"), config.get("seed"),
               error="no summary.json", config=config)


def _differing(jobs: list[Job], keys) -> list[str]:
    return [k for k in sorted(keys) if len({repr(j.config.get(k)) for j in jobs if j.config}) > 1]


def label_variants(jobs: list[Job]) -> None:
    """Set each job's variant: its values of the config keys that differ between the jobs
    (selector.* keys only among jobs of the same selector)."""
    def counts(k: str) -> bool:
        return not any(k == n or k.startswith(n + ".") for n in NOT_A_VARIANT)

    shared = _differing(jobs, {k for j in jobs for k in j.config if counts(k) and not k.startswith("selector.")})
    swapped = {k for k in shared if "." not in k}  # a group whose option differs (data=jsonl vs synthetic):
    shared = [k for k in shared if k.split(".", 1)[0] not in swapped or "." not in k]  # its choice says it
    for j in jobs:
        j.variant = " ".join(f"{k}={j.config.get(k)}" for k in shared) if j.config else ""
    for sel in {j.selector for j in jobs}:
        group = [j for j in jobs if j.selector == sel]
        own = _differing(group, {k for j in group for k in j.config if counts(k) and k.startswith("selector.")})
        for j in group:
            j.sel_variant = " ".join(f"{k}={j.config.get(k)}" for k in own) if j.config else ""


def find_jobs(dirs: list[str | Path]) -> list[Job]:
    """Every job under the dirs (deduplicated); raises CompareError for a bad dir or no jobs."""
    seen: dict[Path, Job] = {}
    for d in map(Path, dirs):
        if not d.is_dir():
            raise CompareError(f"not a directory: {d}")
        for p in sorted(d.glob("**/summary.json")):
            seen.setdefault(p.parent.resolve(), _load_job(p))
        for h in sorted(d.glob("**/.hydra")):
            if h.is_dir() and not (h.parent / "summary.json").exists():
                seen.setdefault(h.parent.resolve(), _load_missing(h.parent))
    if not seen:
        raise CompareError(f"no jobs found under {', '.join(map(str, dirs))} (looked for **/summary.json)")
    return list(seen.values())


def _target_loss(job: Job) -> float | None:
    """Random's final target loss: the mean of its last LAST_EVALS evals."""
    if not job.evals:
        return job.loss
    tail = [loss for _, _, loss in job.evals[-LAST_EVALS:]]
    return sum(tail) / len(tail)


def _reach(job: Job, target: float) -> tuple[float, float]:
    """(first eval step at or below target ÷ steps, seconds to it); (inf, inf) when never reached."""
    for step, _, loss in job.evals:
        if loss <= target:
            return step / job.steps, job.sec_cum.get(step, 0.0)
    return math.inf, math.inf


def _stats(xs: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample std (ddof=1; None with one seed)."""
    xs = [float(x) for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def _shares(job: Job) -> dict[str, float]:
    counts: dict[str, float] = {}
    for _, per in job.picks:
        for src, n in per.items():
            counts[src] = counts.get(src, 0.0) + float(n or 0)
    total = sum(counts.values())
    return {k: v / total for k, v in counts.items()} if total else {}


def _rank(selector: str) -> int:
    return 0 if selector == BASELINE else 2 + REFERENCE.index(selector) if selector in REFERENCE else 1


def _order(arms) -> list[str]:
    """random first, then the arms alphabetically, then the reference rows (variants after their selector)."""
    return sorted(set(arms), key=lambda a: (_rank(a.split(" ", 1)[0]), a))


def aggregate(jobs: list[Job]) -> list[dict]:
    """One row per arm × budget (arm: selector plus differing keys): the numbers in the table and summary.csv."""
    label_variants(jobs)
    targets = {(j.variant, j.budget, j.seed): _target_loss(j) for j in jobs if j.selector == BASELINE and j.done}
    sources = sorted({src for j in jobs if j.done for _, per in j.picks for src in per})
    cells: dict[tuple, list[Job]] = {}
    for j in jobs:
        cells.setdefault((j.arm, j.budget), []).append(j)
    rows = []
    for arm in _order({a for a, _ in cells}):
        for budget in sorted({b for a, b in cells if a == arm}, key=lambda b: (b is None, b or 0)):
            group = cells[(arm, budget)]
            sel = group[0].selector
            done = [j for j in group if j.done]
            reach = [_reach(j, targets[(j.variant, budget, j.seed)]) for j in done if sel != BASELINE
                     and targets.get((j.variant, budget, j.seed)) is not None and j.evals and j.steps]
            loss_m, loss_s = _stats([j.loss for j in done])
            acc_m, acc_s = _stats([j.acc for j in done])
            shares = [_shares(j) for j in done]
            row = {"selector": sel, "arm": arm, "variant": " ".join(x for x in (group[0].variant,
                                                                             group[0].sel_variant) if x),
                   "budget": budget, "reference": sel in REFERENCE,
                   "seeds": len({j.seed for j in done}),
                   **{f"n_{st}": sum(j.status == st for j in group) for st in STATUSES},
                   "min_evals": min((len(j.evals) for j in done), default=None),
                   "loss_mean": loss_m, "loss_std": loss_s, "acc_mean": acc_m, "acc_std": acc_s,
                   "steps_to_random_ratio": statistics.median(r for r, _ in reach) if reach else None,
                   "sec_to_random": statistics.median(s for _, s in reach) if reach else None,
                   **{f"frac_{src}": (statistics.fmean(sh.get(src, 0.0) for sh in shares if sh)
                                      if any(shares) else None) for src in sources}}
            row["_jobs"] = group  # for the pictures and the problem list; not written to CSV
            rows.append(row)
    return rows


def _pm(m, s, digits=4) -> str:
    if m is None:
        return "—"
    return f"{m:.{digits}f} ± {s:.{digits}f}" if s is not None else f"{m:.{digits}f} (n=1)"


def _ratio(r) -> str:
    return "—" if r is None else ("> 1" if math.isinf(r) else f"{r:.2f}")


def _secs(s) -> str:
    return "—" if s is None else ("not reached" if math.isinf(s) else f"{s:.1f}s")


def _jobs_cell(row: dict) -> str:
    marks = {"failed": "red", "interrupted": "yellow", "running": "magenta", "missing": "red"}
    parts = [f"{row['n_ok'] + row['n_exhausted']} ok"]
    parts += [f"[{c}]{row[f'n_{st}']} {'running/killed' if st == 'running' else st}[/]"
              for st, c in marks.items() if row[f"n_{st}"]]
    return ", ".join(parts)


LINES = ("final loss", "final acc", f"→ {BASELINE}", "jobs")  # what each line of a table cell holds


def _cell(r: dict) -> str:
    reach = "—" if r["steps_to_random_ratio"] is None else \
        f"{_ratio(r['steps_to_random_ratio'])} ({_secs(r['sec_to_random'])})"  # random's own: "—"
    return "\n".join((_pm(r["loss_mean"], r["loss_std"]), _pm(r["acc_mean"], r["acc_std"], 3), reach, _jobs_cell(r)))


def render(rows: list[dict]) -> list:
    """The rich renderables printed by `fwsel compare`: the selector × budget table, source shares, problems."""
    budgets = sorted({r["budget"] for r in rows if r["budget"] is not None})
    t = Table(title="fwsel compare: selector × budget, mean ± std over seeds", title_justify="left",
              caption=f"→ {BASELINE}: steps to reach {BASELINE}'s final target loss (mean of its last "
                      f"{LAST_EVALS} evals, same seed) ÷ steps, median over seeds, > 1 = not reached; "
                      "in brackets the seconds of training to get there", caption_justify="left")
    t.add_column("selector")
    t.add_column("")
    for b in budgets:
        t.add_column(f"budget {b:g}", justify="right")
    by = {(r["arm"], r["budget"]): r for r in rows}
    for arm in _order({r["arm"] for r in rows}):
        label = arm.replace(" ", "\n", 1)
        label = f"{label}\n(reference)" if arm.split(" ", 1)[0] in REFERENCE else label
        t.add_row(label, "\n".join(LINES), *(_cell(by[(arm, b)]) if (arm, b) in by else "" for b in budgets),
                  end_section=True)
    out = [t]
    sources = [k[5:] for k in rows[0] if k.startswith("frac_")] if rows else []
    if sources:
        t = Table(title="share of selected rows per source, mean over seeds", title_justify="left")
        t.add_column("selector @ budget")
        for s in sources:
            t.add_column(s, justify="right")
        for r in rows:
            t.add_row(f"{r['arm']} @ {r['budget']}",
                      *("—" if r[f"frac_{s}"] is None else f"{r[f'frac_{s}']:.2f}" for s in sources))
        out.append(t)
    bad = [j for r in rows for j in r["_jobs"] if not j.done]
    if bad:
        lines = [f"[red]{'running/killed' if j.status == 'running' else j.status}[/]: {j.path}"
                 + (f" — {j.error}" if j.error else "") for j in bad]
        out.append("\n".join(["jobs not counted:", *lines]))
    few = [r for r in rows if r["min_evals"] is not None and r["min_evals"] < LAST_EVALS]
    for r in few:
        out.append(f"[yellow]warning[/]: {r['arm']} @ budget {r['budget']:g} has jobs with only {r['min_evals']} "
                   f"eval(s), fewer than {LAST_EVALS}: its final loss and steps-to-target are coarse "
                   f"(lower eval_every or raise steps)")
    return out


def _unstarted_note(jobs: list[Job]) -> str | None:
    if not jobs:
        return None
    lines = [f"  {j.path}" + (f" — {j.error}" if j.error else "") for j in jobs]
    return "\n".join([f"left out: {len(jobs)} job(s) that failed before their first step:", *lines])


def write_csv(rows: list[dict], path: Path) -> None:
    keys = [k for k in rows[0] if not k.startswith("_")]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r[k] is None else r[k]) for k in keys})


def compare_dirs(dirs: list[str | Path], out: str | Path | None = None,
                 console: Console | None = None) -> tuple[list[dict], str]:
    """Compare all jobs under `dirs`; write summary.csv, curves.png, selection.png into `out`
    (default: the first dir). Returns (one dict per selector × budget, the table as plain text).
    """
    from fwsel.compare_plots import plot_curves, plot_selection

    found = find_jobs(dirs)
    jobs = [j for j in found if j.started]
    if not jobs:
        raise CompareError(f"no job under {', '.join(map(str, dirs))} got to its first step "
                           f"({len(found)} failed before it: see their summary.json)")
    rows = aggregate(jobs)
    out = Path(out if out is not None else dirs[0])
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "summary.csv")
    plot_curves(rows, out / "curves.png")
    plot_selection(rows, out / "selection.png")
    buf = Console(file=io.StringIO(), width=140, no_color=True, force_terminal=False)
    note = _unstarted_note([j for j in found if not j.started])
    footer = f"wrote {out / 'summary.csv'}, {out / 'curves.png'}, {out / 'selection.png'}"
    for r in [*render(rows), *([note] if note else []), footer]:
        for c in (buf, console) if console is not None else (buf,):
            c.print(r, soft_wrap=isinstance(r, str))  # lines naming paths are never wrapped (a pipe greps them whole)
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows], buf.file.getvalue()


def main(argv: list[str] | None = None) -> int:
    """Entry point of `fwsel compare DIR [DIR ...] [--out OUT]`."""
    p = argparse.ArgumentParser(
        prog="fwsel compare",
        description="Compare the jobs of one or more sweeps: a selector × budget table (final target eval "
                    "loss and accuracy, steps and seconds to reach random's final target loss, selected "
                    "source shares), plus summary.csv, curves.png and selection.png.")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="sweep or run dirs; jobs are found by **/summary.json")
    p.add_argument("--out", default=None, help="where to write summary.csv and the pictures (default: first DIR)")
    args = p.parse_args(argv)
    try:
        compare_dirs(args.dirs, args.out, console=Console())
    except CompareError as e:
        print(f"fwsel compare: error: {e}", file=sys.stderr)
        return 1
    return 0


def compare_sweep(config) -> None:
    """`fwsel compare` on a multirun's sweep dir once it ends (fwsel.train.CompareCallback); a
    comparison problem is logged, never raised: it must not fail the sweep."""
    sweep_dir = None
    try:
        sweep_dir = str(config.hydra.sweep.dir)
        compare_dirs([sweep_dir], console=Console())
    except Exception as e:  # a comparison problem must never fail the sweep
        log.warning("fwsel compare on %s failed: %s", sweep_dir, e)
