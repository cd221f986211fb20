"""Open-ended text with a subject's alignment applied, beside the same prompt without it.

    python -m palign.cli.generate profile=outputs/.../artifacts/<method>/<case>/profile.json prompt="..."
    python -m palign.cli.generate adapter=outputs/.../artifacts/<method>/<case> prompt="..."   # dpo / ppo

A PAS profile shifts its heads by ``alpha * sigma * direction`` (``alpha`` defaults to the
profile's own; the traits of a per-trait profile are summed) at every position while generating;
a DPO/PPO adapter is loaded onto the model for the second reply. SIGTERM or SIGINT stops it after
the token in flight (:mod:`palign.stopping`), exit status 143 or 130.
"""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from palign import CONF_DIR
from palign.config import build, register_all
from palign.errors import ConfigError, cli
from palign.eval.generation import generate_pair
from palign.methods.lora import AdapterArtifact
from palign.models.hosted import is_hosted
from palign.pas.profile import PASProfile
from palign.stopping import stop_on_signals


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="generate")
def app(cfg: DictConfig) -> None:
    with cli("palign generate"), stop_on_signals():
        if is_hosted(cfg.model):
            raise ConfigError(
                f"palign generate applies a profile or an adapter to the model's weights; "
                f"model={HydraConfig.get().runtime.choices.get('model')} is served over an API "
                "(no weights): use a local model"
            )
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
