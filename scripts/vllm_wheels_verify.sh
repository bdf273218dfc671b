#!/usr/bin/env bash
# Check that DIR holds exactly the wheels of MANIFEST (scripts/vllm_wheels.txt), each with the
# manifest's size and sha256. Exit 1 naming every wheel that is missing, different or extra.
#
#   bash scripts/vllm_wheels_verify.sh MANIFEST DIR
set -euo pipefail
manifest=${1:?usage: vllm_wheels_verify.sh MANIFEST DIR}
dir=${2:?usage: vllm_wheels_verify.sh MANIFEST DIR}
[ -f "$manifest" ] || { echo "manifest not found: $manifest" >&2; exit 2; }
[ -d "$dir" ] || { echo "wheel folder not found: $dir" >&2; exit 2; }
bad=0
n=0
while read -r kind file size sha _; do
  [ "$kind" = wheel ] || continue
  n=$((n + 1))
  if [ ! -f "$dir/$file" ]; then
    echo "$dir/$file: missing" >&2
    bad=1
    continue
  fi
  got_size=$(stat -c %s "$dir/$file")
  if [ "$got_size" != "$size" ]; then
    echo "$dir/$file: $got_size bytes, the manifest says $size" >&2
    bad=1
    continue
  fi
  got_sha=$(sha256sum "$dir/$file" | cut -d' ' -f1)
  if [ "$got_sha" != "$sha" ]; then
    echo "$dir/$file: sha256 $got_sha, the manifest says $sha" >&2
    bad=1
  fi
done < "$manifest"
if [ "$n" = 0 ]; then
  echo "$manifest: no wheel lines" >&2
  exit 1
fi
for path in "$dir"/*.whl; do
  [ -e "$path" ] || continue
  file=$(basename "$path")
  if ! awk -v f="$file" '$1 == "wheel" && $2 == f { found = 1 } END { exit !found }' "$manifest"; then
    echo "$path: not in $manifest (one version of each package: remove it)" >&2
    bad=1
  fi
done
exit "$bad"
