#!/usr/bin/env bash
# The CUDA causal conv (csrc/causal_conv.cu) in one GPU call: build, its GPU tests and the VAE's, per-layer rows
# (cuDNN buffered with and without bias, CUDA, one CTA per tile, the 96-wide tile at 384 channels, the fused
# residual), the 480p decode (VKERN_DECODE_PROVIDERS, default diffusers, vkern's default path, every conv the kernel
# takes on it, the CUDA conv on session 16's 96 -> 96 convs only, 2 latents per call) and its GPU time per class, per
# conv layer and GPU idle (bench/profile_vae.py).
# Options: 720p (the 720p decode too), encode (the 480p encode too), nolayers (no per-layer rows), source (at the end,
# ncu's stall samples per SASS instruction of the 96 -> 96 launch, summarised; NCU_PROVIDER: which vae-conv provider's,
# default vkern-cuda), ncu (ncu sections of the 96 -> 96
# launch instead of the VAE rows), short (only the 96 -> 96 layer and the 480p decode). LAYER_SHAPES, LAYER_PROVIDERS:
# the per-layer rows' shapes and providers instead of the default set.
# Usage: VKERN_COMMIT=<sha> bash bench/conv_cuda_run.sh [options]   (carry .whl)
set -uo pipefail
. bench/device_env.sh
VKERN_PTXAS_VERBOSE=1 build_vkern
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader
timeout -s INT -k 10 200 python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short tests/test_causal_conv_cuda.py \
  > "$OUT/pytest-conv.log" 2>&1; rc=$?
grep -E "FAILED|ERROR|passed|failed" "$OUT/pytest-conv.log" | head -20; echo "conv tests rc $rc"
B="python3 -m bench.bench --out $OUT/results.jsonl"
V=vkern,vkern-cuda
SHORT=0; [[ " $* " == *" short "* ]] && SHORT=1
CONVS=dec-3x3x3-96ch-480x832,dec-3x3x3-192ch-240x416,dec-3x3x3-384ch-120x208,dec-3x3x3-384ch-60x104
CONVS=$CONVS,dec-up-conv2d-192to96-480x832,dec-up-conv2d-384to192-240x416,dec-out-96to3-480x832
[ $SHORT = 1 ] && CONVS=dec-3x3x3-96ch-480x832
LAYERS=${LAYER_PROVIDERS:-$V,vkern-no-bias,vkern-cuda-grid,vkern-cuda-n96,vkern-cuda-residual}
[[ " $* " == *" nolayers "* ]] || timeout 120 $B --op vae-conv --shape ${LAYER_SHAPES:-$CONVS} \
  --warmup 2 --repeats 10 --providers $LAYERS > /dev/null
if [[ " $* " == *" ncu "* ]]; then
  timeout 120 ncu --clock-control none -k regex:causal_conv3d_kernel -c 1 --section SpeedOfLight \
    --section MemoryWorkloadAnalysis --section WarpStateStats \
    --metrics "regex:sm__pipe_tensor.*_cycles_active\.avg\.pct_of_peak_sustained_active,regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
    python3 -m bench.bench --op vae-conv --shape dec-3x3x3-96ch-480x832 --providers vkern-cuda --warmup 0 --repeats 1 \
    > "$OUT/ncu.txt" 2>&1; echo "ncu rc $?"
  grep -E "Duration|Throughput|Pipe|pipe_tensor|L2|Shared|stalled" "$OUT/ncu.txt" | awk '!/stalled/ || $NF+0 > 0.1' | head -50
elif [ $rc = 0 ]; then
  timeout -s INT -k 10 100 python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short tests/test_wan_vae.py \
    > "$OUT/pytest-vae.log" 2>&1; echo "vae tests rc $?"; grep -E "FAILED|passed|failed" "$OUT/pytest-vae.log" | head
  DECODE=${VKERN_DECODE_PROVIDERS:-diffusers,$V,vkern-cuda-s16,vkern-2-latents}  # the A/B set by default
  timeout 120 $B --op vae-decode --shape wan-vae-480p --providers $DECODE > /dev/null
  if [ $SHORT = 0 ]; then
    timeout 90 python3 -m bench.profile_vae --res 480p --ops decode --providers vkern --out "$OUT/results.jsonl" \
      --md "$OUT/profile_vae.md" > /dev/null 2>&1; echo "profile rc $?"
  fi
  if [[ " $* " == *" encode "* ]]; then
    timeout 60 $B --op vae-encode --shape wan-vae-480p --providers diffusers,vkern,vkern-cuda-s16 > /dev/null
  fi
  if [[ " $* " == *" 720p "* ]]; then
    timeout 150 $B --op vae-decode --shape wan-vae-720p --providers ${VKERN_DECODE_PROVIDERS:-diffusers,vkern,vkern-cuda-s16} > /dev/null
  fi
fi
if [[ " $* " == *" source "* ]]; then  # where the 96 -> 96 launch's warps stall, per SASS instruction
  timeout 200 ncu --clock-control none -k regex:causal_conv3d_kernel -c 1 --section SourceCounters \
    --section WarpStateStats --import-source no -o "$OUT/conv" python3 -m bench.bench --op vae-conv \
    --shape dec-3x3x3-96ch-480x832 --providers ${NCU_PROVIDER:-vkern-cuda} --warmup 0 --repeats 1 > "$OUT/ncu-source.txt" 2>&1
  echo "ncu source rc $?"
  ncu -i "$OUT/conv.ncu-rep" --page source --csv --print-source sass > "$OUT/conv-source.csv" 2> /dev/null
  python3 bench/ncu_source_summary.py "$OUT/conv-source.csv" > "$OUT/conv-source-summary.txt" 2>&1
  head -40 "$OUT/conv-source-summary.txt"; rm -f "$OUT/conv.ncu-rep"
fi
python3 - "$OUT/results.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if "ms" not in r:  # the profile's rows: in profile_vae.md
        continue
    print(r["op"], r["shape"], r["provider"], round(r["ms"], 3), r.get("tflops") and round(r["tflops"], 1),
          r.get("peak_gib") and round(r["peak_gib"], 3), r.get("rel_l2_vs_fp32") and "%.4g" % r["rel_l2_vs_fp32"])
PY
