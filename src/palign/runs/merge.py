"""Merge the run dirs of a sharded evaluation (``dataset.shard=i/N`` array jobs) into one run
dir with the summary and report of the whole selection:

    python -m palign.runs.merge --out outputs/<name>/merged outputs/<name>/shards/*

The shards must share their config except ``dataset.shard`` (and where/how they logged); every
subject of the unsharded selection must be finished in some shard (re-run a failed shard with
``resume=<its dir>``). The merged summary equals that of one unsharded run.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from omegaconf import OmegaConf, open_dict

from palign.config import plan
from palign.errors import ConfigError, RunDirError, cli
from palign.eval.records import Summary
from palign.rundir import RESUME_FREE_KEYS, RunDir, config_differences, write_atomic
from palign.runs.runner import baseline_aggregates, baseline_rows
from palign.runs.summary import summarize, write_outputs

log = logging.getLogger("palign")


def merge(shard_dirs: list[Path], out_dir: Path) -> Summary:
    """Merge ``shard_dirs`` into ``out_dir`` (results, answers, open-ended replies, summary.json,
    report.md, plots, report.html, and relative links to the shards' artifact folders); returns
    the summary. ``out_dir`` is a new
    folder, or an earlier merge of the same shard dirs (all of its content comes from them:
    merging again after more shards finished loses nothing). Only palign's own ``_target_``
    classes are built from the shards' configs."""
    if not shard_dirs:
        raise ConfigError("merge: no shard run dirs given")
    out = RunDir(out_dir)
    shards = [RunDir(d) for d in shard_dirs]
    if out.path.exists() and (not out.path.is_dir() or any(out.path.iterdir())):
        earlier = out.read_summary().merged_from if out.summary.is_file() else None
        if earlier != [str(d) for d in shard_dirs]:
            raise RunDirError(
                f"merge --out {out_dir}: already exists and is not an earlier merge of these "
                "shards; merge never overwrites anything else",
                "choose a new folder for the merged run",
            )
        log.info("%s: an earlier merge of the same shards, merged again", out_dir)
    out.check_writable()
    configs = [shard.read_config() for shard in shards]
    ignore = (*RESUME_FREE_KEYS, "dataset.shard")
    for d, c in zip(shard_dirs[1:], configs[1:]):
        diff = config_differences(configs[0], c, ignore)
        if diff:
            raise ConfigError(
                f"merge: {d} was run with another config than {shard_dirs[0]} "
                f"(differs at {', '.join(diff[:8])})"
            )
    cfg = configs[0]
    with open_dict(cfg):
        cfg.dataset.shard = None
    checked = plan(cfg, check_hardware=False)  # no model: the shards' rows are merged
    data, subjects, method = checked.data, checked.subjects, checked.method
    names = [m.name for m in checked.methods]
    rows = {}
    for name in names:
        found, shard_of = {}, {}
        for shard in shards:
            rows_here = shard.finished_rows(name)
            found.update(rows_here)
            shard_of.update(dict.fromkeys(rows_here, shard))
        missing = [s.case for s in subjects if s.case not in found]
        if missing:
            raise ConfigError(
                f"merge: {len(missing)} subject(s) of {name} are in no shard's results: "
                f"{missing[:10]}{' ...' if len(missing) > 10 else ''} (re-run their shard "
                "with resume=<its run dir>)"
            )
        rows[name] = [found[s.case] for s in subjects]
        for row in rows[name]:
            answers = shard_of[row.case].answers_file(name, row.case)
            if not answers.is_file():
                raise RunDirError(f"merge: {answers} is missing (the subject's answers)")
            write_atomic(out.answers_file(name, row.case), answers.read_text())
            replies = shard_of[row.case].replies_file(name, row.case)
            if replies.is_file():  # evaluation=open_ended
                write_atomic(out.replies_file(name, row.case), replies.read_text())
            out.write_row(row)
    models = {shard.read_summary().model for shard in shards if shard.summary.is_file()}
    model_name = models.pop() if len(models) == 1 else cfg.model.name
    summary = summarize(
        cfg,
        method,
        model_name,
        data,
        subjects,
        rows,
        baseline_rows(data, subjects, out),
        baseline_aggregates(data, data.subjects),
    )
    summary.merged_from = [str(d) for d in shard_dirs]
    write_atomic(out.config, OmegaConf.to_yaml(cfg))
    for shard in shards:  # artifacts stay in the shards (adapters are large): linked
        for folder in shard.artifact_folders():
            out.link(folder, out.artifacts(folder.parent.name) / folder.name)
    print(write_outputs(out, summary, rows))
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m palign.runs.merge", description="Merge sharded palign run dirs into one."
    )
    parser.add_argument("--out", type=Path, required=True, help="the merged run dir (created)")
    parser.add_argument("shards", type=Path, nargs="+", help="the shards' run dirs")
    args = parser.parse_args(argv)
    with cli("palign merge"):
        merge(args.shards, args.out)
    print(f"Merged {len(args.shards)} shard(s) into {args.out}")


if __name__ == "__main__":
    main()
