#!/usr/bin/env bash
# B1 federated + B2 on a lent GPU (see the device tool's README), run from the repository root with the carried
# wheels on PYTHONPATH and Fashion-MNIST in $MEDFDD_FASHION_MNIST_DIR; results (partial rows included) go to $OUT.
# Five processes share the GPU, all on the 60k-record splits (5 sites, IPC 10 per site, decoupled DP-DM with the
# evidence merge): alpha 0.5 at eps 1, 10 and inf; alpha 0.1 at eps 1; alpha 0.5 at eps 1 over 3 rounds (warm
# start). FED_STEPS paid steps per site and round (default 200) and FED_EPOCHS evaluation epochs (default 500) size
# the run to FED_BUDGET_S seconds; rows are written as they finish and a process cut off by the limit is finalized
# from them (b1_federated.py --finalize). Everything ends in $OUT/gpu_fed.tar.gz (the device returns at most 8 files).
set -u
OUT=${OUT:?set OUT}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
limit=${FED_BUDGET_S:-480}
steps=${FED_STEPS:-200}
epochs=${FED_EPOCHS:-500}
py=${PYTHON:-python3}
run() {  # name, then b1_federated.py arguments; a run cut off by the limit keeps its finished rows
  local name=$1; shift
  local args=(--scale gpu --iterations "$steps" --eval-epochs "$epochs" --out-dir "$OUT" --name "$name" "$@")
  ( timeout "$limit" $py benchmarks/b1_federated.py "${args[@]}" >"$OUT/$name.log" 2>&1 \
    || { [ -s "$OUT/$name.partial.jsonl" ] && $py benchmarks/b1_federated.py "${args[@]}" \
         --finalize "cut off at the ${limit} s device limit" >>"$OUT/$name.log" 2>&1; } ) &
}
run b1_federated_gpu_alpha0.5_eps1 --alpha 0.5 --eps 1 --rounds 1
run b1_federated_gpu_alpha0.5_eps10 --alpha 0.5 --eps 10 --rounds 1
run b1_federated_gpu_alpha0.5_nodp --alpha 0.5 --eps inf --rounds 1
run b1_federated_gpu_alpha0.1_eps1 --alpha 0.1 --eps 1 --rounds 1
run b1_federated_gpu_alpha0.5_r3 --alpha 0.5 --eps 1 --rounds 3 --evals 1
wait
grep -v -i warn "$OUT"/*.log | cut -c1-300
tar -C "$OUT" -czf /tmp/gpu_fed.tar.gz . && rm -f "$OUT"/* && mv /tmp/gpu_fed.tar.gz "$OUT"/
ls -la "$OUT"
