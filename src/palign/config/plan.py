"""A run's plan: what it evaluates, built from its config and checked before any work.

:func:`plan` loads the data in the protocol's coding, selects the subjects, builds the run's
method and its ``compare`` methods (every setting checked), and checks what they need
(``optimized_metric``; the device and precision when a method uses the LLM). The runner, the
merge of shards and the Python API start from it; nothing here loads a model.
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig

from palign.config.build import build_methods, check_objective, select
from palign.data.papi import PapiData, Subject, load_papi
from palign.methods.base import Method
from palign.models.placement import check_device, check_precision


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
    data = load_papi(cfg.dataset.root, coding=cfg.protocol.coding)
    subjects = select(cfg, data)
    method, others = build_methods(cfg)
    check_objective(cfg, method)
    out = Plan(data, subjects, method, others)
    if check_hardware and out.uses_llm:
        check_device(cfg.hardware.device)
        check_precision(cfg.hardware.precision)
    return out
