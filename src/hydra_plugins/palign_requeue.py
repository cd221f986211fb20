"""palign's submitit launchers (Hydra finds launchers only in its ``hydra_plugins`` package):
Hydra's own, whose requeued jobs resume their run dir (:mod:`palign.runs.requeue`)."""

from hydra_plugins.hydra_submitit_launcher import submitit_launcher

from palign.runs.requeue import Resuming


class SlurmLauncher(Resuming, submitit_launcher.SlurmLauncher):
    """Hydra's SLURM launcher; a requeued job resumes its run dir."""


class LocalLauncher(Resuming, submitit_launcher.LocalLauncher):
    """Hydra's local submitit launcher; a requeued job resumes its run dir."""
