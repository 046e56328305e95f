#!/usr/bin/env bash
# The CUDA causal conv's fp32 form (TF32 products, session 51) in one GPU call: build,
# its GPU tests and the fp32 VAE's, per-layer fp32 rows (cuDNN TF32, the Triton and CUDA convs on rounded inputs, the
# CUDA op rounding copies itself), the bf16 96 -> 96 CUDA row (the 16-bit kernel after the change), and the fp32 480p
# decode and encode: diffusers, vkern's defaults, the CUDA conv on the Triton kernel's convs (vkern-cuda-tf32-s51), on
# every conv it takes (vkern-cuda; VAE_PROVIDERS: others); the VAE's fp32 GPU tests last. Options: notests, nolayers,
# novae, 720p (the 720p decode and encode too), vaefirst (the VAE's fp32 GPU tests first). Env: CONV_TESTS, CONV_K
# (which conv tests), LAYER_PROVIDERS (the fp32 layer rows' providers), VAE_PROVIDERS.
# Usage: VKERN_COMMIT=<sha> bash bench/conv_tf32_run.sh [options]   (carry .whl)
set -uo pipefail
. bench/device_env.sh
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw --format=csv,noheader -l 2 > "$OUT/clocks.csv" &
VKERN_PTXAS_VERBOSE=1 build_vkern
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader
has() { [[ " $OPTS " == *" $1 "* ]]; }
OPTS=" $* "
if ! has notests; then
  # CONV_TESTS (default the CUDA conv's file) and CONV_K (a -k expression) narrow the conv tests.
  timeout -s INT -k 10 200 python3 -m pytest -m gpu -q -s -p no:cacheprovider --tb=short \
    ${CONV_TESTS:-tests/test_causal_conv_cuda.py} ${CONV_K:+-k "$CONV_K"} > "$OUT/pytest-conv.log" 2>&1
  echo "conv tests rc $?"
  grep -E "FAILED|ERROR|passed|failed|TF32 rel L2" "$OUT/pytest-conv.log" | head -30
fi
if has vaefirst; then
  timeout -s INT -k 10 150 python3 -m pytest -m gpu -q -s -p no:cacheprovider --tb=short tests/test_wan_vae.py -k fp32 \
    > "$OUT/pytest-vae.log" 2>&1; echo "vae tests rc $?"
  grep -E "FAILED|ERROR|passed|failed|^fp32" "$OUT/pytest-vae.log" | head -30
fi
B="python3 -m bench.bench --out $OUT/results.jsonl"
CONVS=dec-3x3x3-96ch-480x832,dec-3x3x3-192ch-240x416,dec-3x3x3-384ch-120x208,dec-3x3x3-384ch-60x104
CONVS=$CONVS,dec-up-conv2d-192to96-480x832,dec-up-conv2d-384to192-240x416,dec-out-96to3-480x832
if ! has nolayers; then
  timeout 150 $B --op vae-conv --dtype float32 --shape $CONVS --warmup 2 --repeats 5 \
    --providers ${LAYER_PROVIDERS:-vkern,vkern-triton-tf32-inputs,vkern-cuda,vkern-cuda-tf32-inputs} > /dev/null
  echo "fp32 layers rc $?"
  timeout 60 $B --op vae-conv --shape dec-3x3x3-96ch-480x832 --warmup 2 --repeats 10 \
    --providers vkern,vkern-cuda > /dev/null; echo "bf16 layer rc $?"
fi
if ! has novae; then
  P=${VAE_PROVIDERS:-diffusers,vkern,vkern-cuda-tf32-s51,vkern-cuda}
  timeout 150 $B --op vae-decode --shape wan-vae-480p-fp32 --warmup 1 --repeats 3 --providers $P > /dev/null
  echo "decode rc $?"
  timeout 120 $B --op vae-encode --shape wan-vae-480p-fp32 --warmup 1 --repeats 3 --providers $P > /dev/null
  echo "encode rc $?"
fi
if has 720p; then
  timeout 200 $B --op vae-decode --shape wan-vae-720p-fp32 --warmup 1 --repeats 3 --providers $P > /dev/null
  echo "decode 720p rc $?"
  timeout 150 $B --op vae-encode --shape wan-vae-720p-fp32 --warmup 1 --repeats 3 --providers $P > /dev/null
  echo "encode 720p rc $?"
fi
if ! has notests && ! has vaefirst; then  # last: the device time may run out first
  timeout -s INT -k 10 150 python3 -m pytest -m gpu -q -s -p no:cacheprovider --tb=short tests/test_wan_vae.py -k fp32 \
    > "$OUT/pytest-vae.log" 2>&1; echo "vae tests rc $?"
  grep -E "FAILED|ERROR|passed|failed|^fp32" "$OUT/pytest-vae.log" | head -30
fi
kill %1 2>/dev/null
python3 -m bench.table "$OUT/results.jsonl"
