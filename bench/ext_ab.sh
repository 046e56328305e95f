#!/usr/bin/env bash
# A/B of builds of the compiled extension (vkern._C) on the GPU machine, same machine and clocks: "new" from the
# tree as carried, and one per folder _ab/<version>/ with the csrc files in _ab/<version>/csrc/ put over csrc/.
# Prepare here, untracked so that the device copy carries them:
#   mkdir -p _ab/old/csrc && git show <old commit>:csrc/causal_conv.cu > _ab/old/csrc/causal_conv.cu
# On the GPU machine:
#   AB_ORDER="old new old new" bash bench/ext_ab.sh "python3 -m bench.bench --op vae-conv ..." ...
# The builds are kept in build/ab/<version>.so (a later call on a still-warm machine reuses them; AB_REBUILD=1 builds
# again). Each command runs once per version in AB_ORDER (interleaved, so drift shows) with VKERN_COMMIT
# "<VKERN_COMMIT>-ab-<version>" in its environment; the new build is in place at the end. Delete _ab/ after.
set -uo pipefail
. bench/device_env.sh
mkdir -p build/ab
so() { ls vkern/_C*.so 2>/dev/null | head -1; }
for dir in _ab/*/; do
  version=$(basename "$dir")
  [[ -z ${AB_REBUILD:-} && -f build/ab/$version.so ]] && continue
  rm -rf build/ab/tree && mkdir -p build/ab/tree
  for f in "$dir"csrc/*; do cp "csrc/$(basename "$f")" build/ab/tree/ && cp "$f" csrc/; done
  build_vkern && cp "$(so)" "build/ab/$version.so"
  cp build/ab/tree/* csrc/
done
if [[ -n ${AB_REBUILD:-} || ! -f build/ab/new.so ]]; then
  build_vkern && cp "$(so)" build/ab/new.so
fi
trap 'cp build/ab/new.so "$(so)"' EXIT
for version in ${AB_ORDER:-$(ls _ab) new}; do
  cp "build/ab/$version.so" "$(so)"
  for cmd in "$@"; do
    echo "== $version: $cmd"
    # (word splitting of the command string is intended)
    # shellcheck disable=SC2086
    VKERN_COMMIT="${VKERN_COMMIT:-unknown}-ab-$version" $cmd 2>&1 | grep -v Warning | cut -c1-300
  done
done
