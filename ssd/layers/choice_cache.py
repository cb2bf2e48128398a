"""Kernel choices measured on one machine, kept on disk for the next start-up.

MeasuredLinear and NormFusion time their candidates for every new shape, which costs minutes per
engine on a fresh machine (Triton compiles each tiling it times). A ChoiceCache keeps what they chose
in a JSON file, per setup: the GPU (name, compute capability), the torch / Triton / ssd versions, the
code of the kernels' source files (their syntax trees without docstrings: editing a comment, a docstring
or the layout keeps the choices) and the candidate lists — a changed kernel, list or library starts afresh.
$SSD_KERNEL_CACHE names the file (default ~/.cache/ssd/kernel_choices.json; `off`: nothing is kept).

Several processes (tensor-parallel ranks, the draft worker) may share the file: each write merges
what is on disk with its own choices and replaces the file whole, so a reader never sees half a file;
an entry lost to a race is measured again next time.
"""
from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger(__name__)

KERNEL_CACHE_ENV_VAR = "SSD_KERNEL_CACHE"
DEFAULT_KERNEL_CACHE = Path("~/.cache/ssd/kernel_choices.json")
FORMAT = 1


def kernel_cache_path() -> Path | None:
    """$SSD_KERNEL_CACHE, the default file, or None where it says `off`."""
    value = os.environ.get(KERNEL_CACHE_ENV_VAR, "").strip()
    if value.lower() in ("off", "0", "none", "false"):
        return None
    return Path(value or DEFAULT_KERNEL_CACHE).expanduser()


def setup_digest(device: torch.device, scope: str, sources: tuple[str, ...]) -> str:
    """What a stored choice is valid for: this device's GPU, the libraries, the kernels' source files
    and the caller's `scope` (its candidate lists)."""
    import triton

    from ssd import __version__
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu = f"{props.name} sm{props.major}{props.minor}"
    else:
        gpu = device.type
    digest = hashlib.sha256(f"{gpu}|torch {torch.__version__}|triton {triton.__version__}|ssd {__version__}|{scope}"
                            .encode())
    for source in sources:
        digest.update(source_code(source).encode())
    return digest.hexdigest()[:20]


def source_code(path: str) -> str:
    """A Python file's code as its syntax tree without docstrings (comments and positions are not in it).
    ast.dump's form may change with the Python version: another Python measures afresh."""
    tree = ast.parse(Path(path).read_text())
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


def key_text(key: tuple) -> str:
    """A choice's key (op, rows, N, K, dtypes ...) as the file's JSON key."""
    return "|".join(str(part) for part in key)


@dataclass
class ChoiceCache:
    """One setup's stored choices (key -> a JSON object the caller encodes), read from `path` once."""
    path: Path
    setup: str
    stored: dict[str, dict] = field(default_factory=dict)
    writable: bool = True      # False after a failed write (warned once; the choices stay in memory)

    @classmethod
    def open(cls, path: Path, setup: str) -> "ChoiceCache":
        cache = cls(path, setup)
        cache.stored = dict(cache._read_setups().get(setup, {}))
        if cache.stored:
            log.info("kernel choices: %d stored for this setup in %s", len(cache.stored), path)
        return cache

    def get(self, key: tuple) -> dict | None:
        return self.stored.get(key_text(key))

    def put(self, key: tuple, choice: dict) -> None:
        """Stores one choice, written through to the file (merged with what other processes wrote)."""
        self.stored[key_text(key)] = choice
        if not self.writable:
            return
        setups = self._read_setups()
        setups[self.setup] = {**setups.get(self.setup, {}), **self.stored}
        try:
            self._replace_file({"format": FORMAT, "setups": setups})
        except OSError as exc:
            self.writable = False
            log.warning("kernel choices not written to %s (%s): the next start-up measures again", self.path, exc)

    def _replace_file(self, data: dict) -> None:
        """The file replaced whole (a reader sees the old file or the new one; no temporary left behind)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as file:
                json.dump(data, file)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _read_setups(self) -> dict[str, dict]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("kernel choices in %s unreadable (%s): measuring afresh", self.path, exc)
            return {}
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("setups"), dict):
            return {}
        return data["setups"]


@dataclass
class DeviceChoiceCaches:
    """The ChoiceCache of each device a measuring object meets (opened when first needed); `scope`
    and `sources` as setup_digest takes them. None everywhere when the cache is off."""
    scope: str
    sources: tuple[str, ...]
    path: Path | None = field(default_factory=kernel_cache_path)
    _open: dict[torch.device, ChoiceCache] = field(default_factory=dict, repr=False)

    def at(self, device: torch.device) -> ChoiceCache | None:
        if self.path is None:
            return None
        if device not in self._open:
            self._open[device] = ChoiceCache.open(self.path, setup_digest(device, self.scope, self.sources))
        return self._open[device]
