"""Prompting methods: the subject is conveyed to an unchanged LLM through its system prompt."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from palign.data.papi import Item, PapiDataError, Subject
from palign.eval.prompts import NEUTRAL_SYSTEM_PROMPT, few_shot_system_prompt
from palign.methods.base import Answers, Artifact, Method


@dataclass
class PromptArtifact(Artifact):
    """The system prompt under which the model answers as the subject."""

    system_prompt: str = ""

    def save(self, directory: Path) -> None:
        super().save(directory)
        (directory / "system_prompt.txt").write_text(self.system_prompt, encoding="utf-8")


class PromptMethod(Method):
    """Answers with the run's scorer under the system prompt built by :meth:`system_prompt`."""

    uses_llm = True
    replies = True

    def system_prompt(self, subject: Subject, items: Sequence[Item]) -> str:
        raise NotImplementedError

    def align(self, subject: Subject, items: Sequence[Item]) -> PromptArtifact:
        return PromptArtifact(case=subject.case, system_prompt=self.system_prompt(subject, items))

    def answer(self, subject: Subject, artifact: PromptArtifact, items: Sequence[Item]) -> Answers:
        return self.context.scorer.score(artifact.system_prompt, items)


class NoChange(PromptMethod):
    """The model as it is, under a neutral system prompt (ignores the subject)."""

    name = "no_change"

    def system_prompt(self, subject: Subject, items: Sequence[Item]) -> str:
        return NEUTRAL_SYSTEM_PROMPT


class FewShot(PromptMethod):
    """The subject's alignment answers, as ``statement: label`` lines, in the system prompt."""

    name = "few_shot"

    def system_prompt(self, subject: Subject, items: Sequence[Item]) -> str:
        return few_shot_system_prompt(items, subject.answers([it.number for it in items]))


class PersonalityPrompt(PromptMethod):
    """P^2: the subject's personality description (``personality_prompt.json``) as system prompt,
    as published. The descriptions were written from the stored answers read as raw ones, so
    under ``coding=keyed`` (protocol=clean) they describe the reverse-keyed alignment items the
    wrong way round; :meth:`notes` labels the report."""

    name = "personality_prompt"

    def notes(self, rows: Sequence[dict]) -> list[str]:
        if self.context.data.coding == "as_stored":
            return []
        inventory = self.context.data.inventory
        reverse = sum(it.key < 0 for it in inventory.train_items)
        return [
            "personality_prompt (P^2) is BUILT ON MIS-KEYED DESCRIPTIONS under this protocol: "
            "the published personality_prompt.json texts were written from the stored answers "
            f"read as raw ones, so for the {reverse} reverse-keyed of the "
            f"{len(inventory.train_items)} alignment items they describe the subject's answer the "
            "wrong way round, while this protocol decodes them (coding=keyed). Used as published."
        ]

    def system_prompt(self, subject: Subject, items: Sequence[Item]) -> str:
        if not subject.persona:
            raise PapiDataError(
                f"method=personality_prompt: no text for case {subject.case}; "
                "personality_prompt.json is missing from the PAPI folder"
            )
        return subject.persona
