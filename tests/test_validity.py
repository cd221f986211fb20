"""A run's validity metrics, intervals and paired tests (issue 21's acceptance run:
``method=trait_mean dataset.limit=30``), each number recomputed here from the answers files with
scipy and numpy, independently of palign.eval.stats."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import open_dict
from scipy import stats as sps

from palign.config import compose
from palign.constants import TRAITS
from palign.errors import RunDirError
from palign.eval.stats import paired_test
from palign.report.markdown import comparisons
from palign.report.results import load_run
from palign.rundir import RunDir
from palign.runs.runner import run


@pytest.fixture(scope="module")
def trait_mean_30(tmp_path_factory, papi):  # papi: skipped with its reason without the data
    """``python -m palign method=trait_mean dataset.limit=30`` (in-process), its run dir."""
    cfg = compose(["method=trait_mean", "dataset.limit=30", "logger=csv"])
    out = tmp_path_factory.mktemp("trait_mean_30")
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    return run(cfg), out


def _keyed(answers: pd.Series, key: pd.Series) -> np.ndarray:
    """Raw answers 1..5 as the trait reads them: reverse-keyed items (key -1) turned around."""
    return np.where(key > 0, answers, 6 - answers)


def _by_hand(out: Path, method: str) -> pd.DataFrame:
    """Per subject, from the answers files: the item-level numbers and keyed trait means."""
    per = []
    for file in sorted((out / "answers" / method).glob("*.csv"), key=lambda p: int(p.stem)):
        t = pd.read_csv(file)
        t = t[t["selected"]]
        counted = t[(t["predicted"] != 0) & (t["target"] != 0)]
        p, y = counted["predicted"].to_numpy(float), counted["target"].to_numpy(float)
        varies = np.ptp(p) > 0 and np.ptp(y) > 0
        row = {
            "item_r": sps.pearsonr(p, y).statistic if varies else np.nan,
            "item_spearman": sps.spearmanr(p, y).statistic if varies else np.nan,
            "accuracy": np.mean(p == y),
            "within_one": np.mean(np.abs(p - y) <= 1),
            "score": sum(
                np.abs(g["predicted"] - g["target"]).mean() for _, g in counted.groupby("trait")
            ),
        }
        for trait in TRAITS:
            mine = t[(t["trait"] == trait) & (t["predicted"] != 0)]
            known = t[(t["trait"] == trait) & (t["target"] != 0)]
            row[f"model_{trait}"] = _keyed(mine["predicted"], mine["key"]).mean()
            row[f"subject_{trait}"] = _keyed(known["target"], known["key"]).mean()
        per.append(row)
    return pd.DataFrame(per)


def test_validity_matches_scipy_on_the_answers_files(trait_mean_30):
    summary, out = trait_mean_30
    for name, entry in {"trait_mean": summary.main, **summary.baselines}.items():
        hand = _by_hand(out, name)
        v = entry.validity
        for key in ("item_r", "item_spearman", "accuracy", "within_one"):
            defined = hand[key].dropna()
            assert v.n[key] == len(defined), (name, key)
            if len(defined):
                assert v.item[key].value == pytest.approx(defined.mean(), abs=1e-12), (name, key)
                lo, hi = v.ci[key]
                assert lo <= v.item[key].value <= hi
        for trait in TRAITS:
            x, y = hand[f"model_{trait}"], hand[f"subject_{trait}"]
            if np.ptp(x) > 0:
                expected = sps.pearsonr(x, y).statistic
                assert v.trait_r[trait].value == pytest.approx(expected, abs=1e-12), (name, trait)
                lo, hi = v.ci[f"trait_r.{trait}"]
                assert -1 <= lo <= expected <= hi <= 1
    # A constant predictor: its correlations are undefined, with the reason, never 0 or NaN.
    constant = summary.baselines["constant"].validity
    assert constant.item["item_r"].value is None and constant.n["item_r"] == 0
    assert "the predictions do not vary (constant)" in constant.item["item_r"].reason
    assert all(constant.trait_r[t].reason.endswith("do not vary (constant)") for t in TRAITS)
    assert constant.item["accuracy"].value > 0  # defined: exact matches do not need variance
    saved = json.loads((out / "summary.json").read_text())
    reason = saved["baselines"]["constant"]["validity"]["item_r"]
    assert reason["value"] is None and "do not vary" in reason["reason"]


def test_score_intervals_and_paired_tests(trait_mean_30):
    summary, out = trait_mean_30
    lo, hi = summary.main.ci["score"]
    assert lo < summary.score < hi and hi - lo < 0.5  # 30 subjects
    assert all(summary.main.ci["mae"][t][0] < summary.main.mae[t] for t in TRAITS)
    tests = {t.b: t for t in summary.tests}
    assert list(tests) == ["constant", "item_mean"]  # trait_mean is the main method
    mine = _by_hand(out, "trait_mean")["score"].to_numpy()
    for other, better in (("constant", True), ("item_mean", False)):
        test = tests[other]
        d = mine - _by_hand(out, other)["score"].to_numpy()
        assert test.n == 30 and test.diff == pytest.approx(d.mean(), abs=1e-12)
        assert test.p_wilcoxon == pytest.approx(
            sps.wilcoxon(d, zero_method="pratt").pvalue, rel=1e-9
        )
        assert test.holds() and (test.diff < 0) == better and test.ci[0] <= test.diff <= test.ci[1]
        needed = summary.subjects_needed[other]
        z = sps.norm.ppf(0.975) + sps.norm.ppf(0.8)
        assert needed == max(2, int(np.ceil((z * d.std(ddof=1) / 0.1) ** 2)))
    report = (out / "report.md").read_text()
    assert "trait_mean is better than constant by " in report
    assert "trait_mean is worse than item_mean by " in report
    assert "| trait_mean | 30 |" in report and f"[{lo:.3f}, {hi:.3f}]" in report
    assert "item_r, item_spearman undefined: undefined for every subject (the predictions" in report
    assert {"trait_validity.png", "paired_differences.png"} <= {
        p.name for p in (out / "plots").iterdir()
    }


def test_the_summary_is_recomputed_from_the_answers_to_the_last_digit(trait_mean_30, tmp_path):
    summary, out = trait_mean_30
    again = load_run(out)  # every number, interval and test recomputed and compared
    assert again.summary == summary
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    saved = json.loads((copy / "summary.json").read_text())
    saved["validity"]["trait_r"]["A"] = 0.99
    (copy / "summary.json").write_text(json.dumps(saved))
    with pytest.raises(RunDirError, match="trait_mean recomputed from .* differs .*validity"):
        load_run(copy)
    saved = json.loads((out / "summary.json").read_text())
    saved["tests"][0]["p_wilcoxon"] = 0.5
    (copy / "summary.json").write_text(json.dumps(saved))
    with pytest.raises(RunDirError, match="the paired tests recomputed"):
        load_run(copy)
    assert RunDir(out).read_summary() == summary


def test_identical_scores_are_said_so_not_tested(trait_mean_30):
    """A method answering as another on every subject (few_shot on the embedded model answers
    "C" like constant): the report says so instead of an interval of zeros and a sample size."""
    summary, _ = trait_mean_30
    scores = np.array([3.0, 2.5, 4.0])
    same = paired_test("few_shot", scores, "constant", scores)
    other = paired_test("few_shot", scores, "item_mean", scores - 1.0)
    text = comparisons(replace(summary, tests=[same, other], subjects_needed={"constant": 2}))
    assert "- few_shot scores as constant on each of the 3 subjects." in text
    assert "few_shot is worse than item_mean by 1.00" in text
