#!/usr/bin/env bash
# Download the wheels that vLLM 0.26.0 needs on the GPU image (scripts/vllm_wheels.txt) on a
# machine with registry access, check them against the manifest, and optionally pack them into
# the parts that travel to the GPU machine one call at a time.
#
#   bash scripts/vllm_fetch_wheels.sh DIR [--lean] [--parts PARTS_DIR] [--check]
#
# DIR        folder for the wheels (created; wheels already there with the right sha256 are
#            kept); afterwards it holds exactly the manifest's wheels.
# --parts    also write PARTS_DIR/vllm_wheels.tar.partNN: a tar of the wheels (sorted names,
#            owner 0, mtime 0, so the same wheels give the same bytes) cut into PART_MIB-MiB
#            pieces; the tar's size and sha256 (and, at the manifest's part size, the part
#            count and each part's sha256) must equal the manifest's `archive` and `part` lines. PARTS_DIR must be empty; the tar
#            itself is not kept.
# --lean     the lean set instead (scripts/vllm_wheels_lean.txt: the wheels that the import path
#            of LLM(...).generate() needs; archive vllm_wheels_lean.tar).
# --check    prove that the wheels resolve offline together with the image's packages: needs
#            python3.12 (PYTHON312=...) and registry access for the image's packages' metadata;
#            see scripts/vllm_wheels_check.py (with --lean: its --lean check).
# Environment: PIP (default `python3 -m pip`), PART_MIB (default: the manifest's), MANIFEST
# (default scripts/vllm_wheels.txt beside this script, or vllm_wheels_lean.txt with --lean).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
manifest=${MANIFEST:-$here/vllm_wheels.txt}
dir=${1:?usage: vllm_fetch_wheels.sh DIR [--lean] [--parts PARTS_DIR] [--check]}
shift
parts=""
check=0
lean=0
while [ $# -gt 0 ]; do
  case "$1" in
    --lean) lean=1; manifest=${MANIFEST:-$here/vllm_wheels_lean.txt}; shift ;;
    --parts) parts=${2:?--parts needs a folder}; shift 2 ;;
    --check) check=1; shift ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
[ -f "$manifest" ] || { echo "manifest not found: $manifest" >&2; exit 2; }
manifest=$(realpath "$manifest")
read -r -a pip <<< "${PIP:-python3 -m pip}"
mkdir -p "$dir"

# name==version of each wheel, from its file name (name-version-tags.whl)
pins=$(mktemp)
trap 'rm -f "$pins"' EXIT
awk '$1 == "wheel" { split($2, p, "-"); print p[1] "==" p[2] }' "$manifest" > "$pins"
[ -s "$pins" ] || { echo "$manifest: no wheel lines" >&2; exit 1; }
# The GPU image is glibc-based x86-64 with CPython 3.12; manylinux_2_31 is the newest tag the
# set needs (llguidance).
platforms=()
for p in manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_26 manylinux_2_24 \
  manylinux_2_17 manylinux2014 manylinux_2_12 manylinux2010 manylinux_2_5 manylinux1; do
  platforms+=(--platform "${p}_x86_64")
done
"${pip[@]}" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$dir" -r "$pins"

bash "$here/vllm_wheels_verify.sh" "$manifest" "$dir"
echo "$dir: $(awk '$1 == "wheel"' "$manifest" | wc -l) wheels match $manifest"

if [ -n "$parts" ]; then
  read -r _ archive size sha nparts manifest_mib < <(awk '$1 == "archive"' "$manifest")
  part_mib=${PART_MIB:-$manifest_mib}
  mkdir -p "$parts"
  parts=$(cd "$parts" && pwd)
  if [ -n "$(ls -A "$parts")" ]; then
    echo "$parts: not empty" >&2
    exit 1
  fi
  (cd "$dir" && awk '$1 == "wheel" { print $2 }' "$manifest" | LC_ALL=C sort |
    tar --format=gnu --owner=0 --group=0 --numeric-owner --mode=0644 --mtime=@0 \
      -cf "$parts/$archive" -T -)
  got_size=$(stat -c %s "$parts/$archive")
  got_sha=$(sha256sum "$parts/$archive" | cut -d' ' -f1)
  if [ "$got_size $got_sha" != "$size $sha" ]; then
    echo "$archive: size $got_size, sha256 $got_sha; the manifest says $size, $sha" >&2
    rm "$parts/$archive"
    exit 1
  fi
  split -b "${part_mib}M" -d -a 2 "$parts/$archive" "$parts/$archive.part"
  rm "$parts/$archive"
  got_parts=$(find "$parts" -name "$archive.part*" | wc -l)
  echo "archive $archive $got_size $got_sha $got_parts $part_mib"
  if [ "$part_mib" = "$manifest_mib" ]; then
    if [ "$got_parts" != "$nparts" ]; then
      echo "$archive: $got_parts parts of $part_mib MiB; the manifest says $nparts" >&2
      exit 1
    fi
    if grep -q '^part ' "$manifest"; then
      (cd "$parts" && awk '$1 == "part" { print $3 "  " $2 }' "$manifest" | sha256sum --quiet -c)
    fi
  fi
fi

if [ "$check" = 1 ]; then
  lean_flag=()
  [ "$lean" = 1 ] && lean_flag=(--lean)
  "${PYTHON312:-python3.12}" "$here/vllm_wheels_check.py" --manifest "$manifest" --wheels "$dir" \
    "${lean_flag[@]}"
fi
