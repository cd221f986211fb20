"""The typed records a run keeps: one :class:`ResultRow` per subject and method, an
:class:`Aggregate` per method over the subjects, and the run's :class:`Summary`.

Each converts to and from the JSON a run dir holds (``results/<method>/<case>.json``,
``results.jsonl``, ``summary.json``; :mod:`palign.rundir` reads and writes the files). The JSON
layout has a version, :data:`SCHEMA_VERSION`, stamped on every row and summary: files without
it (palign 0.1.0 before versioning) have the same layout and read as version 0, a newer one is
refused. ``from_json`` raises :class:`ValueError` naming the key that is missing or malformed;
the run dir adds the file's name.

Units: MAE and Score on the raw 1..5 answer scale; UNK rate a fraction of the test items;
timings in seconds; costs in forward calls, tokens forwarded and tokens generated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from palign.eval.metrics import SubjectMetrics, mean_mae

#: Version of the JSON layout of rows and summaries; readers refuse a newer one.
SCHEMA_VERSION = 1


def check_schema(record: Mapping[str, Any]) -> int:
    """The record's schema version (0 without one); a :class:`ValueError` unless this palign
    reads it (0..:data:`SCHEMA_VERSION`)."""
    schema = record.get("schema", 0)
    if not isinstance(schema, int) or isinstance(schema, bool) or not 0 <= schema <= SCHEMA_VERSION:
        raise ValueError(
            f"schema {schema!r} is not one this palign reads (0..{SCHEMA_VERSION}); "
            "a newer palign wrote it: upgrade palign"
        )
    return schema


def _need(record: Mapping[str, Any], keys: Sequence[str], what: str) -> None:
    if not isinstance(record, Mapping):
        raise ValueError(f"not a {what} (a JSON object is expected)")
    missing = [k for k in keys if k not in record]
    if missing:
        raise ValueError(f"not a {what} (no {', '.join(missing)})")


@dataclass(kw_only=True)
class ResultRow(SubjectMetrics):
    """One subject's result for one method: its :class:`SubjectMetrics` on the test items and
    what the run recorded beside them.

    ``timing``: seconds, ``align_s`` and ``eval_s`` (the subject's share of its group's time)
    plus what the method timed itself (e.g. PAS's ``activations_s_amortised``); empty for rows
    recomputed from answers files alone. ``align_info``: what the method reports about its
    alignment (e.g. PAS's ``alpha``, ``selection_score``; DPO's ``steps``). ``selected_on_test_
    items``: the name of a hyper-parameter the evaluation chose on the test items (protocol=
    paper), else None. ``cost``: the subject's share of the forwards counted, per phase
    (``align``, ``answer``) and count (``forward_calls``, ``tokens_forwarded``,
    ``generated_tokens``); None without a model. ``subject_batch``: the size of the group the
    subject was evaluated in, when above 1."""

    case: int
    method: str
    timing: dict[str, float] = field(default_factory=dict)
    align_info: dict[str, Any] = field(default_factory=dict)
    selected_on_test_items: str | None = None
    cost: dict[str, dict[str, float]] | None = None
    subject_batch: int | None = None
    schema: int = SCHEMA_VERSION

    #: Keys a row's JSON must have.
    KEYS = ("case", "method", "mae", "score", "unk_rate", "answers", "n_scored",
            "model_means", "subject_means")  # fmt: skip

    @property
    def metrics(self) -> SubjectMetrics:
        """The row's metrics alone."""
        return SubjectMetrics(**{f.name: getattr(self, f.name) for f in fields(SubjectMetrics)})

    @classmethod
    def of(cls, metrics: SubjectMetrics, case: int, method: str, **recorded: Any) -> ResultRow:
        """The row of ``metrics`` for subject ``case`` and ``method``, with the ``recorded``
        fields (``timing``, ``align_info``, ...)."""
        values = {f.name: getattr(metrics, f.name) for f in fields(SubjectMetrics)}
        return cls(**values, case=case, method=method, **recorded)

    def to_json(self) -> dict[str, Any]:
        """The row as a run dir stores it; fields without a value (no ``align_info``, no
        ``cost``, ...) are left out."""
        out: dict[str, Any] = {"schema": self.schema, "case": self.case, "method": self.method}
        out.update(vars(self.metrics))
        out["timing"] = dict(self.timing)
        optional = {
            "align_info": self.align_info,
            "selected_on_test_items": self.selected_on_test_items,
            "cost": self.cost,
            "subject_batch": self.subject_batch,
        }
        out.update({k: v for k, v in optional.items() if v})
        return out

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> ResultRow:
        """A row from its JSON (any version this palign reads); a :class:`ValueError` names
        what is missing."""
        _need(record, cls.KEYS, "palign result row")
        schema = check_schema(record)
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in record.items() if k in known}
        values["case"] = int(record["case"])
        values["schema"] = schema
        for key in ("timing", "align_info"):
            values[key] = dict(record.get(key) or {})
        return cls(**values)


@dataclass(kw_only=True)
class Aggregate:
    """One method over a run's subjects: ``n_subjects``; ``mae`` per trait, the mean over
    subjects (those where the trait is NaN left out); ``score``, the sum of those five means;
    ``unk_rate``, the mean UNK rate. ``timing``: mean seconds per subject
    (``align_s_per_subject``, ``eval_s_per_subject``, ...), None where not timed (the
    statistical baselines). ``cost``: ``per_subject`` (the mean of the rows' costs per phase,
    plus ``total``) and ``setup`` (once per run), None without a model."""

    n_subjects: int
    mae: dict[str, float]
    score: float
    unk_rate: float
    timing: dict[str, float] | None = None
    cost: dict[str, dict[str, Any]] | None = None

    KEYS = ("n_subjects", "mae", "score", "unk_rate")

    def untimed(self) -> Aggregate:
        """The aggregate without its timings (a statistical baseline's)."""
        return Aggregate(**{**vars(self), "timing": None})

    def with_setup_cost(self, cost: dict[str, int] | None) -> Aggregate:
        """The aggregate with the method's one-off set-up ``cost`` beside its per-subject cost
        (unchanged when ``cost`` is None: no model)."""
        if cost is None:
            return self
        return Aggregate(**{**vars(self), "cost": {**(self.cost or {}), "setup": cost}})

    def to_json(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.KEYS}
        out.update({k: v for k in ("timing", "cost") if (v := getattr(self, k)) is not None})
        return out

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> Aggregate:
        _need(record, cls.KEYS, "palign aggregate")
        return cls(**{f.name: record[f.name] for f in fields(cls) if f.name in record})


def aggregate(rows: Sequence[ResultRow]) -> Aggregate:
    """Mean per-trait MAE, Score (sum of those means), UNK rate, timings and costs over rows."""
    mae = mean_mae([r.mae for r in rows])
    timing = cost = None
    if rows and rows[0].timing:
        timing = {
            f"{key}_per_subject": float(np.mean([r.timing[key] for r in rows]))
            for key in rows[0].timing
        }
    if rows and all(r.cost is not None for r in rows):
        per_subject = {
            phase: {key: float(np.mean([r.cost[phase][key] for r in rows])) for key in counts}
            for phase, counts in rows[0].cost.items()
        }
        per_subject["total"] = {
            key: sum(phase[key] for phase in per_subject.values())
            for key in next(iter(per_subject.values()))
        }
        cost = {"per_subject": per_subject}
    return Aggregate(
        n_subjects=len(rows),
        mae=mae,
        score=float(sum(mae.values())),
        unk_rate=float(np.mean([r.unk_rate for r in rows])) if rows else float("nan"),
        timing=timing,
        cost=cost,
    )


def mean_selection_score(rows: Sequence[ResultRow]) -> float | None:
    """Mean over subjects of the cross-validated Score of the chosen hyper-parameters on the
    subjects' own alignment items (``align_info.selection_score``, e.g. PAS under
    protocol=clean); None when a method selected nothing there. The objective of
    ``hparams_search``: it never reads a test item."""
    scores = [r.align_info.get("selection_score") for r in rows]
    if not rows or any(s is None for s in scores):
        return None
    return float(np.mean(scores))


@dataclass(kw_only=True)
class RunProtocol:
    """How a run read and scored: the protocol's ``name`` and ``coding``, and the scoring mode
    (``none (no LLM)`` for a run without a model)."""

    name: str
    coding: str
    scoring: str


#: The model name of a run that used no LLM (only statistical baselines).
NO_LLM = "none (no LLM)"


@dataclass(kw_only=True)
class Summary:
    """A run's ``summary.json``: the main ``method``'s :class:`Aggregate` (``main``) beside the
    ``compare``d methods' and the statistical ``baselines``' on the same subjects
    (``baselines_all_subjects``: on every loaded subject), with what identifies the run.

    ``cases``: the subjects, in order; ``n_test_items``: the items each answered;
    ``selection_score``: see :func:`mean_selection_score`; ``shard``: ``i/N`` of a sharded run;
    ``notes``: lines for the report; ``merged_from``: the shard run dirs of a merged run."""

    method: str
    model: str
    protocol: RunProtocol
    n_test_items: int
    main: Aggregate
    cases: list[int]
    compare: dict[str, Aggregate] = field(default_factory=dict)
    baselines: dict[str, Aggregate] = field(default_factory=dict)
    baselines_all_subjects: dict[str, Aggregate] = field(default_factory=dict)
    selection_score: float | None = None
    shard: str | None = None
    notes: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    merged_from: list[str] | None = None
    schema: int = SCHEMA_VERSION

    KEYS = ("method", "model", "protocol", "n_test_items", "cases", *Aggregate.KEYS,
            "compare", "baselines")  # fmt: skip

    @property
    def uses_llm(self) -> bool:
        return self.model != NO_LLM

    @property
    def score(self) -> float:
        """The main method's Score."""
        return self.main.score

    def methods(self) -> dict[str, Aggregate]:
        """The main and compared methods' aggregates, by name, the main one first."""
        return {self.method: self.main, **self.compare}

    def to_json(self) -> dict[str, Any]:
        """``summary.json``'s content: the main method's aggregate at the top level."""
        out: dict[str, Any] = {
            "schema": self.schema,
            "method": self.method,
            "model": self.model,
            "protocol": vars(self.protocol),
            "n_test_items": self.n_test_items,
            **self.main.to_json(),
            "selection_score": self.selection_score,
            "cases": list(self.cases),
            "shard": self.shard,
        }
        for key in ("compare", "baselines", "baselines_all_subjects"):
            out[key] = {name: a.to_json() for name, a in getattr(self, key).items()}
        out["notes"] = list(self.notes)
        out["versions"] = dict(self.versions)
        if self.merged_from is not None:
            out["merged_from"] = list(self.merged_from)
        return out

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> Summary:
        """A summary from its JSON (any version this palign reads); a :class:`ValueError`
        names what is missing."""
        _need(record, cls.KEYS, "palign summary")
        schema = check_schema(record)
        _need(record["protocol"], ("name", "coding", "scoring"), "palign summary's protocol")

        def entries(key: str) -> dict[str, Aggregate]:
            return {n: Aggregate.from_json(e) for n, e in (record.get(key) or {}).items()}

        return cls(
            method=record["method"],
            model=record["model"],
            protocol=RunProtocol(
                **{k: record["protocol"][k] for k in ("name", "coding", "scoring")}
            ),
            n_test_items=int(record["n_test_items"]),
            main=Aggregate.from_json(record),
            cases=[int(c) for c in record["cases"]],
            compare=entries("compare"),
            baselines=entries("baselines"),
            baselines_all_subjects=entries("baselines_all_subjects"),
            selection_score=record.get("selection_score"),
            shard=record.get("shard"),
            notes=list(record.get("notes") or []),
            versions=dict(record.get("versions") or {}),
            merged_from=record.get("merged_from"),
            schema=schema,
        )
