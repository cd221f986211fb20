"""The plots of a finished run (:class:`~palign.report.results.Run`), matplotlib figures
rendered by Agg without pyplot: ``trait_errors``: per-trait MAE per method, error bars the
standard error over subjects; ``pas_alpha``: PAS Score against alpha per subject and their mean;
``head_accuracy``: mean probe validation accuracy per head; ``confusion_<method>``: predicted
against target answer counts per trait; ``trait_validity``: each method's keyed trait mean
against the subject's, one point per subject, with the correlation across subjects;
``paired_differences``: the main method's Score minus each other's, with 95 % intervals. Every
run draws them (``plots/``), and ``palign reproduce`` for each protocol."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from palign.constants import TRAITS
from palign.eval.answers import read_answers
from palign.report.markdown import fmt, stat
from palign.report.results import MethodResult, ReproduceError, Run
from palign.rundir import RunDir

ALPHA_KEYS = {
    "alpha_scores": "Score on the subject's own 120 alignment items (k-fold, held-out)",
    "alpha_scores_on_test_items": "Score on the 180 test items",
}


def standard_error(values: Sequence[float]) -> float:
    """Standard error of the mean of the finite ``values`` (std with ddof 1 / sqrt(n)); NaN for
    fewer than two."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    return float(x.std(ddof=1) / np.sqrt(x.size)) if x.size > 1 else float("nan")


# --- plots -----------------------------------------------------------------------------------


def _title(run: Run, what: str) -> str:
    s = run.summary
    return f"{what}\n{s.model}, protocol={run.protocol}, {len(s.cases)} subject(s)"


def plot_trait_errors(run: Run, path: Path) -> None:
    """Grouped bars: per-trait MAE (summary.json's means) per method, error bars the standard
    error over subjects; the paper's PAS per-trait MAE as markers where known."""
    fig = Figure(figsize=(11, 5), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(TRAITS))
    width = 0.8 / len(run.methods)
    colors = [f"C{i % 10}" for i in range(len(run.methods))]
    for i, (m, color) in enumerate(zip(run.methods, colors)):
        pos = x - 0.4 + width * (i + 0.5)
        heights = [m.entry.mae[t] for t in TRAITS]
        missing = " (n/a: no parsed answer)" if not np.isfinite(heights).any() else ""
        errors = [standard_error([r.mae[t] for r in m.rows]) for t in TRAITS]
        ax.bar(
            pos,
            heights,
            width,
            yerr=np.nan_to_num(errors),
            capsize=2,
            color=color,
            hatch=None if m.uses_llm else "//",
            edgecolor="white" if m.uses_llm else "black",
            label=m.label + missing,
        )
        paper = run.published(m)
        if paper is not None and paper.mae is not None:
            ax.plot(pos, [paper.mae[t] for t in TRAITS], "kD", label=f"{m.name}: paper's Table 1")
    ax.set_xticks(x, TRAITS)
    ax.set_xlabel("trait")
    ax.set_ylabel("MAE (1..5 scale; lower is better)")
    ax.set_title(_title(run, "Per-trait MAE per method (error bars: standard error over subjects)"))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    fig.savefig(path, dpi=120)


def plot_pas_alpha(run: Run, path: Path) -> bool:
    """PAS Score against alpha: one thin line per subject, their mean thick. False (nothing
    written) when the run has no PAS rows with alpha scores."""
    pas = run.method("pas")
    infos = [r.align_info for r in pas.rows] if pas is not None else []
    key = next((k for k in ALPHA_KEYS if infos and all(k in i for i in infos)), None)
    if key is None:
        return False
    alphas = sorted(float(a) for a in infos[0][key])
    scores = np.array([[i[key][str(a)] for a in alphas] for i in infos], dtype=np.float64)
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for line in scores:
        ax.plot(alphas, line, color="0.6", lw=0.8, alpha=0.7)
    finite = np.isfinite(scores)
    mean = np.where(
        finite.any(0), np.where(finite, scores, 0).sum(0) / np.maximum(finite.sum(0), 1), np.nan
    )
    ax.plot(alphas, mean, "o-", color="C3", lw=2.5, label=f"mean of {len(scores)} subject(s)")
    ax.plot([], [], color="0.6", lw=0.8, label="one subject")
    if not finite.any():
        ax.text(
            0.5,
            0.5,
            "no finite score: every answer unparsed",
            transform=ax.transAxes,
            ha="center",
        )
    ax.set_xticks(alphas)
    ax.set_xlabel("alpha (shift in units of sigma)")
    ax.set_ylabel(ALPHA_KEYS[key] + "\n(lower is better)", fontsize="small")
    ax.set_title(_title(run, "PAS Score against alpha"))
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)
    return True


def plot_head_accuracy(run: Run, path: Path) -> bool:
    """Heatmap layers x heads of the probe validation accuracy (``head_accuracy.npy``, (groups,
    layers, heads)), mean over groups (NaN groups left out) then over subjects. False (nothing
    written) when the run dir holds no such file."""
    run_dir = RunDir(run.path)
    files = run_dir.artifact_files("head_accuracy.npy")
    if not files:
        return False
    arrays = [np.load(f) for f in files]
    shapes = {a.shape[1:] for a in arrays}
    if len(shapes) != 1:
        raise ReproduceError(f"{run_dir.artifacts_root}: head_accuracy.npy shapes differ: {shapes}")
    per_subject = np.stack(
        [np.where(np.isfinite(a), a, 0).sum(0) / np.isfinite(a).sum(0) for a in arrays]
    )
    accuracy = per_subject.mean(0)
    fig = Figure(figsize=(max(8, 0.35 * accuracy.shape[1] + 2), 5.5), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(accuracy, origin="lower", aspect="auto", cmap="viridis")
    fig.colorbar(image, ax=ax, label="probe validation accuracy")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(_title(run, "PAS probe accuracy per head (validation, subject mean)"))
    fig.savefig(path, dpi=120)
    return True


#: Answer values of the confusion matrices: raw 5..1 (A..E), and 0 = unparsed (predicted only).
ANSWER_VALUES = (5, 4, 3, 2, 1)


def confusion(table: pd.DataFrame, trait: str) -> np.ndarray:
    """(5, 6) counts of one trait's selected answers: rows the subject's raw answer 5..1 (A..E),
    columns the predicted one 5..1 then unparsed; items without a subject answer left out."""
    lines = table[table["selected"] & (table["trait"] == trait) & (table["target"] != 0)]
    cols = (*ANSWER_VALUES, 0)
    out = np.zeros((len(ANSWER_VALUES), len(cols)), dtype=np.int64)
    for i, target in enumerate(ANSWER_VALUES):
        predicted = lines["predicted"][lines["target"] == target].to_numpy()
        out[i] = [(predicted == c).sum() for c in cols]
    return out


def plot_confusion(run: Run, m: MethodResult, path: Path) -> None:
    """One panel per trait: the subjects' answers (rows) against the method's (columns), counts
    over all subjects from the answers files, shaded by the share of their row."""
    table = read_answers(run.path, m.name)
    fig = Figure(figsize=(17, 4.2), layout="constrained")
    axes = fig.subplots(1, len(TRAITS), sharey=True)
    letters = [f"{v} ({chr(ord('A') + 5 - v)})" for v in ANSWER_VALUES]
    for ax, trait in zip(axes, TRAITS):
        counts = confusion(table, trait)
        share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
        image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for (i, j), n in np.ndenumerate(counts):
            ax.text(
                j,
                i,
                str(n),
                ha="center",
                va="center",
                fontsize=8,
                color="white" if share[i, j] > 0.6 else "black",
                in_layout=False,  # inside its axes: the layout need not measure 150 texts
            )
        ax.set_xticks(range(counts.shape[1]), [*letters, "UNK"], rotation=45, fontsize=7)
        ax.set_yticks(range(counts.shape[0]), letters, fontsize=7)
        ax.set_title(f"{trait}: MAE {fmt(m.entry.mae[trait])}")
        ax.set_xlabel("predicted answer")
    axes[0].set_ylabel("subject's answer (raw)")
    fig.colorbar(image, ax=axes, label="share of the row", shrink=0.8)
    fig.suptitle(_title(run, f"{m.label}: answers per trait, counts over subjects"))
    fig.savefig(path, dpi=110)


def plot_trait_validity(run: Run, path: Path) -> None:
    """One panel per trait: each method's keyed trait mean (y) against the subject's (x), one
    point per subject, the correlation across subjects (with its 95 % interval) in the legend;
    the diagonal is a perfect match."""
    fig = Figure(figsize=(17, 4.2), layout="constrained")
    axes = fig.subplots(1, len(TRAITS), sharex=True, sharey=True)
    for ax, trait in zip(axes, TRAITS):
        ax.plot([1, 5], [1, 5], color="0.7", lw=0.8)
        for i, m in enumerate(run.methods):
            x = [r.subject_means[trait] for r in m.rows]
            y = [r.model_means[trait] for r in m.rows]
            v = m.entry.validity
            r = stat(v.trait_r[trait], v.ci[f"trait_r.{trait}"]) if v else "n/a"
            marker = "o" if m.uses_llm else "x"
            ax.scatter(x, y, s=12, marker=marker, color=f"C{i % 10}", label=f"{m.label}: r {r}")
        ax.set_title(f"{trait}: keyed trait mean")
        ax.set_xlabel("subject's (test items)")
        ax.legend(fontsize=6, loc="upper left")
    axes[0].set_ylabel("method's")
    fig.suptitle(_title(run, "Trait means per subject: method against subject"))
    fig.savefig(path, dpi=110)


def plot_paired_differences(run: Run, path: Path) -> bool:
    """The main method's Score minus each compared method's and baseline's (mean over subjects,
    95 % bootstrap interval; left of 0: the main method is better). False (nothing written)
    when the summary holds no paired tests."""
    tests = [t for t in run.summary.tests if t.diff is not None]
    if not tests:
        return False
    fig = Figure(figsize=(8, 1.2 + 0.5 * len(tests)), layout="constrained")
    ax = fig.add_subplot()
    y = np.arange(len(tests))
    diffs = np.array([t.diff for t in tests])
    lo = np.array([t.ci[0] if t.ci else t.diff for t in tests])
    hi = np.array([t.ci[1] if t.ci else t.diff for t in tests])
    for i, t in enumerate(tests):
        color = "C0" if t.ci is not None and t.holds(t.level) else "0.5"
        xerr = [[diffs[i] - lo[i]], [hi[i] - diffs[i]]]
        ax.errorbar(diffs[i], y[i], xerr=xerr, fmt="o", color=color, capsize=3)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(y, [f"{t.a} - {t.b} ({t.n} subj.)" for t in tests], fontsize=8)
    ax.set_xlabel("Score difference (left of 0: the first is better); 95 % bootstrap interval")
    ax.set_title(_title(run, "Paired Score differences (grey: not distinguishable from 0)"))
    fig.savefig(path, dpi=110)
    return True


def plot_run(run: Run, folder: Path, suffix: str = "") -> list[Path]:
    """The run's plots in ``folder``: ``trait_errors<suffix>.png``, ``trait_validity`` and
    ``paired_differences`` (where the summary has them), a ``confusion_<method><suffix>.png``
    per method that used the model (per baseline in a run without one), ``pas_alpha`` and
    ``head_accuracy`` when PAS was run; returns the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"trait_errors{suffix}.png"
    plot_trait_errors(run, path)
    written = [path]
    if run.summary.main.validity is not None:  # rows with trait means of every subject
        path = folder / f"trait_validity{suffix}.png"
        plot_trait_validity(run, path)
        written.append(path)
    for name, plot in (
        ("paired_differences", plot_paired_differences),
        ("pas_alpha", plot_pas_alpha),
        ("head_accuracy", plot_head_accuracy),
    ):
        path = folder / f"{name}{suffix}.png"
        if plot(run, path):
            written.append(path)
    # Each method that used the model; the baselines only in a run without one (their answers
    # are a function of the subjects' own, and trait_validity already sets them beside it).
    for m in [m for m in run.methods if m.uses_llm] or run.methods:
        path = folder / f"confusion_{m.name}{suffix}.png"
        plot_confusion(run, m, path)
        written.append(path)
    return written
