"""Open-ended text with a PAS profile applied, beside the same prompt without it.

    python -m palign.generate profile=outputs/.../artifacts/<case>/profile.json prompt="..."

The profile's heads are shifted by ``alpha * sigma * direction`` (``alpha`` defaults to the
profile's own; the traits of a per-trait profile are summed) at every position while generating.
"""

from __future__ import annotations

import sys

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from palign.eval.prompts import PromptRenderer
from palign.models.loading import LoadedModel
from palign.pas.heads import HeadShift, PASError, head_layout
from palign.pas.profile import PASProfile


def generate_pair(
    loaded: LoadedModel,
    profile: PASProfile,
    prompt: str,
    system_prompt: str,
    alpha: float | None = None,
    max_new_tokens: int = 80,
    do_sample: bool = False,
    temperature: float = 0.7,
    seed: int = 0,
) -> tuple[str, str]:
    """(without the profile, with it): the model's replies to ``prompt``."""
    layout = head_layout(loaded.model)
    profile.check_fits(layout, loaded.name)
    renderer = PromptRenderer(loaded.tokenizer)
    ids = torch.tensor([renderer.encode(renderer.render(system_prompt, prompt))])
    device = next(loaded.model.parameters()).device
    ids = ids.to(device)
    settings = dict(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        pad_token_id=loaded.tokenizer.pad_token_id,
        **({"temperature": temperature} if do_sample else {}),
    )
    replies = []
    for shifted in (False, True):
        torch.manual_seed(seed)
        with torch.no_grad():
            if shifted:
                with HeadShift(layout, profile.total_shift(alpha)).applied():
                    out = loaded.model.generate(ids, **settings)
            else:
                out = loaded.model.generate(ids, **settings)
        replies.append(
            loaded.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
        )
    return replies[0], replies[1]


@hydra.main(version_base="1.3", config_path="../../conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    from palign.run import build

    if OmegaConf.is_missing(cfg, "profile"):
        sys.exit("palign.generate: error: give profile=<path to a PAS profile.json>")
    try:
        profile = PASProfile.load(cfg.profile)
        loaded = build(cfg.model)
        base, steered = generate_pair(
            loaded,
            profile,
            cfg.prompt,
            cfg.system_prompt,
            cfg.alpha,
            cfg.max_new_tokens,
            cfg.do_sample,
            cfg.temperature,
            cfg.seed,
        )
    except PASError as e:
        sys.exit(f"palign.generate: error: {e}")
    alpha = profile.alpha if cfg.alpha is None else cfg.alpha
    case = profile.meta.get("case", "?")
    print(f"Prompt: {cfg.prompt}\n")
    print(f"--- {loaded.name}, no profile ---\n{base}\n")
    print(f"--- {loaded.name} + PAS profile of case {case} (alpha {alpha:g}) ---\n{steered}")


if __name__ == "__main__":
    main()
