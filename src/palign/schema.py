"""Config schemas: one dataclass per config group, stored in Hydra's ConfigStore.

Each packaged YAML names its schema first in its ``defaults`` (``conf/config.yaml``:
``palign_schema``; ``conf/method/pas.yaml``: ``pas_schema``; ...), so Hydra composes every node
as its dataclass in struct mode: a key the schema does not have (a misspelt ``method.topk`` in a
YAML file, an ``+method.topk=8`` override) fails at compose time, naming the key, before palign
starts. Field help is in ``metadata["help"]`` (as TRL's config dataclasses).

Method settings (and the model's) are annotated ``Any``: their values arrive as YAML numbers,
command-line strings or sweep choices, and each method's constructor checks them with one line
naming the key, the value and what is allowed (:mod:`palign.methods.checks`); the schema owns the
keys. The scorer's settings are typed here and used as-is by :class:`palign.eval.scoring.Scorer`.

This module imports no model code: ``import palign`` registers the schemas in a fraction of a
second, before any config is composed. A method of one's own needs no schema (its YAML is then
composed without one, and :func:`palign.run.build_method` checks its keys against the class's
constructor); to have Hydra check its keys at compose time, :func:`register` a dataclass
derived from :class:`MethodConfig` before composing (the Python API) and name it in the YAML's
``defaults``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig


def _help(text: str, default: Any = MISSING, factory: Any = None) -> Any:
    """A dataclass field with ``text`` as its help."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


# --- methods --------------------------------------------------------------------------------


@dataclass
class MethodConfig:
    """What every method config has."""

    _target_: str = _help("the Method class (palign.methods.<module>.<Class>, or your own)")
    name: str = _help(
        "the method's name in results/, artifacts/, answers/ and the report; by convention the "
        "config's file name (conf/method/<name>.yaml)"
    )


@dataclass
class ConstantConfig(MethodConfig):
    value: Any = _help("the answer given to every item, 1..5", 3)


@dataclass
class PASConfig(MethodConfig):
    top_k: Any = _help("heads shifted (the top K by probe accuracy), >= 1", 24)
    alphas: Any = _help("candidate strengths alpha (shift = alpha * sigma along the direction)")
    folds: Any = _help("k of the k-fold choice of alpha on the alignment items (clean)", 4)
    selection: Any = _help("where alpha is chosen: alignment_items (clean) or test_items (paper)")
    ranking: Any = _help("head ranking: val (validation accuracy) or mean_train_val (paper)")
    direction: Any = _help("shift direction: mass_mean or probe (the probe's weight vector)")
    per_trait: Any = _help("one intervention per trait, applied to that trait's items", False)
    with_context: Any = _help("the subject's answers as few-shot context too (paper)")
    split: Any = _help("probe train/val split by item or by row (paper)")
    ties: Any = _help("equal accuracies: first or last head first (paper: last)")
    contrastive: Any = _help("contrastive prompts shaped as scoring or as the reference")
    layers: Any = _help("[first, last) layers of candidate heads; null = all", None)
    train_fraction: Any = _help("share of items (or rows) the probes train on", 0.6)
    probe_c: Any = _help("inverse L2 strength of the logistic probes", 1.0)
    subject_batch: Any = _help("subjects per batched fit and per scorer run", 8)
    seed: Any = _help("seed of the probe splits")


@dataclass
class LoRAConfig(MethodConfig):
    """The LoRA settings DPO and PPO share."""

    lr: Any = _help("learning rate (AdamW)")
    batch_size: Any = _help("examples per optimiser step")
    steps: Any = _help("optimiser steps per subject")
    lora_r: Any = _help("LoRA rank", 16)
    lora_alpha: Any = _help("LoRA scaling alpha", 100)
    lora_dropout: Any = _help("LoRA dropout, in [0, 1)", 0.05)
    target_modules: Any = _help("module names given LoRA adapters")
    seed: Any = _help("seed of the adapter's initialisation and data order")
    precision: Any = _help("Lightning precision of training (hardware.precision)")


@dataclass
class DPOConfig(LoRAConfig):
    beta: Any = _help("DPO's KL strength beta", 0.1)
    warmup_steps: Any = _help("linear warm-up steps of the learning rate", 100)
    weight_decay: Any = _help("AdamW weight decay", 0.05)
    micro_batch_size: Any = _help("examples per forward (batch_size is a multiple of it)", 4)
    rejected: Any = _help("rejected answers: opposite (one) or all_others", "opposite")
    keep_neutral: Any = _help("keep items answered 3 (no clear preference)", False)


@dataclass
class PPOConfig(LoRAConfig):
    ppo_epochs: Any = _help("PPO epochs per batch of rollouts", 1)
    kl_coef: Any = _help("KL penalty to the reference model", 0.05)
    clip: Any = _help("PPO's ratio clip", 0.2)
    vf_coef: Any = _help("value loss weight", 0.1)
    gamma: Any = _help("discount", 1.0)
    lam: Any = _help("GAE lambda", 0.95)
    max_new_tokens: Any = _help("tokens generated per rollout", 15)
    prefill: Any = _help("generate after the prefilled answer prefix", True)


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
    pas_selection: str = _help("PAS alpha chosen on alignment_items or test_items")
    pas_ranking: str = _help("PAS head ranking: val or mean_train_val")
    pas_context: bool = _help("PAS answers with the subject's answers as context")
    pas_split: str = _help("PAS probe split: item or row")
    pas_ties: str = _help("PAS equal accuracies: first or last head first")
    pas_contrastive: str = _help("PAS contrastive prompts: scoring or reference")


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
class ScoringConfig:
    """How LLM answers are read (``scoring`` in ``conf/config.yaml``; see
    :mod:`palign.eval.scoring`)."""

    mode: str = _help("logit (option probabilities) or generate (parse generated text)", "logit")
    answer_prefix: str = _help("logit mode: the assistant turn up to the option letter", "Option (")
    generate_prefix: str = _help("generate mode: the prefill before decoding", "Option")
    batch_size: int = _help("rows per forward (halved on out-of-memory)", 16)
    max_new_tokens: int = _help("generate mode: tokens decoded per answer", 15)
    parse_window: int = _help("generate mode: characters read for the letter", 12)
    parse: str = _help("generate mode: word (a letter standing alone) or reference", "word")
    strip_period: bool = _help("statements without their final period", True)
    use_chat_template: bool = _help("prompts through the tokenizer's chat template", True)


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
    hardware: HardwareConfig = MISSING
    logger: Any = None
    paths: PathsConfig = MISSING


#: (group, schema name, dataclass): what :func:`register_all` stores.
SCHEMAS: list[tuple[str | None, str, type]] = [
    (None, "palign_schema", PalignConfig),
    ("method", "method_schema", MethodConfig),
    ("method", "constant_schema", ConstantConfig),
    ("method", "pas_schema", PASConfig),
    ("method", "dpo_schema", DPOConfig),
    ("method", "ppo_schema", PPOConfig),
    ("model", "pretrained_schema", PretrainedModelConfig),
    ("model", "gguf_schema", GGUFModelConfig),
    ("model", "random_schema", RandomModelConfig),
    ("dataset", "dataset_schema", DatasetConfig),
    ("protocol", "protocol_schema", ProtocolConfig),
    ("hardware", "hardware_schema", HardwareConfig),
    ("paths", "paths_schema", PathsConfig),
    ("logger", "csv_schema", FileLoggerConfig),
    ("logger", "tensorboard_schema", TensorBoardLoggerConfig),
    ("logger", "wandb_schema", WandbLoggerConfig),
]


def register(group: str | None, name: str, schema: type) -> None:
    """Store ``schema`` (a dataclass) in Hydra's ConfigStore as ``<group>/<name>``: a YAML of
    that group extends it by naming ``<name>`` first in its ``defaults``."""
    ConfigStore.instance().store(group=group, name=name, node=schema)


def register_all() -> None:
    """Store palign's schemas (:data:`SCHEMAS`); ``import palign`` does it."""
    for group, name, schema in SCHEMAS:
        register(group, name, schema)


def compose(
    overrides: list[str], config_name: str = "config", return_hydra_config: bool = False
) -> DictConfig:
    """``conf/<config_name>.yaml`` composed with ``overrides`` as the CLI composes it (schemas
    and all; the ``hydra`` node left out unless ``return_hydra_config``, so
    ``paths.output_dir`` is unset). Inside a running
    Hydra app the app's config search path (``hydra.searchpath``: the user's own config dirs)
    is searched too, and Hydra's global state is restored afterwards."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    from palign import CONF_DIR

    if HydraConfig.initialized() and HydraConfig.get().searchpath:
        overrides = [f"hydra.searchpath=[{','.join(HydraConfig.get().searchpath)}]", *overrides]
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
