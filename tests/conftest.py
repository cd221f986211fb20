"""Shared fixtures: the real PAPI files, a tiny random model, Hydra composition."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from palign import CONF_DIR
from palign.config import register_all
from palign.data import load_papi, locate_papi
from palign.errors import DataError
from palign.eval.scoring import Scorer, ScoringConfig
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
}  # fmt: skip
DATA_FIXTURES = {"papi", "cfg_factory"}


def pytest_collection_modifyitems(config, items):
    """Without the PAPI files, every test that needs them is skipped with one reason."""
    reason = _papi_missing()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if DATA_FIXTURES & set(item.fixturenames) or item.module.__name__ in DATA_MODULES:
            item.add_marker(skip)


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
