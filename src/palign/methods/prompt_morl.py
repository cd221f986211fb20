"""Prompt-MORL (the multi-objective baseline of Personalized Soups, Jang et al. 2023): one shared
LoRA adapter, trained once per run on a population with each person's preference written into the
prompt.

For PAPI the preference is a person's five trait levels (keyed trait means on their alignment
items, :func:`~palign.methods.population.trait_levels`) in the system prompt
(:func:`~palign.eval.prompts.trait_levels_system_prompt`). The adapter is trained once, by
supervised fine-tuning on the completion tokens, on the population's alignment answers
(:func:`~palign.methods.population.population_rows`: every PAPI subject's 120 alignment answers,
or a seeded sample of ``population_size`` people; never a test answer), each under its person's
levels. A subject is then served by the same adapter with their own levels in the prompt: no
training per subject. Defaults follow a public reimplementation (LoRA r 16, alpha 100, dropout
0.05 on q/k/v/o, lr 5e-4, 250 steps of 16).

The adapter is trained once and cached (:class:`~palign.methods.population.PopulationStore`):
``artifacts/prompt_morl/population/adapter/`` holds it in PEFT's format with its training curve,
``training_rows.csv`` every row it was trained on.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from palign.constants import TRAITS
from palign.data.papi import Item, Subject
from palign.eval.prompts import trait_levels_system_prompt
from palign.methods.base import Answers, MethodContext, setting
from palign.methods.checks import integer, optional, path
from palign.methods.dpo import sequence_logps
from palign.methods.lora import (
    AdapterArtifact,
    LoraMethod,
    LoraSettings,
    answer_completion,
)
from palign.methods.population import (
    TrainingRow,
    check_store,
    curves,
    levels_text,
    population_rows,
    trained_once,
    trait_levels,
)
from palign.methods.prompting import PromptArtifact
from palign.models.batching import left_pad


class Examples:
    """Tokenised (prompt, completion) examples, collated left-padded with a completion mask."""

    def __init__(self, rows: list[tuple[list[int], list[int]]], pad_id: int):
        self.rows, self.pad_id = rows, pad_id

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        seqs = [self.rows[i][0] + self.rows[i][1] for i in indices]
        ids, mask = left_pad(seqs, self.pad_id)
        _, cmask = left_pad([[1] * len(self.rows[i][1]) for i in indices], 0, width=ids.shape[1])
        return {"input_ids": ids, "attention_mask": mask, "completion_mask": cmask.float()}


class SFTModule(L.LightningModule):
    """Supervised fine-tuning of ``method.peft_model``'s adapter: the mean negative
    log-likelihood of the completion tokens of a batch. ``history``: the loss per step."""

    def __init__(self, method: PromptMORL):
        super().__init__()
        self.method = method
        self.model = method.peft_model
        self.history: list[dict[str, float]] = []

    def training_step(self, batch, batch_idx):
        cmask = batch["completion_mask"]
        logps = sequence_logps(self.model, batch["input_ids"], batch["attention_mask"], cmask)
        loss = -logps.sum() / cmask.sum()
        self.history.append({"loss": loss.item()})
        self.log("sft/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.method.lora_parameters(), lr=self.method.lr)


@dataclass
class PromptMORLSettings(LoraSettings):
    """Prompt-MORL's settings: the LoRA ones (the shared adapter's training) and the
    population's."""

    population_size: int | None = setting(
        None,
        "people in the population (a seeded sample of the PAPI subjects; null: all of them)",
        optional(integer(1)),
    )
    population_from: str | None = setting(
        None,
        "an artifacts/prompt_morl/population/ folder of an earlier run to take the adapter from "
        "(null: train it, or find it in the cache)",
        optional(path),
    )

    def training(self) -> dict:
        """The settings the adapter's training depends on (the cache key's part)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "population_from"}


class PromptMORL(LoraMethod):
    """Prompt-MORL: one LoRA adapter trained once on the population with each person's trait
    levels in the prompt; a subject is answered with their own levels (see the module
    docstring)."""

    name = "prompt_morl"
    Settings = PromptMORLSettings

    def check_inputs(self, data, model: str) -> None:
        if self.population_from is not None:
            check_store(self.population_from, model)
        else:
            population_rows(data, self.population_size, self.seed)  # not empty

    def setup(self, context: MethodContext) -> None:
        super().setup(context)
        loaded = context.scorer.loaded
        if self.population_from is not None:
            folder = Path(self.population_from)
            self.population = check_store(folder, loaded.name)
        else:
            rows = population_rows(context.data, self.population_size, self.seed)
            self.population, folder = trained_once(
                self.name,
                loaded,
                {"settings": self.settings.training()},
                rows,
                lambda f: self._train(f, rows),
                context.population_dir,
            )
        self.folder = folder
        self.adapter = AdapterArtifact.load(folder / "adapter")

    def _examples(self, rows: Sequence[TrainingRow]) -> Examples:
        """Each row as (its person's levels prompt + the item, the answer's completion + EOS)."""
        data = self.context.data
        train = data.inventory.train_items
        by_case = {s.case: s for s in data.subjects}
        prompts = {
            case: trait_levels_system_prompt(
                levels_text(trait_levels(by_case[case].seen_only(data.inventory.train), train))
            )
            for case in sorted({r.case for r in rows})
        }
        eos = [self.tokenizer.eos_token_id]
        completions = {
            a: self.tokenizer(answer_completion(a, self.answer_prefix), add_special_tokens=False)[
                "input_ids"
            ]
            + eos
            for a in range(1, 6)
        }
        items = data.inventory.items
        return Examples(
            [
                (self.prompt_ids(items[r.item], prompts[r.case]), completions[r.answer])
                for r in rows
            ],
            self.tokenizer.pad_token_id,
        )

    def _train(self, folder: Path, rows: Sequence[TrainingRow]) -> dict:
        """Train the shared adapter on ``rows``: ``steps`` steps of ``batch_size`` rows, drawn
        without replacement within a step (seeded); saved into ``folder/adapter/``."""
        self.reset_adapter(0)
        examples = self._examples(rows)
        rng = np.random.default_rng([self.seed, 0])
        size = min(self.batch_size, len(rows))
        order = [
            rng.choice(len(rows), size=size, replace=False).tolist() for _ in range(self.steps)
        ]
        module = SFTModule(self)
        start = time.perf_counter()
        trainer = self.trainer(self.steps, f"{self.name} population adapter", max_epochs=1)
        self.peft_model.train()
        trainer.fit(module, DataLoader(order, batch_size=None, collate_fn=examples.collate))
        self.peft_model.eval()
        losses = [h["loss"] for h in module.history]
        k = max(1, len(losses) // 4)
        record = {
            "steps": self.steps,
            "rows": len(rows),
            "people": len({r.case for r in rows}),
            "loss_first": float(np.mean(losses[:k])),
            "loss_last": float(np.mean(losses[-k:])),
            "timing": {"train_s": time.perf_counter() - start},
        }
        self.artifact(0, module.history, record).save(folder / "adapter")
        return {"adapter": record}

    def population_curves(self) -> dict[str, list[dict[str, float]]]:
        return curves(self.folder)

    def align(self, subject: Subject, items: Sequence[Item]) -> PromptArtifact:
        levels = trait_levels(subject, items)
        named = {t: round(float(v), 6) for t, v in zip(TRAITS, levels, strict=True)}
        return PromptArtifact(
            case=subject.case,
            system_prompt=trait_levels_system_prompt(levels_text(levels)),
            meta={"levels": named, "population": self.population.get("id")},
        )

    def answer(self, subject: Subject, artifact: PromptArtifact, items: Sequence[Item]) -> Answers:
        scorer = self.context.scorer
        with scorer.applied(self.adapter.active_in(self.peft_model)):
            return scorer.score(artifact.system_prompt, items)
