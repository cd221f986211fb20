import numpy as np
import pytest
import torch

from palign.eval.prompts import NEUTRAL_SYSTEM_PROMPT, few_shot_system_prompt
from palign.eval.scoring import (
    ScoringError,
    common_prefix_length,
    eos_ids,
    letter_token_ids,
    parse_answer,
)


def _reference_rule(text: str) -> int:
    """The reference code's parser as its source states it: the first match of
    ``[abcdeABCDE][^a-zA-Z]`` in the first 12 characters, A = 5 ... E = 1, else unparsed."""
    for i, ch in enumerate(text[:12][:-1]):
        if (
            ch in "abcdeABCDE"
            and not text[:12][i + 1].isascii()
            or (ch in "abcdeABCDE" and not text[:12][i + 1].isalpha())
        ):
            return 5 - "ABCDE".index(ch.upper())
    return 0


@pytest.mark.parametrize(
    "text, reference, word",
    [
        ("Option (A). Very Accurate", 5, 5),
        ("Option B", 0, 4),  # the text ends after the letter: the reference needs a next char
        ("Option B<|im_end|>", 4, 4),  # as the reference decodes it, the end token follows
        ("Option (C)", 3, 3),
        ("Optiond) Moderately", 2, 0),  # glued to a word: palign does not read it
        ("Option E.", 1, 1),
        ("I would choose (B)", 2, 0),  # the reference reads the 'd ' of 'would'
        ("Absolutely not", 0, 0),
        ("", 0, 0),
        ("Very Accurate", 0, 0),  # no standalone letter in the window
        ("xxxxxxxxxxxA B", 0, 0),  # 'A' ends the 12-character window: what follows is cut off
        ("xxxxxxxxxx A B", 0, 0),
        ("xxxxxxxxx A B", 5, 5),
        ("The answer is (A)", 1, 0),  # the "e " of "The"; (A) is beyond the window
    ],
)
def test_parse_rules(text, reference, word):
    assert parse_answer(text, rule="reference") == reference == _reference_rule(text)
    assert parse_answer(text, rule="word") == word
    with pytest.raises(ScoringError, match="scoring.parse='loose'"):
        parse_answer(text, rule="loose")


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


@pytest.mark.parametrize("rule", ["reference", "word"])
def test_batched_greedy_generation_equals_hf_generate(papi, tiny, make_scorer, rule):
    """Generation mode as the reference runs it: the assistant turn prefilled with "Option",
    greedy decoding; the kept text is the prefill and the continuation up to and including the
    end-of-turn token (special tokens as the reference decodes them), parsed by ``rule``."""
    scorer = make_scorer(mode="generate", batch_size=4, max_new_tokens=6, parse=rule)
    items = papi.inventory.test_items[:5]
    answers = scorer.score(NEUTRAL_SYSTEM_PROMPT, items)
    assert answers.probs is None and len(answers.texts) == 5
    eos = set(eos_ids(tiny))
    for ids, text in zip(scorer.encode_prompts(NEUTRAL_SYSTEM_PROMPT, items), answers.texts):
        assert tiny.tokenizer.decode(ids).endswith("<|im_start|>assistant\nOption")
        with torch.no_grad():
            out = tiny.model.generate(
                torch.tensor([ids]),
                max_new_tokens=6,
                do_sample=False,
                pad_token_id=tiny.tokenizer.pad_token_id,
            )
        new = out[0, len(ids) :].tolist()
        stop = next((i + 1 for i, t in enumerate(new) if t in eos), len(new))
        assert text == "Option" + tiny.tokenizer.decode(new[:stop], skip_special_tokens=False)
    assert answers.scores.tolist() == [parse_answer(t, rule=rule) for t in answers.texts]


def test_paper_questions_keep_the_period(papi, make_scorer):
    item = papi.inventory.items[1]  # "Worry about things."
    assert 'statement of you: "You worry about things.."' in make_scorer(
        strip_period=False
    ).question(item)
    assert 'statement of you: "You worry about things."\n' in make_scorer().question(item)


def test_answer_prefix_that_splits_letters_is_rejected(make_scorer):
    with pytest.raises(ScoringError, match="scoring.answer_prefix"):
        make_scorer(answer_prefix="Option (A")


def test_unknown_mode_is_rejected(make_scorer):
    with pytest.raises(ScoringError, match="scoring.mode='sample'"):
        make_scorer(mode="sample")


def test_scoring_shows_a_bar_over_batches(papi, make_scorer, capsys):
    scorer = make_scorer(batch_size=16)
    items = papi.inventory.test_items[:40]
    scorer.score(NEUTRAL_SYSTEM_PROMPT, items)
    err = capsys.readouterr().err
    assert "logit 40 prompts" in err and "0/3 [" in err  # a bar over ceil(40 / 16) batches
    scorer.score(NEUTRAL_SYSTEM_PROMPT, items[:5])  # one batch: no bar
    assert "prompts" not in capsys.readouterr().err
