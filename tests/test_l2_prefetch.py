"""L2 weight prefetch (ssd.layers.l2_prefetch): what it asks for, that its kernel compiles to the
prefetch instructions for an H100/H200, and that a model with it computes the same thing."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from ssd.distributed.tp_group import TPGroup
from ssd.engine.runner_config import RunnerConfig
from ssd.layers.attention import ForwardContext
from ssd.layers.kernels import EAGER
from ssd.layers.l2_prefetch import LINE, L2Prefetch, rows_and_columns
from ssd.loading.random_weights import init_random_weights
from ssd.models.decoder import CausalLM
from ssd.models.model_config import ModelArch
from tests.tiny_models import make_checkpoint


def test_budget_is_spread_over_every_row_in_whole_lines():
    weight = torch.empty(64, 1024, dtype=torch.bfloat16)          # rows of 2048 bytes
    assert rows_and_columns(weight, 64 * 1000) == (64, 896)        # 1000 bytes a row -> 7 lines
    assert rows_and_columns(weight, 1 << 30) == (64, 2048)          # never past a row's end
    assert rows_and_columns(weight, 64 * (LINE - 1)) == (64, 0)     # less than a line a row: nothing
    fp8_like = torch.empty(16, 4096, dtype=torch.uint8)
    assert rows_and_columns(fp8_like, 16 * 1024) == (16, 1024)


def test_nothing_is_issued_off_the_gpu():
    assert L2Prefetch(1 << 20).start(torch.ones(8, 64), 1 << 20) is False


def test_runner_config_refuses_negative_budgets():
    with pytest.raises(ValueError, match="l2_prefetch_mb"):
        RunnerConfig(model="x", l2_prefetch_mb=(-1.0, 0.0))


def test_kernel_compiles_to_l2_prefetches_for_hopper(monkeypatch):
    """Compiled for sm_90 without a GPU (Triton's bundled ptxas): the prefetches must survive
    (their results are unused: a pure op would be dropped as dead code)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ssd.layers.l2_prefetch import _prefetch_kernel
    monkeypatch.setenv("TRITON_INTERPRET", "0")   # the tests' interpreter would not compile it
    source = ASTSource(fn=_prefetch_kernel(), signature={"base": "*u8", "rows": "i32", "row_stride": "i32",
                                                         "lines_per_row": "i32", "BLOCK": "constexpr",
                                                         "LINE": "constexpr"},
                       constexprs={"BLOCK": 1024, "LINE": LINE})
    from triton.backends import backends
    if "nvidia" not in backends:
        pytest.skip("this Triton build has no CUDA backend")
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
    ptx = compiled.asm["ptx"]
    assert "prefetch.global.L2::evict_last" in ptx
    assert compiled.asm["cubin"]


def test_model_with_prefetch_computes_the_same(tmp_path):
    """Off the GPU the hook issues nothing, but the layer's fork/join path runs: same logits."""
    arch = ModelArch.from_checkpoint(str(make_checkpoint("llama", tmp_path)))
    tp = TPGroup()
    plain = CausalLM(arch, tp, max_positions=64)
    init_random_weights(plain, 0, 0)
    kernels = dataclasses.replace(EAGER, l2_prefetch=L2Prefetch(1 << 20, 1 << 20))
    hooked = CausalLM(arch, tp, max_positions=64, kernels=kernels)
    hooked.load_state_dict(plain.state_dict())
    ids = torch.randint(0, arch.vocab_size, (2, 5))
    outs = []
    for model in (plain, hooked):
        caches = [torch.zeros(2, arch.num_kv_heads, 16, arch.head_dim) for _ in range(arch.num_layers)]
        positions = torch.arange(5).expand(2, 5)
        ctx = ForwardContext(positions, positions, 16, caches, [c.clone() for c in caches])
        outs.append(model.compute_logits(model(ids, ctx)))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
