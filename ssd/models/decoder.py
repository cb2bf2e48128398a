"""Llama-3.x / Qwen2 / Qwen3 decoder (one implementation; the families differ in qkv bias and q/k norm)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ssd.distributed.tp_group import TPGroup
from ssd.layers.attention import ForwardContext, cached_attention, fused_applies
from ssd.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from ssd.layers.fp8 import Fp8Rows, fp8_rows_wanted
from ssd.layers.kernels import EAGER, Kernels
from ssd.layers.layernorm import RMSNorm
from ssd.layers.linear import ColumnParallelLinear, RowParallelLinear
from ssd.layers.qk_norm import QKNorm
from ssd.layers.rotary import RotaryEmbedding
from ssd.models.model_config import ModelArch

if TYPE_CHECKING:   # Triton is imported only where the fused kernels run
    from ssd.layers.norm_fusion import NormFusion


class Attention(nn.Module):
    def __init__(self, arch: ModelArch, layer: int, tp: TPGroup, kernels: Kernels):
        super().__init__()
        self.layer = layer
        self.kernels = kernels
        self.head_dim = arch.head_dim
        self.num_heads = arch.num_heads // tp.size
        self.num_kv_heads = arch.num_kv_heads // tp.size
        q_size, kv_size = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
        self.qkv_proj = ColumnParallelLinear(arch.hidden_size, [q_size, kv_size, kv_size], arch.qkv_bias, tp,
                                             kernels.linear)
        self.o_proj = RowParallelLinear(q_size, arch.hidden_size, False, tp, kernels.linear)
        # Qwen3: weights only, never called — the norms run inside other kernels (ssd.layers.qk_norm)
        self.q_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps) if arch.qk_norm else None
        self.k_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps) if arch.qk_norm else None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], ctx: ForwardContext):
        return self.o_proj(self.attend(self.qkv_proj(x), rope, ctx))

    def attend(self, qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], ctx: ForwardContext):
        """qkv [B, T, (Hq + 2 Hkv) D] -> attention output before o_proj [B, T, Hq D]."""
        batch, seq = qkv.shape[:2]
        q, k, v = qkv.split(self.qkv_proj.output_sizes, dim=-1)
        q = q.view(batch, seq, self.num_heads, self.head_dim)
        k = k.view(batch, seq, self.num_kv_heads, self.head_dim)
        v = v.view(batch, seq, self.num_kv_heads, self.head_dim)
        qk_norm = QKNorm(self.q_norm.weight, self.k_norm.weight, self.q_norm.eps) if self.q_norm is not None else None
        fused = self.kernels.fused_attention if fused_applies(self.kernels.fused_attention, ctx, seq) else None
        # the fused kernel rotates q as it loads it, and in a tree step also writes k (rotated) and v to
        # the step's scratch entries before reading them: no RoPE + KV-write kernel of their own
        new_kv = (k, v) if fused and ctx.tree is not None and self.kernels.tree_kv_in_attention else None
        if new_kv is not None and qk_norm is not None:   # Qwen3's q and k norms: one kernel before it
            q, k = self.normed_qk(qkv, qk_norm)
            new_kv, qk_norm = (k, v), None
        rotated = None
        if new_kv is None:   # with Qwen3's norms inside (k's; q's too where the fused kernel does not rotate q)
            rotated = self.kernels.rope_and_cache(None if fused else q, k, v, *rope, ctx.k_caches[self.layer],
                                                  ctx.v_caches[self.layer], ctx.slot_rows, ctx.write_index, qk_norm)
        scale = self.head_dim ** -0.5
        if fused:   # q's norm (Qwen3) in the kernel too, where it was not applied before
            q_norm = (qk_norm.q_weight, qk_norm.eps) if qk_norm is not None else None
            return cached_attention(q, self.layer, ctx, scale, fused=fused, rope=rope, new_kv=new_kv, q_norm=q_norm)
        return cached_attention(rotated, self.layer, ctx, scale, self.kernels.grouped_attention)

    def normed_qk(self, qkv: torch.Tensor, qk_norm: QKNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """q [B, T, Hq, D] and k [B, T, Hkv, D] of qkv, normalised by one kernel (Kernels.qk_rms_norm)."""
        heads = self.num_heads + self.num_kv_heads
        qk = qkv[..., : heads * self.head_dim].unflatten(-1, (heads, self.head_dim))
        normed = self.kernels.qk_rms_norm(qk, self.num_heads, *qk_norm)
        return normed.split([self.num_heads, self.num_kv_heads], dim=2)


class MLP(nn.Module):
    def __init__(self, arch: ModelArch, tp: TPGroup, kernels: Kernels):
        super().__init__()
        self.kernels = kernels
        f = arch.intermediate_size
        self.gate_up_proj = ColumnParallelLinear(arch.hidden_size, [f, f], False, tp, kernels.linear)
        self.down_proj = RowParallelLinear(f, arch.hidden_size, False, tp, kernels.linear)

    def forward(self, x: torch.Tensor | Fp8Rows) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        fp8 = fp8_rows_wanted(self.down_proj, gate_up)
        return self.down_proj(fp8.activated_rows(gate_up) if fp8 else self.kernels.silu_and_mul(gate_up))


class DecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, layer: int, tp: TPGroup, kernels: Kernels):
        super().__init__()
        self.self_attn = Attention(arch, layer, tp, kernels)
        self.mlp = MLP(arch, tp, kernels)
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, kernels)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, kernels)

    def forward(self, x, residual, rope, ctx: ForwardContext):
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, rope, ctx)
        fp8 = fp8_rows_wanted(self.mlp.gate_up_proj, x)
        if fp8:   # the norm writes the fp8 rows gate/up reads
            x, residual = fp8.normed_rows(x, residual, self.post_attention_layernorm)
        else:
            x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual

    def forward_fused(self, h: torch.Tensor, rope, ctx: ForwardContext, fusion: NormFusion) -> torch.Tensor:
        """The same layer on the residual stream h (its input whole, no separate residual): the norms,
        the residual adds and the SiLU run inside the products (ssd.layers.norm_fusion)."""
        attn, mlp = self.self_attn, self.mlp
        qkv = fusion.norm_linear(h, self.input_layernorm, attn.qkv_proj)
        h = fusion.linear_residual(attn.attend(qkv, rope, ctx), attn.o_proj, h)
        act = fusion.norm_gated_linear(h, self.post_attention_layernorm, mlp.gate_up_proj)
        return fusion.linear_residual(act, mlp.down_proj, h)


class DecoderModel(nn.Module):
    def __init__(self, arch: ModelArch, tp: TPGroup, max_positions: int, kernels: Kernels):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(arch.vocab_size, arch.hidden_size, tp)
        self.layers = nn.ModuleList(DecoderLayer(arch, i, tp, kernels) for i in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, kernels)
        self.rotary = RotaryEmbedding(arch.hf_config, max_positions)
        self.kernels, self.tensor_parallel = kernels, tp.size > 1

    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        rope = ctx.rope if ctx.rope is not None else self.rotary(ctx.positions)
        fusion = None if self.tensor_parallel else self.kernels.norm_fusion
        if fusion is not None and fusion.applies(x):
            for layer in self.layers:
                x = layer.forward_fused(x, rope, ctx, fusion)
            return self.norm(x)
        for layer in self.layers:
            x, residual = layer(x, residual, rope, ctx)
        x, _ = self.norm(x, residual)
        return x


class CausalLM(nn.Module):
    """Weights named as in Hugging Face checkpoints, with q/k/v and gate/up fused."""
    packed_modules = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
                      "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def __init__(self, arch: ModelArch, tp: TPGroup, max_positions: int, kernels: Kernels = EAGER):
        super().__init__()
        self.arch, self.kernels = arch, kernels
        self.model = DecoderModel(arch, tp, max_positions, kernels)
        self.lm_head = ParallelLMHead(arch.vocab_size, arch.hidden_size, tp, kernels.linear)
        if arch.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self.model(input_ids, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
