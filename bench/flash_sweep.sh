#!/usr/bin/env bash
# One GPU call: the int8 P/V kernel alone (bench/flash_trace.cu -DVKERN_FLASH_TIME_ONLY: random int8 inputs, CUDA
# events, 10 launches after one) for each P V wait point (VKERN_FLASH_PV_WAIT: 0 = before the softmax, n = after n of
# the 64 exponentials), turns and rescale slack, at the four bench shapes; the builds run in parallel.
# Output: $OUT/flash-sweep.txt. Usage: [SWEEP_PHASE=build|time] bash bench/flash_sweep.sh ["waits"] ["turns"] ["slacks"]
# (build: the binaries only, e.g. in the background while the extension builds; time: with them built; unset: both)
set -uo pipefail
waits=(${1:-0 16 32}) turns=(${2:-0 1}) slacks=(${3:-0 8})
if [[ ${SWEEP_PHASE:-build} == build ]]; then
  for w in "${waits[@]}"; do
    nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -Icsrc -DVKERN_FLASH_TIME_ONLY \
      -DVKERN_FLASH_PV_WAIT="$w" bench/flash_trace.cu -o "/tmp/flash_time_$w" &
  done
  wait
fi
[[ ${SWEEP_PHASE:-time} == time ]] || exit 0
for shape in "12 32760" "40 32760" "40 75600" "24 118800"; do  # wan1.3b-480p, wan14b-480p, wan14b-720p, hunyuan-720p
  for w in "${waits[@]}"; do
    for t in "${turns[@]}"; do
      for s in "${slacks[@]}"; do
        "/tmp/flash_time_$w" $shape 0 "$t" "$s"
      done
    done
  done
done | tee "$OUT/flash-sweep.txt"
