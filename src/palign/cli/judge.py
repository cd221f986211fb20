"""``palign judge RUN_DIR model=<judge model> [overrides]``: rate every open-ended reply of a
run made with ``evaluation=open_ended`` (:mod:`palign.eval.judge`, docs/judge.md).

The judge is a local model (``model=smollm2_135m``, ``tiny_llama``, ...: greedy generation
through palign's scorer, ``max_new_tokens`` tokens) or one served over an OpenAI-compatible API
(``model=openai``: :class:`~palign.models.hosted.HostedModel`, its response cache and its caps;
``max_tokens`` = ``max_new_tokens``). Writes ``judgments/<method>/<case>.csv`` and
``judgments/summary.json`` in the run dir, rewrites its ``report.md`` and ``report.html`` with the
judge's section and ``plots/judge_win_rates.png`` (:func:`palign.report.write.write_report`; a
run stopped before its summary has no report yet), and prints the section. SIGTERM or SIGINT
stops it at a safe point (exit 143 or 130); the hosted judge's replies already received are
cached, so running it again sends them no more.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from palign.errors import ConfigError, RunDirError, cli
from palign.eval.judge import judge_run, replies_of
from palign.models.hosted import check_api_key, check_client, hosted_settings, is_hosted
from palign.rundir import RunDir
from palign.stopping import stop_on_signals

log = logging.getLogger("palign")

USAGE = "usage: palign judge RUN_DIR model=<judge model config> [key=value ...]"


def compose_judge(overrides: Sequence[str]) -> DictConfig:
    """``conf/judge.yaml`` with ``overrides``; one :class:`ConfigError` line where Hydra cannot
    compose it (an unknown model, a key the config lacks)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from palign.config import compose

    try:
        return compose(list(overrides), config_name="judge")
    except (HydraException, OmegaConfBaseException) as e:
        reason = " ".join(str(e).split()).split(" Config search path:")[0]
        raise ConfigError(f"palign judge {' '.join(overrides)}: {reason}") from None


def local_judge(cfg: DictConfig):
    """A judge over a local model: greedy generation through palign's scorer."""
    from palign.config import build
    from palign.eval.scoring import Scorer, ScoringConfig

    loaded = build(cfg.model)
    scoring = ScoringConfig(
        mode="generate",
        generate_prefix="",
        max_new_tokens=int(cfg.max_new_tokens),
        batch_size=int(cfg.hardware.batch_size),
    )
    scorer = Scorer(loaded, scoring, precision=cfg.hardware.precision)

    def judge(requests):
        return [t.strip() for t in scorer.generate(requests, desc=f"judge {len(requests)}")]

    return loaded.name, judge, lambda: None


def hosted_judge(cfg: DictConfig):
    """A judge served over an OpenAI-compatible API (cached, capped; ``max_tokens`` =
    ``max_new_tokens``; a malformed reply is an empty, unparseable judgment)."""
    from palign.config import build

    check_client()
    check_api_key(hosted_settings(OmegaConf.to_container(cfg.model, resolve=True)))
    model = build(cfg.model)
    model.settings = replace(model.settings, max_tokens=int(cfg.max_new_tokens))

    def judge(requests):
        messages = [
            [{"role": "system", "content": s}, {"role": "user", "content": u}] for s, u in requests
        ]
        replies = model.complete_all(messages, desc=f"judge {len(messages)}")
        c = model.meter.snapshot()
        log.info(
            "%s: %d requests sent, %d answered from the cache", model.name, c.requests, c.cached
        )
        return [r.text for r in replies]

    return model.name, judge, model.close


def main(argv: Sequence[str] | None = None) -> int:
    from palign.report.judge import judge_section
    from palign.report.write import write_report

    argv = list(sys.argv[1:] if argv is None else argv)
    with cli("palign judge"), stop_on_signals():
        if not argv or "=" in argv[0] or argv[0].startswith("-"):
            raise ConfigError(USAGE)
        run_dir = RunDir(Path(argv[0]))
        if not run_dir.path.is_dir():
            raise RunDirError(f"{run_dir.path}: no such folder", USAGE)
        replies_of(run_dir)  # before a model is loaded: a run without replies is one line
        cfg = compose_judge(argv[1:])
        for key in ("max_new_tokens", "n_boot"):
            if not isinstance(cfg[key], int) or cfg[key] < 1:
                raise ConfigError(f"{key}={cfg[key]!r} must be an integer >= 1")
        if not 0 < float(cfg.level) < 1:
            raise ConfigError(f"level={cfg.level!r} must be between 0 and 1")
        run_dir.check_writable()
        with run_dir.lock():
            name, judge, close = hosted_judge(cfg) if is_hosted(cfg.model) else local_judge(cfg)
            try:
                summary = judge_run(
                    run_dir, judge, name, int(cfg.seed), int(cfg.n_boot), float(cfg.level)
                )
            finally:
                close()
            if run_dir.summary.is_file():  # report.md and report.html, the section added
                write_report(run_dir)
            else:
                log.info("%s: no summary.json (an unfinished run): no report.md to add the "
                         "judge's section to; it is printed below", run_dir.path)  # fmt: skip
    print(judge_section(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
