"""The offline vLLM install: the manifest's consistency, and the pack and install scripts run on
small stand-in wheels (reassembly from parts, sha256 checks, the install, the requirement check).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
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
LEAN = SCRIPTS / "vllm_wheels_lean.txt"
# CPython 3.12 on glibc x86-64, manylinux up to 2.31 (the newest tag the set needs)
_PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in range(31, 4, -1)] + [
    "manylinux2014_x86_64",
    "manylinux2010_x86_64",
    "manylinux1_x86_64",
]
GPU_IMAGE_TAGS = frozenset(cpython_tags((3, 12), platforms=_PLATFORMS)) | frozenset(
    compatible_tags((3, 12), "cp312", _PLATFORMS)
)

# the downloaded wheels, where this machine has them (vllm_fetch_wheels.sh WHEELS)
WHEELS = Path(os.environ.get("VLLM_WHEELS", ROOT.parent / "vllm_wheels"))

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="GNU tar and coreutils scripts")


def manifest_lines(path: Path, kind: str) -> list[list[str]]:
    return [
        line.split(maxsplit=4 if kind == "wheel" else 6)
        for line in path.read_text().splitlines()
        if line.split()[:1] == [kind]
    ]


def load_scan():
    spec = importlib.util.spec_from_file_location(
        "sketchwalk_vllm_import_scan", SCRIPTS / "vllm_import_scan.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


scan_script = load_scan()
gnu_tar_size = scan_script.gnu_tar_size


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


def test_lean_manifest_is_a_checked_part_of_the_full_one():
    full = {w[1]: w for w in manifest_lines(MANIFEST, "wheel")}
    lean = manifest_lines(LEAN, "wheel")
    left = [line.split(maxsplit=3) for line in LEAN.read_text().splitlines() if line[:5] == "left "]
    # every wheel of the full set is either carried (with the full set's line) or left out
    assert all(full[w[1]] == w for w in lean)
    assert sorted([w[1] for w in lean] + [f[1] for f in left]) == sorted(full)
    assert all(len(f) == 4 and f[3] for f in left), "each left-out wheel says why"
    assert any(w[1].startswith("vllm-0.26.0-") for w in lean)
    assert manifest_lines(LEAN, "image") == manifest_lines(MANIFEST, "image")
    (archive,) = manifest_lines(LEAN, "archive")
    _, name, size, sha, parts, part_mib = archive
    assert name == "vllm_wheels_lean.tar" and re.fullmatch(r"[0-9a-f]{64}", sha)
    assert sha != "0" * 64
    assert int(size) == gnu_tar_size([(w[1], int(w[2])) for w in lean])
    assert int(parts) == math.ceil(int(size) / (int(part_mib) << 20)) and part_mib == "56"
    assert [p[1] for p in manifest_lines(LEAN, "part")] == [
        f"{name}.part{i:02d}" for i in range(int(parts))
    ]
    imports = [line.split()[1] for line in LEAN.read_text().splitlines() if line[:7] == "import "]
    assert imports == list(scan_script.ENTRY_MODULES)
    lean_bytes = sum(int(w[2]) for w in lean)
    full_bytes = sum(int(w[2]) for w in full.values())
    print(f"lean {lean_bytes / 2**20:.0f} MiB of {full_bytes / 2**20:.0f} MiB, {parts} parts")
    assert full_bytes - lean_bytes >= 250 * 2**20


def test_module_imports_marks_when_each_import_runs():
    source = """
import os
import alpha.beta
from . import sibling
from ..up import thing
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    import typed_only
else:
    import gamma
try:
    import maybe
except ImportError:
    maybe = None
try:
    import needed_anyway
except KeyError:
    pass
class Holder:
    import in_class
def later():
    import lazy_one
    try:
        import lazy_two
    except ImportError:
        pass
"""
    found = scan_script.module_imports(ast.parse(source), "pkg.sub.mod", is_package=False)
    kinds = {imp.module: imp.kind for imp in found}
    print(kinds)
    assert kinds == {
        "os": "module",
        "alpha.beta": "module",
        "pkg.sub": "module",
        "pkg.up": "module",
        "typing": "module",
        "typed_only": "lazy",
        "gamma": "conditional",
        "maybe": "optional",
        "needed_anyway": "module",
        "in_class": "module",
        "lazy_one": "lazy",
        "lazy_two": "lazy",
    }
    assert next(i for i in found if i.module == "pkg.sub").names == ("sibling",)
    # a package's relative import starts at the package itself
    (imp,) = scan_script.module_imports(ast.parse("from .x import y\n"), "pkg", is_package=True)
    assert imp.module == "pkg.x"


def test_scan_follows_module_level_imports_only():
    sources = {
        "vllm": ("vllm/__init__.py", "import vllm.core\nimport numpy\n"),
        "vllm.core": (
            "vllm/core.py",
            "from vllm import util\nimport zmq.asyncio\n"
            "if FLAG:\n    from vllm import extra\n"
            "def f():\n    import vllm.unused\n    import blake3\n",
        ),
        "vllm.util": ("vllm/util.py", "try:\n    import cv2\nexcept ImportError:\n    pass\n"),
        "vllm.extra": ("vllm/extra.py", "import deep_ep\n"),
        "vllm.unused": ("vllm/unused.py", "import tilelang\n"),
    }
    got = scan_script.scan(sources, ("vllm.core",), binary={"vllm._C"})
    print(got)
    assert got.closure == {"vllm", "vllm.core", "vllm.util", "vllm.extra"}
    assert {"numpy", "zmq.asyncio"} <= set(got.third_party)
    assert "deep_ep" not in got.third_party and got.conditional["deep_ep"] == ["vllm.extra"]
    assert got.optional["cv2"] == ["vllm.util"] and "cv2" not in got.third_party
    assert got.lazy["blake3"] == ["vllm.core"]
    assert got.outside["tilelang"] == ["vllm.unused"]


def test_requires_closure_and_provider(tmp_path):
    Wheel = scan_script.Wheel
    wheels = {
        "a": Wheel(
            "a.whl", 1, "a", requires=["b>=1", "c; extra == 'big'", "d; sys_platform == 'win32'"]
        ),
        "b": Wheel("b.whl", 1, "b"),
        "c": Wheel("c.whl", 1, "c"),
        "d": Wheel("d.whl", 1, "d"),
    }
    assert scan_script.requires_closure({"a": set()}, wheels, {}) == {"a": "import", "b": "a"}
    # an extra that vLLM's own requirement asks of a needed wheel counts
    got = scan_script.requires_closure({"a": set()}, wheels, {"a": {"big"}})
    assert got == {"a": "import", "b": "a", "c": "a"}
    # a namespace package shared by two wheels maps each subpackage to its own wheel
    one = Wheel("n1.whl", 1, "n1", modules={"ns", "ns.one"}, packages={"ns.one"})
    two = Wheel("n2.whl", 1, "n2", modules={"ns", "ns.two", "ns.two.x"}, packages={"ns.two"})
    both = {"n1": one, "n2": two}
    assert scan_script.provider("ns.two.x.y", both) is two
    assert scan_script.provider("ns.one", both) is one
    assert scan_script.provider("ns", both) is None
    assert scan_script.record_module("pkg/sub/__init__.py") == "pkg.sub"
    assert scan_script.record_module("m.cpython-312-x86_64-linux-gnu.so") == "m"
    assert scan_script.record_module("x-1.data/purelib/y/z.py") == "y.z"
    assert scan_script.record_module("x-1.dist-info/METADATA") is None


def test_lean_install_counts_left_out_requirements_and_smoke_names_the_missing_wheel(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    vllm = make_wheel(
        wheels,
        "vllm",
        "0.26.0",
        ["sw_left>=1", "sw_kept"],
        "__version__ = '0.26.0'\nimport sw_kept\n",
    )
    kept = make_wheel(wheels, "sw_kept", "1.0", [], "")
    engine = make_wheel(wheels, "sw_engine", "1.0", [], "import sw_left\n")
    left = make_wheel(tmp_path, "sw_left", "1.0", [], "")
    lines = ["archive vllm_wheels_lean.tar 1 " + "0" * 64 + " 1 1"]
    lines += [wheel_line(vllm, "vllm"), wheel_line(kept, "why"), "import vllm"]
    lines += [f"left {left.name} sw_left not imported"]
    manifest = tmp_path / "lean.txt"
    manifest.write_text("\n".join(lines) + "\n")
    (tmp_path / "only").mkdir()
    for w in (vllm, kept):
        (tmp_path / "only" / w.name).write_bytes(w.read_bytes())
    done = run(
        "vllm_gpu_install.sh", "--lean", tmp_path / "only", tmp_path / "a", manifest=manifest
    )
    print(done.stdout, done.stderr)
    assert done.returncode == 0, done.stderr
    assert "all met but 1 on wheels the lean set leaves out" in done.stdout
    assert "smoke: 1 modules import" in done.stdout
    # a module on the path that needs a left-out wheel: the smoke test names the wheel to carry
    manifest.write_text(
        manifest.read_text().replace("import vllm\n", "import vllm\nimport sw_engine\n")
        + wheel_line(engine, "why")
        + "\n"
    )
    (tmp_path / "only" / engine.name).write_bytes(engine.read_bytes())
    done = run(
        "vllm_gpu_install.sh", "--lean", tmp_path / "only", tmp_path / "b", manifest=manifest
    )
    print(done.stdout, done.stderr)
    assert done.returncode == 1
    assert f"no module 'sw_left': carry {left.name} (scripts/vllm_wheels.txt)" in done.stderr


def test_unserved_requirements_names_what_neither_wheels_nor_image_serve():
    Wheel = scan_script.Wheel
    vllm = Wheel(
        "vllm.whl",
        1,
        "vllm",
        requires=[
            "torch==2.11.0",  # named in the image's list
            "sw-carried>=1",
            "sw_left",  # a wheel the lean set leaves out
            "sw-win; sys_platform == 'win32'",
            "sw-extra; extra == 'audio'",
            "sw-old; python_version < '3.11'",
        ],
    )
    carried = Wheel("c.whl", 1, "sw-carried", requires=["sw-nowhere>=2", "Typing_Extensions"])
    got = scan_script.unserved_requirements([vllm, carried], {"vllm", "sw-carried"})
    print(got)
    assert got == ["vllm.whl needs sw_left", "c.whl needs sw-nowhere>=2"]
    # the lean check spares vLLM's own lines on left-out wheels, nobody else's
    other = Wheel("o.whl", 1, "sw-other", requires=["sw-left"])
    got = scan_script.unserved_requirements(
        [vllm, carried, other], {"vllm", "sw-carried", "sw-other"}, left={"sw-left"}
    )
    assert got == ["c.whl needs sw-nowhere>=2", "o.whl needs sw-left"]
    # the image is what the device notes name, not what pip resolves for it
    assert "pydantic" not in scan_script.IMAGE_PACKAGES
    assert {"torch", "typer", "nvidia-nccl-cu13"} <= set(scan_script.IMAGE_PACKAGES)


@pytest.mark.skipif(not WHEELS.is_dir(), reason=f"the wheels are not here ({WHEELS}; VLLM_WHEELS)")
@pytest.mark.parametrize("manifest", [MANIFEST, LEAN], ids=["full", "lean"])
def test_every_requirement_of_the_carried_wheels_is_served(manifest):
    files = [w[1] for w in manifest_lines(manifest, "wheel")]
    absent = [f for f in files if not (WHEELS / f).is_file()]
    if absent:
        pytest.skip(f"{WHEELS} lacks {len(absent)} wheels of {manifest.name}, e.g. {absent[0]}")
    wheels = [scan_script.read_wheel(WHEELS / f, keep_sources=False) for f in files]
    left = {
        canonicalize_name(line.split()[1].split("-")[0])
        for line in manifest.read_text().splitlines()
        if line[:5] == "left "
    }
    got = scan_script.unserved_requirements(wheels, {w.name for w in wheels}, left)
    print("\n".join(got))
    assert got == [], f"{len(got)} requirements of {manifest.name} served by nothing"
