"""DPO: preference pairs, parity with TRL, training on tiny_llama, end to end."""

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from conftest import TINY_LLAMA
from palign.config import build
from palign.data.papi import Item
from palign.eval.scoring import Scorer, ScoringConfig
from palign.methods.base import MethodContext
from palign.methods.dpo import DPO, PairBatches, dpo_loss, preference_pairs, sequence_logps
from palign.methods.lora import AdapterArtifact
from palign.models import load_random
from palign.runs.runner import run

ITEMS = [Item(i + 1, f"Item {i}.", "A", 1, "") for i in range(5)]


def test_preference_pairs():
    answers = [5, 2, 3, 0, 4]
    assert [(p[0].number, p[1], p[2]) for p in preference_pairs(ITEMS, answers)] == [
        (1, 5, 1),
        (2, 2, 4),
        (5, 4, 2),
    ]
    everything = preference_pairs(ITEMS, answers, rejected="all_others")
    assert len(everything) == 12 and {p[2] for p in everything if p[0].number == 1} == {1, 2, 3, 4}
    neutral = preference_pairs(ITEMS, answers, keep_neutral=True)
    assert [(p[1], p[2]) for p in neutral if p[0].number == 3] == [(3, 1), (3, 5)]
    with pytest.raises(ValueError, match="method.rejected='best'"):
        preference_pairs(ITEMS, answers, rejected="best")


def test_dpo_loss_and_rewards_match_trl(tmp_path, monkeypatch):
    """Policy log-probs (left-padded, ours) and the sigmoid loss against TRL's DPOTrainer
    (right-padded, its own log-probs) on a fixed batch with a non-trivial adapter."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    monkeypatch.setenv("WANDB_MODE", "disabled")
    base = load_random("tiny_llama", TINY_LLAMA, seed=3)
    torch.manual_seed(0)
    model = get_peft_model(
        base.model,
        LoraConfig(
            task_type="CAUSAL_LM",
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj"],
            init_lora_weights=False,
        ),
    )
    rows = [([1, 5, 9, 7], [11, 12, 2], [13, 2]), ([1, 8, 6], [21, 22, 23, 2], [24, 2])]
    batch = PairBatches(rows, pad_id=0).collate([0, 1])
    model.eval()
    with torch.no_grad():
        logps = sequence_logps(
            model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
        )
        with model.disable_adapter():
            ref = sequence_logps(
                model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
            )
    chosen, rejected = logps.chunk(2)
    ref_chosen, ref_rejected = ref.chunk(2)
    ours, cr, rr = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.1)

    args = DPOConfig(
        output_dir=str(tmp_path), beta=0.1, report_to=[], use_cpu=True, loss_type=["sigmoid"]
    )
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]),
        processing_class=base.tokenizer,
    )
    trainer.precompute_ref_logps = True
    seqs = [p + c for p, c, _ in rows] + [p + r for p, _, r in rows]
    comp = [[0] * len(p) + [1] * len(c) for p, c, _ in rows] + [
        [0] * len(p) + [1] * len(r) for p, _, r in rows
    ]
    width = max(map(len, seqs))
    right = lambda xs: torch.tensor([x + [0] * (width - len(x)) for x in xs])  # noqa: E731
    inputs = {
        "input_ids": right(seqs),
        "attention_mask": right([[1] * len(s) for s in seqs]),
        "completion_mask": right(comp),
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    trainer.model.eval()
    with torch.no_grad():
        theirs = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    metrics = trainer._metrics["train" if trainer.model.training else "eval"]
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-5)
    assert cr.mean().item() == pytest.approx(metrics["rewards/chosen"][-1], abs=1e-5)
    assert rr.mean().item() == pytest.approx(metrics["rewards/rejected"][-1], abs=1e-5)
    assert abs(cr.mean().item()) > 1e-4  # the adapter really moves the policy off the reference


def test_dpo_training_lowers_the_loss_and_restores_the_model(papi):
    # A model of its own: peft wraps the model's layers in place.
    scorer = Scorer(load_random("tiny_llama", TINY_LLAMA), ScoringConfig(batch_size=16))
    items = papi.inventory.test_items[:6]
    before = scorer.score("You are a helpful, honest and concise assistant.", items).probs
    method = DPO(steps=12, warmup_steps=2, batch_size=8, micro_batch_size=4, lr=5e-3)
    method.setup(MethodContext(papi, scorer))
    subject = papi.subjects[0]
    artifact = method.align(subject, papi.inventory.train_items)
    # The DPO loss over all of the subject's pairs: ln 2 before training (the fresh adapter has
    # B = 0, so the policy is the reference), lower after it. (loss_first / loss_last, means
    # over a quarter of the micro-batches each, are too noisy to tell after 12 steps.)
    data = method._batches(subject, papi.inventory.train_items)
    ref = method.reference_logps(data)
    policy = torch.zeros_like(ref)
    with artifact.active_in(method.peft_model), torch.no_grad():
        for start in range(0, len(data.rows), 8):
            idx = list(range(start, min(start + 8, len(data.rows))))
            b = data.collate(idx)
            logps = sequence_logps(
                method.peft_model, b["input_ids"], b["attention_mask"], b["completion_mask"]
            )
            policy[idx] = torch.stack(logps.chunk(2), -1)
    loss, _, _ = dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], method.beta)
    assert float(loss) < float(torch.log(torch.tensor(2.0))) - 0.02
    assert all(torch.isfinite(torch.tensor([h["loss"] for h in artifact.history])))
    answers = method.answer(subject, artifact, items)
    assert len(answers.scores) == 6
    after = scorer.score("You are a helpful, honest and concise assistant.", items).probs
    assert abs(after - before).max() < 1e-6  # the shared model is the base model again


def test_dpo_end_to_end(cfg_factory):
    cfg = cfg_factory("model=tiny_llama", "method=dpo_cpu", "method.steps=3", "dataset.limit=1")
    summary = run(cfg)
    out = Path(cfg.paths.output_dir)
    row = json.loads((out / "results.jsonl").read_text())
    assert (
        row["method"] == "dpo_cpu"
        and row["timing"]["train_s"] > 0
        and row["align_info"]["steps"] == 3
    )
    assert (
        out / "artifacts" / row["method"] / str(row["case"]) / "adapter_model.safetensors"
    ).stat().st_size > 0
    assert summary.main.timing["train_s_per_subject"] > 0
    # The adapter is in PEFT's format: PeftModel.from_pretrained loads it onto a fresh base model
    # and answers as palign's own loader does; the trained adapter moved the model.
    folder = out / "artifacts" / row["method"] / str(row["case"])
    ids = torch.tensor([[1, 520, 2464, 314, 905, 30, 2]])
    base = build(cfg.model)
    with torch.no_grad():
        plain = base.model(input_ids=ids).logits
        with AdapterArtifact.load(folder).applied(base):
            palign_logits = base.model(input_ids=ids).logits
        peft = PeftModel.from_pretrained(build(cfg.model).model, str(folder)).eval()
        peft_logits = peft(input_ids=ids).logits
    torch.testing.assert_close(peft_logits, palign_logits, rtol=0, atol=1e-6)
    assert (peft_logits - plain).abs().max() > 1e-4


def test_every_step_accumulates_a_full_batch(papi, tiny):
    """7 optimiser steps of effective batch 8 (2 x 4): exactly 14 micro-batches of 4 pairs each
    are forwarded, plus the reference log-probs once per pair: counted by the model's meter,
    also when the steps need more micro-batches than one pass over the pairs holds."""
    scorer = Scorer(tiny, ScoringConfig(batch_size=16))
    method = DPO(steps=7, warmup_steps=1, batch_size=8, micro_batch_size=4)
    method.setup(MethodContext(papi, scorer))
    subject, items = papi.subjects[0], papi.inventory.train_items[:10]
    pairs = len(method._batches(subject, items).rows)
    assert pairs < 14 * 4  # the steps wrap around the pairs
    before = tiny.meter.snapshot()
    artifact = method.align(subject, items)
    cost = tiny.meter.snapshot() - before
    method.teardown()
    reference = -(-pairs // 4)
    assert cost.forward_calls == reference + 7 * 2
    assert len(artifact.history) == 7 * 2  # one record per micro-batch
    order = method._pair_order(pairs, subject.case, 14)
    assert len(order) == 14 * 4 and sorted(order[:pairs]) == list(range(pairs))
