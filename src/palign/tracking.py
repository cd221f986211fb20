"""The run's experiment logger: a Lightning logger from ``conf/logger/`` (CSV, TensorBoard or
W&B) behind one small interface the runner calls.

Every logged value shares one increasing step counter (W&B drops steps that go backwards), so
per-subject metrics of the main method, of ``compare`` methods and per-step training metrics all
land on one axis; each subject row also logs its ``case`` id.
"""

from __future__ import annotations

import csv
import logging
import netrc
import os
import uuid
from collections.abc import Sequence
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from palign.constants import TRAITS
from palign.rundir import RunDir, write_atomic

log = logging.getLogger("palign")

#: Columns of the per-subject table (W&B Table and sweep tables alike).
ROW_COLUMNS = ["method", "case", *TRAITS, "score", "unk_rate", "align_s", "eval_s"]


def row_cells(row: dict) -> list:
    """One per-subject result row as the values of :data:`ROW_COLUMNS`."""
    return [
        row["method"],
        row["case"],
        *(row["mae"][t] for t in TRAITS),
        row["score"],
        row["unk_rate"],
        row["timing"]["align_s"],
        row["timing"]["eval_s"],
    ]


def wandb_has_key() -> bool:
    """Whether W&B could log online: an API key in ``$WANDB_API_KEY`` or ``~/.netrc``."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _sweep_group(cfg: DictConfig) -> str:
    """``<task_name>`` for a single run, ``<task_name>/<sweep dir name>`` for a multirun job, so
    every job of one sweep is its own W&B run in one group."""
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode == RunMode.MULTIRUN:
            return f"{cfg.task_name}/{Path(hydra_cfg.sweep.dir).name}"
    return str(cfg.task_name)


class RunTracker:
    """Sends a run's hyper-parameters, per-subject rows, training curves, summary and files to
    its Lightning loggers (none, one, or several at once)."""

    def __init__(self, loggers: Sequence[Logger] = (), step: int = 0):
        self.loggers = list(loggers)
        self.step = step

    @classmethod
    def from_config(cls, cfg: DictConfig, method: str, run_dir: RunDir) -> RunTracker:
        """Instantiate ``cfg.logger``: one logger node (``_target_``), a mapping of named logger
        nodes (``logger=many``: CSV, TensorBoard and W&B at once), or None/empty for none. For
        W&B, ``group``, ``name`` and extra ``tags`` (method, model, protocol) are filled in when
        the config leaves them empty, and ``offline: null`` means offline unless an API key is
        available and ``$WANDB_MODE`` is not ``offline``; the run's W&B id is kept in the run
        dir so that a resumed run continues the same W&B run. A resumed CSV log is appended
        to, never replaced, and the steps of every logger continue after its rows."""
        node = cfg.get("logger")
        if not node:
            return cls()
        nodes = [node] if "_target_" in node else [n for n in node.values() if n]
        loggers, step = [], 0
        for n in nodes:
            logger, next_step = cls._instantiate(n, cfg, method, run_dir)
            loggers.append(logger)
            step = max(step, next_step)
        return cls(loggers, step)

    @classmethod
    def _instantiate(
        cls, node: DictConfig, cfg: DictConfig, method: str, run_dir: RunDir
    ) -> tuple[Logger, int]:
        """One logger, and the first step it has not recorded yet."""
        target = str(node.get("_target_", ""))
        if target.endswith("CSVLogger"):
            return cls._csv(instantiate(node))
        if not target.endswith("WandbLogger"):
            return instantiate(node), 0
        offline = node.get("offline")
        if offline is None:
            offline = not wandb_has_key() or os.environ.get("WANDB_MODE") == "offline"
        id_file = run_dir.wandb_id
        run_id = id_file.read_text().strip() if id_file.is_file() else None
        if run_id is None:
            run_id = uuid.uuid4().hex[:12]
            write_atomic(id_file, run_id + "\n")
        logger = instantiate(
            node,
            offline=bool(offline),
            group=node.get("group") or _sweep_group(cfg),
            name=node.get("name") or run_dir.path.name,
            tags=[*(node.get("tags") or []), method, cfg.model.name, cfg.protocol.name],
            id=run_id,
            resume="allow",
        )
        return logger, 0

    @staticmethod
    def _csv(logger: CSVLogger) -> tuple[CSVLogger, int]:
        """``logger`` keeping the rows of an earlier attempt's ``metrics.csv`` (Lightning's CSV
        writer deletes that file when it starts), and the step after its last row."""
        path = Path(logger.log_dir) / "metrics.csv"
        kept = path.read_bytes() if path.is_file() else None
        writer = logger.experiment  # creating the writer removes an existing metrics.csv
        if not kept:
            return logger, 0
        with open(path, "wb") as f:
            f.write(kept)
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            steps = [int(float(r["step"])) for r in reader if r.get("step")]
            writer.metrics_keys = sorted(reader.fieldnames or [])
        return logger, max(steps, default=-1) + 1

    def hyperparams(self, cfg: DictConfig) -> None:
        for logger in self.loggers:
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    def _log(self, metrics: dict[str, float]) -> None:
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.step)
        self.step += 1

    def subject(self, row: dict, history: Sequence[dict] | None = None) -> None:
        """One subject's metrics under ``<method>/...``; its training curve (one entry per
        optimiser step) first, under ``<method>/train/...``."""
        if not self.loggers:
            return
        method = row["method"]
        for entry in history or []:
            self._log({f"{method}/train/{k}": float(v) for k, v in entry.items()})
        self._log(
            {
                f"{method}/case": row["case"],
                **{f"{method}/mae_{t}": row["mae"][t] for t in TRAITS},
                f"{method}/score": row["score"],
                f"{method}/unk_rate": row["unk_rate"],
                f"{method}/align_s": row["timing"]["align_s"],
            }
        )

    def summary(self, summary: dict, rows: Sequence[dict], run_dir: RunDir) -> None:
        """Run-level results: ``summary/<method>/...`` for the main, compared and baseline
        methods; for W&B also the run summary, a Table of ``rows``, the run dir's report,
        summary, results and plots as an artifact and every saved profile and adapter as one
        artifact per method; for TensorBoard the report as text."""
        if not self.loggers:
            return
        entries = {
            summary["method"]: summary,
            **summary.get("compare", {}),
            **summary.get("baselines", {}),
        }
        flat = {}
        for name, entry in entries.items():
            flat[f"summary/{name}/score"] = entry["score"]
            flat.update({f"summary/{name}/mae_{t}": entry["mae"][t] for t in TRAITS})
        self._log(flat)
        report = run_dir.report.read_text() if run_dir.report.exists() else ""
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                self._wandb_summary(logger, flat, rows, run_dir)
            elif isinstance(logger, TensorBoardLogger) and report:
                logger.experiment.add_text("report", report)

    @staticmethod
    def _wandb_summary(logger: WandbLogger, flat: dict, rows: Sequence[dict], run_dir: RunDir):
        import wandb

        out_dir = run_dir.path
        run = logger.experiment
        run.summary.update(flat)
        logger.log_table(key="subjects", columns=ROW_COLUMNS, data=[row_cells(r) for r in rows])
        artifact = wandb.Artifact(f"palign-{run.id}", type="palign-run")
        for pattern in ("report.md", "report.html", "summary.json", "results.jsonl", "plots/*.png"):
            for path in sorted(out_dir.glob(pattern)):
                artifact.add_file(str(path), name=str(path.relative_to(out_dir)))
        run.log_artifact(artifact)
        for folder in sorted(p for p in (out_dir / "artifacts").glob("*") if p.is_dir()):
            if any(folder.glob("*/profile.json")):
                kind = "palign-profile"
            elif any(folder.glob("*/adapter_config.json")):
                kind = "palign-adapter"
            else:
                continue  # system prompts only
            saved = wandb.Artifact(f"{folder.name}-{run.id}", type=kind)
            saved.add_dir(str(folder), name=folder.name)
            run.log_artifact(saved)

    def close(self, ok: bool) -> None:
        """Flush and close every logger; a W&B run is finished (exit code 1 after an error),
        so each job of a multirun is its own run."""
        for logger in self.loggers:
            logger.finalize("success" if ok else "failed")
            if isinstance(logger, WandbLogger):
                logger.experiment.finish(exit_code=0 if ok else 1)
        self.loggers = []
