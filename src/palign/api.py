"""palign from Python: load a model, build a method, align and evaluate one subject, keep the
result, without Hydra's app or a run dir.

    from palign import api

    data = api.load_data()                                  # PAPI, coded as protocol=clean reads it
    model = api.load_model("smollm2_135m")                  # conf/model/smollm2_135m.yaml
    pas = api.method("pas", data, api.scorer(model), top_k=8, alphas=[0, 2, 4])
    result = api.evaluate(pas, data.subjects[0], data)      # align on 120 items, answer 180
    result.score, result.answers                            # Score, every answer (a DataFrame)
    api.save(result.artifact, "profiles/case0")             # profile.json + profile.safetensors
    with api.applied(model, "profiles/case0"):              # the heads shifted for the block
        ...

Every default comes from the packaged configs (``palign/conf``, composed with Hydra's compose
API exactly as ``python -m palign`` composes them): ``load_model("x", key=value)`` is
``model=x model.key=value``, ``method("pas", ..., protocol="paper", top_k=8)`` is ``method=pas
protocol=paper method.top_k=8``, ``scorer(model, batch_size=4)`` is ``scoring.batch_size=4``.
:func:`evaluate` goes through the runner's own :func:`palign.runs.runner.evaluate_group`, so a subject's
numbers are those of a CLI run on it; the method sees only the subject's alignment answers.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf, open_dict

from palign import CONF_DIR
from palign.config import build, build_method, compose, with_settings
from palign.data.papi import PapiData, Subject, load_papi, select_subjects
from palign.errors import ArtifactError, ConfigError
from palign.eval.hosted import HostedScorer
from palign.eval.metrics import SubjectMetrics
from palign.eval.records import ResultRow
from palign.eval.scoring import Scorer, ScoringConfig
from palign.methods.base import Artifact, Method, MethodContext
from palign.methods.prompting import PromptMethod
from palign.models.hosted import HostedModel
from palign.models.loading import LoadedModel
from palign.models.placement import check_precision
from palign.pas.profile import PASProfile

__all__ = [
    "Evaluation",
    "align",
    "applied",
    "available",
    "evaluate",
    "load_data",
    "load_artifact",
    "load_model",
    "load_profile",
    "method",
    "save",
    "scorer",
]

#: The config groups whose options the API takes by name (``conf/<group>/<name>.yaml``).
GROUPS = ("model", "method", "protocol", "hardware")


# --- configs --------------------------------------------------------------------------------


def available(group: str) -> list[str]:
    """The names of the packaged configs of ``group`` (model, method, protocol, hardware, ...):
    the stems of ``conf/<group>/*.yaml``, sorted."""
    folder = CONF_DIR / group
    if not folder.is_dir():
        groups = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir())
        raise ConfigError(f"no config group {group!r} in {CONF_DIR} (groups: {', '.join(groups)})")
    return sorted(p.stem for p in folder.glob("*.yaml"))


def _check_name(group: str, name: object) -> str:
    """``name`` if ``conf/<group>/<name>.yaml`` exists, else a ConfigError naming the folder
    searched and the names there."""
    names = available(group)
    if not isinstance(name, str) or name not in names:
        raise ConfigError(
            f"unknown {group} {name!r}: no {name}.yaml in {CONF_DIR / group} "
            f"(available: {', '.join(names)})"
        )
    return name


def _compose(**choices: str) -> DictConfig:
    """``conf/config.yaml`` composed with ``<group>=<name>`` for each choice, as the CLI composes
    it (:func:`palign.config.compose`)."""
    return compose([f"{group}={_check_name(group, name)}" for group, name in choices.items()])


def _override(cfg: DictConfig, key: str, overrides: Mapping[str, Any], what: str) -> None:
    """Merge ``overrides`` into ``cfg[key]`` (:func:`palign.config.with_settings`)."""
    with open_dict(cfg):
        cfg[key] = with_settings(cfg[key], overrides, what)


# --- data, model, scorer, method --------------------------------------------------------------


def load_data(root: str | os.PathLike | None = None, protocol: str = "clean") -> PapiData:
    """The PAPI files in the response coding of ``protocol`` (``conf/protocol/<protocol>.yaml``:
    clean reads them ``keyed``, paper ``as_stored``). ``root``: the PAPI folder; None searches
    as the CLI does (``$PALIGN_DATA``, ``./data/papi``, ``../shared/papi``, the fetch cache).
    ``data.subjects``: the 300 subjects; ``data.inventory``: the 120 alignment (``train``) and
    180 test item numbers."""
    cfg = _compose(protocol=protocol)
    return load_papi(root if root is not None else cfg.dataset.root, coding=cfg.protocol.coding)


def load_model(
    name: str = "smollm2_135m", *, hardware: str = "cpu", **overrides
) -> LoadedModel | HostedModel:
    """The model of ``conf/model/<name>.yaml`` on ``hardware`` (``conf/hardware/``: cpu, gpu,
    multi_gpu: its device, dtype and environment), with ``overrides`` of the model config's
    settings (e.g. ``device="cuda:1"``, ``dtype="float32"``, tiny_llama's ``seed=3``). As the
    CLI, the hardware's ``env`` variables are set unless already set. Returns the model in eval
    mode with its tokenizer and ``name``; for ``openai`` (a model served over an API, e.g.
    ``load_model("openai", base_url="http://localhost:8000/v1", model="my-model")``) a
    :class:`~palign.models.hosted.HostedModel`."""
    cfg = _compose(model=name, hardware=hardware)
    _override(cfg, "model", overrides, f"model {name}")
    for key, value in (cfg.hardware.get("env") or {}).items():
        os.environ.setdefault(str(key), str(value))
    return build(cfg.model)


def _hardware_of(model: LoadedModel) -> str:
    return "gpu" if model.device.type == "cuda" else "cpu"


def scorer(
    model: LoadedModel | HostedModel,
    protocol: str = "clean",
    *,
    hardware: str | None = None,
    **overrides,
) -> Scorer | HostedScorer:
    """A :class:`Scorer` answering items with ``model`` as the CLI's would: config.yaml's
    ``scoring`` resolved under ``protocol`` (clean: logit scoring; paper: greedy generation
    parsed by the reference's rule) and ``hardware`` (batch size, Lightning precision; None:
    ``gpu`` for a model on a CUDA device, else ``cpu``), with ``overrides`` of its settings
    (:class:`~palign.eval.scoring.ScoringConfig`'s fields, e.g. ``batch_size=4``,
    ``mode="generate"``). A hosted model gets a :class:`~palign.eval.hosted.HostedScorer`
    (prompting methods only)."""
    if isinstance(model, HostedModel):  # api.load_model("openai", base_url=...)
        cfg = _compose(protocol=protocol, hardware=hardware or "cpu")
        _override(cfg, "scoring", overrides, "scorer")
        return HostedScorer(
            model, ScoringConfig(**OmegaConf.to_container(cfg.scoring, resolve=True))
        )
    cfg = _compose(protocol=protocol, hardware=hardware or _hardware_of(model))
    _override(cfg, "scoring", overrides, "scorer")
    config = ScoringConfig(**OmegaConf.to_container(cfg.scoring, resolve=True))
    return Scorer(model, config, precision=check_precision(cfg.hardware.precision))


def method(
    name: str,
    data: PapiData,
    scorer: Scorer | None = None,
    protocol: str = "clean",
    **overrides,
) -> Method:
    """The method of ``conf/method/<name>.yaml`` resolved under ``protocol`` (as ``method=<name>
    protocol=<protocol>``), with ``overrides`` of its settings (e.g. PAS's ``top_k=8``,
    ``alphas=[0, 2]``, ``folds=2``), built as the CLI builds it and set up on ``data`` and
    ``scorer`` (PAS records its contrastive head activations here; DPO/PPO wrap the model with
    their LoRA layers until ``method.teardown()``). ``scorer``: required by methods that use the
    LLM (:func:`scorer`), ignored by the statistical baselines. ``data`` must be in the
    protocol's coding (:func:`load_data` with the same ``protocol``)."""
    cfg = _compose(method=name, protocol=protocol)
    if data.coding != cfg.protocol.coding:
        raise ConfigError(
            f"protocol={protocol} reads the answers in coding {cfg.protocol.coding!r}; the data "
            f"were loaded in {data.coding!r} (load them with load_data(protocol={protocol!r}))"
        )
    _override(cfg, "method", overrides, f"method {name}")
    built: Method = build_method(cfg.method)
    if built.uses_llm and scorer is None:
        raise ConfigError(
            f"method {name} answers with the LLM: pass a scorer "
            "(api.method(name, data, api.scorer(api.load_model(...))))"
        )
    if built.uses_llm and isinstance(scorer, HostedScorer) and not isinstance(built, PromptMethod):
        raise ConfigError(
            f"method {name} needs the model's weights; a model served over an API serves only "
            "prompting methods (no_change, few_shot, personality_prompt)"
        )
    built.setup(MethodContext(data=data, scorer=scorer if built.uses_llm else None))
    return built


# --- one subject ------------------------------------------------------------------------------


@dataclass
class Evaluation:
    """One subject's evaluation.

    ``row``: the :class:`~palign.eval.records.ResultRow` the runner writes to
    ``results.jsonl``: the metrics (``mae``: trait -> mean absolute error on the raw 1..5 scale
    over the test items of the trait; ``score``: their sum, lower is better; ``unk_rate``:
    fraction of the 180 test items unanswered; ``answers``: option histogram with ``UNK``;
    ``n_scored``; ``model_means`` and ``subject_means``: keyed trait means, 1..5), ``timing``
    in seconds, ``align_info``, ``cost`` in forwards and tokens (answering with a given
    artifact: nothing is aligned, ``timing.align_s`` is about 0). ``answers``: every answer, one row per test item (and
    per candidate where the evaluation chose a hyper-parameter), columns of
    :mod:`palign.eval.answers`. ``artifact``: what aligning produced (PAS: ``.profile``)."""

    row: ResultRow
    answers: pd.DataFrame
    artifact: Artifact

    @property
    def metrics(self) -> SubjectMetrics:
        """The subject's metrics on the test items."""
        return self.row.metrics

    @property
    def score(self) -> float:
        """The Score: sum over the five traits of the mean absolute error (raw scale)."""
        return self.row.score


def _subject(subject: Subject | int, data: PapiData) -> Subject:
    """``subject``, or the subject of case id ``subject`` in ``data``."""
    if isinstance(subject, Subject):
        return subject
    return select_subjects(data.subjects, cases=[subject])[0]


def align(method: Method, subject: Subject | int, data: PapiData) -> Artifact:
    """Align ``method`` (:func:`method`) on ``subject`` (or its case id): it sees only the
    subject's answers to the 120 alignment items (any other raises
    :class:`~palign.data.papi.HiddenAnswerError`). Returns its artifact (PAS: a
    :class:`~palign.methods.pas.PASArtifact` with ``.profile``; DPO/PPO: an adapter)."""
    subject = _subject(subject, data)
    seen = subject.seen_only(data.inventory.train)
    return method.align_group([seen], data.inventory.train_items)[0]


def evaluate(
    method: Method, subject: Subject | int, data: PapiData, artifact: Artifact | None = None
) -> Evaluation:
    """Align ``method`` on ``subject`` (or its case id) and answer the 180 test items, scored
    against the subject's answers, through the runner's own code: the numbers are those of
    ``python -m palign`` on the same subject and config. With ``artifact`` (e.g. from
    :func:`align`), aligning is skipped and it answers with that one. Where the method leaves a
    hyper-parameter to the evaluation (protocol=paper: PAS's alpha), it is chosen on the test
    items, recorded in the artifact and labelled in ``row.selected_on_test_items``."""
    from palign.runs.runner import evaluate_group

    subject = _subject(subject, data)
    context = getattr(method, "context", None)
    meter = context.scorer.loaded.meter if context is not None and context.scorer else None
    given = None if artifact is None else [artifact]
    row, artifact, table = evaluate_group(method, [subject], data.inventory, meter, given)[0]
    return Evaluation(row, table, artifact)


# --- artifacts ---------------------------------------------------------------------------------


def save(artifact: Artifact, folder: str | os.PathLike) -> Path:
    """Write ``artifact`` into ``folder`` (created) as a run writes
    ``artifacts/<method>/<case>/``: ``artifact.json`` always; PAS adds ``profile.json`` +
    ``profile.safetensors`` (and ``head_accuracy.npy``), DPO/PPO a PEFT adapter
    (``adapter_config.json``, ``adapter_model.safetensors``, ``adapter.json``), prompting
    methods ``system_prompt.txt``. Returns the folder."""
    folder = Path(folder)
    artifact.save(folder)
    return folder


def _profile_stem(path: Path) -> Path | None:
    """The ``<stem>`` of a profile at ``path`` (an artifact folder, a stem, or either file)."""
    if path.is_dir():
        return path / "profile" if (path / "profile.json").is_file() else None
    stem = path.with_suffix("") if path.suffix in (".json", ".safetensors") else path
    return stem if stem.with_suffix(".json").is_file() else None


def load_profile(path: str | os.PathLike) -> PASProfile:
    """A saved PAS profile: an artifact folder holding ``profile.json`` (as :func:`save` and a
    run write it), or the profile's ``.json``, ``.safetensors`` or their common stem. Its
    heads: ``layer``, ``head`` (components,), unit ``direction`` (components, head_dim),
    ``sigma`` (components,), and ``alpha`` (None if not chosen)."""
    path = Path(path)
    stem = _profile_stem(path)
    if stem is None and path.is_dir():
        raise ArtifactError(
            f"{path}: holds no profile.json (expected a PAS artifact folder or profile file; "
            "a DPO/PPO folder holds adapter.json)"
        )
    return PASProfile.load(stem if stem is not None else path)


def load_artifact(path: str | os.PathLike) -> PASProfile | Artifact:
    """What :func:`applied` applies, from a path: a DPO/PPO adapter folder (holding
    ``adapter.json``) as an adapter artifact, else a PAS profile (:func:`load_profile`)."""
    from palign.methods.lora import AdapterArtifact

    if (Path(path) / "adapter.json").is_file():
        return AdapterArtifact.load(path)
    return load_profile(path)


@contextmanager
def applied(
    model: LoadedModel | Scorer,
    artifact: PASProfile | Artifact | str | os.PathLike,
    alpha: float | None = None,
) -> Iterator[LoadedModel]:
    """``model`` (or a scorer's model) aligned by ``artifact`` for the block, restored on exit:

    - a PAS profile (:class:`PASProfile`, a PAS artifact, or a path :func:`load_profile`
      reads): its heads shifted by ``alpha * sigma * direction`` at every position (``alpha``
      defaults to the profile's own; a per-trait profile's traits are summed), as
      ``python -m palign.cli.generate profile=...``;
    - a DPO/PPO adapter (an adapter artifact, or its saved folder holding ``adapter.json``): the
      LoRA weights active, as ``python -m palign.cli.generate adapter=...``.

    Either must have been made for this model (by name and shape). Given a :class:`Scorer`, the
    change goes through :meth:`Scorer.applied`, which drops its cached prompt prefix, so its
    answers inside the block are the aligned model's. Yields the :class:`LoadedModel`. Each
    artifact applies itself (``artifact.applied(model, alpha)``); a model that a DPO/PPO
    method still wraps must be released first (``method.teardown()``)."""
    chosen = model if isinstance(model, Scorer) else None
    loaded = chosen.loaded if chosen is not None else model
    if isinstance(artifact, str | os.PathLike):
        artifact = load_artifact(artifact)
    if not isinstance(artifact, PASProfile | Artifact):
        raise ArtifactError(
            f"applied: a {type(artifact).__name__} does not change the model (expected a PAS "
            "profile or artifact, a DPO/PPO adapter, or the path of one)"
        )
    change = artifact.applied(loaded, alpha)
    with chosen.applied(change) if chosen is not None else change:
        yield loaded
