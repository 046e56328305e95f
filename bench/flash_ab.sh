#!/usr/bin/env bash
# One GPU call: the int8 P/V attention kernel built from two source trees and timed alternately, kernel alone, at
# the four bench shapes (bench/flash_trace.cu's TIME_ONLY build: TFLOP/s and a hash of the output, which A and B
# must share when they compute the same). A: a directory with another revision's csrc files, e.g. made with
#   mkdir -p ab_old && git archive <sha> csrc | tar -x --strip-components=1 -C ab_old
# (untracked, so the device call carries it); B: csrc/.
# Usage: bash bench/flash_ab.sh A_DIR [rounds] ["exp_fma turns slack"]; output also in $OUT/flash-ab.txt.
set -uo pipefail
a_dir=$1 rounds=${2:-2} schedule=${3:-"0 0 8"}
build() {
  nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -DVKERN_FLASH_TIME_ONLY \
    -I"$1" bench/flash_trace.cu -o "$2"
}
build "$a_dir" /tmp/flash_a & pid_a=$!
build csrc /tmp/flash_b & pid_b=$!
wait $pid_a && wait $pid_b || exit 1
for shape in "12 32760" "40 32760" "40 75600" "24 118800"; do  # wan1.3b-480p, wan14b-480p, wan14b-720p, hunyuan-720p
  for ((r = 0; r < rounds; ++r)); do
    echo -n "A: "; /tmp/flash_a $shape $schedule
    echo -n "B: "; /tmp/flash_b $shape $schedule
  done
done | tee "$OUT/flash-ab.txt"
