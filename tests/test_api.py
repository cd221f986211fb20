"""palign.api: the same numbers as a CLI run, PAS profiles saved, loaded and applied, clear errors."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from palign import CONF_DIR, api
from palign.data.papi import HiddenAnswerError
from palign.errors import ArtifactError, ConfigError
from palign.eval.answers import read_table
from palign.eval.prompts import NEUTRAL_SYSTEM_PROMPT
from palign.methods.base import Answers, Artifact, Method
from palign.runs.runner import baseline_rows, run

IDS = torch.tensor([[1, 200, 300, 400, 500]])


@pytest.fixture(scope="module")
def model():
    return api.load_model("tiny_llama")


@pytest.fixture(scope="module")
def data(papi):  # `papi`: skipped with conftest's reason when the PAPI files are missing
    loaded = api.load_data()
    assert loaded.coding == papi.coding == "keyed" and len(loaded.subjects) == len(papi.subjects)
    return loaded


def _logits(loaded) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model(input_ids=IDS).logits


def test_no_change_gives_the_numbers_of_a_cli_run(cfg_factory, model, data):
    case = data.subjects[3].case
    cfg = cfg_factory("model=tiny_llama", "method=no_change", f"dataset.cases=[{case}]")
    run(cfg)
    out = Path(cfg.paths.output_dir)
    (line,) = (out / "results.jsonl").read_text().splitlines()
    row = json.loads(line)

    result = api.evaluate(api.method("no_change", data, api.scorer(model)), case, data)
    assert row["case"] == result.row.case == case and result.row.method == "no_change"
    metrics = vars(result.metrics)
    assert set(metrics) == {
        "mae", "score", "unk_rate", "answers", "n_scored", "model_means", "subject_means",
        "validity",
    }  # fmt: skip
    written = json.loads(json.dumps(result.row.to_json()))  # validity: as the file holds it
    assert {k: written[k] for k in metrics} == {k: row[k] for k in metrics}
    assert result.score == row["score"] and result.artifact.case == case
    assert set(written) == set(row) - {"subject_batch"}  # timing, cost: as the runner's
    cli_answers = read_table(out / "answers" / "no_change" / f"{case}.csv")
    pd.testing.assert_frame_equal(result.answers, cli_answers, check_dtype=False)


def test_a_baseline_needs_no_model_and_matches_the_runner(data):
    subject = data.subjects[0]
    result = api.evaluate(api.method("item_mean", data), subject.case, data)
    (expected,) = baseline_rows(data, [subject])["item_mean"]
    assert expected.metrics == result.metrics


def test_pas_profile_saved_loaded_and_applied(model, data, tmp_path, monkeypatch):
    monkeypatch.setenv("PALIGN_CACHE", str(tmp_path / "cache"))  # the activation cache
    scorer = api.scorer(model)
    pas = api.method("pas", data, scorer, top_k=2, folds=2, alphas=[0, 1])
    assert (pas.top_k, pas.folds, pas.alphas, pas.selection) == (2, 2, [0, 1], "alignment_items")
    subject = data.subjects[0]
    artifact = api.align(pas, subject, data)
    assert artifact.case == subject.case and artifact.meta["alpha_selected_on"] == "alignment_items"

    folder = api.save(artifact, tmp_path / "pas" / str(subject.case))
    assert {"artifact.json", "profile.json", "profile.safetensors"} <= {
        p.name for p in folder.iterdir()
    }
    profile = api.load_profile(folder)
    for other in (api.load_profile(folder / "profile.json"), api.load_profile(folder / "profile")):
        assert other.alpha == profile.alpha and torch.equal(other.direction, profile.direction)
    original = artifact.profile
    assert (profile.model, profile.shape, profile.alpha) == (
        "tiny_llama",
        tuple(original.shape),
        original.alpha,
    )
    assert profile.alpha in (0.0, 1.0) and len(profile.layer) == 2
    for key in ("layer", "head", "trait", "direction", "sigma", "train_acc", "val_acc"):
        assert torch.equal(getattr(profile, key), getattr(original, key)), key

    plain = _logits(model)
    with api.applied(model, profile, alpha=1.0) as loaded:
        assert loaded is model
        shifted = _logits(model)
    assert not torch.allclose(plain, shifted, atol=1e-5)
    assert torch.equal(_logits(model), plain)  # restored on exit
    with api.applied(model, folder):  # the profile's own alpha, from its folder
        own = _logits(model)
    assert torch.equal(own, plain) == (profile.alpha == 0)
    assert torch.equal(_logits(model), plain)

    # Through a scorer: its cached prompt prefix is dropped on entry and exit.
    items = data.inventory.test_items[:4]
    before = scorer.score(NEUTRAL_SYSTEM_PROMPT, items).probs
    with api.applied(scorer, artifact, alpha=1.0):
        inside = scorer.score(NEUTRAL_SYSTEM_PROMPT, items).probs
    after = scorer.score(NEUTRAL_SYSTEM_PROMPT, items).probs
    assert not np.allclose(before, inside, atol=1e-7) and np.array_equal(before, after)

    result = api.evaluate(pas, subject, data, artifact=artifact)  # answers only
    assert result.artifact is artifact and result.row.align_info["alpha"] == profile.alpha
    assert set(result.answers["value"]) == {profile.alpha} and len(result.answers) == 180
    assert result.metrics.unk_rate == 0 and np.isfinite(result.score)
    pas.teardown()


def test_unknown_names_and_settings_say_what_exists(model, data, tmp_path):
    with pytest.raises(ConfigError, match="unknown model 'nope'") as e:
        api.load_model("nope")
    assert str(CONF_DIR / "model") in str(e.value) and "smollm2_135m, tiny_llama)" in str(e.value)
    with pytest.raises(ConfigError, match="unknown method 'nope'") as e:
        api.method("nope", data)
    assert str(CONF_DIR / "method") in str(e.value) and "no_change" in str(e.value)
    assert "pas" in str(e.value).split("available: ")[1].split(", ")
    with pytest.raises(ConfigError, match=r"unknown protocol 'nope'.*\(available: clean, paper\)"):
        api.load_data(protocol="nope")
    with pytest.raises(ConfigError, match="unknown hardware 'tpu'.*cpu, gpu, multi_gpu"):
        api.load_model("tiny_llama", hardware="tpu")
    with pytest.raises(ConfigError, match=r"model tiny_llama: unknown setting\(s\) layers .*seed"):
        api.load_model("tiny_llama", layers=3)
    with pytest.raises(ConfigError, match=r"method pas: unknown setting\(s\) topk .*top_k"):
        api.method("pas", data, topk=3)
    with pytest.raises(ConfigError, match=r"scorer: unknown setting\(s\) batch .*batch_size"):
        api.scorer(model, batch=3)
    with pytest.raises(ConfigError, match="method pas answers with the LLM: pass a scorer"):
        api.method("pas", data)
    with pytest.raises(ConfigError, match="load_data\\(protocol='paper'\\)"):
        api.method("item_mean", data, protocol="paper")
    with pytest.raises(ConfigError, match=r"dataset.cases: unknown case id\(s\) \[-1\]"):
        api.align(api.method("item_mean", data), -1, data)
    with pytest.raises(ArtifactError, match="holds no profile.json"):
        api.load_profile(tmp_path)
    with pytest.raises(ArtifactError, match="a Artifact does not change the model"):
        with api.applied(model, Artifact(case=1)):
            pass


class _Peek(Method):
    """A method that tries to read a test answer while aligning."""

    name = "peek"

    def align(self, subject, items):
        subject.answers([n for n in range(1, 301)])
        return Artifact(case=subject.case)

    def answer(self, subject, artifact, items):
        return Answers(scores=np.zeros(len(items), dtype=np.int64))


def test_align_shows_only_the_alignment_answers(data):
    with pytest.raises(HiddenAnswerError, match="hidden from the method"):
        api.align(_Peek(), data.subjects[0], data)
