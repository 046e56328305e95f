#!/usr/bin/env bash
# One call on a 4-GPU machine (device time is scarce; multi-GPU kinds count in full):
#   phase 1, all 4 GPUs: Wan-14B 720p step on 1 GPU (vkern) vs Ulysses over 4 (vkern-sp and its A/B
#            variants), and diffusers' context parallel;
#   phase 2, at once: GPUs 0,1 the same over 2, the NCCL tests, then (one GPU each) the fp8 accuracy
#            report at 1.3B and the Wan-1.3B step rows; GPU 2 pytest -m gpu (single-GPU tests);
#            GPU 3 the fp8 accuracy report at 14B, then the Wan-14B 480p step rows.
# Usage on the GPU machine, from the repo root (carry .whl): VKERN_COMMIT=<sha> bash bench/multi_gpu_run.sh
# Knobs: VKERN_SP_VARIANTS (SP providers, default the A/B set below), VKERN_SP_PROFILE=1 (one profiled step per
# rank after each SP row: sp_run --profile), VKERN_FP8ACC=0 (skip the fp8 accuracy reports), VKERN_ATTN_SHAPES
# (attention rows on GPU 3 before its step rows), VKERN_STEP_PROVIDERS, VKERN_TESTS, VKERN_TEST_TIMEOUT.
set -uo pipefail
. bench/device_env.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
build_vkern
SP="-m bench.sp_run --size 14b --res 720p --repeats 2 --out $OUT/sp.jsonl --world1 $OUT/world1-14b-720p.pt"
[ "${VKERN_SP_PROFILE:-0}" = 1 ] && SP="$SP --profile"
SP_VARIANTS=${VKERN_SP_VARIANTS:-vkern-sp,vkern-sp-one-exchange,vkern-sp-copy}
FP8ACC=${VKERN_FP8ACC:-1}
B="python3 -m bench.bench --out $OUT/results.jsonl --warmup 2 --repeats 5"
date +%T
echo "== phase 1: 4 GPUs"
torchrun --nproc-per-node 4 $SP --providers vkern,$SP_VARIANTS,diffusers-cp 2>&1 | tail -15
date +%T
echo "== phase 2"
( CUDA_VISIBLE_DEVICES=0,1 torchrun --nproc-per-node 2 --master-port 29511 $SP --providers $SP_VARIANTS \
    > "$OUT/sp2.log" 2>&1
  CUDA_VISIBLE_DEVICES=0,1 timeout -s INT -k 20 150 python3 -m pytest -m gpu -v -p no:cacheprovider --tb=short \
    -k "nccl or NCCL" tests/test_sequence_parallel.py tests/test_sp_wan.py tests/test_ring.py > "$OUT/pytest-nccl.log" 2>&1
  ( [ "$FP8ACC" = 1 ] && CUDA_VISIBLE_DEVICES=0 python3 -m bench.fp8_accuracy --size 1.3b --res 480p \
      --out "$OUT/results.jsonl" > "$OUT/fp8acc-1.3b.log" 2>&1 ) &
  ( CUDA_VISIBLE_DEVICES=1 $B --op step --shape wan1.3b-480p \
      --providers diffusers,diffusers-fp8-layerwise,vkern,vkern-fp8-storage,vkern-fp8-compute > "$OUT/steps-1.3b.log" 2>&1 ) &
  wait
) &
( CUDA_VISIBLE_DEVICES=2 timeout -s INT -k 30 ${VKERN_TEST_TIMEOUT:-330} python3 -m pytest -m gpu -v -p no:cacheprovider \
    --tb=short --durations=25 ${VKERN_TESTS:-tests} > "$OUT/pytest.log" 2>&1 ) &
( [ "$FP8ACC" = 1 ] && CUDA_VISIBLE_DEVICES=3 python3 -m bench.fp8_accuracy --size 14b --res 480p \
    --out "$OUT/results.jsonl" > "$OUT/fp8acc-14b.log" 2>&1
  [ -n "${VKERN_ATTN_SHAPES:-}" ] && CUDA_VISIBLE_DEVICES=3 $B --op attention --shape "$VKERN_ATTN_SHAPES" \
    --providers cudnn,fa2,vkern-bf16,vkern-cuda,vkern > "$OUT/attention.log" 2>&1
  CUDA_VISIBLE_DEVICES=3 $B --op step --shape wan14b-480p --providers ${VKERN_STEP_PROVIDERS:-diffusers,vkern-chunked} \
    > "$OUT/steps-14b.log" 2>&1 ) &
wait
date +%T
tail -8 "$OUT/sp2.log"; grep -E "FAILED|ERROR|passed|failed" "$OUT/pytest-nccl.log" | tail -5
grep -E "FAILED|ERROR" "$OUT/pytest.log" | head -20; tail -3 "$OUT/pytest.log"
[ "$FP8ACC" = 1 ] && tail -25 "$OUT/fp8acc-1.3b.log" "$OUT/fp8acc-14b.log"
python3 -m bench.table "$OUT/sp.jsonl" "$OUT/results.jsonl"
