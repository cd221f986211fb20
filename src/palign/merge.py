"""Merge the run dirs of a sharded evaluation (``dataset.shard=i/N`` array jobs) into one run
dir with the summary and report of the whole selection:

    python -m palign.merge --out outputs/<name>/merged outputs/<name>/shards/*

The shards must share their config except ``dataset.shard`` (and where/how they logged); every
subject of the unsharded selection must be finished in some shard (re-run a failed shard with
``resume=<its dir>``). The merged summary equals that of one unsharded run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from palign.data.papi import load_papi
from palign.eval.answers import answers_path
from palign.methods.base import ConfigError
from palign.report import aggregate
from palign.run import (
    RESUME_FREE_KEYS,
    USER_ERRORS,
    baseline_rows,
    build,
    config_differences,
    finished_rows,
    method_config,
    select,
    summarize,
    write_atomic,
    write_outputs,
)


def _load_config(run_dir: Path) -> DictConfig:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: not a palign run dir (no config.yaml)")
    return OmegaConf.load(path)


def merge(shard_dirs: list[Path], out_dir: Path) -> dict:
    """Merge ``shard_dirs`` into ``out_dir`` (results, answers, summary.json, report.md, and
    links to the shards' artifact folders); returns the summary."""
    if not shard_dirs:
        raise ConfigError("merge: no shard run dirs given")
    configs = [_load_config(d) for d in shard_dirs]
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
    data = load_papi(cfg.dataset.root, coding=cfg.protocol.coding)
    subjects = select(cfg, data)
    method = build(cfg.method)
    names = [method.name] + [build(method_config(cfg, n)).name for n in cfg.get("compare") or []]
    rows = {}
    for name in names:
        found, shard_of = {}, {}
        for d in shard_dirs:
            rows_here = finished_rows(d / "results" / name)
            found.update(rows_here)
            shard_of.update(dict.fromkeys(rows_here, d))
        missing = [s.case for s in subjects if s.case not in found]
        if missing:
            raise ConfigError(
                f"merge: {len(missing)} subject(s) of {name} are in no shard's results: "
                f"{missing[:10]}{' ...' if len(missing) > 10 else ''} (re-run their shard "
                "with resume=<its run dir>)"
            )
        rows[name] = [found[s.case] for s in subjects]
        for row in rows[name]:
            answers = answers_path(shard_of[row["case"]], name, row["case"])
            if not answers.is_file():
                raise ConfigError(f"merge: {answers} is missing (the subject's answers)")
            write_atomic(answers_path(out_dir, name, row["case"]), answers.read_text())
            write_atomic(out_dir / "results" / name / f"{row['case']}.json", json.dumps(row))
    models = {
        json.loads((d / "summary.json").read_text())["model"]
        for d in shard_dirs
        if (d / "summary.json").is_file()
    }
    model_name = models.pop() if len(models) == 1 else cfg.model.name
    compare = {name: aggregate(rows[name]) for name in names[1:]}
    summary = summarize(
        cfg,
        method,
        model_name,
        data,
        subjects,
        rows[method.name],
        compare,
        baseline_rows(data, subjects, out_dir / "answers"),
    )
    summary["merged_from"] = [str(d) for d in shard_dirs]
    write_atomic(out_dir / "config.yaml", OmegaConf.to_yaml(cfg))
    for d in shard_dirs:  # artifacts stay in the shards (adapters are large): linked
        for folder in sorted(d.glob("artifacts/*/*")):
            link = out_dir / folder.relative_to(d)
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(folder.resolve(), target_is_directory=True)
    print(write_outputs(out_dir, summary, rows))
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m palign.merge", description="Merge sharded palign run dirs into one."
    )
    parser.add_argument("--out", type=Path, required=True, help="the merged run dir (created)")
    parser.add_argument("shards", type=Path, nargs="+", help="the shards' run dirs")
    args = parser.parse_args(argv)
    try:
        merge(args.shards, args.out)
    except USER_ERRORS as e:
        sys.exit(f"palign.merge: error: {e}")
    print(f"Merged {len(args.shards)} shard(s) into {args.out}")


if __name__ == "__main__":
    main()
