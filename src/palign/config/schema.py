"""Config schemas: one node per config group, stored in Hydra's ConfigStore.

Each packaged YAML names its schema first in its ``defaults`` (``conf/config.yaml``:
``palign_schema``; ``conf/method/pas.yaml``: ``pas_schema``; ...), so Hydra composes every node
against it in struct mode: a key the schema does not have (a misspelt ``method.topk`` in a YAML
file, a ``method.topk=8`` override) fails at compose time, naming the key, before palign
starts. Field help is in ``metadata["help"]`` (as TRL's config dataclasses).

A method's node is derived from the method's settings dataclass (``Method.Settings``, see
:class:`palign.methods.base.MethodSettings`): its keys and defaults (``_target_`` the class,
``name`` the class's name), a setting that ``follows`` a run's key as that interpolation
(``seed: ${seed}``). Its values stay untyped for Hydra: they arrive as YAML numbers,
command-line strings or sweep choices, and the settings dataclass checks them with one line
naming the key, the value and what is allowed. ``protocol.pas`` is derived from PAS's settings
that follow it, with PAS's defaults (protocol=clean); ``protocol/paper.yaml`` sets the
reference's. The scorer's node is :class:`palign.eval.scoring.ScoringConfig`.

:func:`register_all` stores them; :func:`compose` (the one way palign composes its configs)
and ``python -m palign`` call it first. A method of one's own needs no schema: its YAML is
composed as written, and building it checks its keys against its ``Settings``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from functools import cache
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from palign.eval.scoring import ScoringConfig


def _help(text: str, default: Any = MISSING, factory: Any = None) -> Any:
    """A dataclass field with ``text`` as its help."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


# --- the other groups ---------------------------------------------------------------------


@dataclass
class ModelConfig:
    """What every model config has; the loader's settings come beside these."""

    _target_: str = _help("the loader (palign.models.load_pretrained, load_gguf_package, ...)")
    name: str = _help("the model's name in outputs and adapters")
    dtype: Any = _help("weight dtype: float32, bfloat16, float16")
    device: Any = _help("cpu, cuda, cuda:<i> or auto (every GPU)")


@dataclass
class PretrainedModelConfig(ModelConfig):
    name_or_path: str = _help("a Hugging Face model id (from the local cache) or a folder")
    quantization: Any = _help("BitsAndBytesConfig settings (e.g. load_in_4bit), or null", None)


@dataclass
class GGUFModelConfig(ModelConfig):
    package: str = _help("the installed Python package shipping the GGUF file")
    gguf_file: str = _help("the GGUF file's name in that package")
    cache_dir: Any = _help("where the converted model is cached; null: palign.cache_root()", None)


@dataclass
class RandomModelConfig(ModelConfig):
    seed: Any = _help("initialisation seed")
    config: Any = _help("the transformers config (model_type selects the architecture)")


@dataclass
class HostedModelConfig:
    """A model served over an OpenAI-compatible chat API (``model=openai``): OpenAI, or a
    vLLM, llama.cpp, Ollama, ... server at ``base_url`` (see :mod:`palign.models.hosted`)."""

    _target_: str = _help("the loader: palign.models.hosted.load_hosted")
    name: str = _help("the model's name in outputs (default: model.model)")
    base_url: str = _help("the API's base URL, up to /v1", "https://api.openai.com/v1")
    model: str = _help("the model the server serves (the requests' model field), e.g. gpt-4o")
    api_key_env: Any = _help(
        "the environment variable holding the API key (read at run time, written nowhere); "
        "null: none",
        "OPENAI_API_KEY",
    )
    max_concurrency: Any = _help("requests in flight at once", 8)
    max_retries: Any = _help("retries of a request on 429, 5xx, a timeout or malformed JSON", 5)
    timeout_s: Any = _help("seconds one request may take", 60)
    max_requests: Any = _help("at most this many requests per run (null: no cap)", None)
    max_cost: Any = _help("at most this many USD per run, at the prices below (null: no cap)", None)
    price_input_per_mtok: Any = _help("USD per million input tokens (null: not priced)", None)
    price_output_per_mtok: Any = _help("USD per million output tokens (null: not priced)", None)
    temperature: Any = _help("sampling temperature (0: greedy)", 0)
    max_tokens: Any = _help("tokens a reply may have", 16)
    logprobs: Any = _help("ask for top_logprobs (scoring.mode=logit needs them)", True)
    top_logprobs: Any = _help("alternatives per token with logprobs (0..20)", 20)
    cache: Any = _help("reuse replies cached in palign.cache_root()/hosted", True)


@dataclass
class DatasetConfig:
    name: str = _help("the dataset", "papi")
    root: Any = _help("the PAPI folder; null: $PALIGN_DATA, ./data/papi, ../shared/papi, cache")
    cases: Any = _help("these subjects (case ids), or null", None)
    sample: Any = _help("a seeded random sample of this many subjects, or null", None)
    limit: Any = _help("the first N subjects, or null", None)
    seed: Any = _help("seed of the sample")
    shard: Any = _help("'i/n': the i-th of n interleaved shards of the selection, or null", None)


@dataclass
class ProtocolConfig:
    name: str = _help("clean or paper")
    coding: str = _help("response coding: keyed (clean) or as_stored (the reference's)")
    scoring: str = _help("logit (option probabilities) or generate (parse generated text)")
    parse: str = _help("generate mode: word (a letter standing alone) or reference")
    strip_period: bool = _help("item statements without their final period")
    pas: Any = _help("PAS's settings under this protocol (derived from PAS's settings)")


@dataclass
class EvaluationConfig:
    """``conf/evaluation/``: what a run evaluates (docs/judge.md)."""

    name: str = _help("inventory (multiple-choice answers) or open_ended (also free replies)")
    prompt: str = _help(
        "open_ended: the question about each test item; {statement} is the item's statement",
        'Tell me about yourself: how much does this describe you, and why? "{statement}"',
    )
    max_new_tokens: int = _help("open_ended: tokens generated per reply", 200)
    items: Any = _help("open_ended: replies to the first N test items, or null (all)", None)


@dataclass
class HardwareConfig:
    name: str = _help("cpu, gpu or multi_gpu")
    device: str = _help("cpu, cuda, cuda:<i> or auto")
    dtype: str = _help("weight dtype")
    batch_size: int = _help("rows per forward (halved on out-of-memory)")
    precision: str = _help("Lightning precision: 32-true, bf16-mixed, 16-mixed")
    env: dict[str, str] = _help("environment variables set unless already set", factory=dict)


@dataclass
class PathsConfig:
    root_dir: str = _help("the project root ($PALIGN_ROOT or .)")
    output_dir: str = _help("the run dir (Hydra's runtime.output_dir)")


@dataclass
class LoggerConfig:
    """A Lightning logger (``conf/logger/``); ``logger=many`` is a mapping of these."""

    _target_: str = _help("the Lightning logger class (lightning.pytorch.loggers.<Name>)")
    save_dir: str = _help("where its files go (the run dir)")
    name: Any = _help("its sub-folder (CSV, TensorBoard) or run name (W&B; null: the run dir's)")


@dataclass
class FileLoggerConfig(LoggerConfig):
    version: Any = _help("its version sub-folder; '' for none", "")


@dataclass
class TensorBoardLoggerConfig(FileLoggerConfig):
    default_hp_metric: bool = _help("log TensorBoard's placeholder hp_metric", False)


@dataclass
class WandbLoggerConfig(LoggerConfig):
    project: str = _help("the W&B project", "palign")
    entity: Any = _help("the W&B entity (user or team); null: the key's default", None)
    group: Any = _help("null: task_name, or task_name/<sweep> for a multirun job", None)
    tags: list[str] = _help("extra tags (method, model and protocol are added)", factory=list)
    job_type: str = _help("the run's job type", "eval")
    offline: Any = _help("null: offline unless an API key is found and $WANDB_MODE allows", None)
    log_model: bool = _help("Lightning's checkpoint upload (palign logs its own artifacts)", False)


@dataclass
class PalignConfig:
    """``conf/config.yaml``: the run."""

    task_name: str = _help("names the output folder and the W&B group", "eval")
    seed: int = _help("seed of everything", 0)
    compare: list[Any] = _help(
        "other methods on the same subjects: a config name, or {method: <name>, name: <shown "
        "name>, <setting>: <value>, ...}",
        factory=list,
    )
    optimized_metric: Any = _help("what a Hydra sweeper minimises: selection_score or null", None)
    resume: Any = _help("a run dir to continue (finished subjects are kept), or null", None)
    save_artifacts: bool = _help("save each subject's artifact in the run dir", True)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    model: Any = MISSING
    method: Any = MISSING
    dataset: DatasetConfig = MISSING
    protocol: ProtocolConfig = MISSING
    evaluation: EvaluationConfig = MISSING
    hardware: HardwareConfig = MISSING
    logger: Any = None
    paths: PathsConfig = MISSING


#: (group, schema name, dataclass) of the groups whose nodes are written here.
SCHEMAS: list[tuple[str | None, str, type]] = [
    (None, "palign_schema", PalignConfig),
    ("model", "pretrained_schema", PretrainedModelConfig),
    ("model", "gguf_schema", GGUFModelConfig),
    ("model", "random_schema", RandomModelConfig),
    ("model", "hosted_schema", HostedModelConfig),
    ("dataset", "dataset_schema", DatasetConfig),
    ("evaluation", "evaluation_schema", EvaluationConfig),
    ("hardware", "hardware_schema", HardwareConfig),
    ("paths", "paths_schema", PathsConfig),
    ("logger", "csv_schema", FileLoggerConfig),
    ("logger", "tensorboard_schema", TensorBoardLoggerConfig),
    ("logger", "wandb_schema", WandbLoggerConfig),
]

#: Method schema name -> the Method class whose settings it is derived from.
METHOD_SCHEMAS = {
    "method_schema": "palign.methods.base.Method",
    "constant_schema": "palign.methods.statistical.Constant",
    "pas_schema": "palign.methods.pas.PAS",
    "pas_soup_schema": "palign.methods.pas_soup.PASSoup",
    "dpo_schema": "palign.methods.dpo.DPO",
    "ppo_schema": "palign.methods.ppo.PPO",
    "psoups_schema": "palign.methods.psoups.PSoups",
    "prompt_morl_schema": "palign.methods.prompt_morl.PromptMORL",
}


def _default(f) -> Any:
    """A settings field's default as a config node holds it: the interpolation of the key it
    follows, else its value (``???`` where it has none)."""
    if f.metadata.get("follows"):
        return "${" + f.metadata["follows"] + "}"
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return MISSING if f.default is dataclasses.MISSING else f.default


def method_node(method: type) -> DictConfig:
    """The config node of ``method`` (a Method class): ``_target_`` and ``name`` (the class's,
    ``???`` for the base class) and one key per setting with its default, in struct mode."""
    from palign.methods.base import Method

    base = method is Method
    node = {
        "_target_": MISSING if base else f"{method.__module__}.{method.__qualname__}",
        "name": MISSING if base else method.name,
        **{f.name: _default(f) for f in fields(method.Settings)},
    }
    config = OmegaConf.create(node)
    OmegaConf.set_struct(config, True)
    return config


def protocol_node() -> DictConfig:
    """:class:`ProtocolConfig` with ``pas``: PAS's settings that follow ``protocol.pas.<key>``,
    PAS's defaults as their values (protocol=clean's), in struct mode."""
    from palign.methods.pas import PASSettings

    prefix = "protocol.pas."
    pas = {
        f.name: f.default
        for f in fields(PASSettings)
        if (f.metadata.get("follows") or "").startswith(prefix)
    }
    config = OmegaConf.structured(ProtocolConfig(pas=pas))
    OmegaConf.set_struct(config, True)
    return config


def register(group: str | None, name: str, node: Any) -> None:
    """Store ``node`` (a dataclass or config) in Hydra's ConfigStore as ``<group>/<name>``: a
    YAML of that group extends it by naming ``<name>`` first in its ``defaults``."""
    ConfigStore.instance().store(group=group, name=name, node=node)


@cache
def register_all() -> None:
    """Store palign's schemas (:data:`SCHEMAS`, the methods' of :data:`METHOD_SCHEMAS` and the
    protocol's) once per process; it imports the methods' modules."""
    from hydra.utils import get_class

    for group, name, schema in SCHEMAS:
        register(group, name, schema)
    register("protocol", "protocol_schema", protocol_node())
    for name, target in METHOD_SCHEMAS.items():
        register("method", name, method_node(get_class(target)))


def compose(
    overrides: list[str],
    config_name: str = "config",
    return_hydra_config: bool = False,
    searchpath: Sequence[str] = (),
) -> DictConfig:
    """``conf/<config_name>.yaml`` composed with ``overrides`` as the CLI composes it (schemas
    and all; the ``hydra`` node left out unless ``return_hydra_config``, so
    ``paths.output_dir`` is unset). The config dirs of ``searchpath`` (a run's
    ``hydra.searchpath``: the user's own config dirs) are searched too; inside a running Hydra
    app, without ``searchpath``, the app's. Hydra's global state is restored afterwards."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    from palign import CONF_DIR

    register_all()
    if not searchpath and HydraConfig.initialized():
        searchpath = HydraConfig.get().searchpath
    if searchpath:
        overrides = [f"hydra.searchpath=[{','.join(searchpath)}]", *overrides]
    backup = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(
                config_name=config_name,
                overrides=overrides,
                return_hydra_config=return_hydra_config,
            )
    finally:
        restore_gh_from_backup(backup)


def compose_checked(overrides: list[str], return_hydra_config: bool = False) -> DictConfig:
    """:func:`compose`, where a config Hydra cannot compose (a key its schema lacks, an unknown
    option, a malformed override) is one :class:`~palign.errors.ConfigError` line with Hydra's
    reason, before anything else happens."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from palign.errors import ConfigError

    try:
        return compose(overrides, return_hydra_config=return_hydra_config)
    except (HydraException, OmegaConfBaseException) as e:
        reasons = [
            " ".join(str(x).split()).split(" Config search path:")[0]  # Hydra's own paths
            for x in (e, e.__cause__)
            if x is not None
        ]
        raise ConfigError(
            "; ".join(dict.fromkeys(r for r in reasons if r)),
            "set HYDRA_FULL_ERROR=1 and run `palign ... --cfg job` to see the composed config",
        ) from None


#: A value Hydra's override grammar reads back as it is (else it goes in quotes).
_PLAIN_VALUE = re.compile(r"[\w./:@%+-]+", re.ASCII)


def hydra_value(value: str) -> str:
    """``value`` as the value of a command-line override that Hydra reads back exactly: as it
    is when plain, else in single quotes with a backslash before each ``'`` and each run of
    backslashes before a ``'`` or the closing quote doubled (Hydra's escaping rules)."""
    if _PLAIN_VALUE.fullmatch(value):
        return value
    quoted = re.sub(r"(\\*)'", lambda m: m[1] * 2 + "\\'", value)
    return "'" + re.sub(r"(\\+)$", lambda m: m[1] * 2, quoted) + "'"
