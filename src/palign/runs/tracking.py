"""The run's experiment logger: a Lightning logger from ``conf/logger/`` (CSV, TensorBoard or
W&B) behind one small interface the runner calls.

Every ``log_metrics`` call gets the next value of one increasing Lightning ``step`` (W&B drops
steps that go backwards), but each method's values also carry their own counters, and W&B plots
them against those (``run.define_metric(key, step_metric=...)``):

- ``<method>/subject`` (1, 2, 3, ... in the order subjects are logged) is the x-axis of that
  method's per-subject metrics ``<method>/score``, ``<method>/mae_<trait>``, ``<method>/case``, ...;
- ``<method>/train/step`` (1, 2, 3, ... one per optimiser step, counting on across subjects) is
  the x-axis of its training curves ``<method>/train/<name>``;
- ``<method>/population/<part>/step`` (one per optimiser step) is the x-axis of what a population
  method trained once per run, ``<method>/population/<part>/<name>`` (``<part>``: an expert such
  as ``A+``, or ``adapter``);
- ``summary/...`` keeps the logger's default axis.

The counters are logged to every logger (CSV and TensorBoard get them as columns or scalars).
A resumed run continues ``step`` and the counters after the rows of its CSV log
(``logger=csv`` or ``many``); without a CSV log they start again at each attempt. The runner
logs a method's subjects once the method is done, so after a resume the subjects of a method
that the earlier attempt had finished are logged a second time, with the next counter values.
"""

from __future__ import annotations

import csv
import logging
import netrc
import os
import re
import uuid
from collections.abc import Sequence
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from palign import stopping
from palign.constants import TRAITS
from palign.eval.records import ResultRow, Summary
from palign.rundir import RunDir, write_atomic

log = logging.getLogger("palign")

#: A counter column of the CSV log: ``<method>/subject``, ``<method>/train/step`` or
#: ``<method>/population/<part>/step``.
_COUNTER = re.compile(r"^[^/]+/(subject|train/step|population/[^/]+/step)$")

#: Columns of the per-subject table (W&B Table and sweep tables alike).
ROW_COLUMNS = ["method", "case", *TRAITS, "score", "unk_rate", "align_s", "eval_s"]


def row_cells(row: ResultRow) -> list:
    """One per-subject result row as the values of :data:`ROW_COLUMNS`."""
    return [
        row.method,
        row.case,
        *(row.mae[t] for t in TRAITS),
        row.score,
        row.unk_rate,
        row.timing["align_s"],
        row.timing["eval_s"],
    ]


def wandb_has_key() -> bool:
    """Whether W&B could log online: an API key in ``$WANDB_API_KEY`` or ``~/.netrc``."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _sweep_group(cfg: DictConfig, sweep_dir: Path | None = None) -> str:
    """``<task_name>`` for a single run, ``<task_name>/<sweep dir name>`` for a multirun job (or
    for the sweep at ``sweep_dir``), so every job of one sweep is its own W&B run in one group."""
    if sweep_dir is None and HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode == RunMode.MULTIRUN:
            sweep_dir = Path(hydra_cfg.sweep.dir)
    return str(cfg.task_name) if sweep_dir is None else f"{cfg.task_name}/{sweep_dir.name}"


def _offline(node: DictConfig) -> bool:
    """A W&B node's ``offline``; null means offline unless an API key is available and
    ``$WANDB_MODE`` is not ``offline``."""
    offline = node.get("offline")
    if offline is None:
        offline = not wandb_has_key() or os.environ.get("WANDB_MODE") == "offline"
    return bool(offline)


def _run_id(id_file: Path) -> str:
    """The W&B run id kept in ``id_file``; a new one (12 hex digits) is written there first."""
    if id_file.is_file():
        return id_file.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    write_atomic(id_file, run_id + "\n")
    return run_id


def logger_nodes(cfg: DictConfig) -> list[DictConfig]:
    """The logger nodes of ``cfg.logger``: one node (``_target_``), the non-empty entries of a
    mapping of named nodes (``logger=many``), or none."""
    node = cfg.get("logger")
    if not node:
        return []
    return [node] if "_target_" in node else [n for n in node.values() if n]


def _is_wandb(node: DictConfig) -> bool:
    return str(node.get("_target_", "")).endswith("WandbLogger")


class RunTracker:
    """Sends a run's hyper-parameters, per-subject rows, training curves, summary and files to
    its Lightning loggers (none, one, or several at once)."""

    def __init__(
        self, loggers: Sequence[Logger] = (), step: int = 0, counters: dict[str, int] | None = None
    ):
        self.loggers = list(loggers)
        self.step = step
        #: Last value of each counter (``<method>/subject``, ``<method>/train/step``), 0 if none.
        self.counters = dict(counters or {})
        self._defined: set[str] = set()  # keys given their W&B x-axis

    @classmethod
    def from_config(cls, cfg: DictConfig, method: str, run_dir: RunDir) -> RunTracker:
        """Instantiate ``cfg.logger``: one logger node (``_target_``), a mapping of named logger
        nodes (``logger=many``: CSV, TensorBoard and W&B at once), or None/empty for none. For
        W&B, ``group``, ``name`` and extra ``tags`` (method, model, protocol) are filled in when
        the config leaves them empty, and ``offline: null`` means offline unless an API key is
        available and ``$WANDB_MODE`` is not ``offline``; the run's W&B id is kept in the run
        dir so that a resumed run continues the same W&B run. A resumed CSV log is appended
        to, never replaced, and the steps and counters of every logger continue after its
        rows."""
        loggers, step, counters = [], 0, {}
        for n in logger_nodes(cfg):
            logger, next_step, last = cls._instantiate(n, cfg, method, run_dir)
            loggers.append(logger)
            step = max(step, next_step)
            for key, value in last.items():
                counters[key] = max(counters.get(key, 0), value)
        return cls(loggers, step, counters)

    @classmethod
    def for_sweep(cls, cfg: DictConfig, sweep_dir: Path) -> RunTracker:
        """The W&B loggers of ``cfg.logger`` (a sweep's config) as one extra W&B run for the
        sweep at ``sweep_dir``: in the group of its jobs, ``job_type`` ``sweep``, tagged
        ``sweep``, offline as the jobs are, files under ``sweep_dir/wandb``; its id is kept in
        ``sweep_dir`` so that a resumed sweep logs to the same run. No logger (an empty tracker)
        when the sweep does not log to W&B."""
        loggers = [
            instantiate(
                node,
                offline=_offline(node),
                group=node.get("group") or _sweep_group(cfg, sweep_dir),
                name=node.get("name") or f"{sweep_dir.name} sweep",
                tags=[*(node.get("tags") or []), "sweep"],
                job_type="sweep",
                save_dir=str(sweep_dir),
                id=_run_id(RunDir(sweep_dir).wandb_id),
                resume="allow",
            )
            for node in logger_nodes(cfg)
            if _is_wandb(node)
        ]
        return cls(loggers)

    @classmethod
    def _instantiate(
        cls, node: DictConfig, cfg: DictConfig, method: str, run_dir: RunDir
    ) -> tuple[Logger, int, dict[str, int]]:
        """One logger, the first step it has not recorded yet and the last value of each
        counter it recorded (both from a resumed CSV log only)."""
        if str(node.get("_target_", "")).endswith("CSVLogger"):
            return cls._csv(instantiate(node))
        if not _is_wandb(node):
            return instantiate(node), 0, {}
        logger = instantiate(
            node,
            offline=_offline(node),
            group=node.get("group") or _sweep_group(cfg),
            name=node.get("name") or run_dir.path.name,
            tags=[*(node.get("tags") or []), method, cfg.model.name, cfg.protocol.name],
            id=_run_id(run_dir.wandb_id),
            resume="allow",
        )
        return logger, 0, {}

    @staticmethod
    def _csv(logger: CSVLogger) -> tuple[CSVLogger, int, dict[str, int]]:
        """``logger`` keeping the rows of an earlier attempt's ``metrics.csv`` (Lightning's CSV
        writer deletes that file when it starts), the step after its last row and the largest
        value of each counter column (``<method>/subject``, ``<method>/train/step``)."""
        path = Path(logger.log_dir) / "metrics.csv"
        kept = path.read_bytes() if path.is_file() else None
        writer = logger.experiment  # creating the writer removes an existing metrics.csv
        if not kept:
            return logger, 0, {}
        with open(path, "wb") as f:
            f.write(kept)
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            writer.metrics_keys = sorted(reader.fieldnames or [])
        steps = [int(float(r["step"])) for r in rows if r.get("step")]
        counters = {
            key: max((int(float(r[key])) for r in rows if r.get(key)), default=0)
            for key in writer.metrics_keys
            if _COUNTER.match(key)
        }
        return logger, max(steps, default=-1) + 1, counters

    def hyperparams(self, cfg: DictConfig) -> None:
        for logger in self.loggers:
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    def _tick(self, counter: str) -> dict[str, int]:
        """``{counter: its next value}`` (1 the first time), counted on."""
        self.counters[counter] = self.counters.get(counter, 0) + 1
        return {counter: self.counters[counter]}

    def _log(self, metrics: dict[str, float], axis: str | None = None) -> None:
        """``metrics`` at the next ``step`` of every logger; with ``axis`` (a counter key in
        ``metrics``) W&B plots the other keys against that counter."""
        if axis is not None:
            self._define_axis(metrics, axis)
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.step)
        self.step += 1

    def _define_axis(self, metrics: dict[str, float], axis: str) -> None:
        """Before the first value of each key: ``define_metric(key, step_metric=axis)`` on every
        W&B run (``axis`` itself as a plain metric). Each key is named, not globbed: Lightning
        defines the glob ``*`` (x-axis ``trainer/global_step``) and W&B picks any one of
        several matching globs, while a named metric always wins over globs."""
        new = [k for k in metrics if k not in self._defined]
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                run = logger.experiment
                for key in new:
                    run.define_metric(key, step_metric=None if key == axis else axis)
        self._defined.update(new)

    def subject(self, row: ResultRow, history: Sequence[dict] | None = None) -> None:
        """One subject's metrics under ``<method>/...`` with the next ``<method>/subject``; its
        training curve (one entry per optimiser step) first, under ``<method>/train/...``, each
        entry with the next ``<method>/train/step`` (a history value named ``step`` is replaced
        by it)."""
        if not self.loggers:
            return
        method = row.method
        train_step, subject = f"{method}/train/step", f"{method}/subject"
        for entry in history or []:
            train = {f"{method}/train/{k}": float(v) for k, v in entry.items()}
            self._log({**train, **self._tick(train_step)}, axis=train_step)
        self._log(
            {
                **self._tick(subject),
                f"{method}/case": row.case,
                **{f"{method}/mae_{t}": row.mae[t] for t in TRAITS},
                f"{method}/score": row.score,
                f"{method}/unk_rate": row.unk_rate,
                f"{method}/align_s": row.timing["align_s"],
            },
            axis=subject,
        )

    def population(self, method: str, curves: dict[str, Sequence[dict]]) -> None:
        """The training curves of what ``method`` trained once per run, each part (an expert,
        the shared adapter) on its own axis ``<method>/population/<part>/step``."""
        for part, history in curves.items():
            step = f"{method}/population/{part}/step"
            for entry in history:
                values = {f"{method}/population/{part}/{k}": float(v) for k, v in entry.items()}
                self._log({**values, **self._tick(step)}, axis=step)

    def summary(self, summary: Summary, rows: Sequence[ResultRow], run_dir: RunDir) -> None:
        """Run-level results: ``summary/<method>/...`` for the main, compared and baseline
        methods; for W&B also the run summary, a Table of ``rows``, the run dir's report,
        summary, results and plots as an artifact and every saved profile and adapter as one
        artifact per method; for TensorBoard the report as text."""
        if not self.loggers:
            return
        flat = {}
        for name, entry in {**summary.methods(), **summary.baselines}.items():
            flat[f"summary/{name}/score"] = entry.score
            flat.update({f"summary/{name}/mae_{t}": entry.mae[t] for t in TRAITS})
        self._log(flat)
        report = run_dir.report.read_text() if run_dir.report.exists() else ""
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                self._wandb_summary(logger, flat, rows, run_dir)
            elif isinstance(logger, TensorBoardLogger) and report:
                logger.experiment.add_text("report", report)

    @staticmethod
    def _wandb_summary(
        logger: WandbLogger, flat: dict, rows: Sequence[ResultRow], run_dir: RunDir
    ) -> None:
        import wandb

        run = logger.experiment
        run.summary.update(flat)
        logger.log_table(key="subjects", columns=ROW_COLUMNS, data=[row_cells(r) for r in rows])
        artifact = wandb.Artifact(f"palign-{run.id}", type="palign-run")
        for path in run_dir.reader_files():
            artifact.add_file(str(path), name=str(path.relative_to(run_dir.path)))
        run.log_artifact(artifact)
        for folder in run_dir.artifact_methods():
            if any(folder.glob("*/profile.json")):
                kind = "palign-profile"
            elif any(folder.glob("*/adapter_config.json")):
                kind = "palign-adapter"
            else:
                continue  # system prompts only
            saved = wandb.Artifact(f"{folder.name}-{run.id}", type=kind)
            saved.add_dir(str(folder), name=folder.name)
            run.log_artifact(saved)

    def table(self, key: str, columns: Sequence[str], data: Sequence[Sequence]) -> None:
        """``data`` (one list of cells per row, in ``columns`` order) as a ``wandb.Table`` under
        ``key`` on every W&B logger; other loggers get nothing."""
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table(key=key, columns=list(columns), data=[list(r) for r in data])

    def close(self, ok: bool) -> None:
        """Flush and close every logger; a W&B run is finished (exit code 1 after an error),
        so each job of a multirun is its own run. A run that did not finish because it was told
        to stop (:mod:`palign.stopping`) is finished with the stop's exit code (143 for SIGTERM,
        130 for SIGINT), marked as preempted (its resumption continues it), and its summary's
        ``stopped`` says why (``stopped by SIGTERM after 2 of 120 subjects``)."""
        stop = None if ok else stopping.stopped()
        status = "success" if ok else "failed" if stop is None else "stopped"
        for logger in self.loggers:
            logger.finalize(status)
            if isinstance(logger, WandbLogger):
                run = logger.experiment
                if stop is not None:
                    run.summary["stopped"] = str(stop)
                    run.mark_preempting()
                run.finish(exit_code=0 if ok else 1 if stop is None else stop.exit_code)
        self.loggers = []
