"""The run dir: its layout, its lock, atomic writes, and the summary's schema.

One run dir per evaluation (Hydra's run dir, or ``palign.merge --out``)::

    config.yaml                      the resolved config
    .palign.lock                     held while a run writes here (pid, host, start)
    results/<method>/<case>.json     one result row per subject (what resume reads)
    answers/<method>/<case>.csv      every answer (palign.eval.answers)
    replies/<method>/<case>.csv      open-ended replies (evaluation=open_ended: palign.eval.replies)
    judgments/<method>/<case>.csv    a judge's rating of each reply (palign judge: palign.eval.judge)
    judgments/summary.json           the judge's aggregate (its section is in report.md)
    artifacts/<method>/<case>/       what aligning produced
    artifacts/<method>/population/   what a population method trained once per run
    results.jsonl, compare/<method>.jsonl    the rows in subject order
    summary.json                     the aggregate (palign.eval.records, as each row)
    report.md, report.html, plots/   for readers (report.html: one self-contained page)
    csv/, tensorboard/, wandb/       the logger's files

Every module that reads or writes a run dir goes through :class:`RunDir`: the rows and the
summary are read and written as the typed records of :mod:`palign.eval.records`, whose schema
version each file carries. Files are written atomically (readers see the old file or the whole
new one); nothing here deletes a file.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from palign.errors import RunDirError

if TYPE_CHECKING:
    import pandas as pd
from palign.eval.records import ResultRow, Summary

R = TypeVar("R")


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the whole new one (a
    temporary file unique to this process, fsynced, then renamed over ``path``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:  # the text as given, byte for byte
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def csv_text(table: pd.DataFrame) -> str:
    """``table`` as the CSV text of a run dir's tables (answers, replies, judgments): every
    text cell quoted, so that a model's text survives the round trip through ``pandas.read_csv``
    whatever it holds (a bare carriage return ends a line for the reader, and the minimal
    quoting of the writer quotes only the line terminator it writes)."""
    return table.to_csv(index=False, quoting=csv.QUOTE_NONNUMERIC)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunDir:
    """A run dir at ``path``: where each file goes, the lock, and reading the summary."""

    LOCK = ".palign.lock"

    def __init__(self, path: Path | str):
        self.path = Path(path)

    # --- layout ----------------------------------------------------------------------------

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    @property
    def report(self) -> Path:
        return self.path / "report.md"

    @property
    def html(self) -> Path:
        """``report.html``: the report with its plots embedded, one self-contained page."""
        return self.path / "report.html"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    def results(self, method: str) -> Path:
        """Folder of ``method``'s per-subject rows."""
        return self.path / "results" / method

    def answers(self, method: str) -> Path:
        """Folder of ``method``'s answers files."""
        return self.path / "answers" / method

    def answers_file(self, method: str, case: int) -> Path:
        return self.answers(method) / f"{case}.csv"

    def artifacts(self, method: str) -> Path:
        return self.artifacts_root / method

    @property
    def replies_root(self) -> Path:
        """``replies/``: one folder per method (``evaluation=open_ended``)."""
        return self.path / "replies"

    def replies_file(self, method: str, case: int) -> Path:
        """``replies/<method>/<case>.csv``: the open-ended replies of one subject."""
        return self.replies_root / method / f"{case}.csv"

    def reply_files(self) -> dict[str, list[Path]]:
        """Every replies file, by method (by name), in case order; {} without replies."""
        root = self.replies_root
        methods = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        out = {m.name: sorted(m.glob("*.csv"), key=lambda p: int(p.stem)) for m in methods}
        return {m: files for m, files in out.items() if files}

    @property
    def judgments_root(self) -> Path:
        """``judgments/``: the judge's ratings (``palign judge``)."""
        return self.path / "judgments"

    def judgments_file(self, method: str, case: int) -> Path:
        """``judgments/<method>/<case>.csv``: the rating of each of one subject's replies."""
        return self.judgments_root / method / f"{case}.csv"

    @property
    def judgments_summary(self) -> Path:
        return self.judgments_root / "summary.json"

    def read_judgments_summary(self) -> dict | None:
        """``judgments/summary.json`` (:func:`palign.eval.judge.summarize`), None before
        ``palign judge`` rated the run; a :class:`RunDirError` names it when it is not JSON."""
        path = self.judgments_summary
        return _read(path, dict) if path.is_file() else None

    def answers_files(self, method: str) -> list[Path]:
        """``method``'s answers files, in case order."""
        folder = self.answers(method)
        return sorted(folder.glob("*.csv"), key=lambda p: int(p.stem)) if folder.is_dir() else []

    @property
    def artifacts_root(self) -> Path:
        """``artifacts/``: one folder per method, one per case inside."""
        return self.path / "artifacts"

    def artifact_methods(self) -> list[Path]:
        """The ``artifacts/<method>/`` folders, by name."""
        root = self.artifacts_root
        return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []

    def artifact_folders(self) -> list[Path]:
        """Every ``artifacts/<method>/<case>/`` folder, by method then name, and the
        ``artifacts/<method>/population/`` folder of a population method (what it trained once
        per run)."""
        return [p for m in self.artifact_methods() for p in sorted(m.iterdir()) if p.is_dir()]

    def population(self, method: str) -> Path:
        """``artifacts/<method>/population/``: what a population method trained once per run
        (``training_rows.csv``, ``population.json``, its adapters)."""
        return self.artifacts(method) / "population"

    def artifact_files(self, name: str) -> list[Path]:
        """Every file called ``name`` in an artifact folder (e.g. ``head_accuracy.npy``)."""
        return sorted(f for folder in self.artifact_folders() if (f := folder / name).is_file())

    def reader_files(self) -> list[Path]:
        """What a reader of the run wants beside the numbers: ``report.md``, ``report.html``,
        ``summary.json``, ``results.jsonl``, the judge's ``judgments/summary.json``, and the
        plots (those that exist)."""
        files = [self.report, self.html, self.summary, self.path / "results.jsonl"]
        files.append(self.judgments_summary)
        plots = sorted(self.plots.glob("*.png")) if self.plots.is_dir() else []
        return [f for f in files if f.is_file()] + plots

    @property
    def overrides(self) -> Path:
        """Hydra's record of the command-line overrides of the run (``.hydra/overrides.yaml``)."""
        return self.path / ".hydra" / "overrides.yaml"

    def rows_file(self, method: str, main: str) -> Path:
        """``results.jsonl`` for the run's main method, ``compare/<method>.jsonl`` else."""
        return self.path / ("results.jsonl" if method == main else f"compare/{method}.jsonl")

    @property
    def wandb_id(self) -> Path:
        """The W&B run id of this run dir (a resumed run continues that W&B run)."""
        return self.path / "wandb_run_id.txt"

    def has_results(self) -> bool:
        return (self.path / "results").is_dir()

    # --- writing ---------------------------------------------------------------------------

    def check_writable(self) -> None:
        """The run dir (or the nearest existing folder above it) accepts new files."""
        probe = self.path
        while not probe.exists():
            if probe.parent == probe:
                break
            probe = probe.parent
        if not probe.is_dir():
            raise RunDirError(f"{self.path}: {probe} is not a folder", "choose another run dir")
        if not os.access(probe, os.W_OK | os.X_OK):
            raise RunDirError(
                f"{self.path}: cannot write into {probe} (permission denied)",
                "choose a writable folder with hydra.run.dir=... or paths",
            )

    def check_free(self) -> None:
        """No live process holds the run dir (:meth:`lock`); a :class:`RunDirError` names it."""
        holder = self._holder(self.path / self.LOCK)
        if holder is not None:
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["since"]))
            raise RunDirError(
                f"{self.path} is in use by another palign run (pid {holder['pid']} on "
                f"{holder['host']}, since {since})",
                "wait for it to finish, or use another run dir",
            )

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run dir for this process: a second run on it refuses, naming the holder.
        A lock left by a process that is gone (killed) is taken over."""
        self.path.mkdir(parents=True, exist_ok=True)
        lock = self.path / self.LOCK
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        for attempt in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self.check_free()
                if attempt:
                    raise RunDirError(f"{lock}: cannot take over this lock file") from None
                lock.unlink(missing_ok=True)  # its holder is gone
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            break
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)

    @staticmethod
    def _holder(lock: Path) -> dict | None:
        """The live holder of ``lock``, or None when it is gone (or the file is unreadable)."""
        if not lock.is_file():
            return None
        try:
            holder = json.loads(lock.read_text())
            pid, host = int(holder["pid"]), str(holder["host"])
            float(holder["since"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if host == socket.gethostname() and not _alive(pid):
            return None
        return holder

    # --- reading ---------------------------------------------------------------------------

    def read_summary(self) -> Summary:
        """``summary.json``, checked: a :class:`RunDirError` names the file when it is missing,
        not JSON, lacks keys or has a newer schema."""
        path = self.summary
        if not path.is_file():
            raise RunDirError(f"{path}: missing (is {self.path} a finished palign run dir?)")
        return _read(path, Summary.from_json)

    def write_summary(self, summary: Summary) -> None:
        write_atomic(self.summary, json.dumps(summary.to_json(), indent=2))

    def read_config(self) -> DictConfig:
        """``config.yaml``; a :class:`RunDirError` names it when it is missing or unreadable."""
        if not self.config.is_file():
            raise RunDirError(f"{self.path}: not a palign run dir (no config.yaml)")
        try:
            return OmegaConf.load(self.config)
        except Exception as e:  # YAML syntax or encoding: the file is named, not a traceback
            raise RunDirError(
                f"{self.config}: not a readable config ({type(e).__name__})"
            ) from None

    def read_rows(self, method: str, main: str) -> list[ResultRow]:
        """The rows of ``method`` in subject order (``results.jsonl`` / ``compare/``)."""
        path = self.rows_file(method, main)
        if not path.is_file():
            raise RunDirError(f"{path}: missing (per-subject rows of {method})")
        lines = path.read_text(encoding="utf-8").splitlines()
        return [_read(path, ResultRow.from_json, line, n) for n, line in enumerate(lines, 1)]

    def finished_rows(self, method: str) -> dict[int, ResultRow]:
        """The per-subject rows already written for ``method``, by case (each checked: JSON,
        the keys of a row, a schema this palign reads)."""
        folder = self.results(method)
        done = {}
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            row = _read(path, ResultRow.from_json, fix="delete it to evaluate the subject again")
            done[row.case] = row
        return done

    def write_row(self, row: ResultRow) -> None:
        """One subject's result row, atomically, as ``results/<method>/<case>.json`` (what
        ``resume`` and ``merge`` read back)."""
        write_atomic(self.results(row.method) / f"{row.case}.json", json.dumps(row.to_json()))

    def write_rows(self, method: str, main: str, rows: Sequence[ResultRow]) -> None:
        text = "".join(json.dumps(r.to_json()) + "\n" for r in rows)
        write_atomic(self.rows_file(method, main), text)

    def link(self, target: Path, link: Path) -> None:
        """A relative symlink ``link`` -> ``target`` (the pair can be moved together)."""
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink() and not link.exists():
            link.symlink_to(os.path.relpath(target, link.parent), target_is_directory=True)


def _read(
    path: Path,
    record: Callable[[Any], R],
    text: str | None = None,
    line: int | None = None,
    fix: str | None = None,
) -> R:
    """``record`` (a ``from_json``) of the JSON in ``text`` (the file ``path``'s content when
    None; its ``line``-th line otherwise). A :class:`RunDirError` names the file (and line)
    that is not JSON or not such a record, with ``fix`` as its hint."""
    where = f"{path}: line {line}" if line is not None else str(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8") if text is None else text)
    except (ValueError, UnicodeDecodeError) as e:
        raise RunDirError(f"{where}: not valid JSON ({e})", fix) from None
    try:
        return record(data)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise RunDirError(f"{where}: {e}", fix) from None


# --- resume ---------------------------------------------------------------------------------

#: Config keys that may differ between a run and its resumption (where and how it is logged).
RESUME_FREE_KEYS = (
    "paths", "resume", "logger", "hardware", "task_name", "save_artifacts",
    # a hosted model's caps and transport: they change no answer (the cache holds those sent)
    "model.max_requests", "model.max_cost", "model.max_concurrency", "model.max_retries",
    "model.timeout_s", "model.api_key_env", "model.cache",
)  # fmt: skip


def check_resume(cfg: DictConfig, run_dir: RunDir) -> None:
    """With ``resume=<run dir>`` (which Hydra makes the run dir): ``out_dir`` must hold a palign
    run (a multirun job that had not started yet is the exception) whose ``config.yaml`` agrees
    with ``cfg`` except at :data:`RESUME_FREE_KEYS`. Without ``resume``, ``out_dir`` must not
    hold results of an earlier run."""
    out_dir, resume = run_dir.path, cfg.get("resume")
    saved_path = run_dir.config
    if not resume:
        if run_dir.has_results():
            raise RunDirError(
                f"{out_dir} already holds results of a run: pass resume={out_dir} to continue "
                "it, or choose another hydra.run.dir"
            )
        return
    if not saved_path.is_file():
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            return
        raise RunDirError(f"resume={resume}: no palign run in {out_dir} (no config.yaml)")
    saved = run_dir.read_config()
    if "evaluation" not in saved and cfg.get("evaluation", {}).get("name") == "inventory":
        ignore = (*RESUME_FREE_KEYS, "evaluation")  # a run from before evaluation=: inventory
    else:
        ignore = RESUME_FREE_KEYS
    diff = config_differences(saved, cfg, ignore)
    if diff:
        raise RunDirError(
            f"resume={resume}: the config differs from the run's {saved_path} at "
            f"{', '.join(diff[:8])}; resume with the same overrides or start a new run"
        )


def config_differences(a: DictConfig, b: DictConfig, ignore: Sequence[str] = ()) -> list[str]:
    """Dotted keys at which the resolved configs ``a`` and ``b`` differ, except under the
    dotted keys of ``ignore``."""
    skip = set(ignore)

    def walk(x, y, prefix: str) -> list[str]:
        if prefix.rstrip(".") in skip:
            return []
        if isinstance(x, dict) and isinstance(y, dict):
            return [
                d
                for k in sorted(set(x) | set(y))
                for d in walk(x.get(k), y.get(k), f"{prefix}{k}.")
            ]
        return [] if x == y else [prefix.rstrip(".")]

    return walk(
        OmegaConf.to_container(a, resolve=True), OmegaConf.to_container(b, resolve=True), ""
    )
