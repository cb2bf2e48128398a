#!/usr/bin/env bash
# Measurements on ONE H200 (random weights at the real shapes; speculative arms replay the "code"
# acceptance profile, so their acceptance is SIMULATED). The draft shares the target's GPU (sync,
# co-located): async needs the draft on its own GPU (nvidia-h200-x2).
# Usage: scripts/gpu/h200_single_suite.sh OUT_DIR PART
#   (PART: draft | kernels | lt | attention | round | fp8 | vocab | stages | autotune | treekv | profile | outcome | llama |
#    qwen | coordinator | fusion | prefill | fp8fused | agreement | gputests)
# (coordinator needs pyzmq: carry .whl/ with its wheel, see ../shared/GPU.md)
# The lent machine's copy has no .git: prefix the command with SSD_GIT_COMMIT=<sha of what was sent>
# so that the result files name their commit (env.git_commit).
set -uo pipefail
out=${1:?output dir}; part=${2:?part}
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# kernel choices and compiled kernels of earlier runs (KERNEL_CACHE_IN, COMPILE_CACHE_IN; see caches.sh)
source "$(dirname "$0")/caches.sh"
source "$(dirname "$0")/bench_ab.sh"   # ab (DRAFT_FLAGS: draft options, e.g. "--draft-quant fp8 --draft-vocab 32768")
colocated=(--gpus 1 --colocate --ab ar,sync)
case $part in
  draft) for preset in llama-3.2-1b qwen3-0.6b; do
           timeout 200 python bench/draft_round_bench.py --preset $preset --k 6 --f 3 --batches 1 2 4 8 16 \
             --out "$out/draft_round_$preset.json" > "$out/draft_round_$preset.log" 2>&1
           grep -E "batch|Error" "$out/draft_round_$preset.log" | sed "s/^/[$preset] /"
         done ;;
  kernels) timeout 240 python bench/draft_round_bench.py --preset llama-3.2-1b --k 6 --f 3 --batches 1 16 --kernels \
             --out "$out/draft_kernels_llama1b.json" > "$out/draft_kernels.log" 2>&1
           grep -E "Error" "$out/draft_kernels.log"
           timeout 240 python bench/decode_profile.py --preset llama-3.2-1b --batch 1 \
             --out "$out/decode_profile_llama1b.json" > "$out/decode_profile_1b.log" 2>&1
           grep -E "roofline|Error" "$out/decode_profile_1b.log" ;;
  attention) log="$out/attention.log"  # fused Triton attention vs the matmul path, side by side
           timeout 120 python bench/attention_kernel_bench.py --out "$out/attention_kernels.json" >> "$log" 2>&1
           timeout 300 python bench/draft_round_bench.py --preset llama-3.2-1b --k 6 --f 3 --batches 1 4 16 \
             --attention fused --kernels --out "$out/draft_round_llama1b.json" >> "$log" 2>&1
           timeout 200 python bench/draft_round_bench.py --preset qwen3-0.6b --k 6 --f 3 --batches 1 16 \
             --out "$out/draft_round_qwen06b.json" >> "$log" 2>&1
           timeout 300 python bench/decode_profile.py --preset llama-3.1-8b --batch 1 --attention fused matmul \
             --out "$out/decode_profile_llama8b.json" >> "$log" 2>&1
           grep -E "attention_kernel_bench|draft_round_bench|roofline|agree|Error|error" "$log" | cut -c1-400 ;;
  lt)      # cuBLASLt's algorithms among MeasuredLinear's candidates: their GPU tests (and the kernel-choice
           # cache's), each algorithm timed at the 1B draft's shapes, then the draft round without and with
           # them (PRESETS: the drafts)
           # (compiled kernels: TRITON_INTERPRET=0, the GPU-only tests alone; see gputests)
           TRITON_INTERPRET=0 timeout 150 python -m pytest -q tests/test_cublaslt.py tests/test_choice_cache.py \
             -k "on_a_gpu or in_a_graph" > "$out/lt_tests.log" 2>&1
           tail -2 "$out/lt_tests.log"
           timeout 180 python bench/draft_kernel_sweep.py --parts lt --out "$out/lt_gemm_sweep.json" \
             > "$out/lt_sweep.log" 2>&1
           grep -E "lt gemm .*best|Error|error" "$out/lt_sweep.log" | cut -c1-300
           for preset in ${PRESETS:-llama-3.2-1b}; do
             timeout 400 python bench/draft_round_bench.py --preset "$preset" --k 6 --f 3 --batches 1 16 --warmup 3 \
               --iters 20 --linear measured-without-lt measured --out "$out/draft_round_${preset}_lt.json" \
               > "$out/round_lt_$preset.log" 2>&1
             grep -E "batch|Error|error" "$out/round_lt_$preset.log" | cut -c1-400
           done ;;
  round)   # the draft round at B = 1 and 16, both drafts, with kernel tables for the 1B one
           timeout 300 python bench/draft_round_bench.py --preset llama-3.2-1b --k 6 --f 3 --batches 1 16 --kernels \
             --out "$out/draft_round_llama1b.json" > "$out/round_llama.log" 2>&1
           grep -E "batch|Error|error" "$out/round_llama.log" | cut -c1-700
           timeout 200 python bench/draft_round_bench.py --preset qwen3-0.6b --k 6 --f 3 --batches 1 16 \
             --out "$out/draft_round_qwen06b.json" > "$out/round_qwen.log" 2>&1
           grep -E "batch|Error|error" "$out/round_qwen.log" | cut -c1-700 ;;
  fp8)     # the draft round with bf16 and with fp8 weights side by side (PRESETS overrides the two drafts;
           # KERNELS=1 adds kernel tables)
           for preset in ${PRESETS:-llama-3.2-1b qwen3-0.6b}; do
             timeout 540 python bench/draft_round_bench.py --preset "$preset" --k 6 --f 3 --batches 1 16 --quant none fp8 \
               ${KERNELS:+--kernels} --out "$out/draft_round_${preset}_fp8.json" > "$out/round_fp8_$preset.log" 2>&1
             grep -E "batch|Error|error" "$out/round_fp8_$preset.log" | cut -c1-900
           done ;;
  vocab)   # the draft round with its LM head over all tokens and over VOCAB (default 32768) side by side
           for preset in ${PRESETS:-llama-3.2-1b qwen3-0.6b}; do
             timeout 540 python bench/draft_round_bench.py --preset "$preset" --k 6 --f 3 --batches 1 16 \
               --vocab none ${VOCAB:-32768} ${KERNELS:+--kernels} --out "$out/draft_round_${preset}_vocab.json" \
               > "$out/round_vocab_$preset.log" 2>&1
             grep -E "batch|Error|error" "$out/round_vocab_$preset.log" | cut -c1-900
           done ;;
  stages)  # attention block shapes at pipeline depths 2-5 (the draft's window and tree, B = 1 and 16)
           timeout 300 python bench/draft_kernel_sweep.py --parts attention_stages \
             --out "$out/attention_stages_sweep.json" > "$out/attention_stages.log" 2>&1
           grep -E "best|Error|error" "$out/attention_stages.log" | cut -c1-500 ;;
  autotune) # F.linear against Inductor's max-autotune GEMMs at the 1B draft's B = 16 rows
           timeout 540 python bench/draft_kernel_sweep.py --parts autotune \
             --out "$out/gemm_autotune_sweep.json" > "$out/gemm_autotune.log" 2>&1
           grep -E "gemm |Error|error" "$out/gemm_autotune.log" | cut -c1-500 ;;
  treekv)  # tree steps' k/v written by the attention kernel or by the RoPE + KV-write kernel first,
           # interleaved (a variant run first measured slower in sequential runs); PRESETS overrides
           for preset in ${PRESETS:-qwen3-0.6b llama-3.2-1b}; do
             timeout 560 python bench/draft_round_bench.py --preset "$preset" --k 6 --f 3 --batches 1 16 \
               --attention fused-separate-kv fused fused-separate-kv fused \
               --out "$out/draft_round_${preset}_tree_kv.json" > "$out/round_tree_kv_$preset.log" 2>&1
             grep -oE "'attention': '[a-z-]+'|'batch': [0-9]+|'(branch_decode_ms|build_wall_ms)': [0-9.]+|Error.*" \
               "$out/round_tree_kv_$preset.log" | paste -sd' ' | sed 's/.attention/\n&/g'
           done ;;
  outcome) # the draft's answer to an outcome (the async round's critical path): host time and profiler tables
           timeout 240 python bench/outcome_profile.py --preset llama-3.2-1b --batches 1 16 \
             > "$out/outcome_profile_llama1b.txt" 2>&1
           grep -E "^== |Error|error" "$out/outcome_profile_llama1b.txt" ;;
  profile) timeout 240 python bench/decode_profile.py --preset llama-3.1-8b --batch 1 \
             --out "$out/decode_profile_llama8b.json" > "$out/decode_profile.log" 2>&1
           grep -E "roofline|Error" "$out/decode_profile.log" ;;
  fusion)  # a layer's norms / residual adds / SiLU inside its few-row products (ssd.layers.norm_fusion), per op
           # and in the round (arms interleaved), B <= 2
           timeout 100 python bench/draft_kernel_sweep.py --parts fusion --out "$out/fusion_sweep.json" \
             > "$out/fusion_sweep.log" 2>&1
           grep -E "fusion .* m=[0-9]+:|Error" "$out/fusion_sweep.log" | cut -c1-300
           timeout 300 python bench/draft_round_bench.py --preset llama-3.2-1b --k 6 --f 3 --batches 1 2 --warmup 3 \
             --iters 20 --linear measured-without-fusion measured measured-without-fusion measured \
             --out "$out/draft_round_llama1b_fusion.json" > "$out/round_fusion.log" 2>&1
           grep -E "batch|Error|error" "$out/round_fusion.log" | cut -c1-400 ;;
  prefill) # 16 prompts of 2048 tokens: unmasked causal vs masked attention, and the engine's prefill in
           # groups of <= 16384 positions vs one forward (time, peak memory above the loaded engine)
           for preset in ${PRESETS:-llama-3.1-8b qwen3-32b}; do
             timeout 280 python bench/prefill_bench.py --preset "$preset" --batch 16 --prompt-len 2048 \
               --max-prefill-tokens 16384 65536 --out "$out/prefill_$preset.json" > "$out/prefill_$preset.log" 2>&1
             grep -E "attention|engine prefill|Error|error" "$out/prefill_$preset.log" | cut -c1-400
           done
           # one 40000-token prompt: chunks of 16384 (the 2nd chunk's attention aligned bottom right) vs one forward
           timeout 280 python bench/prefill_bench.py --preset llama-3.1-8b --batch 1 --prompt-len 40000 \
             --chunk-offset 16384 --max-prefill-tokens 16384 65536 --out "$out/prefill_long_llama8b.json" \
             > "$out/prefill_long.log" 2>&1
           grep -E "attention|engine prefill|Error|error" "$out/prefill_long.log" | cut -c1-400 ;;
  fp8fused) # fp8 weights inside the TMA kernels (fused norm / residual products, LM head; widened to bf16, as f16
           # or against fp8 activations): per product against bf16, then the 1B draft round in bf16, fp8 (the
           # default layers, ssd.layers.fp8.FP8_LAYERS) and fp8 on the head alone, or the weights QUANTS names (e.g. QUANTS="none fp8:down_proj,lm_head");
           # SWEEP_S=1 skips the sweep, KERNELS=1 adds the round's kernel tables, FP8_ROWS="produced separate" measures
           # many-row products' activations quantized by the norm / SiLU-mul or by a kernel of their own (the
           # "fp8 rows at" lines: Inductor's producers against the one-pass Triton ones, per shape)
           timeout ${SWEEP_S:-200} python bench/draft_kernel_sweep.py --parts fp8_fusion --out "$out/fp8_fusion_sweep.json" \
             > "$out/fp8_fusion_sweep.log" 2>&1
           grep -E "fp8 fusion .*best|Error|error" "$out/fp8_fusion_sweep.log" | cut -c1-480
           timeout ${ROUND_S:-380} python bench/draft_round_bench.py --preset llama-3.2-1b --k 6 --f 3 --batches 1 16 \
             --warmup 3 --iters 20 --quant ${QUANTS:-none fp8 fp8:lm_head} --vocab ${VOCAB:-none} ${KERNELS:+--kernels} \
             ${FP8_ROWS:+--fp8-rows $FP8_ROWS} --out "$out/draft_round_llama1b_fp8fused.json" > "$out/round_fp8fused.log" 2>&1
           grep -E "batch|Error|error|fp8 rows at|fp8 rows matmul" "$out/round_fp8fused.log" | cut -c1-600 ;;
  gputests) # the tests that need the compiled kernels (the tests' conftest runs Triton's interpreter unless
           # TRITON_INTERPRET=0; the rest of those files run CPU tensors through it)
           TRITON_INTERPRET=0 timeout 280 python -m pytest -q tests/test_norm_fusion.py tests/test_choice_cache.py \
             tests/test_cublaslt.py -k "on_the_gpu or on_a_gpu or in_a_graph" \
             > "$out/gpu_tests.log" 2>&1
           tail -3 "$out/gpu_tests.log" ;;
  agreement) # every fused norm tiling against the unfused chain, repeated: the targets' bf16 products, the drafts'
           # bf16 and fp8 ones (a tiling that is off or differs run to run races; see the bench's docstring)
           timeout 280 python bench/fused_norm_agreement.py --presets qwen3-32b llama-3.1-8b \
             --out "$out/fused_norm_agreement_targets.json" > "$out/agreement_targets.log" 2>&1
           timeout 280 python bench/fused_norm_agreement.py --presets llama-3.2-1b qwen3-0.6b --weights bf16 fp8 \
             --out "$out/fused_norm_agreement_drafts.json" > "$out/agreement_drafts.log" 2>&1
           grep -hE "checks|Error" "$out"/agreement_*.log | cut -c25- ;;
  # BATCHES (default "1 16"): one sync-vs-AR run per batch size, each bounded by AB_TIMEOUT_S (280 s)
  llama) for b in ${BATCHES:-1 16}; do ab ab_profile_llama8b_b$b 8 1 llama $b $(( b == 1 ? 2 : b )) $(( b == 1 ? 128 : 64 )) "${colocated[@]}"; done ;;
  qwen) for b in ${BATCHES:-1 16}; do ab ab_profile_qwen32b_b$b 32 0.6 qwen $b $(( b == 1 ? 2 : b )) $(( b == 1 ? 128 : 64 )) "${colocated[@]}"; done ;;
  coordinator) python -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
               for seqs in ${SEQS:-1 16}; do  # SEQS: the batch limits to run
                 PYTHONPATH=/tmp/site:$PYTHONPATH timeout 240 python bench/coordinator_bench.py --model llama-3.1-8b \
                   --random-weights --device cuda --num-prompts $((seqs * 2)) --max-num-seqs $seqs --prompt-len 256 \
                   --max-tokens 128 --repeats 3 --json "$out/coordinator_llama8b_b$seqs.json" > "$out/coordinator_b$seqs.log" 2>&1
                 grep -vE "Warning|warn" "$out/coordinator_b$seqs.log" | tail -6
               done ;;
esac
