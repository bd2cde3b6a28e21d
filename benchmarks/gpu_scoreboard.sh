#!/usr/bin/env bash
# The utility scoreboard's missing runs on a lent GPU (see the device tool's README), run from the repository root
# with medfdd's dependencies importable (PYTHON), Fashion-MNIST in $MEDFDD_FASHION_MNIST_DIR and results to $OUT.
# Every run is the product's default configuration (`b1_federated.py` at its default CPU-scale settings, i.e. the
# site and coordinator config defaults, 3 rounds), only on the GPU: the scoreboard cells at 5 sites, all 60,000
# records, split seed 0 (alpha 0.1 and 0.5 x epsilon 1, 4, 10 per site), each over the noise draws DM_SEEDS, then the
# second split (seed 1) at alpha 0.5 epsilon 1, then DP-FedAvg at epsilon 4 (its tuned setting, 3 seeds), then the
# ceiling of the one-shot mode (CEILING=1: non-private at the default, with 1,000 paid steps per round of 256 per class,
# and at 50 images per class; epsilon 1 at 50 images per class, free in privacy: the same paid statistics), then
# factorised slots at alpha 0.5 (FACTOR=1: `--factor 2` at epsilon 1 and non-private, post-processing), then 5 rounds
# of 20 paid steps at alpha 0.5 epsilon 1 (ROUNDS5=1: 100 paid steps, the default 3 x 34 = 102), then hybrid
# mode at epsilon 10 and 4 (HYBRID=1, HYBRID_EPS: b4_hybrid.py, 3 distillation rounds planned for epsilon 1, 20
# DP-FedAvg rounds at width 32 with the rest: the setting of docs/benchmarks.md#hybrid-mode) on both splits over the
# same noise draws.
# JOBS processes share the GPU; each run is cut at BUDGET_S and finalized from its finished rounds (`--finalize`).
# Everything ends in $OUT/gpu_scoreboard.tar.gz (the device returns a few files only).
# Everything is ~44 runs: one device call (at most 600 s) holds about JOBS x 600 / BUDGET_S of them, so pick a
# subset per call, e.g. CELLS="0.5:1" SPLIT2=0 FEDAVG=0 HYBRID_EPS=10 (3 + 6 runs).
# CPU smoke test (tiny): OUT=/tmp/sb SB_ARGS="--max-per-class 60 --iterations 2 --eval-epochs 2" CELLS="0.5:1"
#   DM_SEEDS=0 FEDAVG=0 SPLIT2=0 bash benchmarks/gpu_scoreboard.sh
set -u
OUT=${OUT:?set OUT}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
py=${PYTHON:-python3}
budget=${BUDGET_S:-500}
jobs=${JOBS:-8}
cells=${CELLS:-"0.5:1 0.5:4 0.5:10 0.1:1 0.1:4 0.1:10"}
seeds=${DM_SEEDS:-"0 1000 2000"}
extra=${SB_ARGS:-}

queue=()
for cell in $cells; do
  for s in $seeds; do
    queue+=("sb_alpha${cell%%:*}_eps${cell##*:}_dm${s} --alpha ${cell%%:*} --eps ${cell##*:} --dm-seed $s")
  done
done
if [ "${SPLIT2:-1}" = 1 ]; then
  for s in $seeds; do queue+=("sb_split1_alpha0.5_eps1_dm${s} --seed 1 --alpha 0.5 --eps 1 --dm-seed $s"); done
fi
if [ "${FEDAVG:-1}" = 1 ]; then  # the tuned DP-FedAvg setting of benchmarks/results (width 32, lr 0.2, batch 256)
  for a in 0.5 0.1; do
    queue+=("sb_dpfedavg_alpha${a}_eps4 --alpha $a --eps 4 --skip-dm --baselines fedavg --baseline-eps 4
             --fedavg-rounds 20 --fedavg-lr 0.2 --fedavg-batch 256 --fedavg-width 32 --fedavg-seeds 0 1 2")
  done
fi

if [ "${CEILING:-1}" = 1 ]; then  # the non-private one-shot target (>= 87 %): the default, then more updates and images
  queue+=("sb_ceiling_alpha0.5_nodp_default --alpha 0.5 --eps inf")
  queue+=("sb_ceiling_alpha0.5_nodp_i1000_b256 --alpha 0.5 --eps inf --iterations 1000 --batch-per-class 256")
  queue+=("sb_ceiling_alpha0.5_nodp_ipc50_i1000_b256 --alpha 0.5 --eps inf --ipc 50 --iterations 1000 --batch-per-class 256")
  queue+=("sb_ceiling_alpha0.5_eps1_ipc50 --alpha 0.5 --eps 1 --ipc 50")
fi

if [ "${FACTOR:-1}" = 1 ]; then  # factorised slots (b6_factorised, 2 x 2 tiles: 4 decoded images per stored image)
  queue+=("sb_factor2_alpha0.5_eps1_dm0 --alpha 0.5 --eps 1 --factor 2 --dm-seed 0")
  queue+=("sb_factor2_alpha0.5_nodp --alpha 0.5 --eps inf --factor 2")
fi

if [ "${ROUNDS5:-1}" = 1 ]; then  # 100 paid steps as 5 rounds of 20 (default 3 x 34): the global model trains on a larger
  # union of released sets (post-processing), each round's sites match through a better model
  for s in $seeds; do queue+=("sb_rounds5_alpha0.5_eps1_dm${s} --alpha 0.5 --eps 1 --rounds 5 --iterations 20 --dm-seed $s"); done
fi

if [ "${HYBRID:-1}" = 1 ]; then  # the distillation keeps epsilon 1 (share = 1 - 1 / eps), fine-tuning the rest
  for e in ${HYBRID_EPS:-10 4}; do
    share=$(awk -v e="$e" 'BEGIN { print 1 - 1 / e }')
    for a in 0.5 0.1; do
      for s in $seeds; do
        queue+=("hybrid:sb_hybrid_alpha${a}_eps${e}_dm${s} --alpha $a --eps $e --share $share --distill-rounds 3
                 --finetune-rounds 20 --width 32 --dm-seed $s")
      done
    done
  done
fi

hybrid() {  # name, then b4_hybrid.py arguments (its rows are kept in NAME.partial.jsonl as they finish)
  local name=$1; shift
  timeout "$budget" $py benchmarks/b4_hybrid.py --out-dir "$OUT" --name "$name" --save-merged "$OUT/merged_$name" \
    "$@" >"$OUT/$name.log" 2>&1
  rm -rf "$OUT/merged_$name"  # its offers and merged sets: not results
}

run() {  # name, then b1_federated.py arguments; a run cut off by the budget keeps its finished rounds
  local name=$1; shift
  case $name in hybrid:*) hybrid "${name#hybrid:}" "$@"; return ;; esac
  local args=(--rounds 3 --evals 1 --out-dir "$OUT" --name "$name" "$@" $extra)  # SB_ARGS last: a smoke test overrides
  timeout "$budget" $py benchmarks/b1_federated.py "${args[@]}" >"$OUT/$name.log" 2>&1 \
    || { [ -s "$OUT/$name.partial.jsonl" ] && $py benchmarks/b1_federated.py "${args[@]}" \
         --finalize "cut off at the ${budget} s device budget" >>"$OUT/$name.log" 2>&1; }
}

for job in "${queue[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n; done
  # shellcheck disable=SC2086
  run $job &
done
wait
grep -h -v -i warn "$OUT"/*.log | grep -E "accuracy|Error|error" | cut -c1-200
tar -C "$OUT" -czf /tmp/gpu_scoreboard.tar.gz . && rm -f "$OUT"/* && mv /tmp/gpu_scoreboard.tar.gz "$OUT"/
ls -la "$OUT"
