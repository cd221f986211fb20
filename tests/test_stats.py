"""palign.eval.stats against scipy and numpy computed here, on real PAPI subjects: the three
statistical baselines' answers (constant, trait_mean, item_mean) to the test items."""

from __future__ import annotations

import json
import math
from statistics import NormalDist

import numpy as np
import pytest
import scipy.stats as sps

from palign.constants import TRAITS
from palign.eval.metrics import mean_mae, subject_metrics
from palign.eval.stats import (
    PairedTest,
    Stat,
    bootstrap_ci,
    describe_difference,
    format_p,
    item_validity,
    paired_test,
    profile_r,
    score_ci,
    subjects_needed,
    trait_validity,
)
from palign.methods import MethodContext
from palign.methods.statistical import BASELINES

N_SUBJECTS = 60  # enough for stable numbers, few enough to keep the module fast


@pytest.fixture(scope="module")
def baselines(papi):
    """Per baseline: predictions (n, 180) raw, targets (n, 180) raw and the subjects' metrics."""
    inv, subjects = papi.inventory, papi.subjects[:N_SUBJECTS]
    seen = [s.seen_only(inv.train) for s in subjects]
    targets = np.stack([s.answers(inv.test) for s in subjects])
    out = {}
    for cls in BASELINES:
        method = cls()
        method.setup(MethodContext(papi))
        artifacts = method.align_group(seen, inv.train_items)
        answers = method.answer_group(seen, artifacts, inv.test_items)
        preds = np.stack([a.scores for a in answers])
        metrics = [subject_metrics(p, t, inv.test_items) for p, t in zip(preds, targets)]
        out[method.name] = preds, targets, metrics
    return out


def _means(metrics, which):
    return np.array([[getattr(m, which)[t] for t in TRAITS] for m in metrics])


def _mae(metrics):
    return np.array([[m.mae[t] for t in TRAITS] for m in metrics])


# --- Stat -------------------------------------------------------------------------------------


def test_stat_round_trips_through_json():
    for stat in (Stat(0.25), Stat(-1.0), Stat(None, "the predictions do not vary (constant)")):
        assert Stat.from_json(json.loads(json.dumps(stat.to_json()))) == stat
    assert Stat(0.5).to_json() == 0.5
    assert Stat(None, "why").to_json() == {"value": None, "reason": "why"}
    assert Stat.from_json(1) == Stat(1.0)


@pytest.mark.parametrize("args", [(None,), (0.5, "a reason too"), (float("nan"),), (float("inf"),)])
def test_stat_is_a_value_or_a_reason(args):
    with pytest.raises(ValueError):
        Stat(*args)


@pytest.mark.parametrize("x", [None, True, "0.5", {"value": 0.5}, {"value": None}])
def test_stat_from_json_refuses_other_things(x):
    with pytest.raises(ValueError, match="not a statistic"):
        Stat.from_json(x)


# --- item validity ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["trait_mean", "item_mean"])
def test_item_validity_matches_scipy(baselines, method):
    preds, targets, _ = baselines[method]
    checked = 0
    for p, t in zip(preds, targets):
        v = item_validity(p, t)
        both = (p != 0) & (t != 0)
        pp, tt = p[both], t[both]
        assert v["accuracy"].value == pytest.approx(np.mean(pp == tt))
        assert v["within_one"].value == pytest.approx(np.mean(np.abs(pp - tt) <= 1))
        if np.ptp(pp) == 0:  # a subject whose trait means all round to one answer
            assert v["item_r"].reason == "the predictions do not vary (constant)"
            continue
        assert v["item_r"].value == pytest.approx(sps.pearsonr(pp, tt).statistic, abs=1e-12)
        assert v["item_spearman"].value == pytest.approx(sps.spearmanr(pp, tt).statistic, abs=1e-12)
        checked += 1
    assert checked > N_SUBJECTS // 2


def test_item_validity_counts_the_items_mae_counts(baselines):
    preds, targets, _ = baselines["item_mean"]
    p, t = preds[0].copy(), targets[0].copy()
    p[:20] = 0  # unparsed
    t[20:30] = 0  # missing
    v = item_validity(p, t)
    pp, tt = p[30:], t[30:]
    assert v["item_r"].value == pytest.approx(sps.pearsonr(pp, tt).statistic, abs=1e-12)
    assert v["accuracy"].value == pytest.approx(np.mean(pp == tt))


def test_a_constant_predictor_has_no_correlation_but_an_accuracy(baselines):
    preds, targets, _ = baselines["constant"]
    assert (preds == 3).all()
    v = item_validity(preds[0], targets[0])
    for key in ("item_r", "item_spearman"):
        assert v[key] == Stat(None, "the predictions do not vary (constant)")
    known = targets[0] != 0
    assert v["accuracy"].value == pytest.approx(np.mean(targets[0][known] == 3))
    assert v["within_one"].value == pytest.approx(np.mean(np.abs(targets[0][known] - 3) <= 1))


def test_item_validity_edge_cases():
    v = item_validity(np.array([1, 2, 0, 4]), np.array([2, 0, 5, 4]))  # 2 items count
    assert v["item_r"].value is None and "fewer than 3" in v["item_r"].reason
    assert "(2)" in v["item_r"].reason
    assert v["accuracy"].value == 0.5 and v["within_one"].value == 1.0
    v = item_validity(np.zeros(5, int), np.full(5, 3))  # nothing parsed
    assert all(s.value is None for s in v.values())
    assert v["accuracy"].reason == "no item with a parsed prediction and a known target"
    v = item_validity(np.array([1, 2, 3, 4]), np.full(4, 2))
    assert v["item_r"].reason == "the targets do not vary (constant)"
    with pytest.raises(ValueError, match="shapes differ"):
        item_validity(np.ones(3), np.ones(4))


# --- trait validity and profiles --------------------------------------------------------------


@pytest.mark.parametrize("method", ["trait_mean", "item_mean"])
def test_trait_validity_matches_scipy(baselines, method):
    _, _, metrics = baselines[method]
    model, subject = _means(metrics, "model_means"), _means(metrics, "subject_means")
    r = trait_validity(model, subject)
    assert list(r) == list(TRAITS)
    for i, t in enumerate(TRAITS):
        assert r[t].value == pytest.approx(
            sps.pearsonr(model[:, i], subject[:, i]).statistic, abs=1e-12
        )
        assert r[t].value > 0.5  # a baseline built from the subject's answers follows them


def test_trait_validity_leaves_out_nan_and_says_why(baselines):
    _, _, metrics = baselines["trait_mean"]
    model, subject = _means(metrics, "model_means"), _means(metrics, "subject_means")
    model[:10, 0] = np.nan
    subject[5:15, 0] = np.nan
    model[:, 1] = np.nan  # a trait never defined
    subject[2:, 2] = np.nan  # 2 subjects left
    r = trait_validity(model, subject)
    assert r["A"].value == pytest.approx(sps.pearsonr(model[15:, 0], subject[15:, 0])[0])
    assert r["C"].reason == "fewer than 3 subjects with both trait means finite (0)"
    assert r["E"].reason == "fewer than 3 subjects with both trait means finite (2)"
    _, _, constant = baselines["constant"]
    r = trait_validity(_means(constant, "model_means"), subject)
    assert r["N"] == Stat(None, "the model's trait means do not vary (constant)")
    with pytest.raises(ValueError, match="n_subjects, 5"):
        trait_validity(model[:, :4], subject[:, :4])


def test_profile_r_matches_numpy(baselines):
    _, _, metrics = baselines["item_mean"]
    model, subject = _means(metrics, "model_means"), _means(metrics, "subject_means")
    for m, s in zip(model, subject):
        assert profile_r(m, s).value == pytest.approx(np.corrcoef(m, s)[0, 1], abs=1e-12)
    m, s = model[0].copy(), subject[0]
    m[:3] = np.nan
    assert profile_r(m, s).reason == "fewer than 3 traits with both means finite (2)"
    assert profile_r(np.full(5, 3.0), s).reason == "the model's trait means do not vary (constant)"


# --- bootstrap --------------------------------------------------------------------------------


def test_bootstrap_is_seeded_and_matches_a_naive_one(baselines):
    scores = _mae(baselines["trait_mean"][2]).sum(1)
    ci = bootstrap_ci(scores, n_boot=500, seed=3)
    assert ci == bootstrap_ci(scores, n_boot=500, seed=3)
    other = bootstrap_ci(scores, n_boot=500, seed=4)
    assert other != ci and other == pytest.approx(ci, abs=0.05)
    assert ci[0] < scores.mean() < ci[1]
    rng = np.random.default_rng(3)
    naive = [scores[rng.integers(0, len(scores), len(scores))].mean() for _ in range(500)]
    assert ci == pytest.approx(tuple(np.percentile(naive, [2.5, 97.5])), abs=1e-12)
    scipy_ci = sps.bootstrap((scores,), np.mean, n_resamples=2000, method="percentile", rng=0)
    wide = bootstrap_ci(scores, n_boot=2000)
    assert wide == pytest.approx(tuple(scipy_ci.confidence_interval), abs=0.02)
    narrow = bootstrap_ci(scores, n_boot=500, seed=3, level=0.5)
    assert ci[0] < narrow[0] < narrow[1] < ci[1]


def test_bootstrap_of_a_statistic_on_rows(baselines):
    _, _, metrics = baselines["item_mean"]
    pairs = np.column_stack(
        [_means(metrics, "model_means")[:, 0], _means(metrics, "subject_means")[:, 0]]
    )

    def r(rows):
        return np.corrcoef(rows[:, 0], rows[:, 1])[0, 1]

    ci = bootstrap_ci(pairs, r, n_boot=200, seed=1)
    assert ci[0] < r(pairs) < ci[1] <= 1
    rng = np.random.default_rng(1)
    naive = [r(pairs[rng.integers(0, len(pairs), len(pairs))]) for _ in range(200)]
    assert ci == pytest.approx(tuple(np.percentile(naive, [2.5, 97.5])), abs=1e-12)
    with pytest.raises(ValueError, match="1-D"):
        bootstrap_ci(pairs)


def test_bootstrap_edge_cases():
    assert bootstrap_ci(np.array([2.5])) is None  # 1 subject
    assert bootstrap_ci(np.array([np.nan, np.nan])) is None  # undefined on the data
    assert bootstrap_ci(np.array([1.0, np.nan, 3.0]), n_boot=50) is not None  # NaN left out
    assert bootstrap_ci(np.full(10, 2.0), n_boot=50) == (2.0, 2.0)


# --- the Score's interval ---------------------------------------------------------------------


@pytest.mark.parametrize("method", ["constant", "trait_mean", "item_mean"])
def test_score_ci_agrees_with_a_naive_bootstrap(baselines, method):
    mae = _mae(baselines[method][2])
    mae[3, 1] = np.nan  # a subject without a scored C item
    point = mean_mae([dict(zip(TRAITS, row)) for row in mae])
    score = sum(point.values())
    (lo, hi), traits = score_ci(mae, n_boot=300, seed=7)
    assert lo < score < hi
    assert all(traits[t][0] < point[t] < traits[t][1] for t in TRAITS)
    rng = np.random.default_rng(7)
    naive_scores, naive_traits = [], []
    for _ in range(300):
        rows = mae[rng.integers(0, len(mae), len(mae))]
        means = mean_mae([dict(zip(TRAITS, row)) for row in rows])  # as palign aggregates
        naive_scores.append(sum(means.values()))
        naive_traits.append([means[t] for t in TRAITS])
    assert (lo, hi) == pytest.approx(tuple(np.percentile(naive_scores, [2.5, 97.5])), abs=1e-12)
    for i, t in enumerate(TRAITS):
        expected = np.percentile(np.array(naive_traits)[:, i], [2.5, 97.5])
        assert traits[t] == pytest.approx(tuple(expected), abs=1e-12)
    # The same draw as bootstrap_ci's: the Score's interval is bootstrap_ci of the Score.
    same = bootstrap_ci(mae, lambda m: np.nansum(np.nanmean(m, 0)), n_boot=300, seed=7)
    assert same == pytest.approx((lo, hi), abs=1e-12)


def test_score_ci_edge_cases(baselines):
    mae = _mae(baselines["trait_mean"][2])
    assert score_ci(mae[:1]) is None  # 1 subject
    undefined = mae.copy()
    undefined[:, 2] = np.nan  # a trait never scored: the Score is undefined
    assert score_ci(undefined, n_boot=50) is None
    with pytest.raises(ValueError, match="n_subjects, 5"):
        score_ci(mae[:, :4])


# --- paired tests -----------------------------------------------------------------------------


def test_paired_test_matches_scipy(baselines):
    a = _mae(baselines["trait_mean"][2]).sum(1)
    b = _mae(baselines["constant"][2]).sum(1)
    b[4] = np.nan  # left out
    t = paired_test("trait_mean", a, "constant", b, n_boot=400, seed=2)
    d = np.delete(a - b, 4)
    assert t.n == len(a) - 1 and t.diff == pytest.approx(d.mean())
    assert t.p_wilcoxon == pytest.approx(sps.wilcoxon(d, zero_method="pratt").pvalue, rel=1e-12)
    assert t.ci == pytest.approx(bootstrap_ci(d, n_boot=400, seed=2), abs=1e-12)  # other sums
    rng = np.random.default_rng(2)
    centred = [d[rng.integers(0, len(d), len(d))].mean() - d.mean() for _ in range(400)]
    extreme = sum(abs(c) >= abs(d.mean()) for c in centred)
    assert t.p_bootstrap == pytest.approx((1 + extreme) / 401)
    assert t.diff < 0 and t.holds() and t.reason is None
    assert describe_difference(t).startswith(
        f"trait_mean is better than constant by {-t.diff:.2f} (95 % CI {-t.ci[1]:.2f} to "
        f"{-t.ci[0]:.2f}, Wilcoxon p = "
    )
    assert describe_difference(t).endswith(f", {len(a) - 1} subjects)")
    back = paired_test("constant", b, "trait_mean", a, n_boot=400, seed=2)
    assert back.diff == pytest.approx(-t.diff) and back.p_wilcoxon == pytest.approx(t.p_wilcoxon)
    assert describe_difference(back).startswith("constant is worse than trait_mean by")


def test_paired_test_on_noise_is_not_distinguishable(baselines):
    a = _mae(baselines["item_mean"][2]).sum(1)
    noise = np.random.default_rng(0).normal(0, 0.01, len(a))
    t = paired_test("pas", a + noise, "item_mean", a, n_boot=400)
    assert not t.holds() and t.ci[0] < 0 < t.ci[1] and t.p_bootstrap > 0.05
    assert t.p_wilcoxon == pytest.approx(sps.wilcoxon(noise, zero_method="pratt").pvalue)
    assert describe_difference(t).startswith(
        f"pas is not distinguishable from item_mean on {len(a)} subjects (difference "
    )


def test_paired_test_edge_cases(baselines):
    a = _mae(baselines["item_mean"][2]).sum(1)
    same = paired_test("x", a, "y", a, n_boot=100)  # identical methods
    assert same.diff == 0 and same.ci == (0.0, 0.0) and not same.holds()
    assert same.p_wilcoxon is None and "every paired difference is 0" in same.reason
    assert same.p_bootstrap == 1.0
    one = paired_test("x", a[:1], "y", a[:1] + 1)  # 1 subject
    assert one.n == 1 and one.diff == -1 and one.ci is None and one.p_wilcoxon is None
    assert one.p_bootstrap is None and "1 subject" in one.reason
    assert (
        describe_difference(one) == "x and y cannot be compared (1 subject: a paired test needs 2)"
    )
    none = paired_test("x", np.array([np.nan, 1.0]), "y", np.array([2.0, np.nan]))
    assert none.n == 0 and none.diff is None and none.reason == "no subject has both Scores"
    with pytest.raises(ValueError, match="level 0.95"):
        same.holds(0.9)
    with pytest.raises(ValueError):
        paired_test("x", a, "y", a[:-1])


def test_paired_test_round_trips_through_json(baselines):
    a = _mae(baselines["trait_mean"][2]).sum(1)
    b = _mae(baselines["item_mean"][2]).sum(1)
    for t in (
        paired_test("trait_mean", a, "item_mean", b, n_boot=100),
        paired_test("x", a, "y", a, n_boot=100),
        paired_test("x", a[:1], "y", b[:1]),
    ):
        record = json.loads(json.dumps(t.to_json(), allow_nan=False))
        assert PairedTest.from_json(record) == t
        assert set(record) >= {"a", "b", "diff", "ci", "p_wilcoxon", "p_bootstrap", "n"}
        assert ("reason" in record) == (t.reason is not None)
    with pytest.raises(ValueError, match="no p_bootstrap"):
        PairedTest.from_json({"a": "x", "b": "y", "diff": 0, "ci": None, "p_wilcoxon": None,
                              "n": 3})  # fmt: skip


# --- subjects needed and wording --------------------------------------------------------------


def test_subjects_needed_is_the_normal_approximation(baselines):
    d = _mae(baselines["trait_mean"][2]).sum(1) - _mae(baselines["item_mean"][2]).sum(1)
    z = NormalDist().inv_cdf(0.975) + NormalDist().inv_cdf(0.8)
    assert subjects_needed(d) == math.ceil((z * np.std(d, ddof=1) / 0.1) ** 2)
    z = NormalDist().inv_cdf(0.995) + NormalDist().inv_cdf(0.9)
    expected = math.ceil((z * np.std(d, ddof=1) / 0.3) ** 2)
    assert subjects_needed(d, delta=0.3, power=0.9, alpha=0.01) == expected
    assert subjects_needed(np.array([0.2, np.nan])) is None  # sd undefined
    assert subjects_needed(np.zeros(5)) == 2  # no spread: a paired test's least
    with pytest.raises(ValueError):
        subjects_needed(d, delta=0)


def test_format_p():
    assert format_p(0.4123) == "0.41" and format_p(1.0) == "1" and format_p(0.001) == "0.001"
    assert format_p(1e-30) == "1e-30" and format_p(3.4e-5) == "3e-5"
