#!/usr/bin/env bash
# A change against an older commit on the same machine, interleaved (head, base, head, base, ...): timings
# of different lent machines do not compare. Before sending, unpack the older commit's code beside the
# checkout (an untracked folder travels with the working tree; delete it afterwards):
#   mkdir -p baseline && git archive REV ssd bench | tar -x -C baseline
# then, on the lent machine (carry .kernel_cache; KERNEL_CACHE_IN / COMPILE_CACHE_IN as for the suites):
#   scripts/gpu/ab_baseline.sh OUT_DIR baseline REPEATS python bench/draft_round_bench.py ... --out {out}
# runs the command REPEATS times in each tree, {out} replaced by OUT_DIR/head_I.json or base_I.json
# (logs beside them); prints the result lines ("batch" / errors) of each run.
set -uo pipefail
out=${1:?output dir}; base=$(cd "${2:?baseline folder}" && pwd); repeats=${3:?repeats}; shift 3
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
source "$(dirname "$0")/caches.sh"
nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null
head=$PWD
run() {  # run NAME DIR
  local argv=("${@:3}"); argv=("${argv[@]//\{out\}/$out/$1.json}")
  (cd "$2" && PYTHONPATH=$PWD timeout "${RUN_S:-250}" "${argv[@]}" > "$out/$1.log" 2>&1)
  local status=$?
  grep -E "batch|Error|error" "$out/$1.log" | cut -c1-700 | sed "s/^/[$1] /"
  # a fresh machine measures every kernel choice first (minutes): say so rather than print nothing
  [ $status -ne 124 ] || echo "[$1] killed after RUN_S=${RUN_S:-250} s (measuring kernel choices? raise RUN_S)"
}
for i in $(seq "$repeats"); do run "head_$i" "$head" "$@"; run "base_$i" "$base" "$@"; done
