"""4-bit for real, on the CPU: the shipped ``model=llama3_70b_4bit`` config (bitsandbytes nf4,
double quantisation, bfloat16 compute) on a tiny random Llama saved to disk, through
``load_pretrained`` and whole PAS / QLoRA-DPO / PPO runs.

bitsandbytes (0.50 here) quantises and runs nf4 on the CPU: the layers are real ``Linear4bit``
modules holding packed 4-bit weights, so what is checked here is what a GPU run does, minus
speed (and minus the CUDA kernels).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

import palign.models.loading as loading  # noqa: E402
from conftest import TINY_LLAMA  # noqa: E402
from palign.config import build  # noqa: E402
from palign.eval.prompts import NEUTRAL_SYSTEM_PROMPT  # noqa: E402
from palign.eval.records import Summary  # noqa: E402
from palign.eval.scoring import Scorer, ScoringConfig  # noqa: E402
from palign.methods.lora import LoraMethod  # noqa: E402
from palign.models.memory import estimate_memory  # noqa: E402
from palign.pas.heads import HeadShift, fold_into_bias, head_layout, unfold_bias  # noqa: E402
from palign.runs.runner import run  # noqa: E402

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
PROJECTIONS = (*ATTENTION, "gate_proj", "up_proj", "down_proj")
#: Answer probabilities of the same row computed in different batches (other rows, other
#: variants; measured ~2e-7 with bfloat16 compute of the 4-bit layers).
BATCH_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A random float32 tiny Llama and the embedded model's tokenizer, saved as a checkpoint."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = dict(TINY_LLAMA)
    hf_config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    folder = tmp_path_factory.mktemp("tiny_llama_checkpoint")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(loading.converted_gguf_dir())).save_pretrained(folder)
    return folder


def _overrides(folder, *more: str) -> list[str]:
    return ["model=llama3_70b_4bit", f"model.name_or_path={folder}", "hardware=cpu", *more]


@pytest.fixture(scope="module")
def loaded4(tiny_folder):
    """The tiny checkpoint loaded by the real 4-bit config (Hydra-composed, as a run does)."""
    from palign.config import compose

    return build(compose(_overrides(tiny_folder)).model)


def _linear4bit(model) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def test_the_4bit_config_loads_nf4_linear4bit_layers(loaded4):
    model = loaded4.model
    assert loaded4.quantized
    layers = _linear4bit(model)
    expected = {
        f"model.layers.{i}.{'self_attn' if p in ATTENTION else 'mlp'}.{p}"
        for i in range(TINY_LLAMA["num_hidden_layers"])
        for p in PROJECTIONS
    }
    assert set(layers) == expected  # every projection, and nothing else (head, embeddings)
    for layer in layers.values():
        assert type(layer) is bnb.nn.Linear4bit
        assert isinstance(layer.weight, bnb.nn.Params4bit) and layer.weight.dtype == torch.uint8
        state = layer.weight.quant_state
        assert state.quant_type == "nf4"
        assert state.nested  # double quantisation: the absmax themselves 8-bit
        assert state.blocksize == 64
        assert layer.compute_dtype == torch.bfloat16
        assert layer.weight.device.type == "cpu"
        # load_pretrained turns off the CPU repacking (see test_4bit_layers_stay_differentiable...)
        assert not getattr(layer, "support_avx512bf16_for_cpu", False)
    # QLoRA's preparation: the non-quantised weights (embeddings, norms; head tied) in float32.
    plain = {p.dtype for n, p in model.named_parameters() if not isinstance(p, bnb.nn.Params4bit)}
    assert plain == {torch.float32}
    attn = model.model.layers[0].self_attn
    assert tuple(attn.q_proj.weight.quant_state.shape) == (64, 64)


def test_the_memory_estimate_matches_the_loaded_4bit_model(loaded4):
    """The nf4 accounting of palign.models.memory against the bytes the layers really hold
    (packed weights, 8-bit absmax, float32 second-level absmax; not the constant code tables)."""
    quant = {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
    }
    estimate = estimate_memory(loaded4.model.config, "bfloat16", quant)
    layers = _linear4bit(loaded4.model).values()
    assert estimate.n_quantized == sum(math.prod(m.weight.quant_state.shape) for m in layers)

    def nbytes(t):
        return t.numel() * t.element_size()

    real_4bit = sum(
        nbytes(m.weight.data)
        + nbytes(m.weight.quant_state.absmax)
        + nbytes(m.weight.quant_state.state2.absmax)
        for m in layers
    )
    real_plain = sum(
        nbytes(p) for p in loaded4.model.parameters() if not isinstance(p, bnb.nn.Params4bit)
    )
    assert estimate.weight_bytes == pytest.approx(real_4bit + real_plain, rel=0.01)
    assert estimate.n_params == estimate.n_quantized + sum(
        p.numel() for p in loaded4.model.parameters() if not isinstance(p, bnb.nn.Params4bit)
    )


def test_4bit_layers_stay_differentiable_after_scoring(loaded4):
    """bitsandbytes 0.50 repacks a 4-bit weight for a fused CPU kernel without autograd on its
    first no-grad eval forward (on AVX512-BF16 CPUs); load_pretrained turns that off, so the
    input gradient through a 4-bit layer is right after palign has scored items."""
    import bitsandbytes.functional as bnbf

    model = loaded4.model
    with torch.no_grad():  # what the scorer does
        model(torch.tensor([[1, 2, 3, 4]]))
    proj = model.model.layers[0].self_attn.o_proj
    assert not getattr(proj.weight.quant_state, "packing_format_for_cpu", False)
    weight = bnbf.dequantize_4bit(proj.weight.data, proj.weight.quant_state).float()
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    proj.train()
    try:
        proj(x).float().square().sum().backward()
    finally:
        proj.eval()
    reference = 2 * (x.detach() @ weight.t()) @ weight
    assert x.grad is not None
    torch.testing.assert_close(x.grad, reference, rtol=0.03, atol=0.03 * reference.abs().max())


def test_pas_head_shifts_change_the_4bit_models_answers(loaded4, papi):
    """A HeadShift (forward pre-hooks on the 4-bit o_proj) through Scorer.applied: rows of the
    zero-shift variant answer as the unshifted model does (within BATCH_TOLERANCE), rows of the
    shifted variant differently; folding the shift into o_proj's bias agrees with the hooks."""
    scorer = Scorer(loaded4, ScoringConfig(batch_size=8))
    items = papi.inventory.test_items[:6]
    layout = head_layout(loaded4.model)
    assert all(isinstance(p, bnb.nn.Linear4bit) for p in layout.o_projs)
    plain = scorer.score(NEUTRAL_SYSTEM_PROMPT, items).probs

    shifts = torch.zeros(2, layout.n_layers, layout.n_heads * layout.head_dim)
    generator = torch.Generator().manual_seed(0)
    shifts[1, :, : 2 * layout.head_dim] = 3 * torch.randn(
        layout.n_layers, 2 * layout.head_dim, generator=generator
    )
    calls = []
    handles = [p.register_forward_pre_hook(lambda m, a: calls.append(1)) for p in layout.o_projs]
    try:
        with scorer.applied(HeadShift(layout, shifts)):
            both = scorer.score(NEUTRAL_SYSTEM_PROMPT, items + items, [0] * 6 + [1] * 6, 2).probs
    finally:
        for handle in handles:
            handle.remove()
    assert calls  # the 4-bit o_proj ran under the shift's hooks
    zero, shifted = both[:6], both[6:]
    assert abs(zero - plain).max() < BATCH_TOLERANCE  # alpha 0 is the unshifted model
    assert abs(shifted - plain).max() > 1e-2  # a random model: answers near uniform
    again = scorer.score(NEUTRAL_SYSTEM_PROMPT, items).probs
    assert abs(again - plain).max() < BATCH_TOLERANCE  # the model is unchanged after exit

    undo = fold_into_bias(layout, shifts[1])
    try:
        with scorer.applied():
            folded = scorer.score(NEUTRAL_SYSTEM_PROMPT, items).probs
    finally:
        unfold_bias(undo)
    assert all(p.bias is None for p in layout.o_projs)
    # The hook adds the shift before the bfloat16 matmul, the folded bias after it (and
    # bitsandbytes casts that bias to bfloat16 on the first forward).
    assert abs(folded - shifted).max() < 1e-3  # measured ~2e-4


class LoraSpy:
    """Records, when a LoRA method wraps the model, the base layers of its LoRA layers."""

    def __init__(self, monkeypatch):
        self.base_types: dict[str, type] = {}
        self.loaded = None
        original_setup, original_finish = LoraMethod.setup, loading.finish_loading
        spy = self

        def setup(method, context):
            original_setup(method, context)
            from peft.tuners.lora import LoraLayer

            for name, module in method.peft_model.named_modules():
                if isinstance(module, LoraLayer):
                    spy.base_types[name] = type(module.get_base_layer())

        def finish_loading(*args, **kwargs):
            spy.loaded = original_finish(*args, **kwargs)
            return spy.loaded

        monkeypatch.setattr(LoraMethod, "setup", setup)
        monkeypatch.setattr(loading, "finish_loading", finish_loading)


def _check_summary(summary: Summary) -> None:
    assert summary.model == "llama3_70b_4bit" and summary.main.n_subjects == 1
    assert math.isfinite(summary.score)
    assert all(math.isfinite(v) for v in summary.main.mae.values())


@pytest.mark.parametrize("method", ["dpo_smoke", "ppo_smoke"])
def test_qlora_runs_train_adapters_on_4bit_layers(monkeypatch, cfg_factory, tiny_folder, method):
    from safetensors.torch import load_file

    spy = LoraSpy(monkeypatch)
    cfg = cfg_factory(*_overrides(tiny_folder, f"method={method}", "dataset.limit=1"))
    summary = run(cfg)
    _check_summary(summary)
    # LoRA on every attention projection, each wrapping a 4-bit layer.
    assert len(spy.base_types) == 4 * TINY_LLAMA["num_hidden_layers"]
    assert set(spy.base_types.values()) == {bnb.nn.Linear4bit}
    # Trained: B starts at 0 and is non-zero after the steps, in every layer.
    artifacts = Path(cfg.paths.output_dir) / "artifacts" / summary.method
    adapters = list(artifacts.glob("*/adapter_model.safetensors"))
    assert len(adapters) == 1
    state = load_file(str(adapters[0]))
    b = {k: v for k, v in state.items() if "lora_B" in k}
    assert len(b) == 4 * TINY_LLAMA["num_hidden_layers"]
    assert all(v.abs().max() > 0 and torch.isfinite(v).all() for v in b.values())
    # After the run, the model is the plain 4-bit model again: no LoRA layers left.
    model = spy.loaded.model
    assert not any("lora_" in n for n, _ in model.named_parameters())
    assert {type(m) for m in _linear4bit(model).values()} == {bnb.nn.Linear4bit}
    assert len(_linear4bit(model)) == len(PROJECTIONS) * TINY_LLAMA["num_hidden_layers"]


def test_pas_runs_on_the_4bit_model(monkeypatch, cfg_factory, tiny_folder):
    """Whole PAS run (probes on the 4-bit model's head activations, alpha chosen by 2-fold CV on
    the subject's items, test answers under the shift): the shifts hook 4-bit o_projs."""
    hooked: list[tuple[type, int]] = []
    original_enter = HeadShift.__enter__

    def enter(self):
        original_enter(self)
        hooked.append((type(self.layout.o_projs[0]), len(self._handles)))
        return self

    monkeypatch.setattr(HeadShift, "__enter__", enter)
    cfg = cfg_factory(
        *_overrides(
            tiny_folder,
            "method=pas",
            "method.top_k=4",
            "method.folds=2",
            "method.alphas=[0,4]",
            "dataset.limit=1",
        )
    )
    summary = run(cfg)
    _check_summary(summary)
    assert math.isfinite(summary.selection_score)
    assert hooked and {t for t, _ in hooked} == {bnb.nn.Linear4bit}
    assert max(n for _, n in hooked) >= 1  # at least one layer's o_proj shifted
    rows = (Path(cfg.paths.output_dir) / "results.jsonl").read_text().splitlines()
    assert len(rows) == 1 and json.loads(rows[0])["align_info"]["alpha"] in (0, 4)
