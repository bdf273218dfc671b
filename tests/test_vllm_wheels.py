"""The offline vLLM install: the manifest's consistency, and the pack and install scripts run on
small stand-in wheels (reassembly from parts, sha256 checks, the install, the requirement check).
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
MANIFEST = SCRIPTS / "vllm_wheels.txt"
TAR_BLOCK, TAR_RECORD = 512, 10240
# CPython 3.12 on glibc x86-64, manylinux up to 2.31 (the newest tag the set needs)
_PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in range(31, 4, -1)] + [
    "manylinux2014_x86_64",
    "manylinux2010_x86_64",
    "manylinux1_x86_64",
]
GPU_IMAGE_TAGS = frozenset(cpython_tags((3, 12), platforms=_PLATFORMS)) | frozenset(
    compatible_tags((3, 12), "cp312", _PLATFORMS)
)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="GNU tar and coreutils scripts")


def manifest_lines(path: Path, kind: str) -> list[list[str]]:
    return [
        line.split(maxsplit=4 if kind == "wheel" else 6)
        for line in path.read_text().splitlines()
        if line.split()[:1] == [kind]
    ]


def gnu_tar_size(files: list[tuple[str, int]]) -> int:
    """Bytes of a GNU-format tar of regular files (names over 100 bytes take a long-name entry)."""
    total = 0
    for name, size in files:
        if len(name.encode()) > 100:
            total += TAR_BLOCK + math.ceil((len(name.encode()) + 1) / TAR_BLOCK) * TAR_BLOCK
        total += TAR_BLOCK + math.ceil(size / TAR_BLOCK) * TAR_BLOCK
    return math.ceil((total + 2 * TAR_BLOCK) / TAR_RECORD) * TAR_RECORD


def test_manifest_wheels_are_one_version_each_for_cpython312_x86_64():
    wheels = manifest_lines(MANIFEST, "wheel")
    assert len(wheels) > 100
    names = {}
    for _, file, size, sha, why in wheels:
        name, version, _, tags = parse_wheel_filename(file)
        assert int(size) > 0 and re.fullmatch(r"[0-9a-f]{64}", sha), file
        names.setdefault(canonicalize_name(name), []).append(str(version))
        assert tags & GPU_IMAGE_TAGS, f"{file}: not installable on CPython 3.12, x86-64"
        if canonicalize_name(name) == "vllm":
            assert why == "vllm"
        else:
            assert re.fullmatch(
                r"required by .+, missing on the image|image has .+, vllm needs .+", why
            ), f"{file}: {why}"
    assert {n: v for n, v in names.items() if len(v) > 1} == {}
    assert names["vllm"] == ["0.26.0"]
    image = dict(line[1].split("==") for line in manifest_lines(MANIFEST, "image"))
    assert image["torch"] == "2.11.0"
    # nothing the image has is carried again unless the manifest says why
    for name in set(map(canonicalize_name, image)) & set(names):
        why = next(w[4] for w in wheels if canonicalize_name(w[1].split("-")[0]) == name)
        assert why.startswith(f"image has {image.get(name, '')}"), (name, why)


def test_manifest_archive_line_matches_its_wheels():
    (archive,) = manifest_lines(MANIFEST, "archive")
    _, name, size, sha, parts, part_mib = archive
    wheels = [(w[1], int(w[2])) for w in manifest_lines(MANIFEST, "wheel")]
    assert int(size) == gnu_tar_size(wheels), "archive size is not that of a tar of the wheels"
    assert int(parts) == math.ceil(int(size) / (int(part_mib) << 20))
    part_lines = manifest_lines(MANIFEST, "part")
    assert [p[1] for p in part_lines] == [f"{name}.part{i:02d}" for i in range(int(parts))]
    assert all(re.fullmatch(r"[0-9a-f]{64}", p[2]) for p in part_lines)
    assert re.fullmatch(r"[0-9a-f]{64}", sha) and name.endswith(".tar")


def make_wheel(folder: Path, name: str, version: str, requires: list[str], code: str) -> Path:
    """A minimal pure-Python wheel holding one module `name`."""
    dist = f"{name}-{version}"
    path = folder / f"{dist}-py3-none-any.whl"
    meta = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    meta += [f"Requires-Dist: {r}" for r in requires]
    files = {
        f"{name}/__init__.py": code,
        f"{dist}.dist-info/METADATA": "\n".join(meta) + "\n",
        f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{dist}.dist-info/RECORD"] = "".join(f"{f},,\n" for f in files) + (
        f"{dist}.dist-info/RECORD,,\n"
    )
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for f, text in files.items():
            z.writestr(f, text)
    path.write_bytes(buf.getvalue())
    return path


def run(script: str, *args, manifest: Path, env_extra=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, MANIFEST=str(manifest), PYTHON=sys.executable, **(env_extra or {}))
    return subprocess.run(
        ["bash", str(SCRIPTS / script), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def pack(wheels: Path, parts: Path, manifest: Path) -> subprocess.CompletedProcess:
    """vllm_fetch_wheels.sh --parts with no registry: `true` stands in for pip download."""
    return run(
        "vllm_fetch_wheels.sh",
        wheels,
        "--parts",
        parts,
        manifest=manifest,
        env_extra={"PIP": "true"},
    )


def wheel_line(path: Path, why: str) -> str:
    """The manifest line of a wheel file."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return f"wheel {path.name} {path.stat().st_size} {digest} {why}"


@pytest.fixture
def packed(tmp_path):
    """Stand-in wheels, their manifest, and the parts made by vllm_fetch_wheels.sh --parts."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    # a dependency whose file name passes 100 bytes (a long-name entry in the tar), with enough
    # bytes for two 1 MiB parts
    dep = "sw_dep_" + "x" * 90
    make_wheel(wheels, "vllm", "0.26.0", [f"{dep}>=1"], "__version__ = '0.26.0'\n")
    make_wheel(wheels, dep, "1.2", [], "BLOB = " + repr(os.urandom(800_000).hex()) + "\n")
    lines = ["archive vllm_wheels.tar 0 0 0 1"]
    lines += [wheel_line(f, "why") for f in sorted(wheels.iterdir())]
    manifest = tmp_path / "vllm_wheels.txt"
    manifest.write_text("\n".join(lines) + "\n")
    parts = tmp_path / "parts"
    first = pack(wheels, parts, manifest)
    assert first.returncode == 1 and "the manifest says 0, 0" in first.stderr, first.stderr
    assert not parts.exists() or not list(parts.iterdir())
    got = re.search(r"size (\d+), sha256 ([0-9a-f]{64})", first.stderr)
    size, sha = int(got[1]), got[2]
    assert size == gnu_tar_size([(f.name, f.stat().st_size) for f in wheels.iterdir()])
    nparts = math.ceil(size / (1 << 20))
    manifest.write_text(
        manifest.read_text().replace(
            "archive vllm_wheels.tar 0 0 0 1", f"archive vllm_wheels.tar {size} {sha} {nparts} 1"
        )
    )
    second = pack(wheels, parts, manifest)
    print(second.stdout, second.stderr)
    assert second.returncode == 0, second.stderr
    assert f"archive vllm_wheels.tar {size} {sha} {nparts} 1" in second.stdout
    assert sorted(p.name for p in parts.iterdir()) == [
        f"vllm_wheels.tar.part{i:02d}" for i in range(nparts)
    ]
    assert nparts == 2
    return {"wheels": wheels, "manifest": manifest, "parts": parts, "tmp": tmp_path, "dep": dep}


def test_install_from_parts_archive_and_wheel_folder(packed):
    tmp = packed["tmp"]
    joined = tmp / "joined.tar"
    # the archive as the part-by-part dd loop leaves it
    with open(joined, "wb") as out:
        for part in sorted(packed["parts"].iterdir()):
            out.write(part.read_bytes())
    for i, src in enumerate([packed["parts"], joined, packed["wheels"]]):
        target = tmp / f"site{i}"
        done = run("vllm_gpu_install.sh", src, target, manifest=packed["manifest"])
        print(done.stdout, done.stderr)
        assert done.returncode == 0, done.stderr
        assert "0.26.0" in done.stdout.splitlines()
        assert "requirements of the installed wheels: all met" in done.stdout
        assert (target / packed["dep"] / "__init__.py").is_file()


def test_install_refuses_damaged_missing_or_extra_files(packed):
    tmp, parts = packed["tmp"], packed["parts"]
    last = sorted(parts.iterdir())[-1]
    data = bytearray(last.read_bytes())
    data[-1] ^= 0xFF
    last.write_bytes(bytes(data))
    done = run("vllm_gpu_install.sh", parts, tmp / "a", manifest=packed["manifest"])
    assert done.returncode == 1 and "sha256" in done.stderr, done.stderr
    last.unlink()
    done = run("vllm_gpu_install.sh", parts, tmp / "b", manifest=packed["manifest"])
    assert done.returncode == 1 and "1 parts of vllm_wheels.tar" in done.stderr, done.stderr
    wheels = packed["wheels"]
    make_wheel(wheels, packed["dep"], "1.3", [], "")
    done = run("vllm_gpu_install.sh", wheels, tmp / "c", manifest=packed["manifest"])
    assert done.returncode == 1 and f"{packed['dep']}-1.3-py3-none-any.whl: not in" in done.stderr
    assert not (tmp / "c").exists()


def test_install_names_unmet_requirements(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    make_wheel(
        wheels, "vllm", "0.26.0", ["sw_not_there>=1", "packaging>=999"], "__version__ = '0.26.0'\n"
    )
    (wheel,) = wheels.iterdir()
    manifest = tmp_path / "m.txt"
    manifest.write_text(
        "archive vllm_wheels.tar 1 " + "0" * 64 + " 1 1\n" + wheel_line(wheel, "vllm") + "\n"
    )
    done = run("vllm_gpu_install.sh", wheels, tmp_path / "site", manifest=manifest)
    print(done.stdout, done.stderr)
    assert done.returncode == 1
    assert "0.26.0" in done.stdout.splitlines()
    assert "unmet: vllm needs sw_not_there>=1: not installed" in done.stderr
    assert re.search(r"unmet: vllm needs packaging>=999: found \d", done.stderr)
