"""The interface every alignment method implements.

A method is set up once per run (:meth:`Method.setup`), then for each subject it *aligns* on the
subject's alignment items (the 120 IPIP-NEO-120 answers), returning an :class:`Artifact`, and
*answers* items with that artifact. The runner never looks inside an artifact, so PAS
(interventions), DPO/PPO (adapters) and prompting methods (system prompts) plug in alike.

A method's settings are one dataclass beside it (:class:`MethodSettings`, named by the class's
``Settings``), in the style of TRL's ``DPOConfig`` beside ``DPOTrainer``: each field's type,
default, help and check in one place (:func:`setting`), shared settings inherited. The config
node Hydra composes for ``method=<name>`` is derived from it (:mod:`palign.config.schema`), and
``palign settings method=<name>`` lists it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from palign.data.papi import Item, PapiData, Subject
from palign.errors import ArtifactError, ConfigError
from palign.eval.answers import Answers
from palign.eval.records import ResultRow
from palign.methods.checks import Check

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from palign.eval.scoring import Scorer
    from palign.models.loading import LoadedModel


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

    def applied(self, loaded: LoadedModel, alpha: float | None = None) -> AbstractContextManager:
        """A context manager that aligns ``loaded.model`` as this artifact does for the block and
        restores it on exit (PAS: heads shifted; DPO/PPO: the adapter active). An artifact that
        does not change the model (a system prompt, trait means) raises ArtifactError."""
        raise ArtifactError(
            f"a {type(self).__name__} does not change the model (a PAS profile or a DPO/PPO "
            "adapter does)"
        )

    def save(self, directory: Path) -> None:
        """Write the artifact into ``directory`` (created)."""
        import json

        directory.mkdir(parents=True, exist_ok=True)
        (directory / "artifact.json").write_text(
            json.dumps({"case": self.case, **self.meta}, indent=2)
        )


@dataclass
class MethodContext:
    """What the runner hands a method: the loaded data, the scorer for LLM methods, and the
    run's folder for what a population method trains once per run (``artifacts/<method>/
    population/``; None without a run dir)."""

    data: PapiData
    scorer: Scorer | None = None
    population_dir: Path | None = None


def setting(
    default: Any = MISSING,
    help: str = "",
    check: Check | None = None,
    follows: str | None = None,
) -> Any:
    """A field of a :class:`MethodSettings` dataclass: its ``default`` (a list is copied per
    instance), ``help`` (what ``palign settings`` shows), ``check`` (one of
    :mod:`palign.methods.checks`' rules: it returns the plain value or raises one error line
    naming ``method.<field>``) and, where a run's config supplies the default, the config key it
    ``follows`` (``seed``, ``hardware.precision``, ``protocol.pas.split``)."""
    metadata = {"help": help, "check": check, "follows": follows}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def redefault(settings: type[MethodSettings], name: str, default: Any) -> Any:
    """The field ``name`` of ``settings`` with another ``default`` (help and check inherited),
    for a subclass whose method has its own default (PPO's learning rate)."""
    inherited = settings.__dataclass_fields__[name].metadata
    return setting(default, inherited["help"], inherited["check"], inherited["follows"])


def shared(settings: type[MethodSettings], name: str, **changes: Any) -> Any:
    """The field ``name`` of another method's ``settings`` (its default, help, check and the
    key it follows), for a method that shares the setting without subclassing the settings;
    ``changes`` replace some of them (``help=...``)."""
    f = settings.__dataclass_fields__[name]
    values = {
        "default": settings.default_of(f),
        **{k: f.metadata[k] for k in ("help", "check", "follows")},
        **changes,
    }
    return setting(**values)


@dataclass
class MethodSettings:
    """A method's settings (none here: subclasses add fields made with :func:`setting`).

    Building one checks every field in declaration order (each field's ``check``, which also
    turns config values such as ``ListConfig`` into plain Python ones), then :meth:`check_all`
    (rules between fields). A failed check raises ``error`` (:class:`ConfigError`, or the
    method's own subclass of it) with one line: ``method.steps=0: must be an integer >= 1``."""

    error: ClassVar[type[ConfigError]] = ConfigError

    def __post_init__(self) -> None:
        for f in fields(self):
            rule = f.metadata.get("check")
            if rule is not None:
                setattr(self, f.name, rule(f.name, getattr(self, f.name), self.error))
        self.check_all()

    def check_all(self) -> None:
        """Rules between fields (after each field passed its own check)."""

    @classmethod
    def described(cls) -> list[tuple[Field, str]]:
        """Each field with its type as written, for ``palign settings``."""
        return [(f, f.type if isinstance(f.type, str) else f.type.__name__) for f in fields(cls)]

    @classmethod
    def default_of(cls, f: Field) -> Any:
        """The default of field ``f`` (MISSING where it has none)."""
        if f.default_factory is not MISSING:
            return f.default_factory()
        return f.default


class Method(ABC):
    """Base class of all methods. ``uses_llm`` tells the runner whether to load a model.

    ``Settings`` is the method's settings dataclass: ``Method(**values)`` checks ``values``
    through it (an unknown name is one error line listing the settings) and keeps the result
    as ``self.settings``; each setting is also an attribute of the method (``self.top_k``)."""

    name: str = "method"
    Settings: ClassVar[type[MethodSettings]] = MethodSettings
    uses_llm: bool = False
    #: How many subjects the runner hands :meth:`align_group` / :meth:`answer_group` at once
    #: (methods that batch subjects on the device set it above 1).
    subject_batch: int = 1
    #: Whether aligning chooses hyper-parameters by cross-validation on the alignment items
    #: (recorded as ``align_info.selection_score``, the objective of ``hparams_search``).
    selects_on_alignment_items: bool = False
    #: Whether :meth:`answer_group` answers only through the run's scorer (``scorer.score``
    #: under a system prompt, with ``scorer.applied`` changes), so that under
    #: ``evaluation=open_ended`` it replies in free text (``scorer.replies``).
    replies: bool = False

    def __init__(self, **values: Any):
        known = [f.name for f in fields(self.Settings)]
        unknown = [k for k in values if k not in known]
        if unknown:
            raise ConfigError(
                f"method.{unknown[0]}: {type(self).__name__} has no setting {unknown[0]!r} "
                f"(settings: {', '.join(known) or 'none'})"
            )
        self.settings = self.Settings(**values)
        for f in fields(self.settings):
            setattr(self, f.name, getattr(self.settings, f.name))

    def check_inputs(self, data: PapiData, model: str) -> None:
        """What the method can check before any work, beyond its settings, given the data and
        the model's name (e.g. a population's rows, a folder of an earlier run): a bad input
        raises one error line, before the run dir is made or the model loaded."""
        return None

    def setup(self, context: MethodContext) -> None:
        self.context = context

    @abstractmethod
    def align(self, subject: Subject, items: Sequence[Item]) -> Artifact:
        """Fit to ``subject``'s answers on ``items`` (the alignment items only)."""

    def population_curves(self) -> dict[str, list[dict[str, float]]]:
        """What a population method trained once per run, by part (an expert's name, ``adapter``):
        its training curve, one dict per optimiser step, for the run's logger. None trained: {}."""
        return {}

    def teardown(self) -> None:
        """Undo what :meth:`setup` changed in shared objects (e.g. adapter layers in the model)."""
        return None

    def notes(self, rows: Sequence[ResultRow]) -> list[str]:
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
