#!/usr/bin/env bash
# Where the CUDA attention kernel's time goes (one GPU call): ncu sections for one e4m3 and one bf16 launch at
# wan1.3b-480p sizes (warp stall reasons, pipe utilization), and compute-sanitizer memcheck + racecheck on a small
# masked call of each form. Output under $OUT. Usage: VKERN_COMMIT=<sha> bash bench/flash_ncu.sh [source [int8pv]]
#   source: instead, where the e4m3 launch's warps stall, per SASS instruction (ncu source counters): the
#   report's source page as CSV in $OUT/flash-source.csv, summarised by bench/ncu_source_summary.py;
#   source int8pv: the same for the int8 P/V form's launch at wan14b-480p sizes (bench/flash_probe_call.py).
set -uo pipefail
. bench/device_env.sh
python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
if [[ " $* " == *" source "* ]]; then
  timeout 300 ncu --clock-control none -k regex:flash_fwd_kernel -c 1 --section SourceCounters --section WarpStateStats \
    --import-source no -o "$OUT/flash" python3 -m bench.flash_probe_call $([[ " $* " == *" int8pv "* ]] && echo --int8pv) \
    > "$OUT/ncu-source.txt" 2>&1
  echo "ncu source rc $?"; tail -3 "$OUT/ncu-source.txt"
  ncu -i "$OUT/flash.ncu-rep" --page source --csv --print-source sass > "$OUT/flash-source.csv" 2> "$OUT/ncu-source-err.txt"
  echo "source page rc $? ($(wc -l < "$OUT/flash-source.csv") lines)"; head -c 600 "$OUT/ncu-source-err.txt"
  python3 bench/ncu_source_summary.py "$OUT/flash-source.csv" | tee "$OUT/flash-source-summary.txt"
  exit 0
fi
timeout 240 ncu --clock-control none -k regex:flash_fwd_kernel -c 2 \
  --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats --section SchedulerStats \
  --section InstructionStats python3 -m bench.flash_probe_call > "$OUT/ncu.txt" 2>&1
echo "ncu rc $?"
# Stall reasons (warps stalled per issued instruction, by reason) and pipe utilization, same two launches
timeout 240 ncu --clock-control none -k regex:flash_fwd_kernel -c 2 \
  --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,regex:sm__pipe_.*_cycles_active\.avg\.pct_of_peak_sustained_active" \
  python3 -m bench.flash_probe_call > "$OUT/ncu-stalls.txt" 2>&1
echo "ncu stalls rc $?"
grep -E "flash_fwd|stalled|pipe" "$OUT/ncu-stalls.txt" | awk '$NF+0 > 0.05 || /flash_fwd/' | head -120
grep -E "flash_fwd|Duration|Throughput|Issue Slots|Stall|Warp Cycles|Eligible|Active Warps|Pipe|No Eligible" "$OUT/ncu.txt" | head -80
for tool in memcheck racecheck; do
  timeout 120 compute-sanitizer --tool $tool python3 -m bench.flash_probe_call --small > "$OUT/sanitizer-$tool.txt" 2>&1
  echo "compute-sanitizer $tool rc $?"; tail -4 "$OUT/sanitizer-$tool.txt"
done
