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
import time
from pathlib import Path

import pytest
from hydra.experimental.callback import Callback
from omegaconf import open_dict

from conftest import spawn_palign, wait_for_rows
from palign import cache_root
from palign.config import compose
from palign.errors import Stopped
from palign.eval import scoring
from palign.eval.records import ResultRow
from palign.methods import dpo
from palign.methods import pas as pas_method
from palign.pas import activations
from palign.rundir import RunDir
from palign.runs.runner import run
from palign.stopping import check, stop_on_signals
from test_bad_inputs import invoke
from test_generate import _profile
from wandb_records import read_wandb_run

TINY = ["model=tiny_llama", "hardware=cpu", "dataset.limit=2"]
PAS_SETTINGS = {"top_k": 2, "folds": 2, "alphas": "[0,1]", "subject_batch": 1}
PAS = ["method=pas", *(f"method.{k}={v}" for k, v in PAS_SETTINGS.items())]


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


def metrics(row: ResultRow) -> dict:
    """What of a result row must not depend on how the run was executed (not timings)."""
    return {**row.mae, "score": row.score, "unk_rate": row.unk_rate}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, dict[int, ResultRow]]:
    """The rows of a run never stopped, by method and case: no_change, then PAS (as in
    :data:`PAS`) and DPO (dpo_smoke) compared on the same 2 subjects, in one run."""
    pas = ",".join(f"{k}:{v}" for k, v in PAS_SETTINGS.items())
    cfg = compose([*TINY, "method=no_change", f"compare=[{{method:pas,{pas}}},dpo_smoke]"])
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    run(cfg)
    return {m: RunDir(out).finished_rows(m) for m in ("no_change", "pas", "dpo_smoke")}


@pytest.fixture(autouse=True)
def quiet_wandb(monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")


def stop(args, out, method, monkeypatch, capsys, signum, done) -> str:
    """Run ``args`` into ``out`` (a signal is armed by the caller) and check how it stopped:
    the exit status, the one line (after ``done`` of 2 subjects), the lock released, the rows,
    answers files and artifacts of the ``done`` subjects only. Returns the line's command."""
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
    assert kept["artifacts"] <= kept["rows"]  # nothing of the subject in flight
    return line.split("continue with: ", 1)[1]


def resume(command, out, method, monkeypatch, reference: dict[int, ResultRow]) -> None:
    """Run the command a stop line gave: it finishes the run in ``out``, keeps the rows written
    before, evaluates every other subject once, and every row has the numbers of ``reference``
    (an uninterrupted run's rows of ``method``)."""
    before = {p.name: p.read_text() for p in RunDir(out).results(method).glob("*.json")}
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "palign"] and argv[-1] == f"resume={out}"
    monkeypatch.undo()  # no signal this time
    assert invoke("palign", argv[3:], monkeypatch) == 0
    after = {p.name: p.read_text() for p in RunDir(out).results(method).glob("*.json")}
    assert before.items() <= after.items()  # the finished rows are kept as they were
    summary = RunDir(out).read_summary()
    rows = RunDir(out).read_rows(method, method)
    assert [r.case for r in rows] == summary.cases == sorted(reference)  # each once
    for row in rows:
        assert metrics(row) == pytest.approx(metrics(reference[row.case]), nan_ok=True)
    assert not (out / RunDir.LOCK).exists()


def test_sigterm_while_scoring_stops_after_the_subject_done(
    uninterrupted, tmp_path, monkeypatch, capsys
):
    args, out = [*TINY, "method=no_change"], tmp_path / "run"
    signal_on(monkeypatch, scoring.Scorer, "run", signal.SIGTERM, rows_done(out, "no_change"))
    command = stop(args, out, "no_change", monkeypatch, capsys, signal.SIGTERM, 1)
    resume(command, out, "no_change", monkeypatch, uninterrupted["no_change"])


def test_sigint_while_fitting_probes_keeps_no_profile_of_the_subject_in_flight(
    uninterrupted, tmp_path, monkeypatch, capsys
):
    args, out = [*TINY, *PAS], tmp_path / "run"
    signal_on(monkeypatch, pas_method, "fit_probes", signal.SIGINT, rows_done(out, "pas"))
    command = stop(args, out, "pas", monkeypatch, capsys, signal.SIGINT, 1)
    resume(command, out, "pas", monkeypatch, uninterrupted["pas"])


def test_sigterm_while_training_saves_no_unfinished_adapter(
    uninterrupted, tmp_path, monkeypatch, capsys
):
    args, out = [*TINY, "method=dpo_smoke"], tmp_path / "run"
    when = rows_done(out, "dpo_smoke")
    steps = signal_on(monkeypatch, dpo.DPOModule, "training_step", signal.SIGTERM, when)
    command = stop(args, out, "dpo_smoke", monkeypatch, capsys, signal.SIGTERM, 1)
    dpo_smoke = compose(args).method
    micro_batches = dpo_smoke.steps * dpo_smoke.batch_size // dpo_smoke.micro_batch_size
    assert len(steps) == micro_batches + 1  # the first subject's, then the one stopped
    resume(command, out, "dpo_smoke", monkeypatch, uninterrupted["dpo_smoke"])


def test_sigint_while_generating_answers_stops_after_the_subject_done(
    tmp_path, monkeypatch, capsys
):
    args = [*TINY, "method=no_change", "scoring.mode=generate", "scoring.max_new_tokens=2"]
    out = tmp_path / "run"
    signal_on(monkeypatch, scoring.Scorer, "run", signal.SIGINT, rows_done(out, "no_change"))
    stop(args, out, "no_change", monkeypatch, capsys, signal.SIGINT, 1)


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


def test_a_second_signal_stops_at_once_and_wandb_says_why(tmp_path, monkeypatch, capsys):
    """Two signals: the second raises where the run is (here: before the scorer's run starts),
    and the offline W&B run is finished with the exit status, marked with the reason."""
    args, out = [*TINY, "method=no_change", "logger=wandb"], tmp_path / "run"
    when = rows_done(out, "no_change")
    batches = signal_on(monkeypatch, scoring.Scorer, "run", signal.SIGTERM, when, times=2)
    status = invoke("palign", [*args, f"hydra.run.dir={out}"], monkeypatch)
    err = capsys.readouterr().err
    assert status == 143, err[-3000:]
    assert stopped_line(err).startswith("palign: stopped by SIGTERM at once after 1 of 2 subjects")
    assert len(batches) == 2 and not (out / RunDir.LOCK).exists()
    logged = read_wandb_run(out)
    assert logged["exit_code"] == 143
    assert logged["summary"]["stopped"] == "stopped by SIGTERM after 1 of 2 subjects"


def test_generate_stops_after_the_token_in_flight(tiny, tmp_path, monkeypatch, capsys):
    from transformers import GenerationMixin

    from palign.pas.heads import head_layout

    _profile(head_layout(tiny.model)).save(tmp_path / "profile")
    tokens = signal_on(monkeypatch, GenerationMixin, "_sample", signal.SIGINT)
    argv = ["model=tiny_llama", f"profile={tmp_path / 'profile.json'}", "max_new_tokens=50"]
    status = invoke("generate", argv, monkeypatch)
    out, err = capsys.readouterr()
    assert status == 130, err[-3000:]
    assert stopped_line(err) == "palign generate: stopped by SIGINT after 0 of 2 replies"
    assert len(tokens) == 1 and "---" not in out  # no reply printed


def test_the_policy_is_in_force_only_inside_its_block():
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals():
        assert signal.getsignal(signal.SIGTERM) is not before
        os.kill(os.getpid(), signal.SIGTERM)  # recorded, nothing raised yet
        with pytest.raises(Stopped) as stopped:
            check("3 of 5 subjects")
        assert stopped.value.exit_code == 143
        assert str(stopped.value) == "stopped by SIGTERM after 3 of 5 subjects"
    assert signal.getsignal(signal.SIGTERM) is before
    check()  # outside: no request, nothing raised


def test_kill_term_ends_a_running_palign_within_seconds(tmp_path):
    """A real process, as ``scancel`` or ``docker stop`` would stop it."""
    out = tmp_path / "run"
    args = [*TINY, "method=no_change", "dataset.limit=3", f"hydra.run.dir={out}"]
    proc = spawn_palign(args)
    rows = out / "results" / "no_change"
    wait_for_rows(rows, proc)
    proc.send_signal(signal.SIGTERM)
    sent = time.time()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert time.time() - sent < 60
    line = stopped_line(err)
    assert line.startswith("palign: stopped by SIGTERM after 1 of 3 subjects; continue with:")
    assert line.endswith(f"resume={out}") and not (out / RunDir.LOCK).exists()
    assert len(list(rows.glob("*.json"))) == 1


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.is_file() else []


def _submitit_job_running(tmp_path: Path):
    """A sweep of one no_change job (3 subjects) through submitit's local executor with palign's
    launcher, once the job has written its first row: (sweep dir, job dir, the sweep's process,
    the job's pid)."""
    sweep = tmp_path / "sweep"
    args = [
        "-m", "hydra/launcher=submitit_local",
        "hydra.launcher._target_=hydra_plugins.palign_requeue.LocalLauncher",
        "model=tiny_llama", "hardware=cpu", "method=no_change", "dataset.limit=3",
        f"hydra.sweep.dir={sweep}",
    ]  # fmt: skip
    proc = spawn_palign(args)
    job = sweep / "0_no_change_tiny_llama"
    wait_for_rows(job / "results" / "no_change", proc)
    (controller,) = [int(p.name) for p in (sweep / ".submitit").iterdir() if p.name.isdigit()]
    (task,) = _children(controller)
    return sweep, job, proc, task


def _resumed_like_uninterrupted(job: Path, reference: dict[int, ResultRow]) -> None:
    """The job's second attempt resumed its dir and finished the 3 subjects, the first two
    with the numbers of ``reference`` (an uninterrupted run's no_change rows)."""
    assert list((job / ".hydra").glob("resume_*")), "the second attempt did not resume"
    done = RunDir(job).read_rows("no_change", "no_change")
    assert [r.case for r in done] == RunDir(job).read_summary().cases and len(done) == 3
    for row in done[:2]:
        assert metrics(row) == pytest.approx(metrics(reference[row.case]))


def test_a_requeued_submitit_job_resumes_where_it_stopped(uninterrupted, tmp_path):
    """submitit's requeue signal (SIGUSR2: SLURM's preemption or time limit) sent to a running
    job of the local executor: the job stops at the next safe point, submitit requeues it with
    ``resume=<sweep dir>`` (hydra_plugins.palign_requeue), and the next attempt finishes the subjects."""
    sweep, job, proc, task = _submitit_job_running(tmp_path)
    os.kill(task, signal.SIGUSR2)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    log = "".join(p.read_text() for p in (sweep / ".submitit").glob("*/*_log.*"))
    assert "palign: stopped by SIGUSR2 after 1 of 3 subjects; requeued" in log, log[-3000:]
    _resumed_like_uninterrupted(job, uninterrupted["no_change"])
    assert not (job / RunDir.LOCK).exists()


def test_a_job_the_scheduler_requeues_after_a_sigterm_resumes_where_it_stopped(
    uninterrupted, tmp_path
):
    """A SIGTERM (a preemption under ``PreemptMode=REQUEUE``, ``scancel --signal``) stops a
    job of submitit's local executor at its next safe point, and the job fails; SLURM then
    starts the same job again, with the same command and environment (done here by hand). That
    attempt resumes the job's dir: it evaluates only the subjects not done."""
    sweep, job, proc, task = _submitit_job_running(tmp_path)
    proc_dir = Path(f"/proc/{task}")
    command = proc_dir.joinpath("cmdline").read_bytes().decode().split("\0")[:-1]
    env = dict(
        e.split("=", 1) for e in proc_dir.joinpath("environ").read_bytes().decode().split("\0") if e
    )
    cwd = os.readlink(proc_dir / "cwd")
    os.kill(task, signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0, err[-3000:]  # the job failed: it was stopped
    log = "".join(p.read_text() for p in (sweep / ".submitit").glob("*/*_log.*"))
    assert "palign: stopped by SIGTERM after 1 of 3 subjects; continue with" in log, log[-3000:]
    assert len(list((job / "results" / "no_change").glob("*.json"))) == 1
    again = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    _resumed_like_uninterrupted(job, uninterrupted["no_change"])


class SignalOnJobStart(Callback):
    """Hydra callback: sends ``signum`` to this process when Hydra starts job ``job_num`` of a
    sweep (before the job's task function, where no job's policy holds)."""

    def __init__(self, job_num: int, signum: int):
        self.job_num, self.signum = job_num, signum

    def on_job_start(self, config, **kwargs) -> None:
        if config.hydra.job.num == self.job_num:
            os.kill(os.getpid(), self.signum)


def _signal_after_last_safe_point(monkeypatch, signum: int) -> None:
    """Send ``signum`` while the first job summarizes its finished subjects: after its last
    safe point."""
    from palign.runs import runner

    original, sent = runner.summarize, []

    def summarize(*args, **kwargs):
        if not sent:
            sent.append(os.kill(os.getpid(), signum))
        return original(*args, **kwargs)

    monkeypatch.setattr(runner, "summarize", summarize)


@pytest.mark.parametrize(
    "when, done",
    [("between jobs", "1 job of the sweep"), ("after the last safe point", "2 of 2 subjects")],
)
def test_a_signal_outside_a_sweep_jobs_safe_points_stops_the_sweep(
    when, done, tmp_path, monkeypatch, capsys
):
    """A sweep run in this process is under the policy from its start to its end: a signal
    between two jobs stops it at once, and one that comes after a job's last safe point stops
    it when that job ends; either way no further job starts, and the line's command finishes
    the sweep."""
    sweep = tmp_path / "sweep"
    args = ["-m", *TINY, "method=no_change,trait_mean", f"hydra.sweep.dir={sweep}"]
    if when == "between jobs":
        args += [
            "+hydra.callbacks.signal._target_=test_stopping.SignalOnJobStart",
            "+hydra.callbacks.signal.job_num=1",
            f"+hydra.callbacks.signal.signum={int(signal.SIGTERM)}",
        ]
    else:
        _signal_after_last_safe_point(monkeypatch, signal.SIGTERM)
    capsys.readouterr()
    assert invoke("palign", args, monkeypatch) == 143
    line = stopped_line(capsys.readouterr().err)
    assert line.startswith(f"palign: stopped by SIGTERM after {done}")
    command = shlex.split(line.split("continue with: ", 1)[1])
    assert command[:4] == ["python", "-m", "palign", "-m"] and command[-1] == f"resume={sweep}"
    assert (sweep / "0_no_change_tiny_llama" / "summary.json").is_file()
    assert not (sweep / "1_trait_mean_tiny_llama" / "config.yaml").exists()  # never started
    assert not (sweep / "0_no_change_tiny_llama" / RunDir.LOCK).exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # put back as it was
    monkeypatch.undo()
    command = [a for a in command if not a.startswith("+hydra.callbacks.signal")]
    assert invoke("palign", command[3:], monkeypatch) == 0
    assert (
        json.loads((sweep / "1_trait_mean_tiny_llama" / "summary.json").read_text())["n_subjects"]
        == 2
    )
    assert (sweep / "sweep_table.md").is_file()


def test_a_stopped_sweep_continues_with_the_line_it_printed(tmp_path, monkeypatch, capsys):
    """A multirun's job stopped in-process: the whole sweep stops, and the line's command
    (``-m ... resume=<sweep dir>``) finishes that job and runs the next."""
    sweep = tmp_path / "sweep"
    args = ["-m", *TINY, "method=no_change,trait_mean", f"hydra.sweep.dir={sweep}"]
    job = sweep / "0_no_change_tiny_llama"
    signal_on(monkeypatch, scoring.Scorer, "run", signal.SIGTERM, rows_done(job, "no_change"))
    capsys.readouterr()
    assert invoke("palign", args, monkeypatch) == 143
    line = stopped_line(capsys.readouterr().err)
    command = shlex.split(line.split("continue with: ", 1)[1])
    assert command[:4] == ["python", "-m", "palign", "-m"] and command[-1] == f"resume={sweep}"
    assert not (sweep / "1_trait_mean_tiny_llama").exists()
    monkeypatch.undo()
    assert invoke("palign", command[3:], monkeypatch) == 0
    for name in ("0_no_change_tiny_llama", "1_trait_mean_tiny_llama"):
        assert json.loads((sweep / name / "summary.json").read_text())["n_subjects"] == 2
    assert (sweep / "sweep_table.md").is_file()
