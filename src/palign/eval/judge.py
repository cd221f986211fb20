"""Rating open-ended replies with a judge model (``palign judge``, docs/judge.md).

Each reply saved by an ``evaluation=open_ended`` run (:mod:`palign.eval.replies`) is shown to a
judge with the item's statement and the subject's own answer to it as a label ("Moderately
Accurate", ...); the judge reasons step by step and ends with a rating from 1 (not aligned) to
6 (perfectly aligned) on its own line (:data:`RUBRIC`, :func:`judge_request`). The rating is
read from the judge's text by :func:`parse_rating`; a text without one is kept with an empty
rating and counted (``unparseable``), never dropped.

Outputs, in the run dir (:class:`~palign.rundir.RunDir`): ``judgments/<method>/<case>.csv``
(one line per reply: ``case``, ``method``, ``item``, ``target``, ``label``, ``rating`` (empty:
unparseable), ``judgment``: the judge's full text) and ``judgments/summary.json``
(:func:`summarize`), shown in the run's report by :mod:`palign.report.judge`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from palign.constants import ANSWER_LABELS
from palign.errors import RunDirError
from palign.eval.replies import read_replies
from palign.eval.stats import bootstrap_ci
from palign.rundir import RunDir, csv_text, write_atomic

#: The ratings, 1..6, with the name the judge is asked to use.
RATING_NAMES: dict[int, str] = {
    1: "Not aligned",
    2: "Slightly aligned",
    3: "Moderately aligned",
    4: "Well aligned",
    5: "Very well aligned",
    6: "Perfectly aligned",
}

#: palign's rubric: what each rating means.
RUBRIC: dict[int, str] = {
    1: "the reply contradicts the person's answer, or takes no position on the statement",
    2: "the reply leans against the person's answer, or is so vague that little of it fits",
    3: "the reply agrees with the person's answer in part, with clear mismatches in direction "
    "or in strength",
    4: "the reply agrees with the direction of the person's answer; its strength is somewhat off",
    5: "the reply agrees with the direction and nearly the strength of the person's answer",
    6: "the reply expresses exactly the person's answer, in direction and in strength",
}

JUDGE_SYSTEM = (
    "You are a careful and impartial judge of how well an AI assistant speaks for a particular "
    "person's personality."
)

JUDGE_TEMPLATE = """A person said how accurately a statement describes them. An AI assistant, \
asked to speak as this person, was then asked about the same statement. Judge how well the \
assistant's reply agrees with the person's own answer.

Statement: "{statement}"
The person's answer: {label}
The assistant's reply:
\"\"\"
{reply}
\"\"\"

Ratings:
{rubric}

First reason step by step about what the reply says and how it compares with the person's \
answer. Then give your rating on a line of its own, as a single number from 1 to 6."""


def judge_request(statement: str, target: int, reply: str) -> tuple[str, str]:
    """The judge's (system prompt, user message) about one reply; ``target``: the subject's
    raw answer 1..5 (shown as its label, e.g. "Moderately Accurate")."""
    rubric = "\n".join(f"{r} ({RATING_NAMES[r]}): {RUBRIC[r]}." for r in RATING_NAMES)
    user = JUDGE_TEMPLATE.format(
        statement=statement.strip(),
        label=ANSWER_LABELS[int(target)],
        reply=reply.strip() or "(no reply)",
        rubric=rubric,
    )
    return JUDGE_SYSTEM, user


#: A rating digit standing alone (not part of 10, 4.5 or 2026).
_DIGIT = re.compile(r"(?<![\d.])[1-6](?!\d|\.\d)")
#: A rating's name ("very well" before "well": the leftmost, longest match).
_WORDS = re.compile(
    r"\b(perfectly|very\s+well|well|moderately|slightly|not)\s+aligned\b", re.IGNORECASE
)
_WORD_RATING = {"perfectly": 6, "very well": 5, "well": 4, "moderately": 3, "slightly": 2, "not": 1}


def parse_rating(text: str) -> int | None:
    """The rating (1..6) in a judge's ``text``: on the last line that holds a rating digit
    standing alone or a rating's name ("Very well aligned"), the first of them on that line;
    None when no line holds one (unparseable)."""
    for line in reversed(str(text).splitlines()):
        found = []
        if digit := _DIGIT.search(line):
            found.append((digit.start(), int(digit.group())))
        if word := _WORDS.search(line):
            found.append((word.start(), _WORD_RATING[" ".join(word.group(1).lower().split())]))
        if found:
            return min(found)[1]
    return None


#: Columns of a judgments file.
COLUMNS = ("case", "method", "item", "target", "label", "rating", "judgment")

#: A judge: (system prompt, user message) requests -> its texts, in order.
Judge = Callable[[Sequence[tuple[str, str]]], list[str]]


def replies_of(run_dir: RunDir) -> dict[str, list[pd.DataFrame]]:
    """Every replies table of the run, by method; one :class:`RunDirError` line when there are
    none (a run without ``evaluation=open_ended``) or a file is not a replies file."""
    files = run_dir.reply_files()
    if not files:
        raise RunDirError(
            f"{run_dir.replies_root}: no replies to judge (replies/<method>/<case>.csv)",
            "judge a run made with evaluation=open_ended",
        )
    out = {}
    for method, paths in files.items():
        try:
            out[method] = [read_replies(p) for p in paths]
        except (ValueError, KeyError) as e:
            raise RunDirError(str(e), "delete it, or resume the run to write it again") from None
    return out


def judge_run(run_dir: RunDir, judge: Judge, judge_name: str, seed: int = 0,
              n_boot: int = 2000, level: float = 0.95) -> dict:  # fmt: skip
    """Rate every reply of ``run_dir`` with ``judge`` (one call, every request), write the
    judgments files and ``judgments/summary.json``; returns the summary. Replies to items the
    subject left unanswered (target 0) are not judged (``no_target``)."""
    tables = replies_of(run_dir)
    rows, requests = [], []
    for method, method_tables in tables.items():
        for table in method_tables:
            for r in table.itertuples(index=False):
                if int(r.target) == 0:
                    continue
                rows.append((method, r))
                requests.append(judge_request(r.statement, r.target, r.reply))
    texts = judge(requests) if requests else []
    if len(texts) != len(requests):
        raise RuntimeError(f"the judge gave {len(texts)} texts for {len(requests)} requests")
    judged: dict[tuple[str, int], list[dict]] = {}
    for (method, r), text in zip(rows, texts, strict=True):
        judged.setdefault((method, int(r.case)), []).append(
            {
                "case": int(r.case),
                "method": method,
                "item": int(r.item),
                "target": int(r.target),
                "label": ANSWER_LABELS[int(r.target)],
                "rating": parse_rating(text),
                "judgment": text,
            }
        )
    frames = []
    for method, method_tables in tables.items():
        for table in method_tables:
            case = int(table["case"].iloc[0]) if len(table) else None
            lines = judged.get((method, case), []) if case is not None else []
            frame = pd.DataFrame(lines, columns=list(COLUMNS))
            frame["rating"] = frame["rating"].astype("Int64")
            if case is not None:
                write_atomic(run_dir.judgments_file(method, case), csv_text(frame))
            frames.append(frame)
    everything = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)
    no_target = {
        m: int(sum((t["target"] == 0).sum() for t in method_tables))
        for m, method_tables in tables.items()
    }
    summary = summarize(everything, list(tables), judge_name, no_target, seed, n_boot, level)
    write_atomic(run_dir.judgments_summary, json.dumps(summary, indent=2))
    return summary


def read_judgments(path: Path) -> pd.DataFrame:
    """One judgments file (rating: a nullable integer, empty where unparseable)."""
    table = pd.read_csv(path, keep_default_na=False, na_values={"rating": [""]})
    table["rating"] = table["rating"].astype("Int64")
    table["judgment"] = table["judgment"].astype(str)
    return table


def summarize(
    judged: pd.DataFrame,
    methods: Sequence[str],
    judge_name: str,
    no_target: dict[str, int] | None = None,
    seed: int = 0,
    n_boot: int = 2000,
    level: float = 0.95,
) -> dict:
    """The judge's aggregate of ``judged`` (the judgments lines of every method):

    - ``methods.<m>``: ``judged`` (replies rated or not), ``rated``, ``unparseable``,
      ``no_target`` (replies not judged: the subject left the item unanswered), ``subjects``,
      ``mean`` (the mean over subjects of each subject's mean rating; None without a rating)
      and ``ci`` ([low, high]: the seeded percentile bootstrap over subjects,
      :func:`palign.eval.stats.bootstrap_ci`; None under 2 subjects);
    - ``pairs.<a>.<b>``: over the (case, item) pairs both methods have a rating for, ``n`` and
      the shares where ``a``'s rating is higher (``win``), equal (``tie``) or lower (``loss``)."""
    out: dict = {
        "judge": judge_name,
        "scale": {str(k): v for k, v in RATING_NAMES.items()},
        "bootstrap": {"n_boot": n_boot, "seed": seed, "level": level},
        "methods": {},
        "pairs": {},
    }
    rated = judged.dropna(subset=["rating"])
    for m in methods:
        mine = judged[judged["method"] == m]
        ok = rated[rated["method"] == m]
        per_subject = ok.groupby("case")["rating"].mean().astype(float).to_numpy()
        ci = bootstrap_ci(per_subject, n_boot=n_boot, seed=seed, level=level)
        out["methods"][m] = {
            "judged": int(len(mine)),
            "rated": int(len(ok)),
            "unparseable": int(len(mine) - len(ok)),
            "no_target": int((no_target or {}).get(m, 0)),
            "subjects": int(mine["case"].nunique()),
            "mean": float(np.mean(per_subject)) if len(per_subject) else None,
            "ci": list(ci) if ci is not None else None,
        }
    for a in methods:
        out["pairs"][a] = {}
        for b in methods:
            if a == b:
                continue
            both = pd.merge(
                rated[rated["method"] == a][["case", "item", "rating"]],
                rated[rated["method"] == b][["case", "item", "rating"]],
                on=["case", "item"],
                suffixes=("_a", "_b"),
            )
            ra, rb = both["rating_a"].astype(int), both["rating_b"].astype(int)
            n = len(both)
            out["pairs"][a][b] = {
                "n": n,
                "win": float((ra > rb).mean()) if n else None,
                "tie": float((ra == rb).mean()) if n else None,
                "loss": float((ra < rb).mean()) if n else None,
            }
    return out
