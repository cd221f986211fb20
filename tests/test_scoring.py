import numpy as np
import pytest
import torch

from palign.eval.prompts import NEUTRAL_SYSTEM_PROMPT, few_shot_system_prompt
from palign.eval.scoring import (
    ScoringError,
    common_prefix_length,
    letter_token_ids,
    parse_answer,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("(A). Very Accurate", 5),
        ("B", 4),  # the text ends after the letter
        ("Option (C)", 3),
        ("d) Moderately", 2),
        (" E.", 1),
        ("I would choose (B)", 2),  # the reference parser reads the 'd ' of 'would'
        ("Absolutely not", 0),
        ("", 0),
        ("Very Accurate", 0),  # no standalone letter in the window
        ("xxxxxxxxxxxA B", 0),  # 'A' ends the 12-character window: what follows is cut off
        ("xxxxxxxxxxA B", 5),
        ("The answer is (A)", 1),  # reference defect: the "e " of "The"; (A) is beyond the window
    ],
)
def test_reference_parser(text, expected):
    assert parse_answer(text) == expected


def test_common_prefix_length():
    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert common_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2  # each keeps >= 1 token
    assert common_prefix_length([[7, 1], [8, 1]]) == 0


def _plain_letter_logprobs(model, ids, letter_ids):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
    return torch.log_softmax(logits, -1)[letter_ids].numpy()


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_prefix_cached_batches_equal_plain_forwards(papi, tiny, make_scorer, batch_size):
    """Shared-prefix KV cache + left padding after the prefix == one plain forward per prompt."""
    scorer = make_scorer(batch_size=batch_size)
    inv, subject = papi.inventory, papi.subjects[0]
    system = few_shot_system_prompt(inv.train_items[:20], subject.answers(inv.train[:20]))
    items = inv.test_items[:7]  # statements of different lengths -> padding inside batches
    ids = scorer.encode_prompts(system, items)
    assert len({len(i) for i in ids}) > 1
    answers = scorer.score(system, items)
    letter_ids = letter_token_ids(scorer.renderer, "Option (")
    plain = np.stack([_plain_letter_logprobs(tiny.model, i, letter_ids) for i in ids])
    probs = np.exp(plain) / np.exp(plain).sum(1, keepdims=True)
    np.testing.assert_allclose(answers.probs, probs, atol=1e-5)
    assert answers.scores.tolist() == (5 - plain.argmax(1)).tolist()
    assert np.allclose(answers.expected, probs @ np.arange(5, 0, -1))


def test_prefix_cache_is_rebuilt_for_a_new_system_prompt(papi, make_scorer):
    scorer = make_scorer(batch_size=4)
    items = papi.inventory.test_items[:4]
    first = scorer.score(NEUTRAL_SYSTEM_PROMPT, items).probs
    other = scorer.score("You are a cheerful pirate.", items).probs
    again = scorer.score(NEUTRAL_SYSTEM_PROMPT, items).probs
    np.testing.assert_allclose(first, again, atol=1e-6)
    assert not np.allclose(first, other, atol=1e-4)


def test_batched_greedy_generation_equals_hf_generate(papi, tiny, make_scorer):
    scorer = make_scorer(mode="generate", batch_size=4, max_new_tokens=6)
    items = papi.inventory.test_items[:5]
    answers = scorer.score(NEUTRAL_SYSTEM_PROMPT, items)
    assert answers.probs is None and len(answers.texts) == 5
    for ids, text in zip(scorer.encode_prompts(NEUTRAL_SYSTEM_PROMPT, items), answers.texts):
        with torch.no_grad():
            out = tiny.model.generate(
                torch.tensor([ids]),
                max_new_tokens=6,
                do_sample=False,
                pad_token_id=tiny.tokenizer.pad_token_id,
            )
        assert text == tiny.tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
    assert answers.scores.tolist() == [parse_answer(t) for t in answers.texts]


def test_answer_prefix_that_splits_letters_is_rejected(make_scorer):
    with pytest.raises(ScoringError, match="scoring.answer_prefix"):
        make_scorer(answer_prefix="Option (A")


def test_unknown_mode_is_rejected(make_scorer):
    with pytest.raises(ScoringError, match="scoring.mode='sample'"):
        make_scorer(mode="sample")
