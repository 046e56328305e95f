# Sourced by the GPU-machine scripts (gpu_run.sh, multi_gpu_run.sh, sp_rerun.sh): $OUT, the environment,
# and diffusers + what it needs beyond the image from the carried .whl folder. Exits on failure.
OUT=${OUT:-/tmp/vkern-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 1
fi

build_vkern() {  # the editable install that builds vkern._C; its log in $OUT/build.log
  python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
}
