#!/usr/bin/env bash
# The CUDA causal conv (csrc/causal_conv.cu) in one GPU call: build, its GPU tests and the VAE's, per-layer rows
# (vkern = cuDNN buffered, Triton, CUDA and its variants), ncu on the 96 -> 96 launch, decode and encode rows.
# Usage: VKERN_COMMIT=<sha> bash bench/conv_cuda_run.sh   (carry .whl)
set -uo pipefail
. bench/device_env.sh
VKERN_PTXAS_VERBOSE=1 build_vkern
grep -A2 "causal_conv3d_kernel" "$OUT/build.log" | grep -E "registers|spill" | sort | uniq -c
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader
timeout -s INT -k 10 200 python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short tests/test_causal_conv_cuda.py \
  > "$OUT/pytest-conv.log" 2>&1; rc=$?
grep -E "FAILED|ERROR|passed|failed" "$OUT/pytest-conv.log" | head -20; echo "conv tests rc $rc"
B="python3 -m bench.bench --out $OUT/results.jsonl"
timeout 150 $B --op vae-conv --warmup 2 --repeats 10 --providers vkern,vkern-triton,vkern-cuda,vkern-cuda-w9,vkern-cuda-grid > /dev/null
timeout 120 ncu --clock-control none -k regex:causal_conv3d_kernel -c 1 --section SpeedOfLight \
  --section MemoryWorkloadAnalysis --section WarpStateStats \
  --metrics "regex:sm__pipe_tensor.*_cycles_active\.avg\.pct_of_peak_sustained_active,regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
  python3 -m bench.bench --op vae-conv --shape dec-3x3x3-96ch-480x832 --providers vkern-cuda --warmup 0 --repeats 1 \
  > "$OUT/ncu.txt" 2>&1; echo "ncu rc $?"
grep -E "Duration|Throughput|Pipe|pipe_tensor|L2|Shared|stalled" "$OUT/ncu.txt" | awk '!/stalled/ || $NF+0 > 0.1' | head -50
[ $rc = 0 ] || exit 1
timeout 300 $B --op vae-decode --shape wan-vae-480p,wan-vae-720p --providers diffusers,vkern,vkern-cuda > /dev/null
timeout 120 $B --op vae-encode --shape wan-vae-480p,wan-vae-720p --providers diffusers,vkern > /dev/null
timeout -s INT -k 10 150 python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short tests/test_wan_vae.py \
  > "$OUT/pytest-vae.log" 2>&1; echo "vae tests rc $?"; grep -E "FAILED|passed|failed" "$OUT/pytest-vae.log" | head
python3 - "$OUT/results.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(r["op"], r["shape"], r["provider"], round(r["ms"], 3), r.get("tflops") and round(r["tflops"], 1),
          r.get("peak_gib") and round(r["peak_gib"], 3), r.get("rel_l2_vs_fp32") and "%.4g" % r["rel_l2_vs_fp32"])
PY
