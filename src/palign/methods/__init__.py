"""Alignment methods behind one interface (see :mod:`palign.methods.base`)."""

from palign.methods.base import (
    Answers,
    Artifact,
    Method,
    MethodContext,
    MethodSettings,
    setting,
)
from palign.methods.prompting import FewShot, NoChange, PersonalityPrompt
from palign.methods.statistical import BASELINES, Constant, ItemMean, TraitMean

__all__ = [
    "Answers",
    "Artifact",
    "BASELINES",
    "Constant",
    "FewShot",
    "ItemMean",
    "Method",
    "MethodContext",
    "MethodSettings",
    "NoChange",
    "PersonalityPrompt",
    "TraitMean",
    "setting",
]
