"""Progress bars inside a subject (the runner's bar counts subjects): optimiser steps, and
batches of prompts scored or generated; and one bar across the phases of a one-off job (the
embedded model's GGUF conversion)."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

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

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception) -> None:
        if self.bar is not None:
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

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception) -> None:
        """A run that ends early (e.g. a stop, :mod:`palign.stopping`) takes its bar along."""
        self.on_predict_end(trainer, pl_module)


def close_bars() -> None:
    """Close every tqdm bar still open, e.g. the runner's subject bar when a stop ends the run
    mid-way: what is printed next starts on a line of its own."""
    for bar in list(tqdm._instances):
        bar.close()


class PhaseBar:
    """One tqdm bar (in percent, with an ETA) across the phases of a one-off job whose phases
    have known relative costs, e.g. the conversion of a GGUF model.

    ``phases`` maps each phase's label to its share of the work (any positive numbers; they are
    normalised to 100 %), in the order they run; ``seconds`` is the expected total on a typical
    machine, used only until the first phase ends. A phase is either opaque (:meth:`phase`: the
    bar advances with the time elapsed against the phase's expected duration, calibrated on the
    phases already done, and stops short of the phase's end until it really ends) or counted
    (:meth:`items`: the bar advances per item). The current phase's label is the postfix; the
    ETA is the elapsed time scaled by the work left (``smoothing=0``), so it adapts to the
    machine after the first phase. A daemon thread refreshes the bar every ``tick`` seconds, so
    elapsed time and ETA stay live during long opaque phases. Use it as a context manager.
    """

    def __init__(
        self, desc: str, phases: dict[str, float], seconds: float, tick: float = 0.5
    ) -> None:
        scale = 100.0 / sum(phases.values())
        self.shares = {label: share * scale for label, share in phases.items()}
        self.prior = seconds / 100.0  # expected seconds per percent, until measured
        self.tick = tick
        self.bar = tqdm(
            total=100,
            desc=desc,
            leave=False,
            smoothing=0,
            bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]",
        )
        self.base = 0.0  # percent done when the current phase started
        self.base_elapsed = 0.0  # seconds elapsed then
        self.share = 0.0  # the current phase's share
        self.opaque_since: float | None = None  # start of the current opaque phase
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._tick, name="PhaseBar", daemon=True)
        self.thread.start()

    def __enter__(self) -> PhaseBar:
        return self

    def __exit__(self, *exc) -> None:
        self.close(done=exc[0] is None)

    def _seconds_per_percent(self) -> float:
        """Measured on the phases done (the prior before any is)."""
        return self.base_elapsed / self.base if self.base >= 1.0 else self.prior

    def _set(self, n: float, label: str | None = None) -> None:
        """Move the bar to ``n`` percent (never backwards); caller holds the lock."""
        if label is not None:
            self.bar.set_postfix_str(label, refresh=False)
        n = min(n, 100.0)  # float shares may sum to a hair over 100
        if n > self.bar.n:
            self.bar.update(n - self.bar.n)
        else:
            self.bar.refresh()

    def _tick(self) -> None:
        while not self.stop.wait(self.tick):
            with self.lock:
                if self.opaque_since is None:
                    self.bar.refresh()
                    continue
                expected = self.share * self._seconds_per_percent()
                done = min((time.monotonic() - self.opaque_since) / max(expected, 1e-6), 0.9)
                self._set(self.base + done * self.share)

    def _finish_phase(self) -> None:
        """Count the current phase as done; caller holds the lock."""
        self.base += self.share
        self.share = 0.0
        self.opaque_since = None
        self.base_elapsed = self.bar.format_dict["elapsed"]
        self._set(self.base)

    def _begin(self, label: str, shown: str, opaque: bool) -> None:
        with self.lock:
            self._finish_phase()  # a no-op unless the previous phase was left early
            self.share = self.shares[label]
            self.opaque_since = time.monotonic() if opaque else None
            self._set(self.base, shown)

    def _end(self) -> None:
        with self.lock:
            self._finish_phase()

    @contextmanager
    def phase(self, label: str):
        """An opaque phase: the bar advances with time until the block ends."""
        self._begin(label, label, opaque=True)
        yield
        self._end()

    def items(self, label: str, iterable, total: int | None = None):
        """A counted phase: yield from ``iterable``, advancing the bar per item; the postfix
        shows ``label i/total``."""
        total = len(iterable) if total is None else total
        self._begin(label, f"{label} 0/{total}", opaque=False)
        for i, item in enumerate(iterable, 1):
            yield item
            with self.lock:
                self._set(self.base + self.share * i / max(total, 1), f"{label} {i}/{total}")
        self._end()

    def close(self, done: bool = True, label: str | None = None) -> None:
        """Stop the refresh thread; when ``done``, show 100 % (and ``label``) before closing."""
        self.stop.set()
        self.thread.join()
        with self.lock:
            if done:
                self._set(100.0, label)
            self.bar.close()
