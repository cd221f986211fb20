"""A PAS profile as an ordinary Hugging Face model folder: ``palign export``.

The profile's shift of every head (``alpha * sigma * direction``, traits summed as for open-ended
text) enters its layer's attention output through ``o_proj``: ``o_proj(h + s) = o_proj(h) +
W_O @ s``, so it is folded into ``o_proj``'s bias and the model is saved with
``save_pretrained``. ``AutoModelForCausalLM.from_pretrained(folder)`` then answers as the hooked
model does, in any serving stack. This needs an architecture whose config can give ``o_proj`` a
bias (``attention_bias``: Llama, Gemma, ...); the q/k/v biases it also creates are zero.

    palign export --profile artifacts/pas/<case>/profile.json --out aligned_model [--alpha A]
        [--model NAME] [overrides of the model config, e.g. model.name_or_path=/weights]
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from palign.errors import ConfigError, RunDirError
from palign.models.loading import LoadedModel
from palign.pas.heads import fold_into_bias, head_layout, unfold_bias
from palign.pas.profile import PASProfile


def _bias_config(config):
    """A copy of ``config`` that gives every attention projection a bias, or a ConfigError."""
    if not hasattr(config, "attention_bias"):
        raise ConfigError(
            f"export: a {config.model_type} model cannot carry an o_proj bias in its config "
            "(no attention_bias); use palign.generate or the hook (HeadShift) instead",
        )
    biased = copy.deepcopy(config)
    biased.attention_bias = True
    return biased


@torch.no_grad()
def export_profile(
    loaded: LoadedModel, profile: PASProfile, out: Path, alpha: float | None = None
) -> Path:
    """Save ``loaded``'s model with ``profile`` (at ``alpha``, default the profile's) folded
    into the ``o_proj`` biases, and its tokenizer, into the new folder ``out``. The loaded
    model is left as it was."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise RunDirError(f"export --out {out}: already exists and is not empty")
    if loaded.quantized:
        raise ConfigError(
            "export: the model is loaded in 4/8-bit; load it in bf16 or fp32 to export",
        )
    layout = head_layout(loaded.model)
    profile.check_fits(layout, loaded.name)
    shift = profile.total_shift(alpha)[0]  # (layers, heads * head_dim)
    model, original = loaded.model, loaded.model.config
    biased = _bias_config(original)
    parents = {id(c): m for m in model.modules() for c in m.children()}
    added: list[nn.Linear] = []  # q/k/v/o projections without a bias: a zero one, as configured
    for o_proj in layout.o_projs:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            proj = getattr(parents[id(o_proj)], name, None)
            if isinstance(proj, nn.Linear) and proj.bias is None:
                zeros = torch.zeros(proj.out_features, dtype=proj.weight.dtype)
                proj.bias = nn.Parameter(zeros.to(proj.weight.device), requires_grad=False)
                added.append(proj)
    undo = fold_into_bias(layout, shift.to(layout.o_projs[0].weight.device))
    try:
        model.config = biased
        model.save_pretrained(str(out))
        loaded.tokenizer.save_pretrained(str(out))
    finally:
        model.config = original
        unfold_bias(undo)
        for proj in added:
            proj.bias = None
    return out
