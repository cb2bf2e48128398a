"""The fused Triton attention (run here under Triton's CPU interpreter) computes what the matmul
path computes: decode, verification windows and the speculation tree's scratch, grouped heads."""
import pytest
import torch

pytest.importorskip("triton")

from ssd.layers.attention import ForwardContext, TreeContext, cached_attention, causal_mask, grouped_attention  # noqa: E402
from ssd.layers.triton_attention import Tiling, fused_attention  # noqa: E402
from ssd.draft_worker.tree import TreeShape  # noqa: E402


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


def scratch_mask(branches: int, k: int, depth: int) -> torch.Tensor:
    """[N, N*K] the draft's own mask (TreeShape.scratch_mask) for N branches of K entries."""
    return TreeShape(k, (branches,) + (0,) * k, (branches,) + (0,) * k).scratch_mask(depth, "cpu")


def tree_case(heads, kv_heads, branches=5, k=4, seed=7):
    """Two rows (slots 0, 1) of `branches` tree queries with K-entry branches in the scratch."""
    batch, dim, scratch_start = 2, 16, 256
    q, k_cache, v_cache = random_case(batch, branches, heads, kv_heads, dim, capacity=scratch_start + branches * k,
                                      seed=seed)
    fork = torch.arange(branches) % 3
    limit = torch.tensor([[9], [150]]) + fork                   # each branch sees its fork point
    return q, k_cache, v_cache, limit, scratch_start


def tree_reference(q, k_cache, v_cache, limit, scratch_start, attend_len, k, depth, scale):
    batch, branches = limit.shape
    scratch = slice(scratch_start, scratch_start + branches * k)
    return grouped_attention(q, k_cache[:batch, :, :attend_len], v_cache[:batch, :, :attend_len],
                             causal_mask(limit, attend_len), scale, k_cache[:batch, :, scratch],
                             v_cache[:batch, :, scratch], scratch_mask(branches, k, depth)[None, None])


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (6, 3), (8, 1), (2, 2)])
@pytest.mark.parametrize("splits", [1, 2, 3, 4])
@pytest.mark.parametrize("scratch_split", [True, False], ids=["own_split", "last_split"])
def test_tree_queries_see_their_prefix_and_their_scratch_entries(heads, kv_heads, splits, scratch_split):
    """At every depth (0 .. K-1) query t sees its prefix and entries 0..depth of branch t, as the
    matmul path does with the draft's scratch mask."""
    k, attend_len = 3, 192
    q, k_cache, v_cache, limit, scratch_start = tree_case(heads, kv_heads, k=k, seed=heads + splits)
    for depth in range(k):
        out = fused_attention(q, k_cache, v_cache, limit, limit.amax(1) + 1, 0, attend_len, 0.3, scratch_start,
                              k, depth, splits=splits, scratch_split=scratch_split)
        expected = tree_reference(q, k_cache, v_cache, limit, scratch_start, attend_len, k, depth, 0.3)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"depth {depth}: {m}")


@pytest.mark.parametrize("splits,scratch_split", [(1, True), (3, True), (3, False)])
def test_tree_row_tiles_that_split_a_token_s_heads(splits, scratch_split):
    """Small row tiles (16 rows, 6 heads a token: tiles begin mid-token, the second one touches 4
    tokens, not 16 / 6 rounded up) and key blocks (16: a tile's branches span two blocks)."""
    branches, k, attend_len = 7, 5, 192
    q, k_cache, v_cache, limit, scratch_start = tree_case(6, 1, branches, k, seed=splits)
    for depth in range(k):
        out = fused_attention(q, k_cache, v_cache, limit, limit.amax(1) + 1, 0, attend_len, 0.3, scratch_start, k,
                              depth, splits=splits, tiling=Tiling(16, 16), scratch_split=scratch_split)
        expected = tree_reference(q, k_cache, v_cache, limit, scratch_start, attend_len, k, depth, 0.3)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"depth {depth}: {m}")


@pytest.mark.parametrize("splits,scratch_split", [(1, True), (3, True), (3, False)])
def test_scratch_entries_a_row_does_not_own_do_not_matter(splits, scratch_split):
    """Query t reads only entries 0..depth of branch t: with every other scratch entry (the other
    branches', its own past depth) NaN or huge its output is as it was — the others' turn NaN."""
    branches, k, depth, attend_len = 5, 4, 1, 192
    q, k_cache, v_cache, limit, scratch_start = tree_case(4, 2, branches, k)

    def run(k_cache, v_cache):
        return fused_attention(q, k_cache, v_cache, limit, limit.amax(1) + 1, 0, attend_len, 0.3, scratch_start,
                               k, depth, splits=splits, scratch_split=scratch_split)
    out = run(k_cache, v_cache)
    for branch in range(branches):
        own = slice(scratch_start + branch * k, scratch_start + branch * k + depth + 1)
        k_poisoned, v_poisoned = k_cache.clone(), v_cache.clone()
        k_poisoned[:, :, scratch_start:], v_poisoned[:, :, scratch_start:] = float("nan"), 1e6
        k_poisoned[:, :, own], v_poisoned[:, :, own] = k_cache[:, :, own], v_cache[:, :, own]
        poisoned = run(k_poisoned, v_poisoned)
        torch.testing.assert_close(poisoned[:, branch], out[:, branch])
        others = [b for b in range(branches) if b != branch]
        assert torch.isnan(poisoned[:, others]).all()


def test_tree_depth_outside_the_branch_is_refused():
    q, k_cache, v_cache, limit, scratch_start = tree_case(4, 2, k=3)
    with pytest.raises(ValueError, match="depth"):
        fused_attention(q, k_cache, v_cache, limit, limit.amax(1) + 1, 0, 192, 0.3, scratch_start, 3, 3)


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


@pytest.mark.parametrize("splits,scratch_split,tiling", [(1, True, None), (3, True, None), (3, False, None),
                                                         (1, True, Tiling(16, 16))])
def test_tree_step_writing_its_own_kv_equals_writing_them_before(splits, scratch_split, tiling):
    """new_kv: the kernel rotates k and writes k/v to the step's scratch entries, then attends —
    the same output and the same caches as rope_and_cache followed by the kernel (6 heads a token
    with 16-row tiles: tiles that share a token both write it). k contiguous (as a k-norm returns
    it), v a strided view of a wider projection output."""
    from ssd.layers.kernels import rope_and_cache
    branches, k, depth, attend_len, kv_heads = 5, 3, 1, 192, 2
    q, k_cache, v_cache, limit, scratch_start = tree_case(12, kv_heads, branches, k, seed=5)
    g = torch.Generator().manual_seed(6)
    new_k = torch.randn(2, branches, kv_heads, 16, generator=g)
    new_v = torch.randn(2, branches, 3 * kv_heads * 16, generator=g)[..., -kv_heads * 16:].view(2, branches, kv_heads, 16)
    cos, sin = (torch.randn(2, branches, 1, 8, generator=g) for _ in range(2))
    write_index = (scratch_start + torch.arange(branches) * k + depth).expand(2, branches)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    rope_and_cache(None, new_k, new_v, cos, sin, k_before, v_before, torch.arange(2)[:, None], write_index)
    args = (limit, limit.amax(1) + 1, 0, attend_len, 0.3, scratch_start, k, depth)
    options = {"splits": splits, "scratch_split": scratch_split, "tiling": tiling, "rope": (cos, sin)}
    expected = fused_attention(q, k_before, v_before, *args, **options)
    out = fused_attention(q, k_cache, v_cache, *args, new_kv=(new_k, new_v), **options)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_cache, k_before, rtol=1e-6, atol=1e-6)
    assert torch.equal(v_cache, v_before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("splits", [1, 3])
def test_q_norm_inside_the_kernel_equals_normalising_q_before_it(dtype, splits):
    """q_norm: the kernel RMS-normalises each q head before rotating it, as layernorm.rms_norm would
    (its roundings: bf16 rows times bf16 weights), and the norm matters."""
    from ssd.layers.layernorm import rms_norm
    q, k_cache, v_cache = random_case(3, 5, 4, 2, 16, seed=8)
    g = torch.Generator().manual_seed(9)
    cos, sin = (torch.randn(3, 5, 1, 8, generator=g) for _ in range(2))
    weight = torch.randn(16, generator=g).to(dtype)
    q, k_cache, v_cache = (t.to(dtype) for t in (3 * q, k_cache, v_cache))
    limit = torch.tensor([[4], [60], [200]]) + torch.arange(5)
    args = (k_cache, v_cache, limit, limit.amax(1) + 1, 0, 256, 0.3)
    options = {"splits": splits, "rope": (cos, sin)}
    out = fused_attention(q, *args, q_norm=(weight, 1e-6), **options)
    expected = fused_attention(rms_norm(q, weight, 1e-6), *args, **options)
    # Triton's interpreter truncates to bf16 where the GPU rounds
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(out, expected, **tol)
    assert not torch.allclose(fused_attention(q, *args, **options).float(), expected.float(), atol=0.1)


def test_q_norm_without_rope_or_with_new_kv_is_refused():
    """In a tree step writing its own k/v, k would need the norm too: both are normalised before."""
    q, k_cache, v_cache = random_case(2, 3, 4, 2, 16)
    limit = torch.tensor([[4, 5, 6], [7, 8, 9]])
    norm = (torch.ones(16), 1e-6)
    with pytest.raises(ValueError, match="needs rope"):
        fused_attention(q, k_cache, v_cache, limit, limit.amax(1) + 1, 0, 64, 0.3, q_norm=norm)
    rope = (torch.ones(2, 3, 1, 8), torch.zeros(2, 3, 1, 8))
    kv = (torch.zeros(2, 3, 2, 16), torch.zeros(2, 3, 2, 16))
    with pytest.raises(ValueError, match="not with new_kv"):
        fused_attention(q, k_cache, v_cache, limit, limit.amax(1) + 1, 0, 64, 0.3, 32, 2, 0, rope=rope, new_kv=kv,
                        q_norm=norm)


def test_new_kv_outside_a_tree_step_is_refused():
    q, k_cache, v_cache = random_case(2, 3, 4, 2, 16)
    limit = torch.tensor([[4, 5, 6], [7, 8, 9]])
    kv = (torch.zeros(2, 3, 2, 16), torch.zeros(2, 3, 2, 16))
    with pytest.raises(ValueError, match="tree steps only"):
        fused_attention(q, k_cache, v_cache, limit, limit.amax(1) + 1, 0, 64, 0.3, new_kv=kv)


def test_cached_attention_dispatches_to_the_fused_kernel_with_the_same_result():
    """Through ForwardContext, as a decoder layer calls it: plain rows and tree rows."""
    q, k_cache, v_cache = random_case(2, 4, 4, 2, 16, seed=3)
    positions = torch.tensor([[10, 11, 12, 13], [3, 4, 5, 6]])
    plain = ForwardContext(positions, positions, 32, [k_cache], [v_cache], first_slot=1)
    torch.testing.assert_close(cached_attention(q, 0, plain, 0.25, fused=fused_attention),
                               cached_attention(q, 0, plain, 0.25), rtol=1e-5, atol=1e-5)
    tree = TreeContext(torch.zeros(2, 4, dtype=torch.int64), 64, scratch_mask(4, 2, 1), 2, 1)
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
