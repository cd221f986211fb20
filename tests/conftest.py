"""Shared fixtures: the real PAPI files, a tiny random model, Hydra composition; under
pytest-xdist (``make test``), each worker's share of the CPU, the embedded model converted once
before the workers start, and the costliest modules handed out first."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Each worker (and the palign processes its tests start) gets its share of the cores: torch's
    # default of one thread per core, in every worker at once, oversubscribes them.
    _CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    _WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (_CORES or 1) // _WORKERS)))

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from palign import CONF_DIR
from palign.config import register_all
from palign.data import load_papi, locate_papi
from palign.errors import DataError
from palign.eval.metrics import SubjectMetrics
from palign.eval.records import ResultRow
from palign.eval.scoring import Scorer, ScoringConfig
from palign.eval.stats import Stat
from palign.models import load_random

TINY_LLAMA = dict(
    model_type="llama",
    vocab_size=49152,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
)


#: Per-trait MAE of :func:`result_row`'s rows.
ROW_MAE = {"A": 0.5, "C": 0.75, "E": 1.0, "N": 0.25, "O": 0.5}


def result_row(case: int, method: str = "pas", **recorded) -> ResultRow:
    """A result row as the runner builds one (the metrics of 180 answers, Score 3.0, timings),
    with the ``recorded`` fields (``align_info``, ``cost``, ...)."""
    metrics = SubjectMetrics(
        mae=dict(ROW_MAE),
        score=3.0,
        unk_rate=0.0,
        answers={"A": 40, "B": 30, "C": 50, "D": 30, "E": 30, "UNK": 0},
        n_scored=dict.fromkeys("ACENO", 36),
        model_means=dict.fromkeys("ACENO", 3.0),
        subject_means=dict.fromkeys("ACENO", 3.5),
        validity={
            "item_r": Stat(0.5),
            "item_spearman": Stat(0.5),
            "accuracy": Stat(0.4),
            "within_one": Stat(0.9),
            "profile_r": Stat(None, "the subject's trait means do not vary (constant)"),
        },
    )
    recorded.setdefault("timing", {"align_s": 1.5, "eval_s": 0.5})
    return ResultRow.of(metrics, case, method, **recorded)


def spawn_palign(args: list[str], stderr: int = subprocess.PIPE) -> subprocess.Popen:
    """``python -m palign *args`` as a real process in its own session (a signal to its group
    reaches it as ``scancel`` would), from the repository root; stderr piped as text unless
    ``stderr`` says otherwise."""
    return subprocess.Popen(
        [sys.executable, "-m", "palign", *args],
        cwd=Path(__file__).resolve().parents[1],
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        text=True,
        start_new_session=True,
    )


def wait_for_rows(folder: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Until ``folder`` holds a result row (``*.json``), ``proc`` ends, or ``timeout`` s."""
    deadline = time.time() + timeout
    while not list(folder.glob("*.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)


def twice_with_a_fresh_cache(root: Path, overrides: list[str]) -> dict[str, tuple]:
    """A run of ``overrides`` (in-process, :func:`palign.runs.runner.run`) into ``root/first``,
    then the same into ``root/second``, with ``$PALIGN_CACHE`` a fresh ``root/cache`` (the
    embedded tokenizer's conversion linked in) and put back after: what the first run cached,
    the second finds. Returns ``{name: (summary, RunDir)}``."""
    from palign.config import compose as compose_run
    from palign.models.loading import converted_gguf_dir
    from palign.rundir import RunDir
    from palign.runs.runner import run

    tokenizer = converted_gguf_dir()  # the shared cache's, converted there once
    (root / "cache").mkdir()
    (root / "cache" / tokenizer.name).symlink_to(tokenizer)
    before = os.environ.get("PALIGN_CACHE")
    os.environ["PALIGN_CACHE"] = str(root / "cache")
    try:
        outs = {}
        for name in ("first", "second"):
            cfg = compose_run([*overrides, f"hydra.run.dir={root / name}"])
            with open_dict(cfg):
                cfg.paths.output_dir = str(root / name)
            outs[name] = (run(cfg), RunDir(root / name))
        return outs
    finally:
        if before is None:
            os.environ.pop("PALIGN_CACHE", None)
        else:
            os.environ["PALIGN_CACHE"] = before


def _papi_missing() -> str | None:
    try:
        locate_papi(None)
    except DataError:
        return (
            "needs the PAPI files and none were found: run `palign data fetch` (or set "
            "$PALIGN_DATA to a copy)"
        )
    return None


#: Test modules that run palign on the real data end to end (besides the fixtures below).
DATA_MODULES = {
    "test_app", "test_infra", "test_reproduce", "test_bad_inputs", "test_packaging", "test_fetch",
    "test_integration_smollm2", "test_integration_pas_smollm2", "test_cost", "test_dpo",
    "test_ppo", "test_placement", "test_quant4bit", "test_generate", "test_memory", "test_rundir",
    "test_data", "test_data_checks", "test_method_checks", "test_launchers", "test_bench_gpu",
    "test_stopping",
}  # fmt: skip
DATA_FIXTURES = {"papi", "cfg_factory"}


#: Test modules by the CPU time their tests take (the costliest first; measured on 2 cores):
#: pytest-xdist hands each module to one worker (``--dist loadfile``: the tests sharing a module
#: fixture, e.g. a finished run, the wheel in a venv, ``make reproduce-smoke`` or the embedded
#: model, build it once), these first, so that the many quick ones fill the gaps at the end.
COSTLIEST_FIRST = (
    "test_infra", "test_app", "test_integration_pas_smollm2", "test_reproduce", "test_packaging",
    "test_stopping", "test_population", "test_pas_soup", "test_bad_inputs", "test_launchers",
    "test_integration_smollm2", "test_bench_gpu", "test_judge", "test_served", "test_pas",
    "test_loading_progress", "test_schema", "test_rundir", "test_method_checks", "test_quant4bit",
    "test_placement", "test_dpo", "test_ppo", "test_generate", "test_cost", "test_api",
)  # fmt: skip


def _cost_rank(item) -> int:
    name = item.module.__name__
    return COSTLIEST_FIRST.index(name) if name in COSTLIEST_FIRST else len(COSTLIEST_FIRST)


def pytest_collection_modifyitems(config, items):
    """Without the PAPI files, every test that needs them is skipped with one reason. The
    costliest modules come first (a stable sort: each module's tests keep their order)."""
    items.sort(key=_cost_rank)
    reason = _papi_missing()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if DATA_FIXTURES & set(item.fixturenames) or item.module.__name__ in DATA_MODULES:
            item.add_marker(skip)


def pytest_sessionstart(session):
    """With xdist workers, convert the embedded model (the tokenizer of tiny_llama too) here,
    once, before they start: each would otherwise convert it on first use (~25 s)."""
    if os.environ.get("PYTEST_XDIST_WORKER") or not session.config.getoption("numprocesses", None):
        return
    from palign.models.loading import ModelLoadError, converted_gguf_dir

    try:
        converted_gguf_dir()
    except ModelLoadError:  # the embedded package is not installed: its tests say so
        pass


if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def papi():
    """The real PAPI files in keyed coding (found by palign's data-location rules)."""
    return load_papi()


@pytest.fixture(scope="session")
def tiny():
    return load_random("tiny_llama", TINY_LLAMA, seed=0)


@pytest.fixture
def make_scorer(tiny):
    def build(**kwargs) -> Scorer:
        return Scorer(tiny, ScoringConfig(**kwargs))

    return build


@pytest.fixture
def cfg_factory(tmp_path):
    """Compose ``conf/config.yaml`` with overrides; outputs go to a fresh tmp dir."""

    def build(*overrides: str, out: str = "run") -> DictConfig:
        register_all()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=list(overrides))
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / out)
        return cfg

    return build
