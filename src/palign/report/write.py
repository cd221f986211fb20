"""A run dir's pages for readers, all from its files: ``report.md`` (the summary's tables, then
the judge's section once ``palign judge`` has rated the run's open-ended replies), the plots in
``plots/`` and ``report.html`` (the report with every plot embedded). Written at the end of a
run, a merge and ``palign judge``, so each shows what the run dir holds then."""

from __future__ import annotations

from pathlib import Path

from palign.eval.records import Summary
from palign.report.html import write_page
from palign.report.judge import judge_section, plot_judge_win_rates
from palign.report.markdown import report_markdown
from palign.report.plots import plot_run
from palign.report.results import load_run
from palign.rundir import RunDir, write_atomic


def report_text(run_dir: RunDir, summary: Summary) -> str:
    """The markdown of ``report.md``: :func:`report_markdown` of ``summary``, then the judge's
    section where ``judgments/summary.json`` exists."""
    text = report_markdown(summary)
    judged = run_dir.read_judgments_summary()
    return text if judged is None else f"{text}\n{judge_section(judged)}"


def write_report(run_dir: RunDir, summary: Summary | None = None) -> str:
    """Write ``report.md``, the plots (:func:`plot_run` over the run read back and checked by
    :func:`load_run`; the judged win rates where judged) and ``report.html``; returns the
    markdown. ``summary``: the run's, read from ``summary.json`` when None."""
    summary = run_dir.read_summary() if summary is None else summary
    text = report_text(run_dir, summary)
    write_atomic(run_dir.report, text)
    plots: list[Path] = plot_run(load_run(run_dir.path), run_dir.plots)
    judged = run_dir.read_judgments_summary()
    win_rates = run_dir.plots / "judge_win_rates.png"
    if judged is not None and plot_judge_win_rates(judged, win_rates):
        plots.append(win_rates)
    write_page(run_dir.html, text, plots, f"palign: {summary.method} on {summary.model}")
    return text
