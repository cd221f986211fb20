"""Attention heads as data: where they are in a model, and shifting their outputs.

A head's output is its slice of the input of the attention output projection (``o_proj``):
``input[..., h * head_dim:(h + 1) * head_dim]``. Shifting it is a forward pre-hook on ``o_proj``
(works for any weight format, 4-bit included), or, equivalently, folding ``W_O @ shift`` into
``o_proj``'s bias (a plain model that needs no hooks).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from palign.errors import PASError

_ATTENTION = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn$")


@dataclass
class HeadLayout:
    """The attention heads of a decoder: ``o_projs[l]`` is layer ``l``'s output projection."""

    n_layers: int
    n_heads: int
    head_dim: int
    o_projs: list[nn.Module]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(layers, heads, head_dim)."""
        return (self.n_layers, self.n_heads, self.head_dim)


def head_layout(model: nn.Module) -> HeadLayout:
    """Locate every layer's attention output projection by module structure.

    Works for decoders whose attention blocks are ``...layers.<i>.self_attn`` with an ``o_proj``
    (Llama, Mistral, Qwen2, Gemma 3, ...). Uses ``config.head_dim`` when present (Gemma 3 has
    head_dim != hidden_size / heads); grouped-query attention does not change the o_proj input.
    """
    config = (
        model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    )
    n_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    found: dict[int, nn.Module] = {}
    for name, module in model.named_modules():
        match = _ATTENTION.search(name)
        if match and isinstance(getattr(module, "o_proj", None), nn.Module):
            found[int(match.group(1))] = module.o_proj
    if not found:
        raise PASError(
            f"{type(model).__name__}: no attention output projections found (PAS expects modules "
            "named '...layers.<i>.self_attn.o_proj', as in Llama, Mistral, Qwen2 and Gemma 3)"
        )
    if sorted(found) != list(range(len(found))):
        raise PASError(f"{type(model).__name__}: attention layers {sorted(found)} are not 0..n-1")
    o_projs = [found[i] for i in range(len(found))]
    width = getattr(o_projs[0], "in_features", n_heads * head_dim)
    if width != n_heads * head_dim:
        raise PASError(
            f"{type(model).__name__}: o_proj takes {width} inputs, not heads x head_dim = "
            f"{n_heads} x {head_dim}"
        )
    return HeadLayout(len(o_projs), n_heads, head_dim, o_projs)


class HeadShift:
    """Adds per-layer shifts to head outputs through forward pre-hooks on ``o_proj``, while
    entered as a context manager (``with HeadShift(...)``, or ``scorer.applied(HeadShift(...))``
    for per-row variants); the model is unchanged after exit.

    ``shifts``: (variants, layers, heads * head_dim), zero where a head is not shifted. Each
    shifted layer's slice is copied once, on entry, to its ``o_proj``'s device. Told each row's
    variant (:meth:`listen`, e.g. one variant per alpha or per subject), every row gets its own
    shift; otherwise variant 0 applies to every row.
    """

    def __init__(self, layout: HeadLayout, shifts: torch.Tensor):
        if shifts.dim() != 3 or tuple(shifts.shape[1:]) != (
            layout.n_layers,
            layout.n_heads * layout.head_dim,
        ):
            raise PASError(f"shifts of shape {tuple(shifts.shape)} do not fit heads {layout.shape}")
        self.layout = layout
        self.shifts = shifts
        self.rows: torch.Tensor | None = None
        self._handles: list = []

    def listen(self, stage: str, variant: torch.Tensor) -> None:
        self.rows = variant

    def _hook(self, shift: torch.Tensor):
        """``shift``: (variants, heads * head_dim) on the layer's device."""
        cast: dict[torch.dtype, torch.Tensor] = {}

        def pre_hook(module, args):
            x = args[0]
            if x.dtype not in cast:
                cast[x.dtype] = shift.to(x.dtype)
            add = cast[x.dtype]
            if self.rows is None or add.shape[0] == 1:
                add = add[0]
            else:
                add = add.index_select(0, self.rows.to(x.device))[:, None, :]
            return (x + add, *args[1:])

        return pre_hook

    def __enter__(self) -> HeadShift:
        active = self.shifts.abs().amax(dim=(0, 2)) > 0
        for layer in torch.nonzero(active).flatten().tolist():
            proj = self.layout.o_projs[layer]
            shift = self.shifts[:, layer].to(proj.weight.device)
            self._handles.append(proj.register_forward_pre_hook(self._hook(shift)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.rows = None


def _dense_weight(proj: nn.Module) -> torch.Tensor:
    """``proj``'s weight (out, in) as a dense float tensor; 4-bit bitsandbytes weights dequantised."""
    weight = proj.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, quant_state).float()
    return weight.detach().float()


@torch.no_grad()
def fold_into_bias(
    layout: HeadLayout, shift: torch.Tensor
) -> list[tuple[nn.Module, torch.Tensor | None]]:
    """Add ``W_O @ shift[l]`` to every shifted layer's ``o_proj`` bias (created if absent).

    ``shift``: (layers, heads * head_dim). Returns what :func:`unfold_bias` needs to undo it.
    """
    undo = []
    for layer in torch.nonzero(shift.abs().amax(-1) > 0).flatten().tolist():
        proj = layout.o_projs[layer]
        weight = _dense_weight(proj)
        delta = weight @ shift[layer].to(weight)
        old = None if proj.bias is None else proj.bias.detach().clone()
        base = torch.zeros_like(delta) if old is None else old.float()
        dtype = proj.bias.dtype if old is not None else weight.dtype
        proj.bias = nn.Parameter((base + delta).to(dtype), requires_grad=False)
        undo.append((proj, old))
    return undo


@torch.no_grad()
def unfold_bias(undo: list[tuple[nn.Module, torch.Tensor | None]]) -> None:
    for proj, old in undo:
        proj.bias = None if old is None else nn.Parameter(old, requires_grad=False)
