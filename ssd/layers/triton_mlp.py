"""A decoder layer's MLP block for a few rows in one Triton kernel (the draft's tree at small batch).

At batch 1 a 1B draft's tree step has 21 rows, and its MLP block — residual add + RMSNorm, gate/up
product, SiLU * up, down product — is four kernels whose weights (100 MB in all for llama-3.2-1b)
are a memory stream, each kernel paying its own ramp-up, tail and launch gap. Here one persistent
kernel does it in two phases over the same programs (at most one per SM):

1. program p takes intermediate-feature tiles p, p + P, ...: it streams those gate and up weight
   rows once, reading the rows' residual stream h = x + residual from L2 as it goes; the RMSNorm is
   folded in (the norm weight scales h's columns, the row's 1/rms — a sum of squares gathered over
   the same loop — scales the sums), then SiLU(gate) * up is written to a small scratch;
2. after a grid-wide barrier (all programs are resident: there are at most as many as SMs), program
   p takes output-column tiles of the down product over the whole scratch.

The result rounds differently from the four-kernel chain (fp32 throughout, one rounding at the
end), so it suits a draft, whose proposals are verified, not a target. Under Triton's interpreter
(CPU tests) the two phases run as two launches: programs there run one after another, so a
barrier would wait forever.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

MAX_ROWS = 64


@triton.jit
def _grid_barrier(sync_ptr, programs):
    """Every program waits here until all `programs` have arrived; sync_ptr[0] counts arrivals."""
    tl.debug_barrier()   # the whole program's stores are issued before it announces itself
    tl.atomic_add(sync_ptr, 1, sem="release", scope="gpu")
    arrived = tl.atomic_add(sync_ptr, 0, sem="acquire", scope="gpu")
    while arrived < programs:
        arrived = tl.atomic_add(sync_ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _gate_up_tile(x_ptr, res_ptr, norm_ptr, gate_up_ptr, act_ptr, res_out_ptr, M, eps, tile,
                  H: tl.constexpr, I: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr,
                  BLOCK_H: tl.constexpr, STAGES: tl.constexpr):
    """act[:, tile] = SiLU(gate) * up of RMSNorm(x + residual) for one tile of BLOCK_I features;
    tile 0 also writes x + residual (the layer's residual stream) to res_out."""
    rm = tl.arange(0, BLOCK_M)
    m_ok = rm < M
    ri = tile * BLOCK_I + tl.arange(0, BLOCK_I)
    acc_gate = tl.zeros((BLOCK_M, BLOCK_I), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_I), dtype=tl.float32)
    squares = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in tl.range(0, H, BLOCK_H, num_stages=STAGES):
        kk = k0 + tl.arange(0, BLOCK_H)
        offs = rm[:, None] * H + kk[None, :]
        x = tl.load(x_ptr + offs, mask=m_ok[:, None], other=0.0)
        h = x.to(tl.float32) + tl.load(res_ptr + offs, mask=m_ok[:, None], other=0.0).to(tl.float32)
        h = h.to(x.dtype)   # the residual stream in the model's dtype, as the unfused add rounds it
        tl.store(res_out_ptr + offs, h, mask=m_ok[:, None] & (tile == 0))
        hf = h.to(tl.float32)
        squares += tl.sum(hf * hf, axis=1)
        scaled = (hf * tl.load(norm_ptr + kk).to(tl.float32)[None, :]).to(x.dtype)
        w_gate = tl.load(gate_up_ptr + ri[:, None] * H + kk[None, :])
        w_up = tl.load(gate_up_ptr + (ri + I)[:, None] * H + kk[None, :])
        acc_gate += tl.dot(scaled, tl.trans(w_gate))
        acc_up += tl.dot(scaled, tl.trans(w_up))
    inv_rms = tl.rsqrt(squares / H + eps)[:, None]
    gate, up = acc_gate * inv_rms, acc_up * inv_rms
    act = gate * tl.sigmoid(gate) * up
    tl.store(act_ptr + rm[:, None] * I + ri[None, :], act.to(act_ptr.dtype.element_ty), mask=m_ok[:, None])


@triton.jit
def _down_tile(act_ptr, down_ptr, out_ptr, M, tile, H: tl.constexpr, I: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
    """out[:, tile] = act @ down[tile, :]^T for one tile of BLOCK_N output columns."""
    rm = tl.arange(0, BLOCK_M)
    m_ok = rm < M
    rn = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in tl.range(0, I, BLOCK_K, num_stages=STAGES):
        kk = k0 + tl.arange(0, BLOCK_K)
        # .cg: the scratch was written by other programs of this launch; read it from L2
        act = tl.load(act_ptr + rm[:, None] * I + kk[None, :], mask=m_ok[:, None], other=0.0, cache_modifier=".cg")
        w = tl.load(down_ptr + rn[:, None] * I + kk[None, :])
        acc += tl.dot(act, tl.trans(w))
    tl.store(out_ptr + rm[:, None] * H + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None])


@triton.jit
def _mlp_block_kernel(x_ptr, res_ptr, norm_ptr, gate_up_ptr, down_ptr, act_ptr, out_ptr, res_out_ptr, sync_ptr,
                      M, eps, H: tl.constexpr, I: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr,
                      BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES_1: tl.constexpr,
                      STAGES_2: tl.constexpr, PHASES: tl.constexpr):
    """PHASES 3 (GPU): persistent programs, each taking tiles pid, pid + P, ... of the gate/up phase,
    the grid barrier, then of the down phase. PHASES 1 or 2: only that phase, one tile per program."""
    pid = tl.program_id(0)
    if PHASES == 3:
        programs = tl.num_programs(0)
        for tile in range(pid, I // BLOCK_I, programs):
            _gate_up_tile(x_ptr, res_ptr, norm_ptr, gate_up_ptr, act_ptr, res_out_ptr, M, eps, tile,
                          H, I, BLOCK_M, BLOCK_I, BLOCK_H, STAGES_1)
        _grid_barrier(sync_ptr, programs)
        for tile in range(pid, H // BLOCK_N, programs):
            _down_tile(act_ptr, down_ptr, out_ptr, M, tile, H, I, BLOCK_M, BLOCK_N, BLOCK_K, STAGES_2)
        # the last program out resets the counters: the next launch (stream order: after this one
        # has finished) starts from zero whatever its program count
        if tl.atomic_add(sync_ptr + 1, 1, sem="acq_rel", scope="gpu") == programs - 1:
            tl.atomic_xchg(sync_ptr, 0, sem="relaxed", scope="gpu")
            tl.atomic_xchg(sync_ptr + 1, 0, sem="relaxed", scope="gpu")
    elif PHASES == 1:
        _gate_up_tile(x_ptr, res_ptr, norm_ptr, gate_up_ptr, act_ptr, res_out_ptr, M, eps, pid,
                      H, I, BLOCK_M, BLOCK_I, BLOCK_H, STAGES_1)
    else:
        _down_tile(act_ptr, down_ptr, out_ptr, M, pid, H, I, BLOCK_M, BLOCK_N, BLOCK_K, STAGES_2)


@dataclass(frozen=True)
class MlpTiling:
    block_i: int = 64     # intermediate features per gate/up tile (gate and up rows: 2x this)
    block_h: int = 128    # K step of the gate/up product (over the hidden size)
    block_n: int = 16     # output columns per down tile
    block_k: int = 256    # K step of the down product (over the intermediate size)
    num_warps: int = 4
    stages_gate_up: int = 4   # loads in flight per program = stages - 1: deep, there is one program per SM
    stages_down: int = 6

    def fits(self, hidden: int, intermediate: int) -> bool:
        return (intermediate % self.block_i == 0 and hidden % self.block_h == 0
                and hidden % self.block_n == 0 and intermediate % self.block_k == 0)


@dataclass
class FusedMlp:
    """One instance per model: it owns the barrier's counters on each device (a launch leaves them
    at zero), so launches of one instance must not run concurrently on two streams."""
    tiling: MlpTiling = MlpTiling()
    max_rows: int = MAX_ROWS
    _sync: dict[torch.device, torch.Tensor] = field(default_factory=dict, repr=False)

    def applies(self, x: torch.Tensor, gate_up_weight: torch.Tensor, down_weight: torch.Tensor) -> bool:
        rows, hidden = x.numel() // x.shape[-1], x.shape[-1]
        return (0 < rows <= self.max_rows
                and gate_up_weight.dtype == x.dtype == down_weight.dtype
                and gate_up_weight.shape[1] == hidden == down_weight.shape[0]
                and self.tiling.fits(hidden, down_weight.shape[1]))

    def __call__(self, x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                 gate_up_weight: torch.Tensor, down_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x, residual [..., H] -> (down(SiLU(gate) * up of RMSNorm(x + residual)), x + residual)."""
        lead, hidden = x.shape[:-1], x.shape[-1]
        intermediate = down_weight.shape[1]
        x2, res2 = x.reshape(-1, hidden).contiguous(), residual.reshape(-1, hidden).contiguous()
        rows = x2.shape[0]
        out, res_out = torch.empty_like(x2), torch.empty_like(x2)
        act = torch.empty((rows, intermediate), dtype=x.dtype, device=x.device)
        t = self.tiling
        args = dict(H=hidden, I=intermediate, BLOCK_M=max(16, triton.next_power_of_2(rows)), BLOCK_I=t.block_i,
                    BLOCK_H=t.block_h, BLOCK_N=t.block_n, BLOCK_K=t.block_k, STAGES_1=t.stages_gate_up,
                    STAGES_2=t.stages_down, num_warps=t.num_warps)
        tensors = (x2, res2, norm_weight, gate_up_weight.contiguous(), down_weight.contiguous(), act, out, res_out)
        if not x.is_cuda:   # Triton's interpreter (CPU tensors): one launch per phase
            sync = torch.zeros(2, dtype=torch.int32, device=x.device)
            _mlp_block_kernel[(intermediate // t.block_i,)](*tensors, sync, rows, eps, PHASES=1, **args)
            _mlp_block_kernel[(hidden // t.block_n,)](*tensors, sync, rows, eps, PHASES=2, **args)
        else:
            programs = min(self.sm_count(x.device), max(intermediate // t.block_i, hidden // t.block_n))
            _mlp_block_kernel[(programs,)](*tensors, self.sync(x.device), rows, eps, PHASES=3, **args)
        return out.view(*lead, hidden), res_out.view(*lead, hidden)

    def sync(self, device: torch.device) -> torch.Tensor:
        if device not in self._sync:
            self._sync[device] = torch.zeros(2, dtype=torch.int32, device=device)
        return self._sync[device]

    @staticmethod
    def sm_count(device: torch.device) -> int:
        return torch.cuda.get_device_properties(device).multi_processor_count
