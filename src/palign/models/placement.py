"""Where the model lives, decided once by palign: devices, and Trainers that never move weights.

A model is placed when it is loaded (:mod:`palign.models.loading`): on one device (``cpu``,
``cuda``, ``cuda:1``), or spread over every visible GPU by ``device_map="auto"`` (``auto``), or
as 4-bit bitsandbytes layers on either. Lightning's own strategies would undo that: their
``model_to_device`` calls ``.to(root_device)`` on the whole LightningModule (pulling a model
spread over GPUs onto one, and moving 4-bit weights behind bitsandbytes' back), and their
``teardown`` calls ``.cpu()`` after every ``predict``/``fit`` (a whole-model copy GPU -> CPU ->
GPU each time). :class:`PlacedStrategy` does neither; everything palign creates beside the model
(reference log-probs, a PPO value head) is created on :attr:`LoadedModel.device` directly.
"""

from __future__ import annotations

import logging
import re
import warnings

import lightning as L
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy

from palign import stopping
from palign.errors import ConfigError

#: Values of ``hardware.device``.
DEVICE_HELP = "'cpu', 'cuda', 'cuda:<index>' or 'auto' (the model spread over all visible GPUs)"
#: Trainer precisions that leave the weights as loaded (the others convert the module's dtype).
PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed")


class PlacementError(ConfigError):
    """The configured device or precision cannot be used here; the message names the key."""


def check_device_form(device: str) -> None:
    """Refuse a ``hardware.device`` that names no device (whether or not it is present)."""
    if not (device in ("cpu", "auto") or re.fullmatch(r"cuda(:\d+)?", device)):
        raise PlacementError(f"hardware.device={device!r} is not one of {DEVICE_HELP}")


def check_device(device: str) -> None:
    """Refuse, before any work, a ``hardware.device`` that is malformed or not present here."""
    check_device_form(device)
    if device == "cpu":
        return
    if not torch.cuda.is_available():
        raise PlacementError(
            f"hardware.device={device!r}: no CUDA GPU is visible here (torch "
            f"{torch.__version__}, torch.cuda.is_available() is False); use hardware=cpu, or on a "
            "GPU machine install a CUDA build of torch (make setup TORCH=torch)"
        )
    index = int(device.split(":")[1]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        raise PlacementError(
            f"hardware.device={device!r}: only {torch.cuda.device_count()} GPU(s) visible"
        )


def placement_map(device: str) -> str | dict[str, str]:
    """The ``from_pretrained(device_map=...)`` that places a model on ``device`` while loading."""
    check_device(device)
    return "auto" if device == "auto" else {"": device}


def check_precision(precision: str) -> str:
    if str(precision) not in PRECISIONS:
        raise PlacementError(
            f"hardware.precision={precision!r} would convert the loaded weights; use one of "
            f"{PRECISIONS} (the weights' dtype is model.dtype / hardware.dtype)"
        )
    return str(precision)


class PlacedStrategy(SingleDeviceStrategy):
    """Lightning's single-device strategy for a model that palign has already placed.

    ``root_device`` is where batches go (the device of the input embeddings). The module is
    never moved: not to the root device at set-up, not to the CPU at teardown.
    """

    def model_to_device(self) -> None:
        return None

    def teardown(self) -> None:
        # Strategy.teardown() moves the optimizers' state and the whole module to the CPU; skip
        # both (the optimizers are dropped with the Trainer) and release the rest as usual.
        self.precision_plugin.teardown()
        self.accelerator.teardown()
        self.checkpoint_io.teardown()


class PlacedTrainer(L.Trainer):
    """A Trainer under palign's stop policy (:mod:`palign.stopping`) where it is in force: it
    stops between batches (:class:`~palign.stopping.StopAtBatchEnd`), and Lightning's own
    reaction to SIGTERM is off (it ends a fit with a ``SystemExit`` of status 0 and ignores
    SIGTERM in predict). Lightning still calls the policy's handler: it chains the handler it
    finds when a run starts."""

    @property
    def received_sigterm(self) -> bool:
        return False if stopping.in_force() else super().received_sigterm


def make_trainer(
    device: torch.device, precision: str = "32-true", **trainer_kwargs
) -> PlacedTrainer:
    """A Trainer over the model placed on ``device`` (its input device): never moves the model,
    no logger, checkpoints or bars of its own (the runner has them); it stops between batches
    when a stop is requested (:class:`PlacedTrainer`)."""
    # Lightning's per-Trainer banners (GPU available, tips) are noise in a per-subject loop, and
    # so is its "Received SIGTERM" (the stop line says it).
    for name in ("utilities.rank_zero", "trainer.connectors.signal_connector"):
        logging.getLogger(f"lightning.pytorch.{name}").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    device = torch.device(device)
    accelerator = "gpu" if device.type == "cuda" else device.type
    settings = dict(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    callbacks = [*trainer_kwargs.pop("callbacks", []), stopping.StopAtBatchEnd()]
    return PlacedTrainer(
        accelerator=accelerator,
        devices=1,
        strategy=PlacedStrategy(device=device),
        precision=check_precision(precision),
        callbacks=callbacks,
        **{**settings, **trainer_kwargs},
    )
