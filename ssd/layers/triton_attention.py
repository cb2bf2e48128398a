"""Fused attention for decode, verification windows and the draft's speculation tree (Triton).

One kernel replaces the matmul / mask / softmax / matmul chain of `grouped_attention` (on a 1B
draft's tree step that chain is ~40 of its ~100 microseconds per layer): a program takes one
sequence's queries of one KV head — all its query tokens times the query heads of the group, as
the rows of one tensor-core tile — and streams that head's cache once with an online softmax.
Query row r = t * GROUP + g is query token t, query head kv_head * GROUP + g.

Keys are read only up to the largest position a row of the tile may see (a device value, so the
loop bound needs no host sync and CUDA graphs captured at an attention-length bucket do not pay for
the whole bucket); the committed prefix needs no mask tensor at all.

The tree's scratch is structural: query token t is branch t, whose entries live at
scratch_start + t*K + i (K entries per branch) and which at tree step `depth` sees exactly i = 0..depth.
A row tile's tokens are consecutive, so their branches are one contiguous span of the scratch: the
tile walks only that span, in key blocks on the tensor cores, with the visibility computed from the
layout — no mask tensor, no walk over other tiles' branches, and the same cost at every depth. (A
per-row gather of each row's own entries was slower on the H200: its CUDA-core work grows with
the depth; 1B tree step, B = 16, bucket full, depth 5: 29.4 us, this 22.0, the [T, S] mask walk
over every branch 24.7.)

With few (sequence, head, row-tile) programs — batch 1 decode has 8 — one program per head would
walk its keys serially and leave most SMs idle, so the keys are split into chunks (flash-decoding):
each split writes its normalised partial output with its running max and sum, and a second small
kernel merges the splits (a block of rows per program). The tree's scratch goes to a split of its
own (running beside the key chunks) or, with scratch_split=False or no key splits, to the last split.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import triton
import triton.language as tl

LOG2_E = 1.4426950408889634
# split the keys only while at most half the SMs would have a program (H200, measured: the 1B
# draft's tree step at B=1 has 16 programs, 17.6 us unsplit vs 10.5 us in 8 splits; at B=16 it has
# 256, 22 us unsplit vs 40 us in 3 splits; its window at B=16 has 128, 11.8 us unsplit vs 14.5 us
# in 2 splits — the merge costs more than the idle SMs did)
PROGRAMS_PER_SM = 1
# where the keys are split, the tree's scratch runs as a split of its own (beside the key chunks)
# rather than after the last chunk's keys (H200, 1B tree step at B=1, splits as choose_splits: the
# same 6.6-7.0 us with the bucket half full — the last chunk is empty then —, 7.0 vs 9.3 us with
# it full); bench/attention_kernel_bench.py times both
SCRATCH_SPLIT = True
MERGE_ROWS = 16   # rows (token x head) the merge kernel combines per program


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
def _branch_entries(q, k_ptr, v_ptr, cache, sk_l, t, tile, num_queries, scratch_start, depth, m_i, l_i, acc,
                    qk_scale, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BRANCH_LEN: tl.constexpr):
    """The tile's own branches into the running softmax: query token t is branch t, its entry i at
    scratch_start + t*K + i, visible for i <= depth. A tile's tokens are consecutive, so their
    entries are one contiguous span (K per token), walked in key blocks with the visibility computed
    from the layout; blocks past the last branch are skipped."""
    # tokens a tile of BLOCK_M rows can touch: at most BLOCK_M / GROUP rounded up, plus one when GROUP
    # does not divide BLOCK_M (a tile may then begin mid-token)
    TILE_TOKENS: tl.constexpr = (BLOCK_M + GROUP - 1) // GROUP + (BLOCK_M % GROUP + GROUP - 1) // GROUP
    first = (tile * BLOCK_M) // GROUP * BRANCH_LEN   # branch entry index of the tile's first token
    entries = num_queries * BRANCH_LEN
    d = tl.arange(0, HEAD_DIM)
    for start in tl.static_range(0, TILE_TOKENS * BRANCH_LEN, BLOCK_N):
        if first + start < entries:
            n = first + start + tl.arange(0, BLOCK_N)
            in_range = n < entries
            at = cache + (scratch_start + n) * sk_l
            k_block = tl.load(k_ptr + at[None, :] + d[:, None], mask=in_range[None, :], other=0.0)
            v_block = tl.load(v_ptr + at[:, None] + d[None, :], mask=in_range[:, None], other=0.0)
            visible = (in_range & (n % BRANCH_LEN <= depth))[None, :] & ((n // BRANCH_LEN)[None, :] == t[:, None])
            m_i, l_i, acc = _online_block(q, k_block, v_block, visible, m_i, l_i, acc, qk_scale)
    return m_i, l_i, acc


@triton.jit
def _head_normed(x, rstd, weight_ptr, columns, rows_ptr):
    """layernorm.rms_norm's rounding: the normalised row in the rows' dtype, times the weight in the
    weight's dtype; x, rstd float32, returned as float32."""
    weight = tl.load(weight_ptr + columns).to(tl.float32)
    normed = (x * rstd[:, None]).to(rows_ptr.dtype.element_ty).to(tl.float32)
    return (weight[None, :] * normed).to(weight_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def _load_rotated(rows_ptr, ok, cos_ptr, sin_ptr, trig_rows, norm_ptr, norm_eps, HEAD_DIM: tl.constexpr,
                  NORM: tl.constexpr):
    """Rows [R, HEAD_DIM] at rows_ptr + d with RoPE applied (non-interleaved halves, float32 as
    apply_rotary: x1 cos - x2 sin | x2 cos + x1 sin); trig_rows [R, 1]: each row's cos/sin offset.
    NORM: each row first RMS-normalised with the weight at norm_ptr (Qwen3's q norm)."""
    d = tl.arange(0, HEAD_DIM)
    half = HEAD_DIM // 2
    x = tl.load(rows_ptr + d[None, :], mask=ok, other=0.0).to(tl.float32)
    partner = tl.load(rows_ptr + ((d + half) % HEAD_DIM)[None, :], mask=ok, other=0.0).to(tl.float32)
    if NORM:   # the partner is the same row permuted: the same rms
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, 1) / HEAD_DIM + norm_eps)
        x = _head_normed(x, rstd, norm_ptr, d, rows_ptr)
        partner = _head_normed(partner, rstd, norm_ptr, (d + half) % HEAD_DIM, rows_ptr)
    cos = tl.load(cos_ptr + trig_rows + (d % half)[None, :], mask=ok, other=0.0)
    sin = tl.load(sin_ptr + trig_rows + (d % half)[None, :], mask=ok, other=0.0)
    return x * cos + (tl.where(d < half, -1.0, 1.0)[None, :] * partner) * sin


@triton.jit
def _write_branch_kv(kn_ptr, vn_ptr, k_ptr, v_ptr, cache, sk_l, cos_ptr, sin_ptr, skn_b, skn_t, skn_h, svn_b,
                     svn_t, svn_h, sc_b, sc_t, b, kv_head, tile, num_queries, scratch_start, depth, GROUP: tl.constexpr,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BRANCH_LEN: tl.constexpr):
    """This tree step's k (rotated) and v of the tile's tokens into their entries scratch_start +
    t*K + depth, before the tile reads its branches (what rope_and_cache writes otherwise — one
    kernel per layer fewer). A token two tiles share is written by both, with the same values."""
    t = (tile * BLOCK_M) // GROUP + tl.arange(0, BLOCK_M)
    ok = ((t <= (tile * BLOCK_M + BLOCK_M - 1) // GROUP) & (t < num_queries))[:, None]
    d = tl.arange(0, HEAD_DIM)
    k_rows = kn_ptr + b * skn_b + t[:, None] * skn_t + kv_head * skn_h
    k = _load_rotated(k_rows, ok, cos_ptr, sin_ptr, b * sc_b + t[:, None] * sc_t, k_rows, 0.0, HEAD_DIM, False)
    v = tl.load(vn_ptr + b * svn_b + t[:, None] * svn_t + kv_head * svn_h + d[None, :], mask=ok, other=0.0)
    at = cache + (scratch_start + t[:, None] * BRANCH_LEN + depth) * sk_l + d[None, :]
    tl.store(k_ptr + at, k.to(k_ptr.dtype.element_ty), mask=ok)
    tl.store(v_ptr + at, v, mask=ok)
    tl.debug_barrier()   # the stores are seen by every thread of the program before it reads them


@triton.jit
def _attend(q_ptr, k_ptr, v_ptr, o_ptr, ml_ptr, limit_ptr, cos_ptr, sin_ptr, kn_ptr, vn_ptr, qw_ptr,
            sq_b, sq_t, sq_h, sk_s, sk_h, sk_l, so_s, so_b, so_t, so_h, sl_b, sc_b, sc_t,
            skn_b, skn_t, skn_h, svn_b, svn_t, svn_h, first_slot, scratch_start, depth, num_queries, num_heads,
            num_splits, qk_scale, norm_eps,
            loop_lo, loop_hi, lo, hi, b, kv_head, tile, split,
            GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            BRANCH_LEN: tl.constexpr, WRITE_STATS: tl.constexpr, ROTATE: tl.constexpr, WRITE_KV: tl.constexpr,
            Q_NORM: tl.constexpr):
    """Committed keys lo..hi-1 (walked in blocks from loop_lo to loop_hi) plus, on the last split,
    the tree's scratch (BRANCH_LEN > 0), for one row tile of one sequence and KV head."""
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    t, head = rows // GROUP, kv_head * GROUP + rows % GROUP
    row_ok = t < num_queries
    d = tl.arange(0, HEAD_DIM)
    q_rows = q_ptr + b * sq_b + t[:, None] * sq_t + head[:, None] * sq_h
    if ROTATE:  # RoPE (and Q_NORM: Qwen3's q norm) on q here: no kernel of its own
        q = _load_rotated(q_rows, row_ok[:, None], cos_ptr, sin_ptr, b * sc_b + t[:, None] * sc_t, qw_ptr, norm_eps,
                          HEAD_DIM, Q_NORM).to(q_ptr.dtype.element_ty)
    else:
        q = tl.load(q_rows + d[None, :], mask=row_ok[:, None], other=0.0)
    limit = tl.load(limit_ptr + b * sl_b + t, mask=row_ok, other=-1)       # last committed key seen

    m_i = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)   # finite: rows seeing nothing stay NaN-free
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    cache = (first_slot + b) * sk_s + kv_head * sk_h
    for start in range(loop_lo, loop_hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        in_range = (n >= lo) & (n < hi)
        k_block = tl.load(k_ptr + cache + n[None, :] * sk_l + d[:, None], mask=in_range[None, :], other=0.0)
        v_block = tl.load(v_ptr + cache + n[:, None] * sk_l + d[None, :], mask=in_range[:, None], other=0.0)
        visible = in_range[None, :] & (n[None, :] <= limit[:, None])
        m_i, l_i, acc = _online_block(q, k_block, v_block, visible, m_i, l_i, acc, qk_scale)
    if split == num_splits - 1:   # no iterations without a scratch (BRANCH_LEN = 0)
        if WRITE_KV:
            _write_branch_kv(kn_ptr, vn_ptr, k_ptr, v_ptr, cache, sk_l, cos_ptr, sin_ptr, skn_b, skn_t, skn_h,
                             svn_b, svn_t, svn_h, sc_b, sc_t, b, kv_head, tile, num_queries, scratch_start, depth,
                             GROUP, HEAD_DIM, BLOCK_M, BRANCH_LEN)
        m_i, l_i, acc = _branch_entries(q, k_ptr, v_ptr, cache, sk_l, t, tile, num_queries, scratch_start, depth,
                                        m_i, l_i, acc, qk_scale, GROUP, HEAD_DIM, BLOCK_M, BLOCK_N, BRANCH_LEN)
    out = acc / tl.maximum(l_i, 1e-30)[:, None]   # l_i = 0: a padded row, or a split with no keys
    tl.store(o_ptr + split * so_s + b * so_b + t[:, None] * so_t + head[:, None] * so_h + d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])
    if WRITE_STATS:   # ml [2, splits, B, T, Hq]: running max (log2 units) and sum of each split
        rows_total = tl.num_programs(0) * num_queries * num_heads
        stat = split * rows_total + (b * num_queries + t) * num_heads + head
        tl.store(ml_ptr + stat, m_i, mask=row_ok)
        tl.store(ml_ptr + num_splits * rows_total + stat, l_i, mask=row_ok)


# depth changes with every tree step: not specialised on (a value of 1 would compile a kernel of its own)
@triton.jit(do_not_specialize=["depth"])
def _attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, ml_ptr, limit_ptr, end_ptr, cos_ptr, sin_ptr, kn_ptr, vn_ptr,
                      qw_ptr, sq_b, sq_t, sq_h, sk_s, sk_h, sk_l, so_s, so_b, so_t, so_h, sl_b, sc_b, sc_t,
                      skn_b, skn_t, skn_h, svn_b, svn_t, svn_h,
                      first_slot, scratch_start, depth, num_queries, num_heads, num_splits, chunk, attend_len,
                      qk_scale, norm_eps, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BRANCH_LEN: tl.constexpr, WRITE_STATS: tl.constexpr,
                      ROTATE: tl.constexpr, WRITE_KV: tl.constexpr, Q_NORM: tl.constexpr):
    """On the GPU: a split walks only its chunk's keys below this sequence's keys_end (read on the
    device); a split past the last chunk (the scratch's own) walks none."""
    b, kv_head, tile, split = tl.program_id(0), tl.program_id(1), tl.program_id(2) // num_splits, tl.program_id(2) % num_splits
    lo = split * chunk
    hi = tl.minimum(tl.minimum(lo + chunk, tl.load(end_ptr + b)), attend_len)
    _attend(q_ptr, k_ptr, v_ptr, o_ptr, ml_ptr, limit_ptr, cos_ptr, sin_ptr, kn_ptr, vn_ptr, qw_ptr, sq_b,
            sq_t, sq_h, sk_s, sk_h, sk_l, so_s, so_b, so_t, so_h, sl_b, sc_b, sc_t, skn_b, skn_t, skn_h, svn_b, svn_t,
            svn_h, first_slot, scratch_start, depth, num_queries, num_heads, num_splits,
            qk_scale, norm_eps, lo, hi, lo, hi, b, kv_head, tile, split,
            GROUP, HEAD_DIM, BLOCK_M, BLOCK_N, BRANCH_LEN, WRITE_STATS, ROTATE, WRITE_KV, Q_NORM)


@triton.jit
def _attention_kernel_interpreted(q_ptr, k_ptr, v_ptr, o_ptr, ml_ptr, limit_ptr, end_ptr, cos_ptr,
                                  sin_ptr, kn_ptr, vn_ptr, qw_ptr, sq_b, sq_t, sq_h, sk_s, sk_h, sk_l,
                                  so_s, so_b, so_t, so_h, sl_b, sc_b, sc_t, skn_b, skn_t, skn_h, svn_b, svn_t, svn_h,
                                  first_slot, scratch_start, depth,
                                  num_queries, num_heads, num_splits, chunk, attend_len, qk_scale, norm_eps,
                                  GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                                  BLOCK_N: tl.constexpr, BRANCH_LEN: tl.constexpr, WRITE_STATS: tl.constexpr,
                                  ROTATE: tl.constexpr, WRITE_KV: tl.constexpr, Q_NORM: tl.constexpr,
                                  KEYS: tl.constexpr):
    """Triton's CPU interpreter (the tests) cannot loop to a runtime value: every split walks the
    whole bucket (a constant) and masks what is not its chunk — the same result."""
    b, kv_head, tile, split = tl.program_id(0), tl.program_id(1), tl.program_id(2) // num_splits, tl.program_id(2) % num_splits
    lo = split * chunk
    hi = tl.minimum(tl.minimum(lo + chunk, tl.load(end_ptr + b)), attend_len)
    _attend(q_ptr, k_ptr, v_ptr, o_ptr, ml_ptr, limit_ptr, cos_ptr, sin_ptr, kn_ptr, vn_ptr, qw_ptr, sq_b,
            sq_t, sq_h, sk_s, sk_h, sk_l, so_s, so_b, so_t, so_h, sl_b, sc_b, sc_t, skn_b, skn_t, skn_h, svn_b, svn_t,
            svn_h, first_slot, scratch_start, depth, num_queries, num_heads, num_splits,
            qk_scale, norm_eps, 0, KEYS, lo, hi, b, kv_head, tile, split,
            GROUP, HEAD_DIM, BLOCK_M, BLOCK_N, BRANCH_LEN, WRITE_STATS, ROTATE, WRITE_KV, Q_NORM)


@triton.jit
def _merge_splits_kernel(part_ptr, ml_ptr, out_ptr, rows_total,
                         HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr, BLOCK_R: tl.constexpr):
    """out[r] = sum_s w_s o_s / sum_s w_s with w_s = 2^(m_s - max m) l_s, for BLOCK_R rows r per
    program; part [splits, rows, D], ml [2, splits, rows] (m finite, see _attend)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = r < rows_total
    d = tl.arange(0, HEAD_DIM)
    m_max = tl.full((BLOCK_R,), -1.0e30, dtype=tl.float32)
    for s in tl.static_range(SPLITS):
        m_max = tl.maximum(m_max, tl.load(ml_ptr + s * rows_total + r, mask=ok, other=0.0))
    num = tl.zeros((BLOCK_R, HEAD_DIM), dtype=tl.float32)
    den = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for s in tl.static_range(SPLITS):
        m = tl.load(ml_ptr + s * rows_total + r, mask=ok, other=0.0)
        w = tl.exp2(m - m_max) * tl.load(ml_ptr + (SPLITS + s) * rows_total + r, mask=ok, other=1.0)
        o = tl.load(part_ptr + (s * rows_total + r)[:, None] * HEAD_DIM + d[None, :], mask=ok[:, None], other=0.0)
        num += w[:, None] * o
        den += w
    tl.store(out_ptr + r[:, None] * HEAD_DIM + d[None, :], (num / den[:, None]).to(out_ptr.dtype.element_ty),
             mask=ok[:, None])


@lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_splits(programs: int, attend_len: int, block_n: int, device: torch.device,
                  scratch_split: bool = False) -> int:
    """Key splits so that about PROGRAMS_PER_SM programs per SM run, each walking >= 1 key block
    (1: at least half the SMs have a program already). scratch_split: one more split per program
    will hold the tree's scratch — all of them should fit in one wave (H200, 1B tree step at B=1,
    bucket 1024 full: 9 splits of which 1 the scratch's, 144 programs on 132 SMs, 8.0 us; 7 splits
    7.05 us; the scratch on the last of 8 key splits 9.3 us), keeping at least 2 key splits."""
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 8
    if 2 * programs > sms:
        return 1
    if scratch_split:
        fit = max(2, (PROGRAMS_PER_SM * sms) // programs - 1)
    else:
        fit = triton.cdiv(PROGRAMS_PER_SM * sms, programs)
    return max(1, min(attend_len // block_n, fit))


@dataclass(frozen=True)
class Tiling:
    """Launch shape of the attention kernel: rows (query token x group head) and keys per block."""
    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 3   # H200: 3 stages 9.98 vs 11.8 us (1B window, B=16), 16.7 vs 18.8 us (tree, B=16)

    @staticmethod
    def default(rows: int, head_dim: int) -> "Tiling":
        # 64 keys per block up to head dim 128 (H200, qwen3-0.6b heads, 32 -> 64 keys: window 7.68 ->
        # 7.41 / 14.43 -> 11.13 us at B = 1 / 16, tree 10.04 -> 9.38 / 21.2 -> 18.78 us,
        # results/attention_sweep_h200_qwen06b.json)
        return Tiling(min(64, max(16, triton.next_power_of_2(rows))), 64 if head_dim <= 128 else 32)


def fused_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, limit: torch.Tensor,
                    keys_end: torch.Tensor, first_slot: int, attend_len: int, scale: float,
                    scratch_start: int = 0, branch_len: int = 0, depth: int = 0,
                    splits: int | None = None, tiling: Tiling | None = None,
                    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                    scratch_split: bool = SCRATCH_SPLIT,
                    new_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                    q_norm: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
    """q [B, T, Hq, D] (rotated); caches [slots, Hkv, capacity, D] (this layer's k/v already written);
    limit [B, T]: query (b, t) sees committed positions 0..limit[b, t] of slot first_slot + b (and
    none at or past attend_len); keys_end [B] = limit.amax(1) + 1 (once per forward, not per layer).
    branch_len K > 0: a tree step — query t is branch t and also sees its scratch entries
    scratch_start + t*K + i for i = 0..depth (0 <= depth < K; depth is a runtime argument: every
    depth runs the same compiled kernel). splits: key splits (default: choose_splits); scratch_split:
    where the keys are split, the scratch gets a split of its own (else it joins the last one);
    tiling: default Tiling.default; rope: (cos, sin) [B, T, 1, D/2] float32 when q is not rotated
    yet (the kernel rotates it); new_kv: a tree step's own k (not rotated) and v [B, T, Hkv, D],
    which the kernel writes to entries scratch_start + t*K + depth (k rotated by rope) before it
    reads them — the caches need not hold them yet; q_norm (weight [D], eps): q not normalised yet
    (Qwen3's q norm, applied before the rotation: needs rope; not in tree steps that write their own
    k/v, whose k would need it too — there one kernel normalises both before this one, which measured
    faster than both norms in here). Returns [B, T, Hq * D]."""
    if branch_len and not 0 <= depth < branch_len:
        raise ValueError(f"tree depth {depth} outside 0..{branch_len - 1}")
    if new_kv is not None and (not branch_len or rope is None):
        raise ValueError("new_kv is written by tree steps only, and needs rope to rotate k")
    if q_norm is not None and (rope is None or new_kv is not None):
        raise ValueError("q_norm is applied where the kernel rotates q (it needs rope), and not with new_kv")
    batch, queries, heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    q = q.contiguous() if q.stride(-1) != 1 else q
    limit = limit.contiguous()
    out = torch.empty((batch, queries, heads, dim), dtype=q.dtype, device=q.device)
    tiling = tiling or Tiling.default(queries * group, dim)
    block_m, block_n = tiling.block_m, tiling.block_n
    tiles = triton.cdiv(queries * group, block_m)
    scratch_split = scratch_split and branch_len > 0
    splits = splits or choose_splits(batch * kv_heads * tiles, attend_len, block_n, q.device, scratch_split)
    chunk = triton.cdiv(triton.cdiv(attend_len, splits), block_n) * block_n
    splits = triton.cdiv(attend_len, chunk)
    # the scratch's own split is the last, past every chunk: it walks no committed keys
    splits += int(scratch_split and splits > 1)
    if splits > 1:
        part = torch.empty((splits, batch, queries, heads, dim), dtype=torch.float32, device=q.device)
        stats = torch.empty((2, splits, batch, queries, heads), dtype=torch.float32, device=q.device)
    else:
        part, stats = out[None], out   # written directly; stats unused
    kernel, extra = (_attention_kernel, {}) if q.is_cuda else (_attention_kernel_interpreted, {"KEYS": attend_len})
    cos, sin = (t.contiguous() for t in rope) if rope is not None else (limit, limit)  # any pointer when unused
    # any pointer when unused; k and v strided as they come (views of the qkv output, a q/k-norm's output)
    k_new, v_new = (t if t.stride(-1) == 1 else t.contiguous() for t in new_kv) if new_kv is not None else (q, q)
    q_weight, norm_eps = q_norm if q_norm is not None else (q, 0.0)   # any pointer when unused
    kernel[(batch, kv_heads, tiles * splits)](
        q, k_cache, v_cache, part, stats, limit, keys_end, cos, sin, k_new, v_new, q_weight,
        q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        part.stride(0), part.stride(1), part.stride(2), part.stride(3), limit.stride(0), cos.stride(0),
        cos.stride(1), k_new.stride(0), k_new.stride(1), k_new.stride(2), v_new.stride(0), v_new.stride(1),
        v_new.stride(2), first_slot, scratch_start, depth,
        queries, heads, splits, chunk, attend_len,
        scale * LOG2_E, float(norm_eps), GROUP=group, HEAD_DIM=dim, BLOCK_M=block_m, BLOCK_N=block_n,
        BRANCH_LEN=branch_len, WRITE_STATS=splits > 1, ROTATE=rope is not None, WRITE_KV=new_kv is not None,
        Q_NORM=q_norm is not None,
        num_warps=tiling.num_warps, num_stages=tiling.num_stages, **extra)
    if splits > 1:
        rows_total = batch * queries * heads
        _merge_splits_kernel[(triton.cdiv(rows_total, MERGE_ROWS),)](
            part, stats, out, rows_total, HEAD_DIM=dim, SPLITS=splits, BLOCK_R=MERGE_ROWS)
    return out.view(batch, queries, heads * dim)

