"""A method's answers (:class:`Answers`), and every answer of a run, item by item: one CSV file
per method and subject.

``answers/<method>/<case>.csv`` in the run dir, read with ``pandas.read_csv``; one line per test
item (and, where the evaluation chose a hyper-parameter among candidates, per candidate):

- ``case``, ``method``: the subject and the method;
- ``item`` (the item's ``Full#``), ``trait`` (A, C, E, N, O), ``key`` (+1 or -1);
- ``target``: the subject's answer, raw 1..5 under the run's coding (0 = missing);
- ``predicted``: the method's answer, raw 1..5 (A = 5 ... E = 1; 0 = could not be parsed);
- ``parsed``: whether an answer was read (``predicted != 0``);
- ``p_A`` ... ``p_E``: the option probabilities (logit scoring; empty otherwise);
- ``text``: the generated text (generation scoring; empty otherwise);
- ``setting``, ``value``: the hyper-parameter the answers were given under (PAS: ``alpha``);
- ``selected``: whether these answers are the ones evaluated (False for a candidate the
  evaluation did not choose).

The run's per-subject metrics are computed from these tables (:func:`table_metrics`), so
recomputing them from the files gives the run's numbers exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from palign.constants import OPTION_LETTERS
from palign.data.papi import Item
from palign.eval.metrics import SubjectMetrics, metrics_of
from palign.rundir import RunDir, csv_text, write_atomic


@dataclass
class Answers:
    """A method's answers to ``n`` items.

    ``scores``: (n,) raw answers 1..5, 0 where no answer could be parsed.
    ``probs``: (n, 5) probabilities of options A..E (logit scoring), else None.
    ``texts``: generated texts (generative scoring), else None.
    ``setting``: (name, value) of the hyper-parameter they were answered under (PAS: alpha).
    """

    scores: np.ndarray
    probs: np.ndarray | None = None
    texts: list[str] | None = None
    setting: tuple[str, float] | None = None

    def __getitem__(self, rows: slice) -> Answers:
        """The answers of ``rows`` (a slice of the items)."""
        return Answers(
            scores=self.scores[rows],
            probs=None if self.probs is None else self.probs[rows],
            texts=None if self.texts is None else self.texts[rows],
            setting=self.setting,
        )

    @property
    def expected(self) -> np.ndarray | None:
        """(n,) expected raw answer under ``probs`` (A=5 ... E=1)."""
        if self.probs is None:
            return None
        return self.probs @ np.arange(5, 0, -1, dtype=self.probs.dtype)


PROB_COLUMNS = tuple(f"p_{letter}" for letter in OPTION_LETTERS)
COLUMNS = (
    "case",
    "method",
    "item",
    "trait",
    "key",
    "target",
    "predicted",
    "parsed",
    *PROB_COLUMNS,
    "text",
    "setting",
    "value",
    "selected",
)


def answer_table(
    case: int,
    method: str,
    items: Sequence[Item],
    target: np.ndarray,
    answers,
    selected: bool = True,
) -> pd.DataFrame:
    """The lines of one subject's :class:`Answers` to ``items``."""
    n = len(items)
    scores = np.asarray(answers.scores, dtype=np.int64)
    if scores.shape != (n,):
        raise ValueError(f"{method}: {scores.shape[0]} answers to {n} items (case {case})")
    probs = answers.probs if answers.probs is not None else np.full((n, 5), np.nan)
    name, value = answers.setting if answers.setting is not None else ("", np.nan)
    columns = {
        "case": np.full(n, case, dtype=np.int64),
        "method": [method] * n,
        "item": [it.number for it in items],
        "trait": [it.trait for it in items],
        "key": [it.key for it in items],
        "target": np.asarray(target, dtype=np.int64),
        "predicted": scores,
        "parsed": scores != 0,
        **{col: probs[:, i] for i, col in enumerate(PROB_COLUMNS)},
        "text": answers.texts if answers.texts is not None else [""] * n,
        "setting": [name] * n,
        "value": np.full(n, float(value)),
        "selected": np.full(n, selected),
    }
    return pd.DataFrame(columns, columns=list(COLUMNS))


def table_metrics(table: pd.DataFrame) -> SubjectMetrics:
    """The metrics of the selected answers of one subject's table."""
    chosen = table[table["selected"]]
    return metrics_of(chosen["predicted"], chosen["target"], chosen["trait"], chosen["key"])


def write_table(path: Path, table: pd.DataFrame) -> None:
    """Write ``table`` to ``path`` atomically (readers see no file or the whole file)."""
    write_atomic(path, csv_text(table))


def read_table(path: Path) -> pd.DataFrame:
    """One answers file as written by :func:`write_table` (texts stay strings, empty = "")."""
    table = pd.read_csv(
        path,
        dtype={"method": str, "trait": str, "text": str, "setting": str},
        keep_default_na=False,
        na_values={c: [""] for c in (*PROB_COLUMNS, "value")},
    )
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: not a palign answers file (no column(s) {missing})")
    table["selected"] = table["selected"].astype(str) == "True"
    table["parsed"] = table["parsed"].astype(str) == "True"
    table["text"] = table["text"].astype(str)
    return table


def read_answers(run_dir: Path, method: str) -> pd.DataFrame:
    """Every subject's answers file of ``method`` in ``run_dir``, concatenated (case order)."""
    paths = RunDir(run_dir).answers_files(method)
    if not paths:
        raise FileNotFoundError(f"{RunDir(run_dir).answers(method)}: no answers files")
    return pd.concat([read_table(p) for p in paths], ignore_index=True)
