"""Which of the vLLM wheels are imported on the path this project uses, found statically.

Usage (any Python >= 3.10; reads the wheels as zip files, installs nothing)::

    python scripts/vllm_import_scan.py --wheels /work/vllm_wheels [--report FILE]
        [--write-manifest scripts/vllm_wheels_lean.txt]

Steps:
1. Index every wheel of the manifest (scripts/vllm_wheels.txt): the modules its RECORD installs
   (``a/b.py`` -> ``a.b``, ``a/__init__.py`` -> ``a``) and its Requires-Dist.
2. From ENTRY_MODULES (``from vllm import LLM, SamplingParams``, the V1 engine core, the uniproc
   and multiproc executors, the GPU worker and model runner, the Llama and Qwen2 model files,
   the default model loader and the dummy loader, the FLASH_ATTN / TRITON_ATTN / FLASHINFER
   attention backends, the CUDA platform, the plugin loader, sampling, and this project's
   ``sketchwalk.engines.vllm``), follow the imports that run when a module is imported: the
   module body, ``if``/``else`` branches, ``with`` and class bodies, but not function bodies and
   not ``if TYPE_CHECKING``. Importing ``a.b.c`` also runs ``a`` and ``a.b``; ``from a import
   b`` runs ``a.b`` when that is a module. Imports inside ``try`` whose handler catches
   ImportError (or a broader class) are optional: vLLM's modules behind them are still followed,
   a third-party package behind them is not needed.
3. Every third-party package imported without condition in that closure is needed: the wheel
   holding it (the longest dotted prefix that a wheel installs, so namespace packages such as
   ``nvidia`` and ``opentelemetry`` map to the right wheel), and the Requires-Dist closure of
   those wheels (without extras, except the extras that a needed wheel's requirement line
   names). Wheels in KEEP_AT_RUNTIME are kept by hand (read the REVIEW notes for why).
4. Report the needed wheels, the left-out ones (for each, the vLLM modules that import it and
   how: lazily inside a function, only optionally, or at module level outside the closure),
   the dynamic imports in the closure (``importlib.import_module``, ``__import__``,
   ``resolve_obj_by_qualname``, and string constants naming vLLM modules) for review by hand,
   and check that every import of the closure is served by a needed wheel, the GPU image
   (IMAGE_PACKAGES) or the standard library.
5. Check every Requires-Dist line (without extras; markers for CPython 3.12 on Linux x86-64) of
   every wheel of the manifest against its wheels and the packages that the device notes name
   (IMAGE_PACKAGES, nothing that pip would merely resolve for them), and likewise the needed
   wheels' lines against the needed wheels (vLLM's own lines on left-out wheels aside).

``--write-manifest`` writes the lean manifest: the full manifest's header and ``image`` lines,
the needed wheels' lines, an ``import MODULE`` line per entry module (the install's smoke test),
a ``left FILE TOP_LEVEL,... REASON`` line per left-out wheel, and an ``archive`` line with the
tar's size and a zero sha256 (``vllm_fetch_wheels.sh --lean --parts`` prints the real one; put
it and the parts' ``part`` lines in by hand, and a later run over the same wheels keeps them).
Exit 0, or 1 when an import of the closure or a requirement (step 5) is served by nothing.
"""

from __future__ import annotations

import argparse
import ast
import email.parser
import math
import re
import sys
import zipfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The modules that run on the path this project uses (read from vLLM 0.26.0's code: the names
# that LLM(), the engine core process, the CUDA platform and the worker resolve by string).
ENTRY_MODULES = (
    "vllm",
    "vllm.entrypoints.llm",
    "vllm.sampling_params",
    "vllm.outputs",
    "vllm.engine.arg_utils",
    "vllm.plugins",
    "vllm.platforms",
    "vllm.platforms.cuda",
    "vllm.v1.engine.llm_engine",
    "vllm.v1.engine.core",
    "vllm.v1.engine.core_client",
    "vllm.v1.executor.abstract",
    "vllm.v1.executor.uniproc_executor",
    "vllm.v1.executor.multiproc_executor",
    "vllm.v1.worker.gpu_worker",
    "vllm.v1.worker.gpu_model_runner",
    "vllm.v1.core.sched.scheduler",
    "vllm.v1.sample.sampler",
    "vllm.v1.attention.selector",
    "vllm.v1.attention.backends.registry",
    "vllm.v1.attention.backends.flash_attn",
    "vllm.v1.attention.backends.triton_attn",
    "vllm.v1.attention.backends.flashinfer",
    "vllm.model_executor.models.registry",
    "vllm.model_executor.models.llama",
    "vllm.model_executor.models.qwen2",
    "vllm.model_executor.model_loader",
    "vllm.model_executor.model_loader.default_loader",
    "vllm.model_executor.model_loader.dummy_loader",
    "vllm.tokenizers.hf",
    "vllm.renderers.hf",
    "vllm.compilation.backends",
    "vllm.compilation.cuda_graph",
    "vllm.compilation.passes.pass_manager",
    "vllm.distributed.device_communicators.cuda_communicator",
    "sketchwalk.engines.vllm",
)
# The project's own modules are read from the repository, not from a wheel.
PROJECT_SOURCES = {"sketchwalk": ROOT / "src" / "sketchwalk"}

# Needed although the closure does not import them (see the report's REVIEW section).
KEEP_AT_RUNTIME = {
    "depyf": "kept: vllm.compilation.wrapper imports it inside bytecode_hook, unguarded, when "
    "CUDA graphs are on (enforce_eager=False)",
}

# What a left-out wheel is for at run time, where its imports alone do not say (read from the
# code): none of it runs for LLM(...).generate() with greedy or plain sampling on FLASH_ATTN.
LEFT_NOTES = {
    "nvidia-cuda-nvcc": "nvcc for FlashInfer's JIT kernels: the FLASHINFER backend (not the "
    "default on sm90: FLASH_ATTN is) and its top-k/top-p sampler (VLLM_USE_FLASHINFER_SAMPLER, "
    "only when top_k or top_p is set); also required by humming-kernels[cu13]",
    "nvidia-nvvm": "required by nvidia-cuda-nvcc",
    "nvidia-cuda-crt": "required by nvidia-cuda-nvcc",
    "nvidia-cuda-cccl": "required by humming-kernels[cu13] (quantized GEMMs)",
    "tokenspeed-triton": "required by tokenspeed-mla (MLA attention: DeepSeek models)",
    "tilelang": "tilelang kernels of mHC models only",
    "z3-solver": "required by tilelang",
    "opencv-python-headless": "images and video (multimodal)",
    "pynvvideocodec": "video decoding (multimodal)",
    "torchcodec": "audio and video decoding (multimodal)",
    "numba": "n-gram speculative decoding and some processors",
    "llvmlite": "required by numba",
    "xgrammar": "structured output (guided decoding)",
    "llguidance": "structured output (guided decoding)",
    "outlines-core": "structured output (guided decoding)",
}

# The GPU image's packages: the names that the device notes' package list gives (2026-11-17),
# all of them and nothing else. What a carried wheel requires must be one of these or a carried
# wheel (unserved_requirements); import names that differ from the distribution's are below.
_IMAGE_LIST = (
    "absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs "
    "botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy "
    "coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython "
    "diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic "
    "frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize "
    "hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin "
    "jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities "
    "linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl "
    "meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind "
    "narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti "
    "nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile "
    "nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py "
    "nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir "
    "onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix "
    "orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker "
    "prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments "
    "pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock "
    "pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich "
    "sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn "
    "sentencepiece sentence-transformers setuptools shellingham simplejson six "
    "sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server "
    "tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio "
    "torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton "
    "typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt "
    "xarray xxhash yarl zipp"
)
IMAGE_PACKAGES = tuple(_IMAGE_LIST.split())
IMAGE_IMPORT_NAMES = {
    "absl": "absl-py",
    "cv2": "opencv-python-headless",
    "cpuinfo": "py-cpuinfo",
    "dateutil": "python-dateutil",
    "google.protobuf": "protobuf",
    "huggingface_hub": "huggingface-hub",
    "pynvml": "nvidia-ml-py",
    "PIL": "pillow",
    "prometheus_client": "prometheus-client",
    "pkg_resources": "setuptools",
    "_distutils_hack": "setuptools",
    "sklearn": "scikit-learn",
    "skimage": "scikit-image",
    "yaml": "pyyaml",
    "typing_extensions": "typing-extensions",
    "google": "protobuf",
    "cuda": "cuda-bindings",
    "markdown_it": "markdown-it-py",
}
DYNAMIC_CALLS = {"import_module", "__import__", "resolve_obj_by_qualname", "import_from_path"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass
class Wheel:
    """One wheel of the manifest: its file, size, the modules it installs, its requirements."""

    file: str
    size: int
    name: str
    modules: set[str] = field(default_factory=set)
    packages: set[str] = field(default_factory=set)
    requires: list[str] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def top_level(self) -> list[str]:
        return sorted({m.split(".")[0] for m in self.modules})


def record_module(path: str) -> str | None:
    """The dotted module a RECORD path installs (None for data, metadata and scripts)."""
    parts = path.split("/")
    if ".data" in parts[0]:
        if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
            return None
        parts = parts[2:]
    if parts[0].endswith(".dist-info"):
        return None
    last = parts[-1]
    if last.endswith(".py"):
        stem = last[:-3]
    elif last.endswith(".so") or last.endswith(".pyd"):
        stem = last.split(".")[0]
    else:
        return None
    if not all(p.isidentifier() for p in parts[:-1]) or not stem.isidentifier():
        return None
    return ".".join(parts[:-1] if stem == "__init__" else [*parts[:-1], stem])


def read_wheel(path: Path, keep_sources: bool) -> Wheel:
    """Index one wheel: modules from its file list, Requires-Dist from METADATA.

    Args:
        path: the .whl file.
        keep_sources: also keep the text of its .py files (for the import walk).

    Returns:
        the Wheel.
    """
    wheel = Wheel(path.name, path.stat().st_size, canonical(path.name.split("-")[0]))
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            module = record_module(info.filename)
            if module is None:
                continue
            wheel.modules.add(module)
            if info.filename.endswith("/__init__.py"):
                wheel.packages.add(module)
            parents = module.split(".")
            for i in range(1, len(parents)):
                wheel.modules.add(".".join(parents[:i]))
            if keep_sources and info.filename.endswith(".py"):
                wheel.sources[module] = (info.filename, z.read(info).decode("utf-8", "replace"))
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        message = email.parser.Parser().parsestr(z.read(meta).decode("utf-8", "replace"))
        wheel.requires = message.get_all("Requires-Dist") or []
    return wheel


def catches_import_error(handler: ast.ExceptHandler) -> bool:
    """Whether an except clause catches ImportError (itself, a base class or a bare except)."""
    if handler.type is None:
        return True
    names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    caught = {n.id if isinstance(n, ast.Name) else getattr(n, "attr", "") for n in names}
    return bool(caught & {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"})


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


@dataclass
class Import:
    """One import statement: the absolute module, the names taken from it, how it runs."""

    module: str
    names: tuple[str, ...]
    kind: str  # "module", "conditional", "optional" or "lazy" (inside a function)
    line: int


def module_imports(tree: ast.Module, module: str, is_package: bool) -> list[Import]:
    """Every import of a module's source, marked by when it runs.

    Args:
        tree: the parsed module.
        module: its dotted name (to resolve relative imports).
        is_package: whether it is a package's __init__.

    Returns:
        the imports: kind "module" (runs on import), "conditional" (runs on import under an
        ``if``), "optional" (runs on import inside a try that catches ImportError), "lazy"
        (inside a function body, or under TYPE_CHECKING).
    """
    found: list[Import] = []
    package = module if is_package else module.rpartition(".")[0]

    def absolute(node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        base = package.split(".")
        base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
        return ".".join(base + ([node.module] if node.module else []))

    def visit(stmts: list[ast.stmt], kind: str) -> None:
        for node in stmts:
            if isinstance(node, ast.Import):
                for alias in node.names:
                    found.append(Import(alias.name, (), kind, node.lineno))
            elif isinstance(node, ast.ImportFrom):
                names = tuple(a.name for a in node.names)
                found.append(Import(absolute(node), names, kind, node.lineno))
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(node.body, "lazy")
            elif isinstance(node, ast.ClassDef):
                visit(node.body, kind)
            elif isinstance(node, ast.If):
                branch = "conditional" if kind == "module" else kind
                visit(node.body, "lazy" if is_type_checking(node.test) else branch)
                visit(node.orelse, branch)
            elif isinstance(node, ast.Try) or type(node).__name__ == "TryStar":
                optional = any(catches_import_error(h) for h in node.handlers)
                guarded = optional and kind in ("module", "conditional")
                visit(node.body, "optional" if guarded else kind)
                for handler in node.handlers:
                    visit(handler.body, kind)
                visit(node.orelse, kind)
                visit(node.finalbody, kind)
            elif isinstance(node, (ast.With, ast.AsyncWith, ast.For, ast.While)):
                visit(node.body, kind)
                visit(getattr(node, "orelse", []), kind)

    visit(tree.body, "module")
    return found


def dynamic_imports(tree: ast.Module, own: set[str]) -> list[tuple[int, str]]:
    """Calls that import by name, and string constants naming a vLLM module, anywhere.

    Args:
        tree: the parsed module.
        own: the dotted names of vLLM's modules.

    Returns:
        (line, text) per occurrence.
    """
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = getattr(func, "attr", None) or getattr(func, "id", None)
            if name in DYNAMIC_CALLS:
                arg = ast.unparse(node.args[0]) if node.args else ""
                found.append((node.lineno, f"{name}({arg})"))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value
            if re.fullmatch(r"vllm(\.\w+)+(:\w+)?", text):
                target = text.split(":")[0]
                if target in own or target.rpartition(".")[0] in own:
                    found.append((node.lineno, repr(text)))
    return found


@dataclass
class Scan:
    """The import closure and what it needs."""

    closure: set[str]
    third_party: dict[str, list[str]]  # imported name -> importing modules (module level)
    conditional: dict[str, list[str]]  # the same under a module-level ``if``
    optional: dict[str, list[str]]
    lazy: dict[str, list[str]]  # top name -> modules importing it inside functions (closure)
    outside: dict[str, list[str]]  # top name -> modules outside the closure (module level)
    outside_lazy: dict[str, list[str]]  # the same, inside functions
    dynamic: dict[str, list[tuple[int, str]]]
    unresolved: list[str]


def scan(
    sources: dict[str, tuple[str, str]], entries: tuple[str, ...], binary: set[str] = frozenset()
) -> Scan:
    """Follow module-level imports from the entry modules through the scanned sources.

    Args:
        sources: dotted module -> (file name, source text) of vLLM and this project.
        entries: the modules imported first.
        binary: vLLM's compiled modules (they exist, but import nothing that can be read).

    Returns:
        the Scan.
    """
    own = set(sources) | set(binary)
    packages = {m for m, (f, _) in sources.items() if f.endswith("__init__.py")}
    parsed: dict[str, list[Import]] = {}
    trees: dict[str, ast.Module] = {}

    def imports_of(module: str) -> list[Import]:
        if module not in parsed:
            tree = ast.parse(sources[module][1])
            trees[module] = tree
            parsed[module] = module_imports(tree, module, module in packages)
        return parsed[module]

    def own_top(name: str) -> bool:
        return name.split(".")[0] in {m.split(".")[0] for m in entries}

    closure: set[str] = set()
    third_party: dict[str, list[str]] = defaultdict(list)
    optional: dict[str, list[str]] = defaultdict(list)
    conditional: dict[str, list[str]] = defaultdict(list)
    tables = {"module": third_party, "conditional": conditional, "optional": optional}
    unresolved: list[str] = []
    behind_if: list[str] = []  # vLLM modules imported under an `if` or a guarded try

    def walk(todo: list[str], behind: bool) -> None:
        """Add todo and what it imports at module level to the closure."""
        while todo:
            module = todo.pop()
            if module in closure:
                continue
            if module not in own:
                unresolved.append(module)
                continue
            closure.add(module)
            if module not in sources:
                continue
            parts = module.split(".")
            todo += [".".join(parts[:i]) for i in range(1, len(parts))]
            for imp in imports_of(module):
                if imp.kind == "lazy":
                    continue
                targets = [imp.module] + [f"{imp.module}.{n}" for n in imp.names]
                if own_top(imp.module):
                    found = [t for t in targets if t in own]
                    if imp.module not in own:
                        unresolved.append(f"{imp.module} (from {module}:{imp.line})")
                    (todo if imp.kind == "module" else behind_if).extend(found)
                elif imp.module.split(".")[0] != "__future__":
                    # what a module behind an `if` imports is itself conditional
                    kind = "conditional" if behind and imp.kind == "module" else imp.kind
                    for target in targets:
                        tables[kind][target].append(module)

    walk(list(entries), behind=False)
    walk(behind_if, behind=True)

    lazy: dict[str, list[str]] = defaultdict(list)
    outside: dict[str, list[str]] = defaultdict(list)
    outside_lazy: dict[str, list[str]] = defaultdict(list)
    for module in sorted(sources):
        if module.split(".")[0] not in {"vllm"}:
            continue
        try:
            found = imports_of(module)
        except SyntaxError:
            continue
        for imp in found:
            if own_top(imp.module):
                continue
            for target in [imp.module] + [f"{imp.module}.{n}" for n in imp.names]:
                if module in closure and imp.kind == "lazy":
                    lazy[target].append(module)
                elif module not in closure and imp.kind in ("module", "conditional"):
                    outside[target].append(module)
                elif module not in closure:
                    outside_lazy[target].append(module)
    dynamic = {}
    for module in sorted(closure & set(sources)):
        got = dynamic_imports(trees[module], own)
        if got:
            dynamic[module] = got
    return Scan(
        closure,
        third_party,
        conditional,
        optional,
        lazy,
        outside,
        outside_lazy,
        dynamic,
        unresolved,
    )


def provider(name: str, wheels: dict[str, Wheel]) -> Wheel | None:
    """The wheel installing the longest dotted prefix of an imported name, if a single one does."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        holders = [w for w in wheels.values() if prefix in w.modules]
        if len(holders) == 1:
            return holders[0]
        if len(holders) > 1:
            # a namespace package shared by several wheels; a plain package wins
            plain = [w for w in holders if prefix in w.packages]
            return plain[0] if len(plain) == 1 else None
    return None


def image_serves(name: str) -> bool:
    """Whether an imported name is one of the GPU image's packages (or the standard library)."""
    top = name.split(".")[0]
    if top in sys.stdlib_module_names:
        return True
    image = set(map(canonical, IMAGE_PACKAGES))
    for key, dist in IMAGE_IMPORT_NAMES.items():
        if name == key or name.startswith(key + "."):
            return canonical(dist) in image
    return canonical(top) in image


def requirement_names(line: str, extras: set[str]) -> tuple[str, set[str]] | None:
    """(name, extras) of a Requires-Dist line that applies on Linux x86-64 CPython 3.12."""
    from packaging.requirements import Requirement

    req = Requirement(line)
    if req.marker is not None:
        env = {"python_version": "3.12", "python_full_version": "3.12.0", "sys_platform": "linux"}
        env |= {"platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix"}
        env |= {"implementation_name": "cpython", "platform_python_implementation": "CPython"}
        if not any(req.marker.evaluate(env | {"extra": e}) for e in extras | {""}):
            return None
    return canonical(req.name), set(req.extras)


def requires_closure(
    seeds: dict[str, set[str]], wheels: dict[str, Wheel], asked: dict[str, set[str]]
) -> dict[str, str]:
    """The wheels that the seed wheels need through Requires-Dist, recursively.

    Args:
        seeds: canonical wheel name -> the extras asked of it.
        wheels: canonical name -> Wheel (the manifest's).
        asked: canonical name -> the extras vLLM's own requirement line asks of it (they
            decide which variant a reached wheel installs, e.g. nvidia-cutlass-dsl[cu13]).

    Returns:
        canonical name -> the name of the wheel that first asked for it ("import" for seeds).
    """
    why = {name: "import" for name in seeds}
    extras = {name: set(e) | asked.get(name, set()) for name, e in seeds.items()}
    todo = list(seeds)
    while todo:
        name = todo.pop()
        for line in wheels[name].requires:
            got = requirement_names(line, extras[name])
            if got is None or got[0] not in wheels:
                continue
            dep, dep_extras = got
            if dep not in why or not dep_extras <= extras[dep]:
                why.setdefault(dep, name)
                extras.setdefault(dep, set()).update(dep_extras | asked.get(dep, set()))
                todo.append(dep)
    return why


def read_manifest(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines() if line.strip()]


def gnu_tar_size(files: list[tuple[str, int]]) -> int:
    """Bytes of a GNU-format tar of regular files (names over 100 bytes take a long-name entry)."""
    total = 0
    for name, size in files:
        if len(name.encode()) > 100:
            total += 512 + math.ceil((len(name.encode()) + 1) / 512) * 512
        total += 512 + math.ceil(size / 512) * 512
    return math.ceil((total + 1024) / 10240) * 10240


def main() -> int:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, default=here / "vllm_wheels.txt")
    parser.add_argument("--wheels", type=Path, required=True, help="folder of the wheels")
    parser.add_argument("--report", type=Path, help="also write the report here")
    parser.add_argument("--write-manifest", type=Path, help="write the lean manifest here")
    parser.add_argument("--part-mib", type=int, default=56)
    args = parser.parse_args()
    if not args.manifest.is_file():
        print(f"--manifest: not found: {args.manifest}", file=sys.stderr)
        return 2
    lines = read_manifest(args.manifest)
    files = [f[1] for f in lines if f[0] == "wheel"]
    missing = [f for f in files if not (args.wheels / f).is_file()]
    if missing:
        print(f"--wheels: {args.wheels} lacks {', '.join(missing)}", file=sys.stderr)
        return 2
    wheels = {}
    for f in files:
        w = read_wheel(args.wheels / f, keep_sources=f.startswith("vllm-"))
        wheels[w.name] = w
    sources = dict(wheels["vllm"].sources)
    for folder in PROJECT_SOURCES.values():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder.parent).with_suffix("")
            parts = list(rel.parts[:-1]) if rel.name == "__init__" else list(rel.parts)
            sources[".".join(parts)] = (str(path), path.read_text())
    result = scan(sources, ENTRY_MODULES, wheels["vllm"].modules - set(sources))

    out: list[str] = []
    needed_imports: dict[str, Wheel] = {}
    unserved: dict[str, set[str]] = defaultdict(set)
    unserved_if: dict[str, set[str]] = defaultdict(set)
    for table, missing in ((result.third_party, unserved), (result.conditional, unserved_if)):
        for name, users in sorted(table.items()):
            w = provider(name, wheels)
            if w is not None:
                needed_imports[name] = w
            elif not image_serves(name) and provider(name.split(".")[0], wheels) is None:
                missing[name.split(".")[0]].update(users)
    seeds: dict[str, set[str]] = {w.name: set() for w in needed_imports.values()}
    for name in KEEP_AT_RUNTIME:
        seeds.setdefault(name, set())
    asked: dict[str, set[str]] = {}
    for line in wheels["vllm"].requires:
        got = requirement_names(line, set())
        if got is not None:
            asked[got[0]] = got[1]
    needed = requires_closure(seeds, wheels, asked)
    needed["vllm"] = "import"

    def modules_of(table: dict[str, list[str]], w: Wheel) -> list[str]:
        return sorted(
            {m for name, users in table.items() if provider(name, wheels) is w for m in users}
        )

    out.append(f"closure: {len(result.closure)} modules from {len(ENTRY_MODULES)} entries")
    keep = [w for n, w in sorted(wheels.items()) if n in needed]
    left = [w for n, w in sorted(wheels.items()) if n not in needed]
    mib = sum(w.size for w in keep) / 2**20
    out.append(f"needed: {len(keep)} wheels, {mib:.0f} MiB")
    for w in keep:
        how = needed[w.name]
        if how == "import":
            names = sorted(n for n, v in needed_imports.items() if v is w) or ["(entry)"]
            how = "imported: " + ", ".join(names[:6])
            if w.name in KEEP_AT_RUNTIME:
                how = KEEP_AT_RUNTIME[w.name]
        else:
            how = f"required by {how}"
        out.append(f"  keep {w.file} {w.size} {how}")
    out.append(f"left out: {len(left)} wheels, {sum(w.size for w in left) / 2**20:.0f} MiB")
    reasons = {}
    for w in left:
        lazy = modules_of(result.lazy, w)
        optional = modules_of(result.optional, w)
        outside = modules_of(result.outside, w)
        parts = []
        if lazy:
            parts.append(f"lazy in {', '.join(lazy[:4])}" + (" ..." if len(lazy) > 4 else ""))
        if optional:
            parts.append(f"optional in {', '.join(optional[:4])}")
        if outside:
            parts.append(
                f"module level outside the path in {len(outside)} modules ({outside[0]} ...)"
            )
        outside_lazy = modules_of(result.outside_lazy, w)
        if outside_lazy and not outside:
            parts.append(f"lazily off the path in {', '.join(outside_lazy[:2])}")
        parts = parts or ["not imported by vllm"]
        if w.name in LEFT_NOTES:
            parts.append(LEFT_NOTES[w.name])
        reasons[w.file] = "; ".join(parts)
        out.append(f"  left {w.file} {w.size} {reasons[w.file]}")
    out.append("dynamic imports in the closure (REVIEW by hand):")
    for module, found in sorted(result.dynamic.items()):
        for line, text in found:
            out.append(f"  {module}:{line} {text}")
    out.append("unresolved vllm imports: " + (", ".join(sorted(set(result.unresolved))) or "none"))
    for title, missing in (
        ("module-level imports served by nothing", unserved),
        ("imports under a module-level `if` served by nothing (REVIEW)", unserved_if),
    ):
        out.append(f"{title}: " + ("none" if not missing else ""))
        for name, users in sorted(missing.items()):
            out.append(f"  {name}: {', '.join(sorted(users)[:3])}")
    unmet = unserved_requirements(list(wheels.values()), set(wheels))
    out.append(
        f"requirements of the {len(wheels)} wheels met by the wheels or the image's named "
        "packages: " + ("all" if not unmet else "")
    )
    out += [f"  unmet: {line}" for line in unmet]
    unmet_kept = unserved_requirements(keep, {w.name for w in keep}, {w.name for w in left})
    out.append(
        f"requirements of the {len(keep)} kept wheels (vllm's on left-out wheels aside) met by "
        "kept wheels or the image's named packages: " + ("all" if not unmet_kept else "")
    )
    out += [f"  unmet: {line}" for line in unmet_kept]
    text = "\n".join(out) + "\n"
    print(text, end="")
    if args.report:
        args.report.write_text(text)
    if args.write_manifest:
        write_lean_manifest(args, lines, keep, left, reasons)
    return 1 if unserved or unmet or unmet_kept else 0


def unserved_requirements(
    checked: list[Wheel], carried: set[str], left: set[str] = frozenset()
) -> list[str]:
    """Requires-Dist lines of the checked wheels that neither a carried wheel nor the image serves.

    A line counts without extras, with its markers evaluated for CPython 3.12 on Linux x86-64;
    the image serves it only when the device notes name the package (IMAGE_PACKAGES): a package
    that pip would resolve for the image's recorded ones is not assumed to be there.

    Args:
        checked: the wheels whose requirements are checked.
        carried: canonical names of the wheels that travel with them.
        left: canonical names of wheels that the lean set leaves out: vLLM's own requirements
            on them are not reported (its import path does not need them).

    Returns:
        "WHEEL needs REQUIREMENT" per unserved line (names only: versions are pip's to check).
    """
    image = set(map(canonical, IMAGE_PACKAGES))
    unserved = []
    for w in checked:
        for line in w.requires:
            got = requirement_names(line, set())
            if got is None or got[0] in carried or got[0] in image:
                continue
            if w.name == "vllm" and got[0] in left:
                continue
            unserved.append(f"{w.file} needs {line}")
    return unserved


def write_lean_manifest(args, lines, keep, left, reasons) -> None:
    """The lean manifest: the full one's header and image lines, the kept wheels, imports, left."""
    from sketchwalk.atomic import write_text

    header = [
        "# The lean set: the wheels of scripts/vllm_wheels.txt that the import path of",
        "# LLM(...).generate() with a Llama or Qwen2 model on the CUDA platform needs, found by",
        "# scripts/vllm_import_scan.py (which writes this file). Same format as vllm_wheels.txt,",
        "# plus: import MODULE (the install's smoke test imports each) and",
        "# left FILE TOP_LEVEL,... REASON (a wheel of the full set left out, what it provides).",
    ]
    kept = {w.file for w in keep}
    body = [" ".join(f) for f in lines if f[0] == "image"]
    size = gnu_tar_size([(w.file, w.size) for w in keep])
    parts = math.ceil(size / (args.part_mib << 20))
    archive = [f"archive vllm_wheels_lean.tar {size} {'0' * 64} {parts} {args.part_mib}"]
    old = read_manifest(args.write_manifest) if args.write_manifest.is_file() else []
    if {f[1] for f in old if f[0] == "wheel"} == kept:
        # the same wheels make the same tar: keep the sha256 of it and of its parts
        archive = [" ".join(f) for f in old if f[0] in ("archive", "part")]
    body += archive
    text = args.manifest.read_text().splitlines()
    full = {f.split()[1]: f for f in text if f.startswith("wheel ")}
    body += [full[f] for f in sorted(kept)]
    body += [f"import {m}" for m in ENTRY_MODULES]
    body += [f"left {w.file} {','.join(w.top_level) or '-'} {reasons[w.file]}" for w in left]
    write_text(args.write_manifest, "\n".join(header + body) + "\n")


if __name__ == "__main__":
    sys.exit(main())
