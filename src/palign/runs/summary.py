"""A run's summary (``summary.json``): the method's aggregate beside the compared methods' and
the statistical baselines', and the files written from it (``summary.json``, the per-method
JSON-lines files, the report)."""

from __future__ import annotations

from collections.abc import Sequence

from omegaconf import DictConfig

from palign import __version__
from palign.data.papi import PapiData, Subject
from palign.eval.records import (
    Aggregate,
    ResultRow,
    RunProtocol,
    Summary,
    aggregate,
    mean_selection_score,
    paired_tests,
)
from palign.methods.base import Method
from palign.report.write import write_report
from palign.rundir import RunDir


def aggregate_baselines(rows: dict[str, Sequence[ResultRow]]) -> dict[str, Aggregate]:
    """The aggregate of each baseline's rows, without timings (they use no model)."""
    return {name: aggregate(baseline).untimed() for name, baseline in rows.items()}


def summarize(
    cfg: DictConfig,
    method: Method,
    model_name: str,
    data: PapiData,
    subjects: Sequence[Subject],
    rows: dict[str, Sequence[ResultRow]],
    baselines: dict[str, Sequence[ResultRow]],
    baselines_all: dict[str, Aggregate],
    notes: Sequence[str] = (),
    setup_cost: dict[str, dict[str, int] | None] | None = None,
) -> Summary:
    """The run's summary: the aggregate of each method's ``rows`` (the main method's and the
    compared ones', by name; each with its one-off ``setup_cost`` when it used a model) beside
    the statistical baselines' (``baselines``: their rows on the same subjects;
    ``baselines_all``: their aggregates on all loaded subjects, untimed), the main method
    compared with each of the others subject by subject, and every method's ``notes``."""
    cost = setup_cost or {}
    main = rows[method.name]
    others = {name: r for name, r in rows.items() if name != method.name}
    tests, needed = paired_tests(
        method.name, main, {**others, **{n: r for n, r in baselines.items() if n not in rows}}
    )
    return Summary(
        method=method.name,
        model=model_name,
        protocol=RunProtocol(
            name=cfg.protocol.name,
            coding=cfg.protocol.coding,
            scoring=cfg.scoring.mode if method.uses_llm else "none (no LLM)",
        ),
        n_test_items=len(data.inventory.test),
        main=aggregate(main).with_setup_cost(cost.get(method.name)),
        selection_score=mean_selection_score(main),
        cases=[s.case for s in subjects],
        shard=cfg.dataset.get("shard"),
        compare={n: aggregate(r).with_setup_cost(cost.get(n)) for n, r in others.items()},
        baselines=aggregate_baselines(baselines),
        baselines_all_subjects=dict(baselines_all),
        notes=list(notes),
        versions={"palign": __version__},
        tests=tests,
        subjects_needed=needed,
    )


def write_outputs(run_dir: RunDir, summary: Summary, rows: dict[str, Sequence[ResultRow]]) -> str:
    """``summary.json``, the per-method JSON-lines files (``results.jsonl`` for the main method,
    ``compare/<name>.jsonl`` for the others) and the pages for readers (``report.md``, plots,
    ``report.html``: :func:`~palign.report.write.write_report`); returns the report."""
    for name, method_rows in rows.items():
        run_dir.write_rows(name, summary.method, method_rows)
    run_dir.write_summary(summary)
    return write_report(run_dir, summary)
