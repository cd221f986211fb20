"""A run stops when it is told to (SIGTERM, SIGINT) and picks up where it stopped.

Each case runs ``python -m palign`` (or ``palign generate``) in this process through its real
``main`` on tiny_llama and sends the signal to this process from inside one phase: scoring,
generation, activation collection, probe fitting, LoRA training. The signal is sent when the
phase's function is entered for the n-th time (so that the timing is the same on every machine);
what is tested is what palign then does: the exit status (143, 130), the one ``stopped by ...``
line with the command that continues, the released lock, no row, answers file or artifact of
the subject in flight, the finished rows untouched, and that the command in the line finishes
the run with every subject once and the numbers of a run never stopped. One real process is
stopped by ``kill -TERM`` once its first row is written.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from palign import cache_root, stopping
from palign.errors import Stopped
from palign.eval import scoring
from palign.methods import dpo
from palign.methods import pas as pas_method
from palign.pas import activations, probes
from palign.rundir import RunDir
from palign.runs.runner import run
from test_bad_inputs import invoke

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=tiny_llama", "hardware=cpu", "dataset.limit=2"]
PAS = ["method=pas", "method.top_k=2", "method.folds=2", "method.alphas=[0,1]"]


def signal_on(monkeypatch, owner, name: str, signum: int, when=None, times: int = 1) -> list:
    """Send ``signum`` to this process (``times`` times) the first time ``owner.name`` is
    entered while ``when()`` holds (default: always), before it runs; returns the list of its
    calls (one entry each)."""
    original, calls, sent = getattr(owner, name), [], []

    def entered(*args, **kwargs):
        calls.append(1)
        if not sent and (when is None or when()):
            sent.append(1)
            for _ in range(times):
                os.kill(os.getpid(), signum)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, entered)
    return calls


def rows_done(out: Path, method: str, n: int = 1):
    """A ``when`` for :func:`signal_on`: ``n`` subjects of ``method`` have their row in ``out``."""
    return lambda: len(list(RunDir(out).results(method).glob("*.json"))) >= n


def stopped_line(err: str) -> str:
    """The one ``palign: stopped by ...`` line of ``err``."""
    (line,) = [x for x in err.splitlines() if "stopped by" in x]
    assert "Traceback" not in err and "Received SIGTERM" not in err, err[-3000:]
    return line


def files(out: Path, method: str) -> dict[str, set[str]]:
    """The cases with a row, an answers file and an artifact folder of ``method`` in ``out``."""
    rd = RunDir(out)
    return {
        "rows": {p.stem for p in rd.results(method).glob("*.json")},
        "answers": {p.stem for p in rd.answers_files(method)},
        "artifacts": {p.name for p in rd.artifacts(method).glob("*") if p.is_dir()},
    }


def scores(summary: dict) -> dict:
    """What must not depend on how a run was executed (not timings), flat."""
    return {
        **{f"mae_{t}": v for t, v in summary["mae"].items()},
        "score": summary["score"],
        "unk_rate": summary["unk_rate"],
        **{f"{name}_score": b["score"] for name, b in summary.get("compare", {}).items()},
    }


@pytest.fixture(autouse=True)
def quiet_wandb(monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")


def stop_then_resume(args, out, method, monkeypatch, capsys, signum, done, fresh_cfg):
    """Run ``args`` into ``out`` (a signal is armed by the caller), check the stop, then run the
    command the line gives and check the run against an uninterrupted one."""
    capsys.readouterr()
    status = invoke("palign", [*args, f"hydra.run.dir={out}"], monkeypatch)
    err = capsys.readouterr().err
    assert status == 128 + signum, err[-3000:]
    line = stopped_line(err)
    name = signal.Signals(signum).name
    assert line.startswith(f"palign: stopped by {name} after {done} of 2 subjects; continue with:")
    assert not (out / RunDir.LOCK).exists()
    assert not (out / "summary.json").exists()
    kept = files(out, method)
    assert len(kept["rows"]) == done and kept["answers"] == kept["rows"]
    if kept["artifacts"]:
        assert kept["artifacts"] == kept["rows"]  # nothing of the subject in flight
    rows = {p.name: p.read_text() for p in RunDir(out).results(method).glob("*.json")}
    command = shlex.split(line.split("continue with: ", 1)[1])
    assert command[:3] == ["python", "-m", "palign"] and command[-1] == f"resume={out}"

    monkeypatch.undo()
    assert invoke("palign", command[3:], monkeypatch) == 0
    summary = json.loads((out / "summary.json").read_text())
    after = {p.name: p.read_text() for p in RunDir(out).results(method).glob("*.json")}
    assert rows.items() <= after.items()  # the finished rows are kept as they were
    assert sorted(files(out, method)["rows"]) == sorted(map(str, summary["cases"]))
    results = (out / "results.jsonl").read_text().splitlines()
    assert [json.loads(r)["case"] for r in results] == summary["cases"]  # each once
    fresh = run(fresh_cfg)
    assert summary["cases"] == fresh["cases"]
    assert scores(summary) == pytest.approx(scores(fresh), nan_ok=True)
    return line


def test_sigterm_while_scoring_stops_after_the_subject_done(
    cfg_factory, tmp_path, monkeypatch, capsys
):
    args, out = [*TINY, "method=no_change"], tmp_path / "run"
    signal_on(monkeypatch, scoring.Scorer, "run", signal.SIGTERM, rows_done(out, "no_change"))
    stop_then_resume(
        args, out, "no_change", monkeypatch, capsys, signal.SIGTERM, 1,
        cfg_factory(*args, out="fresh"),
    )  # fmt: skip


def test_sigint_while_generating_answers_stops_after_the_subject_done(
    cfg_factory, tmp_path, monkeypatch, capsys
):
    args = [*TINY, "method=no_change", "scoring.mode=generate", "scoring.max_new_tokens=2"]
    out = tmp_path / "run"
    signal_on(monkeypatch, scoring.Scorer, "run", signal.SIGINT, rows_done(out, "no_change"))
    stop_then_resume(
        args, out, "no_change", monkeypatch, capsys, signal.SIGINT, 1,
        cfg_factory(*args, out="fresh"),
    )  # fmt: skip


def test_sigint_while_fitting_probes_keeps_no_profile_of_the_subject_in_flight(
    cfg_factory, tmp_path, monkeypatch, capsys
):
    args, out = [*TINY, *PAS, "method.subject_batch=1"], tmp_path / "run"
    signal_on(monkeypatch, pas_method, "fit_probes", signal.SIGINT, rows_done(out, "pas"))
    stop_then_resume(
        args, out, "pas", monkeypatch, capsys, signal.SIGINT, 1,
        cfg_factory(*args, out="fresh"),
    )  # fmt: skip


def test_sigterm_while_training_saves_no_unfinished_adapter(
    cfg_factory, tmp_path, monkeypatch, capsys
):
    args, out = [*TINY, "method=dpo_smoke"], tmp_path / "run"
    when = rows_done(out, "dpo_smoke")
    signal_on(monkeypatch, dpo.DPOModule, "training_step", signal.SIGTERM, when)
    stop_then_resume(
        args, out, "dpo_smoke", monkeypatch, capsys, signal.SIGTERM, 1,
        cfg_factory(*args, out="fresh"),
    )  # fmt: skip


def test_sigterm_while_collecting_activations_caches_none(tmp_path, monkeypatch, capsys):
    """PAS's activations are collected before the first subject: the run stops after none, and
    no activation cache is written for a later run to take as complete."""
    cache = tmp_path / "cache"
    cache.mkdir()
    for converted in cache_root().glob("SmolLM2-*"):  # tiny_llama's tokenizer, converted once
        (cache / converted.name).symlink_to(converted)
    monkeypatch.setenv("PALIGN_CACHE", str(cache))
    hooks = signal_on(monkeypatch, activations.HeadRecorder, "_hook", signal.SIGTERM)
    out = tmp_path / "run"
    status = invoke("palign", [*TINY, *PAS, f"hydra.run.dir={out}"], monkeypatch)
    err = capsys.readouterr().err
    assert status == 143, err[-3000:]
    assert stopped_line(err).startswith("palign: stopped by SIGTERM; continue with: python")
    assert not list(cache.glob("activations/*"))
    # tiny_llama's 2 layers: the shared prefix's forward and the first batch's, of 15 batches
    assert len(hooks) == 2 * 2
    assert not (out / RunDir.LOCK).exists() and not (out / "results").exists()
