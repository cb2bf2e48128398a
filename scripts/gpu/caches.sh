# Sourced by the GPU suites (after `out` is set): what an earlier run on a lent machine already measured
# or compiled, so that a fresh machine spends its minutes on the measurements, not on start-up.
# - Measured kernel choices (ssd.layers.choice_cache): kept in $out/kernel_choices.json, which comes
#   back; KERNEL_CACHE_IN (such a file, carried along, e.g. .kernel_cache/kernel_choices.json) seeds it.
# - Compiled kernels (Triton and Inductor caches; sm_90 code, the same on an H100 and an H200):
#   COMPILE_CACHE_IN (the folder holding the compile_cache.tgz.part-* an earlier run returned,
#   carried along, e.g. .kernel_cache) is unpacked first; COMPILE_CACHE_OUT=1 packs them into
#   $out/compile_cache.tgz.part-aa, -ab, ... at the end (15 MiB pieces: a returned file's limit is
#   16 MiB; each piece takes one of the 8 returned files; skipped above 3 pieces).
export SSD_KERNEL_CACHE=$out/kernel_choices.json
if [[ -f ${KERNEL_CACHE_IN:-} ]]; then cp "$KERNEL_CACHE_IN" "$SSD_KERNEL_CACHE"; fi
compile_cache=/tmp/ssd_compile_cache
export TRITON_CACHE_DIR=$compile_cache/triton TORCHINDUCTOR_CACHE_DIR=$compile_cache/inductor
mkdir -p "$TRITON_CACHE_DIR" "$TORCHINDUCTOR_CACHE_DIR"
if compgen -G "${COMPILE_CACHE_IN:-/nonexistent}/compile_cache.tgz.part-*" > /dev/null; then
  cat "$COMPILE_CACHE_IN"/compile_cache.tgz.part-* | tar xz -C "$compile_cache"
fi
pack_compile_cache() {
  [[ ${COMPILE_CACHE_OUT:-0} == 1 ]] || return 0
  tar czf /tmp/compile_cache.tgz -C "$compile_cache" triton inductor
  if (( $(stat -c %s /tmp/compile_cache.tgz) <= 45 << 20 )); then
    split -b 15M /tmp/compile_cache.tgz "$out/compile_cache.tgz.part-"
  else echo "compile cache $(du -h /tmp/compile_cache.tgz | cut -f1): over 3 pieces of 15 MiB, not returned"; fi
}
trap pack_compile_cache EXIT
