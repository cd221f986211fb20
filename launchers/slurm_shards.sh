#!/usr/bin/env bash
# The selected subjects as a SLURM array of N shards, then a merge job once all succeeded:
#   launchers/slurm_shards.sh [--dry-run] OUT_DIR N_SHARDS [palign overrides...]
# e.g. launchers/slurm_shards.sh outputs/pas_8b 16 method=pas model=llama3_8b hardware=gpu
# Resources from the environment: PALIGN_SLURM_PARTITION (gpu), PALIGN_SLURM_ACCOUNT,
# PALIGN_SLURM_GPUS (1), PALIGN_SLURM_CPUS (8), PALIGN_SLURM_MEM (64G), PALIGN_SLURM_TIME
# (04:00:00), PALIGN_SLURM_STOP_S (600: seconds before the time limit at which a task stops at
# its next safe point and requeues itself, see shard_job.sh). Array tasks are requeueable
# (preemption, time limit) and resume their shard dir; a re-submission of the same command
# continues where the last one stopped. --dry-run prints the sbatch commands.
# Missing or invalid arguments fail in one line.
set -euo pipefail
cd "$(dirname "$0")/.."
USAGE='launchers/slurm_shards.sh [--dry-run] OUT_DIR N_SHARDS [palign overrides...]'
source launchers/_common.sh
DRY=0
[[ ${1:-} == --dry-run ]] && { DRY=1; shift; }
(( $# >= 2 )) || die "missing arguments: OUT_DIR and N_SHARDS are needed, got $#"
OUT=$1 N=$2
shift 2
need_out_dir "$OUT"
need_count N_SHARDS "$N"
STOP_S=${PALIGN_SLURM_STOP_S:-600}
need_count PALIGN_SLURM_STOP_S "$STOP_S"
# sbatch expands %-patterns in --output (%% is a literal %) and none at all after a backslash.
[[ $OUT != *\\* ]] || die "OUT_DIR must not contain a backslash (sbatch would not expand" \
  "%a in the log names), got $(shown "$OUT")"
LOGS="${OUT//%/%%}/logs"
PY=${PY:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python)}
ACCOUNT=${PALIGN_SLURM_ACCOUNT:+--account=$PALIGN_SLURM_ACCOUNT}
COMMON=(--partition="${PALIGN_SLURM_PARTITION:-gpu}" ${ACCOUNT:+"$ACCOUNT"})
SHARD=("${COMMON[@]}" --array="0-$((N - 1))" --requeue --job-name=palign-shard
  --gres="gpu:${PALIGN_SLURM_GPUS:-1}" --cpus-per-task="${PALIGN_SLURM_CPUS:-8}"
  --mem="${PALIGN_SLURM_MEM:-64G}" --time="${PALIGN_SLURM_TIME:-04:00:00}"
  --signal="B:USR1@$STOP_S" --output="$LOGS/shard-%a.out")
# The jobs run these strings with /bin/sh: every value in them is one quoted sh word (sh_word).
# exec: shard_job.sh becomes the batch shell, the process SLURM sends B:USR1 to.
ARGS=''
(( $# )) && ARGS=" $(sh_words "$@")"
SHARD_CMD="PY=$(sh_word "$PY"); export PY; exec launchers/shard_job.sh $(sh_word "$OUT")"
SHARD_CMD+=" \"\$SLURM_ARRAY_TASK_ID\" $N$ARGS"
MERGE=("${COMMON[@]}" --job-name=palign-merge --cpus-per-task=2 --mem=16G --time=00:30:00
  --output="$LOGS/merge.out")
MERGE_CMD="exec $(sh_word "$PY") -m palign.runs.merge"
MERGE_CMD+=" --out $(sh_word "$OUT/merged") $(sh_word "$OUT/shards")/*"
if (( DRY )); then
  printf 'sbatch --parsable'; printf ' %q' "${SHARD[@]}" "--wrap=$SHARD_CMD"; echo
  printf 'sbatch --dependency=afterok:<array job id>'; printf ' %q' "${MERGE[@]}" "--wrap=$MERGE_CMD"; echo
  exit 0
fi
mkdir -p -- "$OUT/logs"
JOB=$(sbatch --parsable "${SHARD[@]}" --wrap="$SHARD_CMD")
MERGE_JOB=$(sbatch --parsable --dependency="afterok:$JOB" "${MERGE[@]}" --wrap="$MERGE_CMD")
echo "submitted shards: array job $JOB (0-$((N - 1))), merge: job $MERGE_JOB -> $OUT/merged"
