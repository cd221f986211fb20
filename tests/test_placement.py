"""palign places the model once: no Trainer, method or run moves a weight or changes its dtype.

A spy on ``torch.nn.Module._apply`` (what ``.to``, ``.cpu``, ``.cuda``, ``.half`` ... all go
through) records every call on a module holding a weight of the loaded model, from the moment
the loader hands the model over until the run ends. On a GPU each such call would copy the model.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

import palign.models.loading as loading
from palign.eval.scoring import ItemScorer, Scorer, ScoringConfig
from palign.models.placement import PlacementError, check_device, make_trainer
from palign.runs.runner import run


class MoveSpy:
    """Arms itself when a loader finishes a model; then records ``_apply`` on its modules."""

    def __init__(self, monkeypatch):
        self.model = None
        self.params: set[int] = set()
        self.before: dict[str, tuple] = {}
        self.moves: list[str] = []
        original_apply = torch.nn.Module._apply
        original_finish = loading.finish_loading
        spy = self

        def _apply(module, fn, *args, **kwargs):
            if spy.params and any(id(p) in spy.params for p in module.parameters()):
                spy.moves.append(type(module).__name__)
            return original_apply(module, fn, *args, **kwargs)

        def finish_loading(*args, **kwargs):
            loaded = original_finish(*args, **kwargs)
            spy.arm(loaded.model)
            return loaded

        monkeypatch.setattr(torch.nn.Module, "_apply", _apply)
        monkeypatch.setattr(loading, "finish_loading", finish_loading)

    def arm(self, model) -> None:
        self.model = model
        self.params = {id(p) for p in model.parameters()}
        self.before = self.placement()

    def placement(self) -> dict[str, tuple]:
        return {
            name: (p.device, p.dtype, p.data_ptr()) for name, p in self.model.named_parameters()
        }


def _runs(cfg_factory, hardware: str):
    common = [f"hardware={hardware}", "model=tiny_llama", "dataset.limit=2"]
    pas = cfg_factory(*common, "method=pas", "method.top_k=4", "method.folds=2", out="pas")
    dpo = cfg_factory(*common, "method=dpo_smoke", out="dpo")
    return {"pas": pas, "dpo": dpo}


@pytest.mark.parametrize(
    "hardware",
    [
        "cpu",
        pytest.param(
            "gpu",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
            ],
        ),
    ],
)
@pytest.mark.parametrize("method", ["pas", "dpo"])
def test_a_whole_run_never_moves_the_model(monkeypatch, cfg_factory, hardware, method):
    spy = MoveSpy(monkeypatch)
    summary = run(_runs(cfg_factory, hardware)[method])
    assert summary.main.n_subjects == 2
    assert spy.model is not None
    assert spy.moves == []  # no .to()/.cpu()/dtype cast on any module holding a weight
    # Every weight is the same tensor, on the same device, in the same dtype (LoRA layers are
    # removed again at the end of the DPO run).
    assert spy.placement() == spy.before
    expected = "cuda" if hardware == "gpu" else "cpu"
    assert {device.type for device, _, _ in spy.before.values()} == {expected}


def test_the_spy_sees_lightnings_own_strategy_move_the_model(monkeypatch, tiny):
    """Control: a Trainer with Lightning's default strategy moves the module at set-up and
    teardown, and the spy counts it; palign's Trainer does not."""
    spy = MoveSpy(monkeypatch)
    spy.arm(tiny.model)
    scorer = Scorer(tiny, ScoringConfig(batch_size=4))
    module = ItemScorer(tiny.model, None, tiny.tokenizer.pad_token_id, [])
    prompts = [[1, 2, 3, 4], [1, 2, 5]]
    from palign.eval.scoring import SuffixBatches

    module.set_prefix([1, 2])
    data = SuffixBatches([p[2:] for p in prompts], 0, 4)
    L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False).predict(
        module, datamodule=data
    )
    assert len(spy.moves) >= 2  # model_to_device at set-up, .cpu() at teardown
    spy.moves.clear()
    make_trainer(tiny.device).predict(module, datamodule=data)
    scorer.run(prompts)
    assert spy.moves == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_gpu_device_without_cuda_is_one_line_and_writes_nothing(cfg_factory):
    with pytest.raises(PlacementError, match=r"hardware.device='cuda': no CUDA GPU is visible"):
        check_device("cuda")
    cfg = cfg_factory("model=tiny_llama", "method=no_change", "dataset.limit=1", "hardware=gpu")
    with pytest.raises(PlacementError, match=r"hardware.device='cuda'"):
        run(cfg)
    assert not Path(cfg.paths.output_dir).exists()  # refused before the run dir was made


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "tpu"])
def test_a_malformed_device_is_refused(device):
    with pytest.raises(PlacementError, match=rf"hardware.device='{device}' is not one of"):
        check_device(device)


def test_a_precision_that_converts_weights_is_refused(tiny):
    with pytest.raises(PlacementError, match=r"hardware.precision='bf16-true' would convert"):
        Scorer(tiny, ScoringConfig(), precision="bf16-true")
