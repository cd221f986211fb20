"""The generate command: replies with and without a PAS profile."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from palign.errors import ArtifactError, PASError
from palign.eval.generation import generate_pair
from palign.methods.lora import AdapterArtifact
from palign.pas.heads import head_layout
from palign.pas.profile import POOLED, PASProfile


def _profile(layout, name="tiny_llama", alpha=8.0):
    gen = torch.Generator().manual_seed(0)
    k = 4
    direction = torch.randn(k, layout.head_dim, generator=gen)
    return PASProfile(
        model=name,
        shape=layout.shape,
        layer=torch.tensor([0, 0, 1, 1]),
        head=torch.tensor([0, 1, 2, 3]),
        trait=torch.full((k,), POOLED),
        direction=direction / direction.norm(dim=-1, keepdim=True),
        sigma=torch.full((k,), 4.0),
        train_acc=torch.ones(k),
        val_acc=torch.ones(k),
        alpha=alpha,
        meta={"case": 123},
    )


def test_profile_changes_the_reply_and_alpha_zero_does_not(tiny):
    profile = _profile(head_layout(tiny.model))
    base, steered = generate_pair(
        tiny, lambda: profile.applied(tiny), "Describe yourself.", "Be brief.", max_new_tokens=12
    )
    assert base != steered
    same_base, unsteered = generate_pair(
        tiny,
        lambda: profile.applied(tiny, alpha=0.0),
        "Describe yourself.",
        "Be brief.",
        max_new_tokens=12,
    )
    assert unsteered == base == same_base


def test_profile_of_another_model_is_refused(tiny):
    profile = _profile(head_layout(tiny.model), name="smollm2_135m")
    with pytest.raises(
        PASError, match="profile was made for model 'smollm2_135m', not 'tiny_llama'"
    ):
        profile.applied(tiny)


def test_adapter_of_a_dpo_run_changes_the_reply(cfg_factory):
    from conftest import TINY_LLAMA
    from palign.models import load_random
    from palign.runs.runner import run

    cfg = cfg_factory(
        "model=tiny_llama", "method=dpo_cpu", "method.steps=4", "method.lr=0.05", "dataset.limit=1"
    )
    summary = run(cfg)
    folder = Path(cfg.paths.output_dir) / "artifacts" / "dpo_cpu" / str(summary.cases[0])
    history = json.loads((folder / "train_history.json").read_text())
    assert len(history) == 4 * 2 and {"loss", "margin", "reward_acc"} <= set(history[0])
    loaded = load_random("tiny_llama", TINY_LLAMA, seed=0)
    ids = torch.tensor([[1, 200, 300, 400]])
    with torch.no_grad():
        plain = loaded.model(input_ids=ids).logits
        with AdapterArtifact.load(folder).applied(loaded):
            adapted = loaded.model(input_ids=ids).logits
        restored = loaded.model(input_ids=ids).logits
    assert not torch.allclose(plain, adapted, atol=1e-4)
    assert torch.equal(plain, restored)  # the adapter is removed after use
    base, aligned = generate_pair(
        loaded,
        lambda: AdapterArtifact.load(folder).applied(loaded),
        "Who are you?",
        "Be brief.",
        max_new_tokens=4,
    )
    assert isinstance(base, str) and isinstance(aligned, str)
    other = load_random("tiny_other", TINY_LLAMA, seed=0)
    with pytest.raises(
        ArtifactError, match="adapter was trained on model 'tiny_llama', not 'tiny_other'"
    ):
        with AdapterArtifact.load(folder).applied(other):
            pass


def _generate(cmd):
    root = Path(__file__).resolve().parents[1]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=300)


def test_generate_cli(tiny, tmp_path):
    _profile(head_layout(tiny.model)).save(tmp_path / "profile")
    cmd = [
        sys.executable,
        "-m",
        "palign.cli.generate",
        f"profile={tmp_path / 'profile.json'}",
        "model=tiny_llama",
        "prompt=Who are you?",
        "max_new_tokens=8",
    ]
    proc = _generate(cmd)
    assert proc.returncode == 0, proc.stderr
    assert "--- tiny_llama, no profile ---" in proc.stdout
    assert "--- tiny_llama + PAS profile of case 123 (alpha 8) ---" in proc.stdout
    # Its refusals (no profile or adapter; a profile of another model) are bad_inputs.yaml's
    # generate_no_arguments and generate_profile_other_model.
