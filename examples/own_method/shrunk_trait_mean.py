"""A method of one's own, added to palign as one module and one YAML (``conf/method/
shrunk_trait_mean.yaml`` beside this file): the subject's keyed trait means on the alignment
items, shrunk toward the scale midpoint 3 by ``shrink``, answered through each item's key.

    PYTHONPATH=examples/own_method python -m palign method=shrunk_trait_mean \\
        hydra.searchpath=[file://examples/own_method/conf] dataset.limit=3

``shrink=0`` answers exactly as the ``trait_mean`` baseline; ``shrink=1`` always answers 3
(the ``constant`` baseline).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from palign.constants import TRAITS
from palign.data.papi import Item, Subject, keyed
from palign.methods import Answers, Artifact, Method, MethodSettings, setting
from palign.methods.checks import number
from palign.methods.statistical import keyed_trait_means, round_half_up


@dataclass
class ShrunkTraitMeanSettings(MethodSettings):
    shrink: float = setting(
        0.5,
        "how far toward 3: 0 is the trait_mean baseline, 1 always answers 3",
        number(at_least=0, at_most=1),
    )


class ShrunkTraitMean(Method):
    """Keyed trait means shrunk toward 3; uses no LLM (``uses_llm`` stays False). Its settings
    are ``Settings``: ``self.shrink`` is checked before any work."""

    name = "shrunk_trait_mean"
    Settings = ShrunkTraitMeanSettings

    def align(self, subject: Subject, items: Sequence[Item]) -> Artifact:
        """The subject's keyed trait means (A, C, E, N, O) over ``items``, shrunk."""
        means = keyed_trait_means(subject.answers([it.number for it in items]), items)
        shrunk = 3.0 + (1.0 - self.shrink) * (means - 3.0)
        return Artifact(case=subject.case, meta={"trait_means": dict(zip(TRAITS, shrunk.tolist()))})

    def answer(self, subject: Subject, artifact: Artifact, items: Sequence[Item]) -> Answers:
        """Each item's trait mean, rounded in keyed space, as a raw answer 1..5."""
        means = np.array([artifact.meta["trait_means"][it.trait] for it in items])
        return Answers(scores=keyed(round_half_up(means), np.array([it.key for it in items])))
