#!/usr/bin/env bash
# One shard of a sharded evaluation (what each SLURM array task or GPU process runs):
#   launchers/shard_job.sh OUT_DIR SHARD N_SHARDS [palign overrides...]
# Runs `python -m palign ... dataset.shard=SHARD/N_SHARDS` in OUT_DIR/shards/SHARD and resumes
# that dir when it already holds the shard's run, so a requeued or re-submitted job redoes at
# most the subject that was in flight. Missing or invalid arguments fail in one line.
set -euo pipefail
cd "$(dirname "$0")/.."
USAGE='launchers/shard_job.sh OUT_DIR SHARD N_SHARDS [palign overrides...]'
source launchers/_common.sh
(( $# >= 3 )) || die "missing arguments: OUT_DIR, SHARD and N_SHARDS are needed, got $#"
OUT=$1 SHARD=$2 N=$3
shift 3
need_out_dir "$OUT"
need_count N_SHARDS "$N"
if ! [[ $SHARD =~ ^(0|[123456789][0123456789]{0,5})$ ]] || (( SHARD >= N )); then
  die "SHARD must be an integer from 0 to $((N - 1)), got $(shown "$SHARD")"
fi
PY=${PY:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python)}
DIR="$OUT/shards/$SHARD"
# The dir goes into Hydra overrides: quoted for Hydra's grammar, so that it is read back exactly.
RESUME=()
[[ -f "$DIR/config.yaml" ]] && RESUME=("resume=$(hydra_value "$DIR")")
exec "$PY" -m palign "$@" "dataset.shard=$SHARD/$N" "hydra.run.dir=$(hydra_value "$DIR")" \
  ${RESUME[@]+"${RESUME[@]}"}
