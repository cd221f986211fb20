"""Per-subject metrics: per-trait mean absolute error on the 1..5 scale, Score, UNK rate."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from palign.constants import OPTION_LETTERS, TRAITS, UNPARSED
from palign.data.papi import Item, keyed
from palign.eval.stats import Stat, item_validity, profile_r


@dataclass
class SubjectMetrics:
    """Metrics of one subject's answers to the test items.

    ``mae[t]``: mean |predicted - target| over items of trait ``t`` with a known target (not 0) and
    a parsed prediction; NaN when there is none. ``score``: sum of the five (NaN if any is NaN).
    ``unk_rate``: fraction of items whose answer could not be parsed. ``answers``: histogram of
    the predicted option letters plus ``UNK``. ``n_scored[t]``: items that entered ``mae[t]``.
    ``model_means``/``subject_means``: keyed trait means (1..5) of the predictions and of the
    subject's answers over the same items. ``validity``: does the answer pattern follow the
    subject's (:mod:`palign.eval.stats`): ``item_r``, ``item_spearman``, ``accuracy``,
    ``within_one`` over the items ``mae`` counts, and ``profile_r`` across the five trait means;
    each a :class:`Stat`, undefined with the reason (e.g. a constant predictor's correlations).
    """

    mae: dict[str, float]
    score: float
    unk_rate: float
    answers: dict[str, int]
    n_scored: dict[str, int]
    model_means: dict[str, float]
    subject_means: dict[str, float]
    validity: dict[str, Stat]


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else float("nan")


def subject_metrics(
    predicted: np.ndarray, target: np.ndarray, items: Sequence[Item]
) -> SubjectMetrics:
    """``predicted``, ``target``: raw answers (n_items,), 0 = unparsed / missing."""
    return metrics_of(predicted, target, [it.trait for it in items], [it.key for it in items])


def trait_mae(predicted: np.ndarray, target: np.ndarray, traits: np.ndarray) -> dict[str, float]:
    """Per trait, the mean |predicted - target| over its items with a parsed prediction and a
    known target; NaN where there is none. ``predicted``, ``target``: (n_items,) raw answers
    (0 = unparsed / missing); ``traits``: (n_items,) trait letters."""
    counted = (predicted != UNPARSED) & (target != 0)
    err = np.abs(predicted - target)
    return {t: _mean(err[(traits == t) & counted]) for t in TRAITS}


def metrics_of(
    predicted: np.ndarray, target: np.ndarray, traits: Sequence[str], keys: Sequence[int]
) -> SubjectMetrics:
    """:func:`subject_metrics` from each item's trait letter and key (+1/-1) instead of items
    (e.g. the columns of an answers file)."""
    predicted = np.asarray(predicted, dtype=np.int64)
    target = np.asarray(target, dtype=np.int64)
    traits, key = np.asarray(traits), np.asarray(keys, dtype=np.int64)
    if not predicted.shape == target.shape == traits.shape == key.shape or predicted.ndim != 1:
        raise ValueError(
            f"shapes differ: predicted {predicted.shape}, target {target.shape}, traits "
            f"{traits.shape}, keys {key.shape}"
        )
    parsed = predicted != UNPARSED
    known = target != 0
    kp, kt = keyed(predicted, key), keyed(target, key)
    mae = trait_mae(predicted, target, traits)
    n_scored, model_means, subject_means = {}, {}, {}
    for t in TRAITS:
        n_scored[t] = int(((traits == t) & parsed & known).sum())
        model_means[t] = _mean(kp[(traits == t) & parsed])
        subject_means[t] = _mean(kt[(traits == t) & known])
    validity = item_validity(predicted, target)
    validity["profile_r"] = profile_r(
        np.array([model_means[t] for t in TRAITS]), np.array([subject_means[t] for t in TRAITS])
    )
    hist = {letter: int((predicted == 5 - i).sum()) for i, letter in enumerate(OPTION_LETTERS)}
    hist["UNK"] = int((~parsed).sum())
    return SubjectMetrics(
        mae=mae,
        score=float(sum(mae.values())),
        unk_rate=float((~parsed).mean()) if len(predicted) else 0.0,
        answers=hist,
        n_scored=n_scored,
        model_means=model_means,
        subject_means=subject_means,
        validity=validity,
    )


def mean_mae(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean over subjects of per-trait MAE dicts, ignoring subjects where a trait is NaN."""
    out = {}
    for t in TRAITS:
        values = np.array([r[t] for r in rows], dtype=np.float64)
        finite = values[np.isfinite(values)]
        out[t] = float(finite.mean()) if finite.size else float("nan")
    return out


def best_candidate(
    predictions: Sequence[np.ndarray], target: np.ndarray, items: Sequence[Item]
) -> tuple[int, list[float]]:
    """The index of the candidate answers (each (n_items,) raw) with the lowest Score against
    ``target``, and every candidate's Score. A NaN Score (a trait without a parsed answer)
    ranks last; ties go to the first candidate (as the reference code's ``argmin``). Only the
    Score is computed (not the other metrics: this runs per candidate, fold and subject)."""
    target, traits = np.asarray(target, dtype=np.int64), np.array([it.trait for it in items])
    scores = [
        float(sum(trait_mae(np.asarray(p, dtype=np.int64), target, traits).values()))
        for p in predictions
    ]
    finite = [s if np.isfinite(s) else np.inf for s in scores]
    return int(np.argmin(finite)), scores
