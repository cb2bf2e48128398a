#!/usr/bin/env bash
# Tensor-parallel targets with the draft on a GPU of its own: issue 6 (nvidia-h200-x8: llama-3.1-70b at
# TP = 4 on GPUs 0-3, llama-3.2-1b draft on GPU 4) and issue 7 (nvidia-h200-x4: TP = 2 on GPUs 0-1, the
# draft on GPU 2; llama-3.1-70b + llama-3.2-1b and qwen3-32b + qwen3-0.6b). Random weights at the real
# shapes; the speculative arms replay the "code" acceptance profile: SIMULATED acceptance, real costs.
# SSD_PROFILE, DRAFT_FLAGS, AB_TIMEOUT_S: see bench_ab.sh. Prefix SSD_GIT_COMMIT=<sha> (the lent copy has
# no .git). One part per call (a call runs at most 10 minutes):
#   tp-match   (4 GPUs)  llama-3.1-8b at TP = 1 and TP = 4: greedy match rate in bf16, tok/s, all-reduce ms/step
#   tp4-70b    (4 GPUs)  llama-3.1-70b at TP = 4 alone: AR tok/s against the roofline, all-reduce ms per step
#   ab-tp4-70b (5 GPUs)  --ab ar,sync,async for BATCHES (default "1 4 16") x KS ("6") x FANOUTS ("uniform";
#                        "geometric": the capped-geometric lists of the same budget F (K + 1))
#   tp2        (2 GPUs)  llama-3.1-70b and qwen3-32b at TP = 2 alone (as tp4-70b)
#   ab-tp2-llama, ab-tp2-qwen (3 GPUs)  --ab ar,sync,async at BATCHES (default "1 16"), K = 6, F = 3
# Usage: scripts/gpu/tp_suite.sh OUT_DIR PART
set -uo pipefail
out=${1:?output dir}; part=${2:?part}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
source "$(dirname "$0")/caches.sh"
source "$(dirname "$0")/bench_ab.sh"
export AB_TIMEOUT_S=${AB_TIMEOUT_S:-540}
tp_profile() {  # tp_profile NAME MODEL TP_SIZES BATCHES
  timeout 560 python bench/tp_profile.py --model "$2" --tp $3 --batch $4 --out "$out/$1.json" > "$out/$1.log" 2>&1
  grep -E "tok/s|match rate|Error" "$out/$1.log" | sed "s/^/[$1] /"
}
case $part in
  tp-match) tp_profile tp_llama8b_tp1_tp4 llama-3.1-8b "1 4" "1 16" ;;
  tp4-70b) tp_profile tp_llama70b_tp4 llama-3.1-70b 4 "1 4 16" ;;
  ab-tp4-70b) for k in ${KS:-6}; do for fanout in ${FANOUTS:-uniform}; do
                ab_batches "ab_llama70b_tp4_k${k}_${fanout}" 70 1 llama 5 "1 4 16" --k "$k" --fanout "$fanout"
              done; done ;;
  tp2) tp_profile tp_llama70b_tp2 llama-3.1-70b 2 "1 16"; tp_profile tp_qwen32b_tp2 qwen3-32b 2 "1 16" ;;
  ab-tp2-llama) ab_batches ab_llama70b_tp2 70 1 llama 3 "1 16" ;;
  ab-tp2-qwen) ab_batches ab_qwen32b_tp2 32 0.6 qwen 3 "1 16" ;;
  *) echo "unknown part $part" >&2; exit 2 ;;
esac
