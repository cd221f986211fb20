"""Item prompts of the paper, rendered through a model's chat template.

A prompt is (system, user, assistant prefix). With a chat template the assistant turn is opened
(generation prompt) and the prefix is appended, i.e. the assistant's answer is prefilled; without
one a plain-text layout is used.
"""

from __future__ import annotations

from collections.abc import Sequence

from palign.constants import ANSWER_LABELS
from palign.data.papi import Item

NEUTRAL_SYSTEM_PROMPT = "You are a helpful, honest and concise assistant."

#: The inventory question of the paper (after the MPI benchmark); ``{item}`` is the statement.
ITEM_TEMPLATE = (
    'Given a statement of you: "You {item}."\n'
    "Please choose from the following options to identify how accurately this statement "
    "describes you.\n"
    "Options:\n"
    "(A). Very Accurate\n"
    "(B). Moderately Accurate\n"
    "(C). Neither Accurate Nor Inaccurate\n"
    "(D). Moderately Inaccurate\n"
    "(E). Very Inaccurate\n"
)

#: The reference code's few-shot preamble; the subject's answers follow, ';'-separated.
FEW_SHOT_PREAMBLE = "Here are some of your behaviors and your level of recognition towards them"


def item_statement(item: Item, strip_period: bool = True) -> str:
    """The item lower-cased, without its final period: 'Worry about things.' -> 'worry about
    things'. ``strip_period=False`` keeps it, as the reference code does (its questions then
    read "You worry about things..")."""
    text = item.text.strip().lower()
    return text.rstrip(".") if strip_period else text


def item_question(item: Item, strip_period: bool = True) -> str:
    """The inventory question about ``item`` (see :func:`item_statement`)."""
    return ITEM_TEMPLATE.format(item=item_statement(item, strip_period))


def reply_question(prompt: str, item: Item, strip_period: bool = True) -> str:
    """The open-ended question ``prompt`` about ``item`` (``{statement}``: its statement, as
    written in the inventory, e.g. "Worry about things")."""
    text = item.text.strip()
    return prompt.replace("{statement}", text.rstrip(".") if strip_period else text)


def asked_question(item: Item, reply_prompt: str | None, strip_period: bool = True) -> str:
    """What a scorer asks about ``item``: the open-ended ``reply_prompt`` (while it collects
    replies, :func:`reply_question`), else the inventory question (:func:`item_question`)."""
    if reply_prompt is not None:
        return reply_question(reply_prompt, item, strip_period)
    return item_question(item, strip_period)


def reference_contrastive_question(item: Item) -> str:
    """The question of the reference code's contrastive (A/E) prompts: the statement as printed,
    neither lower-cased nor stripped ("You Worry about things..")."""
    return ITEM_TEMPLATE.format(item=item.text.strip())


def few_shot_system_prompt(items: Sequence[Item], answers: Sequence[int]) -> str:
    """The subject's alignment answers as the reference code shows them: the preamble, then
    ``statement:label`` for each item, all joined by ';' (a missing answer shows as
    'Unknown')."""
    pairs = [
        f"{it.text.strip()}:{ANSWER_LABELS[int(a)]}" for it, a in zip(items, answers, strict=True)
    ]
    return ";".join([FEW_SHOT_PREAMBLE, *pairs])


def trait_levels_system_prompt(levels: str) -> str:
    """Prompt-MORL's preference in the prompt: a person described by their Big Five levels
    (``levels``: e.g. ``Agreeableness 3.2 of 5, ...``; palign's wording, as the method's papers
    publish none for PAPI)."""
    return (
        "You are a person whose Big Five personality trait levels, on a scale from 1 (very low) "
        f"to 5 (very high), are: {levels}. Answer every statement as this person would."
    )


class PromptRenderer:
    """Renders (system, user, assistant prefix) to text for one tokenizer.

    Uses the tokenizer's chat template when it has one (a template that rejects the system role
    gets the system text prepended to the user turn), else a plain ``System:/User:/Assistant:``
    layout. ``add_special_tokens`` tells how to tokenize the rendered text: chat templates
    already contain BOS where the model needs it.
    """

    def __init__(self, tokenizer, use_chat_template: bool = True):
        self.tokenizer = tokenizer
        self.chat = bool(use_chat_template and getattr(tokenizer, "chat_template", None))
        self.add_special_tokens = not self.chat
        self._system_role = True

    def render(self, system: str, user: str, assistant_prefix: str = "") -> str:
        if not self.chat:
            head = f"System: {system}\n\n" if system else ""
            return f"{head}User: {user}\n\nAssistant: {assistant_prefix}"
        if self._system_role:
            try:
                text = self._apply(
                    [{"role": "system", "content": system}, {"role": "user", "content": user}]
                )
                return text + assistant_prefix
            except Exception:  # jinja raises TemplateError for templates without a system role
                self._system_role = False
        merged = f"{system}\n\n{user}" if system else user
        return self._apply([{"role": "user", "content": merged}]) + assistant_prefix

    def _apply(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=self.add_special_tokens)["input_ids"]
