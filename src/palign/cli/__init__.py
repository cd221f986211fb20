"""The ``palign`` command: a run, or one of the other commands.

palign [overrides]                  a run (as ``python -m palign``)
palign generate [overrides]         replies with and without a profile or adapter
palign judge RUN_DIR model=M [...]  rate a run's open-ended replies with a judge model
palign merge --out DIR SHARDS...    sharded run dirs into one
palign reproduce --out DIR RUNS...  Table 1 from finished runs
palign sweep SWEEP_DIR              a sweep's table
palign data check [PAPI_DIR]        which response coding the PAPI files use
palign data fetch [--dir DIR]       download the PAPI files (sha256 checked, resumable)
palign settings [method=NAME ...]   a method's settings: type, value, default, help
"""

from __future__ import annotations

import importlib
import sys

#: Command -> the module whose ``main`` runs it (argv without the command).
COMMANDS = {
    "generate": "palign.cli.generate",
    "judge": "palign.cli.judge",
    "merge": "palign.runs.merge",
    "reproduce": "palign.report.reproduce",
    "sweep": "palign.runs.sweep",
    "export": "palign.cli.export",
    "data check": "palign.data.check",
    "data fetch": "palign.data.fetch",
    "settings": "palign.config.describe",
}
#: Commands that are Hydra apps: they read ``sys.argv`` themselves.
HYDRA_APPS = ("generate",)


def main() -> None:
    argv = sys.argv[1:]
    if argv[:1] == ["data"]:
        if argv[1:2] not in (["check"], ["fetch"]):
            sys.exit(
                "palign data: error: expected `palign data check [PAPI_DIR]` or `palign data fetch`"
            )
        argv = [f"data {argv[1]}", *argv[2:]]
    if not argv or argv[0] not in COMMANDS:
        from palign.cli.run import main as run_main

        run_main()
        return
    command, rest = argv[0], argv[1:]
    module = importlib.import_module(COMMANDS[command])
    if command in HYDRA_APPS:
        sys.argv = [f"palign {command}", *rest]
        module.main()
        return
    result = module.main(rest)
    if isinstance(result, int) and result:
        sys.exit(result)


if __name__ == "__main__":
    main()
