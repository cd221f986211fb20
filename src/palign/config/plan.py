"""A run's plan: what it evaluates, built from its config and checked before any work.

:func:`plan` loads the data in the protocol's coding, selects the subjects, builds the run's
method and its ``compare`` methods (every setting checked), and checks what they need
(``optimized_metric``; that the device is present when a method uses the LLM) and every other
configured value, whether or not a method uses it (:func:`check_values`); with a model served
over an API, that every method runs through prompts (:func:`check_hosted_methods`). The runner, the merge
of shards, the Python API and ``python -m palign``'s pre-check (before the run dir is made)
start from it; nothing here loads a model.
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from palign.config.build import build_methods, check_objective, select
from palign.data.papi import PapiData, Subject, load_papi
from palign.errors import ConfigError
from palign.eval.scoring import ScoringConfig, check_scoring
from palign.methods.base import Method
from palign.methods.prompting import PromptMethod
from palign.models.hosted import check_api_key, check_client, hosted_settings, is_hosted
from palign.models.loading import torch_dtype
from palign.models.placement import check_device, check_device_form, check_precision


@dataclass
class Plan:
    """``data``: the PAPI files in the protocol's coding; ``subjects``: the selected ones, in
    order; ``method``: the run's method; ``others``: its ``compare`` methods, in order."""

    data: PapiData
    subjects: list[Subject]
    method: Method
    others: list[Method]

    @property
    def methods(self) -> list[Method]:
        """The run's method, then the compared ones."""
        return [self.method, *self.others]

    @property
    def uses_llm(self) -> bool:
        """Whether any of the methods answers with the LLM (the model is loaded)."""
        return any(m.uses_llm for m in self.methods)


def plan(cfg: DictConfig, check_hardware: bool = True) -> Plan:
    """The plan of ``cfg`` (a composed run config), every part checked; ``check_hardware``:
    also the device and precision where a method uses the LLM (a merge of finished shards,
    which loads no model, leaves them out)."""
    check_values(cfg)
    data = load_papi(cfg.dataset.root, coding=cfg.protocol.coding)
    subjects = select(cfg, data)
    method, others = build_methods(cfg)
    check_objective(cfg, method)
    out = Plan(data, subjects, method, others)
    check_evaluation(cfg, out)
    if is_hosted(cfg.model):
        check_hosted_methods(cfg, out)
    for m in out.methods:
        m.check_inputs(data, str(cfg.model.name) if m.uses_llm else "")
    if check_hardware and out.uses_llm and not is_hosted(cfg.model):
        check_device(cfg.hardware.device)
    return out


def check_hosted_methods(cfg: DictConfig, checked: Plan) -> None:
    """A model served over an API (``model=openai``) answers only through prompts: a method
    that needs the weights (PAS, DPO, PPO, the population methods, any method whose class is
    not a prompting method but uses the LLM) is one error line; a run that uses the model needs
    the API key where OpenAI's API does."""
    choice = OmegaConf.select(cfg, "hydra.runtime.choices.model", default=None)
    if choice is None:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            choice = HydraConfig.get().runtime.choices.get("model")
    model = f"model={choice}" if choice else f"model {cfg.model.name}"
    for i, m in enumerate(checked.methods):
        if m.uses_llm and not isinstance(m, PromptMethod):
            key = f"method={m.name}" if i == 0 else f"compare[{i - 1}]={m.name}"
            raise ConfigError(
                f"{key} needs the model's weights; {model} (served over an API at "
                f"{cfg.model.base_url}) serves only prompting methods (no_change, few_shot, "
                "personality_prompt)"
            )
    if checked.uses_llm:
        check_client()
        check_api_key(hosted_settings(OmegaConf.to_container(cfg.model, resolve=True)))


EVALUATIONS = ("inventory", "open_ended")


def check_evaluation(cfg: DictConfig, checked: Plan) -> None:
    """``evaluation``: its values, and under ``evaluation=open_ended`` that every method can
    reply in free text (it answers through the run's scorer: :attr:`Method.replies`); one
    error line otherwise."""
    ev = cfg.get("evaluation") or {"name": "inventory"}
    name = ev.get("name")
    if name not in EVALUATIONS:
        raise ConfigError(f"evaluation.name={name!r} is not one of {EVALUATIONS}")
    if name != "open_ended":
        return
    if "{statement}" not in str(ev.get("prompt", "")):
        raise ConfigError(
            f"evaluation.prompt={ev.get('prompt')!r} must hold {{statement}} (the item's statement)"
        )
    if not isinstance(ev.get("max_new_tokens"), int) or ev.get("max_new_tokens") < 1:
        raise ConfigError(f"evaluation.max_new_tokens={ev.get('max_new_tokens')!r} must be >= 1")
    items = ev.get("items")
    if items is not None and (not isinstance(items, int) or items < 1):
        raise ConfigError(f"evaluation.items={items!r} must be null (all) or an integer >= 1")
    for i, m in enumerate(checked.methods):
        if not m.replies:
            key = f"method={m.name}" if i == 0 else f"compare[{i - 1}]={m.name}"
            raise ConfigError(
                f"{key} cannot reply in free text (evaluation=open_ended asks the methods that "
                "answer through the run's model: prompting, PAS, DPO, PPO and the population "
                "methods)",
                "use evaluation=inventory for it, or leave it out of compare",
            )


def check_values(cfg: DictConfig) -> None:
    """The values of a run that only the LLM's methods read, checked for every run (a value a
    method does not use is still a mistake to point out): ``scoring``, ``model.dtype``,
    ``hardware.precision`` and the form of ``hardware.device`` (whether that device is present
    is checked only where a method uses the LLM)."""
    check_scoring(ScoringConfig(**OmegaConf.to_container(cfg.scoring, resolve=True)))
    if is_hosted(cfg.model):  # every setting, and scoring.mode=logit needs logprobs
        settings = hosted_settings(OmegaConf.to_container(cfg.model, resolve=True))
        if cfg.scoring.mode == "logit" and not settings.logprobs:
            raise ConfigError(
                "scoring.mode=logit reads the option probabilities from the reply's "
                "top_logprobs, and model.logprobs=false asks for none: set model.logprobs=true "
                "or scoring.mode=generate"
            )
    if cfg.model.get("dtype") is not None:
        torch_dtype(cfg.model.dtype)
    check_precision(cfg.hardware.precision)
    check_device_form(str(cfg.hardware.device))
