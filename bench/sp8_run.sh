#!/usr/bin/env bash
# Issue 8 in one call on an 8-GPU machine (multi-GPU kinds count in full: keep it to one call):
#   phase 1, 8 GPUs: Wan-14B 720p on 1 GPU (vkern, on every GPU at once) vs Ulysses over 8 (vkern-sp),
#            and diffusers' context parallel; the world-1 ms and output are saved for phase 2;
#   phase 2, at once: GPUs 0-3 the same over 4, GPUs 4,5 over 2 (speedups and rel. L2 against
#            phase 1's world-1 row), GPUs 6,7 the 2-rank NCCL tests;
#   phase 3, 8 GPUs: Wan-1.3B (12 heads) at 720p and 480p: head padding (vkern-sp, 12 -> 16 heads),
#            Ulysses x ring (ring2: 4 x 2, ring4: 2 x 4), pure ring, each against 1 GPU;
#   phase 4, 8 GPUs: the 8-rank NCCL tests (hybrid ring included), then phase 1's SP rows again.
# Usage on the GPU machine, from the repo root (carry .whl): VKERN_COMMIT=<sha> bash bench/sp8_run.sh [tests]
#   tests: only the 8-rank NCCL tests (phase 4's first half)
set -uo pipefail
. bench/device_env.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
nvidia-smi topo -m > "$OUT/topo.txt" 2>&1
build_vkern
NCCL_TESTS="tests/test_sequence_parallel.py tests/test_sp_wan.py"
if [[ "${1:-}" == tests ]]; then
  timeout -s INT -k 20 240 python3 -m pytest -m gpu -v -p no:cacheprovider --tb=short -k "nccl and 8" $NCCL_TESTS \
    > "$OUT/pytest-nccl8.log" 2>&1
  rc=$?; grep -E "PASSED|FAILED|ERROR|passed|failed" "$OUT/pytest-nccl8.log" | tail -4; exit $rc
fi
W1="$OUT/world1-14b-720p.pt"
SP14="-m bench.sp_run --size 14b --res 720p --repeats 3 --world1 $W1"
date +%T; echo "== phase 1: 14B over 8"
torchrun --nproc-per-node 8 $SP14 --out "$OUT/sp8.jsonl" --providers vkern,vkern-sp,diffusers-cp 2>&1 | grep -v "^{" | tail -6
date +%T; echo "== phase 2: 14B over 4 and 2; NCCL tests at 2"
( CUDA_VISIBLE_DEVICES=0,1,2,3 torchrun --nproc-per-node 4 --master-port 29511 $SP14 --out "$OUT/sp4.jsonl" \
    --providers vkern-sp,diffusers-cp > "$OUT/sp4.log" 2>&1 ) &
( CUDA_VISIBLE_DEVICES=4,5 torchrun --nproc-per-node 2 --master-port 29512 $SP14 --out "$OUT/sp2.jsonl" \
    --providers vkern-sp,diffusers-cp > "$OUT/sp2.log" 2>&1 ) &
( CUDA_VISIBLE_DEVICES=6,7 timeout -s INT -k 20 200 python3 -m pytest -m gpu -v -p no:cacheprovider --tb=short \
    -k "nccl and 2" $NCCL_TESTS > "$OUT/pytest-nccl2.log" 2>&1 ) &
wait
grep -v "^{" "$OUT/sp4.log" | tail -3; grep -v "^{" "$OUT/sp2.log" | tail -3
grep -E "PASSED|FAILED|ERROR|passed|failed" "$OUT/pytest-nccl2.log" | tail -4
for res in 720p 480p; do
  date +%T; echo "== phase 3: 1.3B $res over 8"
  torchrun --nproc-per-node 8 -m bench.sp_run --size 1.3b --res $res --repeats 3 --out "$OUT/sp8-1.3b.jsonl" \
    --providers diffusers,vkern,vkern-sp,vkern-sp-ring2,vkern-sp-ring4,vkern-sp-ring,diffusers-cp 2>&1 \
    | grep -v "^{" | tail -8
done
date +%T; echo "== phase 4: NCCL tests at 8, then 14B over 8 again"
timeout -s INT -k 20 240 python3 -m pytest -m gpu -v -p no:cacheprovider --tb=short -k "nccl and 8" $NCCL_TESTS \
  > "$OUT/pytest-nccl8.log" 2>&1
grep -E "PASSED|FAILED|ERROR|passed|failed" "$OUT/pytest-nccl8.log" | tail -4
torchrun --nproc-per-node 8 $SP14 --out "$OUT/sp8-again.jsonl" --providers vkern-sp 2>&1 | grep -v "^{" | tail -3
date +%T
cat "$OUT"/sp8.jsonl "$OUT"/sp4.jsonl "$OUT"/sp2.jsonl "$OUT"/sp8-1.3b.jsonl "$OUT"/sp8-again.jsonl > "$OUT/sp.jsonl" 2>/dev/null
rm -f "$W1"
