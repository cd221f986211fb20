"""``python -m palign``: the Hydra app (see ``conf/config.yaml``)."""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from palign.run import USER_ERRORS

log = logging.getLogger("palign")


@hydra.main(version_base="1.3", config_path="../../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from palign.run import objective, run

    try:
        return objective(cfg, run(cfg))
    except USER_ERRORS as e:
        log.error("%s", e)
        sys.exit(f"palign: error: {e}")


if __name__ == "__main__":
    main()
