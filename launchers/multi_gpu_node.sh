#!/usr/bin/env bash
# All subjects on one multi-GPU node: one shard per GPU in parallel, then the merge.
#   launchers/multi_gpu_node.sh OUT_DIR [palign overrides...]
# e.g. launchers/multi_gpu_node.sh outputs/pas_8b method=pas model=llama3_8b hardware=gpu
# GPUs: $PALIGN_GPUS, else the count nvidia-smi lists. Logs in OUT_DIR/logs/, the merged run in
# OUT_DIR/merged. Re-running the same command resumes every shard. Missing or invalid arguments
# fail in one line.
set -euo pipefail
cd "$(dirname "$0")/.."
USAGE='launchers/multi_gpu_node.sh OUT_DIR [palign overrides...]'
source launchers/_common.sh
(( $# >= 1 )) || die "missing OUT_DIR"
OUT=$1
shift
need_out_dir "$OUT"
PY=${PY:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python)}
if [[ -n ${PALIGN_GPUS:-} ]]; then
  need_count PALIGN_GPUS "$PALIGN_GPUS"
  N=$PALIGN_GPUS
else
  N=$(nvidia-smi -L 2>/dev/null | wc -l || true)  # no nvidia-smi: 0
  N=${N//[[:space:]]/}
fi
(( N > 0 )) || { echo "multi_gpu_node.sh: no GPU found (set PALIGN_GPUS)" >&2; exit 2; }
mkdir -p -- "$OUT/logs"
pids=()
for (( i = 0; i < N; i++ )); do
  CUDA_VISIBLE_DEVICES=$i PY=$PY launchers/shard_job.sh "$OUT" "$i" "$N" "$@" \
    > "$OUT/logs/shard-$i.log" 2>&1 &
  pids+=($!)
done
failed=()
for (( i = 0; i < N; i++ )); do
  wait "${pids[$i]}" || failed+=("$i")
done
if (( ${#failed[@]} )); then
  echo "multi_gpu_node.sh: shard(s) ${failed[*]} failed; see $OUT/logs/ and re-run to resume" >&2
  exit 1
fi
exec "$PY" -m palign.runs.merge --out "$OUT/merged" "$OUT"/shards/*
