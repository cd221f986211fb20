"""A finished run dir read back for readers: its ``summary.json`` and every method's and
baseline's per-subject numbers, computed from the answers files (``answers/<method>/<case>.csv``)
and checked against ``summary.json`` and the result rows to the last digit (:func:`load_run`).
A file that is missing, corrupt or disagrees is a :class:`ReproduceError` naming it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from palign.constants import TRAITS
from palign.errors import RunDirError
from palign.eval.answers import read_table, table_metrics
from palign.eval.records import Aggregate, ResultRow, Summary, aggregate, paired_tests
from palign.report.published import PAPER_MODEL, Published, published
from palign.rundir import RunDir


class ReproduceError(RunDirError):
    """A run dir that cannot be read; the message names the file."""


@dataclass
class MethodResult:
    """One method of a run: its aggregate from ``summary.json`` and its per-subject rows."""

    name: str
    uses_llm: bool
    entry: Aggregate
    rows: list[ResultRow]

    @property
    def steps(self) -> int | None:
        """Training steps per subject recorded by DPO/PPO (``align_info.steps``), else None."""
        steps = {r.align_info["steps"] for r in self.rows if "steps" in r.align_info}
        return steps.pop() if len(steps) == 1 else None

    @property
    def label(self) -> str:
        if not self.uses_llm:
            return f"{self.name} (no LLM)"
        return f"{self.name} ({self.steps} steps)" if self.steps is not None else self.name


@dataclass
class Run:
    """A finished run dir: its summary and every method's results."""

    path: Path
    summary: Summary
    methods: list[MethodResult]

    @property
    def protocol(self) -> str:
        return self.summary.protocol.name

    @property
    def paper_model(self) -> str | None:
        return PAPER_MODEL.get(self.summary.model)

    def published(self, m: MethodResult) -> Published | None:
        """The paper's published numbers for ``m`` on this run's model (LLM methods only)."""
        return published(self.summary.model, m.name) if m.uses_llm else None

    def method(self, name: str) -> MethodResult | None:
        return next((m for m in self.methods if m.name == name and m.uses_llm), None)

    @classmethod
    def of(
        cls,
        path: Path,
        summary: Summary,
        rows: dict[str, list[ResultRow]],
        baselines: dict[str, list[ResultRow]],
    ) -> Run:
        """A run from its summary and per-subject rows: ``rows`` of the main and compared
        methods by name, ``baselines`` the statistical baselines' rows."""
        methods = [
            MethodResult(name, summary.uses_llm, entry, rows[name])
            for name, entry in summary.methods().items()
        ]
        methods += [
            MethodResult(name, False, entry, baselines[name])
            for name, entry in summary.baselines.items()
            if name != summary.method
        ]
        return cls(path, summary, methods)


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def _differences(entry: Aggregate, again: Aggregate) -> list[str]:
    """The aggregate fields (``n_subjects``, per-trait MAE, Score, UNK rate, their intervals,
    the validity metrics) where ``again`` differs from ``entry`` in any digit. A summary
    written before intervals and validity (schema 1) is checked on the others."""
    pairs = [
        ("n_subjects", entry.n_subjects, again.n_subjects),
        *((f"mae.{t}", entry.mae[t], again.mae[t]) for t in TRAITS),
        ("score", entry.score, again.score),
        ("unk_rate", entry.unk_rate, again.unk_rate),
    ]
    out = [f"{key} {b!r} vs {a!r}" for key, a, b in pairs if not _same(float(a), float(b))]
    for key in ("ci", "validity"):
        if getattr(entry, key) is not None and getattr(entry, key) != getattr(again, key):
            out.append(f"{key} {getattr(again, key)!r} vs {getattr(entry, key)!r}")
    return out


def answers_rows(
    path: Path, name: str, cases: Sequence[int], stored: Sequence[ResultRow] = ()
) -> list[ResultRow]:
    """Per-subject rows of method ``name`` computed from the run's answers files
    (``answers/<name>/<case>.csv``, :mod:`palign.eval.answers`) in ``cases`` order, each with
    the method's other per-subject fields (``align_info``, timings) from ``stored`` rows. A
    stored row whose metrics differ from its answers file's is an error naming the file."""
    by_case = {r.case: r for r in stored}
    rows = []
    for case in cases:
        file = RunDir(path).answers_file(name, case)
        if not file.is_file():
            raise ReproduceError(
                f"{file}: missing (every subject's answers of {name}; runs of palign before "
                "answers files were kept cannot be reproduced from their answers)"
            )
        try:
            metrics = table_metrics(read_table(file))
        except (ValueError, KeyError, pd.errors.ParserError) as e:
            raise ReproduceError(f"{file}: not a palign answers file ({e})") from None
        kept = by_case.get(case)
        row = ResultRow.of(metrics, case, name)
        if kept is not None:
            differ = _differences(aggregate([kept]), aggregate([row]))
            if differ:
                raise ReproduceError(
                    f"{file}: its answers give {name}'s case {case} other metrics than the "
                    f"run's result row ({'; '.join(differ)}): edited, or from another run?"
                )
            row = replace(kept, **vars(metrics))
        rows.append(row)
    return rows


def load_run(path: Path) -> Run:
    """Read a run dir, every method's per-subject numbers computed from its answers files and
    checked against ``summary.json`` to the last digit; :class:`ReproduceError` names the file
    that is missing, corrupt or disagrees."""
    run_dir = RunDir(path)
    summary, summary_path = run_dir.read_summary(), run_dir.summary
    cases, main = summary.cases, summary.method
    stored = {name: run_dir.read_rows(name, main) for name in summary.methods()}
    rows = {name: answers_rows(path, name, cases, r) for name, r in stored.items()}
    baselines = {name: answers_rows(path, name, cases) for name in summary.baselines}
    entries = {
        **summary.methods(),
        **{f"{n} (baseline)": e for n, e in summary.baselines.items()},
    }
    computed = {**rows, **{f"{n} (baseline)": r for n, r in baselines.items()}}
    for name, entry in entries.items():
        differ = _differences(entry, aggregate(computed[name]))
        if differ:
            raise ReproduceError(
                f"{summary_path}: {name} recomputed from {run_dir.answers(name).parent} differs "
                f"({'; '.join(differ)}): edited, or from another run?"
            )
    others = {n: r for n, r in {**rows, **baselines}.items() if n != main}
    tests, needed = paired_tests(main, rows[main], others)
    if summary.tests and (tests, needed) != (summary.tests, summary.subjects_needed):
        raise ReproduceError(
            f"{summary_path}: the paired tests recomputed from {run_dir.answers(main).parent} "
            "differ from the summary's: edited, or from another run?"
        )
    return Run.of(path, summary, rows, baselines)
