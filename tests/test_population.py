"""Population methods (Personalized Soups, Prompt-MORL): the soup's merge against the experts'
deltas layer by layer and in the model's output, the weights at the ends of the scale, the
population's rows against the split (no test answer), training once (a second run loads the cache
and forwards nothing to set up), and both methods end to end on tiny_llama."""

from __future__ import annotations

import csv
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import TINY_LLAMA, twice_with_a_fresh_cache
from palign.data.papi import Subject
from palign.errors import ConfigError
from palign.methods.population import (
    check_store,
    expert_names,
    extreme_answers,
    population_rows,
    soup_weights,
    trait_levels,
)
from palign.methods.psoups import SOUP, soup_applied
from palign.models import load_random
from palign.rundir import RunDir

METHODS = ("psoups_smoke", "prompt_morl_smoke")


def _lora_layers(peft_model) -> dict[str, torch.nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


def test_a_soup_is_the_weighted_sum_of_its_experts_deltas_in_every_layer():
    """ΔW of the merged adapter equals Σ w_i ΔW_i in every LoRA layer (within float32
    rounding), and the model's logits under the soup equal those of the base model with
    Σ w_i ΔW_i added to its weights by hand; on exit the soup is gone."""
    from peft import LoraConfig, get_peft_model

    loaded = load_random("tiny_soup", TINY_LLAMA, seed=0)
    lora = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    peft_model = get_peft_model(loaded.model, LoraConfig(task_type="CAUSAL_LM", **lora))
    torch.manual_seed(1)
    for name in expert_names():  # random A and B: every expert changes the model
        config = LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **lora)
        peft_model.add_adapter(name, config)
    weights = soup_weights([1.0, 2.5, 3.0, 4.2, 5.0], "trait")
    layers = _lora_layers(peft_model)
    expected = {
        n: sum(w * m.get_delta_weight(e) for e, w in weights.items()) for n, m in layers.items()
    }
    assert min(float(d.abs().max()) for d in expected.values()) > 1e-3
    ids = torch.tensor([[1, 200, 3000, 45, 7]])
    peft_model.eval()
    with soup_applied(peft_model, weights):
        for n, m in layers.items():
            assert m.active_adapters == [SOUP] and m.r[SOUP] == 4 * 10
            torch.testing.assert_close(m.get_delta_weight(SOUP), expected[n], rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            soup_logits = peft_model(input_ids=ids).logits
    assert SOUP not in peft_model.peft_config
    by_hand = load_random("tiny_soup", TINY_LLAMA, seed=0).model
    modules = dict(by_hand.named_modules())
    with torch.no_grad():
        for n, delta in expected.items():
            modules[n.removeprefix("base_model.model.")].weight += delta
        hand_logits = by_hand(input_ids=ids).logits
    torch.testing.assert_close(soup_logits, hand_logits, rtol=1e-4, atol=1e-4)


def test_a_subject_at_the_top_of_every_trait_weighs_only_the_high_experts(papi):
    """Keyed 5 everywhere (5 to each positively keyed item, 1 to each negatively keyed one):
    levels 5, weight 1 on every high expert and 0 on every low one (each pair summing to 1), or
    1/5 each when all ten sum to 1; the midpoint splits each pair in halves."""
    train = papi.inventory.train_items
    raw = np.zeros(300, dtype=np.int64)
    raw[[it.number - 1 for it in train]] = extreme_answers(train, high=True)
    top = Subject(case=1, index=0, raw=raw)
    assert trait_levels(top, train).tolist() == [5.0] * 5
    by_trait = soup_weights(trait_levels(top, train), "trait")
    assert by_trait == {n: (1.0 if n.endswith("+") else 0.0) for n in expert_names()}
    averaged = soup_weights(trait_levels(top, train), "all")
    assert averaged == pytest.approx({n: (0.2 if n.endswith("+") else 0.0) for n in by_trait})
    assert sum(averaged.values()) == pytest.approx(1.0)
    assert soup_weights([3.0] * 5, "trait") == {n: 0.5 for n in by_trait}


def test_the_population_is_every_subjects_alignment_answers_and_no_test_answer(papi):
    rows = population_rows(papi)
    train, test = set(papi.inventory.train), set(papi.inventory.test)
    assert {r.item for r in rows} == train and not {r.item for r in rows} & test
    answered = sum(int((s.raw[np.array(sorted(train)) - 1] != 0).sum()) for s in papi.subjects)
    assert len(rows) == answered  # every answered alignment item, missing ones left out
    by_case = {s.case: s for s in papi.subjects}
    assert all(by_case[r.case].raw[r.item - 1] == r.answer for r in rows)
    sample = population_rows(papi, size=7, seed=3)
    assert len({r.case for r in sample}) == 7
    assert sample == population_rows(papi, size=7, seed=3)  # seeded


def test_a_population_without_rows_is_one_error(papi):
    empty = replace(papi, subjects=[replace(s, raw=np.zeros_like(s.raw)) for s in papi.subjects])
    with pytest.raises(ConfigError, match="the population has no training rows"):
        population_rows(empty)


@pytest.fixture(scope="module")
def population_runs(tmp_path_factory):
    """psoups_smoke with prompt_morl_smoke compared, on 2 subjects, twice: into ``first`` with
    an empty cache, then into ``second`` (another run dir, same settings)."""
    overrides = ["model=tiny_llama", "hardware=cpu", "dataset.limit=2", "method=psoups_smoke"]
    return twice_with_a_fresh_cache(
        tmp_path_factory.mktemp("population"), [*overrides, "compare=[prompt_morl_smoke]"]
    )


def _training_rows(run_dir: RunDir, method: str) -> list[dict]:
    with open(run_dir.population(method) / "training_rows.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_the_training_rows_written_hold_no_test_item_and_match_the_data(population_runs, papi):
    """prompt_morl trained on PAPI subjects' alignment answers exactly as the data holds them;
    psoups on each trait's alignment items with its extreme answers, no person's."""
    _, rd = population_runs["first"]
    train, test = set(papi.inventory.train), set(papi.inventory.test)
    by_case = {s.case: s for s in papi.subjects}
    morl = _training_rows(rd, "prompt_morl_smoke")
    assert {r["source"] for r in morl} == {"papi:alignment"}
    assert len({r["case"] for r in morl}) == 4  # population_size of prompt_morl_smoke
    for r in morl:
        item = int(r["item"])
        assert item in train and item not in test
        assert by_case[int(r["case"])].raw[item - 1] == int(r["answer"])
    soups = _training_rows(rd, "psoups_smoke")
    assert {r["case"] for r in soups} == {""}
    items = papi.inventory.items
    for r in soups:
        item = items[int(r["item"])]
        assert item.number in train and r["source"] == f"expert {item.trait}{r['source'][-1]}"
        high = r["source"].endswith("+")
        assert int(r["answer"]) == extreme_answers([item], high)[0]
    assert len(soups) == 2 * len(train)  # each item once high, once low


def test_each_subject_gets_its_soup_and_its_prompt(population_runs, papi):
    summary, rd = population_runs["first"]
    pop = json.loads((rd.population("psoups_smoke") / "population.json").read_text())
    for row in rd.read_rows("psoups_smoke", METHODS[0]):
        info = row.align_info
        assert sum(info["weights"].values()) == pytest.approx(1.0)
        assert info["population"] == pop["id"] and info["merge"].startswith("cat")
        subject = next(s for s in papi.subjects if s.case == row.case)
        levels = trait_levels(subject, papi.inventory.train_items)
        assert info["weights"] == pytest.approx(soup_weights(levels, "all"))
    for case in summary.cases:
        prompt = (rd.artifacts("prompt_morl_smoke") / str(case) / "system_prompt.txt").read_text()
        assert "Agreeableness" in prompt and "of 5" in prompt
    for name in expert_names():
        expert = rd.population("psoups_smoke") / "experts" / name
        assert (expert / "adapter_model.safetensors").is_file()
        assert len(json.loads((expert / "train_history.json").read_text())) == 2  # steps


def test_a_second_run_with_the_same_settings_trains_nothing(population_runs):
    """The second run finds both populations in the cache: no set-up forward, the same
    population id, the same answers for the same subject."""
    first, rd1 = population_runs["first"]
    second, rd2 = population_runs["second"]
    assert first.main.cost["setup"]["forward_calls"] > 0
    assert second.main.cost["setup"]["forward_calls"] == 0
    assert second.compare["prompt_morl_smoke"].cost["setup"]["forward_calls"] == 0
    for method in METHODS:
        ids = [
            json.loads((rd.population(method) / "population.json").read_text())["id"]
            for rd in (rd1, rd2)
        ]
        assert ids[0] == ids[1]
        scores = [[r.score for r in rd.read_rows(method, METHODS[0])] for rd in (rd1, rd2)]
        assert scores[0] == pytest.approx(scores[1])


def test_experts_from_another_model_are_refused_before_any_training(population_runs):
    _, rd = population_runs["first"]
    folder = rd.population("psoups_smoke")
    assert check_store(folder, "tiny_llama")["model"]["name"] == "tiny_llama"
    with pytest.raises(ConfigError, match="trained on model 'tiny_llama', not 'llama3_8b'"):
        check_store(folder, "llama3_8b")
    with pytest.raises(ConfigError, match="no population.json there"):
        check_store(folder.parent, "tiny_llama")


def test_the_population_training_curves_reach_the_logger_on_their_own_axes(population_runs):
    """Each expert's PPO curve and the shared adapter's loss go to the run's CSV log, each part
    counting its own steps (``<method>/population/<part>/step``)."""
    _, rd = population_runs["first"]
    (log,) = rd.path.glob("csv/**/metrics.csv")
    with open(log, newline="") as f:
        rows = list(csv.DictReader(f))
    for name in expert_names():
        step = f"psoups_smoke/population/{name}/step"
        steps = [int(float(r[step])) for r in rows if r.get(step)]
        rewards = [r[f"psoups_smoke/population/{name}/reward"] for r in rows if r.get(step)]
        assert steps == [1, 2] and all(rewards)
    step = "prompt_morl_smoke/population/adapter/step"
    assert [int(float(r[step])) for r in rows if r.get(step)] == [1, 2]
