#!/usr/bin/env bash
# A/B of two builds of the compiled extension (vkern._C) on the GPU machine, same machine and clocks: "new" from the
# tree as carried, "old" with the csrc files in _ab/csrc/ put over csrc/. Prepare here, untracked so that the device
# copy carries them:   mkdir -p _ab/csrc && git show <old commit>:csrc/causal_conv.cu > _ab/csrc/causal_conv.cu
# On the GPU machine:
#   AB_ORDER="old new old new" bash bench/ext_ab.sh "python3 -m bench.bench --op vae-conv ..." ...
# Both builds are kept in build/ab/{old,new}.so (a later call on the warm machine reuses them; AB_REBUILD=1 builds
# again). Each command runs once per version in AB_ORDER (interleaved, so drift shows) with VKERN_COMMIT
# "<VKERN_COMMIT>-ab-<version>" in its environment; the new build is in place at the end. Delete _ab/ after.
set -uo pipefail
. bench/device_env.sh
mkdir -p build/ab
so() { ls vkern/_C*.so 2>/dev/null | head -1; }
if [[ -n ${AB_REBUILD:-} || ! -f build/ab/new.so || ! -f build/ab/old.so ]]; then
  mkdir -p build/ab/tree
  for f in _ab/csrc/*; do cp "csrc/$(basename "$f")" build/ab/tree/; done
  for f in _ab/csrc/*; do cp "$f" csrc/; done
  build_vkern && cp "$(so)" build/ab/old.so
  grep -c "causal_conv\|flash_attention\|fp8_quant" "$OUT/build.log" | sed 's/^/old build: lines naming a source: /'
  cp build/ab/tree/* csrc/
  build_vkern && cp "$(so)" build/ab/new.so
  grep -c "causal_conv\|flash_attention\|fp8_quant" "$OUT/build.log" | sed 's/^/new build: lines naming a source: /'
fi
trap 'cp build/ab/new.so "$(so)"' EXIT
for version in ${AB_ORDER:-old new}; do
  cp "build/ab/$version.so" "$(so)"
  for cmd in "$@"; do
    echo "== $version: $cmd"
    # (word splitting of the command string is intended)
    # shellcheck disable=SC2086
    VKERN_COMMIT="${VKERN_COMMIT:-unknown}-ab-$version" $cmd 2>&1 | grep -v Warning | cut -c1-300
  done
done
