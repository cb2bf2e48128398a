#!/usr/bin/env bash
# The measurements behind README "Measured results" (log: docs/MEASUREMENTS.md) on two H200 (random
# weights at real shapes; speculative arms replay the shipped "code" acceptance profile: SIMULATED
# acceptance, real costs).
# SSD_PROFILE and DRAFT_FLAGS: see bench_ab.sh; DRAFT_FLAGS="--draft-quant fp8 --draft-vocab 32768" is the
# fastest 1B draft round measured on one H200 (README "Where things stand").
# The lent machine's copy has no .git: prefix the command with SSD_GIT_COMMIT=<sha of what was sent>
# so that the result files name their commit (env.git_commit).
# Usage: scripts/gpu/h200x2_suite.sh OUT_DIR PART
#   (PART: engine-qwen | ab-qwen | ab-qwen-colocated | ab-llama | worker-death)
set -uo pipefail
out=${1:?output dir}; part=${2:?part}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# kernel choices and compiled kernels of earlier runs (KERNEL_CACHE_IN, COMPILE_CACHE_IN; see caches.sh)
source "$(dirname "$0")/caches.sh"
source "$(dirname "$0")/bench_ab.sh"   # ab, ab_batches
case $part in
  engine-qwen) timeout 300 python bench/engine_bench.py --presets qwen3-32b --variants compile --gen-batches 1 16 \
                 --budget-s 270 --out "$out/engine_h200_qwen32b.json" > "$out/engine_qwen.log" 2>&1
               grep -E "summary|ERROR" "$out/engine_qwen.log" | tail -3 ;;
  # BATCHES (default "1 16") picks the batch sizes: each run is bounded by AB_TIMEOUT_S (280 s), a call by 600 s
  ab-qwen) ab_batches ab_qwen32b 32 0.6 qwen 2 "1 16" ;;
  ab-qwen-colocated) ab ab_qwen32b_colocated_b1 32 0.6 qwen 1 2 96 --gpus 1 --colocate --ab ar,sync ;;
  ab-llama) ab_batches ab_llama8b 8 1 llama 2 "1 16" ;;
  # over NCCL: the draft killed mid-run must fail generate quickly (rank 0's watch aborts the communicators)
  # (first it idles past the group's timeout: workers wait for commands without one)
  worker-death) timeout 280 python bench/worker_death_check.py --device cuda --victim draft --timeout-s 120 --idle-first-s 130 \
                  > "$out/worker_death.log" 2>&1; echo "exit $?"; grep -E "outcome|Error" "$out/worker_death.log" | tail -3 ;;
  *) echo "unknown part $part" >&2; exit 2 ;;
esac
