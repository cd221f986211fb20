"""What a method costs, counted (not estimated): forward calls, tokens forwarded, tokens generated.

A :class:`CostMeter` is attached to a loaded model once; a forward pre-hook counts every forward
of the model, whoever calls it (the scorer, a LoRA wrapper, ``generate``, a training step).
Tokens forwarded are the ``input_ids`` the forward computes, padding included (rows x columns:
what the device works on; tokens served from a KV cache are not forwarded again). Generated
tokens are added by the code that decodes (greedy answers, PPO rollouts), through EOS.
Backward passes are not counted: a training step forwards its batch once and back-propagates it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Cost:
    """Counts since some start; subtract two snapshots for what happened in between."""

    forward_calls: int = 0
    tokens_forwarded: int = 0
    generated_tokens: int = 0

    def __sub__(self, other: Cost) -> Cost:
        return Cost(*(a - b for a, b in zip(self.astuple(), other.astuple())))

    def __truediv__(self, n: int) -> dict[str, float]:
        """Per-item shares, e.g. a subject's share of a batch of ``n`` subjects."""
        return {k: v / n for k, v in asdict(self).items()}

    def astuple(self) -> tuple[int, int, int]:
        return (self.forward_calls, self.tokens_forwarded, self.generated_tokens)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class CostMeter:
    """Counts the forwards of ``model`` (a forward pre-hook that stays for the model's life)."""

    def __init__(self, model: torch.nn.Module):
        self._calls = 0
        self._tokens = 0
        self._generated = 0
        self._handle = model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
            tokens = 0 if ids is None else ids.shape[0] * ids.shape[1]
        else:
            tokens = ids.numel()
        self._calls += 1
        self._tokens += int(tokens)

    def generated(self, tokens: int) -> None:
        """Record ``tokens`` newly generated tokens (by whoever decodes)."""
        self._generated += int(tokens)

    def snapshot(self) -> Cost:
        return Cost(self._calls, self._tokens, self._generated)


@dataclass(frozen=True)
class HostedCost:
    """What a model served over an API (:mod:`palign.models.hosted`) cost, counted since some
    start; subtract two snapshots for what happened in between.

    ``requests``: requests palign sent (each a billed call); ``cached``: replies read from the
    response cache instead (nothing sent); ``retries``: further HTTP attempts of a request the
    client retried (429, 5xx, timeouts: not billed); ``input_tokens`` and ``output_tokens``:
    as the server's ``usage`` reported them for the requests sent; ``cost_usd``: those tokens at
    ``model.price_input_per_mtok`` / ``price_output_per_mtok`` (0 without prices);
    ``malformed``: replies that were not a chat completion even after the retries (kept as
    unparseable answers); ``cut_short``: replies the ``max_tokens`` limit cut off before any
    answer letter (kept as unparseable answers)."""

    requests: int = 0
    cached: int = 0
    retries: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    malformed: int = 0
    cut_short: int = 0

    def __sub__(self, other: HostedCost) -> HostedCost:
        return HostedCost(*(a - b for a, b in zip(self.astuple(), other.astuple())))

    def __truediv__(self, n: int) -> dict[str, float]:
        """Per-item shares, e.g. a subject's share of a batch of ``n`` subjects."""
        return {k: v / n for k, v in asdict(self).items()}

    def astuple(self) -> tuple:
        return tuple(asdict(self).values())

    def to_dict(self) -> dict[str, float]:
        return asdict(self)
