"""Fused attention for decode, verification windows and the draft's speculation tree (Triton).

One kernel replaces the matmul / mask / softmax / matmul chain of `grouped_attention` (on a 1B
draft's tree step that chain is ~40 of its ~100 microseconds per layer): a program takes one
sequence's queries of one KV head — all its query tokens times the query heads of the group, as
the rows of one tensor-core tile — and streams that head's cache once with an online softmax.
Query row r = t * GROUP + g is query token t, query head kv_head * GROUP + g.

Keys are read only up to the largest position a row of the tile may see (a device value, so the
loop bound needs no host sync and CUDA graphs captured at an attention-length bucket do not pay for
the whole bucket). The tree's scratch entries (each branch's own earlier tokens) join the same
softmax under a small [T, S] mask; the committed prefix needs no mask tensor at all.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2_E = 1.4426950408889634


@triton.jit
def _online_block(q, k_block, v_block, visible, m_i, l_i, acc, qk_scale):
    """One key block into the running softmax: scores in log2 units (qk_scale = scale * log2 e)."""
    s = tl.dot(q, k_block) * qk_scale
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v_block.dtype), v_block)
    return m_new, l_i, acc


@triton.jit
def _attend(q_ptr, k_ptr, v_ptr, o_ptr, limit_ptr, smask_ptr,
            sq_b, sq_t, sq_h, sk_s, sk_h, sk_l, so_b, so_t, so_h, sl_b, sm_t,
            first_slot, scratch_start, num_queries, keys_end, qk_scale,
            GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_N: tl.constexpr, NUM_SCRATCH: tl.constexpr):
    b, kv_head, tile = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    t, head = rows // GROUP, kv_head * GROUP + rows % GROUP
    row_ok = t < num_queries
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + b * sq_b + t[:, None] * sq_t + head[:, None] * sq_h + d[None, :],
                mask=row_ok[:, None], other=0.0)
    limit = tl.load(limit_ptr + b * sl_b + t, mask=row_ok, other=-1)       # last committed key seen

    m_i = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)   # finite: fully masked rows stay NaN-free
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    cache = (first_slot + b) * sk_s + kv_head * sk_h
    for start in range(0, keys_end, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        in_range = n < keys_end
        k_block = tl.load(k_ptr + cache + n[None, :] * sk_l + d[:, None], mask=in_range[None, :], other=0.0)
        v_block = tl.load(v_ptr + cache + n[:, None] * sk_l + d[None, :], mask=in_range[:, None], other=0.0)
        visible = n[None, :] <= limit[:, None]
        m_i, l_i, acc = _online_block(q, k_block, v_block, visible, m_i, l_i, acc, qk_scale)
    for start in range(0, NUM_SCRATCH, BLOCK_N):  # no iterations without a scratch
        n = start + tl.arange(0, BLOCK_N)
        in_range = n < NUM_SCRATCH
        entry = scratch_start + n
        k_block = tl.load(k_ptr + cache + entry[None, :] * sk_l + d[:, None], mask=in_range[None, :], other=0.0)
        v_block = tl.load(v_ptr + cache + entry[:, None] * sk_l + d[None, :], mask=in_range[:, None], other=0.0)
        visible = tl.load(smask_ptr + t[:, None] * sm_t + n[None, :],
                          mask=row_ok[:, None] & in_range[None, :], other=0) != 0
        m_i, l_i, acc = _online_block(q, k_block, v_block, visible, m_i, l_i, acc, qk_scale)
    out = acc / tl.maximum(l_i, 1e-30)[:, None]   # padded rows (never stored) have l_i = 0
    tl.store(o_ptr + b * so_b + t[:, None] * so_t + head[:, None] * so_h + d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, limit_ptr, end_ptr, smask_ptr,
                      sq_b, sq_t, sq_h, sk_s, sk_h, sk_l, so_b, so_t, so_h, sl_b, sm_t,
                      first_slot, scratch_start, num_queries, attend_len, qk_scale,
                      GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, NUM_SCRATCH: tl.constexpr):
    """On the GPU: keys are walked only up to this sequence's keys_end (read on the device)."""
    keys_end = tl.minimum(tl.load(end_ptr + tl.program_id(0)), attend_len)
    _attend(q_ptr, k_ptr, v_ptr, o_ptr, limit_ptr, smask_ptr, sq_b, sq_t, sq_h, sk_s, sk_h, sk_l,
            so_b, so_t, so_h, sl_b, sm_t, first_slot, scratch_start, num_queries, keys_end, qk_scale,
            GROUP, HEAD_DIM, BLOCK_M, BLOCK_N, NUM_SCRATCH)


@triton.jit
def _attention_kernel_interpreted(q_ptr, k_ptr, v_ptr, o_ptr, limit_ptr, end_ptr, smask_ptr,
                                  sq_b, sq_t, sq_h, sk_s, sk_h, sk_l, so_b, so_t, so_h, sl_b, sm_t,
                                  first_slot, scratch_start, num_queries, attend_len, qk_scale,
                                  GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                                  BLOCK_N: tl.constexpr, NUM_SCRATCH: tl.constexpr, KEYS: tl.constexpr):
    """Triton's CPU interpreter (the tests) cannot loop to a runtime value: the whole bucket, as a
    constant (the keys past a sequence's keys_end are masked anyway: the same result)."""
    _attend(q_ptr, k_ptr, v_ptr, o_ptr, limit_ptr, smask_ptr, sq_b, sq_t, sq_h, sk_s, sk_h, sk_l,
            so_b, so_t, so_h, sl_b, sm_t, first_slot, scratch_start, num_queries, KEYS, qk_scale,
            GROUP, HEAD_DIM, BLOCK_M, BLOCK_N, NUM_SCRATCH)


def fused_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, limit: torch.Tensor,
                    keys_end: torch.Tensor, first_slot: int, attend_len: int, scale: float,
                    scratch_start: int = 0, scratch_mask: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, T, Hq, D] (rotated); caches [slots, Hkv, capacity, D] (this layer's k/v already written);
    limit [B, T]: query (b, t) sees committed positions 0..limit[b, t] of slot first_slot + b (and
    none at or past attend_len); keys_end [B] = limit.amax(1) + 1 (once per forward, not per layer);
    scratch_mask [T, S] bool: it also sees scratch entry scratch_start + s where set.
    Returns [B, T, Hq * D]."""
    batch, queries, heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    q = q.contiguous() if q.stride(-1) != 1 else q
    limit = limit.contiguous()
    out = torch.empty((batch, queries, heads, dim), dtype=q.dtype, device=q.device)
    rows = queries * group
    block_m = min(64, max(16, triton.next_power_of_2(rows)))
    has_scratch = scratch_mask is not None
    smask = scratch_mask.view(torch.uint8) if has_scratch else limit  # any pointer when unused
    num_scratch = scratch_mask.shape[-1] if has_scratch else 0
    grid = (batch, kv_heads, triton.cdiv(rows, block_m))
    kernel, extra = (_attention_kernel, {}) if q.is_cuda else (_attention_kernel_interpreted, {"KEYS": attend_len})
    kernel[grid](
        q, k_cache, v_cache, out, limit, keys_end, smask,
        q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        out.stride(0), out.stride(1), out.stride(2), limit.stride(0), smask.stride(0) if has_scratch else 0,
        first_slot, scratch_start, queries, attend_len, scale * LOG2_E,
        GROUP=group, HEAD_DIM=dim, BLOCK_M=block_m, BLOCK_N=64 if dim <= 64 else 32, NUM_SCRATCH=num_scratch,
        num_warps=4, num_stages=2, **extra)
    return out.view(batch, queries, heads * dim)
