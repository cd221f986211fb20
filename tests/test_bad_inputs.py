"""Bad inputs through every entry point: each case of ``data/bad_inputs.yaml`` runs its command
line in-process (Hydra apps through their real ``main``) and asserts its exit status, ONE error
line naming the culprit (and no traceback), and that every run dir it touches is unchanged byte
for byte.

Run alone with ``pytest tests/test_bad_inputs.py`` (about a minute); the data-file and
method-config tables of ``test_data_checks.py`` and ``test_method_checks.py`` cover their
layers at the API.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from string import Template

import pytest
import yaml
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf, open_dict

import palign.cli.run as app
from palign.cli import generate
from palign.config import compose
from palign.data import check as data_check
from palign.data.papi import locate_papi
from palign.report import reproduce
from palign.runs import merge, sweep
from palign.runs.runner import run

TINY = ["model=tiny_llama", "hardware=cpu"]
ENTRIES: dict[str, Callable] = {
    "palign": app.main,
    "generate": generate.main,
    "merge": merge.main,
    "reproduce": reproduce.main,
    "sweep": sweep.main,
    "data.check": data_check.main,
}
HYDRA_APPS = ("palign", "generate")


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file's bytes and every folder, symlink and its target, under ``root``."""
    out = {}
    for p in sorted(root.rglob("*")):
        key = str(p.relative_to(root))
        if p.is_symlink():
            out[key] = b"-> " + os.readlink(p).encode()
        elif p.is_dir():
            out[key] = b"<dir>"
        else:
            out[key] = p.read_bytes()
    return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished run on tiny_llama: PAS (a profile per subject) beside DPO (an adapter)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    overrides = [f"{k}={v}" for k, v in FINISHED.items()]
    cfg = compose(overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    run(cfg)
    return out


@dataclass
class Ctx:
    """What a case builds on: the shared finished run (never changed), copies of it and of the
    PAPI files in the case's own folder, and the run dirs to compare before and after."""

    tmp: Path
    finished: Path
    watched: list[Path] = field(default_factory=list)

    @property
    def case(self) -> int:
        return json.loads((self.finished / "summary.json").read_text())["cases"][0]

    def sub(self, text: str) -> str:
        """``text`` with the data file's placeholders filled in."""
        values = {"tmp": self.tmp, "finished": self.finished, "case": self.case, "pid": os.getpid()}
        return Template(text).substitute({k: str(v) for k, v in values.items()})

    def copy(self, name: str) -> Path:
        dest = self.tmp / name
        shutil.copytree(self.finished, dest, symlinks=True)
        self.watched.append(dest)
        return dest

    def papi(self) -> Path:
        """A copy of the PAPI folder at ``$tmp/papi``."""
        dest = self.tmp / "papi"
        shutil.copytree(locate_papi(None), dest)
        return dest


FINISHED = {
    "model": "tiny_llama",
    "hardware": "cpu",
    "method": "pas",
    "method.top_k": "2",
    "method.folds": "2",
    "method.alphas": "[0,1]",
    "dataset.limit": "1",
    "compare": "[dpo_smoke]",
}


def _flip_answer(path: Path) -> None:
    """The first answer whose target is not 0: its predicted option changed."""
    from palign.eval.answers import read_table, write_table

    table = read_table(path)
    i = table.index[table["target"] != 0][0]
    table.loc[i, "predicted"] = 1 if table.loc[i, "target"] != 1 else 5
    write_table(path, table)


def _set_yaml(path: Path, key: str, value) -> None:
    cfg = OmegaConf.load(path)
    OmegaConf.update(cfg, key, value, force_add=True)
    path.write_text(OmegaConf.to_yaml(cfg))


def _edit_json(path: Path, pop: str | None = None, update: dict | None = None) -> None:
    data = json.loads(path.read_text())
    if pop is not None:
        data.pop(pop)
    data.update(update or {})
    path.write_text(json.dumps(data))


def _lock(path: Path) -> None:
    """A run-dir lock held by this (live) process."""
    path.write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename, "since": 0}))


def apply_edits(c: Ctx, root: Path, edits: list[dict]) -> None:
    """The data file's edits (see its header) on the folder ``root``."""
    for edit in edits:
        op, target = next(iter(edit.items()))
        path = root / c.sub(target)
        if op == "write":
            data = edit["text"].encode() if "text" in edit else edit["bytes"].encode("latin-1")
            path.write_bytes(data)
        elif op == "unlink":
            path.unlink()
        elif op == "rmtree":
            shutil.rmtree(path)
        elif op == "set_yaml":
            _set_yaml(path, edit["key"], edit["value"])
        elif op == "edit_json":
            _edit_json(path, edit.get("pop"), edit.get("update"))
        elif op == "lock":
            _lock(path)
        elif op == "flip_answer":
            _flip_answer(path)
        else:
            raise ValueError(f"unknown edit {op!r} in {CASES_FILE.name}")


def build_argv(c: Ctx, case: dict) -> list[str]:
    """Make the case's files, copies and PAPI copy under ``c.tmp``; its command line."""
    for name, text in case.get("files", {}).items():
        path = c.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    copies = case.get("copies", {})
    if "resume" in case:
        copies = {"copy": [], **copies}
    for name, edits in copies.items():
        apply_edits(c, c.copy(name), edits)
    root = []
    if "papi" in case:
        apply_edits(c, c.papi(), case["papi"])
        root = [f"dataset.root={c.tmp / 'papi'}"]
    if "run" in case:
        args = [*TINY, *root, *map(c.sub, case["run"]), f"hydra.run.dir={c.tmp / 'run'}"]
    elif "resume" in case:
        changes = dict(c.sub(x).split("=", 1) for x in case["resume"])
        args = [f"{k}={v}" for k, v in {**FINISHED, **changes}.items()]
        args.append(f"resume={c.tmp / 'copy'}")
    else:
        args = [c.sub(a) for a in case["argv"]]
    return args


CASES_FILE = Path(__file__).parent / "data" / "bad_inputs.yaml"
#: Cases refused only once the model is loaded (its heads), after the run dir is made.
CHECKED_ON_THE_MODEL = {"pas_top_k_over_heads"}
CASES: list[dict] = yaml.safe_load(CASES_FILE.read_text())


def invoke(entry: str, argv: list[str], monkeypatch) -> int:
    """Run ``entry``'s command line in this process; its exit status."""
    main = ENTRIES[entry]
    handlers, level = logging.root.handlers[:], logging.root.level
    loggers = {  # Hydra's logging config may disable or re-level loggers: put them back after
        name: (lg.disabled, lg.level, lg.propagate, lg.handlers[:])
        for name, lg in logging.Logger.manager.loggerDict.items()
        if isinstance(lg, logging.Logger)
    }
    if entry in HYDRA_APPS:
        GlobalHydra.instance().clear()
        monkeypatch.setattr(sys, "argv", [f"palign.{entry}", *argv])
        call = main
    else:
        call = lambda: main(argv)  # noqa: E731
    try:
        result = call()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    finally:
        GlobalHydra.instance().clear()
        logging.root.handlers[:], logging.root.level = handlers, level  # Hydra's, not ours
        for name, lg in logging.Logger.manager.loggerDict.items():
            if isinstance(lg, logging.Logger):
                lg.disabled, lg.level, lg.propagate, lg.handlers[:] = loggers.get(
                    name, (False, logging.NOTSET, True, [])
                )
    return result if isinstance(result, int) else 0


def test_there_are_over_a_hundred_cases():
    ids = [c["id"] for c in CASES]
    assert len(CASES) >= 100 and len(set(ids)) == len(CASES)
    keys = {"id", "entry", "run", "resume", "argv", "files", "copies", "papi", "culprit", "code"}
    for case in CASES:
        assert set(case) <= keys and case["culprit"], case["id"]
        assert len({"run", "resume", "argv"} & set(case)) == 1, case["id"]
        assert case.get("entry", "palign") in ENTRIES, case["id"]


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(case, finished, tmp_path, monkeypatch, capsys):
    ctx = Ctx(tmp_path, finished)
    before_finished = snapshot(finished)
    argv = build_argv(ctx, case)
    before = {p: snapshot(p) for p in ctx.watched}
    capsys.readouterr()
    status = invoke(case.get("entry", "palign"), argv, monkeypatch)
    out, err = capsys.readouterr()
    assert status == case.get("code", 1), err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if "error: " in line]
    assert len(lines) == 1, err[-3000:]
    for part in map(ctx.sub, case["culprit"]):
        assert part in lines[0], (part, lines[0])
    message = lines[0].split("error: ", 1)[1]
    assert (out + err).count(message) == 1, out[-3000:]  # not logged to the console as well
    assert snapshot(finished) == before_finished
    for path, files in before.items():
        assert snapshot(path) == files, f"{path} changed"
    if "run" in case and case["id"] not in CHECKED_ON_THE_MODEL:  # refused before any folder
        assert not (tmp_path / "run").exists(), "a refused run left a run dir"


def test_a_run_error_is_shown_once_and_kept_in_the_run_log(tmp_path, monkeypatch, capsys):
    """An error once the run has started (here: the model's weights, read after the run dir is
    made) is one line on the terminal (not logged to the console too) and is in the run dir's
    log file."""
    run_dir = tmp_path / "run"
    model = f"model.name_or_path={tmp_path / 'nothing'}"
    argv = ["model=llama3_8b", model, "method=no_change", f"hydra.run.dir={run_dir}"]
    assert invoke("palign", argv, monkeypatch) == 1
    out, err = capsys.readouterr()
    (line,) = [x for x in err.splitlines() if "error: " in x]
    message = line.split("palign: error: ", 1)[1]
    assert str(tmp_path / "nothing") in message and (out + err).count(message) == 1
    (log,) = run_dir.glob("*.log")
    assert message in log.read_text()
