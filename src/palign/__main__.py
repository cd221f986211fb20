"""``python -m palign``: the Hydra app (see ``conf/config.yaml``)."""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from palign.data.papi import PapiDataError
from palign.eval.scoring import ScoringError
from palign.methods.base import ConfigError
from palign.models.loading import ModelLoadError
from palign.pas.heads import PASError

log = logging.getLogger("palign")

#: Errors that describe bad input or an impossible config: shown as one line, no traceback.
USER_ERRORS = (PapiDataError, ModelLoadError, ScoringError, PASError, ConfigError)


@hydra.main(version_base="1.3", config_path="../../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from palign.run import run

    try:
        summary = run(cfg)
    except USER_ERRORS as e:
        log.error("%s", e)
        sys.exit(f"palign: error: {e}")
    return summary["score"]


if __name__ == "__main__":
    main()
