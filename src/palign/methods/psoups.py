"""Personalized Soups (Jang et al. 2023) for the Big Five: ten LoRA experts trained once, merged
per subject.

Each trait has a *high* and a *low* expert (``A+``, ``A-``, ...), trained once per run with
palign's PPO (:class:`~palign.methods.ppo.PPO`: reward -|answer - target|, -6 when unparseable)
towards the extreme answers to that trait's alignment items: keyed 5 for ``+`` (5 to a
positively keyed item, 1 to a negatively keyed one), keyed 1 for ``-``
(:func:`~palign.methods.population.extreme_answers`). No person's answer is trained on. A subject
is served by a weighted merge of the experts, with no training: weights from their keyed trait
means on their alignment items (:func:`~palign.methods.population.soup_weights`), merged exactly
as ``ΔW = Σ w_i ΔW_i = Σ w_i s_i B_i A_i`` by PEFT's ``add_weighted_adapter(combination_type=
"cat")`` (rank Σ r_i, scaling 1; :func:`soup_applied`). Mixing A and B separately (``linear``)
would add cross terms ``B_i A_j``.

The experts are trained once and cached (:class:`~palign.methods.population.PopulationStore`):
``artifacts/psoups/population/experts/<name>/`` holds each in PEFT's format with its
training curve.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from palign.constants import TRAITS
from palign.data.papi import Item, Subject
from palign.errors import ArtifactError
from palign.eval.prompts import NEUTRAL_SYSTEM_PROMPT
from palign.methods.base import Answers, Artifact, MethodContext, setting
from palign.methods.checks import choice, optional, path
from palign.methods.lora import AdapterArtifact
from palign.methods.population import (
    NORMALIZE,
    TrainingRow,
    check_store,
    curves,
    expert_names,
    expert_rows,
    soup_weights,
    trained_once,
    trait_levels,
)
from palign.methods.ppo import PPO, PPOSettings

#: The merged adapter's name while it is active.
SOUP = "soup"
MERGE_RULE = "cat: dW = sum_i w_i * s_i * B_i A_i (PEFT add_weighted_adapter, rank sum r_i)"


@contextmanager
def soup_applied(peft_model, weights: dict[str, float]) -> Iterator[None]:
    """The experts of ``peft_model`` (adapters named as ``weights``' keys) merged with
    ``weights`` into one adapter, active for the block; on exit the adapter that was active is
    again and the merged one is deleted."""
    if SOUP in peft_model.peft_config:
        peft_model.delete_adapter(SOUP)  # add_weighted_adapter would keep an old one silently
    previous = peft_model.active_adapter
    peft_model.add_weighted_adapter(
        list(weights), [float(w) for w in weights.values()], SOUP, combination_type="cat"
    )
    peft_model.set_adapter(SOUP)
    peft_model.eval()
    try:
        yield
    finally:
        peft_model.set_adapter(previous)
        peft_model.delete_adapter(SOUP)


@dataclass
class SoupArtifact(Artifact):
    """A subject's soup: their trait levels and each expert's weight (the experts themselves
    are the run's, under ``artifacts/psoups/population/experts/``)."""

    levels: dict[str, float] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)


@dataclass
class PSoupsSettings(PPOSettings):
    """Personalized Soups' settings: PPO's (each expert's training) and how experts are mixed."""

    normalize: str = setting(
        "all",
        "soup weights: all ten sum to 1 (Soups' parameter average) or each trait's pair (trait)",
        choice(*NORMALIZE),
    )
    population_from: str | None = setting(
        None,
        "an artifacts/psoups/population/ folder of an earlier run to take the experts from "
        "(null: train them, or find them in the cache)",
        optional(path),
    )

    def training(self) -> dict:
        """The settings the experts' training depends on (the cache key's part)."""
        skip = {"normalize", "population_from"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


class PSoups(PPO):
    """Personalized Soups: ten PPO-trained LoRA experts (each trait high and low), trained once
    per run, merged per subject by their trait levels (see the module docstring)."""

    name = "psoups"
    Settings = PSoupsSettings

    def check_inputs(self, data, model: str) -> None:
        if self.population_from is not None:
            check_store(self.population_from, model)

    def setup(self, context: MethodContext) -> None:
        super().setup(context)
        loaded = context.scorer.loaded
        self.items = context.data.inventory.train_items
        if self.population_from is not None:
            folder = Path(self.population_from)
            self.population = check_store(folder, loaded.name)
        else:
            self.population, folder = trained_once(
                self.name,
                loaded,
                {"settings": self.settings.training()},
                self.training_rows(),
                self._train_experts,
                context.population_dir,
            )
        self.folder = folder
        self._load_experts(folder, loaded.name)

    def training_rows(self) -> list[TrainingRow]:
        """What the experts train on: each trait's alignment items with the extreme answers
        (no person's answer: ``case`` empty)."""
        return expert_rows(self.items)

    def _train_experts(self, folder: Path) -> dict:
        """Train the ten experts one after another into ``folder/experts/<name>/``."""
        record = {}
        rows = self.training_rows()
        for k, name in enumerate(expert_names()):
            mine = [r for r in rows if r.source == f"expert {name}"]
            items = [self.context.data.inventory.items[r.item] for r in mine]
            history, seconds = self.train(
                items, [r.answer for r in mine], k, f"{self.name} expert {name} ({k + 1}/10)"
            )
            summary = self.reward_summary(history, seconds)
            expert = self.artifact(k, history, summary)
            expert.save(folder / "experts" / name)
            record[name] = summary
        return {"experts": record}

    def _load_experts(self, folder: Path, model: str) -> None:
        """Each expert of ``folder/experts/`` as an adapter of the wrapped model, by name."""
        from peft import LoraConfig, set_peft_model_state_dict

        for name in expert_names():
            expert = AdapterArtifact.load(folder / "experts" / name)
            if expert.model != model:
                raise ArtifactError(
                    f"{folder / 'experts' / name}: expert trained on model {expert.model!r}, "
                    f"not {model!r}"
                )
            if name in self.peft_model.peft_config:
                self.peft_model.delete_adapter(name)
            self.peft_model.add_adapter(name, LoraConfig(task_type="CAUSAL_LM", **expert.lora))
            set_peft_model_state_dict(self.peft_model, expert.state, adapter_name=name)
        self.peft_model.set_adapter("default")
        self.peft_model.eval()

    def population_curves(self) -> dict[str, list[dict[str, float]]]:
        return curves(self.folder)

    def align(self, subject: Subject, items: Sequence[Item]) -> SoupArtifact:
        levels = trait_levels(subject, items)
        weights = soup_weights(levels, self.normalize)
        named = {t: round(float(v), 6) for t, v in zip(TRAITS, levels, strict=True)}
        return SoupArtifact(
            case=subject.case,
            levels=named,
            weights=weights,
            meta={
                "levels": named,
                "weights": weights,
                "merge": MERGE_RULE,
                "population": self.population.get("id"),
            },
        )

    def answer(self, subject: Subject, artifact: SoupArtifact, items: Sequence[Item]) -> Answers:
        scorer = self.context.scorer
        with scorer.applied(soup_applied(self.peft_model, artifact.weights)):
            return scorer.score(NEUTRAL_SYSTEM_PROMPT, items)
