#!/usr/bin/env bash
# One shard of a sharded evaluation (what each SLURM array task or GPU process runs):
#   launchers/shard_job.sh OUT_DIR SHARD N_SHARDS [palign overrides...]
# Runs `python -m palign ... dataset.shard=SHARD/N_SHARDS` in OUT_DIR/shards/SHARD and resumes
# that dir when it already holds the shard's run, so a requeued or re-submitted job redoes at
# most the subject that was in flight.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$1 SHARD=$2 N=$3
shift 3
PY=${PY:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python)}
DIR="$OUT/shards/$SHARD"
RESUME=()
[[ -f "$DIR/config.yaml" ]] && RESUME=("resume=$DIR")
exec "$PY" -m palign "$@" "dataset.shard=$SHARD/$N" "hydra.run.dir=$DIR" ${RESUME[@]+"${RESUME[@]}"}
