"""PAS soup: Personalized Soups' weighting applied to PAS's head shifts instead of weights.

Ten *expert profiles* (``A+``, ``A-``, ..., ``O-``) are fitted once per run with PAS's own code
(:meth:`PAS.load_activations <palign.methods.pas.PAS.load_activations>`, :meth:`PAS.fit_group
<palign.methods.pas.PAS.fit_group>`), each as if a person had answered its trait's alignment
items at the extreme: keyed 5 for ``+``, keyed 1 for ``-``
(:func:`~palign.methods.population.extreme_answers`, the targets psoups' experts train towards).
The other traits' items count as unanswered, so they label no probe row: an expert's heads and
directions separate its own trait's "A" and "E" answers only. Each expert keeps its top K heads
with a unit direction and sigma (pooled: its shift applies to every item). A ``-`` expert's
labels are its ``+`` expert's flipped on the same rows and split (the same seed), so its
mass-mean directions are the ``+`` expert's negated (its probe directions very nearly so).

Per subject there is no probing, search or training: their keyed trait means on their alignment
items give the ten weights (:func:`~palign.methods.population.soup_weights`, as psoups), and the
shift of every head is the weighted sum of the experts' shifts, ``Σ_i w_i * alpha * sigma_i,h *
d_i,h`` (the union of the experts' heads; a head an expert did not keep counts 0 for it). The
subject's artifact is that sum as a :class:`~palign.pas.profile.PASProfile`: every weighted
expert's components, each ``sigma`` multiplied by its expert's weight (``sigma`` there is
``w_i * sigma_i``, not a standard deviation), so it saves, loads and applies as any PAS profile.
``alpha`` is one number from the config (never searched, never chosen on test items). With
``normalize=all`` the ten weights sum to 1, so a trait's pair shifts its heads by at most alpha /
5 * sigma; with ``normalize=trait`` by up to alpha * sigma. Since a ``-`` expert mirrors its
``+`` one, a trait's pair reduces to ``(w+ - w-) * (+ expert's shift)``: a subject at the scale's
midpoint gets no shift from that trait. The items are answered with the neutral system prompt
under either protocol (PAS's few-shot context, ``with_context``, is not part of the soup).

The experts are fitted once and cached (:class:`~palign.methods.population.PopulationStore`,
keyed by the model, the fitting settings, the contrastive prompts' tokens and the targets'
digest): ``artifacts/<name>/population/`` holds ``training_rows.csv`` (the targets),
``population.json`` and ``experts/<name>/profile.{safetensors,json}`` with the probes'
``head_accuracy.npy``. A subject's cost is answering alone: aligning forwards nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from palign.constants import TRAITS
from palign.data.papi import Item, Subject
from palign.errors import PASError
from palign.eval.prompts import NEUTRAL_SYSTEM_PROMPT
from palign.eval.records import ResultRow
from palign.methods.base import (
    Answers,
    Method,
    MethodContext,
    MethodSettings,
    setting,
    shared,
)
from palign.methods.checks import choice, fail, number
from palign.methods.pas import ALIGNMENT_ITEMS, PAS, PASArtifact, PASSettings
from palign.methods.population import (
    NORMALIZE,
    TrainingRow,
    expert_names,
    expert_rows,
    soup_weights,
    trained_once,
    trait_levels,
)
from palign.pas.activations import contrastive_prompts
from palign.pas.profile import PASProfile

#: The components of a profile, in its tensors' order.
COMPONENTS = ("layer", "head", "trait", "direction", "sigma", "train_acc", "val_acc")
#: Alignment items of one trait: what an expert's probes divide into train and validation.
TRAIT_ITEMS = ALIGNMENT_ITEMS // len(TRAITS)


@dataclass
class PASSoupSettings(MethodSettings):
    """PAS soup's settings: PAS's for fitting the experts (shared with :class:`PASSettings`:
    same defaults, checks and protocol keys), one fixed ``alpha`` and the soup's weighting."""

    error = PASError

    alpha: float = setting(
        4.0,
        "how far the soup shifts: each expert's heads by alpha * sigma along its direction, "
        "times the expert's weight (one value for every subject: no search)",
        number(at_least=0),
    )
    normalize: str = setting(
        "all",
        "soup weights: all ten sum to 1 (Soups' average) or each trait's pair (trait)",
        choice(*NORMALIZE),
    )
    top_k: int = shared(
        PASSettings, "top_k", help="heads each expert keeps: its top K by probe accuracy"
    )
    layers: list[int] | None = shared(PASSettings, "layers")
    direction: str = shared(PASSettings, "direction")
    ranking: str = shared(PASSettings, "ranking")
    split: str = shared(PASSettings, "split")
    ties: str = shared(PASSettings, "ties")
    contrastive: str = shared(PASSettings, "contrastive")
    train_fraction: float = shared(PASSettings, "train_fraction")
    probe_c: float = shared(PASSettings, "probe_c")
    subject_batch: int = shared(PASSettings, "subject_batch")
    seed: int = shared(PASSettings, "seed", help="seed of the experts' probe splits")

    def check_all(self) -> None:
        if not 1 <= round(self.train_fraction * TRAIT_ITEMS) <= TRAIT_ITEMS - 1:
            raise fail(
                "train_fraction",
                self.train_fraction,
                f"a number in (0, 1) that leaves at least one of an expert's {TRAIT_ITEMS} items "
                "on each side of the probe train/validation split",
                PASError,
            )

    def fitting(self) -> dict:
        """The settings the experts depend on (the cache key's part; PAS's names)."""
        skip = {"alpha", "normalize", "subject_batch"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


def expert_subjects(rows: Sequence[TrainingRow], n_items: int = 300) -> list[Subject]:
    """Each expert of :func:`expert_rows`' rows as a subject PAS can fit (case ``k`` for the
    ``k``-th of :func:`expert_names`): its targets as raw answers, every other item missing."""
    out = []
    for k, name in enumerate(expert_names()):
        raw = np.zeros(n_items, dtype=np.int64)
        for r in rows:
            if r.source == f"expert {name}":
                raw[r.item - 1] = r.answer
        out.append(Subject(case=k, index=-1, raw=raw))
    return out


def soup_profile(
    experts: dict[str, PASProfile], weights: dict[str, float], alpha: float
) -> PASProfile:
    """The weighted sum of ``experts``' shifts as one profile: every component of each expert
    with a nonzero weight, its ``sigma`` times the weight, alpha ``alpha``. Its shift of a head
    is ``Σ_i w_i * alpha * sigma_i * d_i`` over the experts that kept the head."""
    kept = [name for name in experts if weights.get(name, 0.0) != 0.0]
    first = next(iter(experts.values()))
    parts = {k: [getattr(experts[n], k) for n in kept] for k in COMPONENTS}
    parts["sigma"] = [experts[n].sigma * weights[n] for n in kept]
    tensors = {k: torch.cat(v) for k, v in parts.items()}  # never empty: a pair sums to > 0
    counts = [len(experts[n].layer) for n in kept]
    return PASProfile(
        model=first.model,
        shape=tuple(first.shape),
        alpha=alpha,
        **tensors,
        meta={
            "soup": {n: weights[n] for n in kept},
            "expert_of_component": [n for n, c in zip(kept, counts, strict=True) for _ in range(c)],
            "sigma": "w_i * sigma_i: each expert's sigma times its soup weight",
        },
    )


def shifted_heads(shift: torch.Tensor, head_dim: int) -> int:
    """How many heads a (variants, layers, heads * head_dim) shift moves (nonzero anywhere)."""
    per_head = shift.reshape(*shift.shape[:2], -1, head_dim).abs().amax(dim=(0, 3))
    return int((per_head > 0).sum())


class PASSoup(Method):
    """PAS soup: ten PAS expert profiles (each trait high and low) fitted once per run, and per
    subject their head shifts summed with the subject's soup weights (see the module
    docstring). ``subject_batch`` subjects are answered in one scorer run (one variant each)."""

    name = "pas_soup"
    uses_llm = True
    replies = True  # the subject's summed head shifts as PAS answers (scorer.applied)
    Settings = PASSoupSettings

    def __init__(self, **values):
        super().__init__(**values)
        #: PAS as the experts are fitted and answers scored: pooled, neutral prompt, one alpha.
        self.pas = PAS(
            **self.settings.fitting(),
            alphas=[self.alpha],
            per_trait=False,
            with_context=False,
            subject_batch=self.subject_batch,
        )

    def setup(self, context: MethodContext) -> None:
        super().setup(context)
        self.pas.attach(context)  # the heads, the items and the settings checked: no forward
        self.items = self.pas.items
        loaded = context.scorer.loaded
        rows = expert_rows(self.items)
        prompts = contrastive_prompts(context.scorer, self.items, shape=self.contrastive)
        key = {
            "settings": self.settings.fitting(),
            "prompts": hashlib.sha256(str(prompts).encode()).hexdigest()[:16],
        }
        self.population, folder = trained_once(
            self.name, loaded, key, rows, self._fit_experts, context.population_dir
        )
        self.experts = {}
        for name in expert_names():
            profile = PASProfile.load(folder / "experts" / name / "profile")
            profile.check_fits(self.pas.layout, loaded.name)
            self.experts[name] = profile

    def _fit_experts(self, folder: Path) -> dict:
        """The ten experts in one batched fit of PAS's probes, into ``folder/experts/<name>/``."""
        self.pas.load_activations()
        subjects = expert_subjects(expert_rows(self.items))
        usable = np.ones((len(subjects), len(self.items)), dtype=bool)
        try:
            fits, probe_s = self.pas.fit_group(subjects, usable, self.seed)
        except PASError as e:
            names = ", ".join(f"{k} = {n}" for k, n in enumerate(expert_names()))
            raise PASError(f"{self.name} experts (case {names}): {e}") from None
        record = {}
        for name, (profile, accuracy) in zip(expert_names(), fits, strict=True):
            profile.meta.update(case=None, expert=name)
            profile.save(folder / "experts" / name / "profile")
            np.save(folder / "experts" / name / "head_accuracy.npy", accuracy)
            record[name] = {
                "heads": [[int(la), int(h)] for la, h in zip(profile.layer, profile.head)],
                "val_acc_mean": float(profile.val_acc.mean()),
                "labelled_items": profile.meta["labelled_items"],
            }
        return {
            "experts": record,
            "activations_s": self.pas.activation_s,
            "probes_s": probe_s,
        }

    # --- per subject -------------------------------------------------------------------------

    def align(self, subject: Subject, items: Sequence[Item]) -> PASArtifact:
        """The subject's soup: weights from their trait levels, the experts' shifts summed."""
        if [it.number for it in items] != [it.number for it in self.items]:
            raise PASError(f"{self.name} aligns on the inventory's alignment items")
        levels = trait_levels(subject, items)
        weights = soup_weights(levels, self.normalize)
        profile = soup_profile(self.experts, weights, self.alpha)
        profile.meta["case"] = subject.case
        union = {(int(la), int(h)) for la, h in zip(profile.layer, profile.head)}
        named = {t: round(float(v), 6) for t, v in zip(TRAITS, levels, strict=True)}
        return PASArtifact(
            case=subject.case,
            profile=profile,
            meta={
                "alpha": self.alpha,
                "normalize": self.normalize,
                "levels": named,
                "weights": weights,
                "expert_heads": len(union),
                "heads_shifted": shifted_heads(profile.total_shift(), self.pas.layout.head_dim),
                "population": self.population.get("id"),
            },
        )

    def answer(self, subject: Subject, artifact: PASArtifact, items: Sequence[Item]) -> Answers:
        return self.answer_group([subject], [artifact], items)[0]

    def answer_group(
        self, subjects: Sequence[Subject], artifacts: Sequence[PASArtifact], items: Sequence[Item]
    ) -> list[Answers]:
        """Every subject's items under its soup, one variant each of one scorer run (PAS's
        :meth:`~palign.methods.pas.PAS.score_alphas`)."""
        jobs = [(a.profile, NEUTRAL_SYSTEM_PROMPT, items, [self.alpha]) for a in artifacts]
        return self.pas.score_alphas(jobs)

    def notes(self, rows: Sequence[ResultRow]) -> list[str]:
        return [
            f"{self.name}: ten PAS experts (A+ .. O-: top {self.top_k} heads each by "
            f"{self.ranking} accuracy, {self.direction} directions) fitted once per run on the "
            "extreme answers to each trait's alignment items (population "
            f"{self.population.get('id')}); per subject their head shifts summed with the "
            f"subject's soup weights (normalize={self.normalize}) at the fixed alpha "
            f"{self.alpha:g}: no per-subject probe or search, test items never read.",
        ]
