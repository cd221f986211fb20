"""A run's summary (``summary.json``): the method's aggregate beside the compared methods' and
the statistical baselines', the selection score a sweeper may minimise, and the files written
from it (``summary.json``, ``report.md``, the per-method JSON-lines files)."""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
from omegaconf import DictConfig

from palign import __version__
from palign.data.papi import PapiData, Subject
from palign.eval.metrics import aggregate
from palign.methods.base import Method
from palign.report.markdown import report_markdown
from palign.rundir import SCHEMA_VERSION, RunDir, write_atomic


def aggregate_baselines(rows: dict[str, Sequence[dict]]) -> dict[str, dict]:
    """:func:`aggregate` of each baseline's rows, without timings (they use no model)."""
    out = {}
    for name, baseline in rows.items():
        entry = aggregate(baseline)
        entry.pop("timing", None)
        out[name] = entry
    return out


def with_setup_cost(entry: dict, cost: dict | None) -> dict:
    """``entry`` (an aggregate) with the method's one-off set-up cost beside its per-subject
    cost, when it used a model."""
    if cost is not None:
        entry.setdefault("cost", {})["setup"] = cost
    return entry


def selection_score(rows: Sequence[dict]) -> float | None:
    """Mean over subjects of the cross-validated Score of the chosen hyper-parameters on the
    subjects' own alignment items (``align_info.selection_score``, e.g. PAS under
    protocol=clean); None when a method selected nothing there. The objective of
    ``hparams_search``: it never reads a test item."""
    scores = [r.get("align_info", {}).get("selection_score") for r in rows]
    if not rows or any(s is None for s in scores):
        return None
    return float(np.mean(scores))


def summarize(
    cfg: DictConfig,
    method: Method,
    model_name: str,
    data: PapiData,
    subjects: Sequence[Subject],
    rows: Sequence[dict],
    compare: dict[str, dict],
    baselines: dict[str, Sequence[dict]],
    baselines_all: dict[str, Sequence[dict]],
    notes: Sequence[str] = (),
) -> dict:
    """The run's ``summary.json`` content: the method's aggregate beside the compared methods'
    and the statistical baselines' (``baselines``: their rows on the same subjects;
    ``baselines_all``: on all loaded subjects), and every method's ``notes`` for the report."""
    return {
        "schema": SCHEMA_VERSION,
        "method": method.name,
        "model": model_name,
        "protocol": {
            "name": cfg.protocol.name,
            "coding": cfg.protocol.coding,
            "scoring": cfg.scoring.mode if method.uses_llm else "none (no LLM)",
        },
        "n_test_items": len(data.inventory.test),
        **aggregate(rows),
        "selection_score": selection_score(rows),
        "cases": [s.case for s in subjects],
        "shard": cfg.dataset.get("shard"),
        "compare": compare,
        "baselines": aggregate_baselines(baselines),
        "baselines_all_subjects": aggregate_baselines(baselines_all),
        "notes": list(notes),
        "versions": {"palign": __version__},
    }


def write_outputs(run_dir: RunDir, summary: dict, rows: dict[str, Sequence[dict]]) -> str:
    """``summary.json``, ``report.md`` and the per-method JSON-lines files (``results.jsonl``
    for the main method, ``compare/<name>.jsonl`` for the others); returns the report."""
    for name, method_rows in rows.items():
        run_dir.write_rows(name, summary["method"], method_rows)
    write_atomic(run_dir.summary, json.dumps(summary, indent=2))
    report = report_markdown(summary)
    write_atomic(run_dir.report, report)
    return report
