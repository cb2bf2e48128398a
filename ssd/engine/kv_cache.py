"""Static slot-per-sequence KV cache. Batch row b of a forward always uses slot b; the scheduler keeps
running sequences packed into the leading slots (moving a sequence's KV when another finishes)."""
from __future__ import annotations

import logging

import torch

from ssd.models.model_config import ModelArch

log = logging.getLogger(__name__)


def kv_bytes_per_token(arch: ModelArch, tp_size: int, dtype: torch.dtype) -> int:
    kv_heads = arch.num_kv_heads // tp_size
    return 2 * arch.num_layers * kv_heads * arch.head_dim * torch.finfo(dtype).bits // 8


def free_device_bytes(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free


class KVCache:
    def __init__(self, arch: ModelArch, tp_size: int, num_slots: int, max_len: int,
                 dtype: torch.dtype, device: torch.device, scratch_len: int = 0):
        """Per slot: max_len committed positions, then scratch_len entries for tree branches."""
        self.num_slots, self.max_len, self.scratch_len = num_slots, max_len, scratch_len
        shape = (num_slots, arch.num_kv_heads // tp_size, max_len + scratch_len, arch.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(arch.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(arch.num_layers)]
        log.info("KV cache: %d slots x %d tokens (%.2f GiB)", num_slots, max_len,
                 num_slots * max_len * kv_bytes_per_token(arch, tp_size, dtype) / 2**30)

    def move_slot(self, src: int, dst: int, length: int) -> None:
        for cache in (*self.k, *self.v):
            cache[dst, :, :length].copy_(cache[src, :, :length])


def fit_max_len(arch: ModelArch, tp_size: int, num_slots: int, wanted: int, dtype: torch.dtype,
                device: torch.device, memory_fraction: float = 0.9) -> int:
    """The longest per-slot length <= wanted that fits in the device's free memory."""
    free = free_device_bytes(device)
    if free is None:
        return wanted
    per_token = kv_bytes_per_token(arch, tp_size, dtype) * num_slots
    fits = int(free * memory_fraction) // per_token
    if fits < wanted:
        log.warning("KV cache limited by free memory: %d tokens per sequence instead of %d", fits, wanted)
    return min(wanted, fits)


def check_draft_fits(draft_len: int, needed: int) -> None:
    """The draft keeps KV for every position the target admits (a shorter cache would be written past)."""
    if draft_len < needed:
        raise RuntimeError(f"the draft's device has KV room for {draft_len} positions per sequence but the target "
                           f"may use {needed}: lower max_model_len or max_num_seqs, or free memory on the draft's GPU")
