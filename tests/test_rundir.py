"""The run dir's owner (palign.rundir): lock, stale-lock takeover, atomic writes, relative links,
summary schema; the CSV log kept across a resume; the one-line CLI error and its traceback
switch."""

import csv
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import open_dict

from conftest import ROW_MAE, result_row
from palign.errors import RunDirError
from palign.eval.records import SCHEMA_VERSION, RunProtocol, Summary, aggregate
from palign.rundir import RunDir, write_atomic
from palign.runs.runner import run
from test_bad_inputs import invoke

TINY = ("model=tiny_llama", "hardware=cpu")


def _lock_file(run_dir: RunDir, pid: int) -> None:
    run_dir.path.mkdir(parents=True, exist_ok=True)
    (run_dir.path / RunDir.LOCK).write_text(
        json.dumps({"pid": pid, "host": socket.gethostname(), "since": 0})
    )


def test_a_live_holder_is_named_and_a_dead_one_is_taken_over(tmp_path):
    run_dir = RunDir(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _lock_file(run_dir, holder.pid)
        with pytest.raises(
            RunDirError, match=f"in use by another palign run \\(pid {holder.pid} on"
        ):
            with run_dir.lock():
                pass
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone (as after kill -9): its lock is taken over, and released on exit.
    with run_dir.lock():
        lock = json.loads((run_dir.path / RunDir.LOCK).read_text())
        assert lock["pid"] == os.getpid()
    assert not (run_dir.path / RunDir.LOCK).exists()


def test_nested_lock_in_one_process_refuses(tmp_path):
    run_dir = RunDir(tmp_path / "run")
    with run_dir.lock():
        with pytest.raises(RunDirError, match=f"pid {os.getpid()}"):
            with run_dir.lock():
                pass


def test_atomic_write_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "a" / "b.json"
    write_atomic(path, "one")
    write_atomic(path, "two")
    assert path.read_text() == "two" and sorted(p.name for p in path.parent.iterdir()) == ["b.json"]


def test_links_are_relative_and_survive_a_move(tmp_path):
    target = tmp_path / "shards" / "0" / "artifacts" / "pas" / "7"
    target.mkdir(parents=True)
    (target / "profile.json").write_text("{}")
    run_dir = RunDir(tmp_path / "merged")
    link = run_dir.path / "artifacts" / "pas" / "7"
    run_dir.link(target, link)
    assert not os.path.isabs(os.readlink(link))
    moved = tmp_path.parent / (tmp_path.name + "_moved")
    tmp_path.rename(moved)
    assert (moved / "merged" / "artifacts" / "pas" / "7" / "profile.json").read_text() == "{}"


def _summary_json(**changes) -> dict:
    base = Summary(
        method="pas",
        model="tiny_llama",
        protocol=RunProtocol(name="clean", coding="keyed", scoring="logit"),
        n_test_items=180,
        main=aggregate([result_row(7), result_row(8)]),
        cases=[7, 8],
        baselines={"constant": aggregate([result_row(7), result_row(8)]).untimed()},
    ).to_json()
    base.update({k: v for k, v in changes.items() if k != "drop"})
    base.pop(changes.get("drop", ""), None)
    return base


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"schema": SCHEMA_VERSION + 1}, f"schema {SCHEMA_VERSION + 1} is not one this palign"),
        ({"schema": "1"}, "schema '1' is not one"),
        ({"drop": "mae"}, "not a palign summary (no mae)"),
        ({"protocol": {"name": "clean"}}, "not a palign summary's protocol (no coding, scoring)"),
    ],
)
def test_summary_schema_is_checked(tmp_path, changes, message):
    (tmp_path / "summary.json").write_text(json.dumps(_summary_json(**changes)))
    with pytest.raises(RunDirError, match=message.replace("(", r"\(").replace(")", r"\)")):
        RunDir(tmp_path).read_summary()


def test_summaries_read_back_as_written_and_older_ones_read(tmp_path):
    run_dir = RunDir(tmp_path)
    summary = Summary.from_json(_summary_json())
    summary.main = summary.main.with_setup_cost({"forward_calls": 16})
    run_dir.write_summary(summary)
    assert run_dir.read_summary() == summary
    written = json.loads(run_dir.summary.read_text())
    assert written["score"] == summary.score == 3.0 and written["schema"] == SCHEMA_VERSION
    assert written["cost"] == {"setup": {"forward_calls": 16}}
    assert written["timing"] == {"align_s_per_subject": 1.5, "eval_s_per_subject": 0.5}
    assert "timing" not in written["baselines"]["constant"]  # no model: untimed
    assert written["ci"]["score"] == [3.0, 3.0] and written["validity"]["item_r"] == 0.5
    assert written["validity"]["profile_r"] == {
        "value": None,
        "reason": "undefined for every subject (the subject's trait means do not vary (constant))",
    }
    # Before versioning (schema 0): no schema, notes, versions, selection score or shard; and
    # before validity (schema 1): no intervals, validity or paired tests.
    old = _summary_json()
    for key in ("schema", "notes", "versions", "selection_score", "shard", "ci", "validity"):
        old.pop(key)
    for key in ("ci", "validity"):
        old["baselines"]["constant"].pop(key)
    run_dir.summary.write_text(json.dumps(old))
    read = run_dir.read_summary()
    assert read.schema == 0 and read.notes == [] and read.selection_score is None
    assert read.main.ci is None and read.main.validity is None and read.tests == []
    assert read.main.score == 3.0 and list(read.methods()) == ["pas"]


def test_result_rows_carry_the_schema_and_a_newer_one_is_refused(tmp_path):
    run_dir = RunDir(tmp_path)
    row = result_row(7, align_info={"alpha": 2.0})
    run_dir.write_row(row)
    written = json.loads((run_dir.results("pas") / "7.json").read_text())
    assert written["schema"] == SCHEMA_VERSION and written["align_info"] == {"alpha": 2.0}
    assert "cost" not in written and "selected_on_test_items" not in written  # none recorded
    older = {
        k: v for k, v in row.to_json().items() if k not in ("schema", "align_info", "validity")
    }
    write_atomic(run_dir.results("pas") / "8.json", json.dumps({**older, "case": 8}))
    done = run_dir.finished_rows("pas")
    assert done[7] == row and done[8].schema == 0 and done[8].align_info == {}
    assert done[8].validity == {} and done[8].mae == row.mae  # before validity metrics
    run_dir.write_rows("pas", "pas", [done[7], done[8]])
    assert run_dir.read_rows("pas", "pas") == [done[7], done[8]]
    newer = run_dir.results("pas") / "9.json"
    write_atomic(newer, json.dumps({**older, "case": 9, "schema": SCHEMA_VERSION + 1}))
    with pytest.raises(RunDirError, match=f"{newer}: schema {SCHEMA_VERSION + 1} is not one"):
        run_dir.finished_rows("pas")
    write_atomic(newer, json.dumps({"case": 9}))
    with pytest.raises(RunDirError, match=r"9.json: not a palign result row \(no method, mae"):
        run_dir.finished_rows("pas")


def test_aggregates_average_rows_and_their_costs():
    rows = [
        result_row(1, cost={"align": {"forward_calls": 2.0}, "answer": {"forward_calls": 12.0}}),
        result_row(2, cost={"align": {"forward_calls": 4.0}, "answer": {"forward_calls": 12.0}}),
    ]
    rows[1].mae = {**ROW_MAE, "A": float("nan")}  # a trait without a parsed answer: left out
    rows[1].unk_rate = 0.5
    result = aggregate(rows)
    assert result.n_subjects == 2 and result.mae == ROW_MAE and result.score == pytest.approx(3.0)
    assert result.unk_rate == 0.25
    assert result.cost == {
        "per_subject": {
            "align": {"forward_calls": 3.0},
            "answer": {"forward_calls": 12.0},
            "total": {"forward_calls": 15.0},
        }
    }
    assert aggregate([]).n_subjects == 0 and math.isnan(aggregate([]).unk_rate)


def test_resume_appends_to_the_csv_log(cfg_factory):
    cfg = cfg_factory(*TINY, "method=item_mean", "dataset.limit=2")
    run(cfg)
    out = Path(cfg.paths.output_dir)
    metrics = out / "csv" / "metrics.csv"
    first = metrics.read_text().splitlines()
    again = cfg_factory(*TINY, "method=item_mean", "dataset.limit=2", f"resume={out}")
    with open_dict(again):
        again.paths.output_dir = str(out)
    run(again)
    with open(metrics, newline="") as f:
        rows = list(csv.DictReader(f))
    steps = [int(float(r["step"])) for r in rows]
    assert len(rows) > len(first) - 1 and steps == sorted(set(steps))  # kept, then appended
    assert metrics.read_text().splitlines()[1 : len(first)] == first[1:]


def test_cli_error_is_one_line_and_the_traceback_on_request(tmp_path, monkeypatch, capsys):
    """``python -m palign`` (its real main, in this process): one error line, and the traceback
    with PALIGN_TRACEBACK=1."""

    def palign(traceback: str) -> str:
        monkeypatch.setenv("PALIGN_TRACEBACK", traceback)
        capsys.readouterr()
        argv = [*TINY, "dataset.limit=-1", f"hydra.run.dir={tmp_path}"]
        assert invoke("palign", argv, monkeypatch) == 1
        return capsys.readouterr().err

    plain = palign("0")
    assert "Traceback" not in plain
    assert plain.strip().splitlines()[-1].startswith("palign: error: dataset.limit=-1")
    verbose = palign("1")
    assert "Traceback (most recent call last)" in verbose
    assert "palign.errors.ConfigError" in verbose


def test_resume_continues_the_same_wandb_run(cfg_factory, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = cfg_factory(*TINY, "method=item_mean", "dataset.limit=1", "logger=wandb")
    run(cfg)
    out = Path(cfg.paths.output_dir)
    again = cfg_factory(
        *TINY, "method=item_mean", "dataset.limit=1", "logger=wandb", f"resume={out}"
    )
    with open_dict(again):
        again.paths.output_dir = str(out)
    run(again)
    run_id = (out / "wandb_run_id.txt").read_text().strip()
    attempts = sorted((out / "wandb").glob("offline-run-*"))
    assert len(attempts) == 2 and all(p.name.endswith(f"-{run_id}") for p in attempts)


#: Model texts that break a CSV written with minimal quoting (a bare carriage return ends a line
#: for pandas' reader), and others a model may say.
AWKWARD_TEXTS = ["a\rb", 'say "B", then\r\nC\n', "\u2028 \x85 é ,;", "", "  padded  "]


def test_answers_and_replies_files_keep_any_text():
    import numpy as np

    from palign.data.papi import Item
    from palign.eval.answers import COLUMNS, PROB_COLUMNS, read_table, write_table
    from palign.eval.replies import read_replies, reply_table, write_replies

    n = len(AWKWARD_TEXTS)
    table = {c: ["x"] * n for c in COLUMNS}
    table.update(case=[7] * n, item=list(range(n)), key=[1] * n, target=[3] * n,
                 predicted=[0] * n, parsed=[False] * n, value=[np.nan] * n, selected=[True] * n,
                 setting=[""] * n, text=AWKWARD_TEXTS)  # fmt: skip
    table.update({c: [np.nan] * n for c in PROB_COLUMNS})
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "answers.csv"
        write_table(path, pd.DataFrame(table, columns=list(COLUMNS)))
        back = read_table(path)
        assert back["text"].tolist() == AWKWARD_TEXTS and back["item"].tolist() == list(range(n))
        items = [Item(i, f"Statement {i}.", "A", 1, "A1") for i in range(n)]
        replies = reply_table(7, "m", items, np.full(n, 3), AWKWARD_TEXTS, AWKWARD_TEXTS)
        write_replies(path, replies)
        back = read_replies(path)
        assert back["reply"].tolist() == AWKWARD_TEXTS == back["prompt"].tolist()
        assert len(back) == n
