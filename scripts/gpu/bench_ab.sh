# Sourced by the GPU suites (after `out` is set): ab(), one bench.py A/B run of random-weight presets,
# its result file $out/NAME.json, its log $out/NAME.log and the log's headline lines on stdout.
# Speculative arms replay the "code" acceptance profile (SIMULATED acceptance, real costs);
# SSD_PROFILE=none measures the random draft's own (meaningless) acceptance instead. DRAFT_FLAGS adds
# draft options to every run, e.g. DRAFT_FLAGS="--draft-quant fp8 --draft-vocab 32768"; AB_TIMEOUT_S
# bounds one run (default 280 s).
ab() {  # ab NAME TARGET_SIZE DRAFT_SIZE FAMILY BATCH NUMSEQS OUTPUT_LEN [LAYOUT FLAGS...]
  local name=$1 size=$2 draft=$3 family=$4 batch=$5 numseqs=$6 len=$7; shift 7
  local layout=("$@"); [ ${#layout[@]} -gt 0 ] || layout=(--gpus 2 --async --ab ar,sync,async)
  local profile=(--profile "${SSD_PROFILE:-code}"); [ "${SSD_PROFILE:-code}" = none ] && profile=()
  local draft_flags=(${DRAFT_FLAGS:-})
  timeout "${AB_TIMEOUT_S:-280}" python bench/bench.py --device cuda --"$family" --size "$size" --draft "$draft" \
    --spec --k 6 --f 3 "${layout[@]}" "${profile[@]}" "${draft_flags[@]}" --random --b "$batch" --numseqs "$numseqs" \
    --output_len "$len" --warmup 1 --json "$out/$name.json" > "$out/$name.log" 2>&1
  grep -E "simulated|decode tok|draft round|verify|cache hit|predicted|ratio|match|TPOT|Error" "$out/$name.log" | sed "s/^/[$name] /"
}
# ab_batches PREFIX TARGET_SIZE DRAFT_SIZE FAMILY GPUS DEFAULT_BATCHES [FLAGS...]: --ab ar,sync,async with the
# draft on the last of GPUS, one run per batch size of BATCHES (else DEFAULT_BATCHES), result files PREFIX_bB
ab_batches() {
  local prefix=$1 size=$2 draft=$3 family=$4 gpus=$5 batches=${BATCHES:-$6}; shift 6
  for b in $batches; do   # B = 1: 2 sequences of 96 tokens; B < 16: 2B of 64; B = 16: 16 of 48
    local numseqs=$(( b == 1 ? 2 : b < 16 ? 2 * b : b )) len=$(( b == 1 ? 96 : b < 16 ? 64 : 48 ))
    ab "${prefix}_b$b" "$size" "$draft" "$family" "$b" "$numseqs" "$len" --gpus "$gpus" --async --ab ar,sync,async "$@"
  done
  local files=(); for b in $batches; do [ -f "$out/${prefix}_b$b.json" ] && files+=("$out/${prefix}_b$b.json"); done
  [ ${#files[@]} -eq 0 ] || python -m ssd.benchmark.ab_table "${files[@]}"   # the runs side by side
}
