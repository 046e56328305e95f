#!/usr/bin/env bash
# A/B of one source file's versions on the GPU machine, in one process tree and one call (same machine, same clocks).
# Prepare here (versions from git, or edits), untracked so that the device copy carries them:
#   mkdir -p _ab && git show 3550dba:vkern/triton/qk_norm_rope.py > _ab/old.py && cp vkern/triton/qk_norm_rope.py _ab/new.py
# On the GPU machine:
#   AB_FILE=vkern/triton/qk_norm_rope.py AB_ORDER="old new old new" bash bench/ab_variants.sh \
#     "--op family-prologue --shape ltx-512p --providers vkern" "--op attn-module --shape ltx-512p --providers vkern-auto"
# Each bench.bench argument string runs once per version in AB_ORDER (interleaved, so drift shows), rows to
# $OUT/results.jsonl with commit "<VKERN_COMMIT>-ab-<version>"; the file is restored at the end. Delete _ab/ after.
set -uo pipefail
. bench/device_env.sh
python3 -c "import vkern._C" 2>/dev/null || build_vkern
cp "$AB_FILE" "$OUT/ab_original.py"
trap 'cp "$OUT/ab_original.py" "$AB_FILE"' EXIT
for version in ${AB_ORDER:-$(ls _ab | sed 's/\.py$//')}; do
  cp "_ab/$version.py" "$AB_FILE"
  for bench_args in "$@"; do
    # (word splitting of the argument string is intended: it holds bench.bench's options)
    # shellcheck disable=SC2086
    VKERN_COMMIT="${VKERN_COMMIT:-unknown}-ab-$version" python3 -m bench.bench --out "$OUT/results.jsonl" --warmup 2 \
      $bench_args 2>&1 | grep -v Warning | cut -c1-200
  done
done
[ -s "$OUT/results.jsonl" ] && python3 -m bench.table "$OUT/results.jsonl"
