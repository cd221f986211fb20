#!/usr/bin/env bash
# One shard of a sharded evaluation (what each SLURM array task or GPU process runs):
#   launchers/shard_job.sh OUT_DIR SHARD N_SHARDS [palign overrides...]
# Runs `python -m palign ... dataset.shard=SHARD/N_SHARDS` in OUT_DIR/shards/SHARD and resumes
# that dir when it already holds the shard's run, so a requeued or re-submitted job redoes at
# most the subject that was in flight. Missing or invalid arguments fail in one line.
# Stopping: SIGTERM and SIGINT (scancel, a preemption, Ctrl-C) reach the run itself, which stops
# at its next safe point; this script waits for it and exits with its status (143, 130). SIGUSR1,
# which slurm_shards.sh has SLURM send to this script alone before the time limit
# (--signal=B:USR1@...), stops the run the same way (SIGTERM) and then requeues this SLURM job
# (scontrol requeue), whose next start resumes the shard dir.
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
REQUEUE=0 RUN=''
trap 'REQUEUE=1; kill -TERM "$RUN" 2>/dev/null || true' USR1
trap : TERM INT  # the run got the signal too: wait for it to stop
"$PY" -m palign "$@" "dataset.shard=$SHARD/$N" "hydra.run.dir=$(hydra_value "$DIR")" \
  ${RESUME[@]+"${RESUME[@]}"} &
RUN=$!
STATUS=0
while kill -0 "$RUN" 2>/dev/null; do
  wait "$RUN" && STATUS=0 || STATUS=$?  # returns early when a trapped signal arrives
done
# The run has ended: its own status (the last wait may have been cut short by a signal; a bash
# that forgets a status once reported answers 127).
wait "$RUN" 2>/dev/null && STATUS=0 || { s=$?; (( s == 127 )) || STATUS=$s; }
if (( REQUEUE && STATUS == 143 )) && [[ -n ${SLURM_JOB_ID:-} ]]; then
  JOB=$SLURM_JOB_ID
  [[ -n ${SLURM_ARRAY_JOB_ID:-} ]] && JOB=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
  echo "shard_job.sh: shard $SHARD stopped before the time limit; requeueing job $JOB to resume" \
    "$(shown "$DIR")" >&2
  scontrol requeue "$JOB"
fi
exit "$STATUS"
