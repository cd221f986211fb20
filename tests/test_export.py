"""`palign export`: a PAS profile folded into o_proj biases, saved as a Hugging Face model folder
that AutoModelForCausalLM loads and that answers as the hooked model."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import TINY_LLAMA
from palign.cli.export import main
from palign.errors import ConfigError
from palign.eval.prompts import NEUTRAL_SYSTEM_PROMPT
from palign.eval.scoring import Scorer, ScoringConfig
from palign.models import load_random
from palign.models.loading import LoadedModel
from palign.pas.export import export_profile
from palign.pas.heads import HeadShift, head_layout
from palign.pas.profile import POOLED, PASProfile


def _profile(layout, name: str) -> PASProfile:
    """Two shifted heads (layers 0 and 1) with random unit directions, alpha 4."""
    gen = torch.Generator().manual_seed(3)
    direction = torch.randn(2, layout.head_dim, generator=gen)
    return PASProfile(
        model=name,
        shape=layout.shape,
        layer=torch.tensor([0, 1]),
        head=torch.tensor([1, 3]),
        trait=torch.tensor([POOLED, POOLED]),
        direction=direction / direction.norm(dim=1, keepdim=True),
        sigma=torch.tensor([0.8, 1.3]),
        train_acc=torch.tensor([0.9, 0.8]),
        val_acc=torch.tensor([0.85, 0.75]),
        alpha=4.0,
    )


def test_the_exported_model_answers_as_the_hooked_one(papi, tmp_path):
    loaded = load_random("tiny_llama", TINY_LLAMA, seed=0)
    layout = head_layout(loaded.model)
    profile = _profile(layout, "tiny_llama")
    items = papi.inventory.test_items[:12]
    scorer = Scorer(loaded, ScoringConfig(batch_size=6))
    base = scorer.score(NEUTRAL_SYSTEM_PROMPT, items).probs
    with scorer.applied(HeadShift(layout, profile.total_shift())):
        hooked = scorer.score(NEUTRAL_SYSTEM_PROMPT, items).probs
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    export_profile(loaded, profile, tmp_path / "aligned")
    after = loaded.model.state_dict()  # the loaded model is left as it was
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not loaded.model.config.attention_bias

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "aligned").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "aligned")
    exported = Scorer(LoadedModel(model, tokenizer, "tiny_llama"), ScoringConfig(batch_size=6))
    probs = exported.score(NEUTRAL_SYSTEM_PROMPT, items).probs
    np.testing.assert_allclose(probs, hooked, rtol=0, atol=1e-5)
    assert np.abs(hooked - base).max() > 1e-3  # the profile moves the answers
    config = json.loads((tmp_path / "aligned" / "config.json").read_text())
    assert config["attention_bias"] is True
    # The command: the profile file of a run, the model config named in it.
    profile.save(tmp_path / "p" / "profile")
    assert (
        main(["--profile", str(tmp_path / "p" / "profile.json"), "--out", str(tmp_path / "cli")])
        == 0
    )
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "cli").eval()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[name], tensor, rtol=0, atol=0)


def test_export_refuses_what_it_cannot_fold(tmp_path, capsys):
    mistral = load_random("tiny_mistral", {**TINY_LLAMA, "model_type": "mistral"}, seed=0)
    profile = _profile(head_layout(mistral.model), "tiny_mistral")
    with pytest.raises(ConfigError, match="mistral model cannot carry an o_proj bias"):
        export_profile(mistral, profile, tmp_path / "m")
    profile.save(tmp_path / "p" / "profile")
    with pytest.raises(SystemExit) as stop:
        main(["--profile", str(tmp_path / "p" / "profile.json"), "--out", str(tmp_path / "x")])
    (line,) = [x for x in capsys.readouterr().err.splitlines() if "error:" in x]
    assert stop.value.code == 1 and "tiny_mistral" in line  # no such model config
