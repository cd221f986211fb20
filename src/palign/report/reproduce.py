"""The paper's Table 1 beside palign's numbers, from finished runs (one per protocol).

``palign reproduce --out DIR RUN_DIR [RUN_DIR ...]`` reads each run dir
(``summary.json``; every method's and baseline's answers, ``answers/<method>/<case>.csv``, from
which every number is computed and checked against ``summary.json`` to the last digit; the
methods' per-subject settings in ``results.jsonl`` and ``compare/<method>.jsonl``; PAS's
``artifacts/**/head_accuracy.npy``) and writes into DIR:

- ``table.md``: per run, what was run and a table of every LLM method and statistical baseline
  (per-trait MAE, Score, UNK), with the paper's published numbers where the run's model is one of
  the paper's; then the paper's Table 1 as published (:mod:`palign.report.published`).
- ``table.csv``: the same numbers at full precision, one row per run and method.
- ``table.html``: table.md and every plot on one self-contained page.
- ``plots/trait_errors_<protocol>.png``: per-trait MAE per method, error bars = standard error
  over subjects; ``plots/pas_alpha_<protocol>.png``: PAS Score against alpha per subject and
  their mean; ``plots/head_accuracy_<protocol>.png``: mean probe validation accuracy per head;
  ``plots/confusion_<method>_<protocol>.png``: predicted against target answer counts per trait
  (matplotlib figures rendered by Agg, without pyplot).
"""

from __future__ import annotations

import argparse
import csv
from collections.abc import Sequence
from pathlib import Path

from palign.constants import TRAITS
from palign.errors import cli
from palign.eval.records import Aggregate
from palign.report.html import write_page
from palign.report.markdown import comparisons, fmt, interval, stat
from palign.report.plots import plot_run
from palign.report.published import PAPER_METHOD, PAPER_MODEL, TABLE1, UNPUBLISHED
from palign.report.results import ReproduceError, Run, load_run

#: Paper's training steps per subject for DPO and PPO (250), shown beside palign's.
PAPER_STEPS = 250


# --- numbers ---------------------------------------------------------------------------------


# --- table.md --------------------------------------------------------------------------------


def _section(run: Run) -> str:
    s, p = run.summary, run.summary.protocol
    lines = [
        f"## protocol={run.protocol}: {s.method} and the other methods on {s.model}",
        "",
        f"- Run dir: `{run.path}`",
    ]
    if run.paper_model:
        lines.append(
            f"- Model: `{s.model}` = the paper's {run.paper_model}. Cells marked *paper* and "
            "the *paper Score* column are the paper's published Table 1 (its own protocol), "
            "not palign's."
        )
    else:
        lines.append(
            f"- Model: `{s.model}`. **The paper has no numbers for this model**; its "
            "Llama-3-8B-Instruct numbers are listed below for reference (see *The paper's "
            "Table 1*)."
        )
    lines += [
        f"- Protocol: `{p.name}` (coding `{p.coding}`, scoring `{p.scoring}`), "
        f"{s.n_test_items} test items per subject.",
        f"- Subjects ({len(s.cases)}): {', '.join(map(str, s.cases))}.",
    ]
    steps = [f"{m.name} {m.steps}" for m in run.methods if m.steps is not None]
    if steps:
        lines.append(
            f"- Training steps per subject: {', '.join(steps)} (the paper: {PAPER_STEPS})."
        )
    pas = run.method("pas")
    if pas is not None:
        where = sorted({r.align_info["alpha_selected_on"] for r in pas.rows})
        chosen = ", ".join(f"{r.align_info['alpha']:g}" for r in pas.rows)
        lines.append(
            f"- PAS alpha selected on: {' / '.join(where).replace('_', ' ')}; chosen per subject: "
            f"{chosen}."
        )
    lines += [f"- Note (summary.json): {note}" for note in s.notes]
    cols = ["method", "subjects", *TRAITS, "Score", "Score 95 % CI", "item r", "UNK"]
    if run.paper_model:
        cols.append("paper Score")
    table = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for m in run.methods:
        paper = run.published(m)
        traits = [fmt(m.entry.mae[t]) for t in TRAITS]
        if paper is not None and paper.mae is not None:
            traits = [f"{c} (*paper* {paper.mae[t]:.2f})" for c, t in zip(traits, TRAITS)]
        cells = [
            m.label,
            str(m.entry.n_subjects),
            *traits,
            f"**{fmt(m.entry.score)}**",
            interval(m.entry.ci["score"] if m.entry.ci else None, 3),
            stat(m.entry.validity.item["item_r"]) if m.entry.validity else "n/a",
            f"{100 * m.entry.unk_rate:.1f}%",
        ]
        if run.paper_model:
            if paper is not None:
                cells.append(f"{paper.score:.2f} (no interval given)")
            else:
                cells.append("not published" if PAPER_METHOD.get(m.name) in UNPUBLISHED else "")
        table.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + "\n".join(table) + "\n" + comparisons(run.summary)


def _published_section() -> str:
    cols = ["paper model", "paper method", *TRAITS, "Score", "palign method"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for model, methods in TABLE1.items():
        for method, numbers in methods.items():
            traits = [f"{numbers.mae[t]:.2f}" if numbers.mae else "" for t in TRAITS]
            ours = [k for k, v in PAPER_METHOD.items() if v == method]
            cells = [model, method, *traits, f"{numbers.score:.2f}", ", ".join(ours)]
            lines.append("| " + " | ".join(cells) + " |")
    models = ", ".join(f"`{k}` = {v}" for k, v in PAPER_MODEL.items())
    return (
        "## The paper's Table 1 (published numbers, not palign's)\n\n"
        "Per-trait MAE and Score as printed in the paper, under its own protocol (which "
        "`protocol=paper` follows); per-trait values are given only where listed. palign's "
        f"model configs for the paper's models: {models}. The table also has "
        f"{' and '.join(UNPUBLISHED)} (palign's `psoups`, `prompt_morl`), whose numbers are not "
        "given in the sources palign draws on: their paper cells say *not published*.\n\n"
        + "\n".join(lines)
        + "\n"
    )


def table_markdown(runs: Sequence[Run]) -> str:
    """``table.md``: one section per run, then the paper's published numbers."""
    head = (
        "# Table 1 of *Personality Alignment of Large Language Models* (ICLR 2025) with palign\n\n"
        "Per-trait mean absolute error on the 1..5 scale over the test items, mean over "
        "subjects; Score = sum of the five (lower is better); UNK = share of answers that "
        "could not be parsed (left out of the MAE; n/a = no parsed answer). Unmarked numbers "
        "are palign's, from the run dirs named; numbers marked *paper* are the paper's.\n\n"
        "**PAS alpha:** `protocol=paper` selects PAS's alpha ON THE TEST ITEMS, as the paper's "
        "reference code does (optimistic); `protocol=clean` selects it by k-fold on each "
        "subject's own 120 alignment items and never reads the test items.\n"
    )
    return "\n".join([head, *map(_section, runs), _published_section()])


# --- table.csv -------------------------------------------------------------------------------

CSV_COLUMNS = (
    ["protocol", "coding", "scoring", "model", "method", "uses_llm", "steps", "n_subjects"]
    + [f"mae_{t}" for t in TRAITS]
    + ["score", "score_ci_lo", "score_ci_hi", "item_r", "unk_rate", "paper_model", "paper_method"]
    + [f"paper_mae_{t}" for t in TRAITS]
    + ["paper_score", "run_dir"]
)


def write_csv(runs: Sequence[Run], path: Path) -> None:
    """``table.csv``: one row per run and method, floats at full precision (NaN as ``nan``);
    the paper's numbers in the ``paper_*`` columns where known, else empty."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, CSV_COLUMNS)
        writer.writeheader()
        for run in runs:
            p = run.summary.protocol
            for m in run.methods:
                paper = run.published(m)
                row = {
                    "protocol": p.name,
                    "coding": p.coding,
                    "scoring": p.scoring,
                    "model": run.summary.model,
                    "method": m.name,
                    "uses_llm": m.uses_llm,
                    "steps": m.steps if m.steps is not None else "",
                    "n_subjects": m.entry.n_subjects,
                    **{f"mae_{t}": m.entry.mae[t] for t in TRAITS},
                    "score": m.entry.score,
                    **_csv_validity(m.entry),
                    "unk_rate": m.entry.unk_rate,
                    "run_dir": str(run.path),
                }
                if paper is not None:
                    row["paper_model"] = run.paper_model
                    row["paper_method"] = PAPER_METHOD[m.name]
                    row["paper_score"] = paper.score
                    for t in TRAITS:
                        row[f"paper_mae_{t}"] = paper.mae[t] if paper.mae else ""
                writer.writerow(row)


def _csv_validity(entry: Aggregate) -> dict[str, float | str]:
    """The Score's interval and the mean item r of ``entry`` for table.csv (empty where there is
    none: fewer than 2 subjects, undefined, or a summary from before intervals)."""
    lo, hi = entry.ci["score"] if entry.ci and entry.ci["score"] else ("", "")
    r = entry.validity.item["item_r"].value if entry.validity else None
    return {"score_ci_lo": lo, "score_ci_hi": hi, "item_r": "" if r is None else r}


def reproduce(run_dirs: Sequence[Path], out: Path) -> list[Path]:
    """Read the run dirs (one per protocol), write ``table.md``, ``table.csv`` and the plots into
    ``out``; returns the paths written."""
    runs = [load_run(Path(d)) for d in run_dirs]
    protocols = [r.protocol for r in runs]
    for protocol in set(protocols):
        same = [str(r.path) for r in runs if r.protocol == protocol]
        if len(same) > 1:
            raise ReproduceError(
                f"{' and '.join(same)} are both protocol={protocol}: pass one each"
            )
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    written = [out / "table.md", out / "table.csv"]
    text = table_markdown(runs)
    (out / "table.md").write_text(text)
    write_csv(runs, out / "table.csv")
    figures = []
    for run in runs:
        figures += plot_run(run, plots, suffix=f"_{run.protocol}")
    title = "palign: Table 1 of Personality Alignment of Large Language Models"
    return [*written, *figures, write_page(out / "table.html", text, figures, title)]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m palign.report.reproduce",
        description="The paper's Table 1 beside palign's numbers from finished runs "
        "(one run dir per protocol): table.md, table.csv and plots/ in --out.",
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for the outputs")
    parser.add_argument("run_dirs", type=Path, nargs="+", help="run dirs of `python -m palign`")
    args = parser.parse_args(argv)
    with cli("palign reproduce"):
        written = reproduce(args.run_dirs, args.out)
    print(f"Wrote {len(written)} files to {args.out}:")
    print("\n".join(f"  {p}" for p in written))


if __name__ == "__main__":
    main()
