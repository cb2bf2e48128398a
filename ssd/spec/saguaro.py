"""Saguaro sampling: the draft samples from a q′ that down-weights its own top-F tokens.

    q′(t) = C q(t) / Z   for t among the top-F tokens of q,
    q′(t) =   q(t) / Z   otherwise,          Z = 1 - (1 - C) · (top-F mass of q),

with C in (0, 1] (DESIGN.md §6). Why it raises the cache hit rate: in async
mode the draft prepares, for window position j, branches for the top-F_j
tokens of its distribution there, betting that after a rejection at j the
target will emit one of them. That recovered token is drawn from
normalize(max(0, p - q′)), whose mass sits where q′ *under*-estimates p. With
C = 1 and a good draft, p ≈ q on the likely tokens, so the residual lives
mostly on tokens q ranks low — exactly the ones the cache did not fork on.
Scaling q′ down on the top-F tokens makes p - q′ positive there, moving
residual mass onto the forked tokens, so more rejections land in the cache.

The price is acceptance: q′ moves proposal mass from the top tokens, where p
and q agree, into the tail, where p is usually smaller than q′, so drafts are
rejected more often. Verification stays lossless as long as it is given q′ (the
distribution the draft tokens were really drawn from), not q. Greedy (one-hot)
rows are unchanged by construction.

Pure tensor ops, no host syncs: safe inside CUDA graphs when C and F are fixed
Python numbers or tensors.
"""

from __future__ import annotations

import torch

FloatOrTensor = float | torch.Tensor
IntOrTensor = int | torch.Tensor


def top_f_mask(probs: torch.Tensor, top_f: IntOrTensor, max_f: int | None = None) -> torch.Tensor:
    """Bool [..., V]: True on the top_f most probable tokens of each row of probs [..., V].

    top_f is an int or an int64 tensor broadcastable to probs.shape[:-1] (per-row
    F; 0 selects nothing). With a tensor, `max_f` (a static upper bound on its
    values) lets a top-k replace the full sort. Ties at the F-th place are broken
    by torch.topk; the cache must fork on the same set, so use this for both.
    """
    vocab_size = probs.shape[-1]
    if isinstance(top_f, int):
        width = min(max(top_f, 0), vocab_size)
        keep: torch.Tensor | bool = True
    else:
        width = vocab_size if max_f is None else min(max(max_f, 0), vocab_size)
        ranks = torch.arange(width, device=probs.device)  # [F_max]
        keep = ranks < top_f.to(probs.device)[..., None]  # [..., F_max]
    mask = torch.zeros(probs.shape, dtype=torch.bool, device=probs.device)
    if width == 0:
        return mask
    if isinstance(keep, bool):
        return mask.scatter_(-1, probs.topk(width, dim=-1, sorted=False).indices, True)
    top_index = probs.topk(width, dim=-1, sorted=True).indices  # [..., F_max], by rank
    return mask.scatter_(-1, top_index, keep.expand(top_index.shape))


def saguaro_probs(
    probs: torch.Tensor, top_f: IntOrTensor, c: FloatOrTensor, max_f: int | None = None
) -> torch.Tensor:
    """q′ from q = probs [..., V]: the top-F tokens scaled by C, renormalised.

    top_f: int or per-row int64 tensor broadcastable to probs.shape[:-1] (rows
    with F = 0 are returned unchanged); c: float in (0, 1] or a per-row tensor
    of such values (rows with C = 1 are returned unchanged, bit for bit);
    max_f: see top_f_mask. Returns a new tensor [..., V] of probs' dtype, except
    that the input itself is returned when C == 1.0 or F == 0 are Python numbers.
    """
    if isinstance(c, (int, float)):
        if not 0.0 < c <= 1.0:
            raise ValueError(f"Saguaro constant C must be in (0, 1], got {c}")
        if c == 1.0:
            return probs
    if isinstance(top_f, int) and top_f <= 0:
        return probs
    in_top = top_f_mask(probs, top_f, max_f)  # [..., V]
    c = torch.as_tensor(c, dtype=probs.dtype, device=probs.device)
    c_row = c[..., None] if c.dim() > 0 else c  # broadcast over V
    scaled = torch.where(in_top, c_row * probs, probs)  # [..., V]
    # Summed directly (not 1 - (1 - C) * top mass), which loses precision when C is small and the top mass is ~1.
    rescaled = scaled / scaled.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(probs.dtype).tiny)
    unchanged = (c_row == 1.0) | ~in_top.any(dim=-1, keepdim=True)  # [..., 1]: C = 1 or F = 0
    return torch.where(unchanged, probs, rescaled)
