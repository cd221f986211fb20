"""What Hydra's submitit launchers need for jobs that resume when they are requeued.

A job submitit runs is requeued when SLURM preempts it or it nears its time limit (submitit's
SIGUSR2): palign stops it at the next safe point (:mod:`palign.stopping`), then submitit calls the
launcher's ``checkpoint`` and requeues the job with what it returns. Hydra's launchers return the
job's first command line, which would refuse the run dir that now holds results; these return it
with ``resume=<sweep dir>``, so the next attempt keeps the finished subjects and evaluates the
others. Hydra takes launchers only from its plugin package: the launchers themselves are
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
    """A submitit launcher's ``checkpoint``: the job again, resuming its sweep dir."""

    def checkpoint(self, sweep_overrides: Sequence[str], *args: Any, **kwargs: Any) -> Any:
        import submitit

        # The sweep config keeps the first resolution of ${now:...}: the same dir as the job's.
        sweep_dir = str(self.config.hydra.sweep.dir)
        return submitit.helpers.DelayedSubmission(
            self, resumed(sweep_overrides, sweep_dir), *args, **kwargs
        )
