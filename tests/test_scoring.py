import numpy as np
import pytest
import torch

from palign.eval.prompts import NEUTRAL_SYSTEM_PROMPT, few_shot_system_prompt
from palign.eval.scoring import (
    Scorer,
    ScoringConfig,
    ScoringError,
    cache_keyword,
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


class _RowShift:
    """An intervention that varies by row: adds ``alpha[variant] * direction`` to the first
    decoder layer's output, the variant of each row told before every forward (as PAS does)."""

    def __init__(self, model, alphas):
        generator = torch.Generator().manual_seed(1)
        self.direction = torch.randn(model.config.hidden_size, generator=generator)
        self.alpha = torch.tensor(alphas)
        self.rows = torch.zeros(1, dtype=torch.long)
        self.stages: list[tuple[str, list[int]]] = []
        self.handle = model.model.layers[0].register_forward_hook(self._shift)

    def listen(self, stage, variant):
        self.stages.append((stage, variant.tolist()))
        self.rows = variant

    def _shift(self, module, args, out):
        hidden = out[0] if isinstance(out, tuple) else out
        shifted = hidden + self.alpha[self.rows][:, None, None] * self.direction
        return (shifted, *out[1:]) if isinstance(out, tuple) else shifted


def _plain_greedy(model, ids, steps, eos):
    """Greedy decoding without any cache: a full forward of the whole sequence per token."""
    ids, new = list(ids), []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            new.append(token)
            if token in eos:
                break
            ids.append(token)
    return new


def test_greedy_rows_and_variants_equal_a_plain_greedy_decode(papi, tiny, make_scorer):
    """Rows of different lengths, three prefix variants (a per-row intervention), batches of 3
    from the shared, preallocated cache: each row's tokens are those of a greedy decode by full
    forwards of that prompt alone (no cache at all); listeners see every stage with each row's
    variant; every generated token is counted, through EOS."""
    steps, pad = 7, tiny.tokenizer.pad_token_id
    scorer = make_scorer(mode="generate", batch_size=3, max_new_tokens=steps)
    inv, subject = papi.inventory, papi.subjects[0]
    system = few_shot_system_prompt(inv.train_items[:12], subject.answers(inv.train[:12]))
    prompts = scorer.encode_prompts(system, inv.test_items[:8])
    assert len({len(p) for p in prompts}) > 1
    variants = [i % 3 for i in range(len(prompts))]
    shift = _RowShift(tiny.model, [0.0, 1.5, -3.0])
    module = scorer._module
    module.listeners.append(shift.listen)
    counted = []
    module.on_generated = counted.append
    try:
        outputs = scorer.run(prompts, variants, n_variants=3)
        order = torch.cat([o["index"] for o in outputs]).argsort()
        tokens = torch.cat([o["tokens"] for o in outputs])[order].tolist()
        eos = set(module.eos_ids)
        expected = []
        for prompt, variant in zip(prompts, variants):
            shift.rows = torch.tensor([variant])
            expected.append(_plain_greedy(tiny.model, prompt, steps, eos))
    finally:
        shift.handle.remove()
        module.listeners.remove(shift.listen)
        module.clear_prefix_cache()
    assert [row[: len(want)] for row, want in zip(tokens, expected)] == expected
    assert all(set(row[len(want) :]) <= {pad} for row, want in zip(tokens, expected))
    assert sum(counted) == sum(map(len, expected))
    assert len({tuple(row) for row in tokens}) > 1  # the variants do change the replies
    assert shift.stages[:2] == [("start", []), ("prefix", [0, 1, 2])]
    suffixes = [rows for stage, rows in shift.stages if stage == "suffix"]
    assert sorted(sum(suffixes, [])) == sorted(variants)  # each row once, with its variant
    decodes = [stage for stage, _ in shift.stages].count("decode")
    assert decodes == len(counted) - len(suffixes)  # one forward per step after the first
    current = None
    for stage, rows in shift.stages[2:]:
        current = rows if stage == "suffix" else current
        assert stage in ("suffix", "decode") and rows == current  # a batch's rows, each step


def test_decoding_writes_one_preallocated_cache_in_place(papi, tiny, make_scorer, monkeypatch):
    """Counted, not timed: after the prefix is cached, no tensor as long as the prefix is built
    by concatenation (neither the keys and values nor the attention mask grow per step), and
    every forward of a run sees the same key, value and mask storage, from the first batch's
    suffix to the last batch's last decoding step."""
    steps = 9
    scorer = make_scorer(mode="generate", batch_size=4, max_new_tokens=steps)
    scorer._module.eos_ids = [-1]  # no row ends early: every batch decodes every step
    inv, subject = papi.inventory, papi.subjects[0]
    system = few_shot_system_prompt(inv.train_items[:12], subject.answers(inv.train[:12]))
    prompts = scorer.encode_prompts(system, inv.test_items[:8])
    scorer.run(prompts)  # computes and caches the prefix
    prefix = scorer._module.prefix_length
    assert prefix > max(len(p) for p in prompts) - prefix + steps  # longer than any suffix

    storage = set()

    def record(module, args, kwargs):
        cache = kwargs[cache_keyword(type(module))]
        storage.add(
            (
                tuple(layer.keys.data_ptr() for layer in cache.layers),
                tuple(layer.values.data_ptr() for layer in cache.layers),
                kwargs["attention_mask"].data_ptr(),
            )
        )

    grown = []
    cat = torch.cat

    def spy(tensors, dim=0, **kwargs):
        out = cat(tensors, dim, **kwargs)
        if out.shape[dim] >= prefix:
            grown.append(tuple(out.shape))
        return out

    handle = tiny.model.register_forward_pre_hook(record, with_kwargs=True)
    monkeypatch.setattr(torch, "cat", spy)
    before = tiny.meter.snapshot()
    try:
        outputs = scorer.run(prompts)
    finally:
        handle.remove()
    cost = tiny.meter.snapshot() - before
    assert cost.forward_calls == 2 * steps  # 2 batches: a suffix forward, then steps - 1
    assert cost.generated_tokens == 8 * steps
    assert all(o["tokens"].shape == (4, steps) for o in outputs)
    assert grown == []
    assert len(storage) == 1


def test_each_layers_slab_is_on_that_layers_device(tiny):
    """A model spread over devices keeps each layer's cache where the layer's prefix KV is (here
    CPU and meta layers alternating, as GPUs would), the mask where the batches are; a row's
    prefix is written again only when a batch puts another variant in it."""
    from palign.models.kv_cache import PrefixSlab, SlabLayer

    config = tiny.model.config
    layers = config.num_hidden_layers
    shape = (2, config.num_key_value_heads, 5, config.hidden_size // config.num_attention_heads)
    devices = ["cpu" if i % 2 == 0 else "meta" for i in range(layers)]
    prefix = [(torch.randn(shape, device=d), torch.randn(shape, device=d)) for d in devices]
    slab = PrefixSlab(prefix, 5, config, 3, capacity=9, mask_dtype=torch.long, mask_device="cpu")
    assert slab.capacity == 64 and slab.fits(3, 64, torch.long) and not slab.fits(4, 9, torch.long)
    cache = slab.cache(torch.tensor([1, 0]))
    for layer, device in zip(cache.layers, devices):
        assert isinstance(layer, SlabLayer) and layer.keys.device.type == device
        assert layer.keys.shape == (2, *shape[1:]) and layer.get_seq_length() == 5
    assert slab.row_variant == [1, 0, -1]
    torch.testing.assert_close(cache.layers[0].keys, prefix[0][0][[1, 0]], rtol=0, atol=0)
    k = torch.randn(2, shape[1], 3, shape[3])
    keys, _ = cache.layers[0].update(k, k)
    assert keys.shape[2] == 8 and keys.data_ptr() == slab.keys[0].data_ptr()
    torch.testing.assert_close(keys[:, :, 5:], k, rtol=0, atol=0)
    slab.keys[0][1, :, :5] = 0  # a row that keeps its variant is not written again
    slab.cache(torch.tensor([0, 0, 1]))
    assert slab.row_variant == [0, 0, 1] and slab.keys[0][1, :, :5].eq(0).all()
    torch.testing.assert_close(slab.keys[0][0, :, :5], prefix[0][0][0], rtol=0, atol=0)


@pytest.mark.parametrize("window", [48, 4096])
def test_sliding_window_layers_keep_transformers_cache(papi, window):
    """Layers of another kind than plain full attention (here Mistral's sliding windows) keep
    transformers' cache class, given each row's prefix as before; the mask still covers the whole
    prefix when a window holds less of it. With a window longer than the prompts, the replies
    are those of a greedy decode by full forwards."""
    from transformers.cache_utils import DynamicSlidingWindowLayer

    from conftest import TINY_LLAMA
    from palign.models import load_random

    config = dict(TINY_LLAMA, model_type="mistral", sliding_window=window)
    loaded = load_random("tiny_mistral", config, seed=0)
    steps = 5
    scorer = Scorer(loaded, ScoringConfig(mode="generate", batch_size=3, max_new_tokens=steps))
    inv, subject = papi.inventory, papi.subjects[0]
    system = few_shot_system_prompt(inv.train_items[:12], subject.answers(inv.train[:12]))
    prompts = scorer.encode_prompts(system, inv.test_items[:5])
    seen = []

    def record(module, args, kwargs):
        cache, mask = kwargs.get(cache_keyword(type(module))), kwargs.get("attention_mask")
        if mask is not None:  # a suffix or decoding step, not the prefix
            seen.append(({type(layer) for layer in cache.layers}, mask.clone()))

    handle = loaded.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        outputs = scorer.run(prompts)
    finally:
        handle.remove()
    prefix = scorer._module.prefix_length
    assert prefix > 48
    assert seen and all(types == {DynamicSlidingWindowLayer} for types, _ in seen)
    assert all(bool(mask[:, :prefix].all()) for _, mask in seen)
    if window > max(map(len, prompts)) + steps:
        order = torch.cat([o["index"] for o in outputs]).argsort()
        tokens = torch.cat([o["tokens"] for o in outputs])[order].tolist()
        eos = set(scorer._module.eos_ids)
        for prompt, row in zip(prompts, tokens):
            want = _plain_greedy(loaded.model, prompt, steps, eos)
            assert row[: len(want)] == want
