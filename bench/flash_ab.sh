#!/usr/bin/env bash
# One GPU call: the attention kernel built from several source trees and timed alternately, kernel alone, at the four
# bench shapes (bench/flash_trace.cu's TIME_ONLY build: TFLOP/s and a hash of the output, which the trees must share
# when they compute the same). Each DIR holds another revision's csrc files, e.g. made with
#   mkdir -p ab_old && git archive <sha> csrc | tar -x --strip-components=1 -C ab_old
# (untracked, so the device call carries it); csrc/ itself is always the last tree.
# Usage: ROUNDS=2 MODES="int8pv bf16" SPLITS="split nosplit" bash bench/flash_ab.sh DIR [DIR ...]; output also in
# $OUT/flash-ab.txt. (int8pv: exp_fma 0, turns 0, rescale slack 8, the extension's defaults; bf16: the 16-bit kernel
# with 128-key tiles, bf16w with 176-key tiles (trees from session 31 on).
# split (the default): the tail split's workspace passed as the extension passes it, so each shape runs the
# instantiation the extension runs there (the split one at wan1.3b-480p and wan14b-720p); nosplit: none, as every
# A/B before session 29 ran. DATA="uniform gauss": 8-bit codes uniform (the default) or spread as the extension's
# quantized randn inputs are.)
set -uo pipefail
trees=("$@" csrc)
pids=()
for i in "${!trees[@]}"; do
  nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -DVKERN_FLASH_TIME_ONLY \
    -I"${trees[$i]}" bench/flash_trace.cu -o "/tmp/flash_ab_$i" &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid" || exit 1; done
for mode in ${MODES:-int8pv}; do
  for split in ${SPLITS:-split}; do
    for data in ${DATA:-uniform}; do
      for shape in "12 32760" "40 32760" "40 75600" "24 118800"; do  # wan1.3b-480p, wan14b-480p, wan14b-720p, hunyuan-720p
        for ((r = 0; r < ${ROUNDS:-2}; ++r)); do
          for i in "${!trees[@]}"; do
            echo -n "${trees[$i]}: "; "/tmp/flash_ab_$i" $shape 0 0 8 "$mode" "$split" "$data"
          done
        done
      done
    done
  done
done | tee "$OUT/flash-ab.txt"
