"""The typed records a run keeps: one :class:`ResultRow` per subject and method, an
:class:`Aggregate` per method over the subjects, and the run's :class:`Summary`.

Each converts to and from the JSON a run dir holds (``results/<method>/<case>.json``,
``results.jsonl``, ``summary.json``; :mod:`palign.rundir` reads and writes the files). The JSON
layout has a version, :data:`SCHEMA_VERSION`, stamped on every row and summary: files without
it (palign 0.1.0 before versioning) have the same layout and read as version 0, a newer one is
refused. ``from_json`` raises :class:`ValueError` naming the key that is missing or malformed;
the run dir adds the file's name.

Units: MAE and Score on the raw 1..5 answer scale; UNK rate a fraction of the test items;
timings in seconds; costs in forward calls, tokens forwarded and tokens generated (a model
served over an API: requests, tokens as its server counted them, USD).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np

from palign.constants import TRAITS
from palign.eval.metrics import SubjectMetrics, mean_mae
from palign.eval.stats import (
    PairedTest,
    Stat,
    bootstrap_ci,
    correlation_ci,
    paired_test,
    score_ci,
    subjects_needed,
    trait_validity,
)

#: Version of the JSON layout of rows and summaries; readers refuse a newer one. 2: validity
#: metrics per row; intervals, validity and paired tests in the summary (version-1 files read
#: with none of them).
SCHEMA_VERSION = 2

#: Resamples and seed of every bootstrap of a summary (fixed: recomputing it from the answers
#: files gives the same intervals to the last digit).
N_BOOT, BOOT_SEED = 2000, 0
#: The validity metrics of each subject (:mod:`palign.eval.stats`), in report order.
ITEM_VALIDITY = ("item_r", "item_spearman", "accuracy", "within_one", "profile_r")


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
    ``generated_tokens``); for a model served over an API (``model=openai``) the counts of
    :class:`~palign.models.cost.HostedCost` instead (``requests``, ``cached``, ``retries``,
    ``input_tokens``, ``output_tokens``, ``cost_usd``, ``malformed``, ``cut_short``); None
    without a model. ``subject_batch``: the size of the group the
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
        out["validity"] = {k: s.to_json() for k, s in self.validity.items()}
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
        values["validity"] = {
            k: Stat.from_json(s) for k, s in (record.get("validity") or {}).items()
        }
        return cls(**values)


Interval = tuple[float, float]


def _interval(x: Any, key: str) -> Interval | None:
    """``[lo, hi]`` from JSON (None stays None); a :class:`ValueError` naming ``key`` else."""
    if x is None:
        return None
    if not isinstance(x, list | tuple) or len(x) != 2 or not all(_number(v) for v in x):
        raise ValueError(f"{key}: not an interval [lo, hi] nor null: {x!r}")
    return float(x[0]), float(x[1])


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


@dataclass(kw_only=True)
class Validity:
    """Whether a method's answers follow the subjects', over a run's subjects
    (:mod:`palign.eval.stats`).

    ``item``: the mean over subjects of each per-subject metric of :data:`ITEM_VALIDITY` where it
    is defined (``n``: how many subjects that is); undefined with the reason when it is for
    every subject. ``trait_r``: per trait, Pearson r across subjects of the model's and the
    subject's keyed trait means (convergent validity). ``ci``: the seeded bootstrap interval of
    each (``item_r``, ..., ``trait_r.A``, ...), None where undefined."""

    item: dict[str, Stat]
    trait_r: dict[str, Stat]
    ci: dict[str, Interval | None]
    n: dict[str, int]

    def to_json(self) -> dict[str, Any]:
        return {
            **{k: s.to_json() for k, s in self.item.items()},
            "trait_r": {t: s.to_json() for t, s in self.trait_r.items()},
            "ci": {k: list(c) if c is not None else None for k, c in self.ci.items()},
            "n": dict(self.n),
        }

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> Validity:
        _need(record, (*ITEM_VALIDITY, "trait_r", "ci", "n"), "palign validity entry")
        return cls(
            item={k: Stat.from_json(record[k]) for k in ITEM_VALIDITY},
            trait_r={t: Stat.from_json(v) for t, v in record["trait_r"].items()},
            ci={k: _interval(c, f"validity.ci.{k}") for k, c in record["ci"].items()},
            n={k: int(v) for k, v in record["n"].items()},
        )


def validity_of(rows: Sequence[ResultRow]) -> Validity:
    """The :class:`Validity` of ``rows`` (one method, one row per subject), intervals seeded
    (:data:`N_BOOT`, :data:`BOOT_SEED`). A row without a metric (written by palign before
    validity metrics) counts as undefined for it."""
    item, ci, n = {}, {}, {}
    for key in ITEM_VALIDITY:
        stats = [
            r.validity.get(key, Stat(None, "not recorded (an older palign's row)")) for r in rows
        ]
        values = np.array([s.value if s.value is not None else np.nan for s in stats])
        n[key] = int(np.isfinite(values).sum())
        if n[key]:
            item[key] = Stat(float(values[np.isfinite(values)].mean()))
        else:
            reason = stats[0].reason if stats else "no subjects"
            item[key] = Stat(None, f"undefined for every subject ({reason})")
        ci[key] = bootstrap_ci(values, n_boot=N_BOOT, seed=BOOT_SEED) if n[key] else None
    model = np.array([[r.model_means[t] for t in TRAITS] for r in rows]).reshape(-1, len(TRAITS))
    subject = np.array([[r.subject_means[t] for t in TRAITS] for r in rows]).reshape(model.shape)
    trait_r = trait_validity(model, subject)
    for i, t in enumerate(TRAITS):
        ci[f"trait_r.{t}"] = correlation_ci(model[:, i], subject[:, i], N_BOOT, BOOT_SEED)
    return Validity(item=item, trait_r=trait_r, ci=ci, n=n)


@dataclass(kw_only=True)
class Aggregate:
    """One method over a run's subjects: ``n_subjects``; ``mae`` per trait, the mean over
    subjects (those where the trait is NaN left out); ``score``, the sum of those five means;
    ``unk_rate``, the mean UNK rate. ``ci``: seeded bootstrap intervals over subjects of the
    Score (``score``) and each trait's MAE (``mae``), from the same resamples; None with fewer
    than 2 subjects (or an older summary). ``validity``: see :class:`Validity` (None in an
    older summary). ``timing``: mean seconds per subject (``align_s_per_subject``,
    ``eval_s_per_subject``, ...), None where not timed (the statistical baselines). ``cost``:
    ``per_subject`` (the mean of the rows' costs per phase, plus ``total``) and ``setup`` (once
    per run), None without a model."""

    n_subjects: int
    mae: dict[str, float]
    score: float
    unk_rate: float
    ci: dict[str, Any] | None = None
    validity: Validity | None = None
    timing: dict[str, float] | None = None
    cost: dict[str, dict[str, Any]] | None = None

    KEYS = ("n_subjects", "mae", "score", "unk_rate")

    def untimed(self) -> Aggregate:
        """The aggregate without its timings (a statistical baseline's)."""
        return replace(self, timing=None)

    def with_setup_cost(self, cost: dict[str, int] | None) -> Aggregate:
        """The aggregate with the method's one-off set-up ``cost`` beside its per-subject cost
        (unchanged when ``cost`` is None: no model)."""
        if cost is None:
            return self
        return replace(self, cost={**(self.cost or {}), "setup": cost})

    def to_json(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.KEYS}
        if self.ci is not None:
            out["ci"] = {
                "score": _list(self.ci["score"]),
                "mae": {t: _list(c) for t, c in self.ci["mae"].items()},
            }
        if self.validity is not None:
            out["validity"] = self.validity.to_json()
        out.update({k: v for k in ("timing", "cost") if (v := getattr(self, k)) is not None})
        return out

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> Aggregate:
        _need(record, cls.KEYS, "palign aggregate")
        values = {f.name: record[f.name] for f in fields(cls) if f.name in record}
        if record.get("ci") is not None:
            ci = record["ci"]
            values["ci"] = {
                "score": _interval(ci.get("score"), "ci.score"),
                "mae": {t: _interval(c, f"ci.mae.{t}") for t, c in (ci.get("mae") or {}).items()},
            }
        if record.get("validity") is not None:
            values["validity"] = Validity.from_json(record["validity"])
        return cls(**values)


def _list(interval: Interval | None) -> list[float] | None:
    return list(interval) if interval is not None else None


def aggregate(rows: Sequence[ResultRow]) -> Aggregate:
    """Mean per-trait MAE, Score (sum of those means), UNK rate, their intervals, validity,
    timings and costs over rows (one per subject)."""
    mae = mean_mae([r.mae for r in rows])
    timing = cost = ci = None
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
    matrix = np.array([[r.mae[t] for t in TRAITS] for r in rows]).reshape(-1, len(TRAITS))
    intervals = score_ci(matrix, N_BOOT, BOOT_SEED)
    if intervals is not None:
        ci = {"score": intervals[0], "mae": intervals[1]}
    return Aggregate(
        n_subjects=len(rows),
        mae=mae,
        score=float(sum(mae.values())),
        unk_rate=float(np.mean([r.unk_rate for r in rows])) if rows else float("nan"),
        ci=ci,
        validity=validity_of(rows),
        timing=timing,
        cost=cost,
    )


#: The Score difference the report says how many subjects it takes to detect (80 % power).
DETECTABLE_DIFFERENCE = 0.1


def paired_tests(
    main: str, rows: Sequence[ResultRow], others: Mapping[str, Sequence[ResultRow]]
) -> tuple[list[PairedTest], dict[str, int | None]]:
    """``main`` against each of ``others`` (rows of the same subjects, paired by case): the
    paired difference of the per-subject Scores with its interval and p-values (seeded), and
    the subjects needed to detect a difference of :data:`DETECTABLE_DIFFERENCE` at 80 % power
    given the observed paired variance, by the other method's name."""
    scores = {r.case: r.score for r in rows}
    tests, needed = [], {}
    for name, other in others.items():
        theirs = {r.case: r.score for r in other}
        cases = [c for c in scores if c in theirs]
        a = np.array([scores[c] for c in cases], dtype=np.float64)
        b = np.array([theirs[c] for c in cases], dtype=np.float64)
        tests.append(paired_test(main, a, name, b, N_BOOT, BOOT_SEED))
        needed[name] = subjects_needed(a - b, DETECTABLE_DIFFERENCE)
    return tests, needed


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
    ``notes``: lines for the report; ``merged_from``: the shard run dirs of a merged run.
    ``tests``: the main method against each compared method and baseline
    (:func:`paired_tests`); ``subjects_needed``: by the other method's name, the subjects a
    Score difference of :data:`DETECTABLE_DIFFERENCE` needs (both empty in older summaries)."""

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
    tests: list[PairedTest] = field(default_factory=list)
    subjects_needed: dict[str, int | None] = field(default_factory=dict)
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
        out["tests"] = [t.to_json() for t in self.tests]
        out["subjects_needed"] = dict(self.subjects_needed)
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
            tests=[PairedTest.from_json(t) for t in record.get("tests") or []],
            subjects_needed=dict(record.get("subjects_needed") or {}),
            schema=schema,
        )
