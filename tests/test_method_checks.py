"""Every method's config values are checked by its constructor (before any model is loaded): a
bad value is one ConfigError line naming ``method.<key>``, the value and what is allowed."""

from __future__ import annotations

import numpy as np
import pytest

from palign.config import build_method
from palign.errors import ConfigError, PASError
from palign.methods.checks import check_int, check_number, show
from palign.methods.dpo import DPO
from palign.methods.pas import PAS
from palign.methods.ppo import PPO

#: (method config, key, override value, the value as the message shows it, error class).
BAD = [
    # DPO (and the LoRA settings it shares with PPO)
    ("dpo", "steps", "0", "0", ConfigError),
    ("dpo", "steps", "-3", "-3", ConfigError),
    ("dpo", "steps", "2.5", "2.5", ConfigError),
    ("dpo", "steps", "abc", "'abc'", ConfigError),
    ("dpo", "steps", "true", "true", ConfigError),
    ("dpo", "steps", "null", "null", ConfigError),
    ("dpo", "batch_size", "0", "0", ConfigError),
    ("dpo", "micro_batch_size", "0", "0", ConfigError),
    ("dpo", "batch_size", "6", "6", ConfigError),  # not a multiple of micro_batch_size=4
    ("dpo", "lr", "-0.001", "-0.001", ConfigError),
    ("dpo", "lr", "0", "0", ConfigError),
    ("dpo", "lr", "nan", "nan", ConfigError),
    ("dpo", "lr", "inf", "inf", ConfigError),
    ("dpo", "lr", "fast", "'fast'", ConfigError),
    ("dpo", "beta", "0", "0", ConfigError),
    ("dpo", "beta", "-0.1", "-0.1", ConfigError),
    ("dpo", "warmup_steps", "-1", "-1", ConfigError),
    ("dpo", "weight_decay", "-0.05", "-0.05", ConfigError),
    ("dpo", "rejected", "best", "'best'", ConfigError),
    ("dpo", "keep_neutral", "yes", "'yes'", ConfigError),
    ("dpo", "lora_r", "0", "0", ConfigError),
    ("dpo", "lora_r", "false", "false", ConfigError),
    ("dpo", "lora_alpha", "0", "0", ConfigError),
    ("dpo", "lora_alpha", "-100", "-100", ConfigError),
    ("dpo", "lora_dropout", "1.0", "1.0", ConfigError),
    ("dpo", "lora_dropout", "-0.1", "-0.1", ConfigError),
    ("dpo", "target_modules", "[]", "[]", ConfigError),
    ("dpo", "target_modules", "q_proj", "'q_proj'", ConfigError),
    ("dpo", "seed", "-1", "-1", ConfigError),
    ("dpo_smoke", "steps", "0", "0", ConfigError),
    # PPO
    ("ppo", "steps", "0", "0", ConfigError),
    ("ppo", "batch_size", "0", "0", ConfigError),
    ("ppo", "lr", "-1e-5", "-1e-05", ConfigError),
    ("ppo", "ppo_epochs", "0", "0", ConfigError),
    ("ppo", "max_new_tokens", "0", "0", ConfigError),
    ("ppo", "clip", "0", "0", ConfigError),
    ("ppo", "clip", "-0.2", "-0.2", ConfigError),
    ("ppo", "kl_coef", "-0.05", "-0.05", ConfigError),
    ("ppo", "vf_coef", "-1", "-1", ConfigError),
    ("ppo", "gamma", "1.5", "1.5", ConfigError),
    ("ppo", "lam", "-0.5", "-0.5", ConfigError),
    ("ppo", "prefill", "1", "1", ConfigError),
    ("ppo", "lora_dropout", "1.5", "1.5", ConfigError),
    ("ppo_cpu", "max_new_tokens", "-1", "-1", ConfigError),
    # PAS
    ("pas", "top_k", "0", "0", PASError),
    ("pas", "top_k", "-1", "-1", PASError),
    ("pas", "top_k", "4.0", "4.0", PASError),
    ("pas", "alphas", "[]", "[]", PASError),
    ("pas", "alphas", "[0,nan]", "[0, nan]", PASError),
    ("pas", "alphas", "[0,big]", "[0, 'big']", PASError),
    ("pas", "alphas", "2", "2", PASError),
    ("pas", "folds", "1", "1", PASError),
    ("pas", "folds", "200", "200", PASError),
    ("pas", "folds", "121", "121", PASError),
    ("pas", "folds", "four", "'four'", PASError),
    ("pas", "train_fraction", "1.0", "1.0", PASError),
    ("pas", "train_fraction", "0", "0", PASError),
    ("pas", "train_fraction", "0.004", "0.004", PASError),  # rounds to 0 of 120 items
    ("pas", "train_fraction", "0.996", "0.996", PASError),  # rounds to all 120 items
    ("pas", "probe_c", "0", "0", PASError),
    ("pas", "probe_c", "inf", "inf", PASError),
    ("pas", "subject_batch", "0", "0", PASError),
    ("pas", "subject_batch", "2.5", "2.5", PASError),
    ("pas", "layers", "[3,1]", "[3, 1]", PASError),
    ("pas", "layers", "[-1,2]", "[-1, 2]", PASError),
    ("pas", "layers", "[1]", "[1]", PASError),
    ("pas", "layers", "[0,1,2]", "[0, 1, 2]", PASError),
    ("pas", "layers", "all", "'all'", PASError),
    ("pas", "seed", "-2", "-2", PASError),
    ("pas", "seed", "one", "'one'", PASError),
    ("pas", "per_trait", "maybe", "'maybe'", PASError),
    ("pas", "selection", "test", "'test'", PASError),
    ("pas", "direction", "pca", "'pca'", PASError),
    ("pas", "ranking", "best", "'best'", PASError),
    # statistical baselines
    ("constant", "value", "0", "0", ConfigError),
    ("constant", "value", "7", "7", ConfigError),
    ("constant", "value", "3.5", "3.5", ConfigError),
    ("constant", "value", "true", "true", ConfigError),
]


@pytest.mark.parametrize(
    ("method", "key", "value", "shown", "error"),
    BAD,
    ids=[f"{m}.{k}={v}" for m, k, v, _, _ in BAD],
)
def test_a_bad_method_value_is_one_config_error_line(cfg_factory, method, key, value, shown, error):
    cfg = cfg_factory(f"method={method}", f"method.{key}={value}")
    with pytest.raises(ConfigError) as caught:
        build_method(cfg.method)
    assert type(caught.value) is error
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"method.{key}={shown}"), message
    assert "must be" in message or "is not" in message, message


#: (method config, overrides) at the edge of what is allowed.
GOOD = [
    ("dpo", ["method.steps=1", "method.batch_size=1", "method.micro_batch_size=1"]),
    ("dpo", ["method.warmup_steps=0", "method.weight_decay=0", "method.lora_dropout=0"]),
    ("dpo", ["method.lr=1e-9", "method.beta=1e-6", "method.lora_r=1", "method.lora_alpha=0.5"]),
    ("dpo", ["method.target_modules=[q_proj]", "method.rejected=all_others", "method.seed=0"]),
    ("dpo", ["method.keep_neutral=true", "method.lora_dropout=0.99"]),
    ("dpo_smoke", []),
    ("ppo", ["method.steps=1", "method.batch_size=1", "method.ppo_epochs=1"]),
    ("ppo", ["method.max_new_tokens=1", "method.kl_coef=0", "method.vf_coef=0"]),
    ("ppo", ["method.gamma=0", "method.lam=1", "method.clip=1.5", "method.prefill=false"]),
    ("ppo_smoke", []),
    ("pas", ["method.top_k=1", "method.folds=2", "method.alphas=[0]", "method.subject_batch=1"]),
    ("pas", ["method.folds=120", "method.alphas=[-2,0.5,8]", "method.layers=[0,1]"]),
    ("pas", ["method.train_fraction=0.01", "method.probe_c=1e-4"]),
    ("pas", ["method.train_fraction=0.99", "method.layers=[5,30]", "method.per_trait=true"]),
    ("pas", ["protocol=paper", "method.folds=1"]),  # test_items selection: no folds used
    ("pas", ["protocol=paper", "method.folds=500"]),
    ("constant", ["method.value=1"]),
    ("constant", ["method.value=5"]),
    ("few_shot", []),
    ("no_change", []),
    ("personality_prompt", []),
    ("trait_mean", []),
    ("item_mean", []),
]


@pytest.mark.parametrize(("method", "overrides"), GOOD, ids=[f"{m}:{','.join(o)}" for m, o in GOOD])
def test_values_at_the_edge_are_accepted(cfg_factory, method, overrides):
    cfg = cfg_factory(f"method={method}", *overrides)
    built = build_method(cfg.method)
    for override in overrides:
        key, _, value = override.partition("=")
        if key == "method.steps":
            assert built.steps == int(value)


def test_checked_values_are_plain_python():
    """Values arrive as Hydra gives them (ListConfig, numpy numbers from code) and are kept as
    plain Python values."""
    method = DPO(steps=np.int64(3), lr=np.float32(0.5), batch_size=4, micro_batch_size=2)
    assert type(method.steps) is int and type(method.lr) is float
    assert method.lora["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert method.lora["lora_alpha"] == 100 and type(method.lora["lora_alpha"]) is int
    pas = PAS(alphas=(0, 2), layers=[1, 3])
    assert pas.alphas == [0.0, 2.0] and pas.layers == [1, 3]
    assert PPO(lr=1).lr == 1.0


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: check_int("steps", 0, 1), "method.steps=0: must be an integer >= 1"),
        (lambda: check_int("value", 9, 1, 5), "method.value=9: must be an integer in 1..5"),
        (lambda: check_number("lr", -1.0, above=0), "method.lr=-1.0: must be a finite number > 0"),
        (
            lambda: check_number("lora_dropout", 1, at_least=0, below=1),
            "method.lora_dropout=1: must be a number in [0, 1)",
        ),
        (
            lambda: check_number("gamma", 2.0, at_least=0, at_most=1),
            "method.gamma=2.0: must be a number in [0, 1]",
        ),
    ],
)
def test_messages_read_the_same_everywhere(call, message):
    with pytest.raises(ConfigError) as caught:
        call()
    assert str(caught.value) == message


def test_show():
    assert show(None) == "null" and show(True) == "true" and show("x") == "'x'"
    assert show([1, "a", None]) == "[1, 'a', null]" and show(0.5) == "0.5"
