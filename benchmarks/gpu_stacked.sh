#!/usr/bin/env bash
# Stacked matching networks on a lent GPU (see the device tool's README), run from the repository root with medfdd's
# dependencies importable (PYTHON), Fashion-MNIST in $MEDFDD_FASHION_MNIST_DIR and results to $OUT:
#   1. timing, one process alone: a 12,000-record site, IPC 10, STEPS paid steps (default 1,000) at 256 real records
#      per class, INNER network evaluations per paid statistic (default 5, the GPU scale), at G = 1 and the larger
#      G_LIST statistics per synthetic update (stacked_networks.py: bank and update seconds, TFLOP/s; above G = 6 at
#      IPC 10 the G networks exceed the 1 GiB activation budget and each update embeds twice); the target is
#      <= 10 s for the whole run (>= 25 TFLOP/s), next to b1_central_gpu's 0.0743 s per paid step;
#   2. accuracy on the same bank (B1 central, IPC 10, eps 1, 1,000 paid steps, GPU scale otherwise) at G = 1 and
#      the ACC_G values, as parallel processes, each cut at ACC_S seconds: at G, the same network evaluations in G
#      times fewer updates (on a CPU, G = 4 lost about 2 points that way), and G times the evaluations in as many
#      updates as G = 1 (inner steps x G: what a GPU can afford, since G networks cost about one launch).
# One device call (at most 600 s): TIMING_S + ACC_S must fit in it.
# CPU smoke test (tiny): OUT=/tmp/gs STEPS=2 G_LIST="1 2" ACC_G=2 SN_ARGS="--site 600 --batch-per-class 8"
#   ACC_ARGS="--iterations 2 --eval-epochs 1 --evals 1 --batch-per-class 8" bash benchmarks/gpu_stacked.sh
set -u
OUT=${OUT:?set OUT}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
py=${PYTHON:-python3}
timeout "${TIMING_S:-240}" $py benchmarks/stacked_networks.py --g ${G_LIST:-1 4 6 16} --steps "${STEPS:-1000}" \
  --inner "${INNER:-5}" --out-dir "$OUT" --name stacked_networks_gpu ${SN_ARGS:-} \
  --note "one process alone on the GPU (gpu_stacked.sh)" 2>&1 | grep -v -i warn | tee "$OUT/stacked_networks_gpu.log"
acc() {  # name, then b1_central.py arguments
  local name=$1; shift
  timeout "${ACC_S:-300}" $py benchmarks/b1_central.py --scale gpu --ipc 10 --eps 1 --iterations 1000 --evals 2 \
    --out-dir "$OUT" --name "$name" "$@" ${ACC_ARGS:-} >"$OUT/$name.log" 2>&1 &
}
acc b1_central_gpu_stacked1 --networks-per-update 1
for g in ${ACC_G:-6 16}; do
  acc "b1_central_gpu_stacked$g" --networks-per-update "$g"
  acc "b1_central_gpu_stacked${g}_same_updates" --networks-per-update "$g" --inner-steps $((5 * g))
done
wait
grep -h -v -i warn "$OUT"/*.log | grep -E "accuracy|seconds|Error|error" | cut -c1-300
ls -la "$OUT"
