"""Hydra composition of every config, end-to-end runs on tiny_llama, clear errors."""

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from conftest import CONF_DIR
from palign.data import select_subjects
from palign.eval.answers import COLUMNS, PROB_COLUMNS, read_table
from palign.eval.records import RunProtocol
from palign.eval.scoring import parse_answer
from palign.rundir import RunDir
from palign.runs.runner import run
from test_bad_inputs import invoke

GROUPS = [
    "model", "method", "dataset", "protocol", "evaluation", "hardware", "logger", "experiment",
]  # fmt: skip


@pytest.mark.parametrize(
    "group, option",
    [(g, p.stem) for g in GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml"))],
)
def test_every_config_composes_and_resolves(cfg_factory, group, option):
    cfg = cfg_factory(f"{group}={option}")
    container = OmegaConf.to_container(cfg, resolve=True)
    assert container["protocol"]["coding"] in ("keyed", "as_stored")
    if group == "model":
        assert cfg.model._target_.startswith("palign.models.")
    if group == "method":
        assert cfg.method._target_.startswith("palign.methods.")


def _read(out: Path):
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return rows, json.loads((out / "summary.json").read_text())


def test_few_shot_end_to_end_on_tiny_llama(cfg_factory, papi):
    cfg = cfg_factory("model=tiny_llama", "method=few_shot", "dataset.limit=2")
    summary = run(cfg)
    out = Path(cfg.paths.output_dir)
    rows, saved = _read(out)
    assert saved == json.loads(json.dumps(summary.to_json()))
    assert RunDir(out).read_summary() == summary  # read back as written
    assert [r["case"] for r in rows] == saved["cases"] and len(rows) == 2
    for row in rows:
        assert set(row["mae"]) == set("ACENO") and row["method"] == "few_shot"
        assert sum(row["answers"].values()) == 180 and row["answers"]["UNK"] == 0
        assert row["score"] == pytest.approx(sum(row["mae"].values()))
        assert row["timing"]["eval_s"] > 0
    assert saved["method"] == "few_shot" and saved["model"] == "tiny_llama"
    assert saved["protocol"] == {"name": "clean", "coding": "keyed", "scoring": "logit"}
    assert saved["n_subjects"] == 2 and set(saved["timing"]) == {
        "align_s_per_subject",
        "eval_s_per_subject",
    }
    assert set(saved["baselines"]) == {"constant", "trait_mean", "item_mean"}
    assert saved["baselines"]["constant"]["n_subjects"] == 2
    assert saved["baselines_all_subjects"]["constant"]["n_subjects"] == 300
    report = (out / "report.md").read_text()
    assert (
        "| few_shot | 2 |" in report
        and "| item_mean (no LLM) | 2 |" in report
        and "clean" in report
    )
    page = (out / "report.html").read_text()  # the report and its plots on one page
    assert "<td>few_shot</td>" in page and page.count("data:image/png;base64,") == len(
        list((out / "plots").glob("*.png"))
    )
    resolved = OmegaConf.load(out / "config.yaml")
    assert resolved.scoring.mode == "logit" and resolved.scoring.batch_size == 16
    # Every answer kept: one file per subject and method (and baseline), read by pandas.
    by_case = {s.case: s for s in papi.subjects}
    test_items = papi.inventory.test_items
    for name in ("few_shot", "constant", "trait_mean", "item_mean"):
        for row in rows:
            table = pd.read_csv(out / "answers" / name / f"{row['case']}.csv")
            assert list(table.columns) == list(COLUMNS) and len(table) == 180
            assert table["item"].tolist() == [it.number for it in test_items]
            assert table["trait"].tolist() == [it.trait for it in test_items]
            target = by_case[row["case"]].answers(papi.inventory.test)
            assert (table["target"] == target).all() and table["selected"].all()
    table = read_table(out / "answers" / "few_shot" / f"{rows[0]['case']}.csv")
    probs = table[list(PROB_COLUMNS)].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=0, atol=1e-5)  # logit scoring
    assert (table["predicted"] == 5 - probs.argmax(1)).all() and table["parsed"].all()
    assert (table["text"] == "").all() and (table["setting"] == "").all()
    assert {k: v for k, v in rows[0]["mae"].items()} == {
        t: np.abs(g["predicted"] - g["target"])[g["target"] != 0].mean()
        for t, g in table.groupby("trait")
    }
    prompt = out / "artifacts" / "few_shot" / str(rows[0]["case"]) / "system_prompt.txt"
    assert prompt.read_text().count(";") == 120  # the preamble and 120 answers, ;-joined
    with open(out / "csv" / "metrics.csv") as f:
        logged = list(csv.DictReader(f))
    per_subject = [r for r in logged if r.get("few_shot/score")]
    assert [float(r["few_shot/score"]) for r in per_subject] == pytest.approx(
        [r["score"] for r in rows]
    )
    assert [int(float(r["few_shot/case"])) for r in per_subject] == [r["case"] for r in rows]
    assert float(logged[-1]["summary/few_shot/score"]) == pytest.approx(summary.score)


def test_paper_protocol_generates_and_counts_unparsed(cfg_factory):
    cfg = cfg_factory(
        "model=tiny_llama",
        "method=no_change",
        "protocol=paper",
        "dataset.limit=1",
        "scoring.max_new_tokens=3",
        "compare=[personality_prompt]",
    )
    summary = run(cfg)
    rows, _ = _read(Path(cfg.paths.output_dir))
    assert summary.protocol == RunProtocol(name="paper", coding="as_stored", scoring="generate")
    assert not any("personality_prompt" in n for n in summary.notes)  # as published
    # A random model rarely emits an option letter: unparsed answers are counted, not dropped.
    assert rows[0]["answers"]["UNK"] == round(rows[0]["unk_rate"] * 180)
    assert sum(rows[0]["answers"].values()) == 180
    # Each generated text is kept with its parse: the reference's rule after the "Option" prefill.
    table = read_table(
        Path(cfg.paths.output_dir) / "answers" / "no_change" / f"{rows[0]['case']}.csv"
    )
    assert (
        table["text"].str.startswith("Option").all()
        and table[list(PROB_COLUMNS)].isna().all().all()
    )
    assert table["predicted"].tolist() == [parse_answer(t, 12, "reference") for t in table["text"]]
    assert (table["parsed"] == (table["predicted"] != 0)).all()
    assert (~table["parsed"]).sum() == rows[0]["answers"]["UNK"]


def test_personality_prompt_on_sampled_subjects(cfg_factory, papi):
    cfg = cfg_factory(
        "model=tiny_llama", "method=personality_prompt", "dataset.sample=2", "dataset.seed=3"
    )
    summary = run(cfg)
    assert summary.cases == [s.case for s in select_subjects(papi.subjects, sample=2, seed=3)]
    out = Path(cfg.paths.output_dir) / "artifacts" / "personality_prompt"
    out = out / str(summary.cases[0]) / "system_prompt.txt"
    by_case = {s.case: s for s in papi.subjects}
    assert out.read_text() == by_case[summary.cases[0]].persona
    # protocol=clean decodes the reverse-keyed answers the descriptions were written from as raw
    (note,) = [n for n in summary.notes if "personality_prompt" in n]
    assert "MIS-KEYED DESCRIPTIONS" in note and "55 reverse-keyed of the 120" in note
    report = (Path(cfg.paths.output_dir) / "report.md").read_text()
    assert "MIS-KEYED DESCRIPTIONS" in report


def test_runs_are_reproducible(cfg_factory):
    first = run(cfg_factory("model=tiny_llama", "method=few_shot", "dataset.limit=1", out="a"))
    second = run(cfg_factory("model=tiny_llama", "method=few_shot", "dataset.limit=1", out="b"))
    assert first.main.mae == second.main.mae
    other_seed = run(
        cfg_factory("model=tiny_llama", "method=few_shot", "dataset.limit=1", "seed=1", out="c")
    )
    assert other_seed.main.mae != first.main.mae  # the seed initialises the random model


def test_cli_statistical_method(tmp_path, monkeypatch, capsys):
    """``python -m palign`` (its real main, in this process) prints the report's table."""
    argv = ["method=trait_mean", "dataset.limit=5", f"hydra.run.dir={tmp_path}/out"]
    capsys.readouterr()
    status = invoke("palign", argv, monkeypatch)
    out, err = capsys.readouterr()
    assert status == 0, err[-3000:]
    assert "| trait_mean | 5 |" in out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["model"] == "none (no LLM)" and summary["n_subjects"] == 5


@pytest.mark.parametrize("protocol", ["clean", "paper"])
def test_pas_end_to_end_on_tiny_llama(cfg_factory, protocol, tmp_path, monkeypatch):
    monkeypatch.setenv("PALIGN_CACHE", str(tmp_path / "cache"))
    cfg = cfg_factory(
        "model=tiny_llama",
        "method=pas",
        f"protocol={protocol}",
        "dataset.limit=2",
        "method.top_k=4",
        "method.alphas=[0,4]",
        "method.folds=2",
        "scoring.max_new_tokens=3",
        "compare=[no_change]",
    )
    summary = run(cfg)
    out = Path(cfg.paths.output_dir)
    rows, _ = _read(out)
    selection = {"clean": "alignment_items", "paper": "test_items"}[protocol]
    for row in rows:
        assert row["align_info"]["alpha_selected_on"] == selection
        assert row["align_info"]["alpha"] in (0.0, 4.0)
        assert {"probes_s", "alpha_search_s", "activations_s_amortised"} <= set(row["timing"])
        profile = out / "artifacts" / "pas" / str(row["case"]) / "profile.json"
        sidecar = json.loads(profile.read_text())
        assert sidecar["alpha"] == row["align_info"]["alpha"] and len(sidecar["heads"]) == 4
        assert sidecar["ranking"] == {"clean": "val", "paper": "mean_train_val"}[protocol]
    report = (out / "report.md").read_text()
    assert "| pas | 2 |" in report and "| no_change | 2 |" in report
    assert summary.compare["no_change"].n_subjects == 2
    assert len((out / "compare" / "no_change.jsonl").read_text().splitlines()) == 2
    assert ("ON THE TEST ITEMS" in report) == (protocol == "paper")
    assert summary.main.timing["probes_s_per_subject"] > 0


def test_a_compared_llm_method_loads_the_model_for_a_baseline_run(cfg_factory):
    """method=item_mean needs no model; compare=[no_change] does: the model is loaded for it."""
    cfg = cfg_factory(
        "model=tiny_llama", "method=item_mean", "compare=[no_change]", "dataset.limit=1"
    )
    summary = run(cfg)
    assert summary.model == "tiny_llama" and summary.compare["no_change"].n_subjects == 1
    assert np.isfinite(summary.compare["no_change"].score)
