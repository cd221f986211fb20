"""palign's errors: one base class for everything reported to a user as one line.

Every error that describes bad input or an impossible config derives from :class:`PalignError`
and names its culprit (file, record, field or config key, the value, what is allowed). Entry
points run under :func:`cli`: a ``PalignError`` is printed as ``<prog>: error: <message>`` and,
when it has one, ``<prog>: hint: <hint>``, exit status 1; its traceback only when
``PALIGN_TRACEBACK=1`` is set. Any other exception is a bug and shows its traceback as usual.

:class:`Stopped` is not an error: the process was told to stop (SIGTERM, SIGINT) and did so at a
safe point (:mod:`palign.stopping`); :func:`cli` prints its one line and exits 128 + the signal.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

#: Set to 1 to print the traceback of a reported error too.
TRACEBACK_ENV = "PALIGN_TRACEBACK"


class PalignError(Exception):
    """Bad input or an impossible config, reported as one line. ``hint``: what to do about it
    (optional)."""

    hint: str = ""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        if hint is not None:
            self.hint = hint


class ConfigError(PalignError, ValueError):
    """An impossible or unknown config value or command-line flag; the message names the key."""


class DataError(PalignError, ValueError):
    """A data file is missing or malformed; the message names the file and the record."""


class ModelError(PalignError, RuntimeError):
    """A model cannot be loaded, placed or scored as configured."""


class ModelLoadError(ModelError):
    """A model cannot be loaded here; the message says which config key and what to do."""


class PASError(ConfigError):
    """PAS cannot proceed; the message says what is wrong and where."""


class ArtifactError(PalignError, ValueError):
    """A saved artifact (profile, adapter, activation cache) is corrupt or does not fit."""


class RunDirError(PalignError, RuntimeError):
    """A run dir cannot be used as asked (held by another run, not a palign run, would be
    overwritten, disagrees with its summary)."""


class Stopped(BaseException):
    """The process was told to stop (``signum``: SIGTERM, SIGINT, ...) and stopped at a safe
    point, or at once on a second signal (``at_once``). A ``BaseException``, as
    ``KeyboardInterrupt`` is, so that no ``except Exception`` on its way up takes it for a failure
    to recover from. ``progress``: how far the work got (e.g. ``2 of 120 subjects (few_shot)``);
    ``resume``: the command that continues it, filled in by the entry point that knows it;
    ``requeue``: a cluster job is requeued instead (:func:`palign.stopping.stop_on_signals`)."""

    def __init__(
        self, signum: int, progress: str = "", at_once: bool = False, requeue: bool = False
    ):
        super().__init__(signum)
        self.signum, self.progress, self.at_once = int(signum), progress, at_once
        #: A cluster job is to be requeued (its scheduler's preemption or time-limit signal).
        self.requeue = requeue
        self.resume = ""

    @property
    def signal_name(self) -> str:
        """``SIGTERM``, ``SIGINT``, ... (the number for a signal without a name)."""
        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return str(self.signum)

    @property
    def exit_code(self) -> int:
        """128 + the signal: 143 for SIGTERM, 130 for SIGINT (what a shell reports for a process
        the signal ended)."""
        return 128 + self.signum

    def __str__(self) -> str:
        text = f"stopped by {self.signal_name}" + (" at once" if self.at_once else "")
        text += f" after {self.progress}" if self.progress else ""
        if self.requeue:
            return text + "; requeued: the job resumes where it stopped"
        return text + (f"; continue with: {self.resume}" if self.resume else "")


def wants_traceback() -> bool:
    return os.environ.get(TRACEBACK_ENV, "").strip() not in ("", "0")


def report(prog: str, error: PalignError) -> str:
    """The lines :func:`cli` prints for ``error``."""
    text = f"{prog}: error: {error}"
    return text + (f"\n{prog}: hint: {error.hint}" if error.hint else "")


def _log_to_files(
    log: logging.Logger, error: PalignError | Stopped, level: int = logging.ERROR
) -> None:
    """``error`` as a record of ``log`` at ``level``, handled only by the file handlers it
    reaches."""
    record = log.makeRecord(log.name, level, __file__, 0, "%s", (error,), None)
    logger: logging.Logger | None = log
    while logger is not None:
        for handler in logger.handlers:
            if isinstance(handler, logging.FileHandler) and record.levelno >= handler.level:
                handler.handle(record)
        logger = logger.parent if logger.propagate else None


@contextmanager
def cli(prog: str, log: logging.Logger | None = None) -> Iterator[None]:
    """Run an entry point's body: a :class:`PalignError` ends the process with status 1 and
    :func:`report`'s lines on stderr (and in ``log``'s files, e.g. the run's log file: not on
    its console handlers, which would show the error a second time); :class:`Stopped` ends it
    with its exit code (130, 143) and its one line, ``<prog>: stopped by ...``."""
    try:
        yield
    except Stopped as e:
        from palign.progress import close_bars

        if log is not None:
            _log_to_files(log, e, logging.WARNING)
        close_bars()
        print(f"{prog}: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except PalignError as e:
        if log is not None:
            _log_to_files(log, e)
        if wants_traceback():
            traceback.print_exc()
        print(report(prog, e), file=sys.stderr)
        sys.exit(1)
