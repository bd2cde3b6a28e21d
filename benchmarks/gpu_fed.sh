#!/usr/bin/env bash
# B1 federated + B2 on a lent GPU (see the device tool's README), run from the repository root with the carried
# wheels on PYTHONPATH and Fashion-MNIST in $MEDFDD_FASHION_MNIST_DIR; results (partial rows included) go to $OUT.
# Five processes share the GPU, all on the 60k-record splits (5 sites, IPC 10 per site, decoupled DP-DM with the
# evidence merge): alpha 0.5 at eps 1, 10 and inf; alpha 0.1 at eps 1; alpha 0.5 at eps 1 over 3 rounds (warm
# start). FED_STEPS paid steps per site (default 300) and FED_EPOCHS evaluation epochs (default 500) size the run
# to FED_BUDGET_S seconds; rows are written as they finish (b1_federated.py --finalize keeps them after a timeout).
set -u
OUT=${OUT:?set OUT}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
limit=${FED_BUDGET_S:-480}
steps=${FED_STEPS:-300}
epochs=${FED_EPOCHS:-500}
py=${PYTHON:-python3}
run() {  # name, then b1_federated.py arguments
  local name=$1; shift
  timeout "$limit" $py benchmarks/b1_federated.py --scale gpu --iterations "$steps" --eval-epochs "$epochs" \
    --out-dir "$OUT" --name "$name" "$@" >"$OUT/$name.log" 2>&1 &
}
run b1_federated_gpu_alpha0.5_eps1 --alpha 0.5 --eps 1 --rounds 1
run b1_federated_gpu_alpha0.5_eps10 --alpha 0.5 --eps 10 --rounds 1
run b1_federated_gpu_alpha0.5_nodp --alpha 0.5 --eps inf --rounds 1
run b1_federated_gpu_alpha0.1_eps1 --alpha 0.1 --eps 1 --rounds 1
run b1_federated_gpu_alpha0.5_r3 --alpha 0.5 --eps 1 --rounds 3 --evals 1
wait
grep -h -v -i warn "$OUT"/*.log | cut -c1-300
ls -la "$OUT"
