"""``palign export --profile P --out DIR``: a PAS profile folded into ``o_proj`` biases and saved
as an ordinary Hugging Face model (:func:`palign.pas.export.export_profile`)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from palign.errors import ConfigError, cli
from palign.models.hosted import is_hosted
from palign.pas.export import export_profile
from palign.pas.profile import PASProfile


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="palign export",
        description="A PAS profile folded into o_proj biases, saved as a Hugging Face model.",
    )
    parser.add_argument("--profile", required=True, help="a PAS profile.json")
    parser.add_argument("--out", required=True, type=Path, help="the new model folder")
    parser.add_argument("--alpha", type=float, default=None, help="default: the profile's")
    parser.add_argument("--model", default=None, help="model config name (default: the profile's)")
    parser.add_argument("overrides", nargs="*", help="model config overrides, e.g. hardware=cpu")
    args = parser.parse_args(argv)
    with cli("palign export"):
        profile = PASProfile.load(args.profile)
        from palign.api import available
        from palign.config import build, compose

        model = args.model or profile.model
        names = available("model")
        if model not in names:
            raise ConfigError(
                f"--model {model}: no such model config (one of {', '.join(names)})",
                "pass --model <config name> of the model the profile was made on",
            )
        cfg = compose([f"model={model}", *args.overrides], config_name="generate")
        if is_hosted(cfg.model):
            raise ConfigError(
                f"--model {model}: is served over an API (no weights to fold a profile into); "
                "pass the local model the profile was made on"
            )
        out = export_profile(build(cfg.model), profile, args.out, args.alpha)
    print(f"Exported {args.profile} into {out} (AutoModelForCausalLM.from_pretrained loads it)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
