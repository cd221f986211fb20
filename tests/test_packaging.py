"""palign as a library: the wheel carries the configs and the `palign` command, and runs from
any directory; a user's own config dir adds a method."""

import csv
import json
import os
import shutil
import subprocess
import sys
import threading
import zipfile
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from palign.data.fetch import FILES
from palign.data.papi import locate_papi

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with palign's wheel installed (its dependencies: this interpreter's)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"  # a copy: building writes build/ and egg-info beside the sources
    shutil.copytree(
        ROOT / "src", source / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__")
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp / "dist"), str(source)],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    (wheel,) = (tmp / "dist").glob("palign-*.whl")
    venv = tmp / "venv"  # without pip of its own (ensurepip: seconds): this pip installs into it
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300
    )
    (site,) = (venv / "lib").glob("python*/site-packages")
    deps = next(p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir())
    (site / "palign_test_deps.pth").write_text(deps + "\n")  # torch & co. without a download
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
         "--no-deps", "--no-index", str(wheel)],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    return venv


def _env(data: Path | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "WANDB_API_KEY")}
    return {**env, "PALIGN_DATA": str(data or locate_papi(None)), "WANDB_SILENT": "true"}


def test_a_wheel_install_runs_from_another_directory(installed, tmp_path):
    python, palign = installed / "bin" / "python", installed / "bin" / "palign"
    where = subprocess.run(
        [str(python), "-c", "import palign; print(palign.__file__, palign.CONF_DIR)"],
        capture_output=True, text=True, cwd=tmp_path, env=_env(), check=True,
    ).stdout  # fmt: skip
    assert (
        str(installed) in where and str(ROOT) not in where
    )  # the installed copy, not the checkout
    wheel = next((installed.parent / "dist").glob("palign-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in ROOT.glob("conf/**/*.yaml"):
        assert f"palign/conf/{path.relative_to(ROOT / 'conf')}" in names
    # A user's own config dir, added to Hydra's search path, brings a method of its own.
    mine = tmp_path / "my_conf" / "method"
    mine.mkdir(parents=True)
    (mine / "my_unchanged.yaml").write_text("_target_: palign.methods.NoChange\n")
    out = tmp_path / "run"
    done = subprocess.run(
        [str(palign), "model=tiny_llama", "method=my_unchanged", "dataset.limit=1",
         f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]", f"hydra.run.dir={out}"],
        capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "no_change" and summary["n_subjects"] == 1
    check = subprocess.run(
        [str(palign), "data", "check"], capture_output=True, text=True, cwd=tmp_path, env=_env()
    )
    assert check.returncode == 0 and "Verdict: keyed" in check.stdout
    bad = subprocess.run(
        [str(palign), "sweep", str(tmp_path / "nothing")], capture_output=True, text=True,
        cwd=tmp_path, env=_env(),
    )  # fmt: skip
    assert bad.returncode == 1 and bad.stderr.strip().endswith("is not a directory")


def _run(
    args: list, cwd: Path, data: Path | None = None, timeout: int = 900
) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, cwd=cwd, env=_env(data),
        timeout=timeout,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_from_the_wheel_a_sweep_runs_and_its_artifacts_load_with_peft_and_transformers(
    installed, tmp_path
):
    """The user's path from a wheel in a fresh venv: the data fetched (`palign data fetch` from a
    local HTTP server standing in for the public source, sums checked), a Hydra sweep on it (two
    PAS settings, each beside DPO) with its progress on stderr and its sweep table; then the DPO
    adapter loaded with PeftModel.from_pretrained and the PAS profile exported and loaded with
    AutoModelForCausalLM, all in that venv, from another directory."""
    python, palign = installed / "bin" / "python", installed / "bin" / "palign"
    source = tmp_path / "source"
    shutil.copytree(locate_papi(None), source)
    handler = partial(SimpleHTTPRequestHandler, directory=str(source))
    with ThreadingHTTPServer(("127.0.0.1", 0), handler) as httpd:
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{httpd.server_address[1]}/"
        fetched = _run(
            [palign, "data", "fetch", "--url", url, "--dir", tmp_path / "papi"], tmp_path
        )
        httpd.shutdown()
    data = tmp_path / "papi"
    assert str(data) in fetched.stdout + fetched.stderr
    assert set(FILES) <= {p.name for p in data.iterdir()}  # each checked against its sum
    sweep = tmp_path / "sweep"
    done = _run(
        [palign, "-m", "model=tiny_llama", "method=pas", "method.top_k=2,4", "method.folds=2",
         "method.alphas=[0,1]", "compare=[dpo_smoke]", "dataset.limit=1",
         f"hydra.sweep.dir={sweep}"],
        tmp_path, data,
    )  # fmt: skip
    for shown in ("pas subjects", "dpo_smoke subjects", "dpo_smoke case"):
        assert shown in done.stderr  # the subjects' and the training steps' bars
    rows = list(csv.DictReader(open(sweep / "sweep_table.csv", newline="")))
    assert [(r["job"][:1], r["method"]) for r in rows[:4]] == [
        ("0", "pas"), ("0", "dpo_smoke"), ("1", "pas"), ("1", "dpo_smoke")
    ]  # fmt: skip
    assert "method.top_k=2" in rows[0]["overrides"].split()
    assert "method.top_k=4" in rows[2]["overrides"].split()
    job = next(p for p in sweep.iterdir() if p.name.startswith("0"))
    (adapter,) = (job / "artifacts" / "dpo_smoke").iterdir()
    (profile,) = (job / "artifacts" / "pas").glob("*/profile.json")
    peft = _run(
        [python, "-c",
         "import sys; from peft import PeftModel; from palign import api\n"
         "model = PeftModel.from_pretrained(api.load_model('tiny_llama').model, sys.argv[1])\n"
         "lora_b = [p for n, p in model.named_parameters() if 'lora_B' in n]\n"
         "print(model.peft_config['default'].r, len(lora_b), sum(int(p.abs().sum() > 0) for p in lora_b))",
         adapter],
        tmp_path,
    )  # fmt: skip
    assert peft.stdout.split() == ["16", "8", "8"]  # 4 projections x 2 layers, all trained
    exported = tmp_path / "exported"
    _run([palign, "export", "--profile", profile, "--out", exported, "--alpha", "1"], tmp_path)
    loaded = _run(
        [python, "-c",
         "import sys; from transformers import AutoModelForCausalLM\n"
         "model = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
         "print(sum(int(layer.self_attn.o_proj.bias.abs().sum() > 0) for layer in model.model.layers))",
         exported],
        tmp_path,
    )  # fmt: skip
    assert int(loaded.stdout.split()[-1]) >= 1  # the shifted heads' biases, folded in
