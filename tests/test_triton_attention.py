"""The fused Triton attention (run here under Triton's CPU interpreter) computes what the matmul
path computes: decode, verification windows and the speculation tree's scratch, grouped heads."""
import pytest
import torch

pytest.importorskip("triton")

from ssd.layers.attention import ForwardContext, TreeContext, cached_attention, causal_mask, grouped_attention  # noqa: E402
from ssd.layers.triton_attention import fused_attention  # noqa: E402


def random_case(batch, queries, heads, kv_heads, dim, capacity=288, slots=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, queries, heads, dim, generator=g)
    k_cache, v_cache = (torch.randn(slots, kv_heads, capacity, dim, generator=g) for _ in range(2))
    return q, k_cache, v_cache


@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 4, 16), (8, 2, 32), (8, 1, 16)])
@pytest.mark.parametrize("queries", [1, 3, 7])
@pytest.mark.parametrize("splits", [1, 3])
def test_matches_grouped_attention_on_the_committed_cache(heads, kv_heads, dim, queries, splits):
    batch, first_slot, attend_len = 3, 1, 256   # 3 splits of 256 keys: 2 chunks of 128
    q, k_cache, v_cache = random_case(batch, queries, heads, kv_heads, dim, seed=queries)
    start = torch.tensor([0, 17, 140])[:, None]  # rows of different lengths; the first sees 1 key
    limit = start + torch.arange(queries)
    out = fused_attention(q, k_cache, v_cache, limit, limit.amax(1) + 1, first_slot, attend_len, 0.25,
                          splits=splits)
    rows = slice(first_slot, first_slot + batch)
    expected = grouped_attention(q, k_cache[rows, :, :attend_len], v_cache[rows, :, :attend_len],
                                 causal_mask(limit, attend_len), 0.25)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("splits", [1, 4])
def test_keys_past_the_limit_do_not_matter(splits):
    """Also: a split whose chunk lies wholly past a row's keys contributes nothing."""
    q, k_cache, v_cache = random_case(2, 2, 4, 2, 16)
    limit = torch.tensor([[5, 6], [130, 131]])
    out = fused_attention(q, k_cache, v_cache, limit, limit.amax(1) + 1, 0, 256, 0.25, splits=splits)
    k_cache[0, :, 7:], v_cache[1, :, 132:] = float("nan"), 1e6   # stale / never-written entries
    again = fused_attention(q, k_cache, v_cache, limit, limit.amax(1) + 1, 0, 256, 0.25, splits=splits)
    torch.testing.assert_close(out, again)


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (6, 3)])
@pytest.mark.parametrize("splits", [1, 3])
def test_tree_queries_see_their_prefix_and_their_scratch_entries(heads, kv_heads, splits):
    batch, branches, depth, dim, scratch_start, attend_len = 2, 5, 3, 16, 256, 192
    q, k_cache, v_cache = random_case(batch, branches, heads, kv_heads, dim, seed=7)
    fork = torch.tensor([0, 0, 1, 2, 2])
    limit = torch.tensor([[9], [150]]) + fork                   # each branch sees its fork point
    entry = torch.arange(branches * depth)
    scratch_mask = ((entry // depth)[None, :] == torch.arange(branches)[:, None]) & ((entry % depth)[None, :] <= 1)
    out = fused_attention(q, k_cache, v_cache, limit, limit.amax(1) + 1, 0, attend_len, 0.3, scratch_start,
                          scratch_mask, splits=splits)
    scratch = slice(scratch_start, scratch_start + branches * depth)
    expected = grouped_attention(q, k_cache[:batch, :, :attend_len], v_cache[:batch, :, :attend_len],
                                 causal_mask(limit, attend_len), 0.3,
                                 k_cache[:batch, :, scratch], v_cache[:batch, :, scratch], scratch_mask[None, None])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 2, 16), (8, 1, 32)])
@pytest.mark.parametrize("splits", [1, 3])
def test_rotating_q_inside_the_kernel_equals_rotating_it_before(heads, kv_heads, dim, splits):
    """rope=(cos, sin): the kernel applies RoPE to q as it loads it, as apply_rotary would."""
    from ssd.layers.rotary import apply_rotary
    batch, queries = 3, 5
    q, k_cache, v_cache = random_case(batch, queries, heads, kv_heads, dim, seed=11)
    g = torch.Generator().manual_seed(12)
    cos, sin = (torch.randn(batch, queries, 1, dim // 2, generator=g) for _ in range(2))
    limit = torch.tensor([[4], [60], [200]]) + torch.arange(queries)
    rotated = fused_attention(apply_rotary(q, cos, sin), k_cache, v_cache, limit, limit.amax(1) + 1, 0, 256, 0.25,
                              splits=splits)
    in_kernel = fused_attention(q, k_cache, v_cache, limit, limit.amax(1) + 1, 0, 256, 0.25, splits=splits,
                                rope=(cos, sin))
    torch.testing.assert_close(in_kernel, rotated, rtol=1e-6, atol=1e-6)
    plain = fused_attention(q, k_cache, v_cache, limit, limit.amax(1) + 1, 0, 256, 0.25, splits=splits)
    assert not torch.allclose(plain, rotated, atol=1e-3)  # the rotation matters in this case


def test_cached_attention_dispatches_to_the_fused_kernel_with_the_same_result():
    """Through ForwardContext, as a decoder layer calls it: plain rows and tree rows."""
    q, k_cache, v_cache = random_case(2, 4, 4, 2, 16, seed=3)
    positions = torch.tensor([[10, 11, 12, 13], [3, 4, 5, 6]])
    plain = ForwardContext(positions, positions, 32, [k_cache], [v_cache], first_slot=1)
    torch.testing.assert_close(cached_attention(q, 0, plain, 0.25, fused=fused_attention),
                               cached_attention(q, 0, plain, 0.25), rtol=1e-5, atol=1e-5)
    tree = TreeContext(torch.zeros(2, 4, dtype=torch.int64), 64, torch.eye(4, 8, dtype=torch.bool))
    prefix = torch.tensor([[9, 9, 10, 11], [2, 3, 3, 3]])
    branchy = ForwardContext(positions, prefix, 32, [k_cache], [v_cache], tree=tree)
    torch.testing.assert_close(cached_attention(q, 0, branchy, 0.25, fused=fused_attention),
                               cached_attention(q, 0, branchy, 0.25), rtol=1e-5, atol=1e-5)


def test_decode_and_window_forwards_with_the_fused_kernel_match_the_matmul_path(tiny_checkpoints):
    """A tiny model's prefill (short prompts go through the kernel too), decode steps and a
    verification window give the same logits with either attention, rows of different lengths."""
    import dataclasses

    from ssd.distributed.tp_group import TPGroup
    from ssd.engine.model_runner import ModelRunner
    from ssd.engine.runner_config import RunnerConfig

    def runner(fused: bool) -> ModelRunner:
        r = ModelRunner(RunnerConfig(model=str(tiny_checkpoints["qwen3"]), max_len=64, num_slots=2), TPGroup())
        for module in r.model.modules():
            if fused and hasattr(module, "kernels"):
                module.kernels = dataclasses.replace(module.kernels, fused_attention=fused_attention)
        return r

    def run(r: ModelRunner) -> list[torch.Tensor]:
        ids = torch.tensor([[3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 0, 0]])
        out = [r.forward(ids, torch.arange(6).expand(2, 6).contiguous(), 5)]
        lengths = torch.tensor([6, 4])
        out.append(r.forward(torch.tensor([[20], [21]]), lengths[:, None], 6))                     # decode
        window = torch.tensor([[22, 23, 24], [25, 26, 27]])
        out.append(r.forward(window, (lengths + 1)[:, None] + torch.arange(3), 9))                  # window
        return out

    for fused_logits, matmul_logits in zip(run(runner(True)), run(runner(False))):
        torch.testing.assert_close(fused_logits, matmul_logits, rtol=1e-4, atol=1e-4)
