#!/usr/bin/env bash
# Install vLLM 0.26.0 on a GPU machine without internet from the wheels of
# scripts/vllm_wheels.txt, into a folder that goes first on PYTHONPATH (the image's own
# packages stay as they are; the few the manifest replaces are shadowed there).
#
#   bash scripts/vllm_gpu_install.sh [--lean] SRC TARGET
#
# --lean: the lean set (scripts/vllm_wheels_lean.txt, archive vllm_wheels_lean.tar): only the
# wheels that the import path of LLM(...).generate() needs (scripts/vllm_import_scan.py).
# SRC: the wheels as they arrived, one of
#   - a folder of the parts vllm_wheels.tar.partNN (joined in name order),
#   - the archive itself (vllm_wheels.tar, e.g. put together part by part with dd),
#   - a folder of the wheels themselves.
# The archive's size and sha256 and the number of parts are checked against the manifest's
# `archive` line, then every wheel's size and sha256 (scripts/vllm_wheels_verify.sh); then
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target TARGET WHEELS
# and, with PYTHONPATH=TARGET, `import vllm` prints its version. Last, every requirement of
# the installed wheels is checked against what Python then finds (TARGET first, the image
# after it): an unmet one (an image package older than the manifest assumed) is named and the
# script exits 1; a requirement on a wheel that the manifest's `left` lines leave out is only
# counted. Last, when the manifest has `import MODULE` lines (the lean one), each module is
# imported (with the repository's src/ on the path, for sketchwalk.engines.vllm); a missing
# package is named with the wheel of scripts/vllm_wheels.txt that holds it (carry that one
# next), and the script exits 1.
# Environment: PYTHON (default python3), MANIFEST (default scripts/vllm_wheels.txt beside this
# script), WORK_DIR (where the archive is joined and unpacked; default a new folder in /tmp,
# removed at the end).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
manifest=${MANIFEST:-$here/vllm_wheels.txt}
if [ "${1:-}" = --lean ]; then
  manifest=${MANIFEST:-$here/vllm_wheels_lean.txt}
  shift
fi
src=${1:?usage: vllm_gpu_install.sh [--lean] SRC TARGET}
target=${2:?usage: vllm_gpu_install.sh [--lean] SRC TARGET}
python=${PYTHON:-python3}
[ -f "$manifest" ] || { echo "manifest not found: $manifest" >&2; exit 2; }
[ -e "$src" ] || { echo "SRC not found: $src" >&2; exit 2; }
read -r _ archive size sha nparts _ < <(awk '$1 == "archive"' "$manifest")
[ -n "${sha:-}" ] || { echo "$manifest: no archive line" >&2; exit 1; }
if [ -n "${WORK_DIR:-}" ]; then
  work=$WORK_DIR
  mkdir -p "$work"
else
  work=$(mktemp -d /tmp/vllm_install.XXXXXX)
  trap 'rm -rf "$work"' EXIT
fi

check_archive() {
  local got_size got_sha
  got_size=$(stat -c %s "$1")
  if [ "$got_size" != "$size" ]; then
    echo "$1: $got_size bytes, the manifest says $size (a part missing or cut short?)" >&2
    exit 1
  fi
  got_sha=$(sha256sum "$1" | cut -d' ' -f1)
  if [ "$got_sha" != "$sha" ]; then
    echo "$1: sha256 $got_sha, the manifest says $sha" >&2
    exit 1
  fi
}

if [ -f "$src" ]; then
  tarball=$src
elif compgen -G "$src/$archive.part*" > /dev/null; then
  mapfile -t parts < <(find "$src" -maxdepth 1 -name "$archive.part*" | LC_ALL=C sort)
  if [ "${#parts[@]}" != "$nparts" ]; then
    echo "$src: ${#parts[@]} parts of $archive, the manifest says $nparts" >&2
    exit 1
  fi
  tarball=$work/$archive
  cat "${parts[@]}" > "$tarball"
else
  tarball=""
fi
if [ -n "$tarball" ]; then
  check_archive "$tarball"
  wheels=$work/wheels
  mkdir -p "$wheels"
  tar -xf "$tarball" -C "$wheels"
  [ "$tarball" = "$work/$archive" ] && rm "$tarball"
else
  wheels=$src
fi
bash "$here/vllm_wheels_verify.sh" "$manifest" "$wheels"

mapfile -t files < <(awk -v d="$wheels" '$1 == "wheel" { print d "/" $2 }' "$manifest")
echo "installing ${#files[@]} wheels into $target"
"$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$target" "${files[@]}"
export PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}"
"$python" -c "import vllm; print(vllm.__version__)"

# Requirements of the installed wheels (extras left out), against the first distribution of
# each name on the path: TARGET's where it has one, the image's otherwise.
"$python" - "$target" "$manifest" <<'EOF'
import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement


def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


left = {
    canonical(line.split()[1].split("-")[0])
    for line in Path(sys.argv[2]).read_text().splitlines()
    if line.startswith("left ")
}
unmet, left_out = [], 0
for info in sorted(Path(sys.argv[1]).glob("*.dist-info")):
    dist = metadata.Distribution.at(info)
    for line in dist.requires or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        if canonical(req.name) in left:
            left_out += 1  # the image's version, if any, is not vLLM's concern on this path
            continue
        try:
            found = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            unmet.append(f"{dist.metadata['Name']} needs {req}: not installed")
            continue
        if not req.specifier.contains(found, prereleases=True):
            unmet.append(f"{dist.metadata['Name']} needs {req}: found {found}")
for line in unmet:
    print("unmet:", line, file=sys.stderr)
if unmet:
    print(f"{len(unmet)} unmet requirements: add their wheels to scripts/vllm_wheels.txt",
          file=sys.stderr)
    sys.exit(1)
print("requirements of the installed wheels: all met"
      + (f" but {left_out} on wheels the lean set leaves out" if left_out else ""))
EOF

if grep -q '^import ' "$manifest"; then
  PYTHONPATH="$PYTHONPATH:$here/../src" "$python" - "$manifest" <<'EOF'
import importlib
import sys
import traceback
from pathlib import Path

lines = [line.split() for line in Path(sys.argv[1]).read_text().splitlines()]
modules = [f[1] for f in lines if f[:1] == ["import"]]
# top-level import name -> the left-out wheel that installs it
holder = {top: f[1] for f in lines if f[:1] == ["left"] for top in f[2].split(",")}
failed = 0
for module in modules:
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as err:
        failed += 1
        top = (err.name or "?").split(".")[0]
        where = holder.get(top)
        hint = f"carry {where} (scripts/vllm_wheels.txt)" if where else "not in the wheel set"
        print(f"smoke: import {module}: no module {err.name!r}: {hint}", file=sys.stderr)
    except Exception:
        failed += 1
        print(f"smoke: import {module} failed:", file=sys.stderr)
        traceback.print_exc()
if failed:
    print(f"smoke: {failed} of {len(modules)} imports failed", file=sys.stderr)
    sys.exit(1)
print(f"smoke: {len(modules)} modules import")
EOF
fi
