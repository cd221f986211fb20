"""Statistical baselines that use no LLM: they bound what an alignment method must beat."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from palign.constants import TRAITS
from palign.data.papi import Item, Subject, keyed
from palign.methods.base import Answers, Artifact, Method, MethodContext, MethodSettings, setting
from palign.methods.checks import integer


def round_half_up(x: np.ndarray) -> np.ndarray:
    """Round to the nearest integer, halves up, and clip to the 1..5 answer scale."""
    return np.clip(np.floor(np.asarray(x, dtype=np.float64) + 0.5), 1, 5).astype(np.int64)


def keyed_trait_means(raw: np.ndarray, items: Sequence[Item]) -> np.ndarray:
    """Mean keyed answer per trait, missing answers left out.

    ``raw``: (..., n_items) raw answers, 0 = missing. Returns (..., 5) in :data:`TRAITS` order;
    3.0 (the scale midpoint) where a trait has no known answer.
    """
    key = np.array([it.key for it in items])
    traits = np.array([it.trait for it in items])
    k = keyed(raw, key).astype(np.float64)
    known = raw != 0
    out = []
    for t in TRAITS:
        cols = traits == t
        n = known[..., cols].sum(-1)
        out.append(
            np.where(n > 0, (k[..., cols] * known[..., cols]).sum(-1) / np.maximum(n, 1), 3.0)
        )
    return np.stack(out, -1)


def _trait_index(items: Sequence[Item]) -> np.ndarray:
    return np.array([TRAITS.index(it.trait) for it in items])


def _from_keyed(keyed_value: np.ndarray, items: Sequence[Item]) -> np.ndarray:
    """Keyed scores (n,) -> raw answers: rounded in keyed space (so that reverse keying is exact),
    then mapped back through each item's key."""
    return keyed(round_half_up(keyed_value), np.array([it.key for it in items]))


@dataclass
class TraitArtifact(Artifact):
    """Per-trait keyed means (A, C, E, N, O) of the subject on the alignment items."""

    trait_means: tuple[float, ...] = ()


@dataclass
class ConstantSettings(MethodSettings):
    value: int = setting(3, "the answer given to every item, on the 1..5 scale", integer(1, 5))


class Constant(Method):
    """Always answers the scale midpoint (3 unless configured)."""

    name = "constant"
    Settings = ConstantSettings

    def align(self, subject: Subject, items: Sequence[Item]) -> Artifact:
        return Artifact(case=subject.case, meta={"value": self.value})

    def answer(self, subject: Subject, artifact: Artifact, items: Sequence[Item]) -> Answers:
        return Answers(scores=np.full(len(items), self.value, dtype=np.int64))


class TraitMean(Method):
    """The subject's keyed trait mean over the alignment items, mapped back through each key."""

    name = "trait_mean"

    def align(self, subject: Subject, items: Sequence[Item]) -> TraitArtifact:
        means = keyed_trait_means(subject.answers([it.number for it in items]), items)
        return TraitArtifact(case=subject.case, trait_means=tuple(float(m) for m in means))

    def answer(self, subject: Subject, artifact: TraitArtifact, items: Sequence[Item]) -> Answers:
        means = np.asarray(artifact.trait_means)[_trait_index(items)]
        return Answers(scores=_from_keyed(means, items))


class ItemMean(Method):
    """Population mean answer to each item plus the subject's trait offset from the population.

    Population: every *other* subject of the loaded data set (the subject's own answers to the
    test items are never read). Offset per trait: the subject's keyed trait mean on the alignment
    items minus the other subjects' mean of the same.
    """

    name = "item_mean"

    def setup(self, context: MethodContext) -> None:
        super().setup(context)
        data = context.data
        self._row = {s.case: i for i, s in enumerate(data.subjects)}
        self._answers = data.answers  # (subjects, 300) raw; stacked once per run

    def _others(self, subject: Subject, items: Sequence[Item]) -> np.ndarray:
        """The other subjects' raw answers to ``items``, (subjects - 1, n)."""
        cols = np.array([it.number for it in items]) - 1
        return np.delete(self._answers[:, cols], self._row[subject.case], axis=0)

    def align(self, subject: Subject, items: Sequence[Item]) -> TraitArtifact:
        own = keyed_trait_means(subject.answers([it.number for it in items]), items)
        population = keyed_trait_means(self._others(subject, items), items).mean(0)
        return TraitArtifact(
            case=subject.case, trait_means=tuple(float(m) for m in own - population)
        )

    def answer(self, subject: Subject, artifact: TraitArtifact, items: Sequence[Item]) -> Answers:
        others = self._others(subject, items)
        known = others != 0
        key = np.array([it.key for it in items])
        keyed_mean = (keyed(others, key) * known).sum(0) / np.maximum(known.sum(0), 1)  # (n,)
        offset = np.asarray(artifact.trait_means)[_trait_index(items)]
        return Answers(scores=_from_keyed(keyed_mean + offset, items))


#: The baselines every report shows beside the method under study.
BASELINES: tuple[type[Method], ...] = (Constant, TraitMean, ItemMean)
