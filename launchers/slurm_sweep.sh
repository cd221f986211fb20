#!/usr/bin/env bash
# Every method on a GPU model as Hydra multirun jobs on SLURM (submitit; resources in
# conf/hydra/launcher/slurm.yaml or as hydra.launcher.* overrides). The sweep table is written
# at the sweep root when all jobs are done.
#   launchers/slurm_sweep.sh [MODEL] [extra overrides...]
# An invalid MODEL (e.g. an override given in its place) fails in one line.
set -euo pipefail
cd "$(dirname "$0")/.."
USAGE='launchers/slurm_sweep.sh [MODEL] [extra overrides...]'
source launchers/_common.sh
MODEL=${1:-llama3_8b}
shift $(( $# > 0 ? 1 : 0 ))
need_model "$MODEL"
PY=${PY:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python)}
exec "$PY" -m palign -m hydra/launcher=slurm hardware=gpu model="$MODEL" \
  method=no_change,few_shot,personality_prompt,pas,dpo,ppo "$@"
