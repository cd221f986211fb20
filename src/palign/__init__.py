"""palign: personality alignment of large language models on PAPI."""

from omegaconf import OmegaConf

__version__ = "0.1.0"

# `${palign.first:a,b}`: the first of its arguments that is not null or empty (e.g. the run dir
# is `resume` when given, else a fresh timestamped dir).
OmegaConf.register_new_resolver(
    "palign.first",
    lambda *values: next((v for v in values if v not in (None, "")), None),
    replace=True,
)
