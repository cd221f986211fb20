#!/usr/bin/env bash
# Compare methods on one machine with a Hydra multirun (one job per method, run one after another).
#   launchers/local_sweep.sh [MODEL] [N_SUBJECTS] [extra Hydra overrides...]
# Example: launchers/local_sweep.sh smollm2_135m 5 hardware=cpu
# N_SUBJECTS: a positive integer, or null for all. Invalid arguments fail in one line.
set -euo pipefail
cd "$(dirname "$0")/.."
USAGE='launchers/local_sweep.sh [MODEL] [N_SUBJECTS] [extra Hydra overrides...]'
source launchers/_common.sh
MODEL=${1:-smollm2_135m}
N=${2:-5}
shift $(( $# > 2 ? 2 : $# ))
need_model "$MODEL"
[[ $N == null ]] || need_count N_SUBJECTS "$N"
PY=${PY:-.venv/bin/python}
exec "$PY" -m palign -m method=no_change,few_shot,personality_prompt model="$MODEL" dataset.limit="$N" "$@"
