"""The paper's Table 1 beside palign's numbers, from finished runs (one per protocol).

``python -m palign.reproduce --out DIR RUN_DIR [RUN_DIR ...]`` reads each run dir
(``summary.json``; every method's and baseline's answers, ``answers/<method>/<case>.csv``, from
which every number is computed and checked against ``summary.json`` to the last digit; the
methods' per-subject settings in ``results.jsonl`` and ``compare/<method>.jsonl``; PAS's
``artifacts/**/head_accuracy.npy``) and writes into DIR:

- ``table.md``: per run, what was run and a table of every LLM method and statistical baseline
  (per-trait MAE, Score, UNK), with the paper's published numbers where the run's model is one of
  the paper's; then the paper's Table 1 as published (:mod:`palign.published`).
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
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from palign.constants import TRAITS
from palign.errors import RunDirError, cli
from palign.eval.answers import read_answers, read_table, table_metrics
from palign.html import write_page
from palign.published import PAPER_METHOD, PAPER_MODEL, TABLE1, Published, published
from palign.report import aggregate, fmt
from palign.rundir import RunDir

#: Paper's training steps per subject for DPO and PPO (250), shown beside palign's.
PAPER_STEPS = 250
ALPHA_KEYS = {
    "alpha_scores": "Score on the subject's own 120 alignment items (k-fold, held-out)",
    "alpha_scores_on_test_items": "Score on the 180 test items",
}


class ReproduceError(RunDirError):
    """A run dir that cannot be read; the message names the file."""


@dataclass
class MethodResult:
    """One method of a run: its aggregate from ``summary.json`` (``n_subjects``, ``mae`` per
    trait, ``score``, ``unk_rate``) and its per-subject rows."""

    name: str
    uses_llm: bool
    entry: dict
    rows: list[dict]

    @property
    def steps(self) -> int | None:
        """Training steps per subject recorded by DPO/PPO (``align_info.steps``), else None."""
        steps = {r["align_info"]["steps"] for r in self.rows if "steps" in r.get("align_info", {})}
        return steps.pop() if len(steps) == 1 else None

    @property
    def label(self) -> str:
        if not self.uses_llm:
            return f"{self.name} (no LLM)"
        return f"{self.name} ({self.steps} steps)" if self.steps is not None else self.name


@dataclass
class Run:
    """A finished run dir: its ``summary.json`` and every method's results."""

    path: Path
    summary: dict
    methods: list[MethodResult]

    @property
    def protocol(self) -> str:
        return self.summary["protocol"]["name"]

    @property
    def paper_model(self) -> str | None:
        return PAPER_MODEL.get(self.summary["model"])

    def method(self, name: str) -> MethodResult | None:
        return next((m for m in self.methods if m.name == name and m.uses_llm), None)

    @classmethod
    def of(
        cls,
        path: Path,
        summary: dict,
        rows: dict[str, list[dict]],
        baselines: dict[str, list[dict]],
    ) -> Run:
        """A run from its summary and per-subject rows: ``rows`` of the main and compared
        methods by name, ``baselines`` the statistical baselines' rows."""
        llm = summary["model"] != "none (no LLM)"
        names = [summary["method"], *summary.get("compare", {})]
        entries = [summary, *summary.get("compare", {}).values()]
        methods = [MethodResult(n, llm, e, rows[n]) for n, e in zip(names, entries)]
        methods += [
            MethodResult(name, False, entry, baselines[name])
            for name, entry in summary["baselines"].items()
            if name != summary["method"]
        ]
        return cls(path, summary, methods)


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def _differences(entry: dict, again: dict) -> list[str]:
    """The aggregate fields (``n_subjects``, per-trait MAE, Score, UNK rate) where ``again``
    differs from ``entry`` in any digit."""
    pairs = [
        ("n_subjects", entry["n_subjects"], again["n_subjects"]),
        *((f"mae.{t}", entry["mae"][t], again["mae"][t]) for t in TRAITS),
        ("score", entry["score"], again["score"]),
        ("unk_rate", entry["unk_rate"], again["unk_rate"]),
    ]
    return [f"{key} {b!r} vs {a!r}" for key, a, b in pairs if not _same(float(a), float(b))]


def answers_rows(
    path: Path, name: str, cases: Sequence[int], stored: Sequence[dict] = ()
) -> list[dict]:
    """Per-subject rows of method ``name`` computed from the run's answers files
    (``answers/<name>/<case>.csv``, :mod:`palign.eval.answers`) in ``cases`` order, each with
    the method's other per-subject fields (``align_info``, timings) from ``stored`` rows. A
    stored row whose metrics differ from its answers file's is an error naming the file."""
    by_case = {r["case"]: r for r in stored}
    rows = []
    for case in cases:
        file = RunDir(path).answers_file(name, case)
        if not file.is_file():
            raise ReproduceError(
                f"{file}: missing (every subject's answers of {name}; runs of palign before "
                "answers files were kept cannot be reproduced from their answers)"
            )
        try:
            metrics = table_metrics(read_table(file)).to_dict()
        except (ValueError, KeyError, pd.errors.ParserError) as e:
            raise ReproduceError(f"{file}: not a palign answers file ({e})") from None
        row = {**by_case.get(case, {}), **metrics, "case": case, "method": name}
        if case in by_case:
            differ = _differences(aggregate([by_case[case]]), aggregate([row]))
            if differ:
                raise ReproduceError(
                    f"{file}: its answers give {name}'s case {case} other metrics than the "
                    f"run's result row ({'; '.join(differ)}): edited, or from another run?"
                )
        rows.append(row)
    return rows


def load_run(path: Path) -> Run:
    """Read a run dir, every method's per-subject numbers computed from its answers files and
    checked against ``summary.json`` to the last digit; :class:`ReproduceError` names the file
    that is missing, corrupt or disagrees."""
    run_dir = RunDir(path)
    summary, summary_path = run_dir.read_summary(), run_dir.summary
    cases = summary["cases"]
    main = summary["method"]
    stored = {name: run_dir.read_rows(name, main) for name in [main, *summary["compare"]]}
    rows = {name: answers_rows(path, name, cases, r) for name, r in stored.items()}
    baselines = {name: answers_rows(path, name, cases) for name in summary["baselines"]}
    entries = {
        summary["method"]: summary,
        **summary.get("compare", {}),
        **{f"{n} (baseline)": e for n, e in summary["baselines"].items()},
    }
    computed = {**rows, **{f"{n} (baseline)": r for n, r in baselines.items()}}
    for name, entry in entries.items():
        differ = _differences(entry, aggregate(computed[name]))
        if differ:
            raise ReproduceError(
                f"{summary_path}: {name} recomputed from {path / 'answers'} differs "
                f"({'; '.join(differ)}): edited, or from another run?"
            )
    return Run.of(path, summary, rows, baselines)


# --- numbers ---------------------------------------------------------------------------------


def standard_error(values: Sequence[float]) -> float:
    """Standard error of the mean of the finite ``values`` (std with ddof 1 / sqrt(n)); NaN for
    fewer than two."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    return float(x.std(ddof=1) / np.sqrt(x.size)) if x.size > 1 else float("nan")


def _paper(run: Run, m: MethodResult) -> Published | None:
    return published(run.summary["model"], m.name) if m.uses_llm else None


# --- table.md --------------------------------------------------------------------------------


def _section(run: Run) -> str:
    s, p = run.summary, run.summary["protocol"]
    lines = [
        f"## protocol={run.protocol}: {s['method']} and the other methods on {s['model']}",
        "",
        f"- Run dir: `{run.path}`",
    ]
    if run.paper_model:
        lines.append(
            f"- Model: `{s['model']}` = the paper's {run.paper_model}. Cells marked *paper* and "
            "the *paper Score* column are the paper's published Table 1 (its own protocol), "
            "not palign's."
        )
    else:
        lines.append(
            f"- Model: `{s['model']}`. **The paper has no numbers for this model**; its "
            "Llama-3-8B-Instruct numbers are listed below for reference (see *The paper's "
            "Table 1*)."
        )
    lines += [
        f"- Protocol: `{p['name']}` (coding `{p['coding']}`, scoring `{p['scoring']}`), "
        f"{s['n_test_items']} test items per subject.",
        f"- Subjects ({len(s['cases'])}): {', '.join(map(str, s['cases']))}.",
    ]
    steps = [f"{m.name} {m.steps}" for m in run.methods if m.steps is not None]
    if steps:
        lines.append(
            f"- Training steps per subject: {', '.join(steps)} (the paper: {PAPER_STEPS})."
        )
    pas = run.method("pas")
    if pas is not None:
        where = sorted({r["align_info"]["alpha_selected_on"] for r in pas.rows})
        chosen = ", ".join(f"{r['align_info']['alpha']:g}" for r in pas.rows)
        lines.append(
            f"- PAS alpha selected on: {' / '.join(where).replace('_', ' ')}; chosen per subject: "
            f"{chosen}."
        )
    lines += [f"- Note (summary.json): {note}" for note in s.get("notes", [])]
    cols = ["method", "subjects", *TRAITS, "Score", "UNK"]
    if run.paper_model:
        cols.append("paper Score")
    table = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for m in run.methods:
        paper = _paper(run, m)
        traits = [fmt(m.entry["mae"][t]) for t in TRAITS]
        if paper is not None and paper.mae is not None:
            traits = [f"{c} (*paper* {paper.mae[t]:.2f})" for c, t in zip(traits, TRAITS)]
        cells = [
            m.label,
            str(m.entry["n_subjects"]),
            *traits,
            f"**{fmt(m.entry['score'])}**",
            f"{100 * m.entry['unk_rate']:.1f}%",
        ]
        if run.paper_model:
            cells.append(f"{paper.score:.2f}" if paper is not None else "")
        table.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + "\n".join(table) + "\n"


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
        f"model configs for the paper's models: {models}.\n\n" + "\n".join(lines) + "\n"
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
    + ["score", "unk_rate", "paper_model", "paper_method"]
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
            p = run.summary["protocol"]
            for m in run.methods:
                paper = _paper(run, m)
                row = {
                    "protocol": p["name"],
                    "coding": p["coding"],
                    "scoring": p["scoring"],
                    "model": run.summary["model"],
                    "method": m.name,
                    "uses_llm": m.uses_llm,
                    "steps": m.steps if m.steps is not None else "",
                    "n_subjects": m.entry["n_subjects"],
                    **{f"mae_{t}": m.entry["mae"][t] for t in TRAITS},
                    "score": m.entry["score"],
                    "unk_rate": m.entry["unk_rate"],
                    "run_dir": str(run.path),
                }
                if paper is not None:
                    row["paper_model"] = run.paper_model
                    row["paper_method"] = PAPER_METHOD[m.name]
                    row["paper_score"] = paper.score
                    for t in TRAITS:
                        row[f"paper_mae_{t}"] = paper.mae[t] if paper.mae else ""
                writer.writerow(row)


# --- plots -----------------------------------------------------------------------------------


def _title(run: Run, what: str) -> str:
    s = run.summary
    return f"{what}\n{s['model']}, protocol={run.protocol}, {len(s['cases'])} subject(s)"


def plot_trait_errors(run: Run, path: Path) -> None:
    """Grouped bars: per-trait MAE (summary.json's means) per method, error bars the standard
    error over subjects; the paper's PAS per-trait MAE as markers where known."""
    fig = Figure(figsize=(11, 5), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(TRAITS))
    width = 0.8 / len(run.methods)
    colors = [f"C{i % 10}" for i in range(len(run.methods))]
    for i, (m, color) in enumerate(zip(run.methods, colors)):
        pos = x - 0.4 + width * (i + 0.5)
        heights = [m.entry["mae"][t] for t in TRAITS]
        missing = " (n/a: no parsed answer)" if not np.isfinite(heights).any() else ""
        errors = [standard_error([r["mae"][t] for r in m.rows]) for t in TRAITS]
        ax.bar(
            pos,
            heights,
            width,
            yerr=np.nan_to_num(errors),
            capsize=2,
            color=color,
            hatch=None if m.uses_llm else "//",
            edgecolor="white" if m.uses_llm else "black",
            label=m.label + missing,
        )
        paper = _paper(run, m)
        if paper is not None and paper.mae is not None:
            ax.plot(pos, [paper.mae[t] for t in TRAITS], "kD", label=f"{m.name}: paper's Table 1")
    ax.set_xticks(x, TRAITS)
    ax.set_xlabel("trait")
    ax.set_ylabel("MAE (1..5 scale; lower is better)")
    ax.set_title(_title(run, "Per-trait MAE per method (error bars: standard error over subjects)"))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    fig.savefig(path, dpi=120)


def plot_pas_alpha(run: Run, path: Path) -> bool:
    """PAS Score against alpha: one thin line per subject, their mean thick. False (nothing
    written) when the run has no PAS rows with alpha scores."""
    pas = run.method("pas")
    infos = [r.get("align_info", {}) for r in pas.rows] if pas is not None else []
    key = next((k for k in ALPHA_KEYS if infos and all(k in i for i in infos)), None)
    if key is None:
        return False
    alphas = sorted(float(a) for a in infos[0][key])
    scores = np.array([[i[key][str(a)] for a in alphas] for i in infos], dtype=np.float64)
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for line in scores:
        ax.plot(alphas, line, color="0.6", lw=0.8, alpha=0.7)
    finite = np.isfinite(scores)
    mean = np.where(
        finite.any(0), np.where(finite, scores, 0).sum(0) / np.maximum(finite.sum(0), 1), np.nan
    )
    ax.plot(alphas, mean, "o-", color="C3", lw=2.5, label=f"mean of {len(scores)} subject(s)")
    ax.plot([], [], color="0.6", lw=0.8, label="one subject")
    if not finite.any():
        ax.text(
            0.5,
            0.5,
            "no finite score: every answer unparsed",
            transform=ax.transAxes,
            ha="center",
        )
    ax.set_xticks(alphas)
    ax.set_xlabel("alpha (shift in units of sigma)")
    ax.set_ylabel(ALPHA_KEYS[key] + "\n(lower is better)", fontsize="small")
    ax.set_title(_title(run, "PAS Score against alpha"))
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)
    return True


def plot_head_accuracy(run: Run, path: Path) -> bool:
    """Heatmap layers x heads of the probe validation accuracy (``head_accuracy.npy``, (groups,
    layers, heads)), mean over groups (NaN groups left out) then over subjects. False (nothing
    written) when the run dir holds no such file."""
    files = sorted(run.path.glob("artifacts/**/head_accuracy.npy"))
    if not files:
        return False
    arrays = [np.load(f) for f in files]
    shapes = {a.shape[1:] for a in arrays}
    if len(shapes) != 1:
        raise ReproduceError(f"{run.path / 'artifacts'}: head_accuracy.npy shapes differ: {shapes}")
    per_subject = np.stack(
        [np.where(np.isfinite(a), a, 0).sum(0) / np.isfinite(a).sum(0) for a in arrays]
    )
    accuracy = per_subject.mean(0)
    fig = Figure(figsize=(max(8, 0.35 * accuracy.shape[1] + 2), 5.5), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(accuracy, origin="lower", aspect="auto", cmap="viridis")
    fig.colorbar(image, ax=ax, label="probe validation accuracy")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(_title(run, "PAS probe accuracy per head (validation, subject mean)"))
    fig.savefig(path, dpi=120)
    return True


#: Answer values of the confusion matrices: raw 5..1 (A..E), and 0 = unparsed (predicted only).
ANSWER_VALUES = (5, 4, 3, 2, 1)


def confusion(table: pd.DataFrame, trait: str) -> np.ndarray:
    """(5, 6) counts of one trait's selected answers: rows the subject's raw answer 5..1 (A..E),
    columns the predicted one 5..1 then unparsed; items without a subject answer left out."""
    lines = table[table["selected"] & (table["trait"] == trait) & (table["target"] != 0)]
    cols = (*ANSWER_VALUES, 0)
    out = np.zeros((len(ANSWER_VALUES), len(cols)), dtype=np.int64)
    for i, target in enumerate(ANSWER_VALUES):
        predicted = lines["predicted"][lines["target"] == target].to_numpy()
        out[i] = [(predicted == c).sum() for c in cols]
    return out


def plot_confusion(run: Run, m: MethodResult, path: Path) -> None:
    """One panel per trait: the subjects' answers (rows) against the method's (columns), counts
    over all subjects from the answers files, shaded by the share of their row."""
    table = read_answers(run.path, m.name)
    fig = Figure(figsize=(17, 4.2), layout="constrained")
    axes = fig.subplots(1, len(TRAITS), sharey=True)
    letters = [f"{v} ({chr(ord('A') + 5 - v)})" for v in ANSWER_VALUES]
    for ax, trait in zip(axes, TRAITS):
        counts = confusion(table, trait)
        share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
        image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for (i, j), n in np.ndenumerate(counts):
            ax.text(
                j,
                i,
                str(n),
                ha="center",
                va="center",
                fontsize=8,
                color="white" if share[i, j] > 0.6 else "black",
            )
        ax.set_xticks(range(counts.shape[1]), [*letters, "UNK"], rotation=45, fontsize=7)
        ax.set_yticks(range(counts.shape[0]), letters, fontsize=7)
        ax.set_title(f"{trait}: MAE {fmt(m.entry['mae'][trait])}")
        ax.set_xlabel("predicted answer")
    axes[0].set_ylabel("subject's answer (raw)")
    fig.colorbar(image, ax=axes, label="share of the row", shrink=0.8)
    fig.suptitle(_title(run, f"{m.label}: answers per trait, counts over subjects"))
    fig.savefig(path, dpi=110)


# --- entry point -----------------------------------------------------------------------------


def plot_run(run: Run, folder: Path, suffix: str = "") -> list[Path]:
    """The run's plots in ``folder``: ``trait_errors<suffix>.png``, a
    ``confusion_<method><suffix>.png`` per method and baseline, ``pas_alpha`` and
    ``head_accuracy`` when PAS was run; returns the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"trait_errors{suffix}.png"
    plot_trait_errors(run, path)
    written = [path]
    for name, plot in (("pas_alpha", plot_pas_alpha), ("head_accuracy", plot_head_accuracy)):
        path = folder / f"{name}{suffix}.png"
        if plot(run, path):
            written.append(path)
    for m in run.methods:
        path = folder / f"confusion_{m.name}{suffix}.png"
        plot_confusion(run, m, path)
        written.append(path)
    return written


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
        prog="python -m palign.reproduce",
        description="The paper's Table 1 beside palign's numbers from finished runs "
        "(one run dir per protocol): table.md, table.csv and plots/ in --out.",
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for the outputs")
    parser.add_argument("run_dirs", type=Path, nargs="+", help="run dirs of `python -m palign`")
    args = parser.parse_args(argv)
    with cli("palign.reproduce"):
        written = reproduce(args.run_dirs, args.out)
    print(f"Wrote {len(written)} files to {args.out}:")
    print("\n".join(f"  {p}" for p in written))


if __name__ == "__main__":
    main()
