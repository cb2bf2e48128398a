"""Attention over the slot KV cache: write the new keys/values at their true positions, then attend."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias, causal_lower_right


@dataclass
class TreeContext:
    """Branch queries of the draft's speculation tree: each sees its sequence's committed cache up to
    its fork point plus its own earlier branch tokens, which live in the slot's scratch area. Query
    n is branch n, whose entries are scratch_start + n*branch_len + i; at this step it sees those
    with i <= depth (scratch_mask says the same as a tensor, for the matmul path)."""
    write_index: torch.Tensor      # [B, N] cache index where each query's k/v go (in the scratch area)
    scratch_start: int             # first scratch index of a slot (= committed capacity)
    scratch_mask: torch.Tensor     # [N, S] bool, S = N * branch_len: query n sees scratch entry s
    branch_len: int                # K: scratch entries per branch (the tree's depth)
    depth: int                     # this step: entry i of a branch is visible for i <= depth < K

    def __post_init__(self):
        if self.scratch_mask.shape[-1] != self.write_index.shape[-1] * self.branch_len:
            raise ValueError(f"scratch mask {tuple(self.scratch_mask.shape)} is not N x N*K for "
                             f"N={self.write_index.shape[-1]}, K={self.branch_len}")

    @cached_property
    def own_mask(self) -> torch.Tensor:
        """[N, K]: the diagonal blocks of scratch_mask (a query never sees another branch's entries)."""
        n = self.scratch_mask.shape[0]
        blocks = self.scratch_mask.view(n, n, self.branch_len)
        return blocks[torch.arange(n, device=blocks.device), torch.arange(n, device=blocks.device)]


@dataclass(frozen=True)
class TreeRound:
    """What the K steps of a tree round share, computed once per round: at B = 1 each of these is a
    kernel of a few microseconds, formerly built again at every step. positions / write_index [K, B, N]
    (step m's query positions and scratch entries), cos / sin their RoPE rows [K, B, N, 1, D/2],
    keys_end [B] (the committed keys the round's queries see end there, at every step)."""
    positions: torch.Tensor
    write_index: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    keys_end: torch.Tensor

    def context(self, depth: int, scratch_start: int, scratch_mask: torch.Tensor) -> TreeContext:
        return TreeContext(self.write_index[depth], scratch_start, scratch_mask, self.positions.shape[0], depth)


def keys_end_of(key_limit: torch.Tensor) -> torch.Tensor:
    """[B, T] last committed positions each query sees -> [B] one past the row's largest."""
    return key_limit.amax(dim=1) + 1


@dataclass
class ForwardContext:
    """Per-forward inputs shared by every layer (built once per forward, passed explicitly)."""
    positions: torch.Tensor        # [B, T] int64, true position of each query token (RoPE)
    key_limit: torch.Tensor        # [B, T] int64, last committed cache position each query sees
    attended_len: int              # cache positions a forward may attend to (a graph bucket)
    k_caches: list[torch.Tensor]   # per layer [slots, kv_heads, capacity, head_dim]
    v_caches: list[torch.Tensor]
    first_slot: int = 0            # batch row b uses slot first_slot + b
    tree: TreeContext | None = None
    rope: tuple[torch.Tensor, torch.Tensor] | None = None   # (cos, sin) rows of `positions`, where the
    #                                caller gathered them already (a tree round: all its steps at once)
    known_keys_end: torch.Tensor | None = None   # keys_end, where the caller has it (the same every tree step)

    # built on first use (once per forward, not per layer; a fused tree step needs none of these three):
    # the KV write needs slot_rows, the fused kernel keys_end, the matmul path the mask
    @cached_property
    def slot_rows(self) -> torch.Tensor:
        """[B, 1] cache slot of each batch row."""
        batch = self.positions.shape[0]
        return (self.first_slot + torch.arange(batch, device=self.positions.device))[:, None]

    @cached_property
    def attn_mask(self) -> torch.Tensor:
        """[B, 1, T, L] bool, which committed cache positions each query sees."""
        return causal_mask(self.key_limit, self.attended_len)

    @cached_property
    def keys_end(self) -> torch.Tensor:
        """[B] one past the last committed position any query of the row sees."""
        return self.known_keys_end if self.known_keys_end is not None else keys_end_of(self.key_limit)

    @cached_property
    def contiguous_from(self) -> int | None:
        """s when every row's queries are positions s..s+T-1, each seeing itself and those before (a
        prefill, or one chunk of a long prompt's): then attention is causal over cache positions
        < s+T, aligned at the bottom right, with no mask. None otherwise. Checked on the host (once per
        forward, only on the SDPA path), never during a CUDA-graph capture."""
        if self.tree is not None or (self.positions.is_cuda and torch.cuda.is_current_stream_capturing()):
            return None
        start = int(self.positions[0, 0])
        run = start + torch.arange(self.positions.shape[1], device=self.positions.device).expand_as(self.positions)
        return start if torch.equal(self.positions, run) and torch.equal(self.key_limit, run) else None

    @property
    def write_index(self) -> torch.Tensor:
        return self.positions if self.tree is None else self.tree.write_index


def causal_mask(positions: torch.Tensor, attended_len: int) -> torch.Tensor:
    """Query at position p sees cache positions 0..p. [B, T] -> [B, 1, T, L]."""
    key_pos = torch.arange(attended_len, device=positions.device)
    return (key_pos <= positions.unsqueeze(-1)).unsqueeze(1)


GROUPED_MAX_QUERIES = 16  # decode / verification windows; longer (prefill) goes to SDPA


def grouped_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                      scale: float, keys2: torch.Tensor | None = None, values2: torch.Tensor | None = None,
                      mask2: torch.Tensor | None = None) -> torch.Tensor:
    """Attention for a few queries per sequence with grouped-query heads, as batched matmuls:
    no K/V head expansion and no fallback kernel (SDPA has none fast for GQA + mask). An optional
    second key/value source (the tree's scratch) joins the same softmax without concatenating caches.
    q [B, T, Hq, D]; keys/values [B, Hkv, L, D]; mask [B, 1, T, L]; then either keys2/values2
    [B, Hkv, S, D] with mask2 [B or 1, 1, T, S], or per query its own entries (a tree step, query t
    = branch t): keys2/values2 [B, Hkv, T, K, D] with mask2 [T, K] — O(T K), not O(T^2 K) -> [B, T, Hq*D]."""
    batch, seq, heads, dim = q.shape
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    q = q.view(batch, seq, kv_heads, group, dim).permute(0, 2, 3, 1, 4).reshape(batch, kv_heads, group * seq, dim)
    scores = _masked_scores(q, keys, mask, scale, group)                       # [B, Hkv, G, T, L]
    own = keys2 is not None and keys2.dim() == 5
    if keys2 is not None:
        second = _own_scores(q, keys2, mask2, scale, group) if own else _masked_scores(q, keys2, mask2, scale, group)
        scores = torch.cat([scores, second], dim=-1)
    probs = torch.softmax(scores, dim=-1).to(values.dtype)                     # [B, Hkv, G, T, L (+ S or K)]
    flat = probs.view(batch, kv_heads, group * seq, -1)
    length = keys.shape[2]
    out = torch.matmul(flat[..., :length], values)                             # [B, Hkv, G*T, D]
    if own:
        out = out + torch.einsum("bhgtk,bhtkd->bhgtd", probs[..., length:], values2).reshape(out.shape)
    elif keys2 is not None:
        out = out + torch.matmul(flat[..., length:], values2)
    return out.view(batch, kv_heads, group, seq, dim).permute(0, 3, 1, 2, 4).reshape(batch, seq, heads * dim)


def _own_scores(q, keys, mask, scale: float, group: int) -> torch.Tensor:
    """q [B, Hkv, G*T, D] against each query's own keys [B, Hkv, T, K, D], mask [T, K] -> [B, Hkv, G, T, K]."""
    batch, kv_heads, _, _, dim = keys.shape
    q = q.view(batch, kv_heads, group, -1, dim)
    scores = torch.einsum("bhgtd,bhtkd->bhgtk", q, keys).float() * scale
    return scores.masked_fill(~mask, float("-inf"))


def _masked_scores(q, keys, mask, scale: float, group: int) -> torch.Tensor:
    batch, kv_heads = q.shape[:2]
    scores = torch.matmul(q, keys.transpose(-1, -2)).float() * scale          # [B, Hkv, G*T, L]
    scores = scores.view(batch, kv_heads, group, mask.shape[-2], -1)
    return scores.masked_fill(~mask.unsqueeze(2), float("-inf"))


def sdpa_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                   mask: torch.Tensor | CausalBias, scale: float) -> torch.Tensor:
    """mask: boolean [B, 1, T, L], or a causal bias, which SDPA's fastest kernels take without one
    (16 prompts of 2048 tokens at llama-3.1-8b's heads on an H200: 1.0 ms a layer, vs 3.4 ms with
    the boolean mask; bench/prefill_bench.py)."""
    batch, seq = q.shape[:2]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask, scale=scale,
                                         enable_gqa=True)
    return out.transpose(1, 2).reshape(batch, seq, -1)


def fused_applies(fused, ctx: ForwardContext, seq: int) -> bool:
    """Whether cached_attention runs the one-kernel attention: decode, windows and the tree."""
    return fused is not None and (ctx.tree is not None or seq <= GROUPED_MAX_QUERIES)


def cached_attention(q: torch.Tensor, layer: int, ctx: ForwardContext, scale: float,
                     grouped=grouped_attention, fused=None, rope=None, new_kv=None, q_norm=None) -> torch.Tensor:
    """q [B, T, Hq, D] (rotated, unless rope is given; this layer's k/v already written to the
    cache, unless new_kv is given) -> [B, T, Hq*D]. fused: the one-kernel attention
    (ssd.layers.triton_attention) where fused_applies; rope: (cos, sin) for that kernel to rotate q
    itself; new_kv: a tree step's (k not rotated, v) [B, T, Hkv, D] for that kernel to write to the
    scratch (only where it applies); q_norm: (weight, eps) of Qwen3's q norm, for that kernel to apply
    to q first."""
    batch, seq = q.shape[:2]
    if fused_applies(fused, ctx, seq):
        tree = ctx.tree
        scratch = (tree.scratch_start, tree.branch_len, tree.depth) if tree else ()
        extra = {"new_kv": new_kv} if new_kv is not None else {}
        if q_norm is not None:
            extra["q_norm"] = q_norm
        return fused(q, ctx.k_caches[layer], ctx.v_caches[layer], ctx.key_limit, ctx.keys_end, ctx.first_slot,
                     ctx.attended_len, scale, *scratch, rope=rope, **extra)
    if rope is not None or new_kv is not None or q_norm is not None:
        raise ValueError("q must be normalised and rotated and k/v written before attention outside the fused kernel")
    rows = slice(ctx.first_slot, ctx.first_slot + batch)
    keys = ctx.k_caches[layer][rows, :, : ctx.attended_len]
    values = ctx.v_caches[layer][rows, :, : ctx.attended_len]
    if ctx.tree is not None:  # each branch attends its own scratch entries only
        tree = ctx.tree
        scratch = slice(tree.scratch_start, tree.scratch_start + tree.scratch_mask.shape[-1])
        own = lambda cache: cache[rows, :, scratch].unflatten(2, (seq, tree.branch_len))  # noqa: E731
        return grouped(q, keys, values, ctx.attn_mask, scale, own(ctx.k_caches[layer]), own(ctx.v_caches[layer]),
                       tree.own_mask)
    if seq <= GROUPED_MAX_QUERIES:
        return grouped(q, keys, values, ctx.attn_mask, scale)
    start = ctx.contiguous_from
    if start is not None:
        end = start + seq
        return sdpa_attention(q, keys[:, :, :end], values[:, :, :end], causal_lower_right(seq, end), scale)
    return sdpa_attention(q, keys, values, ctx.attn_mask, scale)
