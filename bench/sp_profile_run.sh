#!/usr/bin/env bash
# Issue 7's diagnosis in one call on a 4-GPU machine (carry .whl):
#   phase 1, 4 GPUs: Wan-14B 720p on 1 GPU (every GPU at once) and Ulysses over 4, each row followed by one
#            profiled step per rank (sp_run --profile: compute, exposed and hidden NCCL, idle, per class);
#   phase 2, 4 GPUs: the same SP row with NCCL's channels capped (NCCL_MAX_NCHANNELS=16, 8): fewer SMs
#            taken from the GEMMs that the early exchanges overlap, at a lower wire rate;
#   phase 3, at once: GPUs 0,1 the profiled SP row over 2; GPU 2 the Wan VAE decode rows (the bench no
#            longer holds diffusers' output on the GPU while it measures vkern's peak).
# Usage on the GPU machine, from the repo root: VKERN_COMMIT=<sha> bash bench/sp_profile_run.sh
set -uo pipefail
. bench/device_env.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
build_vkern
python3 -c "import torch; print('torch', torch.__version__, 'nccl', torch.cuda.nccl.version())" | tee "$OUT/nccl.txt"
W1="$OUT/world1-14b-720p.pt"
SP="-m bench.sp_run --size 14b --res 720p --repeats 3 --world1 $W1 --profile --out $OUT/sp.jsonl"
date +%T; echo "== phase 1"
torchrun --nproc-per-node 4 $SP --providers vkern,vkern-sp 2>&1 | grep -v "^{" | tail -4
for n in 16 8; do
  date +%T; echo "== phase 2: NCCL_MAX_NCHANNELS=$n"
  NCCL_MAX_NCHANNELS=$n torchrun --nproc-per-node 4 $SP --providers vkern-sp 2>&1 | grep -v "^{" | tail -2
done
date +%T; echo "== phase 3"
( CUDA_VISIBLE_DEVICES=0,1 torchrun --nproc-per-node 2 --master-port 29511 $SP --providers vkern-sp \
    > "$OUT/sp2.log" 2>&1; grep -v "^{" "$OUT/sp2.log" | tail -2 ) &
( CUDA_VISIBLE_DEVICES=2 python3 -m bench.bench --out "$OUT/vae.jsonl" --warmup 2 --repeats 5 --op vae-decode \
    --shape wan-vae-480p,wan-vae-720p --providers diffusers,vkern > "$OUT/vae.log" 2>&1; tail -8 "$OUT/vae.log" ) &
wait
date +%T
python3 - "$OUT/sp.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r["op"] == "sp-profile":
        for i, s in enumerate(r["ranks"]):
            print(r["provider"], r["world"], r["nccl_env"].get("NCCL_MAX_NCHANNELS", "-"), "rank", i,
                  " ".join(f"{k[:-3]} {v:.1f}" for k, v in s.items() if k.endswith("_ms")))
PY
