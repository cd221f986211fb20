"""Shared mechanics of batched causal-LM forwards: left padding, position ids, log-prob gathering.

Every forward in palign (scoring, activation collection, DPO, PPO) batches token sequences of
different lengths by padding them on the *left*, so that all rows end in the same column: the
next-token logits of every row are in the last column, and a completion's tokens are the last
columns. Positions then count real tokens only, so a padded row sees the same positions as the
same row alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def left_pad(
    sequences: Sequence[Sequence[int]],
    pad_id: int,
    width: int | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``ids`` (B, W) with each sequence right-aligned after ``pad_id`` padding, and its
    ``mask`` (B, W), 1 on real tokens. ``width`` defaults to the longest sequence."""
    width = max(len(s) for s in sequences) if width is None else width
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if len(seq):
            ids[row, width - len(seq) :] = torch.as_tensor(list(seq), dtype=torch.long)
            mask[row, width - len(seq) :] = 1
    return ids.to(device), mask.to(device)


def position_ids(mask: torch.Tensor, start: int = 0) -> torch.Tensor:
    """(B, W) positions of left-padded rows: ``start`` at each row's first real token, counting
    real tokens only; padding columns get ``start`` (they are masked out anyway). ``start``:
    the length of a cached prefix the rows continue."""
    return (start + mask.cumsum(-1) - 1).clamp(min=start)


def last_token_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    n: int,
    hidden: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probabilities (B, n) float32 of each row's last ``n`` tokens given what precedes
    them, in one forward of left-padded rows; with ``hidden``, also the last layer's hidden
    states (B, n, hidden) at the positions that predict them (for a value head).

    Only the logits of the last ``n + 1`` positions are computed: the vocabulary projection of
    the prompt positions would dominate the cost. Results are on the inputs' device (a model
    spread over GPUs may end on another).
    """
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
        logits_to_keep=n + 1,
        output_hidden_states=hidden,
    )
    logits = out.logits[:, :-1].float()
    targets = input_ids[:, -n:, None].to(logits.device)
    logp = torch.log_softmax(logits, -1).gather(-1, targets)[..., 0].to(input_ids.device)
    states = out.hidden_states[-1][:, -(n + 1) : -1].float() if hidden else None
    return logp, None if states is None else states.to(input_ids.device)
