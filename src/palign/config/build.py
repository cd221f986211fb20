"""From config nodes to palign's objects: a model loader (:func:`build`), a method
(:func:`build_method`), the run's methods with its ``compare`` entries (:func:`build_methods`),
the selected subjects (:func:`select`) and the checks between them (:func:`check_objective`).
Every failure is one :class:`~palign.errors.ConfigError` line naming the key."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import fields
from typing import Any

from hydra.errors import InstantiationException, MissingConfigException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from palign import CONF_DIR
from palign.config.schema import compose
from palign.data.papi import PapiData, Subject, select_subjects
from palign.errors import ConfigError, PalignError
from palign.methods.base import Method


def build(node: DictConfig):
    """Instantiate a palign config node (``_target_`` must be one of palign's own classes or
    functions: a config file cannot make palign import anything else; methods of one's own go
    through :func:`build_method`), re-raising palign's own errors unwrapped (they name the key)."""
    target = str(node.get("_target_", "")) if isinstance(node, DictConfig) else ""
    if not target.startswith("palign."):
        raise ConfigError(
            f"_target_={target!r}: only palign's own classes can be built from a config "
            "(palign.<module>.<name>)"
        )
    return _instantiate(node)


def _instantiate(node: DictConfig):
    try:
        return instantiate(node)
    except InstantiationException as e:
        if isinstance(e.__cause__, PalignError):
            raise e.__cause__ from None
        raise


def method_class(node: DictConfig, key: str = "method") -> type[Method]:
    """The :class:`Method` subclass ``node._target_`` names: palign's own, or one of your own
    (any importable ``module.Class`` deriving from :class:`Method`); anything else is a
    ConfigError naming ``<key>._target_``."""
    from hydra.utils import get_class

    target = node.get("_target_") if isinstance(node, DictConfig) else None
    if not isinstance(target, str) or "." not in target:
        raise ConfigError(
            f"{key}._target_={target!r}: must name a Method class (module.Class, e.g. "
            "palign.methods.pas.PAS)"
        )
    try:
        cls = get_class(target)
    except Exception as e:  # ImportError, AttributeError, ValueError, as Hydra words them
        raise ConfigError(f"{key}._target_={target!r}: cannot be imported ({e})") from None
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise ConfigError(
            f"{key}._target_={target!r}: is not a palign Method (palign.methods.base.Method)"
        )
    return cls


def build_method(node: DictConfig, key: str = "method") -> Method:
    """The method of a method config node (``conf/method/<name>.yaml``, a ``compare`` entry):
    its class (:func:`method_class`) built with the node's settings (checked by its
    ``Settings``: a name it lacks, or a bad value, is one ConfigError line) and named
    ``node.name``."""
    cls = method_class(node, key)
    name = node.get("name") or cls.name
    if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
        raise ConfigError(
            f"{key}.name={name!r}: must be a name of letters, digits, _ and - (it names the "
            "method's folders and report row)"
        )
    values = OmegaConf.to_container(node, resolve=True)
    method = cls(**{k: v for k, v in values.items() if not k.startswith("_") and k != "name"})
    method.name = name
    return method


def with_settings(
    node: DictConfig, settings: Mapping[str, Any], what: str, also: Iterable[str] = ()
) -> DictConfig:
    """``node`` with ``settings`` merged in (as ``<key>.<name>=<value>`` on the command line
    would); a name neither the node nor ``also`` has is a ConfigError listing the ones known."""
    known = sorted({str(k) for k in node if not str(k).startswith("_")} | set(also))
    unknown = sorted(str(k) for k in settings if str(k).startswith("_") or k not in known)
    if unknown:
        raise ConfigError(
            f"{what}: unknown setting(s) {', '.join(unknown)} (settings: {', '.join(known)})"
        )
    merged = node.copy()
    with open_dict(merged):
        merged.merge_with(dict(settings))
    return merged


def compare_methods(cfg: DictConfig) -> list[DictConfig]:
    """Each ``compare`` entry's method config, resolved against ``cfg`` (as if run with
    ``method=<config>``): an entry is a config name (``dpo_cpu``: named so), or a mapping
    ``{method: <config>, name: <its own name>, <setting>: <value>, ...}`` (e.g. ``{method:
    dpo_cpu, name: dpo_5steps, steps: 5}``; ``name`` defaults to the config's). A config is
    looked up in the run's config search path (``hydra.searchpath`` when ``cfg`` holds its
    ``hydra`` node, as before Hydra starts; else the running app's)."""
    out = []
    for i, entry in enumerate(cfg.get("compare") or []):
        key = f"compare[{i}]"
        if isinstance(entry, DictConfig):
            settings = OmegaConf.to_container(entry)
            config = settings.pop("method", None)
        else:
            settings, config = {}, entry
        if not isinstance(config, str) or not config:
            raise ConfigError(
                f"{key}={entry!r}: must be a method config name or a mapping with 'method: "
                "<config name>' (and optionally name and settings)"
            )
        try:
            searchpath = OmegaConf.select(cfg, "hydra.searchpath", default=None) or ()
            node = compose([f"method={config}"], searchpath=list(searchpath)).method
        except MissingConfigException:
            packaged = ", ".join(p.stem for p in sorted(CONF_DIR.glob("method/*.yaml")))
            raise ConfigError(
                f"{key}: unknown method {config!r} (no method/{config}.yaml in the config search "
                f"path; packaged: {packaged})"
            ) from None
        except Exception as e:  # Hydra: a bad YAML, a key its schema does not have
            raise ConfigError(f"{key}: method {config!r}: {' '.join(str(e).split())}") from None
        declared = [f.name for f in fields(method_class(node, key).Settings)]
        node = with_settings(node, settings, f"{key} (method {config})", also=declared)
        other = cfg.copy()
        with open_dict(other):
            other.method = node
        out.append(other.method)
    return out


def build_methods(cfg: DictConfig) -> tuple[Method, list[Method]]:
    """The run's method and its ``compare`` methods, built (every config checked); their names
    must differ (each names its results/, artifacts/ and report row)."""
    method = build_method(cfg.method)
    others = [build_method(node, f"compare[{i}]") for i, node in enumerate(compare_methods(cfg))]
    names = [m.name for m in (method, *others)]
    if len(set(names)) < len(names):
        raise ConfigError(
            f"compare={OmegaConf.to_container(cfg.compare)}: the methods' names {names} repeat; "
            "each method of a run needs its own name (give a compare entry one: {method: "
            "<config>, name: <name>, ...})"
        )
    return method, others


def select(cfg: DictConfig, data: PapiData) -> list[Subject]:
    """The subjects ``cfg.dataset`` selects (cases, sample, limit, shard)."""
    ds = cfg.dataset
    return select_subjects(
        data.subjects,
        limit=ds.limit,
        cases=ds.cases,
        sample=ds.sample,
        seed=ds.seed,
        shard=ds.get("shard"),
    )


def check_objective(cfg: DictConfig, method: Method) -> None:
    """Before any work: ``cfg.optimized_metric`` (what a Hydra sweeper minimises) may only be
    ``selection_score``, and only for a method that selects on the alignment items; choosing
    hyper-parameters by the test Score would leak the test items into the result."""
    metric = cfg.get("optimized_metric")
    if not metric:
        return
    if metric != "selection_score":
        raise ConfigError(
            f"optimized_metric={metric!r}: only 'selection_score' (on the subjects' own "
            "alignment items) may be optimised; the test Score would leak the test items"
        )
    if not method.selects_on_alignment_items:
        raise ConfigError(
            f"optimized_metric=selection_score: method {method.name} under "
            f"protocol={cfg.protocol.name} selects nothing on the alignment items "
            "(PAS needs protocol=clean)"
        )
