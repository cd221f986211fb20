"""What Hydra's submitit launchers need for jobs that resume when they are requeued.

A job submitit runs is requeued when SLURM preempts it or it nears its time limit (submitit's
SIGUSR2): palign stops it at the next safe point (:mod:`palign.stopping`), then submitit calls the
launcher's ``checkpoint`` and requeues the job with what it returns. Hydra's launchers return the
job's first command line, which would refuse the run dir that now holds results; these return it
with ``resume=<sweep dir>``, so the next attempt keeps the finished subjects and evaluates the
others. A job SLURM requeues by itself (a preemption with ``PreemptMode=REQUEUE``, whose SIGTERM
stopped the run; a node failure) starts again with its first command line: the launcher's
``__call__`` then resumes the sweep dir too, whenever the job's own dir already holds a run.
Hydra takes launchers only from its plugin package: the launchers themselves are
``hydra_plugins.palign_requeue.SlurmLauncher`` (``conf/hydra/launcher/slurm.yaml``) and
``LocalLauncher`` (``hydra/launcher=submitit_local`` with that ``hydra.launcher._target_``, to
try it on one machine), :class:`Resuming` over Hydra's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def resumed(sweep_overrides: Sequence[str], sweep_dir: str) -> list[str]:
    """A job's overrides with ``resume=<sweep_dir>`` in place of any ``resume`` they have."""
    from palign.config.schema import hydra_value  # not at import: Hydra imports every plugin

    kept = [o for o in sweep_overrides if o.split("=", 1)[0].lstrip("+~") != "resume"]
    return [*kept, f"resume={hydra_value(sweep_dir)}"]


class Resuming:
    """A submitit launcher's ``checkpoint`` (the job again, resuming its sweep dir), and its
    ``__call__`` (a job whose dir already holds a run resumes it)."""

    def __call__(
        self,
        sweep_overrides: Sequence[str],
        job_dir_key: str,
        job_num: int,
        job_id: str,
        singleton_state: dict,
    ) -> Any:
        from hydra.core.singleton import Singleton

        Singleton.set_state(singleton_state)  # what loading the job's config needs
        if self._started(sweep_overrides, job_num):
            sweep_overrides = resumed(sweep_overrides, str(self.config.hydra.sweep.dir))
        return super().__call__(
            list(sweep_overrides), job_dir_key, job_num, job_id, singleton_state
        )

    def _started(self, sweep_overrides: Sequence[str], job_num: int) -> bool:
        """Whether job ``job_num``'s dir holds a run (its ``config.yaml``): an earlier attempt
        of this job started evaluating there."""
        from pathlib import Path

        from hydra.core.hydra_config import HydraConfig
        from hydra.core.utils import setup_globals
        from omegaconf import open_dict

        setup_globals()
        config = self.hydra_context.config_loader.load_sweep_config(
            self.config, list(sweep_overrides)
        )
        with open_dict(config):
            config.hydra.job.num = job_num
        HydraConfig.instance().set_config(
            config
        )  # the dir names read ${hydra:...} (as Hydra's run_job)
        job_dir = Path(str(config.hydra.sweep.dir)) / str(config.hydra.sweep.subdir)
        return (job_dir / "config.yaml").is_file()

    def checkpoint(self, sweep_overrides: Sequence[str], *args: Any, **kwargs: Any) -> Any:
        import submitit

        # The sweep config keeps the first resolution of ${now:...}: the same dir as the job's.
        sweep_dir = str(self.config.hydra.sweep.dir)
        return submitit.helpers.DelayedSubmission(
            self, resumed(sweep_overrides, sweep_dir), *args, **kwargs
        )
