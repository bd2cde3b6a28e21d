#!/usr/bin/env bash
# B1 central at GPU scale on a lent GPU machine (see the device tool's README): run from the repository root, with
# the carried wheels already installed on PYTHONPATH, Fashion-MNIST in $MEDFDD_FASHION_MNIST_DIR and results to $OUT.
#   1. isolated profile: FLOPs, s/iteration and GPU memory of one DP step per IPC, one process alone on the GPU;
#   2. the 9 configurations (IPC 1/10/50 x eps 1/10/inf) as 9 processes at once, each sized to end by the deadline;
#   3. merge into $OUT/b1_central_gpu.json (the format of benchmarks/common.write_result).
# Env: B1_BUDGET_S (seconds from start until every worker must be done; default 450), MEDFDD_COMMIT; for a CPU smoke
# test: B1_IPCS, B1_EPS (lists), B1_PROFILE_ARGS, B1_WORKER_ARGS (extra arguments), PYTHON; B1_ABLATION="IPC:EPS"
# adds one worker with the interleaved schedule at that configuration (same sizes as its IPC's decoupled rows).
set -u
OUT=${OUT:?set OUT}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
start=$(date +%s)
deadline=$((start + ${B1_BUDGET_S:-450}))
py=${PYTHON:-python3}
log=$OUT/b1_gpu.log

ipcs=${B1_IPCS:-1 10 50}
epss=${B1_EPS:-1 10 inf}
workers=$(( $(wc -w <<<"$ipcs") * $(wc -w <<<"$epss") ))
ablation=${B1_ABLATION:-}
[ -n "$ablation" ] && workers=$((workers + 1))
timeout 100 $py benchmarks/b1_central.py --profile 20 --scale gpu --ipc $ipcs --out-dir "$OUT" \
  --name b1_central_gpu_profile ${B1_PROFILE_ARGS:-} 2>&1 | grep -v -i warn | tee -a "$log"

rm -rf /tmp/b1_sync
phase_start=$(date +%s)
pids=()
for ipc in $ipcs; do
  for eps in $epss; do
    timeout $((deadline + 25 - $(date +%s))) $py benchmarks/b1_gpu_parallel.py worker --ipc $ipc --eps $eps \
      --deadline $deadline --workers $workers --sync-dir /tmp/b1_sync --jsonl "$OUT/b1_central_gpu_rows.jsonl" \
      ${B1_WORKER_ARGS:-} >>"$log" 2>&1 &
    pids+=($!)
  done
done
if [ -n "$ablation" ]; then
  timeout $((deadline + 25 - $(date +%s))) $py benchmarks/b1_gpu_parallel.py worker --ipc ${ablation%%:*} \
    --eps ${ablation##*:} --schedule interleaved --deadline $deadline --workers $workers --sync-dir /tmp/b1_sync \
    --jsonl "$OUT/b1_central_gpu_rows.jsonl" ${B1_WORKER_ARGS:-} >>"$log" 2>&1 &
  pids+=($!)
fi
i=0
while sleep 3; do
  n=$(jobs -r | wc -l); [ "$n" -eq 0 ] && break
  i=$((i + 1)); [ $((i % 10)) -eq 0 ] && echo "t+$(($(date +%s) - start)) s: $n workers running, $(cat "$OUT/b1_central_gpu_rows.jsonl" 2>/dev/null | wc -l) rows; $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>&1)"
done
wait "${pids[@]}"
phase=$(($(date +%s) - phase_start))
grep -v -i warn "$log" | grep "^\[" || true
$py benchmarks/b1_gpu_parallel.py merge --jsonl "$OUT/b1_central_gpu_rows.jsonl" \
  --profile "$OUT/b1_central_gpu_profile.json" --out-dir "$OUT" --phase-seconds $phase --workers $workers
$py benchmarks/b1_gpu_parallel.py summary "$OUT/b1_central_gpu.json"
echo "total $(($(date +%s) - start)) s"
