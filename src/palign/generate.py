"""Open-ended text with a subject's alignment applied, beside the same prompt without it.

    python -m palign.generate profile=outputs/.../artifacts/<method>/<case>/profile.json prompt="..."
    python -m palign.generate adapter=outputs/.../artifacts/<method>/<case> prompt="..."   # dpo / ppo

A PAS profile shifts its heads by ``alpha * sigma * direction`` (``alpha`` defaults to the
profile's own; the traits of a per-trait profile are summed) at every position while generating;
a DPO/PPO adapter is loaded onto the model for the second reply.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import hydra
import torch
from omegaconf import DictConfig

from palign import CONF_DIR
from palign.config import build, register_all
from palign.errors import ConfigError, cli
from palign.eval.prompts import PromptRenderer
from palign.methods.lora import AdapterArtifact
from palign.models.loading import LoadedModel
from palign.pas.profile import PASProfile


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
    """(without, with) the alignment that ``applied()`` puts in place: the model's replies."""
    renderer = PromptRenderer(loaded.tokenizer)
    device = next(loaded.model.parameters()).device
    ids = torch.tensor([renderer.encode(renderer.render(system_prompt, prompt))], device=device)
    settings = dict(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        pad_token_id=loaded.tokenizer.pad_token_id,
        **({"temperature": temperature} if do_sample else {}),
    )
    replies = []
    for aligned in (False, True):
        torch.manual_seed(seed)
        with torch.no_grad(), applied() if aligned else nullcontext():
            out = loaded.model.generate(ids, **settings)
        replies.append(
            loaded.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
        )
    return replies[0], replies[1]


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="generate")
def app(cfg: DictConfig) -> None:
    with cli("palign.generate"):
        if bool(cfg.profile) == bool(cfg.adapter):
            raise ConfigError(
                "give profile=<PAS profile.json> or adapter=<dpo/ppo artifacts/<method>/<case> "
                "folder>, one of the two"
            )
        loaded = build(cfg.model)
        if cfg.profile:
            artifact = PASProfile.load(cfg.profile)
            alpha = artifact.alpha if cfg.alpha is None else cfg.alpha
            label = f"PAS profile of case {artifact.meta.get('case', '?')} (alpha {alpha:g})"
        else:
            artifact = AdapterArtifact.load(cfg.adapter)
            label = f"adapter {cfg.adapter}"
        with artifact.applied(loaded, cfg.alpha):  # fails early on another model's artifact
            pass
        base, aligned = generate_pair(
            loaded,
            lambda: artifact.applied(loaded, cfg.alpha),
            cfg.prompt,
            cfg.system_prompt,
            cfg.max_new_tokens,
            cfg.do_sample,
            cfg.temperature,
            cfg.seed,
        )
    print(f"Prompt: {cfg.prompt}\n")
    print(f"--- {loaded.name}, no profile ---\n{base}\n")
    print(f"--- {loaded.name} + {label} ---\n{aligned}")


def main() -> None:
    """``palign generate``: the schemas registered, then the Hydra app."""
    register_all()
    app()


if __name__ == "__main__":
    main()
