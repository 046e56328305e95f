#!/usr/bin/env bash
# A/B of two versions of the source tree on the GPU machine, in one call (same machine, same clocks): "new" is the
# tree as carried, "old" the tree with a patch reversed. Prepare here, untracked so that the device copy carries it:
#   mkdir -p _ab && git diff <old commit> -- vkern > _ab/change.patch
# On the GPU machine:
#   AB_PATCH=_ab/change.patch AB_ORDER="old new old new" bash bench/tree_ab.sh "python3 -m bench.host_overhead" ...
# Each command runs once per version in AB_ORDER (interleaved, so drift shows) with VKERN_COMMIT
# "<VKERN_COMMIT>-ab-<version>" and VKERN_AB=<version> in its environment; the tree is "new" again at the end.
# Delete _ab/ after.
set -uo pipefail
. bench/device_env.sh
state=new
to() {  # switch the tree to version $1
  [[ $1 == "$state" ]] && return
  if [[ $1 == old ]]; then patch -s -p1 -R < "$AB_PATCH" || exit 1; else patch -s -p1 < "$AB_PATCH" || exit 1; fi
  state=$1
}
trap 'to new' EXIT
for version in ${AB_ORDER:-old new}; do
  to "$version"
  for cmd in "$@"; do
    echo "== $version: $cmd"
    # (word splitting of the command string is intended)
    # shellcheck disable=SC2086
    VKERN_COMMIT="${VKERN_COMMIT:-unknown}-ab-$version" VKERN_AB=$version $cmd 2>&1 | grep -v Warning | cut -c1-300
  done
done
