"""Integration on the embedded SmolLM2-135M-Instruct (real weights, real tokenizer)."""

import numpy as np
import pytest
import torch

from palign.eval.prompts import few_shot_system_prompt
from palign.eval.scoring import Scorer, ScoringConfig, letter_token_ids
from palign.models import load_gguf_package

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    loaded = load_gguf_package("smollm2_135m")
    cfg = loaded.model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    return loaded


def test_few_shot_logit_scoring_on_one_subject(papi, smollm2):
    inv, subject = papi.inventory, papi.subjects[0]
    scorer = Scorer(smollm2, ScoringConfig(batch_size=4))
    system = few_shot_system_prompt(inv.train_items, subject.answers(inv.train))
    items = inv.test_items[:6]
    answers = scorer.score(system, items)
    ids = scorer.encode_prompts(system, items)
    assert len(ids[0]) > 1200  # the 120-answer context is shared as a KV cache
    letters = letter_token_ids(scorer.renderer, "Option (")
    with torch.no_grad():  # each prompt forwarded whole (the last position's logits only)
        plain = np.stack(
            [
                torch.log_softmax(
                    smollm2.model(input_ids=torch.tensor([i]), logits_to_keep=1).logits[0, -1], -1
                )[letters].numpy()
                for i in ids
            ]
        )
    probs = np.exp(plain) / np.exp(plain).sum(1, keepdims=True)
    np.testing.assert_allclose(answers.probs, probs, atol=1e-4)
    # The option letters carry most of the next-token mass: the prompt is read as intended.
    assert np.exp(plain).sum(1).min() > 0.5
    assert set(answers.scores.tolist()) <= {1, 2, 3, 4, 5}


def test_generation_answers_with_an_option(papi, smollm2):
    scorer = Scorer(smollm2, ScoringConfig(mode="generate", batch_size=4))
    answers = scorer.score(
        "You are a helpful, honest and concise assistant.", papi.inventory.test_items[:4]
    )
    assert all(isinstance(t, str) and t for t in answers.texts)
    assert (answers.scores > 0).mean() >= 0.5, answers.texts
