"""palign: personality alignment of large language models on PAPI."""

import os
import time
from pathlib import Path

from omegaconf import OmegaConf

__version__ = "0.1.0"

#: The config folder, shipped inside the package (``conf/`` at the repository root links to it):
#: Hydra's primary config dir for every entry point.
CONF_DIR = Path(__file__).resolve().parent / "conf"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where palign caches (converted models, activations, fetched data): ``cache_dir``, else
    ``$PALIGN_CACHE``, else ``~/.cache/palign``."""
    root = cache_dir or os.environ.get("PALIGN_CACHE") or Path.home() / ".cache" / "palign"
    return Path(root).expanduser()


# `${palign.first:a,b}`: the first of its arguments that is not null or empty (e.g. the run dir
# is `resume` when given, else a fresh timestamped dir).
OmegaConf.register_new_resolver(
    "palign.first",
    lambda *values: next((v for v in values if v not in (None, "")), None),
    replace=True,
)

# `${palign.hydra_subdir:${resume}}`: where Hydra saves the job's configs in the run dir: `.hydra`,
# and for a resumed run a new `.hydra/resume_<time>` (the first attempt's files are kept).
OmegaConf.register_new_resolver(
    "palign.hydra_subdir",
    lambda resume: f".hydra/resume_{time.strftime('%Y-%m-%d_%H-%M-%S')}" if resume else ".hydra",
    replace=True,
)
