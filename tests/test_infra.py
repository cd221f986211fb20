"""Experiment infrastructure: multirun sweep table, loggers (offline W&B read back, TensorBoard,
CSV), resume after a killed run, shards through the submitit launcher and their merge, Optuna."""

import csv
import json
import os
import signal
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf, open_dict

from conftest import result_row, spawn_palign, wait_for_rows
from palign.config import build_method
from palign.config.build import check_objective
from palign.data.papi import select_subjects
from palign.errors import ConfigError, RunDirError
from palign.eval.records import Summary
from palign.rundir import RunDir
from palign.runs.merge import merge
from palign.runs.runner import run
from palign.runs.sweep import COLUMNS, log_to_wandb, objective
from palign.runs.tracking import RunTracker
from test_bad_inputs import invoke
from wandb_records import read_wandb_run, read_wandb_table

TINY = ("model=tiny_llama", "hardware=cpu")


def palign_here(monkeypatch, capsys, *args: str) -> str:
    """``python -m palign args`` in this process, through palign's real main as the bad-input
    cases run it (W&B offline, no key): its stdout and stderr; fails the test with them if it
    fails. A process of its own costs seconds of imports, and the launchers, the wheel's sweep and
    the killed run below start real ones."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    capsys.readouterr()
    status = invoke("palign", list(args), monkeypatch)
    out, err = capsys.readouterr()
    assert status == 0, out[-3000:] + err[-3000:]
    return out + err


def _scores(summary: Summary) -> dict:
    """What must not depend on how a run was executed (not timings), flat: subject count,
    per-trait MAE, Score, UNK rate, the baselines' Scores."""
    main = summary.main
    return {
        "n_subjects": main.n_subjects,
        **{f"mae_{t}": v for t, v in main.mae.items()},
        "score": main.score,
        "unk_rate": main.unk_rate,
        **{f"{name}_score": b.score for name, b in summary.baselines.items()},
    }


def test_shards_split_the_selection(papi):
    full = select_subjects(papi.subjects, limit=10)
    parts = [select_subjects(papi.subjects, limit=10, shard=f"{i}/3") for i in range(3)]
    assert [len(p) for p in parts] == [4, 3, 3]
    assert sorted(s.case for p in parts for s in p) == sorted(s.case for s in full)
    for bad in ("3/3", "1-3", "x/2"):
        with pytest.raises(ConfigError, match="dataset.shard"):
            select_subjects(papi.subjects, shard=bad)


def test_multirun_over_two_methods_writes_the_sweep_table(tmp_path, monkeypatch, capsys):
    sweep = tmp_path / "sweep"
    palign_here(
        monkeypatch,
        capsys,
        "-m",
        *TINY,
        "method=no_change,trait_mean",
        "dataset.limit=2",
        "logger=wandb",
        f"hydra.sweep.dir={sweep}",
    )
    jobs = sorted(p.parent.name for p in sweep.glob("*/config.yaml"))
    assert jobs == ["0_no_change_tiny_llama", "1_trait_mean_tiny_llama"]
    summaries = [json.loads((sweep / j / "summary.json").read_text()) for j in jobs]
    table = (sweep / "sweep_table.md").read_text()
    assert "<table>" in (sweep / "sweep_table.html").read_text()
    with open(sweep / "sweep_table.csv") as f:
        rows = list(csv.DictReader(f))
    by_method = {r["method"]: r for r in rows}
    for job, summary in zip(jobs, summaries):
        row = by_method[summary["method"]]
        assert row["job"] == job and float(row["score"]) == pytest.approx(summary["score"])
        assert f"method={summary['method']}" in row["overrides"]
        assert f"| {job} |" in table
    assert float(by_method["item_mean (no LLM)"]["score"]) == pytest.approx(
        summaries[0]["baselines"]["item_mean"]["score"]
    )
    # Each job is its own finished W&B run, grouped by the sweep.
    runs = [read_wandb_run(sweep / j) for j in jobs]
    assert [r["run"]["group"] for r in runs] == [f"eval/{sweep.name}"] * 2
    assert [r["run"]["display_name"] for r in runs] == jobs
    assert [r["exit_code"] for r in runs] == [0, 0]


def test_offline_wandb_run_is_read_back_from_its_run_dir(cfg_factory, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = cfg_factory(*TINY, "method=few_shot", "dataset.limit=2", "logger=wandb")
    summary = run(cfg)
    out = Path(cfg.paths.output_dir)
    logged = read_wandb_run(out)
    assert logged["run"]["group"] == "eval" and logged["run"]["project"] == "palign"
    assert {"few_shot", "tiny_llama", "clean"} <= set(logged["run"]["tags"])
    assert logged["summary"]["summary/few_shot/score"] == pytest.approx(summary.score)
    assert logged["summary"]["summary/item_mean/score"] == pytest.approx(
        summary.baselines["item_mean"].score
    )
    per_subject = [h["few_shot/score"] for h in logged["history"] if "few_shot/score" in h]
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert per_subject == pytest.approx([r["score"] for r in rows])
    files = {name for files in logged["artifacts"].values() for name in files}
    assert {"report.md", "summary.json", "results.jsonl", "subjects.table.json"} <= files
    assert "plots/trait_errors.png" in files
    assert logged["exit_code"] == 0


def test_wandb_run_is_finished_as_failed_after_an_error(cfg_factory, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = cfg_factory(*TINY, "logger=wandb", "logger.name=failing")
    Path(cfg.paths.output_dir).mkdir(parents=True)
    tracker = RunTracker.from_config(cfg, "few_shot", RunDir(cfg.paths.output_dir))
    row = result_row(1, "few_shot")
    tracker.subject(row, history=[{"loss": 0.7}, {"loss": 0.5}])
    tracker.close(ok=False)
    logged = read_wandb_run(Path(cfg.paths.output_dir))
    assert logged["exit_code"] == 1 and logged["run"]["display_name"] == "failing"
    assert [h["few_shot/train/loss"] for h in logged["history"][:2]] == [0.7, 0.5]
    assert [h["_step"] for h in logged["history"]] == [0, 1, 2]


def test_tensorboard_logger_records_per_subject_scores(cfg_factory):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = cfg_factory(*TINY, "method=no_change", "dataset.limit=2", "logger=tensorboard")
    summary = run(cfg)
    events = EventAccumulator(str(Path(cfg.paths.output_dir) / "tensorboard"))
    events.Reload()
    scores = [e.value for e in events.Scalars("no_change/score")]
    rows = [json.loads(x) for x in (Path(cfg.paths.output_dir) / "results.jsonl").open()]
    assert scores == pytest.approx([r["score"] for r in rows], abs=1e-6)
    assert events.Scalars("summary/no_change/score")[0].value == pytest.approx(summary.score)


def test_killed_run_resumes_to_the_same_summary(cfg_factory, tmp_path, monkeypatch, capsys):
    out = tmp_path / "killed"
    args = [*TINY, "method=few_shot", "dataset.limit=4", f"hydra.run.dir={out}"]
    proc = spawn_palign(args, stderr=subprocess.DEVNULL)
    rows_dir = out / "results" / "few_shot"
    wait_for_rows(rows_dir, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {p.name: p.read_text() for p in rows_dir.glob("*.json")}
    assert 1 <= len(before) < 4, "the run was not killed mid-way"
    assert not (out / "summary.json").exists()
    assert (out / RunDir.LOCK).is_file()  # left by the killed run: taken over below

    resumed = palign_here(monkeypatch, capsys, *args, f"resume={out}")
    assert f"{len(before)} finished subject(s) found" in resumed
    assert {p.name: p.read_text() for p in rows_dir.glob("*.json") if p.name in before} == before
    summary = RunDir(out).read_summary()
    assert not (out / RunDir.LOCK).exists()
    assert [p.name for p in (out / ".hydra").iterdir() if p.is_dir()][0].startswith("resume_")

    fresh = run(cfg_factory(*TINY, "method=few_shot", "dataset.limit=4"))
    assert summary.cases == fresh.cases
    assert _scores(summary) == pytest.approx(_scores(fresh))


def test_resume_refuses_another_config_and_unknown_dirs(cfg_factory, tmp_path):
    cfg = cfg_factory(*TINY, "method=no_change", "dataset.limit=1")
    run(cfg)
    out = cfg.paths.output_dir
    with pytest.raises(RunDirError, match="already holds results"):
        run(cfg)
    other = cfg_factory(*TINY, "method=no_change", "dataset.limit=2", f"resume={out}")
    with open_dict(other):
        other.paths.output_dir = out
    with pytest.raises(RunDirError, match="differs .* at dataset.limit"):
        run(other)
    missing = cfg_factory(*TINY, "method=no_change", f"resume={tmp_path}/nothing", out="nothing")
    with pytest.raises(RunDirError, match="no palign run"):
        run(missing)
    twice = cfg_factory(*TINY, "method=dpo_cpu", "compare=[{method:dpo,name:dpo_cpu}]", out="twice")
    with pytest.raises(ConfigError, match="names .* repeat"):
        run(twice)


def test_shards_through_submitit_merge_to_the_unsharded_summary(
    cfg_factory, tmp_path, monkeypatch, capsys
):
    sweep = tmp_path / "shards"
    palign_here(
        monkeypatch,
        capsys,
        "-m",
        "hydra/launcher=submitit_local",
        *TINY,
        "method=no_change",
        "dataset.limit=3",
        "dataset.shard=0/2,1/2",
        f"hydra.sweep.dir={sweep}",
    )
    shards = sorted(p for p in sweep.iterdir() if (p / "summary.json").is_file())
    assert [json.loads((p / "summary.json").read_text())["n_subjects"] for p in shards] == [2, 1]
    assert list(sweep.glob(".submitit/*/*_result.pkl")), "not run through submitit"
    with pytest.raises(ConfigError, match="in no shard's results"):
        merge(shards[:1], tmp_path / "partial")
    merged = merge(shards, tmp_path / "merged")
    whole = run(cfg_factory(*TINY, "method=no_change", "dataset.limit=3"))
    assert merged.cases == whole.cases
    assert _scores(merged) == pytest.approx(_scores(whole))
    assert (tmp_path / "merged" / "report.md").is_file()


def test_optuna_sweep_minimises_the_selection_score(tmp_path, monkeypatch, capsys):
    sweep = tmp_path / "optuna"
    palign_here(
        monkeypatch,
        capsys,
        "-m",
        "hparams_search=pas_optuna",
        *TINY,
        "dataset.sample=1",
        "method.folds=2",
        "method.top_k=choice(2,4)",
        'method.layers=choice("null","[0,1]")',
        "hydra.sweeper.n_trials=2",
        f"hydra.sweep.dir={sweep}",
    )
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    trials = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/summary.json"))]
    assert len(trials) == 2
    assert result["best_value"] == pytest.approx(min(t["selection_score"] for t in trials))
    for trial in trials:
        assert trial["protocol"]["name"] == "clean" and trial["selection_score"] is not None
    assert "selection_score" in (sweep / "sweep_table.md").read_text()


def test_objective_refuses_test_scores_and_test_item_selection(cfg_factory):
    cfg = cfg_factory(*TINY, "method=pas", "optimized_metric=score")
    with pytest.raises(ConfigError, match="leak the test items"):
        check_objective(cfg, build_method(cfg.method))
    cfg = cfg_factory(*TINY, "method=pas", "protocol=paper", "optimized_metric=selection_score")
    with pytest.raises(ConfigError, match="needs protocol=clean"):
        check_objective(cfg, build_method(cfg.method))
    assert objective(OmegaConf.create({"optimized_metric": None}), None) is None


def test_several_loggers_at_once_and_saved_profiles_as_wandb_artifacts(cfg_factory, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    pas = ("method=pas", "method.top_k=2", "method.folds=2", "method.alphas=[0,1]")
    cfg = cfg_factory(*TINY, *pas, "dataset.limit=1", "logger=many")
    summary = run(cfg)
    out = Path(cfg.paths.output_dir)
    with open(out / "csv" / "metrics.csv") as f:
        logged_csv = [float(r["pas/score"]) for r in csv.DictReader(f) if r.get("pas/score")]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    logged_tb = [e.value for e in events.Scalars("pas/score")]
    wandb_run = read_wandb_run(out)
    logged_wandb = [h["pas/score"] for h in wandb_run["history"] if "pas/score" in h]
    assert logged_csv == logged_wandb == pytest.approx(logged_tb, abs=1e-6)
    assert logged_csv == pytest.approx([summary.score])
    case = summary.cases[0]
    (profiles,) = [
        files for name, files in wandb_run["artifacts"].items() if name.startswith("pas-")
    ]
    assert f"pas/{case}/profile.json" in profiles and f"pas/{case}/profile.safetensors" in profiles


def test_wandb_plots_subjects_and_training_steps_on_their_own_axes(cfg_factory, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = cfg_factory(
        *TINY, "method=dpo_smoke", "compare=[no_change]", "dataset.limit=2", "logger=many"
    )
    summary = run(cfg)
    dpo = summary.method
    out = Path(cfg.paths.output_dir)
    logged = read_wandb_run(out)
    axes, history = logged["metrics"], logged["history"]
    # Each method's subject metrics are plotted against its own subject counter, its training
    # curves against its own optimiser-step counter; the counters themselves on the default axis.
    for method in (dpo, *summary.compare):
        subject_keys = [f"{method}/{k}" for k in ("score", "case", "unk_rate", "align_s")]
        for key in subject_keys + [f"{method}/mae_{t}" for t in "ACENO"]:
            assert axes[key] == f"{method}/subject", key
        assert axes[f"{method}/subject"] == ""
        scored = [h for h in history if f"{method}/score" in h]
        assert [h[f"{method}/subject"] for h in scored] == [1, 2]
        assert [h[f"{method}/case"] for h in scored] == summary.cases
    train_step = f"{dpo}/train/step"
    curve_keys = {k for h in history for k in h if k.startswith(f"{dpo}/train/")} - {train_step}
    assert {f"{dpo}/train/loss", f"{dpo}/train/margin"} <= curve_keys
    assert {k: axes[k] for k in curve_keys} == dict.fromkeys(curve_keys, train_step)
    assert axes[train_step] == ""
    assert not any("no_change/train/" in k for h in history for k in h)
    # Two optimiser steps per subject, counted on across the two subjects, with the losses of
    # each subject's saved training history in order.
    curves = [
        json.loads((RunDir(out).artifacts(dpo) / str(c) / "train_history.json").read_text())
        for c in summary.cases
    ]
    trained = [h for h in history if f"{dpo}/train/loss" in h]
    assert [h[train_step] for h in trained] == [1, 2, 3, 4]
    assert [h[f"{dpo}/train/loss"] for h in trained] == pytest.approx(
        [e["loss"] for curve in curves for e in curve]
    )
    # Summary metrics keep Lightning's axis; the W&B step still increases by one per call.
    assert axes.get(f"summary/{dpo}/score", "trainer/global_step") == "trainer/global_step"
    assert [h["_step"] for h in history] == list(range(len(history)))
    # CSV gets the counters as columns, on the same rows as their metrics.
    with open(out / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(float(r[f"{dpo}/subject"])) for r in rows if r[f"{dpo}/score"]] == [1, 2]
    assert [int(float(r[train_step])) for r in rows if r[f"{dpo}/train/loss"]] == [1, 2, 3, 4]


def test_a_resumed_tracker_continues_the_counters_of_its_csv_log(cfg_factory):
    cfg = cfg_factory(*TINY, "logger=csv")
    run_dir = RunDir(cfg.paths.output_dir)
    run_dir.path.mkdir(parents=True)
    row = result_row(1, "dpo")
    first = RunTracker.from_config(cfg, "dpo", run_dir)
    first.subject(row, history=[{"loss": 0.7}, {"loss": 0.5}])
    first.subject(replace(row, method="few_shot"))
    first.close(ok=False)
    resumed = RunTracker.from_config(cfg, "dpo", run_dir)
    assert resumed.step == 4
    assert resumed.counters == {"dpo/subject": 1, "dpo/train/step": 2, "few_shot/subject": 1}
    resumed.subject(replace(row, case=2), history=[{"loss": 0.3}])
    resumed.close(ok=True)
    with open(run_dir.path / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3, 4, 5]
    assert [r["dpo/train/step"] for r in rows if r["dpo/train/loss"]] == ["1", "2", "3"]
    assert [(r["dpo/subject"], r["dpo/case"]) for r in rows if r["dpo/score"]] == [
        ("1", "1"),
        ("2", "2"),
    ]


def test_multirun_logs_its_sweep_table_to_one_more_wandb_run(
    cfg_factory, tmp_path, monkeypatch, capsys
):
    sweep = tmp_path / "sweep"
    palign_here(
        monkeypatch,
        capsys,
        "-m",
        *TINY,
        "method=no_change,trait_mean",
        "dataset.limit=2",
        "logger=many",  # W&B as one entry of a mapping of loggers
        f"hydra.sweep.dir={sweep}",
    )
    with open(sweep / "sweep_table.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) > 2  # the two jobs' methods and the statistical baselines
    logged = read_wandb_run(sweep)  # the sweep's own run, beside the jobs' runs
    jobs = [
        read_wandb_run(sweep / j) for j in ("0_no_change_tiny_llama", "1_trait_mean_tiny_llama")
    ]
    assert logged["run"]["group"] == jobs[0]["run"]["group"] == f"eval/{sweep.name}"
    assert logged["run"]["job_type"] == "sweep" and jobs[0]["run"]["job_type"] == "eval"
    assert logged["run"]["project"] == "palign" and "sweep" in logged["run"]["tags"]
    assert logged["exit_code"] == 0
    table = read_wandb_table(sweep, "sweep_table")
    assert table["columns"] == COLUMNS
    assert len(table["data"]) == len(rows)
    for cells, row in zip(table["data"], rows):
        logged_row = dict(zip(COLUMNS, cells))
        assert (logged_row["job"], logged_row["method"]) == (row["job"], row["method"])
        assert logged_row["score"] == pytest.approx(float(row["score"]))
        assert logged_row["subjects"] == int(row["subjects"]) == 2
    # Without a W&B logger in the sweep's config nothing more is logged.
    before = sorted(p.relative_to(sweep) for p in sweep.rglob("*"))
    assert log_to_wandb(cfg_factory(*TINY, "logger=csv"), sweep) is False
    assert sorted(p.relative_to(sweep) for p in sweep.rglob("*")) == before
