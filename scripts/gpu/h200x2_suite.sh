#!/usr/bin/env bash
# The measurements behind README "Measured results" on two H200 (random weights at real shapes;
# speculative arms replay the shipped "code" acceptance profile: SIMULATED acceptance, real costs).
# SSD_PROFILE=none measures the random draft's own (meaningless) acceptance instead. DRAFT_FLAGS adds
# draft options to every speculative run, e.g. DRAFT_FLAGS="--draft-quant fp8 --draft-vocab 32768" (the
# fastest 1B draft round measured on one H200: README "Where things stand").
# The lent machine's copy has no .git: prefix the command with SSD_GIT_COMMIT=<sha of what was sent>
# so that the result files name their commit (env.git_commit).
# Usage: scripts/gpu/h200x2_suite.sh OUT_DIR PART   (PART: engine-qwen | ab-qwen | ab-llama | worker-death)
set -uo pipefail
out=${1:?output dir}; part=${2:?part}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# kernel choices and compiled kernels of earlier runs (KERNEL_CACHE_IN, COMPILE_CACHE_IN; see caches.sh)
source "$(dirname "$0")/caches.sh"
ab() {  # ab NAME TARGET_SIZE DRAFT_SIZE FAMILY BATCH NUMSEQS OUTPUT_LEN [LAYOUT FLAGS...]
  local name=$1 size=$2 draft=$3 family=$4 batch=$5 numseqs=$6 len=$7; shift 7
  local layout=("$@"); [ ${#layout[@]} -gt 0 ] || layout=(--gpus 2 --async --ab ar,sync,async)
  local profile=(--profile "${SSD_PROFILE:-code}"); [ "${SSD_PROFILE:-code}" = none ] && profile=()
  local draft_flags=(${DRAFT_FLAGS:-})
  timeout 280 python bench/bench.py --device cuda --"$family" --size "$size" --draft "$draft" --spec \
    --k 6 --f 3 "${layout[@]}" "${profile[@]}" "${draft_flags[@]}" --random --b "$batch" --numseqs "$numseqs" --output_len "$len" --warmup 1 \
    --json "$out/$name.json" > "$out/$name.log" 2>&1
  grep -E "simulated|decode tok|draft round|verify|cache hit|predicted|ratio|match|TPOT|Error" "$out/$name.log" | sed "s/^/[$name] /"
}
case $part in
  engine-qwen) timeout 300 python bench/engine_bench.py --presets qwen3-32b --variants compile --gen-batches 1 16 \
                 --budget-s 270 --out "$out/engine_h200_qwen32b.json" > "$out/engine_qwen.log" 2>&1
               grep -E "summary|ERROR" "$out/engine_qwen.log" | tail -3 ;;
  ab-qwen) ab ab_qwen32b_b1 32 0.6 qwen 1 2 96; ab ab_qwen32b_b16 32 0.6 qwen 16 16 48
           ab ab_qwen32b_colocated_b1 32 0.6 qwen 1 2 96 --gpus 1 --colocate --ab ar,sync ;;
  ab-llama) ab ab_llama8b_b1 8 1 llama 1 2 96; ab ab_llama8b_b16 8 1 llama 16 16 48 ;;
  # over NCCL: the draft killed mid-run must fail generate quickly (rank 0's watch aborts the communicators)
  # (first it idles past the group's timeout: workers wait for commands without one)
  worker-death) timeout 280 python bench/worker_death_check.py --device cuda --victim draft --timeout-s 120 --idle-first-s 130 \
                  > "$out/worker_death.log" 2>&1; echo "exit $?"; grep -E "outcome|Error" "$out/worker_death.log" | tail -3 ;;
esac
