"""The generate command: replies with and without a PAS profile."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from palign.generate import generate_pair
from palign.pas.heads import PASError, head_layout
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
        tiny, profile, "Describe yourself.", "Be brief.", max_new_tokens=12
    )
    assert base != steered
    same_base, unsteered = generate_pair(
        tiny, profile, "Describe yourself.", "Be brief.", alpha=0.0, max_new_tokens=12
    )
    assert unsteered == base == same_base


def test_profile_of_another_model_is_refused(tiny):
    profile = _profile(head_layout(tiny.model), name="smollm2_135m")
    with pytest.raises(
        PASError, match="profile was made for model 'smollm2_135m', not 'tiny_llama'"
    ):
        generate_pair(tiny, profile, "Hi", "Be brief.")


def test_generate_cli(tiny, tmp_path):
    _profile(head_layout(tiny.model)).save(tmp_path / "profile")
    cmd = [
        sys.executable,
        "-m",
        "palign.generate",
        f"profile={tmp_path / 'profile.json'}",
        "model=tiny_llama",
        "prompt=Who are you?",
        "max_new_tokens=8",
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "--- tiny_llama, no profile ---" in proc.stdout
    assert "--- tiny_llama + PAS profile of case 123 (alpha 8) ---" in proc.stdout
    missing = subprocess.run(
        cmd[:3],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=300,
    )
    assert missing.returncode == 1 and "give profile=" in missing.stderr
    bad = subprocess.run(
        cmd[:4] + ["prompt=Hi"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=300,
    )
    assert (
        bad.returncode == 1
        and "palign.generate: error: profile was made for model 'tiny_llama'" in bad.stderr
    )
