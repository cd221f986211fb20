"""`make reproduce-smoke` end to end (tiny_llama, both protocols), the table/CSV writer and its
errors. One smoke run per module; the other tests read its run dirs."""

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from palign.data import select_subjects
from palign.eval.answers import read_answers
from palign.report.plots import confusion, standard_error
from palign.report.reproduce import reproduce
from palign.report.results import ReproduceError

REPO = Path(__file__).resolve().parents[1]
PROTOCOLS = ("paper", "clean")
TRAITS = ("A", "C", "E", "N", "O")
LLM_ROWS = (
    "pas",
    "no_change",
    "few_shot",
    "personality_prompt",
    "dpo_smoke (2 steps)",
    "ppo_smoke (2 steps)",
    "psoups_smoke",
    "prompt_morl_smoke",
)
BASELINE_ROWS = ("constant (no LLM)", "trait_mean (no LLM)", "item_mean (no LLM)")
METHODS = (
    "pas",
    "no_change",
    "few_shot",
    "personality_prompt",
    "dpo_smoke",
    "ppo_smoke",
    "psoups_smoke",
    "prompt_morl_smoke",
)
BASELINES = ("constant", "trait_mean", "item_mean")
PLOTS = (
    "trait_errors",
    "trait_validity",
    "pas_alpha",
    "head_accuracy",
    *(f"confusion_{m}" for m in METHODS),  # the LLM methods' (the baselines': no LLM runs)
)
# table.md, .csv, .html, the plots of both protocols, and paired_differences under clean only:
# under paper the random model's generated answers leave no subject with a Score (no test).
N_FILES = 3 + 2 * len(PLOTS) + 1


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    """``make reproduce-smoke`` into a fresh folder, with this interpreter; ``-o setup``: the
    test exercises the target, not the set-up of ``.venv``."""
    out = tmp_path_factory.mktemp("reproduce_smoke")
    proc = subprocess.run(
        ["make", "-o", "setup", "reproduce-smoke", f"REPRO_OUT={out}", f"PY={sys.executable}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert f"Wrote {N_FILES} files to {out}" in proc.stdout
    return out


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def _entries(summary: dict) -> dict[str, dict]:
    """Row label in table.md -> the aggregate summary.json holds for it."""
    steps = {"dpo_smoke": "dpo_smoke (2 steps)", "ppo_smoke": "ppo_smoke (2 steps)"}
    out = {summary["method"]: summary}
    out.update({steps.get(k, k): v for k, v in summary["compare"].items()})
    out.update({f"{k} (no LLM)": v for k, v in summary["baselines"].items()})
    return out


def _table_rows(section: str) -> dict[str, list[str]]:
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and cells[0] != "method":
            rows[cells[0]] = cells[1:]
    return rows


def _fmt(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.3f}"


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def test_table_has_every_method_with_the_runs_numbers(smoke, papi):
    text = (smoke / "table.md").read_text()
    sections = text.split("## ")
    for protocol in PROTOCOLS:
        summary = _summary(smoke / protocol)
        assert summary["cases"] == [s.case for s in select_subjects(papi.subjects, sample=2)]
        (section,) = [s for s in sections if s.startswith(f"protocol={protocol}:")]
        assert "**The paper has no numbers for this model**" in section
        assert f"Subjects (2): {summary['cases'][0]}, {summary['cases'][1]}." in section
        assert "Training steps per subject: dpo_smoke 2, ppo_smoke 2 (the paper: 250)." in section
        rows = _table_rows(section)
        assert list(rows) == [*LLM_ROWS, *BASELINE_ROWS]
        for label, entry in _entries(summary).items():
            n, *traits, score, ci, item_r, unk = rows[label]
            assert n == "2" and traits == [_fmt(entry["mae"][t]) for t in TRAITS], label
            assert score == f"**{_fmt(entry['score'])}**"
            lo_hi = (entry.get("ci") or {}).get("score")  # none where the Score is NaN
            assert ci == (f"[{lo_hi[0]:.3f}, {lo_hi[1]:.3f}]" if lo_hi else "n/a"), label
            r = entry["validity"]["item_r"]
            assert item_r == (f"{r:.2f}" if isinstance(r, float) else "undefined"), label
            assert unk == f"{100 * entry['unk_rate']:.1f}%"
    clean = _entries(_summary(smoke / "clean"))
    # Logit scoring always parses; the baselines on the two sampled subjects (keyed coding).
    assert all(math.isfinite(clean[label]["score"]) for label in LLM_ROWS)
    assert [round(clean[b]["score"], 3) for b in BASELINE_ROWS] == [4.403, 2.903, 2.194]
    # Two DPO steps moved the adapter's answers; PAS kept alpha 0 (the unsteered model).
    assert clean["dpo_smoke (2 steps)"]["score"] != clean["no_change"]["score"]
    pas_rows = (smoke / "clean" / "results.jsonl").read_text().splitlines()
    assert [json.loads(r)["align_info"]["alpha"] for r in pas_rows] == [0.0, 0.0]
    assert clean["pas"]["mae"] == clean["no_change"]["mae"]


def test_table_labels_the_papers_numbers_and_the_alpha_selection(smoke):
    text = (smoke / "table.md").read_text()
    published = text.split("## The paper's Table 1 (published numbers, not palign's)")[1]
    for row in (
        "| Llama-3-8B-Instruct | PAS | 0.94 | 0.91 | 0.86 | 0.98 | 0.72 | 4.41 | pas |",
        "| Llama-3-8B-Instruct | Few-Shot |  |  |  |  |  | 5.96 | few_shot |",
        "| Llama-3-8B-Instruct | DPO |  |  |  |  |  | 7.45 | dpo, dpo_cpu, dpo_smoke |",
        "| Llama-3-8B-Instruct | PPO |  |  |  |  |  | 7.62 | ppo, ppo_cpu, ppo_smoke |",
        "| Llama-3-70B-Instruct | PAS |  |  |  |  |  | 4.74 | pas |",
        "| Llama-3-70B-Instruct | Few-Shot |  |  |  |  |  | 5.21 | few_shot |",
        "| GPT-4o | Prompting |  |  |  |  |  | 4.42 |  |",
    ):
        assert row in published
    assert "`protocol=paper` selects PAS's alpha ON THE TEST ITEMS" in text
    assert "`protocol=clean` selects it by k-fold on each subject's own 120 alignment items" in text
    assert "PAS alpha selected on: test items; chosen per subject: 0, 0." in text


def test_one_self_contained_page(smoke):
    page = (smoke / "table.html").read_text()
    assert page.count("data:image/png;base64,") == N_FILES - 3
    assert "<table>" in page and 'src="http' not in page and "<link" not in page
    assert "Table 1 of <em>Personality Alignment of Large Language Models</em>" in page


def test_plots_are_png_files(smoke):
    assert not (smoke / "plots" / "paired_differences_paper.png").exists()
    names = [f"{n}_{p}" for p in PROTOCOLS for n in PLOTS] + ["paired_differences_clean"]
    for name in names:
        path = smoke / "plots" / f"{name}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
        height, width, _ = imread(path).shape
        assert height >= 400 and width >= 500, (path, height, width)


def test_csv_round_trips_the_summaries(smoke, tmp_path):
    written = reproduce([smoke / "paper", smoke / "clean"], tmp_path)
    assert (
        len(written) == N_FILES
        and (tmp_path / "table.md").read_text() == (smoke / "table.md").read_text()
    )
    with open(tmp_path / "table.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(PROTOCOLS) * (len(METHODS) + len(BASELINES))
    for protocol in PROTOCOLS:
        summary = _summary(smoke / protocol)
        entries = {"pas": summary, **summary["compare"], **summary["baselines"]}
        mine = {r["method"]: r for r in rows if r["protocol"] == protocol}
        assert list(mine) == list(entries)
        for name, entry in entries.items():
            row = mine[name]
            assert int(row["n_subjects"]) == entry["n_subjects"]
            assert _same(float(row["score"]), entry["score"])
            assert float(row["unk_rate"]) == entry["unk_rate"]
            assert all(_same(float(row[f"mae_{t}"]), entry["mae"][t]) for t in TRAITS)
            assert row["paper_score"] == ""  # tiny_llama is none of the paper's models
        assert mine["dpo_smoke"]["steps"] == "2" and mine["pas"]["steps"] == ""


def test_a_paper_model_run_gets_the_published_numbers_beside_it(smoke, tmp_path):
    """The clean smoke run relabelled as a Llama-3-8B-Instruct run (its numbers unchanged)."""
    run = tmp_path / "clean"
    shutil.copytree(smoke / "clean", run)
    summary = _summary(run)
    (run / "summary.json").write_text(json.dumps({**summary, "model": "llama3_8b"}))
    reproduce([run], tmp_path / "out")
    text = (tmp_path / "out" / "table.md").read_text()
    assert "- Model: `llama3_8b` = the paper's Llama-3-8B-Instruct." in text
    rows = _table_rows(text.split("## The paper's Table 1")[0])
    pas = rows["pas"]
    paper_mae = dict(zip(TRAITS, ("0.94", "0.91", "0.86", "0.98", "0.72")))
    assert pas[1:6] == [f"{_fmt(summary['mae'][t])} (*paper* {paper_mae[t]})" for t in TRAITS]
    paper_scores = {label: cells[-1] for label, cells in rows.items()}
    published = "{} (no interval given)".format
    assert paper_scores == {
        "pas": published("4.41"),
        "no_change": "",
        "few_shot": published("5.96"),
        "personality_prompt": "",
        "dpo_smoke (2 steps)": published("7.45"),
        "ppo_smoke (2 steps)": published("7.62"),
        "psoups_smoke": "not published",
        "prompt_morl_smoke": "not published",
        **{b: "" for b in BASELINE_ROWS},
    }
    with open(tmp_path / "out" / "table.csv", newline="") as f:
        by_method = {r["method"]: r for r in csv.DictReader(f)}
    assert by_method["pas"]["paper_mae_A"] == "0.94" and by_method["pas"]["paper_score"] == "4.41"
    assert (
        by_method["few_shot"]["paper_mae_A"] == ""
        and by_method["dpo_smoke"]["paper_method"] == "DPO"
    )


def test_two_runs_of_one_protocol_are_refused(smoke):
    with pytest.raises(ReproduceError, match="are both protocol=clean: pass one each"):
        reproduce([smoke / "clean", smoke / "clean"], smoke / "unused")


def test_standard_error_over_finite_values():
    assert standard_error([1.0, 2.0, 3.0, float("nan")]) == pytest.approx(1 / math.sqrt(3))
    assert math.isnan(standard_error([2.0, float("nan")]))


def _mae_by_hand(path: Path) -> dict[str, float]:
    """Per-trait MAE of one answers file, computed with pandas alone: the selected lines with a
    subject answer and a parsed prediction."""
    t = pd.read_csv(path)
    t = t[t["selected"] & (t["target"] != 0) & (t["predicted"] != 0)]
    err = (t["predicted"] - t["target"]).abs()
    return {trait: float(err[t["trait"] == trait].mean()) for trait in TRAITS}


def test_recomputing_from_the_answers_files_gives_the_summary_exactly(smoke):
    """Every method's and baseline's numbers in summary.json, to the last digit, from the answers
    files alone (integer errors: each subject's MAE is one exact division; two subjects)."""
    for protocol in PROTOCOLS:
        run = smoke / protocol
        summary = _summary(run)
        entries = {"pas": summary, **summary["compare"], **summary["baselines"]}
        assert list(entries) == [*METHODS, *BASELINES]
        for name, entry in entries.items():
            per_case = [_mae_by_hand(run / "answers" / name / f"{c}.csv") for c in summary["cases"]]
            for t in TRAITS:
                values = [m[t] for m in per_case if not math.isnan(m[t])]
                again = float(np.mean(values)) if values else math.nan
                assert _same(again, entry["mae"][t]), (protocol, name, t)
            unparsed = [
                (
                    pd.read_csv(run / "answers" / name / f"{c}.csv").query("selected")["predicted"]
                    == 0
                ).mean()
                for c in summary["cases"]
            ]
            assert float(np.mean(unparsed)) == entry["unk_rate"], (protocol, name)


def test_answers_files_keep_every_pas_candidate_under_paper(smoke):
    run = smoke / "paper"
    table = read_answers(run, "pas")
    rows = [json.loads(r) for r in (run / "results.jsonl").read_text().splitlines()]
    for row in rows:
        mine = table[table["case"] == row["case"]]
        alphas = sorted(float(a) for a in row["align_info"]["alpha_scores_on_test_items"])
        assert sorted(mine["value"].unique()) == alphas and (mine["setting"] == "alpha").all()
        assert len(mine) == 180 * len(alphas)
        (chosen,) = mine[mine["selected"]]["value"].unique()
        assert chosen == row["align_info"]["alpha"] and row["selected_on_test_items"] == "alpha"
        assert mine["text"].str.startswith("Option").all()  # the reference's prefill, kept


def test_confusion_counts_every_answer(smoke):
    table = read_answers(smoke / "clean", "few_shot")
    for trait in TRAITS:
        counts = confusion(table, trait)
        lines = table[(table["trait"] == trait) & (table["target"] != 0)]
        assert counts.shape == (5, 6) and counts.sum() == len(lines)
        assert counts[0, 0] == ((lines["target"] == 5) & (lines["predicted"] == 5)).sum()
        assert counts[:, 5].sum() == (lines["predicted"] == 0).sum()


@pytest.mark.parametrize("damage", ["edit", "remove"])
def test_answers_that_disagree_with_the_summary_are_named(smoke, tmp_path, damage):
    run = tmp_path / "clean"
    shutil.copytree(smoke / "clean", run)
    case = _summary(run)["cases"][1]
    path = run / "answers" / "few_shot" / f"{case}.csv"
    if damage == "remove":
        path.unlink()
        with pytest.raises(ReproduceError, match=f"{path}: missing"):
            reproduce([run], tmp_path / "out")
        return
    table = pd.read_csv(path)
    line = table.index[table["target"] != 0][0]
    table.loc[line, "predicted"] = 1 if table.loc[line, "target"] != 1 else 5
    table.to_csv(path, index=False)
    with pytest.raises(
        ReproduceError, match=f"{path}: its answers give few_shot's case {case} other metrics"
    ):
        reproduce([run], tmp_path / "out")
