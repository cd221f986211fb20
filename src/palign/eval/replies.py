"""Open-ended replies (``evaluation=open_ended``): one CSV file per method and subject.

``replies/<method>/<case>.csv`` in the run dir, read with :func:`read_replies`; one line per
test item asked (``evaluation.items``: the first N):

- ``case``, ``method``: the subject and the method;
- ``item`` (the item's ``Full#``), ``trait``, ``key``, ``statement`` (the item's text);
- ``target``: the subject's answer, raw 1..5 under the run's coding (0 = missing);
- ``prompt``: the question asked (``evaluation.prompt`` with the statement);
- ``reply``: the model's reply.

``palign judge`` rates them (:mod:`palign.eval.judge`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from palign.data.papi import Item
from palign.rundir import csv_text, write_atomic

COLUMNS = ("case", "method", "item", "trait", "key", "statement", "target", "prompt", "reply")


def reply_table(
    case: int,
    method: str,
    items: Sequence[Item],
    target: np.ndarray,
    prompts: Sequence[str],
    replies: Sequence[str],
) -> pd.DataFrame:
    """The lines of one subject's replies to ``items``."""
    if not len(items) == len(prompts) == len(replies) == len(target):
        raise ValueError(f"{method}: {len(replies)} replies to {len(items)} items (case {case})")
    columns = {
        "case": np.full(len(items), case, dtype=np.int64),
        "method": [method] * len(items),
        "item": [it.number for it in items],
        "trait": [it.trait for it in items],
        "key": [it.key for it in items],
        "statement": [it.text.strip() for it in items],
        "target": np.asarray(target, dtype=np.int64),
        "prompt": list(prompts),
        "reply": list(replies),
    }
    return pd.DataFrame(columns, columns=list(COLUMNS))


def write_replies(path: Path, table: pd.DataFrame) -> None:
    """Write ``table`` to ``path`` atomically."""
    write_atomic(path, csv_text(table))


def read_replies(path: Path) -> pd.DataFrame:
    """One replies file as written by :func:`write_replies` (texts stay strings, empty = "")."""
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: not a palign replies file (no column(s) {missing})")
    for col in ("case", "item", "key", "target"):
        table[col] = table[col].astype(np.int64)
    return table
