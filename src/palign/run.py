"""The evaluation runner: align and evaluate one method on the selected subjects, write outputs.

Outputs (in the Hydra run dir): ``config.yaml`` (resolved), ``results.jsonl`` (one line per
subject, appended as each finishes), ``summary.json``, ``report.md`` and, if enabled, one
artifact folder per subject under ``artifacts/``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import lightning as L
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from tqdm.auto import tqdm

from palign import __version__
from palign.constants import TRAITS
from palign.data.papi import Inventory, PapiData, PapiDataError, Subject, load_papi, select_subjects
from palign.eval.metrics import subject_metrics
from palign.eval.scoring import Scorer, ScoringConfig, ScoringError, make_trainer
from palign.methods.base import Artifact, ConfigError, Method, MethodContext
from palign.methods.statistical import BASELINES
from palign.models.loading import ModelLoadError
from palign.pas.heads import PASError
from palign.report import aggregate, report_markdown

log = logging.getLogger("palign")
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

#: Errors that describe bad input or an impossible config: shown as one line, no traceback.
USER_ERRORS = (PapiDataError, ModelLoadError, ScoringError, PASError, ConfigError)


def evaluate_subject(
    method: Method, subject: Subject, inventory: Inventory
) -> tuple[dict, Artifact]:
    """Align ``method`` on the subject's alignment items, answer the test items, score them."""
    start = time.perf_counter()
    artifact = method.align(subject, inventory.train_items)
    aligned = time.perf_counter()
    answers = method.answer(subject, artifact, inventory.test_items)
    done = time.perf_counter()
    metrics = subject_metrics(answers.scores, subject.answers(inventory.test), inventory.test_items)
    info = {k: v for k, v in artifact.meta.items() if k != "timing"}
    row = {
        "case": subject.case,
        "method": method.name,
        **metrics.to_dict(),
        "timing": {
            "align_s": aligned - start,
            "eval_s": done - aligned,
            **artifact.meta.get("timing", {}),
        },
        **({"align_info": info} if info else {}),
    }
    return row, artifact


def baseline_results(data: PapiData, subjects: Sequence[Subject]) -> dict[str, dict]:
    """Aggregated results of every statistical baseline on ``subjects``."""
    out = {}
    for cls in BASELINES:
        baseline = cls()
        baseline.setup(MethodContext(data))
        rows = [evaluate_subject(baseline, s, data.inventory)[0] for s in subjects]
        entry = aggregate(rows)
        entry.pop("timing", None)
        out[baseline.name] = entry
    return out


def evaluate_all(
    method: Method,
    subjects: Sequence[Subject],
    inventory: Inventory,
    results_path: Path,
    artifacts: Path | None = None,
    logger=None,
) -> list[dict]:
    """Evaluate ``method`` on every subject with a progress bar; each subject's row is appended
    to ``results_path`` (JSON lines) as soon as it is done, so a crash loses no finished subject."""
    rows = []
    results_path.parent.mkdir(parents=True, exist_ok=True)
    with open(results_path, "a", encoding="utf-8") as results:
        for step, subject in enumerate(
            tqdm(subjects, desc=f"{method.name} subjects", unit="subject")
        ):
            row, artifact = evaluate_subject(method, subject, inventory)
            results.write(json.dumps(row) + "\n")
            results.flush()
            if artifacts is not None:
                artifact.save(artifacts / str(subject.case))
            if logger is not None:
                flat = {f"mae/{t}": row["mae"][t] for t in TRAITS}
                logger.log_metrics(
                    {**flat, "score": row["score"], "unk_rate": row["unk_rate"]}, step=step
                )
            rows.append(row)
            log.info("%s %s", method.name, _log_line(row))
    return rows


def _log_line(row: dict) -> str:
    maes = " ".join(f"{t} {row['mae'][t]:.2f}" for t in TRAITS)
    t = row["timing"]
    return (
        f"case {row['case']}: Score {row['score']:.3f} ({maes}) UNK {100 * row['unk_rate']:.1f}% "
        f"align {t['align_s']:.2f}s eval {t['eval_s']:.2f}s"
    )


def build(node: DictConfig):
    """``hydra.utils.instantiate``, re-raising palign's own errors unwrapped (they name the key)."""
    try:
        return instantiate(node)
    except InstantiationException as e:
        if isinstance(e.__cause__, USER_ERRORS):
            raise e.__cause__ from None
        raise


def _load_method_yaml(name: str) -> DictConfig:
    """``conf/method/<name>.yaml`` with its group-local ``defaults`` (other method configs) merged
    first, as Hydra composes it."""
    path = CONF_DIR / "method" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"compare: unknown method {name!r} (no {path})")
    node = OmegaConf.load(path)
    bases = node.pop("defaults", [])
    merged = OmegaConf.create()
    for base in bases:
        if base != "_self_":
            merged = OmegaConf.merge(merged, _load_method_yaml(base))
    return OmegaConf.merge(merged, node)


def _method_config(cfg: DictConfig, name: str) -> DictConfig:
    """The method config ``name`` resolved against ``cfg`` (as if run with ``method=<name>``)."""
    other = cfg.copy()
    with open_dict(other):
        other.method = _load_method_yaml(name)
    return other.method


def run(cfg: DictConfig) -> dict:
    """Run one configured evaluation; returns the summary (also written to ``summary.json``)."""
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for key, value in (cfg.hardware.get("env") or {}).items():
        os.environ.setdefault(str(key), str(value))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

    data = load_papi(cfg.dataset.root, coding=cfg.protocol.coding)
    ds = cfg.dataset
    subjects = select_subjects(
        data.subjects,
        limit=ds.limit,
        cases=list(ds.cases) if ds.cases else None,
        sample=ds.sample,
        seed=ds.seed,
    )
    method: Method = build(cfg.method)
    compare_nodes = [_method_config(cfg, name) for name in cfg.get("compare") or []]
    scorer = None
    model_name = "none (no LLM)"
    if method.uses_llm:
        loaded = build(cfg.model)
        model_name = loaded.name
        trainer = make_trainer(**OmegaConf.to_container(cfg.hardware.trainer, resolve=True))
        scorer = Scorer(
            loaded, trainer, ScoringConfig(**OmegaConf.to_container(cfg.scoring, resolve=True))
        )
    method.setup(MethodContext(data=data, scorer=scorer))
    logger = build(cfg.logger) if cfg.get("logger") else None
    try:
        if logger is not None:
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        rows = evaluate_all(
            method,
            subjects,
            data.inventory,
            out_dir / "results.jsonl",
            artifacts=out_dir / "artifacts" if cfg.save_artifacts else None,
            logger=logger,
        )
        method.teardown()
        compare = {}
        for node in compare_nodes:
            other = build(node)
            other.setup(MethodContext(data=data, scorer=scorer))
            compare[other.name] = aggregate(
                evaluate_all(
                    other, subjects, data.inventory, out_dir / "compare" / f"{other.name}.jsonl"
                )
            )
            other.teardown()
        summary = {
            "method": method.name,
            "model": model_name,
            "protocol": {
                "name": cfg.protocol.name,
                "coding": cfg.protocol.coding,
                "scoring": cfg.scoring.mode if method.uses_llm else "none (no LLM)",
            },
            "n_test_items": len(data.inventory.test),
            **aggregate(rows),
            "cases": [s.case for s in subjects],
            "compare": compare,
            "baselines": baseline_results(data, subjects),
            "baselines_all_subjects": baseline_results(data, data.subjects),
            "notes": method.notes(rows),
            "versions": {"palign": __version__},
        }
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        report = report_markdown(summary)
        (out_dir / "report.md").write_text(report)
        if logger is not None:
            logger.log_metrics({"summary/score": summary["score"]}, step=len(rows))
        print(report)
        log.info("Outputs in %s", out_dir)
        return summary
    finally:
        if logger is not None:
            logger.finalize("success")
