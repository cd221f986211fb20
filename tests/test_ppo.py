"""PPO: hand-computed pieces, reward rising on a toy subject, end to end."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_LLAMA
from palign.data.papi import Subject
from palign.eval.prompts import NEUTRAL_SYSTEM_PROMPT
from palign.eval.scoring import Scorer, ScoringConfig, letter_token_ids
from palign.methods import ppo
from palign.methods.base import MethodContext
from palign.methods.ppo import (
    PPO,
    PPOModule,
    answer_reward,
    clipped_surrogate,
    dropout_disabled,
    gae,
    token_rewards,
)
from palign.models import load_random
from palign.runs.runner import run


def test_answer_reward_including_unparsed():
    texts = ["Option (A). Very", "Option (D)", "Option (", "(b) moderately"]
    assert answer_reward(texts, [5, 4, 3, 2]).tolist() == [0.0, -2.0, -6.0, -2.0]


def test_token_rewards_put_the_score_on_the_last_token_and_penalise_kl():
    score = torch.tensor([1.0, -2.0])
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-2.0, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards, kl = token_rewards(score, logp, ref, mask, kl_coef=0.1)
    expected = torch.tensor([[-0.05, 0.0, 0.1 + 1.0], [-0.1, 0.0 - 2.0, 0.0]])
    assert torch.allclose(rewards, expected)
    assert torch.allclose(kl, torch.tensor([0.5 + 0.0 - 1.0, 1.0]))


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.2, 0.4]])
    mask = torch.ones(1, 3)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    d2 = 1.0 - 0.4
    d1 = 0.0 + 0.4 - 0.2
    d0 = 0.0 + 0.2 - 0.5
    a2, a1 = d2, d1 + 0.5 * d2
    a0 = d0 + 0.5 * a1
    assert torch.allclose(adv, torch.tensor([[a0, a1, a2]]))
    assert torch.allclose(ret, adv + values)
    masked, _ = gae(rewards, values, torch.tensor([[1.0, 1.0, 0.0]]), gamma=1.0, lam=0.5)
    assert masked[0, 2] == 0 and torch.isclose(masked[0, 1], torch.tensor(0.0 - 0.2))


def test_clipped_surrogate_by_hand():
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    mask = torch.ones(1, 3)
    # token 0: min(1.5, 1.2) * 1 = 1.2; token 1: min(0.5 * -1, 0.8 * -1) = -0.8; token 2: 1.1 * 2
    expected = -(1.2 - 0.8 + 2.2) / 3
    assert clipped_surrogate(new, old, adv, mask, clip=0.2).item() == pytest.approx(expected)


def test_reward_rises_for_a_subject_who_answers_a_to_everything(papi):
    """A tiny model whose output layer favours the five option letters learns to prefer "A" for a
    subject who answers 5 to every item (measured by the logit scorer, before vs after)."""
    loaded = load_random("tiny_ppo", {**TINY_LLAMA, "tie_word_embeddings": False}, seed=0)
    scorer = Scorer(loaded, ScoringConfig(batch_size=16))
    items = papi.inventory.train_items
    letters = letter_token_ids(scorer.renderer, "Option (")
    with torch.no_grad():
        ids = torch.tensor([scorer.encode_prompts(NEUTRAL_SYSTEM_PROMPT, items[:8])[0]])
        hidden = loaded.model.model(input_ids=ids).last_hidden_state[0, -1]
        gen = torch.Generator().manual_seed(0)
        noise = torch.randn(5, hidden.shape[0], generator=gen) * 0.5 / hidden.norm()
        loaded.model.lm_head.weight[letters] = 22.0 * hidden / hidden.norm() ** 2 + noise
    before = scorer.score(NEUTRAL_SYSTEM_PROMPT, items[:16]).probs[:, 0].mean()
    subject = Subject(case=1, index=0, raw=np.full(300, 5))
    # ``steps`` counts optimiser steps: 32 of 4 PPO epochs are 8 rollouts, and the first and last
    # quarters compared below are 2 rollouts of 16 items each (1 rollout each was too noisy).
    method = PPO(steps=32, batch_size=16, max_new_tokens=1, lr=5e-3, ppo_epochs=4, kl_coef=0.0)
    method.setup(MethodContext(papi, scorer))
    artifact = method.align(subject, items)
    assert artifact.meta["reward_last"] > artifact.meta["reward_first"] + 0.5, artifact.meta
    with scorer.applied(artifact.active_in(method.peft_model)):
        after = scorer.score(NEUTRAL_SYSTEM_PROMPT, items[:16]).probs[:, 0].mean()
    assert after > before + 0.3, (before, after)


def test_ppo_end_to_end(cfg_factory):
    cfg = cfg_factory(
        "model=tiny_llama",
        "method=ppo_cpu",
        "method.steps=2",
        "method.batch_size=4",
        "dataset.limit=1",
        "compare=[dpo_cpu,no_change]",
    )
    summary = run(cfg)
    out = Path(cfg.paths.output_dir)
    row = json.loads((out / "results.jsonl").read_text())
    assert (
        row["method"] == "ppo_cpu"
        and row["align_info"]["steps"] == 2
        and row["timing"]["train_s"] > 0
    )
    assert (
        out / "artifacts" / row["method"] / str(row["case"]) / "adapter_model.safetensors"
    ).is_file()
    assert summary.main.n_subjects == 1
    # Adapter methods side by side: each removes its LoRA layers when done (dpo_cpu from its
    # own config file plus the dpo defaults it extends; named after its config).
    assert (
        summary.compare["dpo_cpu"].n_subjects == 1 and summary.compare["no_change"].n_subjects == 1
    )
    dpo_row = json.loads((out / "compare" / "dpo_cpu.jsonl").read_text())
    assert dpo_row["align_info"]["steps"] == 20


def test_each_step_rolls_out_batch_size_distinct_items(papi, tiny, monkeypatch):
    """Every optimiser step generates for ``batch_size`` distinct alignment items (a list of
    batches handed to Lightning as is would be zipped into ``steps`` rows per step)."""
    seen = []
    rollout = PPOModule._rollout

    def recording(self, rows):
        seen.append(list(rows))
        return rollout(self, rows)

    monkeypatch.setattr(PPOModule, "_rollout", recording)
    scorer = Scorer(tiny, ScoringConfig(batch_size=16))
    method = PPO(steps=3, batch_size=5, max_new_tokens=2)
    method.setup(MethodContext(papi, scorer))
    before = tiny.meter.snapshot()
    method.align(papi.subjects[0], papi.inventory.train_items)
    cost = tiny.meter.snapshot() - before
    method.teardown()
    assert [len(rows) for rows in seen] == [5, 5, 5]
    assert all(len(set(rows)) == 5 for rows in seen)
    assert 3 * 5 <= cost.generated_tokens <= 3 * 5 * 2


def dropout_rates(model: torch.nn.Module) -> dict[tuple[str, str], float]:
    """Every dropout rate of ``model``: dropout modules' ``p``, float ``attention_dropout``."""
    return {
        (name, attr): getattr(module, attr)
        for name, module in model.named_modules()
        for attr in ("p", "attention_dropout")
        if (attr == "p" and isinstance(module, torch.nn.Dropout))
        or (attr != "p" and type(getattr(module, attr, None)) is float)
    }


def test_dropout_disabled_zeroes_every_rate_and_restores_them():
    attention = torch.nn.Module()
    attention.attention_dropout, attention.dropout = 0.1, 0.2
    model = torch.nn.Sequential(torch.nn.Dropout(0.3), torch.nn.AlphaDropout(0.4), attention)
    with dropout_disabled(model):
        assert [model[0].p, model[1].p, attention.attention_dropout, attention.dropout] == [0.0] * 4
        x = torch.randn(3, 5)
        assert torch.equal(model[0](x), x) and model[0].training
    assert [model[0].p, model[1].p, attention.attention_dropout, attention.dropout] == [
        0.3,
        0.4,
        0.1,
        0.2,
    ]


def test_first_ppo_ratio_is_exactly_one_with_lora_dropout(papi, tiny, monkeypatch):
    """Each step's first PPO epoch compares the policy with itself: ratio exp(new - old) is exactly
    1 on every token, although LoRA dropout is 0.5 (the old log-probs were taken without dropout,
    the new ones with it: ratios 0.91..1.11 from the second step on, once LoRA's B is not 0).
    Dropout is off for the fit (TRL's disable_dropout) and its rates are back afterwards."""
    calls = []
    surrogate = ppo.clipped_surrogate

    def recording(logp, old_logp, *args, **kwargs):
        calls.append((logp.detach().clone(), old_logp.clone()))
        return surrogate(logp, old_logp, *args, **kwargs)

    monkeypatch.setattr(ppo, "clipped_surrogate", recording)
    scorer = Scorer(tiny, ScoringConfig(batch_size=16))
    # steps counts optimiser steps: 6 of them are 3 rollouts of 2 PPO epochs each.
    method = PPO(steps=6, batch_size=4, max_new_tokens=3, ppo_epochs=2, lr=1e-2, lora_dropout=0.5)
    method.setup(MethodContext(papi, scorer))
    try:
        rates = dropout_rates(method.peft_model)
        assert 0.5 in rates.values()
        artifact = method.align(papi.subjects[0], papi.inventory.train_items)
        assert dropout_rates(method.peft_model) == rates
    finally:
        method.teardown()
    first, second = calls[0::2], calls[1::2]
    assert len(first) == len(artifact.history) >= 2
    for logp, old_logp in first:
        ratio = torch.exp(logp - old_logp)
        assert torch.equal(ratio, torch.ones_like(ratio)), (ratio - 1).abs().max()
    # The policy does move: after an optimiser step the ratio is no longer 1.
    assert all(not torch.equal(logp, old_logp) for logp, old_logp in second)
    assert all(h["ratio_first_max_dev"] == 0.0 for h in artifact.history), artifact.history
    assert all(h["ratio_first_mean"] == 1.0 for h in artifact.history), artifact.history
