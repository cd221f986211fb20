"""Bad inputs through every entry point: each case runs the command line in-process (Hydra
apps through their real ``main``) and asserts its exit status, ONE error line naming the culprit
(and no traceback), and that every run dir it touches is unchanged byte for byte.

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

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf, open_dict

import palign.cli.run as app
from palign import CONF_DIR
from palign.cli import generate
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
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
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

    def copy(self, name: str = "copy") -> Path:
        dest = self.tmp / name
        shutil.copytree(self.finished, dest, symlinks=True)
        self.watched.append(dest)
        return dest

    def papi(self, name: str, content: bytes | str | None) -> Path:
        """A copy of the PAPI folder with ``name`` replaced by ``content`` (None: removed)."""
        dest = self.tmp / "papi"
        shutil.copytree(locate_papi(None), dest)
        if content is None:
            (dest / name).unlink()
        else:
            data = content.encode() if isinstance(content, str) else content
            (dest / name).write_bytes(data)
        return dest

    def edit_json(self, path: Path, change: Callable[[dict], object]) -> None:
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))

    def profile(self) -> Path:
        return self.finished / "artifacts" / "pas" / str(self.case) / "profile.json"

    def adapter(self) -> Path:
        return self.finished / "artifacts" / "dpo_smoke" / str(self.case)


def _typo_experiment(c: Ctx) -> Path:
    """A config dir of one's own whose ``experiment/typo.yaml`` misspells ``method.top_k``."""
    conf = c.tmp / "my_conf"
    (conf / "experiment").mkdir(parents=True, exist_ok=True)
    (conf / "experiment" / "typo.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /method: pas\nmethod:\n  topk: 4\n"
    )
    return conf


def _palign(*args: str, out: str = "run") -> Callable[[Ctx], list[str]]:
    """A ``python -m palign`` command line on tiny_llama into a fresh run dir."""
    return lambda c: [*TINY, *args, f"hydra.run.dir={c.tmp / out}"]


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


def _resume(*changes: str, prepare: Callable[[Ctx, Path], None] | None = None):
    """Resume a copy of the finished run with its overrides and ``changes`` (``key=value``);
    ``prepare`` may damage the copy first."""

    def build(c: Ctx) -> list[str]:
        copy = c.copy()
        if prepare is not None:
            prepare(c, copy)
        overrides = {**FINISHED, **dict(x.split("=", 1) for x in changes)}
        return [f"{k}={v}" for k, v in overrides.items()] + [f"resume={copy}"]

    return build


def _data(name: str, content, *args: str):
    return lambda c: [
        *TINY,
        f"dataset.root={c.papi(name, content)}",
        *args,
        f"hydra.run.dir={c.tmp / 'run'}",
    ]


def _lock(c: Ctx, copy: Path) -> None:
    (copy / ".palign.lock").write_text(
        json.dumps({"pid": os.getpid(), "host": os.uname().nodename, "since": 0})
    )


def _corrupt_row(c: Ctx, copy: Path) -> None:
    (copy / "results" / "pas" / f"{c.case}.json").write_text("{not json")


def _corrupt_config(c: Ctx, copy: Path) -> None:
    (copy / "config.yaml").write_text("method: [unclosed\n")


def _shard(c: Ctx, change: Callable[[Path], None] | None = None, name: str = "shard") -> Path:
    copy = c.copy(name)
    if change is not None:
        change(copy)
    return copy


def _set_yaml(path: Path, key: str, value) -> None:
    cfg = OmegaConf.load(path)
    OmegaConf.update(cfg, key, value, force_add=True)
    path.write_text(OmegaConf.to_yaml(cfg))


def _summary_edit(change: Callable[[dict], object]):
    def build(c: Ctx) -> list[str]:
        copy = c.copy()
        c.edit_json(copy / "summary.json", change)
        return ["--out", str(c.tmp / "out"), str(copy)]

    return build


def _answers_edit(kind: str):
    def build(c: Ctx) -> list[str]:
        copy = c.copy()
        path = copy / "answers" / "dpo_smoke" / f"{c.case}.csv"
        if kind == "remove":
            path.unlink()
        else:
            lines = path.read_text().splitlines()
            header = lines[0].split(",")
            col, target = header.index("predicted"), header.index("target")
            for i, line in enumerate(lines[1:], 1):
                cells = line.split(",")
                if cells[target] != "0":
                    cells[col] = "1" if cells[target] != "1" else "5"
                    lines[i] = ",".join(cells)
                    break
            path.write_text("\n".join(lines) + "\n")
        return ["--out", str(c.tmp / "out"), str(copy)]

    return build


BAD_TESTSET = {
    "not_utf8": b"\xff\xfe[{]",
    "empty_list": "[]",
    "not_json": "[{",
    "case_not_int": json.dumps([{"case": "abc"}]),
    "not_a_list": json.dumps({"case": 1}),
}

# (id, entry, argv builder, culprit substrings, exit status)
CASES: list[tuple[str, str, Callable[[Ctx], list[str]], tuple[str, ...], int]] = [
    # --- dataset selection ---
    ("limit_negative", "palign", _palign("dataset.limit=-1"), ("dataset.limit=-1",), 1),
    ("limit_zero", "palign", _palign("dataset.limit=0"), ("dataset.limit=0",), 1),
    ("limit_text", "palign", _palign("dataset.limit=abc"), ("dataset.limit=", "abc"), 1),
    ("limit_float", "palign", _palign("dataset.limit=1.5"), ("dataset.limit=1.5",), 1),
    ("sample_zero", "palign", _palign("dataset.sample=0"), ("dataset.sample=0",), 1),
    ("sample_negative", "palign", _palign("dataset.sample=-2"), ("dataset.sample=-2",), 1),
    ("sample_too_many", "palign", _palign("dataset.sample=301"), ("dataset.sample=301",), 1),
    ("sample_float", "palign", _palign("dataset.sample=1.5"), ("dataset.sample=1.5",), 1),
    (
        "cases_duplicate",
        "palign",
        lambda c: _palign(f"dataset.cases=[{c.case},{c.case}]")(c),
        ("dataset.cases",),
        1,
    ),
    ("cases_unknown", "palign", _palign("dataset.cases=[1]"), ("dataset.cases", "unknown"), 1),
    ("cases_text", "palign", _palign("dataset.cases=[abc]"), ("dataset.cases", "abc"), 1),
    ("cases_float", "palign", _palign("dataset.cases=[1.5]"), ("dataset.cases", "1.5"), 1),
    (
        "cases_single_int",
        "palign",
        lambda c: _palign(f"dataset.cases={c.case}")(c),
        ("dataset.cases",),
        1,
    ),
    ("cases_nested", "palign", _palign("dataset.cases=[[1]]"), ("dataset.cases",), 1),
    ("shard_out_of_range", "palign", _palign("dataset.shard=3/3"), ("dataset.shard='3/3'",), 1),
    ("shard_text", "palign", _palign("dataset.shard=x"), ("dataset.shard=",), 1),
    ("shard_zero", "palign", _palign("dataset.shard=0/0"), ("dataset.shard='0/0'",), 1),
    (
        "shard_empty",
        "palign",
        _palign("dataset.limit=3", "dataset.shard=5/8"),
        ("dataset.shard='5/8'", "empty"),
        1,
    ),
    (
        "seed_negative",
        "palign",
        _palign("dataset.seed=-1", "dataset.sample=2"),
        ("dataset.seed=-1",),
        1,
    ),
    (
        "root_missing",
        "palign",
        _palign("dataset.root=/nonexistent/papi"),
        ("/nonexistent/papi",),
        1,
    ),
    # --- data files ---
    *[
        (f"testset_{k}", "palign", _data("Test-set.json", v), ("Test-set.json",), 1)
        for k, v in BAD_TESTSET.items()
    ],
    ("testset_missing", "palign", _data("Test-set.json", None), ("Test-set.json",), 1),
    ("split_not_json", "palign", _data("mpi_300_split.json", "{"), ("mpi_300_split.json",), 1),
    (
        "split_no_train",
        "palign",
        _data("mpi_300_split.json", json.dumps({"test_index": [1]})),
        ("mpi_300_split.json", "train_index"),
        1,
    ),
    (
        "split_empty",
        "palign",
        _data("mpi_300_split.json", json.dumps({"train_index": [], "test_index": []})),
        ("mpi_300_split.json",),
        1,
    ),
    ("split_missing", "palign", _data("mpi_300_split.json", None), ("mpi_300_split.json",), 1),
    (
        "item_key_missing",
        "palign",
        _data("IPIP-NEO-ItemKey.xls", None),
        ("IPIP-NEO-ItemKey.xls",),
        1,
    ),
    (
        "item_key_garbage",
        "palign",
        _data("IPIP-NEO-ItemKey.xls", b"not a spreadsheet"),
        ("IPIP-NEO-ItemKey.xls",),
        1,
    ),
    (
        "personas_not_json",
        "palign",
        _data("personality_prompt.json", "{", "method=personality_prompt"),
        ("personality_prompt.json",),
        1,
    ),
    # --- method configs (checked before the model loads) ---
    *[
        (
            f"pas_{key}_{value}".replace("[", "")
            .replace("]", "")
            .replace(",", "_")
            .replace(".", "p"),
            "palign",
            _palign("method=pas", f"method.{key}={value}"),
            (f"method.{key}=",),
            1,
        )
        for key, value in [
            ("top_k", "0"),
            ("top_k", "-1"),
            ("top_k", "abc"),
            ("train_fraction", "1.0"),
            ("train_fraction", "0"),
            ("folds", "200"),
            ("folds", "1"),
            ("alphas", "[]"),
            ("alphas", "[nan]"),
            ("probe_c", "0"),
            ("layers", "[3,1]"),
            ("subject_batch", "0"),
            ("split", "foo"),
            ("ties", "foo"),
            ("contrastive", "foo"),
            ("direction", "foo"),
            ("ranking", "foo"),
            ("selection", "foo"),
            ("with_context", "maybe"),
        ]
    ],
    (
        "pas_top_k_over_heads",
        "palign",
        _palign("method=pas", "method.top_k=24", "dataset.limit=1"),
        ("method.top_k=24",),
        1,
    ),
    *[
        (
            f"dpo_{key}_{value}".replace("[", "").replace("]", "").replace(".", "p"),
            "palign",
            _palign("method=dpo_cpu", f"method.{key}={value}"),
            (f"method.{key}=",),
            1,
        )
        for key, value in [
            ("steps", "0"),
            ("batch_size", "0"),
            ("micro_batch_size", "0"),
            ("lr", "-1"),
            ("lr", "0"),
            ("beta", "0"),
            ("lora_r", "0"),
            ("lora_dropout", "1.0"),
            ("lora_alpha", "0"),
            ("target_modules", "[]"),
            ("rejected", "best"),
            ("warmup_steps", "-1"),
            ("seed", "-1"),
        ]
    ],
    *[
        (
            f"ppo_{key}_{value}".replace(".", "p"),
            "palign",
            _palign("method=ppo_cpu", f"method.{key}={value}"),
            (f"method.{key}=",),
            1,
        )
        for key, value in [
            ("steps", "0"),
            ("ppo_epochs", "0"),
            ("clip", "0"),
            ("kl_coef", "-1"),
            ("max_new_tokens", "0"),
            ("gamma", "2"),
            ("lr", "nan"),
            ("batch_size", "0"),
        ]
    ],
    (
        "constant_value_high",
        "palign",
        _palign("method=constant", "method.value=7"),
        ("method.value=7",),
        1,
    ),
    (
        "constant_value_zero",
        "palign",
        _palign("method=constant", "method.value=0"),
        ("method.value=0",),
        1,
    ),
    # --- configs Hydra cannot compose (checked before the run dir is made) ---
    ("override_key_unknown", "palign", _palign("dataset.limt=3"), ("dataset.limt",), 1),
    ("model_unknown", "palign", _palign("model=nope"), ("model/nope",), 1),
    ("override_malformed", "palign", _palign("dataset.limit=["), ("no viable alternative",), 1),
    (
        "yaml_key_misspelt",
        "palign",
        lambda c: _palign(f"hydra.searchpath=[file://{_typo_experiment(c)}]", "experiment=typo")(c),
        ("method.topk", "experiment/typo"),
        1,
    ),
    # --- compare entries ---
    ("compare_unknown", "palign", _palign("compare=[nonexistent]"), ("compare", "nonexistent"), 1),
    ("compare_repeat", "palign", _palign("compare=[few_shot]"), ("compare=", "repeat"), 1),
    (
        "compare_repeat_names",
        "palign",
        _palign("method=dpo_cpu", "compare=[{method:dpo,name:dpo_cpu}]"),
        ("compare=", "repeat"),
        1,
    ),
    # --- scoring, protocol, hardware, model ---
    ("parse_unknown", "palign", _palign("scoring.parse=foo"), ("scoring.parse='foo'",), 1),
    ("mode_unknown", "palign", _palign("scoring.mode=foo"), ("scoring.mode='foo'",), 1),
    ("scoring_batch_zero", "palign", _palign("scoring.batch_size=0"), ("scoring.batch_size=0",), 1),
    ("precision_unknown", "palign", _palign("hardware.precision=fp8"), ("hardware.precision",), 1),
    ("gpu_without_cuda", "palign", _palign("hardware=gpu"), ("hardware.device",), 1),
    ("device_unknown", "palign", _palign("hardware.device=tpu"), ("hardware.device",), 1),
    (
        "model_path_missing",
        "palign",
        lambda c: [
            "model=llama3_8b",
            "model.name_or_path=/nonexistent/llama",
            f"hydra.run.dir={c.tmp / 'run'}",
        ],
        ("/nonexistent/llama",),
        1,
    ),
    ("objective_unknown", "palign", _palign("optimized_metric=score"), ("optimized_metric",), 1),
    # --- run dirs (the finished run's copy must stay byte for byte) ---
    (
        "resume_missing",
        "palign",
        lambda c: [*TINY, f"resume={c.tmp / 'nothing'}"],
        ("resume=", "no palign run"),
        1,
    ),
    (
        "resume_not_a_run",
        "palign",
        lambda c: [*TINY, f"resume={c.tmp}"],
        ("resume=", "no config.yaml"),
        1,
    ),
    ("resume_other_config", "palign", _resume("dataset.limit=2"), ("differs", "dataset.limit"), 1),
    ("resume_other_method", "palign", _resume("method.top_k=3"), ("differs", "method.top_k"), 1),
    (
        "resume_held",
        "palign",
        _resume(prepare=_lock),
        ("in use by another palign run", f"pid {os.getpid()}"),
        1,
    ),
    (
        "resume_corrupt_row",
        "palign",
        _resume(prepare=_corrupt_row),
        ("results/pas/", "not a palign result row"),
        1,
    ),
    (
        "resume_corrupt_config",
        "palign",
        _resume(prepare=_corrupt_config),
        ("config.yaml", "not a readable config"),
        1,
    ),
    (
        "run_dir_has_results",
        "palign",
        lambda c: [*TINY, f"hydra.run.dir={c.copy()}"],
        ("already holds results",),
        1,
    ),
    (
        "run_dir_under_a_file",
        "palign",
        lambda c: [*TINY, f"hydra.run.dir={c.finished / 'summary.json'}/run"],
        ("summary.json", "not a folder"),
        1,
    ),
    # --- palign.merge ---
    (
        "merge_over_a_run",
        "merge",
        lambda c: ["--out", str(c.copy("out")), str(c.finished)],
        ("merge never overwrites",),
        1,
    ),
    (
        "merge_not_a_run",
        "merge",
        lambda c: ["--out", str(c.tmp / "m"), str(c.tmp)],
        ("no config.yaml",),
        1,
    ),
    (
        "merge_corrupt_config",
        "merge",
        lambda c: [
            "--out",
            str(c.tmp / "m"),
            str(_shard(c, lambda p: (p / "config.yaml").write_text("a: ["))),
        ],
        ("config.yaml", "not a readable config"),
        1,
    ),
    (
        "merge_foreign_target",
        "merge",
        lambda c: [
            "--out",
            str(c.tmp / "m"),
            str(_shard(c, lambda p: _set_yaml(p / "config.yaml", "method._target_", "os.system"))),
        ],
        ("_target_='os.system'",),
        1,
    ),
    (
        "merge_other_configs",
        "merge",
        lambda c: [
            "--out",
            str(c.tmp / "m"),
            str(c.finished),
            str(_shard(c, lambda p: _set_yaml(p / "config.yaml", "seed", 5))),
        ],
        ("another config", "seed"),
        1,
    ),
    (
        "merge_missing_answers",
        "merge",
        lambda c: [
            "--out",
            str(c.tmp / "m"),
            str(_shard(c, lambda p: (p / "answers" / "pas" / f"{c.case}.csv").unlink())),
        ],
        ("answers/pas/", "missing"),
        1,
    ),
    (
        "merge_missing_rows",
        "merge",
        lambda c: [
            "--out",
            str(c.tmp / "m"),
            str(_shard(c, lambda p: shutil.rmtree(p / "results" / "dpo_smoke"))),
        ],
        ("in no shard's results",),
        1,
    ),
    ("merge_no_args", "merge", lambda c: [], ("the following arguments are required",), 2),
    (
        "merge_no_shards",
        "merge",
        lambda c: ["--out", str(c.tmp / "m")],
        ("the following arguments are required",),
        2,
    ),
    # --- palign.reproduce ---
    (
        "reproduce_no_summary",
        "reproduce",
        lambda c: ["--out", str(c.tmp / "out"), str(c.tmp)],
        ("summary.json: missing",),
        1,
    ),
    (
        "reproduce_summary_not_json",
        "reproduce",
        lambda c: [
            "--out",
            str(c.tmp / "out"),
            str(_shard(c, lambda p: (p / "summary.json").write_text("{"))),
        ],
        ("summary.json: not valid JSON",),
        1,
    ),
    (
        "reproduce_summary_keys",
        "reproduce",
        _summary_edit(lambda s: s.pop("cases")),
        ("summary.json", "no cases"),
        1,
    ),
    (
        "reproduce_summary_schema",
        "reproduce",
        _summary_edit(lambda s: s.update(schema=99)),
        ("summary.json", "schema 99"),
        1,
    ),
    (
        "reproduce_summary_score",
        "reproduce",
        _summary_edit(lambda s: s.update(score=1.0)),
        ("summary.json", "differs", "score"),
        1,
    ),
    (
        "reproduce_same_protocol",
        "reproduce",
        lambda c: ["--out", str(c.tmp / "out"), str(c.finished), str(c.copy())],
        ("both protocol=clean",),
        1,
    ),
    (
        "reproduce_answers_edited",
        "reproduce",
        _answers_edit("edit"),
        ("dpo_smoke", "other metrics"),
        1,
    ),
    (
        "reproduce_answers_removed",
        "reproduce",
        _answers_edit("remove"),
        ("answers/dpo_smoke/", "missing"),
        1,
    ),
    (
        "reproduce_rows_corrupt",
        "reproduce",
        lambda c: [
            "--out",
            str(c.tmp / "out"),
            str(_shard(c, lambda p: (p / "results.jsonl").write_text("{\n"))),
        ],
        ("results.jsonl: line 1",),
        1,
    ),
    (
        "reproduce_answers_not_csv",
        "reproduce",
        lambda c: [
            "--out",
            str(c.tmp / "out"),
            str(
                _shard(
                    c,
                    lambda p: (
                        p
                        / "answers"
                        / "pas"
                        / f"{json.loads((p / 'summary.json').read_text())['cases'][0]}.csv"
                    ).write_text("x\n1\n"),
                )
            ),
        ],
        ("answers/pas/", "not a palign answers file"),
        1,
    ),
    # --- palign.sweep ---
    ("sweep_not_a_dir", "sweep", lambda c: [str(c.tmp / "nothing")], ("is not a directory",), 1),
    ("sweep_no_summaries", "sweep", lambda c: [str(c.tmp)], ("no summary.json",), 1),
    (
        "sweep_corrupt_summary",
        "sweep",
        lambda c: [
            str(
                _shard(c, lambda p: (p / "summary.json").write_text("{"), name="sweep/0_job").parent
            )
        ],
        ("summary.json: not valid JSON",),
        1,
    ),
    # --- palign.generate ---
    ("generate_nothing", "generate", lambda c: [*TINY], ("give profile=",), 1),
    (
        "generate_both",
        "generate",
        lambda c: [*TINY, f"profile={c.profile()}", f"adapter={c.adapter()}"],
        ("give profile=",),
        1,
    ),
    (
        "generate_profile_missing",
        "generate",
        lambda c: [*TINY, f"profile={c.tmp / 'p.json'}"],
        ("p.json", "missing"),
        1,
    ),
    (
        "generate_profile_not_json",
        "generate",
        lambda c: [
            *TINY,
            f"profile={_shard(c, lambda p: (p / 'artifacts' / 'pas' / str(c.case) / 'profile.json').write_text('{')) / 'artifacts' / 'pas' / str(c.case) / 'profile.json'}",
        ],
        ("profile.json", "not a palign profile"),
        1,
    ),
    (
        "generate_profile_tensors_corrupt",
        "generate",
        lambda c: [
            *TINY,
            f"profile={_shard(c, lambda p: (p / 'artifacts' / 'pas' / str(c.case) / 'profile.safetensors').write_bytes(b'garbage')) / 'artifacts' / 'pas' / str(c.case) / 'profile.json'}",
        ],
        ("profile.safetensors", "not a readable"),
        1,
    ),
    (
        "generate_profile_other_model",
        "generate",
        lambda c: ["hardware=cpu", f"profile={c.profile()}"],
        ("tiny_llama",),
        1,
    ),
    (
        "generate_adapter_missing",
        "generate",
        lambda c: [*TINY, f"adapter={c.tmp}"],
        ("adapter=", "no adapter.json"),
        1,
    ),
    (
        "generate_adapter_json_corrupt",
        "generate",
        lambda c: [
            *TINY,
            f"adapter={_shard(c, lambda p: (p / 'artifacts' / 'dpo_smoke' / str(c.case) / 'adapter.json').write_text('[]')) / 'artifacts' / 'dpo_smoke' / str(c.case)}",
        ],
        ("adapter.json", "not a palign adapter"),
        1,
    ),
    (
        "generate_adapter_weights_corrupt",
        "generate",
        lambda c: [
            *TINY,
            f"adapter={_shard(c, lambda p: (p / 'artifacts' / 'dpo_smoke' / str(c.case) / 'adapter_model.safetensors').write_bytes(b'garbage')) / 'artifacts' / 'dpo_smoke' / str(c.case)}",
        ],
        ("adapter_model.safetensors", "not a readable adapter"),
        1,
    ),
    # --- palign.data.check ---
    ("data_check_missing", "data.check", lambda c: [str(c.tmp / "nothing")], ("nothing",), 1),
    (
        "data_check_corrupt",
        "data.check",
        lambda c: [str(c.papi("Test-set.json", b"\xff"))],
        ("Test-set.json",),
        1,
    ),
]


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
    assert len(CASES) >= 100 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("name, entry, build, culprit, code", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(
    name, entry, build, culprit, code, finished, tmp_path, monkeypatch, capsys
):
    ctx = Ctx(tmp_path, finished)
    before_finished = snapshot(finished)
    argv = build(ctx)
    before = {p: snapshot(p) for p in ctx.watched}
    capsys.readouterr()
    status = invoke(entry, argv, monkeypatch)
    err = capsys.readouterr().err
    assert status == code, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if "error: " in line]
    assert len(lines) == 1, err[-3000:]
    for part in culprit:
        assert part in lines[0], (part, lines[0])
    assert snapshot(finished) == before_finished
    for path, files in before.items():
        assert snapshot(path) == files, f"{path} changed"
