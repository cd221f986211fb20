"""The judge's section of a run's report (``report.md``) and its plot
(``plots/judge_win_rates.png``), from ``judgments/summary.json`` (:mod:`palign.eval.judge`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure


def _share(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def judge_section(summary: dict) -> str:
    """Markdown: per method the mean rating with its interval and the unparseable count, then
    the pairwise win / tie / loss rates."""
    level = summary["bootstrap"]["level"]
    lines = [
        "## Open-ended replies, judged",
        "",
        f"Judge: {summary['judge']}. Each reply rated from 1 (not aligned) to 6 (perfectly "
        "aligned) with the subject's own answer to the item (docs/judge.md). Mean: over "
        f"subjects of each subject's mean rating; {100 * level:g}% interval: percentile "
        f"bootstrap over subjects ({summary['bootstrap']['n_boot']} resamples, seed "
        f"{summary['bootstrap']['seed']}).",
        "",
        f"| Method | Subjects | Judged | Rated | Unparseable | Mean rating | {100 * level:g}% CI |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for m, s in summary["methods"].items():
        mean = "n/a" if s["mean"] is None else f"**{s['mean']:.3f}**"
        ci = "n/a" if s["ci"] is None else f"[{s['ci'][0]:.3f}, {s['ci'][1]:.3f}]"
        lines.append(
            f"| {m} | {s['subjects']} | {s['judged']} | {s['rated']} | {s['unparseable']} "
            f"| {mean} | {ci} |"
        )
    if any(s["no_target"] for s in summary["methods"].values()):
        skipped = ", ".join(f"{m} {s['no_target']}" for m, s in summary["methods"].items())
        lines += ["", f"Replies not judged (the subject left the item unanswered): {skipped}."]
    pairs = [(a, b, p) for a, row in summary["pairs"].items() for b, p in row.items() if a < b]
    if pairs:
        lines += [
            "",
            "Win rates over the (subject, item) pairs both methods have a rating for: A wins "
            "where its rating is higher.",
            "",
            "| A | B | Pairs | A wins | Tie | B wins |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for a, b, p in pairs:
            lines.append(
                f"| {a} | {b} | {p['n']} | {_share(p['win'])} | {_share(p['tie'])} "
                f"| {_share(p['loss'])} |"
            )
    return "\n".join(lines) + "\n"


def plot_judge_win_rates(summary: dict, path: Path) -> bool:
    """A heatmap: the share of pairs where the row's method is rated higher than the column's
    (ties: the rest). False (nothing drawn) with fewer than two methods."""
    methods = list(summary["methods"])
    if len(methods) < 2:
        return False
    n = len(methods)
    grid = np.full((n, n), np.nan)
    for i, a in enumerate(methods):
        for j, b in enumerate(methods):
            win = summary["pairs"].get(a, {}).get(b, {}).get("win") if a != b else None
            grid[i, j] = np.nan if win is None else win
    fig = Figure(figsize=(1.6 + 1.1 * n, 1.2 + 0.9 * n))
    ax = fig.add_subplot()
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn")
    for i in range(n):
        for j in range(n):
            if np.isfinite(grid[i, j]):
                ax.text(j, i, f"{100 * grid[i, j]:.0f}%", ha="center", va="center", fontsize=9)
    ax.set_xticks(range(n), methods, rotation=30, ha="right")
    ax.set_yticks(range(n), methods)
    ax.set_xlabel("against")
    ax.set_ylabel("method rated higher")
    ax.set_title(f"Judged win rates ({summary['judge']})", fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return True
