"""The published numbers: Table 1 of *Personality Alignment of Large Language Models* (ICLR 2025).

Per-trait mean absolute error on the 1..5 scale and Score (their sum; lower is better), measured
under the paper's own protocol (palign's ``protocol=paper`` follows its reference code). Only the
numbers below are used; per-trait values the paper does not give here are None.
"""

from __future__ import annotations

from dataclasses import dataclass

from palign.constants import TRAITS


@dataclass(frozen=True)
class Published:
    """One cell group of the paper's Table 1: ``score`` and, where given, ``mae`` per trait."""

    score: float
    mae: dict[str, float] | None = None


#: Paper model -> paper method -> its published numbers.
TABLE1: dict[str, dict[str, Published]] = {
    "Llama-3-8B-Instruct": {
        "PAS": Published(4.41, dict(zip(TRAITS, (0.94, 0.91, 0.86, 0.98, 0.72)))),
        "Few-Shot": Published(5.96),
        "DPO": Published(7.45),
        "PPO": Published(7.62),
    },
    "Llama-3-70B-Instruct": {
        "PAS": Published(4.74),
        "Few-Shot": Published(5.21),
    },
    "GPT-4o": {"Prompting": Published(4.42)},
}

#: palign method name (``summary.json`` / ``conf/method``) -> the paper's method name.
PAPER_METHOD: dict[str, str] = {
    "pas": "PAS",
    "few_shot": "Few-Shot",
    "dpo": "DPO",
    "dpo_cpu": "DPO",
    "dpo_smoke": "DPO",
    "ppo": "PPO",
    "ppo_cpu": "PPO",
    "ppo_smoke": "PPO",
    "psoups": "Personalized-Soups",
    "psoups_cpu": "Personalized-Soups",
    "psoups_smoke": "Personalized-Soups",
    "prompt_morl": "Prompt-MORL",
    "prompt_morl_cpu": "Prompt-MORL",
    "prompt_morl_smoke": "Prompt-MORL",
}

#: Methods of the paper's Table 1 whose numbers palign's sources do not give: their paper cells
#: say "not published".
UNPUBLISHED = ("Personalized-Soups", "Prompt-MORL")

#: palign model config name -> the paper's model.
PAPER_MODEL: dict[str, str] = {
    "llama3_8b": "Llama-3-8B-Instruct",
    "llama3_70b_4bit": "Llama-3-70B-Instruct",
}


def published(model: str, method: str) -> Published | None:
    """The paper's numbers for palign's ``model`` and ``method`` names, or None if it has none."""
    paper_model = PAPER_MODEL.get(model)
    paper_method = PAPER_METHOD.get(method)
    if paper_model is None or paper_method is None:
        return None
    return TABLE1[paper_model].get(paper_method)
