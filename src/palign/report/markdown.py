"""The markdown report of a run (``report.md``) from its summary."""

from __future__ import annotations

import numpy as np

from palign.constants import TRAITS
from palign.eval.records import DETECTABLE_DIFFERENCE, ITEM_VALIDITY, Aggregate, Summary
from palign.eval.stats import Stat, describe_difference


def fmt(x: float | None, digits: int = 3) -> str:
    """``x`` with ``digits`` decimals; ``n/a`` for None or a non-finite number."""
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def interval(ci: tuple[float, float] | None, digits: int = 2) -> str:
    """``[lo, hi]``, or ``n/a`` where there is no interval (fewer than 2 subjects)."""
    return "n/a" if ci is None else f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def stat(s: Stat, ci: tuple[float, float] | None = None) -> str:
    """A statistic with its interval; ``undefined`` when it is (the reason is listed apart)."""
    if s.value is None:
        return "undefined"
    return f"{s.value:.2f}" + (f" {interval(ci)}" if ci is not None else "")


def _row(name: str, entry: Aggregate) -> str:
    timing = entry.timing or {}
    cells = [
        name,
        str(entry.n_subjects),
        *(fmt(entry.mae[t]) for t in TRAITS),
        f"**{fmt(entry.score)}**",
        interval(entry.ci["score"] if entry.ci else None, 3),
        f"{100 * entry.unk_rate:.1f}%",
        fmt(timing.get("align_s_per_subject", float("nan")), 2),
        fmt(timing.get("eval_s_per_subject", float("nan")), 2),
    ]
    return "| " + " | ".join(cells) + " |"


def _count(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:,.1f}"


def cost_table(summary: Summary) -> str:
    """Counted model work of each method that used the model: per subject (aligning, answering)
    and once per run (set-up, e.g. PAS's shared activations); for a model served over an API,
    its requests, tokens and USD (:func:`api_cost_table`); empty without a model."""
    lines = []
    hosted = {}
    for name, entry in summary.methods().items():
        cost = entry.cost
        if not cost:
            continue
        if "requests" in cost.get("per_subject", {}).get("total", {}):
            hosted[name] = cost["per_subject"]["total"]
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
        return api_cost_table(hosted)
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


def api_cost_table(totals: dict[str, dict[str, float]]) -> str:
    """Per method, what a model served over an API cost per subject (the mean over subjects):
    requests sent, replies from the cache, retries, tokens in and out (the server's usage),
    USD at the configured prices, and the replies kept as unparseable."""
    if not totals:
        return ""
    cols = ["method", "requests", "from cache", "retries", "input tokens", "output tokens",
            "USD", "malformed", "cut short"]  # fmt: skip
    lines = [
        "| "
        + " | ".join(
            [
                name,
                *(_count(c.get(k, 0)) for k in ("requests", "cached", "retries")),
                *(_count(c.get(k, 0)) for k in ("input_tokens", "output_tokens")),
                f"{c.get('cost_usd', 0):.4f}",
                *(_count(c.get(k, 0)) for k in ("malformed", "cut_short")),
            ]
        )
        + " |"
        for name, c in totals.items()
    ]
    return (
        "\nAPI requests per subject, counted (requests sent; replies read from the response "
        "cache; the client's retries; input and output tokens as the server reported them; USD "
        "at model.price_*_per_mtok; replies kept as unparseable):\n\n"
        + "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols), *lines])
        + "\n"
    )


def validity_table(entries: dict[str, Aggregate]) -> str:
    """Per method: the subjects' mean item-level validity metrics and the trait correlations
    across subjects, each with its 95 % interval; why any is undefined, below the table."""
    cols = ["method", "item r", "Spearman", "exact", "within 1", "profile r"]
    cols += [f"trait r {t}" for t in TRAITS]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    reasons = []
    for name, entry in entries.items():
        v = entry.validity
        if v is None:
            continue
        cells = [name, *(stat(v.item[k], v.ci[k]) for k in ITEM_VALIDITY)]
        cells += [stat(v.trait_r[t], v.ci[f"trait_r.{t}"]) for t in TRAITS]
        lines.append("| " + " | ".join(cells) + " |")
        undefined = {
            **{k: s.reason for k, s in v.item.items() if s.value is None},
            **{f"trait r {t}": s.reason for t, s in v.trait_r.items() if s.value is None},
        }
        partly = [f"{k} on {n} of {entry.n_subjects}" for k, n in v.n.items()]
        partly = [p for p, n in zip(partly, v.n.values()) if 0 < n < entry.n_subjects]
        if undefined:
            by_reason: dict[str, list[str]] = {}
            for k, r in undefined.items():
                by_reason.setdefault(r, []).append(k)
            why = "; ".join(f"{', '.join(ks)} undefined: {r}" for r, ks in by_reason.items())
            reasons.append(f"- {name}: {why}.")
        if partly:
            reasons.append(f"- {name}: defined for {', '.join(partly)} subjects (mean of those).")
    if len(lines) == 2:
        return ""
    return (
        "\nValidity: does the answer pattern follow the person? Item r, Spearman, exact and "
        "within-1 agreement between the predicted and the subject's answers over the test "
        "items (UNK and missing answers left out, as for the MAE), and the profile r across "
        "the five trait means: per subject, mean over subjects. Trait r: across subjects, the "
        "model's against the subject's keyed trait mean. 95 % bootstrap intervals over "
        "subjects in brackets.\n\n"
        + "\n".join(lines)
        + "\n"
        + ("\n" + "\n".join(reasons) + "\n" if reasons else "")
    )


def comparisons(summary: Summary) -> str:
    """The main method against each compared method and baseline, in words, with the subjects
    a difference of 0.1 needs."""
    if not summary.tests:
        return ""
    lines = []
    for test in summary.tests:
        if test.diff == 0 and test.p_wilcoxon is None and test.n > 1:  # identical Scores
            lines.append(f"- {test.a} scores as {test.b} on each of the {test.n} subjects.")
            continue
        needed = summary.subjects_needed.get(test.b)
        more = (
            f"; {needed} subjects would detect a difference of {DETECTABLE_DIFFERENCE} at 80 % "
            "power"
            if needed is not None
            else ""
        )
        lines.append(f"- {describe_difference(test)}{more}.")
    return (
        "\nPaired comparisons of the per-subject Scores (mean difference, 95 % bootstrap "
        "interval, Wilcoxon signed-rank p):\n\n" + "\n".join(lines) + "\n"
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
    cols = ["method", "subjects", *TRAITS, "Score", "Score 95 % CI", "UNK", "align s/subj",
            "eval s/subj"]  # fmt: skip
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += [_row(name, entry) for name, entry in summary.methods().items()]
    for name, entry in summary.baselines.items():
        if name != summary.method:
            lines.append(_row(f"{name} (no LLM)", entry))
    text = head + "\n".join(lines) + "\n"
    baselines = {f"{n} (no LLM)": e for n, e in summary.baselines.items() if n != summary.method}
    text += validity_table({**summary.methods(), **baselines})
    text += comparisons(summary)
    text += cost_table(summary)
    if summary.notes:
        text += "\n" + "\n".join(f"- {note}" for note in summary.notes) + "\n"
    population = summary.baselines_all_subjects
    if population and next(iter(population.values())).n_subjects != summary.main.n_subjects:
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += [_row(f"{name} (no LLM)", entry) for name, entry in population.items()]
        text += "\nStatistical baselines on all loaded subjects:\n\n" + "\n".join(lines) + "\n"
    return text
