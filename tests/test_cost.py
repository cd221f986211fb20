"""Counted model work (forwards, tokens, generated tokens) and the scorer's out-of-memory retry."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from palign.eval.prompts import NEUTRAL_SYSTEM_PROMPT
from palign.eval.scoring import common_prefix_length
from palign.runs.runner import run


def _expected_logit_cost(scorer, items, batch_size):
    """Forwards and tokens of one logit-scoring run, computed from the prompts: one prefix
    forward, then suffix batches (sorted by length) left-padded to their longest row."""
    prompts = scorer.encode_prompts(NEUTRAL_SYSTEM_PROMPT, items)
    shared = common_prefix_length(prompts)
    lengths = sorted(len(p) - shared for p in prompts)
    batches = [lengths[i : i + batch_size] for i in range(0, len(lengths), batch_size)]
    return 1 + len(batches), shared + sum(len(b) * max(b) for b in batches)


def test_logit_scoring_cost_is_counted_exactly(papi, make_scorer):
    scorer = make_scorer(batch_size=16)
    items = papi.inventory.test_items
    before = scorer.loaded.meter.snapshot()
    scorer.score(NEUTRAL_SYSTEM_PROMPT, items)
    cost = scorer.loaded.meter.snapshot() - before
    calls, tokens = _expected_logit_cost(scorer, items, 16)
    assert (cost.forward_calls, cost.tokens_forwarded, cost.generated_tokens) == (
        calls,
        tokens,
        0,
    )
    assert calls == 1 + math.ceil(180 / 16)


def test_generation_counts_every_generated_token(papi, make_scorer):
    scorer = make_scorer(mode="generate", batch_size=8, max_new_tokens=5)
    items = papi.inventory.test_items[:16]
    before = scorer.loaded.meter.snapshot()
    answers = scorer.score(NEUTRAL_SYSTEM_PROMPT, items)
    cost = scorer.loaded.meter.snapshot() - before
    # Each row generates until EOS or 5 tokens; decoded texts hold at most that many tokens.
    produced = sum(
        min(5, len(scorer.loaded.tokenizer(t, add_special_tokens=False)["input_ids"]) or 1)
        for t in answers.texts
    )
    assert 16 <= cost.generated_tokens <= 16 * 5
    assert cost.generated_tokens >= produced - 16  # tokenising decoded text may merge tokens
    # prefix + 2 suffix batches + up to 4 decode steps per batch (the first token comes from
    # the suffix forward)
    assert 3 <= cost.forward_calls <= 3 + 2 * 4


def test_summary_reports_cost_per_subject_and_setup(cfg_factory, monkeypatch, tmp_path):
    # A fresh activation cache, so that PAS's set-up computes them.
    monkeypatch.setattr("palign.pas.activations.cache_root", lambda _: tmp_path / "cache")
    cfg = cfg_factory(
        "model=tiny_llama",
        "method=pas",
        "method.top_k=4",
        "method.folds=2",
        "method.subject_batch=2",
        "dataset.limit=2",
        "compare=[no_change]",
    )
    summary = run(cfg)
    out = Path(cfg.paths.output_dir)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    # The two subjects were one group: equal shares of its counted work.
    assert rows[0]["cost"] == rows[1]["cost"] and rows[0]["subject_batch"] == 2
    per = summary.main.cost["per_subject"]
    assert per["total"]["forward_calls"] == pytest.approx(
        per["align"]["forward_calls"] + per["answer"]["forward_calls"]
    )
    assert per["align"]["tokens_forwarded"] > per["answer"]["tokens_forwarded"] > 0
    # PAS's set-up forwards the 240 contrastive prompts once (one prefix, 15 batches of 16).
    assert summary.main.cost["setup"]["forward_calls"] == 1 + 15
    assert summary.compare["no_change"].cost["setup"]["forward_calls"] == 0
    assert summary.compare["no_change"].cost["per_subject"]["align"]["forward_calls"] == 0
    # no_change: the neutral prefix is forwarded once for both subjects (its KV cache is kept
    # while the prompts' prefix and the model stay the same), then 12 batches of 16 per subject.
    assert summary.compare["no_change"].cost["per_subject"]["answer"]["forward_calls"] == (
        (1 + 2 * math.ceil(180 / 16)) / 2
    )
    assert "Model work per subject, counted" in (out / "report.md").read_text()


class OutOfMemory:
    """A device with room for ``more_than`` rows: a suffix forward of more rows raises
    ``torch.OutOfMemoryError`` before the model runs, as a GPU would."""

    def __init__(self, more_than: int):
        self.more_than = more_than

    def listen(self, stage, variant):
        if stage == "suffix" and variant.shape[0] > self.more_than:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def test_out_of_memory_halves_the_batch_and_loses_nothing(papi, make_scorer, caplog):
    """A forward of more than 4 rows runs out of memory (injected before the model runs, as a
    device would): the run starts over with batches of 4, says so once, and answers as before."""
    scorer = make_scorer(batch_size=16)
    items = papi.inventory.test_items[:40]
    expected = scorer.score(NEUTRAL_SYSTEM_PROMPT, items)

    with caplog.at_level(logging.WARNING), scorer.applied(OutOfMemory(more_than=4)):
        answers = scorer.score(NEUTRAL_SYSTEM_PROMPT, items)
    assert scorer.batch_size == 4
    halvings = [r for r in caplog.records if "Out of device memory" in r.message]
    assert [r.message for r in halvings] == [
        f"Out of device memory: scoring batch size halved to {n} for the rest of the run"
        for n in (8, 4)
    ]
    np.testing.assert_array_equal(answers.scores, expected.scores)
    np.testing.assert_allclose(answers.probs, expected.probs, rtol=0, atol=1e-6)


def test_out_of_memory_with_one_row_is_raised(papi, make_scorer):
    scorer = make_scorer(batch_size=2)

    with pytest.raises(torch.OutOfMemoryError), scorer.applied(OutOfMemory(more_than=0)):
        scorer.score(NEUTRAL_SYSTEM_PROMPT, papi.inventory.test_items[:3])
    assert scorer.batch_size == 1
