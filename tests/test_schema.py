"""Config schemas (palign.config.schema) catch misspelt keys at compose time; methods are named after
their configs; ``compare`` entries take settings and names; a method of one's own is one module
and one YAML (examples/own_method, as docs/methods.md shows it)."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from palign.api import available
from palign.config import build_method, build_methods, schema
from palign.errors import ConfigError
from palign.methods import (
    Constant,
    FewShot,
    ItemMean,
    NoChange,
    PersonalityPrompt,
    TraitMean,
)
from palign.methods.dpo import DPO
from palign.methods.pas import PAS
from palign.methods.pas_soup import PASSoup
from palign.methods.ppo import PPO
from palign.methods.prompt_morl import PromptMORL
from palign.methods.psoups import PSoups

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "own_method"

#: Each packaged config group and the schema its every config is composed as.
GROUP_SCHEMAS = {
    "dataset": {"papi": schema.DatasetConfig},
    "protocol": dict.fromkeys(["clean", "paper"], schema.ProtocolConfig),
    "evaluation": dict.fromkeys(["inventory", "open_ended"], schema.EvaluationConfig),
    "hardware": dict.fromkeys(["cpu", "gpu", "multi_gpu"], schema.HardwareConfig),
    "paths": {"default": schema.PathsConfig},
    "model": {
        **dict.fromkeys(
            ["llama3_70b", "llama3_70b_4bit", "llama3_8b", "mistral_7b"],
            schema.PretrainedModelConfig,
        ),
        "smollm2_135m": schema.GGUFModelConfig,
        "tiny_llama": schema.RandomModelConfig,
        "openai": schema.HostedModelConfig,
    },
}

#: Each packaged method config and the Method class its node is derived from.
METHOD_CLASSES = {
    "constant": Constant,
    **dict.fromkeys(["dpo", "dpo_cpu", "dpo_smoke"], DPO),
    **dict.fromkeys(["ppo", "ppo_cpu", "ppo_smoke"], PPO),
    **dict.fromkeys(["psoups", "psoups_cpu", "psoups_smoke"], PSoups),
    **dict.fromkeys(["prompt_morl", "prompt_morl_cpu", "prompt_morl_smoke"], PromptMORL),
    "pas": PAS,
    **dict.fromkeys(["pas_soup", "pas_soup_smoke"], PASSoup),
    "few_shot": FewShot,
    "item_mean": ItemMean,
    "no_change": NoChange,
    "personality_prompt": PersonalityPrompt,
    "trait_mean": TraitMean,
}


#: Each logger config and the schema of its node(s); ``many`` is a mapping of the others.
LOGGER_SCHEMAS = {
    "csv": schema.FileLoggerConfig,
    "tensorboard": schema.TensorBoardLoggerConfig,
    "wandb": schema.WandbLoggerConfig,
}


def _compose(*overrides: str):
    return schema.compose(list(overrides))


@pytest.mark.parametrize("group", sorted(GROUP_SCHEMAS))
def test_every_packaged_config_is_composed_as_its_schema(group):
    assert available(group) == sorted(GROUP_SCHEMAS[group])
    for name, expected in GROUP_SCHEMAS[group].items():
        cfg = _compose(f"{group}={name}")
        assert OmegaConf.get_type(cfg[group]) is expected, (group, name)
        assert OmegaConf.get_type(cfg) is schema.PalignConfig


@pytest.mark.parametrize("name", sorted(METHOD_CLASSES))
def test_every_method_config_is_composed_as_its_settings(name):
    """A method's node has exactly its class's settings (derived from ``Settings``, in struct
    mode), builds that class, and is named after its file (also where it extends another)."""
    assert available("method") == sorted(METHOD_CLASSES)
    cls = METHOD_CLASSES[name]
    cfg = _compose(f"method={name}")
    settings = [f.name for f in fields(cls.Settings)]
    assert list(cfg.method) == ["_target_", "name", *settings]
    assert OmegaConf.is_struct(cfg.method)
    assert cfg.method.name == name
    built = build_method(cfg.method)
    assert type(built) is cls and built.name == name


def test_logger_configs_are_composed_as_their_schemas():
    assert available("logger") == sorted([*LOGGER_SCHEMAS, "many"])
    for name, expected in LOGGER_SCHEMAS.items():
        assert OmegaConf.get_type(_compose(f"logger={name}").logger) is expected
    many = _compose("logger=many", "~logger.wandb").logger
    assert {k: OmegaConf.get_type(v) for k, v in many.items()} == {
        "csv": schema.FileLoggerConfig,
        "tensorboard": schema.TensorBoardLoggerConfig,
    }
    with pytest.raises(ConfigCompositionException, match="logger.projct"):
        _compose("logger=wandb", "logger.projct=mine")


@pytest.mark.parametrize(
    "yaml_file, text, overrides, key",
    [
        (  # an experiment that misspells a method setting
            "experiment/typo.yaml",
            "# @package _global_\ndefaults:\n  - override /method: pas\nmethod:\n  topk: 4\n",
            ["experiment=typo"],
            "method.topk",
        ),
        (  # a method config of one's own extending pas with a misspelt key
            "method/my_pas.yaml",
            "defaults:\n  - pas\n  - _self_\nname: my_pas\nalpahs: [0, 2]\n",
            ["method=my_pas"],
            "method.alpahs",
        ),
        (  # a dataset setting
            "experiment/few.yaml",
            "# @package _global_\ndataset:\n  limt: 3\n",
            ["experiment=few"],
            "dataset.limt",
        ),
        (  # a top-level key
            "experiment/seeded.yaml",
            "# @package _global_\nsed: 3\n",
            ["experiment=seeded"],
            "sed",
        ),
    ],
)
def test_a_misspelt_key_in_a_yaml_fails_at_compose_time(tmp_path, yaml_file, text, overrides, key):
    path = tmp_path / yaml_file
    path.parent.mkdir(parents=True)
    path.write_text(text)
    with pytest.raises(ConfigCompositionException) as raised:
        _compose(f"hydra.searchpath=[file://{tmp_path}]", *overrides)
    message = " ".join(str(raised.value.__cause__ or raised.value).split())
    assert f"full_key: {key}" in message, message


def test_an_added_setting_a_method_does_not_take_fails_before_any_work():
    cfg = _compose("method=pas", "+method.topk=8")
    with pytest.raises(
        ConfigError, match=r"method.topk: PAS has no setting 'topk' \(settings: top_k"
    ):
        build_methods(cfg)


def test_compare_entries_take_settings_and_their_own_names():
    cfg = _compose(
        "method=item_mean",
        "compare=[trait_mean,{method:constant,name:constant4,value:4},{method:dpo_smoke,steps:7}]",
    )
    method, others = build_methods(cfg)
    assert [m.name for m in (method, *others)] == [
        "item_mean",
        "trait_mean",
        "constant4",
        "dpo_smoke",
    ]
    assert others[1].value == 4 and others[2].steps == 7
    # Settings resolve against the run's config as the method's own would (seed, precision).
    assert others[2].seed == cfg.seed and others[2].precision == "32-true"
    for entry, culprit in [
        ("[{method:constant,valu:4}]", "compare[0] (method constant): unknown setting(s) valu"),
        ("[{name:x}]", "compare[0]={'name': 'x'}: must be a method config name"),
        ("[nope]", "compare[0]: unknown method 'nope'"),
        ("[{method:constant,value:9}]", "method.value=9: must be an integer in 1..5"),
        ("[constant,{method:constant}]", "names ['item_mean', 'constant', 'constant'] repeat"),
        ("[{method:constant,name:'a b'}]", "compare[0].name='a b': must be a name"),
    ]:
        with pytest.raises(ConfigError) as raised:
            build_methods(_compose("method=item_mean", f"compare={entry}"))
        assert culprit in str(raised.value), (entry, str(raised.value))


def test_a_method_target_must_be_a_method_class():
    for target, culprit in [
        ("os.system", "cannot be imported"),
        ("palign.eval.scoring.Scorer", "is not a palign Method"),
        ("no_such_module.Method", "cannot be imported"),
    ]:
        cfg = _compose("method=few_shot", f"method._target_={target}")
        with pytest.raises(ConfigError, match=culprit):
            build_method(cfg.method)


def _answers(run: Path, method: str, case: int) -> list[str]:
    with open(run / "answers" / method / f"{case}.csv", newline="") as f:
        return [row["predicted"] for row in csv.DictReader(f)]


def test_a_method_of_ones_own_is_one_module_and_one_yaml(papi, tmp_path):
    """The worked example of docs/methods.md, run as a user runs it: the module on PYTHONPATH,
    its YAML in a config dir of one's own, compared with itself under another setting."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(EXAMPLE), "WANDB_MODE": "offline"}
    compare = "compare=[trait_mean,constant,{method:shrunk_trait_mean,name:shrink0,shrink:0}]"
    args = [
        "method=shrunk_trait_mean",
        f"hydra.searchpath=[file://{EXAMPLE / 'conf'}]",
        compare,
        "dataset.limit=3",
        f"hydra.run.dir={out}",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "palign", *args],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    cases = [s.case for s in papi.subjects[:3]]
    assert summary["method"] == "shrunk_trait_mean" and summary["cases"] == cases
    assert list(summary["compare"]) == ["trait_mean", "constant", "shrink0"]
    for case in cases:
        shrunk, trait_mean = (
            _answers(out, "shrunk_trait_mean", case),
            _answers(out, "trait_mean", case),
        )
        # shrink=0 is the trait_mean baseline exactly; shrink=0.5 moves answers toward 3.
        assert _answers(out, "shrink0", case) == trait_mean
        assert shrunk != trait_mean
        assert all(abs(int(s) - 3) <= abs(int(t) - 3) for s, t in zip(shrunk, trait_mean))
    assert summary["compare"]["shrink0"]["score"] == summary["compare"]["trait_mean"]["score"]
    artifact = json.loads(
        (out / "artifacts" / "shrunk_trait_mean" / f"{cases[0]}" / "artifact.json").read_text()
    )
    assert set(artifact["trait_means"]) == {"A", "C", "E", "N", "O"}
    assert "shrunk_trait_mean" in (out / "report.md").read_text()
    # A misspelt setting of the method of one's own: one line naming it, nothing run.
    bad = subprocess.run(
        [sys.executable, "-m", "palign", *args[:2], "+method.shrnk=0.1", f"hydra.run.dir={tmp_path / 'bad'}"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600,
    )  # fmt: skip
    assert bad.returncode == 1
    assert "method.shrnk: ShrunkTraitMean has no setting 'shrnk' (settings: shrink)" in bad.stderr
    assert not (tmp_path / "bad" / "summary.json").exists()


def test_the_docs_show_the_example_as_it_is():
    page = (ROOT / "docs" / "methods.md").read_text()
    module = (EXAMPLE / "shrunk_trait_mean.py").read_text()
    assert module[module.index("@dataclass\nclass ShrunkTraitMeanSettings") :].strip() in page
    yaml = (EXAMPLE / "conf" / "method" / "shrunk_trait_mean.yaml").read_text()
    assert yaml.split("\n", 1)[1].strip() in page  # below its comment line


def test_palign_settings_lists_each_setting_with_its_value_default_and_help(capsys):
    from palign.config.describe import main

    assert main(["method=pas", "protocol=paper", "method.top_k=8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("method=pas: palign.methods.pas.PAS\n")
    assert "  top_k: int = 8  (default 24)\n      heads shifted: the top K" in out
    assert "  split: str = 'row'  (default 'item'; follows protocol.pas.split)\n" in out
    assert "  seed: int = 0  (follows seed)\n" in out
    assert re.findall(r"(?m)^  (\w+): ", out) == [f.name for f in fields(PAS.Settings)]
    assert main(["method=trait_mean"]) == 0
    assert "TraitMean has no settings." in capsys.readouterr().out
    with pytest.raises(SystemExit) as stopped:
        main(["method=nope"])
    assert stopped.value.code == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("palign settings: error: In 'config': Could not find 'method/nope'")
    assert len(err) == 2 and err[1].startswith("palign settings: hint:")
