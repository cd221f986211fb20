"""Answering inventory items with a model served over an OpenAI-compatible chat API.

:class:`HostedScorer` has the public interface the prompting methods use of a
:class:`~palign.eval.scoring.Scorer` (``score(system_prompt, items) -> Answers``, ``question``,
``config``, ``applied``), over a :class:`~palign.models.hosted.HostedModel`: one request per
item, the system prompt and the item's question as messages (nothing prefilled: chat APIs do
not continue an assistant turn).

- ``scoring.mode=generate``: the reply's text is parsed by palign's rules
  (:func:`~palign.eval.scoring.parse_answer`: ``scoring.parse`` in its first
  ``scoring.parse_window`` characters), e.g. "Option (B). Moderately Accurate" reads as B;
- ``scoring.mode=logit``: the same answer letter is located in the reply, and the option
  probabilities are the ``top_logprobs`` the server returned at that token (each option's
  tokens, e.g. "B", " B", "(B", summed, then normalised over A..E); the answer is their argmax.
  A server that returns no logprobs is one error line at its first reply (use
  ``scoring.mode=generate``).

An answer that cannot be read (no letter, a reply cut short by ``model.max_tokens``, a reply
that was not a chat completion) is kept as 0 (unparseable) and counted; in logit mode its
probabilities are empty (NaN). The reply texts are kept in the answers files in both modes.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import replace

import numpy as np

from palign.constants import LETTER_SCORE, OPTION_LETTERS, UNPARSED
from palign.data.papi import Item
from palign.errors import ModelError
from palign.eval.answers import Answers
from palign.eval.prompts import asked_question
from palign.eval.scoring import (
    ScoringConfig,
    ScoringError,
    answer_match,
    check_scoring,
)
from palign.models.hosted import HostedModel, Reply

#: Characters stripped around a token before it is read as an option letter ("(B", " B.").
_AROUND_LETTER = " \t\n()[]*.:'\""


class HostedScorer:
    """Answers items with a hosted model (see the module's doc). ``loaded``: the
    :class:`HostedModel` (its ``meter`` counts requests, tokens and USD)."""

    def __init__(self, model: HostedModel, config: ScoringConfig | None = None):
        self.loaded = model
        self.config = check_scoring(config or ScoringConfig())
        self._reply_prompt: str | None = None
        if self.config.mode == "logit" and not model.settings.logprobs:
            raise ScoringError(
                "scoring.mode=logit reads the option probabilities from the reply's "
                "top_logprobs, and model.logprobs=false asks for none: set model.logprobs=true "
                "or scoring.mode=generate"
            )

    @property
    def logit(self) -> bool:
        return self.config.mode == "logit"

    def question(self, item: Item) -> str:
        """The inventory question about ``item`` as this scorer asks it (inside
        :meth:`replies`: the open-ended question)."""
        return asked_question(item, self._reply_prompt, self.config.strip_period)

    @contextmanager
    def replies(self, prompt: str, max_new_tokens: int):
        """For the block, :meth:`score` asks ``prompt`` about each item and returns the free
        replies (``max_tokens=max_new_tokens``, no logprobs; as
        :meth:`palign.eval.scoring.Scorer.replies`)."""
        saved = (self.config, self.loaded.settings)
        self.config = replace(self.config, mode="generate")
        self.loaded.settings = replace(saved[1], max_tokens=max_new_tokens)
        self._reply_prompt = prompt
        try:
            yield self
        finally:
            self.config, self.loaded.settings = saved
            self._reply_prompt = None

    def applied(self, *changes):
        """A hosted model's weights cannot be changed: always an error."""
        raise ModelError(
            f"model {self.loaded.name} is served over an API (model.base_url="
            f"{self.loaded.settings.base_url}): there are no weights to change; only prompting "
            "methods (no_change, few_shot, personality_prompt) run on it"
        )

    def messages(self, system_prompt: str, item: Item) -> list[dict[str, str]]:
        """The chat messages of one item's request."""
        return [
            {"role": "system", "content": system_prompt},
            {"role": "user", "content": self.question(item)},
        ]

    def score(
        self,
        system_prompt: str,
        items: Sequence[Item],
        variants: Sequence[int] | None = None,
        n_variants: int = 1,
    ) -> Answers:
        """Answer ``items`` under ``system_prompt``: one request each (see the module's doc)."""
        if n_variants != 1:
            self.applied()
        replies = self.loaded.complete_all(
            [self.messages(system_prompt, it) for it in items],
            logprobs=self.logit,
            desc=f"{self.loaded.name} {self.config.mode} {len(items)} items",
        )
        if self._reply_prompt is not None:  # open-ended replies: the text only
            return Answers(
                scores=np.zeros(len(replies), dtype=np.int64),
                texts=[r.text.strip() for r in replies],
            )
        scores = np.zeros(len(replies), dtype=np.int64)
        probs = np.full((len(replies), len(OPTION_LETTERS)), np.nan) if self.logit else None
        cut_short = 0
        for i, reply in enumerate(replies):
            scores[i], row = self._read(reply)
            if probs is not None and row is not None:
                probs[i] = row
            if scores[i] == UNPARSED and reply.finish_reason == "length":
                cut_short += 1
        if cut_short:
            self.loaded.meter.add(cut_short=cut_short)
        return Answers(scores=scores, probs=probs, texts=[r.text for r in replies])

    def _read(self, reply: Reply) -> tuple[int, np.ndarray | None]:
        """The raw answer of ``reply`` (0: unparseable) and, in logit mode, its option
        probabilities (None where no answer letter was found)."""
        c = self.config
        match = answer_match(reply.text, c.parse_window, c.parse)
        if match is None:
            return UNPARSED, None
        if not self.logit:
            return LETTER_SCORE[match.group()[0].upper()], None
        probs = letter_probs(reply.tokens, match.start())
        if probs is None:
            return LETTER_SCORE[match.group()[0].upper()], None
        return 5 - int(np.argmax(probs)), probs


def letter_probs(tokens: Sequence[dict], position: int) -> np.ndarray | None:
    """The option probabilities (A..E, normalised) at the reply token that holds character
    ``position`` of the reply text: its ``top_logprobs`` (and its own log-probability) read as
    option letters; None when the tokens do not reach ``position`` or name no option there."""
    start = 0
    for token in tokens:
        end = start + len(token["token"])
        if start <= position < end:
            mass = np.zeros(len(OPTION_LETTERS))
            seen = set()
            for alt in [*token["top_logprobs"], token]:
                text = alt["token"].strip(_AROUND_LETTER).upper()
                if text in OPTION_LETTERS and alt["token"] not in seen:
                    seen.add(alt["token"])
                    mass[OPTION_LETTERS.index(text)] += float(np.exp(alt["logprob"]))
            return mass / mass.sum() if mass.sum() > 0 else None
        start = end
    return None
