"""Open-ended replies of a model with and without an alignment applied (``palign generate``)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from palign import stopping
from palign.eval.prompts import PromptRenderer
from palign.models.loading import LoadedModel


class SafePointPerToken(StoppingCriteria):
    """A safe point of the stop policy (:func:`palign.stopping.check`) after every generated
    token; it never ends a generation itself."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        stopping.check()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def generate_pair(
    loaded: LoadedModel,
    applied: Callable[[], AbstractContextManager],
    prompt: str,
    system_prompt: str,
    max_new_tokens: int = 80,
    do_sample: bool = False,
    temperature: float = 0.7,
    seed: int = 0,
) -> tuple[str, str]:
    """(without, with) the alignment that ``applied()`` puts in place: the model's replies. A
    requested stop ends it after the token in flight (:class:`SafePointPerToken`)."""
    renderer = PromptRenderer(loaded.tokenizer)
    device = next(loaded.model.parameters()).device
    ids = torch.tensor([renderer.encode(renderer.render(system_prompt, prompt))], device=device)
    settings = dict(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        pad_token_id=loaded.tokenizer.pad_token_id,
        stopping_criteria=StoppingCriteriaList([SafePointPerToken()]),
        **({"temperature": temperature} if do_sample else {}),
    )
    replies = []
    for aligned in (False, True):
        stopping.check(f"{len(replies)} of 2 replies")
        torch.manual_seed(seed)
        with torch.no_grad(), applied() if aligned else nullcontext():
            out = loaded.model.generate(ids, **settings)
        replies.append(
            loaded.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
        )
    return replies[0], replies[1]
