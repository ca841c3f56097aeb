"""The two pictures of `fwsel compare`: loss curves per budget and selected-source shares."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

SHARE_BINS = 50  # steps are grouped into at most this many bins so per-step noise (k rows) averages out


def _budgets(rows: list[dict]) -> list:
    return sorted({r["budget"] for r in rows if r["budget"] is not None})


def _empty(path: Path, msg: str) -> None:
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.text(0.5, 0.5, msg, ha="center", va="center")
    ax.axis("off")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curves(rows: list[dict], path: Path) -> None:
    """Target eval loss vs examples seen: a panel per budget, a line per selector, min–max band over seeds."""
    budgets = _budgets(rows)
    if not any(j.evals for r in rows for j in r["_jobs"] if j.done) or not budgets:
        return _empty(path, "no finished jobs with evals")
    fig, axes = plt.subplots(1, len(budgets), figsize=(5 * len(budgets), 4), squeeze=False, sharey=True)
    for ax, b in zip(axes[0], budgets):
        for r in (r for r in rows if r["budget"] == b):
            per_step: dict[int, list[tuple[float, float]]] = {}
            for j in r["_jobs"]:
                if j.done:
                    for step, seen, loss in j.evals:
                        per_step.setdefault(step, []).append((seen, loss))
            if not per_step:
                continue
            steps = sorted(per_step)
            x = np.array([np.mean([s for s, _ in per_step[t]]) for t in steps])
            ys = [np.array([v for _, v in per_step[t]]) for t in steps]
            style = "--" if r["reference"] else "-"
            (line,) = ax.plot(x, [y.mean() for y in ys], style, label=f"{r['arm']} (n={r['seeds']})")
            ax.fill_between(x, [y.min() for y in ys], [y.max() for y in ys], color=line.get_color(), alpha=0.2)
        ax.set_title(f"budget {b:g}")
        ax.set_xlabel("examples seen")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("target eval loss (band: min–max over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _share_series(jobs) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Binned steps and each source's share of selected rows per bin, summed over seeds."""
    picks = [(s, per) for j in jobs if j.done for s, per in j.picks]
    if not picks:
        return np.array([]), {}
    sources = sorted({src for _, per in picks for src in per})
    last = max(s for s, _ in picks)
    nbins = max(1, min(SHARE_BINS, last))
    edges = np.linspace(0, last, nbins + 1)
    counts = {src: np.zeros(nbins) for src in sources}
    for step, per in picks:
        i = min(int(np.searchsorted(edges, step, side="left")) - 1, nbins - 1)
        for src, n in per.items():
            counts[src][max(i, 0)] += float(n or 0)
    total = sum(counts.values())
    keep = total > 0
    centers = ((edges[:-1] + edges[1:]) / 2)[keep]
    return centers, {src: c[keep] / total[keep] for src, c in counts.items()}


def plot_selection(rows: list[dict], path: Path) -> None:
    """Per selector (row) and budget (column): stacked share of each source among selected rows over steps."""
    budgets = _budgets(rows)
    series = {(r["arm"], r["budget"]): _share_series(r["_jobs"]) for r in rows}
    selectors = list(dict.fromkeys(s for (s, _), (x, _) in series.items() if len(x)))  # rows with data only
    sources = sorted({src for _, sh in series.values() for src in sh})
    if not sources or not budgets:
        return _empty(path, "no selected_per_source logged")
    colors = dict(zip(sources, plt.get_cmap("tab10").colors))
    fig, axes = plt.subplots(len(selectors), len(budgets), figsize=(4 * len(budgets), 2.5 * len(selectors) + 0.8),
                             squeeze=False, sharex=True, sharey=True)
    for i, sel in enumerate(selectors):
        for k, b in enumerate(budgets):
            ax = axes[i][k]
            x, sh = series.get((sel, b), (np.array([]), {}))
            if len(x) == 0:
                ax.axis("off")
                continue
            ax.stackplot(x, *[sh.get(s, np.zeros_like(x)) for s in sources],
                         colors=[colors[s] for s in sources], labels=sources)
            ax.set_ylim(0, 1)
            ax.set_title(f"{sel} · budget {b:g}", fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelbottom=True, labelleft=True)  # sharex/sharey would hide them next to a blank panel
        axes[i][0].set_ylabel("share")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[s]) for s in sources]
    fig.legend(handles, sources, loc="upper center", ncol=len(sources), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))
    fig.savefig(path, dpi=100)
    plt.close(fig)
