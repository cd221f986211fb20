import math

import numpy as np
import pytest

from palign.data.papi import Item, Subject
from palign.eval.metrics import mean_mae, subject_metrics
from palign.methods import Constant, ItemMean, MethodContext, TraitMean
from palign.runs.runner import baseline_aggregates, baseline_rows
from palign.runs.summary import aggregate_baselines


def _items(spec):
    """spec: list of (trait, key) -> Items numbered from 1."""
    return [
        Item(number=i + 1, text=f"Item {i}.", trait=t, key=k, facet="")
        for i, (t, k) in enumerate(spec)
    ]


def test_metrics_on_a_hand_made_case():
    items = _items([("A", 1), ("A", -1), ("C", 1), ("E", 1), ("N", 1), ("O", 1), ("O", 1)])
    predicted = np.array([5, 2, 0, 3, 1, 4, 4])  # item 3 unparsed
    target = np.array([4, 4, 3, 3, 5, 0, 2])  # item 6 missing
    m = subject_metrics(predicted, target, items)
    assert m.mae["A"] == pytest.approx((1 + 2) / 2)
    assert math.isnan(m.mae["C"])  # its only item is unparsed
    assert m.mae["E"] == 0 and m.mae["N"] == 4 and m.mae["O"] == 2  # missing target left out
    assert math.isnan(m.score)
    assert m.unk_rate == pytest.approx(1 / 7)
    assert m.answers == {"A": 1, "B": 2, "C": 1, "D": 1, "E": 1, "UNK": 1}
    assert m.n_scored == {"A": 2, "C": 0, "E": 1, "N": 1, "O": 1}
    # keyed means: A items predicted 5 and 2 (key -1 -> 4): 4.5; subject A: 4 and 4 -> (4 + 2) / 2
    assert m.model_means["A"] == pytest.approx(4.5) and m.subject_means["A"] == pytest.approx(3.0)


def test_score_is_the_sum_of_trait_errors():
    items = _items([(t, 1) for t in "ACENO"])
    m = subject_metrics(np.array([1, 2, 3, 4, 5]), np.array([5, 5, 5, 5, 5]), items)
    assert m.mae == {"A": 4, "C": 3, "E": 2, "N": 1, "O": 0}
    assert m.score == 10 and m.unk_rate == 0


def test_mean_mae_ignores_nan_subjects():
    rows = [{t: 1.0 for t in "ACENO"}, {**{t: 3.0 for t in "ACENO"}, "C": float("nan")}]
    assert mean_mae(rows) == {"A": 2.0, "C": 1.0, "E": 2.0, "N": 2.0, "O": 2.0}


def test_trait_mean_maps_back_through_the_key():
    items = _items([("A", 1), ("A", -1), ("A", 1), ("A", -1)])
    subject = Subject(case=1, index=0, raw=np.array([5, 2, 3, 1]))  # keyed 5, 4, 3, 5 -> 4.25
    method = TraitMean()
    art = method.align(subject, items[:2] + items[2:])
    assert art.trait_means[0] == pytest.approx(4.25)
    assert method.answer(subject, art, items).scores.tolist() == [4, 2, 4, 2]


def test_item_mean_uses_other_subjects_and_trait_offset(papi):
    method = ItemMean()
    method.setup(MethodContext(papi))
    inv = papi.inventory
    subject = papi.subjects[0]
    art = method.align(subject, inv.train_items)
    answers = method.answer(subject, art, inv.test_items).scores
    assert answers.min() >= 1 and answers.max() <= 5
    # Changing the subject's own test answers cannot change the prediction (no leak).
    saved = subject.raw.copy()
    subject.raw[np.array(inv.test) - 1] = 1
    try:
        again = method.answer(
            subject, method.align(subject, inv.train_items), inv.test_items
        ).scores
    finally:
        subject.raw[:] = saved
    assert (again == answers).all()


def test_constant_rejects_values_off_the_scale():
    with pytest.raises(ValueError, match="method.value=7"):
        Constant(value=7)


def test_baselines_reproduce_the_documented_numbers(papi):
    """README of the PAPI copy: always 3 -> 3.79, trait mean rounded -> 2.86 (300 subjects)."""
    out = aggregate_baselines(baseline_rows(papi, papi.subjects))
    assert baseline_aggregates(papi, papi.subjects) == out  # without tables: the same numbers
    assert out["constant"].score == pytest.approx(3.79, abs=0.005)
    assert out["trait_mean"].score == pytest.approx(2.86, abs=0.005)
    assert out["item_mean"].score < out["trait_mean"].score
