"""The interface every alignment method implements.

A method is set up once per run (:meth:`Method.setup`), then for each subject it *aligns* on the
subject's alignment items (the 120 IPIP-NEO-120 answers), returning an :class:`Artifact`, and
*answers* items with that artifact. The runner never looks inside an artifact, so PAS
(interventions), DPO/PPO (adapters) and prompting methods (system prompts) plug in alike.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from palign.data.papi import Item, PapiData, Subject

if TYPE_CHECKING:
    from palign.eval.scoring import Scorer


@dataclass
class Answers:
    """A method's answers to ``n`` items.

    ``scores``: (n,) raw answers 1..5, 0 where no answer could be parsed.
    ``probs``: (n, 5) probabilities of options A..E (logit scoring), else None.
    ``texts``: generated texts (generative scoring), else None.
    ``setting``: (name, value) of the hyper-parameter they were answered under (PAS: alpha).
    """

    scores: np.ndarray
    probs: np.ndarray | None = None
    texts: list[str] | None = None
    setting: tuple[str, float] | None = None

    def __getitem__(self, rows: slice) -> Answers:
        """The answers of ``rows`` (a slice of the items)."""
        return Answers(
            scores=self.scores[rows],
            probs=None if self.probs is None else self.probs[rows],
            texts=None if self.texts is None else self.texts[rows],
            setting=self.setting,
        )

    @property
    def expected(self) -> np.ndarray | None:
        """(n,) expected raw answer under ``probs`` (A=5 ... E=1)."""
        if self.probs is None:
            return None
        return self.probs @ np.arange(5, 0, -1, dtype=self.probs.dtype)


@dataclass
class Candidates:
    """A method's answers under each value of a hyper-parameter it leaves to the evaluation
    (protocol=paper: PAS's alpha, which the reference code chooses on the test items). The
    method never sees the test answers: the evaluation chooses (:func:`palign.eval.metrics.
    select_on_test_items`), labels the row and tells the artifact (:meth:`Artifact.choose`)."""

    name: str
    values: list[float]
    answers: list[Answers]


@dataclass
class Artifact:
    """What aligning on one subject produced. Subclasses add fields and extend :meth:`save`.
    ``history``: per-step training metrics (one dict per optimiser step) of methods that train,
    sent to the run's logger."""

    case: int
    meta: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, float]] | None = None

    def choose(self, name: str, value: float) -> None:
        """Record the value of ``name`` the evaluation chose among :class:`Candidates`."""
        self.meta[name] = value

    def save(self, directory: Path) -> None:
        """Write the artifact into ``directory`` (created)."""
        import json

        directory.mkdir(parents=True, exist_ok=True)
        (directory / "artifact.json").write_text(
            json.dumps({"case": self.case, **self.meta}, indent=2)
        )


@dataclass
class MethodContext:
    """What the runner hands a method: the loaded data, and the scorer for LLM methods."""

    data: PapiData
    scorer: Scorer | None = None


class Method(ABC):
    """Base class of all methods. ``uses_llm`` tells the runner whether to load a model."""

    name: str = "method"
    uses_llm: bool = False
    #: How many subjects the runner hands :meth:`align_group` / :meth:`answer_group` at once
    #: (methods that batch subjects on the device set it above 1).
    subject_batch: int = 1
    #: Whether aligning chooses hyper-parameters by cross-validation on the alignment items
    #: (recorded as ``align_info.selection_score``, the objective of ``hparams_search``).
    selects_on_alignment_items: bool = False

    def setup(self, context: MethodContext) -> None:
        self.context = context

    @abstractmethod
    def align(self, subject: Subject, items: Sequence[Item]) -> Artifact:
        """Fit to ``subject``'s answers on ``items`` (the alignment items only)."""

    def teardown(self) -> None:
        """Undo what :meth:`setup` changed in shared objects (e.g. adapter layers in the model)."""
        return None

    def notes(self, rows: Sequence[dict]) -> list[str]:
        """Lines the report prints under the table (e.g. how hyper-parameters were chosen)."""
        return []

    @abstractmethod
    def answer(
        self, subject: Subject, artifact: Artifact, items: Sequence[Item]
    ) -> Answers | Candidates:
        """Answer ``items`` as ``subject`` would, using only ``artifact`` from ``subject`` (whose
        answers to ``items`` are hidden: reading them raises)."""

    def align_group(self, subjects: Sequence[Subject], items: Sequence[Item]) -> list[Artifact]:
        """:meth:`align` for each subject (a method that batches subjects overrides this)."""
        return [self.align(subject, items) for subject in subjects]

    def answer_group(
        self, subjects: Sequence[Subject], artifacts: Sequence[Artifact], items: Sequence[Item]
    ) -> list[Answers | Candidates]:
        """:meth:`answer` for each subject with its artifact (batched by methods that can)."""
        return [self.answer(s, a, items) for s, a in zip(subjects, artifacts, strict=True)]
