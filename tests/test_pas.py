"""PAS: probes, directions, interventions, alpha selection, profiles, architectures."""

import logging
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sklearn.linear_model import LogisticRegression

from conftest import TINY_LLAMA
from palign.data.papi import HiddenAnswerError
from palign.errors import PASError
from palign.eval.prompts import NEUTRAL_SYSTEM_PROMPT, reference_contrastive_question
from palign.eval.scoring import Scorer, ScoringConfig, letter_token_ids
from palign.methods.base import Candidates, MethodContext
from palign.methods.pas import PAS
from palign.methods.prompting import FewShot
from palign.models import load_random
from palign.pas.activations import contrastive_activations, contrastive_prompts
from palign.pas.heads import HeadShift, fold_into_bias, head_layout, unfold_bias
from palign.pas.probes import ProbeFit, fit_probes, mass_mean_directions, rank_heads, split_rows
from palign.pas.profile import PASProfile
from palign.runs.runner import evaluate_group

TINY = {
    "llama": TINY_LLAMA,
    "mistral": {**TINY_LLAMA, "model_type": "mistral", "sliding_window": 64},
    "qwen2": {**TINY_LLAMA, "model_type": "qwen2"},
    "gemma3": {
        **TINY_LLAMA,
        "model_type": "gemma3_text",
        "head_dim": 24,  # != hidden_size / heads = 16
        "sliding_window": 64,
        "query_pre_attn_scalar": 24,
    },
}


@pytest.fixture(scope="module")
def synthetic():
    """120 items x (A, E) rows, 12 heads of dim 8; heads 3 and 7 carry subject 0's labels."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(240, 12, 8)).astype(np.float32)
    answers = rng.choice([1, 2, 3, 4, 5], size=(3, 120))
    high = np.repeat(answers >= 4, 2, axis=1)
    labelled = np.repeat(answers != 3, 2, axis=1)
    is_a = np.tile([True, False], 120)
    y = (np.where(high, is_a, ~is_a) & labelled).astype(np.float32)
    x[:, 3, 0] += 2.0 * (y[0] - 0.5)
    x[:, 7, :2] += 1.5 * (y[0] - 0.5)[:, None]
    train = split_rows(np.repeat(np.arange(120), 2), labelled, 0.6, [1, 2, 3])
    return x, y, labelled, train


def test_split_keeps_items_together_and_is_seeded(synthetic):
    _, _, labelled, train = synthetic
    pairs = train.reshape(3, 120, 2)
    assert (pairs[..., 0] == pairs[..., 1]).all()
    frac = train.sum(1) / labelled.sum(1)
    assert np.allclose(frac, 0.6, atol=0.02)
    again = split_rows(np.repeat(np.arange(120), 2), labelled, 0.6, [1, 2, 3])
    assert (again == train).all()


def test_batched_probes_match_scikit_learn(synthetic):
    x, y, labelled, train = synthetic
    val = labelled & ~train
    fit = fit_probes(
        torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(train), torch.from_numpy(val)
    )
    ref_val = np.zeros((3, 12))
    for s in range(3):
        for h in range(12):
            clf = LogisticRegression(C=1.0, max_iter=1000).fit(x[train[s], h], y[s, train[s]])
            ref_val[s, h] = clf.score(x[val[s], h], y[s, val[s]])
            if s == 0 and h in (3, 7):
                np.testing.assert_allclose(fit.weight[s, h].numpy(), clf.coef_[0], atol=1e-3)
    np.testing.assert_allclose(fit.val_acc.numpy(), ref_val, atol=0.02)
    ours = rank_heads(fit, "val", 2).numpy()
    theirs = np.argsort(-ref_val, axis=1, kind="stable")[:, :2]
    assert (np.sort(ours, 1) == np.sort(theirs, 1)).all()
    assert set(ours[0]) == {3, 7}


def test_mass_mean_and_sigma_against_numpy(synthetic):
    x, y, labelled, _ = synthetic
    direction, sigma = mass_mean_directions(
        torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(labelled)
    )
    for s in range(3):
        m = labelled[s]
        diff = x[m & (y[s] == 1)].mean(0) - x[m & (y[s] == 0)].mean(0)  # (heads, dim)
        unit = diff / np.linalg.norm(diff, axis=-1, keepdims=True)
        np.testing.assert_allclose(direction[s].numpy(), unit, atol=1e-5)
        proj = np.einsum("nhd,hd->nh", x[m], unit)
        np.testing.assert_allclose(sigma[s].numpy(), proj.std(0), atol=1e-5)


def test_ranking_options_and_allowed_heads(synthetic):
    x, y, labelled, train = synthetic
    fit = fit_probes(
        torch.from_numpy(x),
        torch.from_numpy(y),
        torch.from_numpy(train),
        torch.from_numpy(labelled & ~train),
    )
    paper = rank_heads(fit, "mean_train_val", 3)
    mean = (fit.train_acc + fit.val_acc) / 2
    assert torch.equal(paper, torch.sort(-mean, dim=-1, stable=True).indices[:, :3])
    allowed = torch.zeros(12, dtype=torch.bool)
    allowed[8:] = True
    assert (rank_heads(fit, "val", 2, allowed) >= 8).all()


# --- interventions on real (tiny) models ---------------------------------------------------


def _letter_logits(scorer, items, system=NEUTRAL_SYSTEM_PROMPT):
    return scorer.score(system, items).probs


@pytest.mark.parametrize("arch", sorted(TINY))
def test_hook_equals_folded_bias_on_every_architecture(arch, papi):
    loaded = load_random(f"tiny_{arch}", TINY[arch], seed=1)
    layout = head_layout(loaded.model)
    cfg = loaded.model.config
    assert layout.shape == (
        cfg.num_hidden_layers,
        cfg.num_attention_heads,
        getattr(cfg, "head_dim", None) or 16,
    )
    scorer = Scorer(loaded, ScoringConfig(batch_size=4))
    items = papi.inventory.test_items[:5]
    base = _letter_logits(scorer, items)
    gen = torch.Generator().manual_seed(0)
    shift = torch.randn(1, layout.n_layers, layout.n_heads * layout.head_dim, generator=gen)
    shift[:, :, layout.head_dim :] = 0  # only head 0 of each layer
    with scorer.applied(HeadShift(layout, 3 * shift)):
        hooked = _letter_logits(scorer, items)

    @contextmanager
    def folded():
        undo = fold_into_bias(layout, 3 * shift[0])
        try:
            yield
        finally:
            unfold_bias(undo)

    with scorer.applied(folded()):
        folded_probs = _letter_logits(scorer, items)
    np.testing.assert_allclose(hooked, folded_probs, atol=1e-5)
    assert not np.allclose(hooked, base, atol=1e-4)
    np.testing.assert_allclose(_letter_logits(scorer, items), base, atol=1e-6)  # undone


def test_alpha_zero_is_exactly_unsteered(papi, tiny, make_scorer):
    scorer = make_scorer(batch_size=4)
    items = papi.inventory.test_items[:6]
    base = scorer.score(NEUTRAL_SYSTEM_PROMPT, items).probs
    layout = head_layout(tiny.model)
    shifts = torch.randn(2, layout.n_layers, layout.n_heads * layout.head_dim)
    shifts[0] = 0.0
    rows = items + items
    with scorer.applied(HeadShift(layout, shifts)):
        both = scorer.score(NEUTRAL_SYSTEM_PROMPT, rows, [0] * 6 + [1] * 6, n_variants=2).probs
    # Different batch compositions take different kernel paths, whose float rounding differs by
    # CPU (~1e-7 seen); a zero shift must leave the answers unchanged to well below that scale.
    np.testing.assert_allclose(both[:6], base, rtol=0, atol=1e-6)
    assert not np.allclose(both[6:], base, atol=1e-4)


def test_planted_direction_moves_answers_towards_a(papi, tiny, make_scorer):
    """Shift the last layer's heads along W_O^+ (u_A - u_E): P(A) / P(E) must grow with alpha."""
    scorer = make_scorer(batch_size=8)
    layout = head_layout(tiny.model)
    letters = letter_token_ids(scorer.renderer, "Option (")
    unembed = tiny.model.get_output_embeddings().weight.detach()
    target = unembed[letters[0]] - unembed[letters[4]]  # (hidden,)
    w_o = layout.o_projs[-1].weight.detach()  # (hidden, heads * dim)
    planted = torch.linalg.lstsq(w_o, target[:, None]).solution[:, 0]
    shifts = torch.zeros(4, layout.n_layers, layout.n_heads * layout.head_dim)
    for v, alpha in enumerate([0.0, 0.5, 1.0, 2.0]):
        shifts[v, -1] = alpha * planted / planted.norm()
    items = papi.inventory.test_items[:8]
    rows = [it for _ in range(4) for it in items]
    with scorer.applied(HeadShift(layout, shifts)):
        probs = scorer.score(
            NEUTRAL_SYSTEM_PROMPT, rows, [v for v in range(4) for _ in items], 4
        ).probs
    log_ratio = np.log(probs[:, 0] / probs[:, 4]).reshape(4, 8).mean(1)
    assert (np.diff(log_ratio) > 0).all(), log_ratio


def test_identical_contrast_prompts_are_refused(papi, tiny):
    class CutScorer(Scorer):  # the reference code's Llama-3 path: the last 5 tokens were cut
        def encode_prompts(self, system_prompt, items, assistant_prefix=None):
            return [
                ids[:-5] for ids in super().encode_prompts(system_prompt, items, assistant_prefix)
            ]

    scorer = CutScorer(tiny, ScoringConfig())
    with pytest.raises(PASError, match=r"item \d+: the 'A' and 'E' prompts do not differ"):
        contrastive_activations(
            scorer, head_layout(tiny.model), papi.inventory.train_items[:3], cache_dir="/tmp/unused"
        )


def test_activations_are_cached_and_record_the_letter_token(
    papi, tiny, make_scorer, tmp_path, caplog
):
    scorer = make_scorer(batch_size=5)
    layout = head_layout(tiny.model)
    items = papi.inventory.train_items[:4]
    acts = contrastive_activations(scorer, layout, items, cache_dir=str(tmp_path))
    assert acts.shape == (4, 2, *layout.shape)
    assert len(list((tmp_path / "activations").glob("*.safetensors"))) == 1
    again = contrastive_activations(scorer, layout, items, cache_dir=str(tmp_path))
    assert torch.equal(acts, again)
    # A torn cache file (a killed writer, a full disk) is named and computed again.
    (cache,) = (tmp_path / "activations").glob("*.safetensors")
    cache.write_bytes(cache.read_bytes()[:100])
    with caplog.at_level(logging.WARNING):
        rebuilt = contrastive_activations(scorer, layout, items, cache_dir=str(tmp_path))
    assert torch.equal(acts, rebuilt)
    assert any(f"Activation cache {cache} is corrupt" in r.message for r in caplog.records)
    assert torch.equal(load_file(str(cache))["activations"], acts)  # the file is whole again
    # Direct check of one row: o_proj input of layer 1 at the last token of the "E" prompt.
    ids = scorer.encode_prompts(NEUTRAL_SYSTEM_PROMPT, items[2:3], "Option (E")[0]
    seen = {}
    handle = layout.o_projs[1].register_forward_pre_hook(
        lambda m, a: seen.setdefault("x", a[0][0, -1])
    )
    with torch.no_grad():
        tiny.model(input_ids=torch.tensor([ids]))
    handle.remove()
    np.testing.assert_allclose(acts[2, 1, 1].reshape(-1).numpy(), seen["x"].numpy(), atol=1e-5)


def test_unsupported_architecture_is_a_clear_error():
    gpt2 = load_random(
        "tiny_gpt2",
        {"model_type": "gpt2", "vocab_size": 49152, "n_embd": 32, "n_layer": 2, "n_head": 2},
    )
    with pytest.raises(PASError, match="GPT2LMHeadModel: no attention output projections found"):
        head_layout(gpt2.model)


# --- the method ------------------------------------------------------------------------------


@pytest.fixture
def pas_factory(papi, make_scorer, tmp_path, monkeypatch):
    monkeypatch.setenv("PALIGN_CACHE", str(tmp_path / "cache"))

    def build(scoring: dict | None = None, **kwargs):
        method = PAS(**{"top_k": 4, "alphas": [0, 2], "folds": 2, **kwargs})
        method.setup(MethodContext(papi, make_scorer(**{"batch_size": 16, **(scoring or {})})))
        return method

    return build


def test_clean_selection_never_reads_test_items(papi, pas_factory):
    method = pas_factory()
    subject = papi.subjects[1]
    test = set(papi.inventory.test)
    asked, scored = [], []
    original_answers = type(subject).answers
    scorer = method.context.scorer
    original_score = scorer.score

    def spy_answers(self, numbers):
        asked.extend(int(n) for n in numbers)
        return original_answers(self, numbers)

    def spy_score(system, items, *args, **kwargs):
        scored.extend(it.number for it in items)
        return original_score(system, items, *args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(type(subject), "answers", spy_answers)
    mp.setattr(scorer, "score", spy_score)
    try:
        artifact = method.align(subject, papi.inventory.train_items)
    finally:
        mp.undo()
    assert asked and scored
    assert not test & set(asked) and not test & set(scored)
    assert artifact.meta["alpha_selected_on"] == "alignment_items"
    assert artifact.profile.alpha in (0.0, 2.0) and set(artifact.meta["alpha_scores"]) == {
        "0.0",
        "2.0",
    }


def test_paper_selection_uses_test_items_and_says_so(papi, pas_factory):
    """protocol=paper: PAS answers under every alpha without seeing a test answer (its subject
    hides them); the evaluation chooses the alpha on the test items, labels the row and keeps
    every candidate's answers in the table."""
    method = pas_factory(selection="test_items", ranking="mean_train_val")
    subject = papi.subjects[0]
    hidden = subject.seen_only(papi.inventory.train)
    with pytest.raises(HiddenAnswerError, match="hidden from the method"):
        hidden.answers(papi.inventory.test[:1])
    artifact = method.align(hidden, papi.inventory.train_items)
    assert artifact.profile.alpha is None
    candidates = method.answer(hidden, artifact, papi.inventory.test_items)
    assert isinstance(candidates, Candidates) and candidates.values == [0.0, 2.0]
    assert [len(a.scores) for a in candidates.answers] == [180, 180]

    ((row, artifact, table),) = evaluate_group(method, [subject], papi.inventory)
    scores = artifact.meta["alpha_scores_on_test_items"]
    assert set(scores) == {"0.0", "2.0"} and row.selected_on_test_items == "alpha"
    best = min(scores, key=lambda a: (not np.isfinite(scores[a]), scores[a]))
    assert artifact.profile.alpha == row.align_info["alpha"] == float(best)
    assert row.align_info["alpha_selected_on"] == "test_items"
    assert len(table) == 360 and table["selected"].sum() == 180
    assert set(table.loc[table["selected"], "value"]) == {float(best)}
    assert row.score == pytest.approx(scores[best], abs=0)


#: protocol=paper as conf/protocol/paper.yaml sets PAS and the scorer.
PAPER = {
    "selection": "test_items",
    "ranking": "mean_train_val",
    "with_context": True,
    "split": "row",
    "ties": "last",
    "contrastive": "reference",
    "scoring": {"mode": "generate", "parse": "reference", "strip_period": False},
}
#: protocol=clean, with the few-shot context switched on (method.with_context=true).
CLEAN_WITH_CONTEXT = {"with_context": True}


@pytest.mark.parametrize("settings", [PAPER, CLEAN_WITH_CONTEXT], ids=["paper", "clean"])
def test_alpha_zero_with_context_answers_exactly_as_few_shot(papi, pas_factory, settings):
    """With the few-shot context, PAS at alpha = 0 is the few-shot baseline: the same system
    prompt, the same batches, a zero shift (x + 0 = x), so the same answers bit for bit (texts
    under protocol=paper, option probabilities under clean)."""
    method = pas_factory(alphas=[0], **settings)
    subject = papi.subjects[3].seen_only(papi.inventory.train)
    (artifact,) = method.align_group([subject], papi.inventory.train_items)
    (answer,) = method.answer_group([subject], [artifact], papi.inventory.test_items)
    if isinstance(answer, Candidates):
        answer = answer.answers[0]
    few_shot = FewShot()
    few_shot.setup(method.context)
    prompt = few_shot.align(subject, papi.inventory.train_items)
    assert method._system_prompt(subject, np.ones(120, bool)) == prompt.system_prompt
    baseline = few_shot.answer(subject, prompt, papi.inventory.test_items)
    assert answer.scores.tolist() == baseline.scores.tolist()
    if settings is PAPER:
        assert answer.texts == baseline.texts and all(t.startswith("Option") for t in answer.texts)
        assert answer.setting == ("alpha", 0.0)
    else:
        assert np.array_equal(answer.probs, baseline.probs)


def test_paper_contrastive_prompts_are_the_references(papi, tiny, make_scorer):
    """protocol=paper: the statement as printed (period doubled by the template) under the
    neutral system prompt, answered by the bare letter; the "A" and "E" rows differ only there."""
    scorer = make_scorer()
    items = papi.inventory.train_items[:3]
    rows = contrastive_prompts(scorer, items, shape="reference")
    for item, pos, neg in zip(items, rows[::2], rows[1::2]):
        question = f'Given a statement of you: "You {item.text}."\n'
        assert question in tiny.tokenizer.decode(pos) and item.text.endswith(".")
        expected = scorer.renderer.render(
            NEUTRAL_SYSTEM_PROMPT, reference_contrastive_question(item), "A"
        )
        assert pos == scorer.renderer.encode(expected)
        assert tiny.tokenizer.decode(pos).endswith("<|im_start|>assistant\nA")
        assert pos[:-1] == neg[:-1] and tiny.tokenizer.decode(neg[-1:]) == "E"
    clean = contrastive_prompts(scorer, items[:1])
    assert tiny.tokenizer.decode(clean[0]).endswith("assistant\nOption (A")
    with pytest.raises(PASError, match="method.contrastive='other'"):
        contrastive_prompts(scorer, items, shape="other")


def test_row_split_and_reference_tie_order(synthetic):
    """split=row draws int(0.6 n) labelled rows (an item's two rows may part); ties=last is the
    reference's order: an ascending sort of the accuracies read backwards."""
    _, _, labelled, _ = synthetic
    train = split_rows(np.repeat(np.arange(120), 2), labelled, 0.6, [1, 2, 3], by="row")
    assert (train.sum(1) == (0.6 * labelled.sum(1)).astype(int)).all()
    assert not (train & ~labelled).any()
    pairs = train.reshape(3, 120, 2) | ~labelled.reshape(3, 120, 2)
    assert (pairs[..., 0] != pairs[..., 1]).any()  # some items straddle the split
    acc = torch.tensor([[0.5, 0.75, 0.75, 0.25, 0.75, 0.5]])
    fit = ProbeFit(weight=None, bias=None, train_acc=acc, val_acc=acc)
    reference = np.argsort(acc[0].numpy(), kind="stable")[::-1][:4]
    assert rank_heads(fit, "val", 4, ties="last")[0].tolist() == reference.tolist() == [4, 2, 1, 5]
    assert rank_heads(fit, "val", 4)[0].tolist() == [1, 2, 4, 0]


def test_profile_round_trip_and_shape_check(papi, pas_factory, tmp_path):
    method = pas_factory(per_trait=True, top_k=2)
    artifact = method.align(papi.subjects[2], papi.inventory.train_items)
    artifact.save(tmp_path / "art")
    loaded = PASProfile.load(tmp_path / "art" / "profile.json")
    assert loaded.alpha == artifact.profile.alpha and loaded.model == "tiny_llama"
    assert torch.equal(loaded.shifts([1.0, 3.0]), artifact.profile.shifts([1.0, 3.0]))
    assert loaded.shifts([1.0]).shape == (5, 2, 64)  # one variant per trait
    assert set(loaded.meta) >= {"case", "top_k", "ranking", "direction_type", "versions"}
    loaded.check_fits(method.layout, "tiny_llama")
    other = load_random("tiny_other", {**TINY_LLAMA, "num_hidden_layers": 3})
    with pytest.raises(PASError, match=r"has heads \(2, 4, 16\).*this model has \(3, 4, 16\)"):
        loaded.check_fits(head_layout(other.model))
    with pytest.raises(PASError, match="missing"):
        PASProfile.load(tmp_path / "nothing")


def test_bad_pas_configs():
    with pytest.raises(PASError, match="method.selection='test'"):
        PAS(selection="test")
    with pytest.raises(PASError, match="method.folds=1"):
        PAS(folds=1)
    with pytest.raises(PASError, match="method.direction='pca'"):
        PAS(direction="pca")


@pytest.mark.parametrize("per_trait", [False, True])
def test_a_group_of_subjects_equals_one_at_a_time_in_fewer_forwards(papi, pas_factory, per_trait):
    """Three subjects aligned and answered as one group (probes in one fit, every subject x alpha
    a variant of one scorer run) give each subject what it gets alone: the same heads, alpha and
    answers (probabilities to 1e-5: other batch compositions round differently)."""
    method = pas_factory(per_trait=per_trait, top_k=2)
    subjects = papi.subjects[3:6]
    train, test = papi.inventory.train_items, papi.inventory.test_items
    meter = method.context.scorer.loaded.meter
    before = meter.snapshot()
    alone = [method.align(s, train) for s in subjects]
    alone_answers = [method.answer(s, a, test) for s, a in zip(subjects, alone)]
    alone_cost = meter.snapshot() - before
    before = meter.snapshot()
    group = method.align_group(subjects, train)
    group_answers = method.answer_group(subjects, group, test)
    group_cost = meter.snapshot() - before
    for a, g, aa, ga in zip(alone, group, alone_answers, group_answers):
        assert torch.equal(a.profile.layer, g.profile.layer)
        assert torch.equal(a.profile.head, g.profile.head)
        assert a.profile.alpha == g.profile.alpha
        torch.testing.assert_close(a.profile.direction, g.profile.direction, rtol=0, atol=1e-5)
        np.testing.assert_allclose(aa.probs, ga.probs, rtol=0, atol=1e-5)
    # Same rows scored, in a third of the runs: fewer, fuller forwards.
    assert group_cost.forward_calls < alone_cost.forward_calls
    assert group_cost.generated_tokens == alone_cost.generated_tokens == 0


def test_bad_subject_batch_is_refused():
    with pytest.raises(PASError, match="method.subject_batch=0: must be an integer >= 1"):
        PAS(subject_batch=0)
