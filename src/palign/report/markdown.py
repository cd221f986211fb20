"""The markdown report of a run (``report.md``) from its summary."""

from __future__ import annotations

import numpy as np

from palign.constants import TRAITS
from palign.eval.records import Aggregate, Summary


def fmt(x: float | None, digits: int = 3) -> str:
    """``x`` with ``digits`` decimals; ``n/a`` for None or a non-finite number."""
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def _row(name: str, entry: Aggregate) -> str:
    timing = entry.timing or {}
    cells = [
        name,
        str(entry.n_subjects),
        *(fmt(entry.mae[t]) for t in TRAITS),
        f"**{fmt(entry.score)}**",
        f"{100 * entry.unk_rate:.1f}%",
        fmt(timing.get("align_s_per_subject", float("nan")), 2),
        fmt(timing.get("eval_s_per_subject", float("nan")), 2),
    ]
    return "| " + " | ".join(cells) + " |"


def _count(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:,.1f}"


def cost_table(summary: Summary) -> str:
    """Counted model work of each method that used the model: per subject (aligning, answering)
    and once per run (set-up, e.g. PAS's shared activations); empty without a model."""
    lines = []
    for name, entry in summary.methods().items():
        cost = entry.cost
        if not cost:
            continue
        per = cost.get("per_subject", {})
        setup = cost.get("setup") or {}
        cells = [name]
        for phase in ("align", "answer", "total"):
            c = per.get(phase, {})
            cells += [_count(c.get("forward_calls", 0)), _count(c.get("tokens_forwarded", 0))]
        cells += [
            _count(per.get("total", {}).get("generated_tokens", 0)),
            f"{_count(setup.get('forward_calls', 0))} / {_count(setup.get('tokens_forwarded', 0))}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if not lines:
        return ""
    cols = [
        "method",
        "align forwards",
        "align tokens",
        "answer forwards",
        "answer tokens",
        "forwards",
        "tokens",
        "generated",
        "set-up forwards / tokens",
    ]
    return (
        "\nModel work per subject, counted (forward calls; tokens forwarded, padding included, "
        "KV-cached prefixes not again; tokens generated), and once per run for set-up:\n\n"
        + "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols), *lines])
        + "\n"
    )


def report_markdown(summary: Summary) -> str:
    """The run's table: the method beside the statistical baselines on the same subjects."""
    protocol = summary.protocol
    head = (
        f"# palign report: {summary.method} on {summary.model}\n\n"
        f"Protocol **{protocol.name}** (coding `{protocol.coding}`, scoring "
        f"`{protocol.scoring}`). Per-trait mean absolute error on the 1..5 scale over the "
        f"{summary.n_test_items} test items, mean over subjects; Score = sum of the five "
        "(lower is better). UNK = answers that could not be parsed (left out of the MAE).\n\n"
    )
    cols = ["method", "subjects", *TRAITS, "Score", "UNK", "align s/subj", "eval s/subj"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += [_row(name, entry) for name, entry in summary.methods().items()]
    for name, entry in summary.baselines.items():
        if name != summary.method:
            lines.append(_row(f"{name} (no LLM)", entry))
    text = head + "\n".join(lines) + "\n"
    text += cost_table(summary)
    if summary.notes:
        text += "\n" + "\n".join(f"- {note}" for note in summary.notes) + "\n"
    population = summary.baselines_all_subjects
    if population and next(iter(population.values())).n_subjects != summary.main.n_subjects:
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += [_row(f"{name} (no LLM)", entry) for name, entry in population.items()]
        text += "\nStatistical baselines on all loaded subjects:\n\n" + "\n".join(lines) + "\n"
    return text
