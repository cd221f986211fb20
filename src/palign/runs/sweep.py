"""One table for a whole sweep: every job's ``summary.json`` collected at the sweep root as
``sweep_table.md`` and ``sweep_table.csv``.

Written by the Hydra callback :class:`SweepTable` when a multirun ends (any launcher or sweeper),
and by ``python -m palign.sweep <sweep dir>`` for sweeps run outside Hydra (SLURM array jobs).
When the sweep's jobs log to W&B, the callback also logs the table as a ``wandb.Table`` in one
extra W&B run of the sweep's group (:func:`log_to_wandb`).
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from palign.constants import TRAITS
from palign.errors import RunDirError, cli
from palign.eval.records import Aggregate, Summary
from palign.report.html import write_page
from palign.rundir import RunDir
from palign.runs.tracking import RunTracker

log = logging.getLogger("palign")

COLUMNS = ["job", "overrides", "method", "model", "protocol", "subjects", *TRAITS, "score",
           "score_ci_lo", "score_ci_hi", "unk_rate", "selection_score", "align_s_per_subject",
           "eval_s_per_subject"]  # fmt: skip


def objective(cfg: DictConfig, summary: Summary) -> float | None:
    """What ``python -m palign`` returns to a Hydra sweeper: the summary's value of
    ``cfg.optimized_metric`` (None when no metric is configured; the only one allowed is
    ``selection_score``: see :func:`palign.config.build.check_objective`)."""
    metric = cfg.get("optimized_metric")
    return getattr(summary, metric) if metric else None


def _entry_row(
    job: str,
    overrides: str,
    summary: Summary,
    name: str,
    entry: Aggregate,
    model: str,
    selection_score: float | None = None,
) -> dict:
    timing = entry.timing or {}
    lo, hi = _score_ci(entry) or (None, None)
    return {
        "job": job,
        "overrides": overrides,
        "method": name,
        "model": model,
        "protocol": summary.protocol.name,
        "subjects": entry.n_subjects,
        **{t: entry.mae[t] for t in TRAITS},
        "score": entry.score,
        "score_ci_lo": lo,
        "score_ci_hi": hi,
        "unk_rate": entry.unk_rate,
        "selection_score": selection_score,
        "align_s_per_subject": timing.get("align_s_per_subject"),
        "eval_s_per_subject": timing.get("eval_s_per_subject"),
    }


def _score_ci(entry: Aggregate) -> tuple[float, float] | None:
    """The Score's 95 % interval (None: fewer than 2 subjects, or a summary from before)."""
    return entry.ci["score"] if entry.ci else None


def _overrides(job_dir: Path) -> str:
    path = RunDir(job_dir).overrides
    return " ".join(OmegaConf.load(path)) if path.is_file() else ""


def _job_order(job_dir: Path) -> tuple[int, str]:
    """Hydra job dirs ``<num>_...`` in job order, other dirs after them by name."""
    head = job_dir.name.split("_")[0]
    return (int(head) if head.isdigit() else sys.maxsize, job_dir.name)


def collect(sweep_dir: Path) -> tuple[list[dict], list[str]]:
    """Rows of every job under ``sweep_dir`` (main and compared methods, then the statistical
    baselines once per distinct subject set and coding) and the job dirs without a summary."""
    rows, missing, seen = [], [], set()
    found = (
        [p for p in sweep_dir.iterdir() if RunDir(p).config.is_file()] if sweep_dir.is_dir() else []
    )
    jobs = sorted(found, key=_job_order)
    baseline_rows = []
    for job in jobs:
        run_dir = RunDir(job)
        if not run_dir.summary.is_file():
            missing.append(job.name)
            continue
        summary = run_dir.read_summary()
        overrides = _overrides(job)
        for name, entry in summary.methods().items():
            chosen = summary.selection_score if name == summary.method else None
            rows.append(
                _entry_row(job.name, overrides, summary, name, entry, summary.model, chosen)
            )
        key = (summary.protocol.coding, tuple(summary.cases))
        if key not in seen:
            seen.add(key)
            for name, entry in summary.baselines.items():
                row = _entry_row(job.name, "", summary, f"{name} (no LLM)", entry, "-")
                baseline_rows.append(row)
    return rows + baseline_rows, missing


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "-" if value is None else str(value)


def write_table(
    sweep_dir: Path, collected: tuple[list[dict], list[str]] | None = None
) -> Path | None:
    """Write ``sweep_table.md``, ``.csv`` and ``.html`` in ``sweep_dir`` from ``collected``
    (what :func:`collect` returned, read again when not given); returns the markdown path (None
    when no job has a summary yet)."""
    rows, missing = collected or collect(sweep_dir)
    if not rows:
        log.warning("sweep %s: no job has a summary.json yet; no sweep table", sweep_dir)
        return None
    with open(sweep_dir / "sweep_table.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        f"# palign sweep: {sweep_dir}",
        "",
        "Per-trait mean absolute error (1..5 scale) over each job's subjects; Score = sum "
        "(lower is better). Baselines use no LLM and are shown once per subject set.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
        *("| " + " | ".join(_cell(row[c]) for c in COLUMNS) + " |" for row in rows),
    ]
    if missing:
        lines += ["", f"Jobs without a summary (failed or unfinished): {', '.join(missing)}"]
    path = sweep_dir / "sweep_table.md"
    path.write_text("\n".join(lines) + "\n")
    write_page(
        sweep_dir / "sweep_table.html", path.read_text(), [], f"palign sweep {sweep_dir.name}"
    )
    log.info("Sweep table: %s", path)
    return path


def log_to_wandb(config: DictConfig, sweep_dir: Path, rows: list[dict] | None = None) -> bool:
    """Log the sweep table (``rows``, default the rows of :func:`collect`, cells in
    :data:`COLUMNS` order) as the
    ``wandb.Table`` ``sweep_table`` of one W&B run for the sweep (``job_type`` ``sweep``, in the
    group of its jobs, see :meth:`RunTracker.for_sweep`), then finish that run. ``config`` is
    the sweep's config; returns False (and logs nothing) when its ``logger`` has no W&B logger
    or no job has a summary."""
    rows = collect(sweep_dir)[0] if rows is None else rows
    tracker = RunTracker.for_sweep(config, sweep_dir) if rows else RunTracker()
    if not tracker.loggers:
        return False
    ok = False
    try:
        tracker.table("sweep_table", COLUMNS, [[row[c] for c in COLUMNS] for row in rows])
        ok = True
    finally:
        tracker.close(ok)
    log.info(
        "Sweep table logged to W&B (a run of job_type sweep, files in %s)", sweep_dir / "wandb"
    )
    return True


class SweepTable(Callback):
    """Hydra callback: the sweep table at the sweep root when a multirun ends, and as a W&B
    table when the jobs log to W&B."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        collected = collect(sweep_dir)  # every job's summary, read once for both
        path = write_table(sweep_dir, collected)
        if path is not None:
            print(path.read_text())
            log_to_wandb(config, sweep_dir, collected[0])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="palign sweep", description="Collect a sweep's job summaries into a table."
    )
    parser.add_argument("sweep_dir", type=Path, help="dir whose sub-dirs are palign run dirs")
    args = parser.parse_args(argv)
    with cli("palign sweep"):
        if not args.sweep_dir.is_dir():
            raise RunDirError(f"{args.sweep_dir} is not a directory")
        path = write_table(args.sweep_dir)
        if path is None:
            raise RunDirError(f"no summary.json under {args.sweep_dir}/*/")
    print(path.read_text())


if __name__ == "__main__":
    main()
