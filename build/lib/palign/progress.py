"""Progress bars inside a subject (the runner's bar counts subjects): optimiser steps, and
batches of prompts scored or generated."""

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


class BatchBar(L.Callback):
    """A tqdm bar over the batches of each predict run (scoring, generation, activations) with
    an ETA; shown only for runs of at least ``min_batches`` batches, closed when the run ends.
    ``desc`` is set by the caller before each run."""

    def __init__(self, desc: str = "scoring", min_batches: int = 2):
        self.desc, self.min_batches = desc, min_batches
        self.bar: tqdm | None = None

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        total = sum(trainer.num_predict_batches)
        if total >= self.min_batches:
            self.bar = tqdm(total=total, desc=self.desc, unit="batch", leave=False)

    def on_predict_batch_end(self, trainer: L.Trainer, *args) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
