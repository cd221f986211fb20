"""Reward-scored PPO on a LoRA adapter per subject (palign's own; TRL no longer ships PPO).

Each step samples ``batch_size`` of the subject's answered alignment items, lets the policy
generate its answer (up to ``max_new_tokens``, after the optional prefilled ``answer_prefix``),
and scores it: reward = -|answer - subject's answer| on the 1..5 scale, -6 when no option can be
parsed. Per-token rewards add a KL penalty ``-kl_coef * (log pi - log pi_ref)`` (reference =
adapter disabled); advantages by GAE over a value head on the last hidden state; the clipped
surrogate and the value loss are optimised with Lightning's manual optimisation.

Dropout is off for the whole fit (:func:`dropout_disabled`; TRL's
``PPOConfig(disable_dropout=True)`` does the same): the rollout's ("old") log-probs and each
update's ("new") log-probs are then the same computation (same sequences, mask, positions,
precision and module mode), so the probability ratio of a batch's first PPO epoch is exactly 1 and
clipping acts only on the policy's own change. With LoRA dropout on, old log-probs of a
dropout-free pass were compared with new ones under a random dropout mask: the first ratio was
noise rather than 1.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from palign.data.papi import Item, Subject
from palign.eval.scoring import eos_ids, parse_answer
from palign.methods.base import redefault, setting
from palign.methods.checks import check_bool, integer, number
from palign.methods.lora import AdapterArtifact, LoraMethod, LoraSettings
from palign.models.batching import last_token_logprobs, left_pad

UNPARSED_REWARD = -6.0


def answer_reward(texts: Sequence[str], targets: Sequence[int], window: int = 12) -> torch.Tensor:
    """-|parsed answer - target| per text, or -6 where no option letter can be parsed."""
    out = []
    for text, target in zip(texts, targets, strict=True):
        parsed = parse_answer(text, window)
        out.append(UNPARSED_REWARD if parsed == 0 else -abs(parsed - int(target)))
    return torch.tensor(out, dtype=torch.float32)


def token_rewards(
    score: torch.Tensor,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards (B, R): the KL penalty on every response token, plus ``score`` (B,) on
    the last one. Returns them and the per-sequence KL estimate (B,)."""
    kl = (logp - ref_logp) * mask
    rewards = -kl_coef * kl
    last = (mask.cumsum(-1) == mask.sum(-1, keepdim=True)) & (mask > 0)
    return rewards + last * score[:, None], kl.sum(-1)


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
):
    """Generalised advantage estimation over response tokens (B, R); beyond the mask the value is 0.

    Returns advantages and returns (= advantages + values), both (B, R), 0 outside the mask.
    """
    adv = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * m
        adv[:, t] = running
        next_value = values[:, t] * m
    return adv, (adv + values) * mask


def clipped_surrogate(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> torch.Tensor:
    """PPO's clipped policy loss, mean over masked tokens."""
    ratio = torch.exp(logp - old_logp)
    loss = -torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
    return (loss * mask).sum() / mask.sum().clamp(min=1)


#: torch's dropout modules (their rate is ``p``).
DROPOUT_MODULES = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
#: Float attributes of modules that hold a dropout rate applied in training mode (Hugging Face
#: attention modules keep ``attention_dropout`` as a number, not as an ``nn.Dropout``).
DROPOUT_RATE_ATTRIBUTES = ("attention_dropout", "dropout")


@contextmanager
def dropout_disabled(model: nn.Module) -> Iterator[None]:
    """Every dropout of ``model`` off for the block, restored after: ``p = 0`` on each
    ``nn.Dropout`` (LoRA's ``lora_dropout`` included) and 0.0 for the float dropout rates of
    :data:`DROPOUT_RATE_ATTRIBUTES`. Training mode is left as it is."""
    saved: list[tuple[nn.Module, str, float]] = []
    for module in model.modules():
        names = ["p"] if isinstance(module, DROPOUT_MODULES) else []
        names += [n for n in DROPOUT_RATE_ATTRIBUTES if type(getattr(module, n, None)) is float]
        for name in names:
            saved.append((module, name, getattr(module, name)))
            setattr(module, name, 0.0)
    try:
        yield
    finally:
        for module, name, value in reversed(saved):
            setattr(module, name, value)


def response_stats(model, value_head, ids, mask, response_len: int, with_values: bool = True):
    """Per-token log-probs (B, R) of the last ``response_len`` tokens and, optionally, values."""
    logp, hidden = last_token_logprobs(model, ids, mask, response_len, hidden=with_values)
    return logp, value_head(hidden)[..., 0] if with_values else None


class PPOModule(L.LightningModule):
    """One subject's PPO run; ``history`` keeps mean reward, KL and losses per step, and the
    probability ratio of the step's first PPO epoch (``ratio_first_mean``, and
    ``ratio_first_max_dev`` = max |ratio - 1| over response tokens: 0 by construction)."""

    def __init__(self, method: PPO, prompts: list[list[int]], targets: list[int]):
        super().__init__()
        self.automatic_optimization = False
        self.method = method
        self.model = method.peft_model
        hidden = self.model.config.get_text_config().hidden_size
        self.value_head = nn.Linear(hidden, 1, device=method.device)  # float32, beside the model
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        self.prompts, self.targets = prompts, targets
        self.history: list[dict[str, float]] = []

    def configure_optimizers(self):
        params = self.method.lora_parameters() + list(self.value_head.parameters())
        return torch.optim.AdamW(params, lr=self.method.lr)

    def _rollout(self, rows: list[int]):
        m, tok = self.method, self.method.tokenizer
        ids, mask = left_pad([self.prompts[r] for r in rows], tok.pad_token_id, device=m.device)
        width = ids.shape[1]
        self.model.eval()
        with torch.no_grad():
            seq = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=m.max_new_tokens,
                do_sample=True,
                top_k=0,
                top_p=1.0,
                temperature=1.0,
                pad_token_id=tok.pad_token_id,
            )
        response = seq[:, width:]
        eos = torch.tensor(m.eos_ids, device=m.device)
        ended = torch.isin(response, eos).long().cumsum(-1)
        resp_mask = (
            (ended == 0) | ((ended == 1) & torch.isin(response, eos))
        ).float()  # through the EOS
        m.context.scorer.loaded.meter.generated(int(resp_mask.sum()))
        # The old log-probs, values and reference log-probs in the module mode of the update
        # (with dropout off for the fit, the first PPO epoch repeats this forward exactly).
        self.model.train()
        full_mask = torch.cat([mask, resp_mask.long()], -1)
        texts = [
            m.answer_prefix + t
            for t in tok.batch_decode(
                response * resp_mask.long() + tok.pad_token_id * (1 - resp_mask.long()),
                skip_special_tokens=True,
            )
        ]
        score = answer_reward(texts, [self.targets[r] for r in rows]).to(m.device)
        with torch.no_grad():
            old_logp, old_values = response_stats(
                self.model, self.value_head, seq, full_mask, response.shape[1]
            )
            with m.reference():
                ref_logp, _ = response_stats(
                    self.model, None, seq, full_mask, response.shape[1], with_values=False
                )
        rewards, kl = token_rewards(score, old_logp, ref_logp, resp_mask, m.kl_coef)
        adv, returns = gae(rewards, old_values, resp_mask, m.gamma, m.lam)
        valid = resp_mask > 0
        adv = torch.where(
            valid, (adv - adv[valid].mean()) / (adv[valid].std() + 1e-8), torch.zeros_like(adv)
        )
        return seq, full_mask, resp_mask, old_logp, adv, returns, score, kl

    def training_step(self, batch, batch_idx):
        m = self.method
        opt = self.optimizers()
        seq, full_mask, resp_mask, old_logp, adv, returns, score, kl = self._rollout(
            [int(r) for r in batch]
        )
        for epoch in range(m.ppo_epochs):
            logp, values = response_stats(
                self.model, self.value_head, seq, full_mask, resp_mask.shape[1]
            )
            if epoch == 0:
                with torch.no_grad():
                    ratio = torch.exp(logp - old_logp)
                    first = {
                        "ratio_first_mean": ((ratio * resp_mask).sum() / resp_mask.sum()).item(),
                        "ratio_first_max_dev": ((ratio - 1).abs() * resp_mask).max().item(),
                    }
            pg = clipped_surrogate(logp, old_logp, adv, resp_mask, m.clip)
            vf = (((values - returns) ** 2) * resp_mask).sum() / resp_mask.sum().clamp(min=1)
            loss = pg + m.vf_coef * vf
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
        stats = {
            "reward": score.mean().item(),
            "kl": kl.mean().item(),
            "pg_loss": pg.item(),
            "vf_loss": vf.item(),
            **first,
        }
        self.history.append(stats)
        self.log_dict({f"ppo/{k}": v for k, v in stats.items()})


@dataclass
class PPOSettings(LoraSettings):
    """PPO's settings beside the LoRA ones; defaults from the paper (lr 1.41e-5, batch 16, LoRA
    alpha 100, 250 steps)."""

    lr: float = redefault(LoraSettings, "lr", 1.41e-5)
    ppo_epochs: int = setting(1, "PPO epochs per batch of rollouts", integer(1))
    kl_coef: float = setting(0.05, "KL penalty to the reference model", number(at_least=0))
    clip: float = setting(0.2, "PPO's probability-ratio clip", number(above=0))
    vf_coef: float = setting(0.1, "value loss weight", number(at_least=0))
    gamma: float = setting(1.0, "discount", number(at_least=0, at_most=1))
    lam: float = setting(0.95, "GAE lambda", number(at_least=0, at_most=1))
    max_new_tokens: int = setting(15, "tokens generated per rollout", integer(1))
    prefill: bool = setting(
        True, 'generate after the prefilled answer prefix ("Option (")', check_bool
    )


class PPO(LoraMethod):
    """Reward-scored PPO on a LoRA adapter per subject: reward = -|answer - the subject's
    answer|, -6 when unparseable, with a KL penalty to the adapter-free model (see the module
    docstring)."""

    name = "ppo"
    Settings = PPOSettings

    def setup(self, context) -> None:
        super().setup(context)
        if not self.prefill:
            self.answer_prefix = ""
        self.eos_ids = eos_ids(context.scorer.loaded)

    def align(self, subject: Subject, items: Sequence[Item]) -> AdapterArtifact:
        answers = subject.answers([it.number for it in items])
        answered = [i for i, a in enumerate(answers) if a != 0]
        history, seconds = self.train(
            [items[i] for i in answered],
            [int(answers[i]) for i in answered],
            subject.case,
            f"{self.name} case {subject.case}",
        )
        return self.artifact(subject.case, history, self.reward_summary(history, seconds))

    def train(
        self, items: Sequence[Item], targets: Sequence[int], key: int, label: str
    ) -> tuple[list[dict[str, float]], float]:
        """PPO of a freshly reset adapter (seeded by the run seed and ``key``: a subject's case)
        towards the raw answers ``targets`` to ``items``, ``steps`` steps of ``batch_size``
        items drawn without replacement; the adapter stays trained. Returns the per-step history
        and the seconds it took."""
        self.reset_adapter(key)
        prompts = [self.prompt_ids(it) + self._prefix_ids() for it in items]
        module = PPOModule(self, prompts, [int(t) for t in targets])
        rng = np.random.default_rng([self.seed, key])
        batches = [
            torch.from_numpy(
                rng.choice(len(prompts), size=min(self.batch_size, len(prompts)), replace=False)
            )
            for _ in range(self.steps)
        ]
        torch.manual_seed(self.seed * 1_000_003 + key)
        start = time.perf_counter()
        trainer = self.trainer(self.steps, label, max_epochs=1)
        # One pre-drawn batch of row indices per step. A DataLoader that yields them as they are:
        # Lightning would take a bare list as one dataloader per element and zip them, making a
        # step's rows the first row of every batch (``steps`` rows instead of ``batch_size``).
        with dropout_disabled(self.peft_model):  # old and new log-probs: the same computation
            trainer.fit(module, DataLoader(batches, batch_size=None))
        self.peft_model.eval()
        return module.history, time.perf_counter() - start

    def reward_summary(self, history: list[dict[str, float]], seconds: float) -> dict:
        """What a training's record keeps: steps, mean reward over the first and the last
        quarter of the steps, the last KL, and the training time."""
        rewards = [h["reward"] for h in history]
        k = max(1, len(rewards) // 4)
        return {
            "steps": self.steps,
            "reward_first": float(np.mean(rewards[:k])),
            "reward_last": float(np.mean(rewards[-k:])),
            "kl_last": history[-1]["kl"],
            "timing": {"train_s": seconds},
        }

    def _prefix_ids(self) -> list[int]:
        return (
            self.tokenizer(self.answer_prefix, add_special_tokens=False)["input_ids"]
            if self.answer_prefix
            else []
        )
