"""Random weights at real shapes, the same model at every tensor-parallel size.

Each tensor of the Hugging Face checkpoint layout is drawn whole from its own seed (the run's
seed and the tensor's name) on the model's device, then goes through the checkpoint loader, which
keeps this rank's shard: TP = 4 and TP = 1 hold the same weights, so their greedy outputs can be
compared. The largest tensor (a 128K x 8K embedding, 2 GB in bf16) is the only transient."""
from __future__ import annotations

import zlib
from functools import cached_property

import torch
from transformers import AutoModelForCausalLM

from ssd.loading.checkpoint import check_all_loaded, load_tensor, resolve_param
from ssd.models.decoder import CausalLM


class RandomTensor:
    """One checkpoint tensor, drawn on first use; the loaders' view of it (narrow, [], full)."""

    def __init__(self, name: str, shape: torch.Size, seed: int, dtype: torch.dtype, device: torch.device):
        self.name, self.shape, self.seed, self.dtype, self.device = name, list(shape), seed, dtype, device

    @cached_property
    def values(self) -> torch.Tensor:
        values = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        if "norm" in self.name:
            return values.fill_(1.0)
        # zlib.crc32, not hash(): the same number in every process
        generator = torch.Generator(device=self.device).manual_seed(self.seed * 7919 + zlib.crc32(self.name.encode()))
        # std 1/sqrt(fan_in) keeps activations O(1) through the stack
        return values.normal_(0.0, self.shape[-1] ** -0.5, generator=generator)

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        return self.values.narrow(dim, start, length)

    def __getitem__(self, index) -> torch.Tensor:
        return self.values[index]

    def full(self) -> torch.Tensor:
        return self.values


def checkpoint_shapes(model: CausalLM) -> dict[str, torch.Size]:
    """Name -> shape of every tensor a checkpoint of this architecture holds (a meta-device model)."""
    with torch.device("meta"):
        reference = AutoModelForCausalLM.from_config(model.arch.hf_config)
    return {name: param.shape for name, param in reference.named_parameters()}


@torch.no_grad()
def init_random_weights(model: CausalLM, seed: int) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    first = next(iter(params.values()))
    loaded = set()
    for name, shape in checkpoint_shapes(model).items():
        if load_tensor(model, params, name, RandomTensor(name, shape, seed, first.dtype, first.device)):
            loaded.add(resolve_param(model, name)[0])
    check_all_loaded(model, params, loaded, "random weights")
    if first.device.type == "cuda":
        torch.cuda.empty_cache()   # the whole tensors drawn: give their blocks back before KV sizing
