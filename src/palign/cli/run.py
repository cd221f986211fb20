"""``python -m palign``: the Hydra app (see ``conf/config.yaml``).

The run dir and ``resume`` are checked before Hydra starts (Hydra would create the folder and
write ``.hydra/`` into it), so a refused run leaves an existing run dir as it was
(:func:`precheck`). A run works under palign's stop policy (:mod:`palign.stopping`): SIGTERM or
SIGINT stops it at the next safe point with one line that says how to continue it
(:func:`continue_command`), exit status 143 or 130. In a job submitit runs, its requeue signal
(preemption, time limit) stops it the same way, and submitit then requeues it: the job's next
attempt resumes its run dir (:mod:`palign.runs.requeue`). A sweep whose jobs run in this process
is under the policy between its jobs as well.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import sys
from collections.abc import Sequence

import hydra
from omegaconf import DictConfig

from palign import CONF_DIR
from palign.errors import RunDirError, Stopped, cli
from palign.stopping import stop_on_signals

log = logging.getLogger("palign")

#: What ``resume=`` continues, as the last job this process started saw it (a sweep's dir).
_resume_at: str | None = None


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def app(cfg: DictConfig) -> float | None:
    from palign.runs.runner import run
    from palign.runs.sweep import objective

    global _resume_at
    requeue = _requeue_signal()
    _resume_at = _resume_dir(cfg)
    with cli("palign", log):
        try:
            with stop_on_signals(requeue):
                return objective(cfg, run(cfg))
        except Stopped as stop:
            if stop.requeue:  # the lock and the loggers are released: the scheduler's turn
                print(f"palign: {stop}", file=sys.stderr, flush=True)
                signal.getsignal(requeue)(requeue, None)  # requeues and exits
            stop.resume = continue_command(sys.argv[1:], _resume_at)
            raise


def _requeue_signal() -> int | None:
    """In a job submitit runs (``hydra/launcher=slurm``, ``submitit_local``): the signal on
    which submitit requeues it (SIGUSR2 unless ``$SUBMITIT_PREEMPT_SIGNAL``), whose handler
    submitit has installed; None elsewhere."""
    if "SUBMITIT_FOLDER" not in os.environ:
        return None
    from submitit.core.job_environment import JobEnvironment

    return JobEnvironment._usr_sig()


def _resume_dir(cfg: DictConfig) -> str:
    """What ``resume=`` continues: the sweep dir of a multirun job, else the run dir."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get() if HydraConfig.initialized() else None
    if hydra_cfg is not None and hydra_cfg.mode == RunMode.MULTIRUN:
        return str(hydra_cfg.sweep.dir)
    return str(cfg.paths.output_dir)


def continue_command(argv: Sequence[str], resume_dir: str | None) -> str:
    """The shell command that continues a stopped run: ``python -m palign`` with the same
    arguments, where it was written (``resume``, ``hydra.run.dir``, ``hydra.sweep.dir``)
    replaced by ``resume=<resume_dir>``; the same command when nothing was written yet
    (``resume_dir`` None)."""
    from palign.config.schema import hydra_value

    if resume_dir is None:
        return shlex.join(["python", "-m", "palign", *argv])
    placed = ("resume", "hydra.run.dir", "hydra.sweep.dir")
    kept = [a for a in argv if a.split("=", 1)[0].lstrip("+~") not in placed]
    return shlex.join(["python", "-m", "palign", *kept, f"resume={hydra_value(resume_dir)}"])


def _override(argv: Sequence[str], key: str) -> str | None:
    """The value the command line gives ``key`` (Hydra's override syntax and quoting), or
    None when it gives none (or null)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = [a for a in argv if not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # Hydra reports a malformed override itself
        return None
    values = [o.value() for o in parsed if o.key_or_group == key and not o.is_delete()]
    value = values[-1] if values else None
    return None if value in (None, "", "null") else str(value)


def precheck(argv: Sequence[str]) -> None:
    """What can be checked before Hydra creates the run dir and writes ``.hydra/`` into it, so
    that a refused run leaves an existing run dir as it was: an explicit ``hydra.run.dir`` is
    writable and, without ``resume``, holds no results; ``resume=<dir>`` holds a palign run
    (a sweep dir for ``-m``), its result rows are readable, no other run holds it, and (single
    runs) its ``config.yaml`` agrees with the overrides given (:func:`palign.rundir.check_resume`).
    A single run's config is composed here first, so that a config Hydra cannot compose (a key
    its schema lacks, an unknown option) is one error line, before any folder is made; then its
    :func:`~palign.config.plan` is made (the data, the subjects, the methods and every configured
    value checked), so that a refused run leaves no run dir."""
    from palign.config import plan
    from palign.config.schema import compose_checked

    multirun = any(a in ("-m", "--multirun") for a in argv)
    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in argv):
        return  # --cfg, --help, ...: Hydra only prints
    cfg = None if multirun else compose_checked(list(argv), return_hydra_config=True)
    _check_run_dir(argv, cfg)
    if cfg is not None:
        plan(cfg)


def _check_run_dir(argv: Sequence[str], cfg: DictConfig | None) -> None:
    """:func:`precheck`'s checks of the run dir (``cfg``: the composed config of a single run,
    None for a multirun)."""
    from palign.rundir import RunDir

    multirun = cfg is None
    resume, run_dir_arg = _override(argv, "resume"), _override(argv, "hydra.run.dir")
    if resume is None:
        if run_dir_arg is not None and not multirun:
            run_dir = RunDir(run_dir_arg)
            run_dir.check_writable()
            if run_dir.has_results():
                raise RunDirError(
                    f"{run_dir.path} already holds results of a run: pass resume="
                    f"{run_dir.path} to continue it, or choose another hydra.run.dir"
                )
        return
    run_dir = RunDir(resume)
    if multirun:
        if not run_dir.path.is_dir():
            raise RunDirError(f"resume={resume}: no such sweep dir")
        return
    if not run_dir.config.is_file():
        raise RunDirError(
            f"resume={resume}: no palign run there (no config.yaml)",
            "resume= takes the run dir of an earlier `python -m palign` run",
        )
    run_dir.check_free()
    for folder in sorted(run_dir.path.glob("results/*/")):
        run_dir.finished_rows(folder.name)
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from palign.rundir import check_resume

    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir.path.resolve())
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    check_resume(cfg, run_dir)


def main() -> None:
    from palign.config import register_all

    global _resume_at
    register_all()
    argv, _resume_at = sys.argv[1:], None
    with cli("palign"):
        precheck(argv)
        if not any(a in ("-m", "--multirun") for a in argv):
            app()
            return
        try:  # the policy holds between the jobs of a sweep too (each job: app's own block)
            with stop_on_signals(between_jobs=True):
                app()
        except Stopped as stop:  # between two jobs (one stopped in a job exits in app)
            stop.resume = continue_command(argv, _resume_at or _override(argv, "resume"))
            raise


if __name__ == "__main__":
    main()
