"""A model that does not fit is refused in one line before any weight is read
(palign.models.memory), from its config alone: exact parameter counts on the meta device, bytes
per storage format, the device's free memory injectable so the refusal runs without a GPU."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

import palign.models.memory as memory
from conftest import TINY_LLAMA
from palign.models.loading import ModelLoadError, load_pretrained
from palign.models.memory import (
    MARGIN_BYTES,
    MARGIN_FRACTION,
    check_fits,
    count_parameters,
    device_capacity,
    estimate_memory,
)
from palign.runs.runner import run

GB = 10**9
NF4 = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}
LLAMA3 = dict(num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)
#: Meta-Llama-3-8B and -70B shapes (their config.json); published sizes: 8.03e9 parameters
#: (16.06 GB of bfloat16 safetensors) and 70.6e9 parameters.
LLAMA3_8B = dict(
    hidden_size=4096,
    num_hidden_layers=32,
    num_attention_heads=32,
    intermediate_size=14336,
    **LLAMA3,
)
LLAMA3_70B = dict(
    hidden_size=8192,
    num_hidden_layers=80,
    num_attention_heads=64,
    intermediate_size=28672,
    **LLAMA3,
)
#: Relative tolerance against the published (rounded) sizes.
PUBLISHED_TOLERANCE = 0.002


def _tiny_config(**changes):
    cfg = {**TINY_LLAMA, **changes}
    return AutoConfig.for_model(cfg.pop("model_type"), **cfg)


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"tie_word_embeddings": False},
        {"model_type": "qwen2"},  # q/k/v biases
        {"model_type": "mistral", "sliding_window": 64},
    ],
    ids=["tied", "untied", "qwen2", "mistral"],
)
def test_the_meta_count_equals_the_real_models_parameters(changes):
    config = _tiny_config(**changes)
    count = count_parameters(config)
    real = AutoModelForCausalLM.from_config(config)
    assert count.total == sum(p.numel() for p in real.parameters())
    linear = [
        m
        for name, m in real.named_modules()
        if type(m) is torch.nn.Linear and m is not real.get_output_embeddings()
    ]
    assert count.quantizable == sum(m.weight.numel() for m in linear)
    assert count.quantizable_rows == sum(m.out_features for m in linear)


def test_llama3_8b_and_70b_sizes_match_the_published_ones():
    c8, c70 = LlamaConfig(**LLAMA3_8B), LlamaConfig(**LLAMA3_70B)
    e8 = estimate_memory(c8, "bfloat16")
    assert e8.n_params == pytest.approx(8.03e9, rel=PUBLISHED_TOLERANCE)
    assert e8.weight_bytes == pytest.approx(16.06e9, rel=PUBLISHED_TOLERANCE)
    assert estimate_memory(c8, "float32").weight_bytes == 2 * e8.weight_bytes
    e70 = estimate_memory(c70, "bfloat16")
    assert e70.n_params == pytest.approx(70.6e9, rel=PUBLISHED_TOLERANCE)
    assert e70.weight_bytes == pytest.approx(141.1e9, rel=PUBLISHED_TOLERANCE)
    assert e70.needed_bytes == int(e70.weight_bytes * (1 + MARGIN_FRACTION) + MARGIN_BYTES)


def test_nf4_prices_linear_weights_at_about_half_a_byte():
    c70 = LlamaConfig(**LLAMA3_70B)
    q = estimate_memory(c70, "bfloat16", NF4)
    embeddings = 2 * 128256 * 8192  # input embeddings and the untied head stay unquantised
    norms = (2 * 80 + 1) * 8192
    assert q.n_quantized == q.n_params - embeddings - norms
    # 0.5 byte + 8-bit absmax per 64 + float32 per 64 * 256; the rest float32 after k-bit prep.
    per_weight = 0.5 + 1 / 64 + 4 / (64 * 256)
    assert q.weight_bytes == pytest.approx(q.n_quantized * per_weight + 4 * (embeddings + norms))
    assert 40 * GB < q.weight_bytes < 46 * GB  # ~35 GB of nf4 layers + 8.4 GB float32 embeddings
    single = estimate_memory(c70, "bfloat16", {**NF4, "bnb_4bit_use_double_quant": False})
    assert single.weight_bytes == pytest.approx(
        q.weight_bytes + q.n_quantized * (3 / 64 - 4 / (64 * 256)), rel=1e-6
    )
    int8 = estimate_memory(c70, "bfloat16", {"load_in_8bit": True})
    assert int8.weight_bytes > q.weight_bytes + 0.45 * q.n_quantized


def test_a_model_that_does_not_fit_is_refused_in_one_line():
    c70 = LlamaConfig(**LLAMA3_70B)
    with pytest.raises(ModelLoadError) as info:
        check_fits("llama3_70b", c70, "bfloat16", None, "cuda:0", capacity=("cuda:0", 80 * GB))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(
        "model=llama3_70b: needs ~157 GB (141 GB of weights in bfloat16 + margin for "
        "activations and KV cache) but cuda:0 has 80 GB free; use 4-bit weights "
        "(model.quantization"
    )
    assert message.endswith(
        "hardware=multi_gpu (the model spread over all GPUs), or a smaller model"
    )
    # The 4-bit model fits there; on a 40 GB GPU it does not, and 4-bit is no longer suggested.
    assert check_fits("llama3_70b_4bit", c70, "bfloat16", NF4, "cuda:0", capacity=80 * GB)
    with pytest.raises(ModelLoadError, match=r"^model=llama3_70b_4bit: needs ~\d+ GB .*nf4 4-bit"):
        check_fits("llama3_70b_4bit", c70, "bfloat16", NF4, "cuda", capacity=("cuda:0", 40 * GB))
    with pytest.raises(ModelLoadError) as info:
        check_fits("llama3_70b_4bit", c70, "bfloat16", NF4, "cuda", capacity=("cuda:0", 40 * GB))
    assert "model.quantization" not in str(info.value)
    # Several GPUs together ('auto'): no multi_gpu advice.
    with pytest.raises(ModelLoadError, match=r"but the 2 GPUs has 80 GB free; use 4-bit") as info:
        check_fits("llama3_70b", c70, "bfloat16", None, "auto", capacity=("the 2 GPUs", 80 * GB))
    assert "multi_gpu" not in str(info.value)


def test_fits_and_unknown_capacity_pass():
    c8 = LlamaConfig(**LLAMA3_8B)
    estimate = check_fits("llama3_8b", c8, "bfloat16", None, "cuda", capacity=("cuda:0", 80 * GB))
    assert estimate.needed_bytes < 80 * GB
    assert check_fits("llama3_8b", c8, "bfloat16", None, "cuda", capacity=None) is not None


def test_device_capacity_here():
    what, free = device_capacity("cpu")  # psutil is installed in the dev environment
    assert "CPU" in what and free > 0
    if not torch.cuda.is_available():
        assert device_capacity("cuda") is None and device_capacity("auto") is None


@pytest.fixture
def config_only(tmp_path):
    """A folder with the Llama-3-8B config.json and nothing else (no tokenizer, no weights)."""
    LlamaConfig(**LLAMA3_8B).save_pretrained(tmp_path)
    return tmp_path


def test_load_pretrained_refuses_before_reading_weights(config_only, monkeypatch):
    monkeypatch.setattr(memory, "device_capacity", lambda device: ("cuda:0", 16 * GB))
    with pytest.raises(
        ModelLoadError, match=r"^model=llama3_8b: needs ~20 GB .* cuda:0 has 16 GB free; "
    ):
        load_pretrained("llama3_8b", str(config_only), dtype="bfloat16", device="cpu")
    # With room, loading goes on (and finds neither tokenizer nor weights).
    monkeypatch.setattr(memory, "device_capacity", lambda device: ("cuda:0", 80 * GB))
    with pytest.raises(ModelLoadError, match="not a loadable model folder"):
        load_pretrained("llama3_8b", str(config_only), dtype="bfloat16", device="cpu")


def test_a_missing_config_keeps_the_offline_error(tmp_path):
    with pytest.raises(ModelLoadError, match=r"model.name_or_path='nobody/no-model': weights not"):
        load_pretrained("x", "nobody/no-model", device="cpu")
    with pytest.raises(ModelLoadError, match=r"not a loadable model folder .*needs config.json"):
        load_pretrained("x", str(tmp_path), device="cpu")  # an empty folder


def test_a_run_refuses_a_model_too_large_for_the_cpu(config_only, monkeypatch, cfg_factory):
    monkeypatch.setattr(
        memory, "device_capacity", lambda device: ("the CPU (available RAM)", 8 * GB)
    )
    cfg = cfg_factory(
        "model=llama3_8b",
        f"model.name_or_path={config_only}",
        "method=no_change",
        "dataset.limit=1",
    )
    with pytest.raises(
        ModelLoadError,
        match=r"^model=llama3_8b: needs ~37 GB \(32 GB of weights in float32 \+ margin .*\) but "
        r"the CPU \(available RAM\) has 8.0 GB free; use 4-bit weights .*, a GPU \(hardware=gpu\), "
        r"or a smaller model$",
    ):
        run(cfg)
