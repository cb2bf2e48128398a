"""The torch.compile'd hot paths (used on the CUDA-graph path) compute what the eager ones do."""
import torch

from ssd.layers.kernels import EAGER, Kernels


def test_compiled_rope_and_cache_writes_the_same_cache_in_place():
    compiled = Kernels.compiled()
    g = torch.Generator().manual_seed(0)
    batch, seq, dim = 2, 3, 8
    q, k, v = (torch.randn(batch, seq, h, dim, generator=g) for h in (4, 2, 2))
    cos, sin = torch.randn(batch, seq, 1, dim // 2, generator=g), torch.randn(batch, seq, 1, dim // 2, generator=g)
    positions = torch.tensor([[3, 4, 5], [7, 8, 9]])
    for first_slot in (0, 1, 2):  # new slot offsets must not need new code (slots are a tensor)
        slots = (first_slot + torch.arange(batch))[:, None]
        caches = [torch.zeros(4, 2, 16, dim) for _ in range(4)]
        q1 = compiled.rope_and_cache(q, k, v, cos, sin, caches[0], caches[1], slots, positions)
        q2 = EAGER.rope_and_cache(q, k, v, cos, sin, caches[2], caches[3], slots, positions)
        torch.testing.assert_close(q1, q2)
        assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
        assert caches[0][first_slot, :, 3].abs().sum() > 0


def test_compiled_rope_and_cache_with_qwen3_norms_matches_eager():
    """qk_norm: q and k RMS-normalised per head before the rotation (q None: k only, as under the
    fused attention), and the norms matter."""
    from ssd.layers.qk_norm import QKNorm
    compiled = Kernels.compiled()
    g = torch.Generator().manual_seed(2)
    batch, seq, dim = 2, 3, 8
    q, k, v = (3 * torch.randn(batch, seq, h, dim, generator=g) for h in (4, 2, 2))
    cos, sin = torch.randn(batch, seq, 1, dim // 2, generator=g), torch.randn(batch, seq, 1, dim // 2, generator=g)
    positions, slots = torch.tensor([[3, 4, 5], [7, 8, 9]]), torch.arange(batch)[:, None]
    norm = QKNorm(torch.randn(dim, generator=g), torch.randn(dim, generator=g), 1e-6)
    for query in (q, None):
        caches = [torch.zeros(2, 2, 16, dim) for _ in range(6)]
        q1 = compiled.rope_and_cache(query, k, v, cos, sin, caches[0], caches[1], slots, positions, norm)
        q2 = EAGER.rope_and_cache(query, k, v, cos, sin, caches[2], caches[3], slots, positions, norm)
        q3 = EAGER.rope_and_cache(query, k, v, cos, sin, caches[4], caches[5], slots, positions)
        if query is not None:
            torch.testing.assert_close(q1, q2)
            assert not torch.allclose(q2, q3, atol=0.1)
        torch.testing.assert_close(caches[0], caches[2])
        assert not torch.allclose(caches[2], caches[4], atol=0.1)


def test_qk_rms_norm_equals_the_two_head_norms():
    """One norm over the q heads then the k heads (a qkv output's first columns): each with its weight,
    eager and compiled."""
    from ssd.layers.layernorm import rms_norm
    g = torch.Generator().manual_seed(3)
    qk = 3 * torch.randn(2, 3, 4 + 2, 8, generator=g)
    q_weight, k_weight = torch.randn(8, generator=g), torch.randn(8, generator=g)
    expected = torch.cat([rms_norm(qk[:, :, :4], q_weight, 1e-6), rms_norm(qk[:, :, 4:], k_weight, 1e-6)], 2)
    for kernels in (EAGER, Kernels.compiled()):
        torch.testing.assert_close(kernels.qk_rms_norm(qk, 4, q_weight, k_weight, 1e-6), expected)


def test_compiled_grouped_attention_with_a_scratch_source_matches_eager():
    compiled = Kernels.compiled()
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 5, 4, 8, generator=g)
    keys, values = torch.randn(2, 2, 32, 8, generator=g), torch.randn(2, 2, 32, 8, generator=g)
    scratch_k, scratch_v = torch.randn(2, 2, 10, 8, generator=g), torch.randn(2, 2, 10, 8, generator=g)
    mask = torch.rand(2, 1, 5, 32, generator=g) > 0.3
    mask[..., 0] = True
    scratch_mask = (torch.rand(1, 1, 5, 10, generator=g) > 0.5)
    args = (q, keys, values, mask, 0.35, scratch_k, scratch_v, scratch_mask)
    torch.testing.assert_close(compiled.grouped_attention(*args), EAGER.grouped_attention(*args))


def test_tree_queries_on_their_own_entries_match_the_full_scratch_mask():
    """A tree step's query t sees entries 0..depth of branch t only: attending its own K entries
    ([B, Hkv, T, K, D] keys, [T, K] mask) equals attending the whole scratch under the N x N*K mask,
    eagerly and compiled."""
    from ssd.draft_worker.tree import TreeShape
    g = torch.Generator().manual_seed(2)
    shape, depth = TreeShape(3, (2, 1, 0, 2), (2, 1, 0, 2)), 1
    n, k = shape.num_branches, shape.k
    q = torch.randn(2, n, 4, 8, generator=g)
    keys, values = torch.randn(2, 2, 32, 8, generator=g), torch.randn(2, 2, 32, 8, generator=g)
    scratch_k, scratch_v = torch.randn(2, 2, n * k, 8, generator=g), torch.randn(2, 2, n * k, 8, generator=g)
    mask = torch.rand(2, 1, n, 32, generator=g) > 0.3
    full = shape.scratch_mask(depth, torch.device("cpu"))
    own = torch.arange(k)[None].expand(n, k) <= depth
    expected = EAGER.grouped_attention(q, keys, values, mask, 0.35, scratch_k, scratch_v, full[None, None])
    args = (q, keys, values, mask, 0.35, scratch_k.unflatten(2, (n, k)), scratch_v.unflatten(2, (n, k)), own)
    torch.testing.assert_close(EAGER.grouped_attention(*args), expected)
    torch.testing.assert_close(Kernels.compiled().grouped_attention(*args), expected)
