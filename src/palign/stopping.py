"""palign's stop policy: SIGTERM and SIGINT stop the work at its next safe point.

SIGTERM is what ``scancel``, a SLURM time limit or preemption, ``docker stop``, Kubernetes and a
reclaimed spot instance send before they kill (SIGKILL after a grace period); SIGINT is Ctrl-C.
Entry points run their work inside :func:`stop_on_signals`: the first signal only records the
request, and the work raises :class:`~palign.errors.Stopped` at its next safe point
(:func:`check`):

- between groups of subjects (the runner; it records how many are done);
- between batches of every Trainer palign makes (scoring, generation, activation collection,
  training steps): its :class:`StopAtBatchEnd` callback;
- between the Newton steps of the probe fit, the micro-batches of DPO's reference log-probs and
  the tokens of ``palign generate``.

Nothing half done is kept: a subject's answers, artifact and row are written only once it is
done, so :class:`Stopped` leaves the run dir as the finished subjects left it, and the cleanup on
its way up (the run dir's lock, the loggers) runs as for any exception. A second signal raises
:class:`Stopped` at once, wherever the work is; a third gets the default action (the process
ends). Outside :func:`stop_on_signals` (palign as a library) nothing is installed and
:func:`check` never raises.

A sweep that runs its jobs in this process (Hydra's basic launcher) holds the policy from its
start to its end (``between_jobs``): a signal between two jobs stops it at once, one during a job
at the job's next safe point, and no further job starts.

A cluster job's scheduler may also send a *requeue* signal (submitit's SIGUSR2, sent by SLURM
before the time limit and after the SIGTERM of a preemption): it stops the work the same way
(never at once) and marks the stop as one to requeue; the job's entry point then hands over to
the scheduler's own handler, which requeues the job to resume where it stopped.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import lightning as L

from palign.errors import Stopped

#: The signals that stop a run.
SIGNALS = (signal.SIGTERM, signal.SIGINT)

_installed = False
_deferred = False  # the signals stop at the next safe point (else at once)
_requested: int | None = None
_progress = ""
_requeue: int | None = None  # the requeue signal while one is handled
_requeue_seen = False
_jobs_done = 0  # the jobs an outer block (a sweep) saw end


def in_force() -> bool:
    """Whether :func:`stop_on_signals` handles the signals now."""
    return _installed


def stopped() -> Stopped | None:
    """What a safe point would raise now (a requested stop and the progress recorded), or None
    when no stop was requested: e.g. for a logger to say why its run ended."""
    if _requested is None:
        return None
    return Stopped(_requested, _progress, requeue=_requeue_seen)


def check(progress: str | None = None) -> None:
    """A safe point: raise :class:`Stopped` if a stop was requested. ``progress`` (e.g. ``2 of
    120 subjects (few_shot)``) records how far the work got, for this stop line or a later
    one."""
    global _progress
    if progress is not None:
        _progress = progress
    stop = stopped()
    if stop is not None:
        raise stop


def _handle(signum: int, frame: object) -> None:
    """In a block that stops at safe points, the first signal is recorded; the second raises
    :class:`Stopped` at once and gives the signals their default action back; the requeue
    signal is recorded, never at once. Between the jobs of an outer block (nothing is half
    done there) a signal raises :class:`Stopped` at once."""
    global _requested, _requeue_seen
    if not _deferred:
        n = _jobs_done
        raise Stopped(signum, f"{n} job{'' if n == 1 else 's'} of the sweep")
    if signum == _requeue:
        _requeue_seen = True
    if _requested is None or signum == _requeue:
        _requested = _requested or signum
        return
    for s in SIGNALS:
        signal.signal(s, signal.SIG_DFL)
    raise Stopped(signum, _progress, at_once=True)


@contextmanager
def stop_on_signals(requeue: int | None = None, *, between_jobs: bool = False) -> Iterator[None]:
    """Handle :data:`SIGNALS` (and ``requeue``, a cluster job's requeue signal) by the stop
    policy for the block; on exit the handlers that were there before are put back and the
    request is forgotten. Outside the main thread (where Python installs no handler) nothing is
    installed.

    ``between_jobs``: the block runs jobs that each hold a block of their own (a sweep's jobs
    in this process): outside them a signal stops at once, since nothing is half done there;
    inside one it stops at the job's next safe point, and a stop requested after the job's last
    safe point stops the outer block as soon as the job ends (the next job does not start).
    Any other nested block is the outer one."""
    global _installed, _deferred, _requested, _progress, _requeue, _requeue_seen, _jobs_done
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _installed:
        if _deferred or between_jobs:
            yield
            return
        with _job():
            yield
        return
    signals = (*SIGNALS, *([requeue] if requeue is not None else []))
    previous = {s: signal.getsignal(s) for s in signals}
    _requested, _progress, _requeue, _requeue_seen = None, "", requeue, False
    _deferred, _jobs_done = not between_jobs, 0
    for s in signals:
        signal.signal(s, _handle)
    _installed = True
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        _installed, _deferred, _requested, _progress = False, False, None, ""
        _requeue, _requeue_seen, _jobs_done = None, False, 0


@contextmanager
def _job() -> Iterator[None]:
    """One job inside a ``between_jobs`` block: its signals stop at its safe points."""
    global _deferred, _requested, _progress, _jobs_done
    _deferred, _requested, _progress = True, None, ""
    try:
        yield
        pending = stopped()
    finally:
        _deferred, _requested, _progress = False, None, ""
    _jobs_done += 1
    if pending is not None:
        raise pending


class StopAtBatchEnd(L.Callback):
    """A safe point after every predict batch and every training batch: a Trainer's run stops
    between batches (:func:`check`); what it had computed is dropped with it."""

    def on_predict_batch_end(self, *args) -> None:
        check()

    def on_train_batch_end(self, *args) -> None:
        check()
