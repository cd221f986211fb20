"""Validity metrics and uncertainty: pure functions over arrays.

Validity: does a method's answer pattern follow the person, or does it only sit near the scale's
middle? Item level, per subject: Pearson and Spearman r between the predicted and the true raw
answers (1..5), exact-match and within-one accuracy. Trait level: across subjects, Pearson r
between the model's and the subject's keyed trait means per trait (convergent validity); per
subject, Pearson r across the five traits (profile correlation). A statistic that is undefined (a
predictor with no variance, too few values) is a :class:`Stat` with the reason, never a silent 0
or NaN.

Uncertainty: seeded percentile bootstrap intervals over subjects (:func:`bootstrap_ci`,
:func:`score_ci`), paired comparisons of two methods' per-subject Scores (:func:`paired_test`:
mean difference, its interval, Wilcoxon signed-rank and paired bootstrap p) and the subjects a
comparison needs (:func:`subjects_needed`). Units: answers, trait means, MAE and Score on the raw
1..5 scale; correlations and shares unitless; p-values probabilities.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats as sps

from palign.constants import TRAITS, UNPARSED

#: Fewest values a correlation is computed on.
MIN_CORRELATION_N = 3

#: The Wilcoxon test's handling of zero differences (subjects where both methods score the
#: same): Pratt's, which ranks the zeros with the other differences and then leaves them out of
#: the rank sums, so that ties at zero weaken the evidence (scipy's default, "wilcox", drops
#: them before ranking).
WILCOXON_ZERO_METHOD = "pratt"


@dataclass(frozen=True)
class Stat:
    """A statistic that may be undefined: value None with the reason (never a silent 0 or NaN).

    ``reason`` is set iff ``value`` is None, e.g. "the predictions do not vary (constant)"; a
    defined ``value`` is finite."""

    value: float | None
    reason: str | None = None

    def __post_init__(self) -> None:
        if (self.value is None) == (self.reason is None):
            raise ValueError(f"a Stat has a value or a reason, not both nor neither: {self!r}")
        if self.value is not None and not math.isfinite(self.value):
            raise ValueError(f"a Stat's value is finite (undefined: None with a reason): {self!r}")

    def to_json(self) -> float | dict[str, Any]:
        """The value, or ``{"value": None, "reason": ...}`` when undefined."""
        return self.value if self.value is not None else {"value": None, "reason": self.reason}

    @classmethod
    def from_json(cls, x: Any) -> Stat:
        """A Stat from :meth:`to_json`'s output; a :class:`ValueError` for anything else."""
        if isinstance(x, int | float) and not isinstance(x, bool):
            return cls(float(x))
        if isinstance(x, Mapping) and x.get("value") is None and isinstance(x.get("reason"), str):
            return cls(None, x["reason"])
        raise ValueError(f"not a statistic (a number or {{value: null, reason}}): {x!r}")


def nanmean(x: np.ndarray, axis: int | None = None) -> np.ndarray | float:
    """Mean of the finite values along ``axis``; NaN where there is none (without numpy's
    empty-slice warning)."""
    x = np.asarray(x, dtype=np.float64)
    finite = np.isfinite(x)
    total, count = np.where(finite, x, 0.0).sum(axis), finite.sum(axis)
    out = np.divide(total, count, out=np.full(np.shape(total), np.nan), where=count > 0)
    return float(out) if np.ndim(out) == 0 else out


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``x`` (n,), ties given their average rank (``scipy.stats.rankdata``'s
    default), in one sort."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return (ends - (counts - 1) / 2)[inverse]


def correlation(
    x: np.ndarray,
    y: np.ndarray,
    *,
    rank: bool = False,
    unit: str = "values",
    names: tuple[str, str] = ("the predictions", "the targets"),
) -> Stat:
    """Pearson r of ``x`` and ``y`` (n,) (Spearman rho with ``rank``: Pearson r of the average
    ranks). Undefined with the reason when n < 3 (``unit`` names what is counted) or either side
    does not vary (``names`` name the sides)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size < MIN_CORRELATION_N:
        return Stat(None, f"fewer than {MIN_CORRELATION_N} {unit} ({x.size})")
    for side, name in zip((x, y), names):
        if np.all(side == side[0]):
            return Stat(None, f"{name} do not vary (constant)")
    if rank:
        x, y = average_ranks(x), average_ranks(y)
    xc, yc = x - x.mean(), y - y.mean()
    r = float(xc @ yc / math.sqrt(float(xc @ xc) * float(yc @ yc)))
    return Stat(min(1.0, max(-1.0, r)))


def item_validity(predicted: np.ndarray, target: np.ndarray) -> dict[str, Stat]:
    """One subject, (n_items,) raw answers 1..5, 0 = unparsed (predicted) / missing (target).

    Over the items with a parsed prediction and a known target (the items MAE counts):
    ``item_r`` Pearson r, ``item_spearman`` Spearman rho, ``accuracy`` exact-match share,
    ``within_one`` share with |pred - target| <= 1. Correlations undefined (with the reason)
    when either side has no variance or fewer than 3 items; accuracy and within_one undefined
    when no item counts."""
    predicted, target = np.asarray(predicted), np.asarray(target)
    if predicted.shape != target.shape or predicted.ndim != 1:
        raise ValueError(f"shapes differ: predicted {predicted.shape}, target {target.shape}")
    counted = (predicted != UNPARSED) & (target != 0)
    p, t = predicted[counted].astype(np.float64), target[counted].astype(np.float64)
    counts = "with a parsed prediction and a known target"
    out = {
        "item_r": correlation(p, t, unit=f"items {counts}"),
        "item_spearman": correlation(p, t, rank=True, unit=f"items {counts}"),
    }
    if not counted.any():
        none = Stat(None, f"no item {counts}")
        return {**out, "accuracy": none, "within_one": none}
    err = np.abs(p - t)
    return {
        **out,
        "accuracy": Stat(float(np.mean(err == 0))),
        "within_one": Stat(float(np.mean(err <= 1))),
    }


def _finite_pairs(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    both = np.isfinite(a) & np.isfinite(b)
    return a[both], b[both]


def trait_validity(model_means: np.ndarray, subject_means: np.ndarray) -> dict[str, Stat]:
    """Across subjects: (n_subjects, 5) keyed trait means (1..5; NaN where undefined) in
    :data:`TRAITS` order. For each trait letter, Pearson r between the model's and the subjects'
    trait means over the subjects where both are finite (convergent validity); undefined with
    the reason when fewer than 3 subjects or no variance."""
    m = np.asarray(model_means, dtype=np.float64)
    s = np.asarray(subject_means, dtype=np.float64)
    if m.shape != s.shape or m.ndim != 2 or m.shape[1] != len(TRAITS):
        raise ValueError(f"expected two (n_subjects, 5) arrays, got {m.shape} and {s.shape}")
    return {
        t: correlation(
            *_finite_pairs(m[:, i], s[:, i]),
            unit="subjects with both trait means finite",
            names=("the model's trait means", "the subjects' trait means"),
        )
        for i, t in enumerate(TRAITS)
    }


def profile_r(model_means: np.ndarray, subject_means: np.ndarray) -> Stat:
    """One subject: (5,) keyed trait means in :data:`TRAITS` order; Pearson r across the five
    traits (profile correlation); undefined with the reason when fewer than 3 finite traits or
    no variance (a flat profile)."""
    m = np.asarray(model_means, dtype=np.float64)
    s = np.asarray(subject_means, dtype=np.float64)
    if m.shape != s.shape or m.shape != (len(TRAITS),):
        raise ValueError(f"expected two (5,) arrays, got {m.shape} and {s.shape}")
    return correlation(
        *_finite_pairs(m, s),
        unit="traits with both means finite",
        names=("the model's trait means", "the subject's trait means"),
    )


def resample_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """The bootstrap's draw: (n_boot, n) subject indices, with replacement, from
    ``numpy.random.default_rng(seed)``. Every interval and paired test here draws through it,
    so the same ``seed`` resamples the same subjects."""
    if n_boot < 1:
        raise ValueError(f"n_boot={n_boot}: at least 1 resample")
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float] | None:
    """The percentile interval at ``level`` of the finite resample statistics (n_boot,)."""
    if not 0 < level < 1:
        raise ValueError(f"level={level}: a probability strictly between 0 and 1")
    values = values[np.isfinite(values)]
    if not values.size:
        return None
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def bootstrap_ci(
    per_subject: np.ndarray,
    statistic: Callable[[np.ndarray], float] | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval over subjects, at ``level``.

    ``per_subject``: (n_subjects,) or (n_subjects, k) values (rows resampled together).
    ``statistic``: of a resample (same shape, n_subjects rows), a float, NaN where undefined;
    default (1-D only): the mean of the finite values. Resamples on which the statistic is
    undefined are left out of the percentiles. Seeded (:func:`resample_indices`): the same call
    gives the same interval. None when fewer than 2 subjects or the statistic is undefined on
    the data (or on every resample)."""
    x = np.asarray(per_subject, dtype=np.float64)
    if statistic is None and x.ndim != 1:
        raise ValueError(f"per_subject {x.shape}: the default statistic (mean) takes 1-D values")
    stat = statistic or nanmean
    if len(x) < 2 or not np.isfinite(stat(x)):
        return None
    idx = resample_indices(len(x), n_boot, seed)
    if statistic is None:
        values = nanmean(x[idx], axis=1)
    else:
        values = np.array([statistic(x[i]) for i in idx], dtype=np.float64)
    return _percentiles(values, level)


def correlation_ci(
    x: np.ndarray, y: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of Pearson r of ``x`` and ``y`` (n_subjects,) over the
    subjects where both are finite, resampled in pairs (:func:`resample_indices`), all resamples
    at once. Resamples where a side does not vary are left out; None when r is undefined on
    the data (:func:`correlation`)."""
    x, y = _finite_pairs(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))
    if correlation(x, y).value is None:
        return None
    idx = resample_indices(len(x), n_boot, seed)
    xs, ys = x[idx], y[idx]  # (n_boot, n)
    xc, yc = xs - xs.mean(1, keepdims=True), ys - ys.mean(1, keepdims=True)
    var = (xc * xc).sum(1) * (yc * yc).sum(1)
    r = np.divide((xc * yc).sum(1), np.sqrt(var), out=np.full(n_boot, np.nan), where=var > 0)
    return _percentiles(np.clip(r, -1.0, 1.0), level)


def score_ci(
    mae: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[tuple[float, float], dict[str, tuple[float, float]]] | None:
    """The Score's interval and each trait's MAE interval, from the same resamples.

    ``mae``: (n_subjects, 5) per-subject per-trait MAE (NaN where a trait had no scored item),
    :data:`TRAITS` order. A resample's Score is computed as palign aggregates it
    (:func:`palign.eval.metrics.mean_mae`, :func:`palign.eval.records.aggregate`): the sum over
    traits of the mean over the subjects where the trait is finite. One index draw
    (:func:`resample_indices`) gives both; resamples where a trait has no finite value (its
    Score undefined) are left out of every interval. None when fewer than 2 subjects or the
    Score is undefined on the data (a trait NaN for every subject)."""
    mae = np.asarray(mae, dtype=np.float64)
    if mae.ndim != 2 or mae.shape[1] != len(TRAITS):
        raise ValueError(f"mae {mae.shape}: expected (n_subjects, {len(TRAITS)})")
    if len(mae) < 2 or not np.isfinite(nanmean(mae, axis=0)).all():
        return None
    traits = nanmean(mae[resample_indices(len(mae), n_boot, seed)], axis=1)  # (n_boot, 5)
    traits = traits[np.isfinite(traits).all(axis=1)]
    score = _percentiles(traits.sum(axis=1), level)
    if score is None:
        return None
    return score, {t: _percentiles(traits[:, i], level) for i, t in enumerate(TRAITS)}


@dataclass(frozen=True)
class PairedTest:
    """Two methods' per-subject Scores on the same subjects, compared.

    ``diff``: mean over subjects of (a - b), Score points (negative: ``a`` is better, lower);
    None when no subject has both. ``ci``: its percentile bootstrap interval at ``level``.
    ``p_wilcoxon``: two-sided Wilcoxon signed-rank p (scipy, :data:`WILCOXON_ZERO_METHOD`).
    ``p_bootstrap``: two-sided paired bootstrap p, see :func:`paired_test`. ``n``: subjects with
    both Scores finite. ``reason``: why a p (or the interval) is None."""

    a: str
    b: str
    diff: float | None
    ci: tuple[float, float] | None
    p_wilcoxon: float | None
    p_bootstrap: float | None
    n: int
    reason: str | None = None
    level: float = 0.95

    #: Keys a test's JSON must have.
    KEYS = ("a", "b", "diff", "ci", "p_wilcoxon", "p_bootstrap", "n")

    def to_json(self) -> dict[str, Any]:
        """``{a, b, diff, ci: [lo, hi] | None, p_wilcoxon, p_bootstrap, n, level}``, plus
        ``reason`` when set."""
        out = {
            "a": self.a,
            "b": self.b,
            "diff": self.diff,
            "ci": list(self.ci) if self.ci is not None else None,
            "p_wilcoxon": self.p_wilcoxon,
            "p_bootstrap": self.p_bootstrap,
            "n": self.n,
            "level": self.level,
        }
        return out | ({"reason": self.reason} if self.reason is not None else {})

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> PairedTest:
        """A test from :meth:`to_json`'s output (``level`` 0.95 when absent); a
        :class:`ValueError` names a missing key."""
        missing = [k for k in cls.KEYS if k not in d]
        if missing:
            raise ValueError(f"not a paired test (no {', '.join(missing)})")
        return cls(
            a=d["a"],
            b=d["b"],
            diff=d["diff"],
            ci=tuple(d["ci"]) if d["ci"] is not None else None,
            p_wilcoxon=d["p_wilcoxon"],
            p_bootstrap=d["p_bootstrap"],
            n=int(d["n"]),
            reason=d.get("reason"),
            level=d.get("level", 0.95),
        )

    def holds(self, level: float = 0.95) -> bool:
        """Whether the difference holds at ``level``: its interval excludes 0. ``level`` must be
        the interval's (a :class:`ValueError` otherwise: compute the test at that level)."""
        if level != self.level:
            raise ValueError(f"the interval is at level {self.level}, not {level}")
        return self.ci is not None and (self.ci[0] > 0 or self.ci[1] < 0)


def paired_test(
    a: str,
    scores_a: np.ndarray,
    b: str,
    scores_b: np.ndarray,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> PairedTest:
    """Per-subject Scores of two methods on the same subjects (n_subjects,), paired by position;
    the subjects where either is NaN are left out (``n`` counts the rest).

    With d the paired differences a - b and d* the mean of a resample of them (one draw,
    :func:`resample_indices`): ``ci`` the percentile interval of d*; ``p_bootstrap`` = (1 +
    #{|d* - mean(d)| >= |mean(d)|}) / (n_boot + 1), the share of the centred resamples (the
    null of no mean difference imposed) at least as far from 0 as the observed mean, counting
    the observed one (never 0). ``p_wilcoxon``: ``scipy.stats.wilcoxon(d, zero_method="pratt")``,
    two-sided; None when every difference is 0. Both p and the interval None when n < 2."""
    sa, sb = np.asarray(scores_a, dtype=np.float64), np.asarray(scores_b, dtype=np.float64)
    if sa.shape != sb.shape or sa.ndim != 1:
        raise ValueError(f"expected two (n_subjects,) arrays, got {sa.shape} and {sb.shape}")
    d = np.subtract(*_finite_pairs(sa, sb))
    n = int(d.size)
    if n < 2:
        reason = "no subject has both Scores" if n == 0 else "1 subject: a paired test needs 2"
        diff = float(d.mean()) if n else None
        return PairedTest(a, b, diff, None, None, None, n, reason, level)
    diff = float(d.mean())
    means = d[resample_indices(n, n_boot, seed)].mean(axis=1)
    p_boot = (1 + int(np.sum(np.abs(means - diff) >= abs(diff)))) / (n_boot + 1)
    p_wilcoxon, reason = None, "every paired difference is 0 (the Scores are identical)"
    if np.any(d != 0):
        p_wilcoxon = float(sps.wilcoxon(d, zero_method=WILCOXON_ZERO_METHOD).pvalue)
        reason = None
    return PairedTest(a, b, diff, _percentiles(means, level), p_wilcoxon, p_boot, n, reason, level)


def subjects_needed(
    differences: np.ndarray, delta: float = 0.1, power: float = 0.8, alpha: float = 0.05
) -> int | None:
    """Subjects needed to detect a mean Score difference of ``delta`` (Score points) at
    ``power`` with a two-sided paired test at ``alpha``, from observed paired per-subject Score
    differences (n_subjects,; NaN left out): the normal approximation
    n = ((z_{1-alpha/2} + z_power) * sd / delta)^2, rounded up, at least 2 (a paired test's
    least). None when sd is undefined (fewer than 2 finite differences)."""
    if delta <= 0 or not 0 < power < 1 or not 0 < alpha < 1:
        raise ValueError(f"delta={delta} > 0 and power={power}, alpha={alpha} in (0, 1) expected")
    d = np.asarray(differences, dtype=np.float64)
    d = d[np.isfinite(d)]
    if d.size < 2:
        return None
    z = sps.norm.ppf(1 - alpha / 2) + sps.norm.ppf(power)
    return max(2, math.ceil((z * float(d.std(ddof=1)) / delta) ** 2))


def format_p(p: float) -> str:
    """A p-value for a sentence: two significant digits, or the order of magnitude below
    0.001 ("1e-30")."""
    if p >= 0.001:
        return f"{p:.2g}"
    return f"{p:.0e}".replace("e-0", "e-") if p > 0 else "0 (below double precision)"


def describe_difference(test: PairedTest) -> str:
    """One sentence for the report, e.g. "trait_mean is better than constant by 0.93 (95 % CI
    0.85 to 1.01, Wilcoxon p = 1e-30, 300 subjects)" or "pas is not distinguishable from
    trait_mean on 30 subjects (difference -0.02, 95 % CI -0.10 to 0.06, Wilcoxon p = 0.41)".
    Differences in Score points; better means a lower Score."""
    pct = f"{test.level * 100:g} % CI"
    if test.ci is None:
        return f"{test.a} and {test.b} cannot be compared ({test.reason})"
    p = f", Wilcoxon p = {format_p(test.p_wilcoxon)}" if test.p_wilcoxon is not None else ""
    if not test.holds(test.level):
        lo, hi = test.ci
        return (
            f"{test.a} is not distinguishable from {test.b} on {test.n} subjects "
            f"(difference {test.diff:.2f}, {pct} {lo:.2f} to {hi:.2f}{p})"
        )
    better = test.diff < 0
    sign = -1 if better else 1
    lo, hi = sorted(sign * c for c in test.ci)
    return (
        f"{test.a} is {'better' if better else 'worse'} than {test.b} by {sign * test.diff:.2f} "
        f"({pct} {lo:.2f} to {hi:.2f}{p}, {test.n} subjects)"
    )
