#!/usr/bin/env bash
# The narrow conv (block_n 8, the RGB output: 4 output frames per tile, session 55) against the kernel before it, in
# two GPU calls (bench/ext_ab.sh builds the tree and each _ab/<version>/csrc/ variant, e.g. old):
#   a: the builds, the CUDA conv's GPU tests on the new one, the RGB conv layer A/B (bf16 and fp32 on TF32-rounded
#      inputs, 4- and 2-frame calls) and the bf16 96 -> 96 layer (the wide form's code moved: it should not);
#   b: the CUDA conv's and the Wan VAE's GPU tests, the 480p decode A/B (bf16, fp32; vkern's defaults);
#   ncu (either): ncu of one RGB conv launch per dtype (NCU_DTYPES; the new build); vae (a): the Wan VAE's GPU tests
#   after the layers, decode (a): the new build's 480p decodes (one call: machines go back after 30 s idle);
#   l2 (a, b): ncu's L2 throughput breakdown and L2 request / sector counters of one RGB conv launch (bf16, 4
#   frames) in each build of L2_VERSIONS (default "old new") and of one 96 -> 96 launch (new).
# Usage: VKERN_COMMIT=<sha> [AB_ORDER=...] [L2_VERSIONS=...] bash bench/conv_narrow_run.sh a|b [ncu] [vae] [decode]
# [l2]  (carry .whl; _ab/ untracked)
set -uo pipefail
. bench/device_env.sh
B="python3 -m bench.bench --out $OUT/results.jsonl"
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw --format=csv,noheader -l 2 > "$OUT/clocks.csv" &
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader
RGB=dec-out-96to3-480x832,dec-out-96to3-480x832-2f
rgb_ncu() {  # ncu of one RGB conv launch (4 frames) per dtype, the new build
  local stalls="regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" dt
  for dt in ${NCU_DTYPES:-bfloat16:vkern-cuda float32:vkern-cuda-tf32-inputs}; do
    timeout 90 ncu --clock-control none -k regex:causal_conv3d_kernel -c 1 --section SpeedOfLight \
      --section MemoryWorkloadAnalysis --section WarpStateStats \
      --metrics "regex:sm__pipe_tensor.*_cycles_active\.avg\.pct_of_peak_sustained_active,$stalls" \
      python3 -m bench.bench --op vae-conv --dtype "${dt%%:*}" --shape dec-out-96to3-480x832 --providers "${dt#*:}" \
      --warmup 0 --repeats 1 > "$OUT/ncu-rgb-${dt%%:*}.txt" 2>&1
    echo "ncu ${dt%%:*} rc $?"
    grep -E "Duration|L2 Cache Throughput|DRAM Throughput|Shared|pipe_tensor|long_scoreboard" \
      "$OUT/ncu-rgb-${dt%%:*}.txt" | head -12
  done
}
l2_ncu() {  # what keeps L2 busy: the breakdown of lts__throughput and the requests / sectors by source
  local so m name ver shape
  so=$(ls vkern/_C*.so | head -1)
  m="breakdown:lts__throughput.avg.pct_of_peak_sustained_elapsed"
  timeout 90 ncu --query-metrics --chip gh100 > /tmp/ncu-metrics-gh100.txt 2>&1
  # the raw counters this ncu knows (an unknown name fails the whole run)
  for name in lts__t_requests_srcunit_tex lts__t_sectors_srcunit_tex lts__t_requests_srcunit_tex_op_read \
      lts__t_sectors_srcunit_tex_op_read lts__t_sectors_srcunit_tex_op_write lts__t_sectors_srcunit_ltcfabric \
      lts__t_sectors_srcunit_tex_lookup_hit lts__t_sectors_srcunit_tex_lookup_miss lts__t_tag_requests \
      lts__t_sectors lts__d_sectors_fill_device lts__t_sectors_srcnode_gpc dram__bytes_read dram__bytes_write \
      l1tex__m_xbar2l1tex_read_bytes l1tex__m_l1tex2xbar_req; do
    grep -qE "^\s*$name\s" /tmp/ncu-metrics-gh100.txt && m="$m,$name.sum"
  done
  echo "l2 metrics: $m"
  local runs="" v
  for v in ${L2_VERSIONS:-old new}; do runs="$runs $v:dec-out-96to3-480x832"; done
  for ver_shape in $runs new:dec-3x3x3-96ch-480x832; do
    ver=${ver_shape%%:*} shape=${ver_shape#*:}
    cp "build/ab/$ver.so" "$so"
    timeout 120 ncu --clock-control none -k regex:causal_conv3d_kernel -c 1 --section SpeedOfLight --metrics "$m" \
      python3 -m bench.bench --op vae-conv --dtype bfloat16 --shape "$shape" --providers vkern-cuda \
      --warmup 0 --repeats 1 > "$OUT/ncu-l2-$ver-$shape.txt" 2>&1
    echo "ncu l2 $ver $shape rc $?"
    grep -E "Duration|L2 Cache Throughput|lts__|dram__|l1tex__m" "$OUT/ncu-l2-$ver-$shape.txt" | head -40
  done
  cp build/ab/new.so "$so"
}
case ${1:-a} in
  a)
    AB_ORDER=new bash bench/ext_ab.sh true
    timeout -s INT -k 10 240 python3 -m pytest -m gpu -q -s -p no:cacheprovider --tb=short \
      tests/test_causal_conv_cuda.py > "$OUT/pytest-conv.log" 2>&1
    echo "conv tests rc $?"
    grep -E "FAILED|ERROR|passed|failed" "$OUT/pytest-conv.log" | head -30
    AB_ORDER=${AB_ORDER:-"old new old new"} bash bench/ext_ab.sh \
      "$B --op vae-conv --shape $RGB,dec-3x3x3-96ch-480x832 --providers vkern-cuda --warmup 3 --repeats 20" \
      "$B --op vae-conv --dtype float32 --shape $RGB --providers vkern-cuda-tf32-inputs --warmup 3 --repeats 20"
    if [[ " $* " == *" vae "* ]]; then  # the Wan VAE's GPU tests and the new build's 480p decodes
      timeout -s INT -k 10 150 python3 -m pytest -m gpu -q -s -p no:cacheprovider --tb=short tests/test_wan_vae.py \
        > "$OUT/pytest-vae.log" 2>&1
      echo "vae tests rc $?"
      grep -E "FAILED|ERROR|passed|failed" "$OUT/pytest-vae.log" | head -20
    fi
    [[ " $* " == *" ncu "* ]] && rgb_ncu
    [[ " $* " == *" l2 "* ]] && l2_ncu
    if [[ " $* " == *" decode "* ]]; then
      timeout 60 $B --op vae-decode --shape wan-vae-480p --providers vkern --warmup 1 --repeats 5 > /dev/null
      echo "bf16 decode rc $?"
      timeout 60 $B --op vae-decode --shape wan-vae-480p-fp32 --providers vkern --warmup 1 --repeats 3 > /dev/null
      echo "fp32 decode rc $?"
    fi
    ;;
  b)
    AB_ORDER=new bash bench/ext_ab.sh true  # (the new build in place)
    timeout -s INT -k 10 200 python3 -m pytest -m gpu -q -s -p no:cacheprovider --tb=short \
      tests/test_causal_conv_cuda.py tests/test_wan_vae.py > "$OUT/pytest-conv-vae.log" 2>&1
    echo "conv + vae tests rc $?"
    grep -E "FAILED|ERROR|passed|failed" "$OUT/pytest-conv-vae.log" | head -20
    [[ " $* " == *" ncu "* ]] && rgb_ncu
    [[ " $* " == *" l2 "* ]] && l2_ncu
    AB_ORDER=${AB_ORDER:-"old new old new"} timeout 280 bash bench/ext_ab.sh \
      "$B --op vae-decode --shape wan-vae-480p --providers vkern --warmup 1 --repeats 5" \
      "$B --op vae-decode --shape wan-vae-480p-fp32 --providers vkern --warmup 1 --repeats 3"
    ;;
esac
kill %1 2>/dev/null
python3 -m bench.table "$OUT/results.jsonl"
