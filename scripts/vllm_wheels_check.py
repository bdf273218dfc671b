"""Prove that the manifest's wheels resolve offline together with the GPU image's packages.

Usage (Python 3.12, the image's version; registry access for the image packages' metadata)::

    python3.12 scripts/vllm_wheels_check.py --wheels /work/vllm_wheels

Steps:
1. Resolve the image's recorded packages (the manifest's ``image NAME==VERSION`` lines) with
   ``pip install --dry-run --ignore-installed --report``: the versions pip picks for their
   dependencies stand in for the ones on the image, which were not recorded.
2. In a new virtual environment, write one metadata-only ``.dist-info`` per package of that
   resolution (name, version, Requires-Dist), so that pip sees them as installed; but only for
   the packages that the device notes name (vllm_import_scan.IMAGE_PACKAGES): one that pip
   resolves but the image's list lacks (pydantic) must come from the carried wheels.
3. There, ``pip install --dry-run --no-index --find-links WHEELS vllm==V``: the resolver may take
   nothing but the installed stand-ins and the carried wheels.
4. The wheels it would install must be exactly the manifest's: none missing (a resolution
   error), none unused.

Exit 0 when both hold, 1 otherwise (pip's error or the difference is printed).

With ``--lean`` (the lean manifest, scripts/vllm_wheels_lean.txt, whose wheels do not satisfy
all of vLLM's requirements by design), steps 3-4 are instead: install the manifest's wheels with
``--no-index --no-deps`` into that environment (replacing the stand-ins of the same names, as
the install folder shadows the image's packages on the GPU), then ``pip check``: every
requirement must hold except vLLM's own on the wheels the manifest's ``left`` lines leave out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from vllm_import_scan import IMAGE_PACKAGES, canonical


def lean_check(python: Path, site: Path, manifest: Path, wheels: list[str], folder: Path) -> int:
    """Install the lean wheels beside the stand-ins and accept only the planned unmet lines.

    Args:
        python: the environment's interpreter.
        site: its site-packages (holding the stand-ins).
        manifest: the lean manifest (its ``left`` lines name what may be missing).
        wheels: the manifest's wheel files.
        folder: where they are.

    Returns:
        0 when pip check finds nothing but vLLM's requirements on left-out wheels, else 1.
    """
    left = {
        canonical(line.split()[1].split("-")[0])
        for line in manifest.read_text().splitlines()
        if line.startswith("left ")
    }
    carried = {canonical(w.split("-")[0]) for w in wheels}
    for info in site.glob("*.dist-info"):
        if (info / "INSTALLER").read_text() == "stub\n" and canonical(
            info.name.split("-", 1)[0]
        ) in carried:
            for f in info.iterdir():
                f.unlink()
            info.rmdir()
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
        + [str(folder / w) for w in wheels],
        check=True,
        env=pip_env(),
    )
    done = subprocess.run(
        [str(python), "-m", "pip", "check"], capture_output=True, text=True, env=pip_env()
    )
    planned, other = 0, []
    for line in done.stdout.splitlines():
        got = re.match(r"(\S+) \S+ (?:requires|has requirement) ([A-Za-z0-9_.-]+)", line)
        if got and canonical(got[1]) == "vllm" and canonical(got[2]) in left:
            planned += 1
        elif line.strip():
            other.append(line)
    for line in other:
        print(f"unmet: {line}", file=sys.stderr)
    if other:
        return 1
    print(
        f"the {len(wheels)} lean wheels install with --no-deps beside the image's packages; "
        f"pip check: only vLLM's {planned} requirements on the {len(left)} left-out wheels unmet"
    )
    return 0


def read_manifest(path: Path) -> tuple[list[str], list[str]]:
    """Return the manifest's image pins and wheel file names.

    Args:
        path: scripts/vllm_wheels.txt.

    Returns:
        (image pins "NAME==VERSION", wheel file names), in file order.
    """
    image, wheels = [], []
    for line in path.read_text().splitlines():
        fields = line.split()
        if fields and fields[0] == "image":
            image.append(fields[1])
        elif fields and fields[0] == "wheel":
            wheels.append(fields[1])
    return image, wheels


def pip_env() -> dict[str, str]:
    """The environment for pip without this machine's own indexes, links and constraints."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def write_stub(site: Path, meta: dict) -> None:
    """Write a metadata-only distribution of a pip report's ``metadata`` entry into site."""
    name = re.sub(r"[-_.]+", "_", meta["name"])
    info = site / f"{name}-{meta['version']}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    lines = ["Metadata-Version: 2.1", f"Name: {meta['name']}", f"Version: {meta['version']}"]
    lines += [f"Provides-Extra: {e}" for e in meta.get("provides_extra", [])]
    lines += [f"Requires-Dist: {r}" for r in meta.get("requires_dist", [])]
    (info / "METADATA").write_text("\n".join(lines) + "\n")
    (info / "INSTALLER").write_text("stub\n")
    (info / "RECORD").write_text("")


def main() -> int:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, default=here / "vllm_wheels.txt")
    parser.add_argument("--wheels", type=Path, required=True, help="folder of the wheels")
    parser.add_argument("--lean", action="store_true", help="the lean manifest's check")
    args = parser.parse_args()
    if sys.version_info[:2] != (3, 12):
        print("run this with Python 3.12 (the GPU image's)", file=sys.stderr)
        return 2
    image, wheels = read_manifest(args.manifest)
    vllm = [w for w in wheels if w.startswith("vllm-")]
    if not image or len(vllm) != 1:
        print(f"{args.manifest}: needs image lines and one vllm wheel", file=sys.stderr)
        return 2
    vllm_pin = "vllm==" + vllm[0].split("-")[1]
    env = pip_env()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "image.txt").write_text("\n".join(image) + "\n")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--dry-run",
                "--ignore-installed",
                "--only-binary=:all:",
                "--report",
                str(tmp / "image.json"),
                "-r",
                str(tmp / "image.txt"),
            ],
            check=True,
            env=env,
        )
        resolved = json.loads((tmp / "image.json").read_text())["install"]
        named = set(map(canonical, IMAGE_PACKAGES))
        installed = [i for i in resolved if canonical(i["metadata"]["name"]) in named]
        dropped = sorted(i["metadata"]["name"] for i in resolved if i not in installed)
        if dropped:
            print(f"resolved for the image but not on its list, no stand-in: {', '.join(dropped)}")
        # the venv's own pip (ensurepip's copy) sees only the venv's site-packages
        subprocess.run([sys.executable, "-m", "venv", str(tmp / "venv")], check=True)
        site = tmp / "venv/lib/python3.12/site-packages"
        for item in installed:
            write_stub(site, item["metadata"])
        print(f"{len(installed)} image packages stand in as installed")
        if args.lean:
            return lean_check(tmp / "venv/bin/python", site, args.manifest, wheels, args.wheels)
        done = subprocess.run(
            [
                str(tmp / "venv/bin/python"),
                "-m",
                "pip",
                "install",
                "-q",
                "--dry-run",
                "--no-index",
                "--find-links",
                str(args.wheels),
                "--only-binary=:all:",
                "--report",
                str(tmp / "offline.json"),
                vllm_pin,
            ],
            env=env,
        )
        if done.returncode != 0:
            print(f"{vllm_pin} does not resolve offline from {args.wheels}", file=sys.stderr)
            return 1
        offline = json.loads((tmp / "offline.json").read_text())["install"]
    used = {item["download_info"]["url"].rsplit("/", 1)[-1] for item in offline}
    missing = sorted(used - set(wheels))
    unused = sorted(set(wheels) - used)
    for name in missing:
        print(f"taken but not in the manifest: {name}", file=sys.stderr)
    for name in unused:
        print(f"in the manifest but not needed: {name}", file=sys.stderr)
    if missing or unused:
        return 1
    print(
        f"{vllm_pin} resolves offline: the {len(used)} wheels of the manifest, all used, "
        "beside the image's packages"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
