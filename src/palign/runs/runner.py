"""The evaluation runner: align and evaluate one method on the selected subjects, write outputs.

Outputs (in the Hydra run dir): ``config.yaml`` (resolved), ``answers/<method>/<case>.csv``
(every answer, item by item: :mod:`palign.eval.answers`), ``results/<method>/<case>.json``
(one row per subject, written atomically as it finishes; what ``resume`` reads),
``results.jsonl`` and ``compare/<method>.jsonl`` (the rows in subject order), ``summary.json``,
``report.md``, under ``evaluation=open_ended`` ``replies/<method>/<case>.csv`` (the aligned
model's free replies about the test items: :mod:`palign.eval.replies`) and, if enabled, one artifact folder per subject under
``artifacts/<method>/<case>/``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence

import lightning as L
import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from palign import stopping
from palign.config import Plan, build, plan
from palign.constants import TRAITS
from palign.data.papi import Inventory, PapiData, Subject
from palign.eval.answers import answer_table, table_metrics, write_table
from palign.eval.hosted import HostedScorer
from palign.eval.metrics import best_candidate, subject_metrics
from palign.eval.records import NO_LLM, Aggregate, ResultRow, Summary, aggregate
from palign.eval.replies import reply_table, write_replies
from palign.eval.scoring import Scorer, ScoringConfig
from palign.methods.base import Answers, Artifact, Candidates, Method, MethodContext
from palign.methods.statistical import BASELINES
from palign.models.cost import CostMeter
from palign.models.hosted import is_hosted
from palign.rundir import RunDir, check_resume, write_atomic
from palign.runs.summary import summarize, write_outputs
from palign.runs.tracking import RunTracker

log = logging.getLogger("palign")


def evaluate_group(
    method: Method,
    subjects: Sequence[Subject],
    inventory: Inventory,
    meter: CostMeter | None = None,
    artifacts: Sequence[Artifact] | None = None,
) -> list[tuple[ResultRow, Artifact, pd.DataFrame]]:
    """Align ``method`` on the subjects' alignment items, answer the test items, score them:
    one result row, artifact and answers table (:mod:`palign.eval.answers`) per subject. The
    method sees only the alignment answers; where it leaves a hyper-parameter to the evaluation
    (:class:`Candidates`, protocol=paper), it is chosen here on the test items and the row says
    so (``selected_on_test_items``). The subjects go through the method together (a method
    that batches subjects does so); each row gets an equal share of the group's time and of the
    forwards ``meter`` counted (``cost``: forward calls, tokens forwarded, generated tokens, for
    aligning and for answering; a model served over an API: requests, tokens, USD). With
    ``artifacts`` (one per subject) nothing is aligned: the subjects are answered with those."""
    n = len(subjects)
    seen = [s.seen_only(inventory.train) for s in subjects]
    start, cost0 = time.perf_counter(), meter.snapshot() if meter else None
    if artifacts is None:  # given: answer with them, nothing aligned
        artifacts = method.align_group(seen, inventory.train_items)
    aligned, cost1 = time.perf_counter(), meter.snapshot() if meter else None
    answers = method.answer_group(seen, artifacts, inventory.test_items)
    done, cost2 = time.perf_counter(), meter.snapshot() if meter else None
    out = []
    for subject, artifact, answer in zip(subjects, artifacts, answers, strict=True):
        table, selected_on_test = answers_of(method.name, subject, inventory, answer, artifact)
        row = ResultRow.of(
            table_metrics(table),
            subject.case,
            method.name,
            timing={
                "align_s": (aligned - start) / n,
                "eval_s": (done - aligned) / n,
                **artifact.meta.get("timing", {}),
            },
            align_info={k: v for k, v in artifact.meta.items() if k != "timing"},
            selected_on_test_items=selected_on_test,
        )
        if meter is not None:
            row.cost = {"align": (cost1 - cost0) / n, "answer": (cost2 - cost1) / n}
            row.subject_batch = n if n > 1 else None
        out.append((row, artifact, table))
    return out


def answers_of(
    method: str,
    subject: Subject,
    inventory: Inventory,
    answer: Answers | Candidates,
    artifact: Artifact,
) -> tuple[pd.DataFrame, str | None]:
    """The subject's answers table, and the name of the hyper-parameter chosen on the test
    items (None when the method chose everything itself). Choosing among :class:`Candidates`
    is the one place where a test answer selects anything: by the lowest Score (ties: the
    first), recorded in the artifact (``<name>``, ``<name>_scores_on_test_items``) and the
    table (every candidate's answers, the chosen one ``selected``)."""
    items, target = inventory.test_items, subject.answers(inventory.test)
    if isinstance(answer, Answers):
        return answer_table(subject.case, method, items, target, answer), None
    best, scores = best_candidate([a.scores for a in answer.answers], target, items)
    artifact.choose(answer.name, answer.values[best])
    artifact.meta[f"{answer.name}_scores_on_test_items"] = {
        str(v): s for v, s in zip(answer.values, scores, strict=True)
    }
    tables = [
        answer_table(subject.case, method, items, target, a, selected=i == best)
        for i, a in enumerate(answer.answers)
    ]
    return pd.concat(tables, ignore_index=True), answer.name


def baseline_rows(
    data: PapiData, subjects: Sequence[Subject], run_dir: RunDir | None = None
) -> dict[str, list[ResultRow]]:
    """Per-subject result rows of every statistical baseline on ``subjects``; with
    ``run_dir``, their answers files too."""
    out = {}
    for cls in BASELINES:
        baseline = cls()
        baseline.setup(MethodContext(data))
        out[baseline.name] = []
        for row, _, table in evaluate_group(baseline, subjects, data.inventory):
            if run_dir is not None:
                write_table(run_dir.answers_file(baseline.name, row.case), table)
            out[baseline.name].append(row)
    return out


def baseline_aggregates(data: PapiData, subjects: Sequence[Subject]) -> dict[str, Aggregate]:
    """The aggregate of every statistical baseline on ``subjects`` (e.g. all loaded subjects),
    without files: each subject's metrics straight from its answers (the numbers a run's rows
    get from the same answers through their tables)."""
    inventory, out = data.inventory, {}
    seen = [s.seen_only(inventory.train) for s in subjects]
    for cls in BASELINES:
        baseline = cls()
        baseline.setup(MethodContext(data))
        artifacts = baseline.align_group(seen, inventory.train_items)
        answers = baseline.answer_group(seen, artifacts, inventory.test_items)
        rows = [
            ResultRow.of(
                subject_metrics(a.scores, s.answers(inventory.test), inventory.test_items),
                s.case,
                baseline.name,
            )
            for s, a in zip(subjects, answers, strict=True)
        ]
        out[baseline.name] = aggregate(rows)
    return out


def group_replies(
    method: Method,
    subjects: Sequence[Subject],
    artifacts: Sequence[Artifact],
    inventory: Inventory,
    evaluation: dict,
) -> list[pd.DataFrame]:
    """``evaluation=open_ended``: each subject's replies table (:mod:`palign.eval.replies`),
    the method answering the first ``evaluation["items"]`` test items as it answers the
    inventory (its artifacts, the hyper-parameter the evaluation chose included) while the
    scorer asks ``evaluation["prompt"]`` and generates free text (``scorer.replies``)."""
    items = list(inventory.test_items)[: evaluation.get("items") or None]
    numbers = [it.number for it in items]
    seen = [s.seen_only(inventory.train) for s in subjects]
    scorer = method.context.scorer
    with scorer.replies(evaluation["prompt"], evaluation["max_new_tokens"]):
        answers = method.answer_group(seen, artifacts, items)
        prompts = [scorer.question(it) for it in items]
    out = []
    for subject, answer in zip(subjects, answers, strict=True):
        if not isinstance(answer, Answers):  # a hyper-parameter left open: none was chosen
            raise TypeError(f"{method.name}: replies under several {answer.name} values")
        out.append(
            reply_table(
                subject.case, method.name, items, subject.answers(numbers), prompts, answer.texts
            )
        )
    return out


def evaluate_all(
    method: Method,
    subjects: Sequence[Subject],
    inventory: Inventory,
    run_dir: RunDir,
    save_artifacts: bool = True,
    tracker: RunTracker | None = None,
    meter: CostMeter | None = None,
    evaluation: dict | None = None,
) -> list[ResultRow]:
    """Evaluate ``method`` on every subject, ``method.subject_batch`` at a time, with a progress
    bar. Each subject's answers, artifact (``save_artifacts``) and then row are written into
    ``run_dir`` atomically as soon as its group is done, so a killed run loses at most the group
    in flight; subjects whose row is already there are not evaluated again (``resume``).
    ``evaluation`` (``evaluation=open_ended``): each subject's replies are written before its
    row (:func:`group_replies`), so a finished subject has its replies."""
    done = run_dir.finished_rows(method.name)
    if done:
        log.info(
            "%s: %d finished subject(s) found in %s",
            method.name,
            len(done),
            run_dir.results(method.name),
        )
    pending = [s for s in subjects if s.case not in done]
    size = max(1, method.subject_batch)
    results: dict[int, tuple[ResultRow, list | None]] = {}
    bar = tqdm(
        total=len(subjects), desc=f"{method.name} subjects", unit="subject", dynamic_ncols=True
    )
    bar.update(len(subjects) - len(pending))
    for start in range(0, len(pending), size):
        stopping.check(f"{len(subjects) - len(pending) + start} of {len(subjects)} subjects")
        group = pending[start : start + size]
        evaluated = evaluate_group(method, group, inventory, meter)
        if evaluation is not None and evaluation.get("name") == "open_ended":
            artifacts = [artifact for _, artifact, _ in evaluated]
            for table in group_replies(method, group, artifacts, inventory, evaluation):
                write_replies(run_dir.replies_file(method.name, int(table["case"][0])), table)
        for row, artifact, table in evaluated:
            write_table(run_dir.answers_file(method.name, row.case), table)
            if save_artifacts:
                artifact.save(run_dir.artifacts(method.name) / str(row.case))
            run_dir.write_row(row)
            results[row.case] = (row, artifact.history)
            log.info("%s %s", method.name, _log_line(row))
            bar.update(1)
        bar.set_postfix(score=f"{np.mean([r.score for r, _ in results.values()]):.3f}")
    bar.close()
    stopping.check(f"{len(subjects)} of {len(subjects)} subjects")  # before the next method
    rows = []
    for subject in subjects:
        row, history = results.get(subject.case, (done.get(subject.case), None))
        if tracker is not None:
            tracker.subject(row, history)
        rows.append(row)
    return rows


def setup(method: Method, context: MethodContext, meter: CostMeter | None) -> dict | None:
    """``method.setup(context)``; returns the forwards it cost (e.g. PAS's shared activations),
    or None without a model."""
    before = meter.snapshot() if meter else None
    method.setup(context)
    return (meter.snapshot() - before).to_dict() if meter else None


def _log_line(row: ResultRow) -> str:
    maes = " ".join(f"{t} {row.mae[t]:.2f}" for t in TRAITS)
    t = row.timing
    return (
        f"case {row.case}: Score {row.score:.3f} ({maes}) UNK {100 * row.unk_rate:.1f}% "
        f"align {t['align_s']:.2f}s eval {t['eval_s']:.2f}s"
    )


def run(cfg: DictConfig) -> Summary:
    """Run one configured evaluation; returns the summary (also written to ``summary.json``).
    With ``resume=<run dir>`` the subjects already finished there are not evaluated again.

    Everything is checked before any work: the run dir (writable, not held by another run,
    resume allowed), then the run's :func:`~palign.config.plan` (the data and the subject
    selection, every method's config with the ``compare`` entries, the device). Only then is
    ``config.yaml`` written and the model loaded."""
    run_dir = RunDir(cfg.paths.output_dir)
    run_dir.check_writable()
    check_resume(cfg, run_dir)
    checked = plan(cfg)
    with run_dir.lock(), logging_redirect_tqdm():  # log lines above the bars, not through them
        return _run(cfg, run_dir, checked)


def _run(cfg: DictConfig, run_dir: RunDir, checked: Plan) -> Summary:
    data, subjects, method, others = checked.data, checked.subjects, checked.method, checked.others
    uses_llm = checked.uses_llm
    check_resume(cfg, run_dir)  # again, now that no other run can start here
    for key, value in (cfg.hardware.get("env") or {}).items():
        os.environ.setdefault(str(key), str(value))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    write_atomic(run_dir.config, OmegaConf.to_yaml(cfg, resolve=True))

    scorer = None
    model_name = NO_LLM
    if uses_llm:
        loaded = build(cfg.model)
        model_name = loaded.name
        scoring = ScoringConfig(**OmegaConf.to_container(cfg.scoring, resolve=True))
        if is_hosted(cfg.model):  # served over an API: prompting methods only (the plan)
            scorer = HostedScorer(loaded, scoring)
        else:
            scorer = Scorer(loaded, scoring, precision=cfg.hardware.precision)
    meter = scorer.loaded.meter if scorer else None

    def context(m: Method) -> MethodContext:
        return MethodContext(data=data, scorer=scorer, population_dir=run_dir.population(m.name))

    setup_cost = {method.name: setup(method, context(method), meter)}
    tracker = RunTracker.from_config(cfg, method.name, run_dir)
    ok = False
    try:
        tracker.hyperparams(cfg)
        tracker.population(method.name, method.population_curves())

        def evaluate(m: Method) -> list[ResultRow]:
            return evaluate_all(
                m,
                subjects,
                data.inventory,
                run_dir,
                save_artifacts=cfg.save_artifacts,
                tracker=tracker,
                meter=meter,
                evaluation=evaluation,
            )

        evaluation = (
            OmegaConf.to_container(cfg.evaluation, resolve=True) if "evaluation" in cfg else None
        )
        rows = {method.name: evaluate(method)}
        notes = method.notes(rows[method.name])
        method.teardown()
        for other in others:  # one at a time: each may change the shared model
            setup_cost[other.name] = setup(other, context(other), meter)
            tracker.population(other.name, other.population_curves())
            rows[other.name] = evaluate(other)
            notes += other.notes(rows[other.name])
            other.teardown()
        summary = summarize(
            cfg,
            method,
            model_name,
            data,
            subjects,
            rows,
            baseline_rows(data, subjects, run_dir),
            baseline_aggregates(data, data.subjects),
            notes,
            setup_cost,
        )
        report = write_outputs(run_dir, summary, rows)  # the plots from the files, checked
        tracker.summary(summary, [r for method_rows in rows.values() for r in method_rows], run_dir)
        print(report)
        log.info("Outputs in %s", run_dir.path)
        ok = True
        return summary
    finally:
        tracker.close(ok)
        if isinstance(scorer, HostedScorer):
            _log_hosted(scorer)
            scorer.loaded.close()


def _log_hosted(scorer: HostedScorer) -> None:
    """One line of what the hosted model cost this run."""
    c = scorer.loaded.meter.snapshot()
    log.info(
        "%s: %d requests sent (%d retries), %d answered from the cache; %d input + %d output "
        "tokens%s%s",
        scorer.loaded.name,
        c.requests,
        c.retries,
        c.cached,
        c.input_tokens,
        c.output_tokens,
        f", ${c.cost_usd:.4f}" if scorer.loaded.settings.priced else "",
        f"; {c.malformed} malformed and {c.cut_short} cut-short replies kept as unparseable"
        if c.malformed or c.cut_short
        else "",
    )
