"""PAS on the embedded SmolLM2-135M-Instruct for one subject (real weights, clean protocol)."""

import json
from pathlib import Path

import pytest

from palign.pas.profile import PASProfile
from palign.runs.runner import run

pytestmark = pytest.mark.slow


def test_pas_on_smollm2_one_subject(cfg_factory):
    cfg = cfg_factory("method=pas", "dataset.limit=1", "method.alphas=[0,2]", "method.folds=2")
    summary = run(cfg)
    out = Path(cfg.paths.output_dir)
    row = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    assert row["align_info"]["alpha_selected_on"] == "alignment_items"
    assert sum(row["answers"].values()) == 180 and row["unk_rate"] == 0
    profile = PASProfile.load(out / "artifacts" / "pas" / str(row["case"]) / "profile.json")
    assert profile.shape == (30, 9, 64) and len(profile.layer) == 24
    assert profile.val_acc.min() > 0.5  # the kept heads separate the subject's answers
    assert summary.baselines["item_mean"].n_subjects == 1
