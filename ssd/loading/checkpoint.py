"""Load a Hugging Face safetensors checkpoint into a (tensor-parallel) CausalLM.

Each rank reads only its own shard of every tensor: safetensors slices are indexed lazily,
so only the narrowed bytes are read from disk."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ssd.json_files import read_json_object
from ssd.models.decoder import CausalLM

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    pass


def checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(read_json_object(index)["weight_map"].values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            listed = f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"
            raise CheckpointError(f"{path}: {len(missing)} of the {len(names)} files its index lists are missing "
                                  f"({listed}); incomplete download?")
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {path}")
    return files


class LazySlice:
    """Narrow a safetensors slice along one dim before reading it (the loaders' view of a tensor)."""

    def __init__(self, raw, shape: list[int]):
        self.raw, self.shape = raw, shape

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        index = [slice(None)] * len(self.shape)
        index[dim] = slice(start, start + length)
        return self.raw[tuple(index)]

    def __getitem__(self, index) -> torch.Tensor:
        return self.raw[index]

    def full(self) -> torch.Tensor:
        return self.raw[:]


def resolve_param(model: CausalLM, name: str) -> tuple[str, int]:
    """HF weight name -> (our parameter name, fused part index)."""
    for hf_name, (ours, part) in model.packed_modules.items():
        if f".{hf_name}." in name:
            return name.replace(f".{hf_name}.", f".{ours}."), part
    return name, 0


def owner_module(model: nn.Module, param_name: str) -> nn.Module:
    return model.get_submodule(param_name.rsplit(".", 1)[0])


def load_tensor(model: CausalLM, params: dict[str, nn.Parameter], name: str, tensor: LazySlice) -> bool:
    if name == "lm_head.weight" and model.arch.tie_word_embeddings:
        return False
    ours, part = resolve_param(model, name)
    param = params.get(ours)
    if param is None:
        if "rotary_emb" in name:
            return False
        raise CheckpointError(f"checkpoint tensor {name!r} has no place in the model")
    loader = getattr(owner_module(model, ours), "weight_loader", None)
    if loader is None:
        param.data.copy_(tensor.full())
    else:
        loader(param, tensor, part)
    return True


def load_checkpoint(model: CausalLM, path: str | Path, show_progress: bool = True) -> None:
    """show_progress: a log line per file of a checkpoint in several files (one rank of a group says it)."""
    path = Path(path)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    files = checkpoint_files(path)
    for number, file in enumerate(files, start=1):
        if show_progress and len(files) > 1:
            log.info("loading %s: file %d of %d (%s, %.1f GB)", path.name, number, len(files), file.name,
                     file.stat().st_size / 1e9)
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                raw = f.get_slice(name)
                if load_tensor(model, params, name, LazySlice(raw, raw.get_shape())):
                    loaded.add(resolve_param(model, name)[0])
    check_all_loaded(model, params, loaded, str(path))
    log.info("loaded %d tensors from %s", len(loaded), path)


def check_all_loaded(model: CausalLM, params: dict[str, nn.Parameter], loaded: set[str], source: str) -> None:
    missing = {n for n in params if n not in loaded}
    if model.arch.tie_word_embeddings:
        missing.discard("lm_head.weight")
    if missing:
        raise CheckpointError(f"{source}: missing weights {sorted(missing)[:5]}{' ...' if len(missing) > 5 else ''}")
