"""DPO on a LoRA adapter per subject (sigmoid loss, reference = adapter disabled).

Pairs from the subject's alignment items: prompt = the item prompt (assistant turn opened),
chosen = the subject's answer as the model should write it ("Option (B). Moderately Accurate"),
rejected = the opposite extreme (6 - v) or, with ``rejected=all_others``, every other option.
Neutral (3) and missing answers are skipped unless ``keep_neutral``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from palign import stopping
from palign.data.papi import Item, Subject
from palign.errors import ConfigError
from palign.methods.base import setting
from palign.methods.checks import check_bool, choice, integer, number
from palign.methods.lora import AdapterArtifact, LoraMethod, LoraSettings, answer_completion
from palign.models.batching import last_token_logprobs, left_pad

REJECTED = ("opposite", "all_others")


def preference_pairs(
    items: Sequence[Item],
    answers: Sequence[int],
    rejected: str = "opposite",
    keep_neutral: bool = False,
) -> list[tuple[Item, int, int]]:
    """(item, chosen answer, rejected answer) triples from raw answers (0 = missing)."""
    if rejected not in REJECTED:
        raise ConfigError(f"method.rejected={rejected!r} is not one of {REJECTED}")
    pairs = []
    for item, a in zip(items, answers, strict=True):
        a = int(a)
        if a == 0 or (a == 3 and not keep_neutral):
            continue
        others = (
            [6 - a] if rejected == "opposite" and a != 3 else [b for b in range(1, 6) if b != a]
        )
        if rejected == "opposite" and a == 3:
            others = [1, 5]
        pairs += [(item, a, b) for b in others]
    return pairs


def sequence_logps(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor
) -> torch.Tensor:
    """Sum of log-probabilities of the completion tokens, (B,). Rows are left-padded, so
    completions end in the last column (:func:`palign.models.batching.last_token_logprobs`)."""
    n = int(completion_mask.sum(-1).max().item())
    logp, _ = last_token_logprobs(model, input_ids, attention_mask, n)
    return (logp * completion_mask[:, -n:]).sum(-1)


def dpo_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sigmoid DPO: mean of -log sigmoid(beta * (policy log-ratio - reference log-ratio)).

    Returns the loss and the implicit rewards ``beta * (logp - ref_logp)`` of chosen and rejected.
    """
    chosen_reward = beta * (chosen - ref_chosen)
    rejected_reward = beta * (rejected - ref_rejected)
    return -F.logsigmoid(chosen_reward - rejected_reward).mean(), chosen_reward, rejected_reward


class PairBatches:
    """Tokenised pairs, collated as [chosen rows; rejected rows], left-padded."""

    def __init__(self, rows: list[tuple[list[int], list[int], list[int]]], pad_id: int):
        self.rows = rows  # (prompt ids, chosen completion ids, rejected completion ids)
        self.pad_id = pad_id

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        seqs, completion = [], []
        for side in (1, 2):
            for i in indices:
                prompt, answer = self.rows[i][0], self.rows[i][side]
                seqs.append(prompt + answer)
                completion.append([1] * len(answer))
        ids, mask = left_pad(seqs, self.pad_id)
        _, cmask = left_pad(completion, 0, width=ids.shape[1])
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "completion_mask": cmask.float(),
            "index": torch.tensor(indices),
        }


class DPOModule(L.LightningModule):
    """One subject's DPO training of the adapter of ``method.peft_model``.

    Reference log-probabilities are computed once per pair (adapter disabled) before training.
    Logs loss, reward accuracy and the chosen-rejected margin.
    """

    def __init__(self, method: DPO, ref_logps: torch.Tensor):
        super().__init__()
        self.method = method
        self.model = method.peft_model
        self.ref_logps = ref_logps  # (pairs, 2): chosen, rejected; on the model's device
        self.history: list[dict[str, float]] = []

    def training_step(self, batch, batch_idx):
        logps = sequence_logps(
            self.model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
        )
        chosen, rejected = logps.chunk(2)
        ref = self.ref_logps[batch["index"]]
        loss, cr, rr = dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], self.method.beta)
        stats = {
            "loss": loss.item(),
            "margin": (cr - rr).mean().item(),
            "reward_acc": (cr > rr).float().mean().item(),
        }
        self.history.append(stats)
        self.log_dict({f"dpo/{k}": v for k, v in stats.items()}, prog_bar=False)
        return loss

    def configure_optimizers(self):
        m = self.method
        opt = torch.optim.AdamW(m.lora_parameters(), lr=m.lr, weight_decay=m.weight_decay)
        warmup = max(1, min(m.warmup_steps, m.steps))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@dataclass
class DPOSettings(LoraSettings):
    """DPO's settings beside the LoRA ones; defaults from the paper (AdamW, lr 5e-4, 100 warm-up
    steps, weight decay 0.05, effective batch 16, 250 steps)."""

    beta: float = setting(0.1, "DPO's KL strength beta", number(above=0))
    warmup_steps: int = setting(100, "linear warm-up steps of the learning rate", integer(0))
    weight_decay: float = setting(0.05, "AdamW weight decay", number(at_least=0))
    micro_batch_size: int = setting(
        4, "pairs per forward (batch_size is a multiple of it)", integer(1)
    )
    rejected: str = setting(
        "opposite",
        "rejected answers: the opposite extreme (6 - v) or all_others",
        choice(*REJECTED),
    )
    keep_neutral: bool = setting(False, "keep items answered 3 (no clear preference)", check_bool)

    def check_all(self) -> None:
        if self.batch_size % self.micro_batch_size:
            raise ConfigError(
                f"method.batch_size={self.batch_size} is not a multiple of "
                f"method.micro_batch_size={self.micro_batch_size}"
            )


class DPO(LoraMethod):
    """DPO on a LoRA adapter per subject: the subject's answers chosen, the opposite (or every
    other) answer rejected; reference = the adapter disabled (see the module docstring)."""

    name = "dpo"
    Settings = DPOSettings

    def _batches(self, subject: Subject, items: Sequence[Item]) -> PairBatches:
        pairs = preference_pairs(
            items, subject.answers([it.number for it in items]), self.rejected, self.keep_neutral
        )
        eos = [self.tokenizer.eos_token_id]

        def encode(answer: int) -> list[int]:
            text = answer_completion(answer, self.answer_prefix)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"] + eos

        return PairBatches(
            [(self.prompt_ids(it), encode(c), encode(r)) for it, c, r in pairs],
            self.tokenizer.pad_token_id,
        )

    def _pair_order(self, pairs: int, case: int, micro_batches: int) -> list[int]:
        """Pair indices for exactly ``micro_batches`` micro-batches: seeded shuffles of all pairs,
        one after another. One epoch of exactly what the steps need, so every optimiser step
        accumulates ``batch_size`` pairs (Lightning steps at an epoch's end with whatever the
        window holds, which would make some steps' batches smaller)."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + case)
        needed = micro_batches * self.micro_batch_size
        rounds = math.ceil(needed / pairs)
        order = torch.cat([torch.randperm(pairs, generator=generator) for _ in range(rounds)])
        return order[:needed].tolist()

    @torch.no_grad()
    def reference_logps(self, data: PairBatches) -> torch.Tensor:
        """(pairs, 2) log-probabilities of chosen and rejected under the reference policy, on
        the model's device; each micro-batch is a safe point of the stop policy."""
        out = torch.zeros(len(data.rows), 2, device=self.device)
        device = self.device
        with self.reference():
            for start in range(0, len(data.rows), self.micro_batch_size):
                stopping.check()
                idx = list(range(start, min(start + self.micro_batch_size, len(data.rows))))
                b = {k: v.to(device) for k, v in data.collate(idx).items()}
                logps = sequence_logps(
                    self.peft_model, b["input_ids"], b["attention_mask"], b["completion_mask"]
                )
                out[idx] = torch.stack(logps.chunk(2), -1)
        return out

    def align(self, subject: Subject, items: Sequence[Item]) -> AdapterArtifact:
        self.reset_adapter(subject.case)
        data = self._batches(subject, items)
        if not data.rows:
            raise ConfigError(
                f"case {subject.case}: no preference pair (all answers neutral or missing); "
                "method.keep_neutral=true uses neutral answers too"
            )
        start = time.perf_counter()
        module = DPOModule(self, self.reference_logps(data))
        accumulate = self.batch_size // self.micro_batch_size
        trainer = self.trainer(
            self.steps,
            f"{self.name} case {subject.case}",
            max_epochs=1,
            accumulate_grad_batches=accumulate,
        )
        loader = DataLoader(
            self._pair_order(len(data.rows), subject.case, self.steps * accumulate),
            batch_size=self.micro_batch_size,
            collate_fn=data.collate,
        )
        self.peft_model.train()
        trainer.fit(module, loader)
        self.peft_model.eval()
        # Means over the first and the last quarter of the micro-batches: one micro-batch's loss
        # is too noisy to tell whether training moved.
        k = max(1, len(module.history) // 4)

        def mean(key: str, part: list[dict]) -> float:
            return float(np.mean([h[key] for h in part]))

        first, last = module.history[:k], module.history[-k:]
        return self.artifact(
            subject.case,
            module.history,
            {
                "pairs": len(data.rows),
                "steps": self.steps,
                "loss_first": mean("loss", first),
                "loss_last": mean("loss", last),
                "margin_first": mean("margin", first),
                "margin_last": mean("margin", last),
                "timing": {"train_s": time.perf_counter() - start},
            },
        )
