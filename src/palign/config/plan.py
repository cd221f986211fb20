"""A run's plan: what it evaluates, built from its config and checked before any work.

:func:`plan` loads the data in the protocol's coding, selects the subjects, builds the run's
method and its ``compare`` methods (every setting checked), and checks what they need
(``optimized_metric``; that the device is present when a method uses the LLM) and every other
configured value, whether or not a method uses it (:func:`check_values`). The runner, the merge
of shards, the Python API and ``python -m palign``'s pre-check (before the run dir is made)
start from it; nothing here loads a model.
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from palign.config.build import build_methods, check_objective, select
from palign.data.papi import PapiData, Subject, load_papi
from palign.eval.scoring import ScoringConfig, check_scoring
from palign.methods.base import Method
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
    for m in out.methods:
        m.check_inputs(data, str(cfg.model.name) if m.uses_llm else "")
    if check_hardware and out.uses_llm:
        check_device(cfg.hardware.device)
    return out


def check_values(cfg: DictConfig) -> None:
    """The values of a run that only the LLM's methods read, checked for every run (a value a
    method does not use is still a mistake to point out): ``scoring``, ``model.dtype``,
    ``hardware.precision`` and the form of ``hardware.device`` (whether that device is present
    is checked only where a method uses the LLM)."""
    check_scoring(ScoringConfig(**OmegaConf.to_container(cfg.scoring, resolve=True)))
    if cfg.model.get("dtype") is not None:
        torch_dtype(cfg.model.dtype)
    check_precision(cfg.hardware.precision)
    check_device_form(str(cfg.hardware.device))
