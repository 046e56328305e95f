#!/usr/bin/env bash
# Everything the GPU machine proves, in one call (device time is scarce):
#   build vkern._C with pip (ptxas report + SASS summary), vkern info, pytest -m gpu, the demo at a
#   real shape, and the benchmarks side by side, rows to $OUT/results.jsonl, a table printed last.
# Usage on the GPU machine, from the repo root (carry .whl made by ../shared/device/wheels.sh):
#   VKERN_COMMIT=<sha> bash bench/gpu_run.sh [tests] [quick] [attention] [steps] [vae] [big] [selfattn] [flash] [profile] [vaeprof] [memory] [vaenorm] [fp8acc] [spshard] [vaeab] [vaemem] [vaesteps] [fp8attn] [compile] [families] [familysteps] [familysteps2] [gluesteps] [skyreelssteps] [vacesteps] [prologues] [familyprof]
#     tests: build, info, pytest -m gpu, demo; quick: fp8 quantize, QK prologue, GEMMs, Wan-1.3B step;
#     attention: SDPA backends vs vkern's kernel (exact and 8-bit); steps: Wan-1.3B step per attention mode;
#     vae: Wan VAE conv/decode/encode; big: Wan-14B 480p step (every provider builds its own 14B model);
#     selfattn: Wan self-attention module per processor; flash: the CUDA attention kernel (SASS summary, rows
#     vs cuDNN and the Triton kernel); profile: 14B step GPU time by class;
#     vaeprof: VAE decode/encode GPU time by class + decode rows; fp8acc: fp8 storage/compute accuracy on
#     Wan-1.3B and 14B 480p (per-layer SQNR, output cosine vs floors; table in $OUT/fp8_accuracy.md);
#     compile: Wan-14B 480p steps with and without diffusers' compile_repeated_blocks(fullgraph=True) (-compile);
#     families: HunyuanVideo's (1.0, 1.5), CogVideoX-5B's, LTX-Video's (1.0, 2) and Mochi's attention module per processor and
#     SDPA backend (Hunyuan 720p at 129 and 33 frames, 1.5 at 480p; pair with tests, VKERN_TESTS="tests/test_model_families.py
#     tests/test_hunyuan.py tests/test_hunyuan15.py tests/test_cogvideox.py tests/test_ltx.py tests/test_ltx2.py
#     tests/test_mochi.py tests/test_skyreels.py tests/test_wan_vace.py");
#     familysteps: their steps (HunyuanVideo-13B 720p x 33 frames, CogVideoX-5B 480p, LTX-Video 512p, Mochi-10B
#     480p: diffusers, vkern, and int8pv at head dim 128; all four also vkern with diffusers' block glue), each
#     shape under its own timeout (a call of its own: ~8 min);
#     familysteps2: HunyuanVideo-1.5 8B 480p x 121 frames (diffusers, vkern, int8pv, vkern with diffusers' block
#     glue) and LTX-2 19B 512p (diffusers, vkern, vkern with diffusers' block glue), each under its own timeout (a
#     call of its own);
#     gluesteps: every family's step with the fused block glue on and off (vkern-fused-blocks, vkern-diffusers-blocks; diffusers
#     too for LTX-Video and Mochi); VKERN_GLUE_SHAPES: a subset of the step shapes, VKERN_GLUE_CAP: seconds per shape;
#     skyreelssteps: SkyReels-V2 14B 480p steps, plain and diffusion forcing (diffusers, vkern, vkern with diffusers'
#     block glue; a call of its own);
#     vacesteps: Wan VACE 14B 480p and FramePack 13B 720p steps (diffusers, vkern, vkern with diffusers' block glue;
#     VKERN_VACE_SHAPES: the step shapes instead, any of bench/shapes.py STEPS, e.g. "wan22-ti2v5b-720p ltx13b-512p
#     cogvideox15-5b-768p" (session 45's rows), VKERN_VACE_CAP: seconds per shape);
#     prologues: the QK prologue kernel alone vs diffusers' ops (Wan's shapes; LTX-Video's and LTX-2's, family-prologue)
#     and the LTX attention modules with it fused and unfused;
#     familyprof: the LTX-Video 2B 512p step's GPU time by kernel class and top kernels (diffusers, vkern, and vkern
#     with diffusers' block glue: vkern-diffusers-blocks);
#     memory: the allocations live at the 14B 480p step's peak (bench/memory_trace.py; chunked, bf16 and fp8
#     attention) and the chunked 14B 480p / 720p step rows with their activation peaks;
#     vaenorm: the VAE's RMS norm + SiLU kernel vs a copy, exact vs fast variant (bench/vae_norm_probe.py);
#     spshard: one SP rank's share of a Wan-14B 720p block at 1/2/4/8 ranks, no communication
#     (bench/sp_shard_probe.py: the compute-only scaling ceiling).
#     vaemem: diffusers' and vkern's 480p decode peaks, allocated and reserved, under inference_mode, no_grad
#     and cuDNN benchmark mode (bench/vae_memory_stats.py: which statistic ANCHORS.md's 17.8 GiB is);
#     vaesteps: decode (480p, 720p: diffusers, vkern, output on the CPU; 480p in 1- and 2-frame steps) and
#     encode rows of the default path only;
#     fp8attn: fp8 attention rows (the CUDA 8-bit kernel's forms; VKERN_FP8_ROWS: the providers) vs cuDNN bf16
#     and their accuracy on random and WanAttention inputs (bench/fp8_attention_accuracy.py);
#     VKERN_TESTS: test paths (default tests); VKERN_PYTEST_K: a pytest -k expression over them; VKERN_SKIP_DEMO=1:
#     no demo after the tests
set -uo pipefail
MODES=" ${*:-tests quick} "
. bench/device_env.sh
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"

echo "== build"
VKERN_PTXAS_VERBOSE=1 python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 \
  || { tail -40 "$OUT/build.log"; exit 1; }
so=$(ls vkern/_C*.so)
{ echo "== ptxas"; grep -E "Compiling entry|registers|spill" "$OUT/build.log";
  echo "== SASS instruction counts per kernel (16-byte LDG.E.128 / STG.E.128 expected on the vector path)";
  cuobjdump --dump-sass "$so" | awk '/Function :/{f=$3} /LDG|STG|F2FP/{split($2,a," "); c[f" "$2]++} END{for(k in c) print c[k], k}' | sort -k2; } > "$OUT/sass.txt"
python3 -m vkern info | tee "$OUT/info.txt"

tests_rc=0
if [[ $MODES == *" tests "* ]]; then
  echo "== pytest -m gpu"
  # SIGINT at the limit: pytest stops and still prints the failures' tracebacks and the durations.
  timeout -s INT -k 30 ${VKERN_TEST_TIMEOUT:-300} python3 -m pytest -m gpu -v -p no:cacheprovider --tb=short \
    --durations=25 ${VKERN_TESTS:-tests} ${VKERN_PYTEST_K:+-k "$VKERN_PYTEST_K"} > "$OUT/pytest.log" 2>&1
  tests_rc=$?
  grep -E "FAILED|ERROR" "$OUT/pytest.log" | head -20; tail -3 "$OUT/pytest.log"
  if [[ -z ${VKERN_SKIP_DEMO:-} ]]; then
    echo "== demo"
    python3 -m vkern demo --size 1.3b --res 480p 2>&1 | tee "$OUT/demo.txt"
  fi
fi

echo "== bench"
B="python3 -m bench.bench --out $OUT/results.jsonl --warmup 2 --repeats 5"
if [[ $MODES == *" quick "* ]]; then
  $B --op fp8-quantize --repeats 20
  $B --op qk-norm-rope --shape wan1.3b-480p,wan14b-480p,wan14b-720p --repeats 20
  $B --op gemm
  $B --op step --shape wan1.3b-480p
fi
if [[ $MODES == *" spshard "* ]]; then
  python3 -m bench.sp_shard_probe --shape wan14b-720p --out $OUT/results.jsonl
fi
if [[ $MODES == *" flash "* ]]; then  # the CUDA attention kernel against cuDNN, the Triton kernel and flash-attn where installed
  cuobjdump --dump-sass "$so" | awk '/Function :.*flash_fwd/{f=1} /Function :/ && !/flash_fwd/{f=0} f' > "$OUT/flash_sass.txt"
  echo "flash SASS: $(grep -c HGMMA "$OUT/flash_sass.txt") HGMMA, $(grep -c 'WARPGROUP.DEPBAR' "$OUT/flash_sass.txt") waits"
  $B --op attention --shape wan1.3b-480p,wan14b-480p,wan14b-720p,hunyuan-720p --providers cudnn,vkern-bf16,vkern-cuda,flash-attn --repeats 5
  # head dim 64: every SDPA backend (the target is the best of them), both vkern kernels, auto (vkern)
  $B --op attention --shape cogvideox-5b,ltx-512p,ltx-512p-cross --providers cudnn,fa2,efficient,flash-attn,vkern-bf16,vkern-cuda,vkern --repeats 5
fi
if [[ $MODES == *" fp8attn "* ]]; then  # fp8 attention: the CUDA kernel's e4m3 form vs cuDNN bf16 and the Triton kernel
  $B --op attention --shape wan1.3b-480p,wan14b-480p,wan14b-720p,hunyuan-720p \
    --providers ${VKERN_FP8_ROWS:-cudnn,vkern-cuda,vkern-fp8-cuda,vkern-int8-fp8pv-cuda,vkern-int8pv-cuda,vkern-fp8-cuda-kernel,vkern-int8-fp8pv-cuda-kernel,vkern-int8pv-cuda-kernel} --repeats 5
  python3 -m bench.fp8_attention_accuracy --out "$OUT/results.jsonl" | tee "$OUT/fp8-attention-accuracy.txt"
fi
if [[ $MODES == *" attention "* ]]; then
  $B --op attention --shape wan1.3b-480p,wan14b-480p,wan14b-720p,hunyuan-720p,cogvideox-5b,ltx-512p --repeats 3
fi
if [[ $MODES == *" steps "* ]]; then
  $B --op step --shape wan1.3b-480p --providers diffusers,vkern,vkern-attn-bf16,vkern-attn-int8,vkern-attn-fp8,vkern-fp8-compute,vkern-fp8-compute-attn-fp8
fi
if [[ $MODES == *" vae "* ]]; then
  $B --op vae-conv --repeats 10
  $B --op vae-decode --shape wan-vae-480p,wan-vae-720p
  $B --op vae-encode --shape wan-vae-480p,wan-vae-720p
fi
if [[ $MODES == *" vaemem "* ]]; then  # first: a fresh process whose cuDNN has not seen the shapes
  python3 -m bench.vae_memory_stats --res 480p --out "$OUT/results.jsonl"
fi
if [[ $MODES == *" vaesteps "* ]]; then
  $B --op vae-decode --shape wan-vae-480p,wan-vae-720p --providers diffusers,vkern,vkern-cpu-output
  for n in 1 2; do VKERN_WAN_VAE_FRAMES_PER_STEP=$n $B --op vae-decode --shape wan-vae-480p --providers vkern; done
  $B --op vae-encode --shape wan-vae-480p,wan-vae-720p --providers diffusers,vkern
fi
if [[ $MODES == *" vaeab "* ]]; then  # the VAE's default path vs every conv on cuDNN vs the path of runs 19-21
  $B --op vae-decode --shape wan-vae-480p,wan-vae-720p --providers diffusers,vkern,vkern-cudnn,vkern-unfused
  $B --op vae-encode --shape wan-vae-480p,wan-vae-720p --providers diffusers,vkern,vkern-cudnn,vkern-unfused
fi
if [[ $MODES == *" selfattn "* ]]; then
  $B --op wan-self-attn --shape wan14b-480p,wan1.3b-480p
fi
if [[ $MODES == *" big "* ]]; then
  $B --op step --shape wan14b-480p --providers diffusers,diffusers-fp8-layerwise,vkern,vkern-chunked,vkern-fp8-storage,vkern-fp8-compute,vkern-fp8-compute-attn-fp8,vkern-fp8-compute-chunked-attn-fp8
fi
if [[ $MODES == *" families "* ]]; then
  timeout -k 10 360 $B --op attn-module --shape hunyuan-720p,hunyuan-720p-33f,hunyuan15-480p,cogvideox-5b,ltx-512p,ltx2-512p,mochi-480p,skyreels-540p-df
fi
if [[ $MODES == *" familysteps "* ]]; then
  # (the caps sum to under the 600 s of a call; run 142 took ~285 s for these shapes with fewer providers)
  # every family's fused block glue on and off (-diffusers-blocks), side by side
  timeout -k 10 200 $B --op step --shape hunyuan13b-720p-33f --step-repeats 3 \
    --providers diffusers,vkern,vkern-attn-int8pv,vkern-diffusers-blocks
  timeout -k 10 170 $B --op step --shape mochi10b-480p --step-repeats 3 --providers diffusers,vkern,vkern-attn-int8pv,vkern-diffusers-blocks
  timeout -k 10 120 $B --op step --shape cogvideox5b-480p --step-repeats 3 --providers diffusers,vkern,vkern-diffusers-blocks
  timeout -k 10 100 $B --op step --shape ltx2b-512p --step-repeats 3 --providers diffusers,vkern,vkern-diffusers-blocks
fi
if [[ $MODES == *" gluesteps "* ]]; then
  # The fused block glue on and off only (vkern-fused-blocks vs vkern-diffusers-blocks; diffusers too for LTX-Video and
  # Mochi), each
  # shape under its own cap; VKERN_GLUE_SHAPES picks a subset so the list can be split over calls.
  for shape in ${VKERN_GLUE_SHAPES:-ltx2b-512p cogvideox5b-480p mochi10b-480p ltx2-19b-512p skyreels14b-480p hunyuan13b-720p-33f}; do
    providers=vkern-fused-blocks,vkern-diffusers-blocks
    [[ $shape == ltx2b-512p || $shape == mochi10b-480p ]] && providers=diffusers,$providers
    timeout -k 10 ${VKERN_GLUE_CAP:-200} $B --op step --shape $shape --step-repeats 3 --providers $providers
  done
fi
if [[ $MODES == *" skyreelssteps "* ]]; then  # Wan's fused glue in SkyReels-V2's blocks, on and off
  for shape in skyreels14b-480p skyreels14b-480p-df; do
    timeout -k 10 280 $B --op step --shape $shape --step-repeats 3 --providers diffusers,vkern,vkern-diffusers-blocks
  done
fi
if [[ $MODES == *" vacesteps "* ]]; then  # the first step rows of Wan VACE and FramePack (fused glue on and off)
  for shape in ${VKERN_VACE_SHAPES:-wan-vace14b-480p framepack13b-720p}; do
    timeout -k 10 ${VKERN_VACE_CAP:-250} $B --op step --shape $shape --step-repeats 3 \
      --providers diffusers,vkern,vkern-diffusers-blocks
  done
fi
if [[ $MODES == *" familysteps2 "* ]]; then
  timeout -k 10 380 $B --op step --shape hunyuan15-8b-480p --step-repeats 3 \
    --providers diffusers,vkern,vkern-attn-int8pv,vkern-diffusers-blocks
  timeout -k 10 200 $B --op step --shape ltx2-19b-512p --step-repeats 3 --providers diffusers,vkern,vkern-diffusers-blocks
fi
if [[ $MODES == *" prologues "* ]]; then
  $B --op qk-norm-rope --shape wan1.3b-480p,wan14b-480p,wan14b-720p --providers diffusers,vkern --repeats 20
  $B --op family-prologue --shape ltx-512p,ltx2-512p --repeats 20
  $B --op attn-module --shape ltx-512p,ltx2-512p --providers diffusers,vkern-auto,vkern-auto-unfused --repeats 10
fi
if [[ $MODES == *" familyprof "* ]]; then
  python3 -m bench.profile_step --family ltx --size 2b --res 512p --providers diffusers,vkern,vkern-diffusers-blocks \
    --out $OUT/results.jsonl \
    2>&1 | grep -v -e Warning -e USDT | tail -12
fi
if [[ $MODES == *" compile "* ]]; then  # against diffusers' regional compilation; VKERN_COMPILE_ROWS: the providers
  $B --op step --shape wan14b-480p --step-repeats 3 --providers ${VKERN_COMPILE_ROWS:-diffusers,diffusers-compile,vkern,vkern-compile,vkern-attn-int8pv,vkern-attn-int8pv-compile}
fi
if [[ $MODES == *" memory "* ]]; then  # issue 5: what is alive at the 14B step's peak, then the step rows (480p, 720p)
  python3 -m bench.memory_trace --size 14b --res 480p --providers vkern-chunked,vkern-chunked-attn-fp8 \
    --json "$OUT/memory_trace.json" 2>&1 | grep -v Warning | tee "$OUT/memory_trace.txt"
  python3 -m bench.bench --out $OUT/results.jsonl --warmup 1 --repeats 3 --op step --shape wan14b-480p \
    --providers diffusers,vkern-chunked-attn-fp8,vkern-fp8-compute-chunked-attn-fp8
  python3 -m bench.bench --out $OUT/results.jsonl --warmup 1 --repeats 2 --op step --shape wan14b-720p \
    --providers diffusers,vkern-chunked-attn-fp8,vkern-fp8-compute-chunked-attn-fp8
fi
if [[ $MODES == *" vaenorm "* ]]; then
  python3 -m bench.vae_norm_probe --out "$OUT/results.jsonl" 2>&1 | tee "$OUT/vae_norm_probe.md"
fi
if [[ $MODES == *" profile "* ]]; then
  python3 -m bench.profile_step --size 14b --res 480p --providers diffusers,vkern-chunked,vkern-fp8-compute-chunked \
    --out "$OUT/results.jsonl" 2>&1 | tail -30
fi
if [[ $MODES == *" vaeprof "* ]]; then
  python3 -m bench.profile_vae --res 480p --providers diffusers,vkern,vkern-cudnn --out "$OUT/results.jsonl" \
    --md "$OUT/profile_vae.md" 2>&1 | tail -60
  [[ $MODES == *" vae "* || $MODES == *" vaeab "* ]] || $B --op vae-decode --shape wan-vae-480p --providers diffusers,vkern,vkern-cudnn
fi
if [[ $MODES == *" fp8acc "* ]]; then
  python3 -m bench.fp8_accuracy --size 1.3b,14b --res 480p --out "$OUT/results.jsonl" 2>&1 | tee "$OUT/fp8_accuracy.md"
fi
python3 -m bench.table "$OUT/results.jsonl"
echo "pytest -m gpu exit code: $tests_rc"
exit $tests_rc
