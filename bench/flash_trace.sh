#!/usr/bin/env bash
# One GPU call: bench/flash_trace.cu for the int8 P/V form's schedules (exp_fma turns pairs) at the given sizes;
# output to $OUT/flash-trace.txt. Usage: bash bench/flash_trace.sh [heads] [tokens] ["fma turns" ...]
set -uo pipefail
heads=${1:-40} tokens=${2:-32760}
schedules=("${@:3}")
[[ ${#schedules[@]} -eq 0 ]] && schedules=("0 0" "0 1" "0 2")
nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -Icsrc \
  bench/flash_trace.cu -o /tmp/flash_trace || exit 1
for s in "${schedules[@]}"; do
  /tmp/flash_trace "$heads" "$tokens" $s
  echo
done | tee "$OUT/flash-trace.txt"
