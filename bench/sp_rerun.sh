#!/usr/bin/env bash
# The SP scaling rows alone (a repeat of multi_gpu_run.sh's phase 1 and the 2-GPU run), for a second
# measurement in another machine session: 4 GPUs, then GPUs 0,1 over 2 while GPUs 2,3 run VKERN_TESTS
# (default: the NCCL tests).
# Usage on a 4-GPU machine (carry .whl): VKERN_COMMIT=<sha> [VKERN_TESTS=...] bash bench/sp_rerun.sh
set -uo pipefail
. bench/device_env.sh
build_vkern
SP="-m bench.sp_run --size 14b --res 720p --repeats 3 --out $OUT/sp.jsonl"
V=vkern-sp,vkern-sp-v-first,vkern-sp-one-exchange,vkern-sp-copy
torchrun --nproc-per-node 4 $SP --providers vkern,$V 2>&1 | grep -v "^{" | tail -8
( CUDA_VISIBLE_DEVICES=0,1 torchrun --nproc-per-node 2 --master-port 29511 $SP --providers $V 2>&1 | grep -v "^{" | tail -6 ) &
( CUDA_VISIBLE_DEVICES=2,3 timeout -s INT 200 python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short -s \
    ${VKERN_TESTS:--k "nccl or NCCL" tests/test_sequence_parallel.py tests/test_sp_wan.py tests/test_ring.py} \
    > "$OUT/pytest.log" 2>&1; tail -5 "$OUT/pytest.log" ) &
wait
