"""The draft's top-candidates kernels (run here under Triton's CPU interpreter) return what
torch.topk returns — the same values sorted descending, indices that hold them; ties lowest index
first — unless a chunk of consecutive token ids holds more than PER_CHUNK of the largest."""
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from ssd.engine.triton_topk import (CHUNK, MIN_CHUNK, PER_CHUNK, chunk_width, scaled_top_candidates,  # noqa: E402
                                    scaled_top_candidates_op, top_candidates, top_candidates_op)


# k / vocab as in the 1B draft (256 of 128k: a chunk holds 1 of them on average); one tile, ragged, several
@pytest.mark.parametrize("vocab, k", [(300, 4), (4103, 8), (9000, 16)])
def test_same_as_torch_topk(vocab, k):
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(3, vocab, generator=g) * 4
    logits[1] -= 100.0                          # all negative: the order key flips the sign bit's meaning
    logits[2, ::2] = -logits[2, ::2].abs()      # both signs
    values, index = top_candidates(logits, k)
    expected_values, expected_index = logits.topk(k)
    assert torch.equal(values, expected_values)
    assert torch.equal(index, expected_index)   # no ties among random floats: the same indices
    assert index.dtype == torch.int64


def test_ties_take_the_lowest_indices_once_each():
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0, 3.0, 0.0, 3.0, 2.0]])
    values, index = top_candidates(logits, 4)
    assert values.tolist() == [[3.0, 3.0, 3.0, 3.0]] and index.tolist() == [[1, 3, 4, 6]]
    values, index = top_candidates(logits, 2)
    assert index.tolist() == [[1, 3]]
    many = torch.randint(0, 3, (2, 5000), generator=torch.Generator().manual_seed(1)).float()
    values, index = top_candidates(many, 64)
    assert (values == 2.0).all()                              # every chunk holds > PER_CHUNK twos: still 2.0
    assert all(len(set(row)) == 64 for row in index.tolist())
    assert torch.equal(many.gather(1, index), values)
    assert index[0].tolist() == sorted(index[0].tolist())   # all tied at 2.0: index order


def test_rows_with_fewer_finite_logits_than_k():
    """A restricted draft head gives most tokens -inf: the finite ones first, then -inf entries."""
    logits = torch.full((2, 5000), float("-inf"))
    kept = list(range(41, 5000, 163))
    logits[0, kept] = torch.linspace(-1, 1, len(kept))
    logits[1, 5] = 0.0
    values, index = top_candidates(logits, 64)
    assert torch.equal(values, logits.topk(64).values)
    assert torch.equal(logits.gather(1, index), values)
    assert index[0, :len(kept)].tolist() == kept[::-1] and index[1, 0] == 5


def test_a_crowded_chunk_gives_up_its_lowest_extra_members():
    """More than PER_CHUNK of the largest in one chunk: that chunk's PER_CHUNK largest stay, the
    rest of the k are the next largest elsewhere — still sorted, still consistent."""
    logits = torch.randn(1, 4 * CHUNK, generator=torch.Generator().manual_seed(3))
    logits[0, :PER_CHUNK + 4] = 10.0 + torch.arange(PER_CHUNK + 4, dtype=torch.float32)
    values, index = top_candidates(logits, 16)
    assert set(range(4, PER_CHUNK + 4)) <= set(index[0].tolist())       # the chunk's 8 largest
    assert not set(range(4)) & set(index[0].tolist())                    # its 4 smallest dropped
    assert torch.equal(values, values.sort(descending=True).values)
    assert torch.equal(logits.gather(1, index), values)


def test_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="k must be"):
        top_candidates(torch.randn(2, 100), 101)
    with pytest.raises(ValueError, match=r"1\.\.9,"):   # a last chunk of one id gives one candidate
        top_candidates(torch.randn(2, MIN_CHUNK + 1), 10)
    assert top_candidates(torch.randn(2, MIN_CHUNK + 1), 9)[1].max() <= MIN_CHUNK
    with pytest.raises(ValueError, match="float32"):
        top_candidates(torch.randn(2, 100, dtype=torch.float16), 16)


def test_chunks_keep_the_share_of_the_largest_at_every_vocabulary():
    """k <= PER_CHUNK is exact at any chunk width: the widest. The draft filters' 256 of a 128k row
    (and of a 152k one) keep 512-id chunks; a restricted head's 32k kept logits get 128-id ones, ~2048
    candidates a row either way. The fork graphs' top 22 (K = 6, F = 3) of 32k keeps 512-id chunks:
    about a chunk per largest logit, not a sort of 2048 candidates for 22."""
    assert chunk_width(32768, PER_CHUNK) == CHUNK
    assert chunk_width(128256, 256) == chunk_width(151936, 256) == CHUNK
    assert chunk_width(32768, 256) == 128 and chunk_width(300, 16) == MIN_CHUNK
    assert chunk_width(32768, 22) == chunk_width(128256, 22) == CHUNK
    assert chunk_width(32768, 128) == 256


def test_restricted_head_rows_find_their_256_largest():
    """32k kept logits, 256 largest: with 512-id chunks most rows would crowd a chunk (4 of the
    256 per chunk on average, 8 kept); with 128-id ones torch.topk's values."""
    logits = torch.randn(2, 32768, generator=torch.Generator().manual_seed(5))
    values, index = scaled_top_candidates(logits, torch.tensor([1.0, 0.7]), 256)[:2]
    expected = (logits / torch.tensor([[1.0], [0.7]])).topk(256)
    torch.testing.assert_close(values, expected.values)
    assert torch.equal(index, expected.indices)


def test_custom_op_is_torch_topk_off_the_gpu_and_traceable():
    logits = torch.randn(4, 700)
    values, index = top_candidates_op(logits, 32)
    assert torch.equal(values, logits.topk(32).values) and torch.equal(index, logits.topk(32).indices)
    torch.library.opcheck(top_candidates_op, (logits, 32))   # fake (meta) kernel, schema, autograd registration


COMPILE_FOR_HOPPER = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ssd.engine import triton_topk as topk
for vocab in (128256, 32768):   # the full head's rows (512-id chunks), a restricted head's kept ones (128)
    chunk = topk.chunk_width(vocab, 256)
    chunks = triton.cdiv(vocab, chunk)
    candidates = chunks * topk.PER_CHUNK
    kernels = {
        topk._chunk_candidates_kernel: ({"x_ptr": "*fp32", "out_ptr": "*u64", "sx_r": "i32"},
            {"V": vocab, "CHUNKS": chunks, "CHUNK": chunk, "PER_CHUNK": topk.PER_CHUNK, "TILE_CHUNKS": topk.TILE_CHUNKS}),
        topk._select_kernel: ({"x_ptr": "*fp32", "cand_ptr": "*u64", "value_ptr": "*fp32", "index_ptr": "*i32",
                               "sx_r": "i32"}, {"CANDIDATES": candidates, "PADDED": triton.next_power_of_2(candidates), "K": 256}),
    }
    for kernel, (signature, constants) in kernels.items():
        source = ASTSource(fn=kernel, signature={**signature, **{c: "constexpr" for c in constants}}, constexprs=constants)
        assert triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8}).asm["cubin"]
print("compiled")
"""


def test_kernels_compile_for_hopper():
    """The interpreter does not compile: build both kernels for sm_90 at the 1B draft's vocabulary
    with Triton's bundled ptxas (no GPU needed), in a process of its own without the interpreter."""
    from triton.backends import backends
    if "nvidia" not in backends:
        pytest.skip("this Triton build has no CUDA backend")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-c", COMPILE_FOR_HOPPER], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scaled_candidates_and_log_sum_exp(dtype):
    """Temperature-scaled in the kernels (greedy rows unscaled), with the rows' log-sum-exp from the
    chunks' statistics: as dividing first and calling topk / logsumexp; a restricted head's -inf
    chunks add nothing (no NaN)."""
    g = torch.Generator().manual_seed(7)
    logits = (torch.randn(4, 8000, generator=g) * 3).to(dtype)
    logits[3] = float("-inf")
    logits[3, 2048::170] = torch.randn(36, generator=g).to(dtype)   # the first 4 chunks all -inf
    temperature = torch.tensor([1.0, 0.7, 0.0, 1.3])
    values, index, lse = scaled_top_candidates(logits, temperature, 32)
    scaled = logits.float() / torch.tensor([1.0, 0.7, 1.0, 1.3])[:, None]
    expected_values, expected_index = scaled.topk(32)
    assert torch.equal(values, expected_values) and torch.equal(scaled.gather(1, index), values)
    assert dtype == torch.bfloat16 or torch.equal(index, expected_index)   # bf16 has ties: any order among them
    torch.testing.assert_close(lse, scaled.logsumexp(-1), rtol=1e-6, atol=1e-5)
    op_values, op_index, op_lse = scaled_top_candidates_op(logits, temperature, 32)   # CPU: the PyTorch path
    assert torch.equal(op_values, expected_values)
    torch.testing.assert_close(op_lse, lse, rtol=1e-6, atol=1e-5)
