"""PAS soup (method=pas_soup) on tiny_llama: a subject's shift is the weighted sum of the ten
experts' head shifts, head by head; keyed 5 everywhere gives the high experts' mean; a run
aligns with no forward and writes the soup in align_info; a second run loads the experts from
the cache (no set-up forward); bad settings are one error line each."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import twice_with_a_fresh_cache
from palign.data.papi import Subject
from palign.errors import PASError
from palign.eval.scoring import Scorer, ScoringConfig
from palign.methods.base import MethodContext
from palign.methods.pas_soup import PASSoup, soup_profile
from palign.methods.population import expert_names, extreme_answers, soup_weights, trait_levels
from palign.pas.profile import PASProfile
from palign.rundir import RunDir

METHOD = "pas_soup_smoke"


@pytest.fixture(scope="module")
def soup_runs(tmp_path_factory):
    """pas_soup_smoke on 2 subjects, twice, with a fresh cache (the converted tokenizer linked
    in): into ``first`` (the experts fitted), then ``second`` (same settings, another run dir)."""
    root = tmp_path_factory.mktemp("pas_soup")
    return twice_with_a_fresh_cache(
        root, ["model=tiny_llama", "hardware=cpu", "dataset.limit=2", f"method={METHOD}"]
    )


def _experts(rd: RunDir) -> dict[str, PASProfile]:
    folder = rd.population(METHOD) / "experts"
    return {n: PASProfile.load(folder / n / "profile") for n in expert_names()}


def _head(shift: torch.Tensor, layer: int, head: int, dim: int) -> torch.Tensor:
    return shift[0, layer, head * dim : (head + 1) * dim]


def test_a_subjects_shift_is_the_weighted_sum_of_the_experts_head_by_head(soup_runs, papi):
    """The profile a run saved for each subject shifts every head of the experts' union by
    Σ_i w_i * alpha * sigma_i * d_i (0 for an expert without the head) to float32 rounding
    (rtol 1e-5, atol 1e-9), and no other head at all; its weights are its levels' soup
    weights."""
    summary, rd = soup_runs["first"]
    experts = _experts(rd)
    n_layers, n_heads, dim = experts["A+"].shape
    alpha = 4.0  # conf/method/pas_soup.yaml
    for case in summary.cases:
        info = json.loads((rd.artifacts(METHOD) / str(case) / "artifact.json").read_text())
        subject = next(s for s in papi.subjects if s.case == case)
        weights = soup_weights(trait_levels(subject, papi.inventory.train_items), "all")
        assert info["weights"] == pytest.approx(weights, abs=1e-12)
        soup = PASProfile.load(rd.artifacts(METHOD) / str(case) / "profile").total_shift()
        assert soup.shape == (1, n_layers, n_heads * dim)
        union = {(int(la), int(h)) for p in experts.values() for la, h in zip(p.layer, p.head)}
        for layer in range(n_layers):
            for head in range(n_heads):
                expected = torch.zeros(dim)
                for name, p in experts.items():
                    for m in range(len(p.layer)):
                        if (int(p.layer[m]), int(p.head[m])) == (layer, head):
                            expected += weights[name] * alpha * p.sigma[m] * p.direction[m]
                got = _head(soup, layer, head, dim)
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-9)
                if (layer, head) not in union:
                    assert not got.any()
        assert info["expert_heads"] == len(union) and 0 < info["heads_shifted"] <= len(union)


def test_keyed_5_everywhere_gets_the_high_experts_mean_shift(soup_runs, papi):
    """A subject at keyed 5 on every alignment item: weight 1/5 on each high expert, 0 on each
    low one, so the soup is exactly the mean of the five high experts' shifts (same tolerance);
    a low expert mirrors its high one (mass-mean directions negated, same heads and sigma)."""
    _, rd = soup_runs["first"]
    experts = _experts(rd)
    train = papi.inventory.train_items
    raw = np.zeros(300, dtype=np.int64)
    raw[[it.number - 1 for it in train]] = extreme_answers(train, high=True)
    weights = soup_weights(trait_levels(Subject(case=1, index=0, raw=raw), train), "all")
    soup = soup_profile(experts, weights, alpha=4.0)
    assert set(soup.meta["soup"]) == {n for n in expert_names() if n.endswith("+")}
    high = [experts[n].total_shift(4.0) for n in expert_names() if n.endswith("+")]
    torch.testing.assert_close(soup.total_shift(), torch.stack(high).mean(0), rtol=1e-5, atol=1e-9)
    for t in "ACENO":
        plus, minus = experts[f"{t}+"], experts[f"{t}-"]
        assert torch.equal(plus.layer, minus.layer) and torch.equal(plus.head, minus.head)
        torch.testing.assert_close(minus.direction, -plus.direction, rtol=0, atol=1e-6)
        torch.testing.assert_close(minus.sigma, plus.sigma, rtol=1e-5, atol=0)


def test_a_run_aligns_with_no_forward_and_records_the_soup(soup_runs, papi):
    summary, rd = soup_runs["first"]
    pop = json.loads((rd.population(METHOD) / "population.json").read_text())
    rows = rd.read_rows(METHOD, METHOD)
    assert [r.case for r in rows] == list(summary.cases) and len(rows) == 2
    for row in rows:
        assert row.cost["align"]["forward_calls"] == 0
        assert row.cost["answer"]["forward_calls"] > 0
        info = row.align_info
        assert sum(info["weights"].values()) == pytest.approx(1.0)
        assert set(info["levels"]) == set("ACENO") and info["alpha"] == 4.0
        assert info["population"] == pop["id"] and info["heads_shifted"] > 0
        assert np.isfinite(row.score)
    assert summary.main.cost["setup"]["forward_calls"] > 0  # the experts' activations
    targets = (rd.population(METHOD) / "training_rows.csv").read_text().splitlines()
    assert len(targets) == 1 + 2 * 120 and all(line.startswith(",") for line in targets[1:])


def test_a_second_run_loads_the_experts_from_the_cache(soup_runs):
    first, rd1 = soup_runs["first"]
    second, rd2 = soup_runs["second"]
    assert second.main.cost["setup"]["forward_calls"] == 0
    ids = [
        json.loads((rd.population(METHOD) / "population.json").read_text())["id"]
        for rd in (rd1, rd2)
    ]
    assert ids[0] == ids[1]
    scores = [[r.score for r in rd.read_rows(METHOD, METHOD)] for rd in (rd1, rd2)]
    assert scores[0] == pytest.approx(scores[1])


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"alpha": -1}, "method.alpha=-1"),
        ({"alpha": float("nan")}, "method.alpha=nan"),
        ({"normalize": "foo"}, "method.normalize='foo'"),
        ({"top_k": 0}, "method.top_k=0"),
        ({"train_fraction": 0.99}, "method.train_fraction=0.99: .* an expert's 24 items"),
        ({"direction": "pca"}, "method.direction='pca'"),
        ({"alphas": [1, 2]}, "PASSoup has no setting 'alphas'"),
    ],
)
def test_bad_settings_are_one_error_line(values, message):
    with pytest.raises(Exception, match=message) as raised:
        PASSoup(**values)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"top_k": 9}, "method.top_k=9 exceeds the 8 candidate heads"),
        ({"layers": [0, 5]}, r"method.layers=\[0, 5\] is not a range within 0..2"),
    ],
)
def test_settings_the_model_cannot_take_are_refused_before_any_forward(values, message, papi, tiny):
    method = PASSoup(**values)
    before = tiny.meter.snapshot()
    with pytest.raises(PASError, match=message):
        method.setup(MethodContext(papi, Scorer(tiny, ScoringConfig())))
    assert (tiny.meter.snapshot() - before).forward_calls == 0
