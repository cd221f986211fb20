"""palign's configs: the schemas Hydra composes against (:mod:`palign.config.schema`), the
builders of models and methods from config nodes (:mod:`palign.config.build`), and a run's
checked plan (:mod:`palign.config.plan`)."""

from palign.config.build import build, build_method, build_methods, with_settings
from palign.config.plan import Plan, plan
from palign.config.schema import compose, register_all

__all__ = [
    "Plan",
    "build",
    "build_method",
    "build_methods",
    "compose",
    "plan",
    "register_all",
    "with_settings",
]
