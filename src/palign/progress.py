"""Progress bars inside a subject (the runner's bar counts subjects)."""

from __future__ import annotations

import lightning as L
from tqdm.auto import tqdm


class StepBar(L.Callback):
    """A tqdm bar over optimiser steps (``trainer.global_step``) with an ETA, across epochs and
    gradient accumulation; closed when training ends."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc = total, desc
        self.bar: tqdm | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.bar = tqdm(total=self.total, desc=self.desc, unit="step", leave=False)

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        self.bar.update(trainer.global_step - self.bar.n)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.bar.close()
