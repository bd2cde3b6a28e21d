#!/usr/bin/env bash
# B1 federated + B2 on a lent GPU (see the device tool's README), run from the repository root with the carried
# wheels on PYTHONPATH and Fashion-MNIST in $MEDFDD_FASHION_MNIST_DIR; results (partial rows included) go to $OUT.
# Three processes share the GPU: the CPU-scale config (10k training images) at 1 round for eps 1/10/inf; 3 rounds at
# eps 1 with the baselines; and all 60k records at eps 1 (200 steps, 500 evaluation epochs).
set -u
OUT=${OUT:?set OUT}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
limit=${FED_BUDGET_S:-200}
py=${PYTHON:-python3}
timeout "$limit" $py benchmarks/b1_federated.py --eps 1 10 inf --rounds 1 --out-dir "$OUT" \
  --name b1_federated_cpuscale_gpu_r1 >"$OUT/fed_r1.log" 2>&1 &
timeout "$limit" $py benchmarks/b1_federated.py --eps 1 --rounds 3 --baselines --baseline-eps 1 --out-dir "$OUT" \
  --name b1_federated_cpuscale_gpu_r3 >"$OUT/fed_r3.log" 2>&1 &
timeout "$limit" $py benchmarks/b1_federated.py --scale gpu --iterations 200 --eval-epochs 500 --eps 1 --rounds 1 \
  --out-dir "$OUT" --name b1_federated_full60k_gpu_r1 >"$OUT/fed_full.log" 2>&1 &
wait
grep -h -v -i warn "$OUT"/fed_*.log | cut -c1-300
ls -la "$OUT"
