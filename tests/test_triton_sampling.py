"""The fused exponential race (run here under Triton's CPU interpreter) draws the same tokens as
sample_from_weights: the same counter-based uniforms, the same race, the first index on ties."""
import pytest
import torch

pytest.importorskip("triton")

from ssd.engine.random import RandomStream  # noqa: E402
from ssd.engine.sampler import sample_from_weights  # noqa: E402
from ssd.engine.triton_sampling import exponential_race  # noqa: E402


@pytest.mark.parametrize("vocab", [5, 1000, 4099])     # one block, ragged last block, several blocks
@pytest.mark.parametrize("salt", [RandomStream.SAMPLE, RandomStream.DRAFT])
def test_same_tokens_as_the_torch_race(vocab, salt):
    g = torch.Generator().manual_seed(vocab)
    weights = torch.rand(6, vocab, generator=g) ** 4
    weights[0, : vocab // 2] = 0.0                        # zero weight is never drawn
    seed = torch.tensor([0, 1, 2, 2**40 + 3, -(2**62) + 5, 7])   # high words, a negative seed
    counter = torch.tensor([5, 5, 9, 0, 2**33, 11])
    expected = sample_from_weights(weights, seed, counter, salt)
    assert torch.equal(exponential_race(weights, seed, counter, salt), expected)
    assert int(expected[0]) >= vocab // 2


@pytest.mark.parametrize("chunks", [1, 2, 5])
def test_rows_cut_into_column_chunks_draw_the_same_tokens(chunks):
    """Each chunk's best, then the first best chunk: the same draw as one pass over the row; a row
    whose weight sits only in its last chunk, or only in its first, still draws there."""
    g = torch.Generator().manual_seed(chunks)
    weights = torch.rand(4, 9000, generator=g)
    weights[1, :-10] = 0.0
    weights[2, 10:] = 0.0
    seed, counter = torch.tensor([1, 2, 3, 4]), torch.tensor([7, 7, 8, 2**35])
    expected = sample_from_weights(weights, seed, counter, RandomStream.DRAFT)
    assert torch.equal(exponential_race(weights, seed, counter, RandomStream.DRAFT, chunks=chunks), expected)
    assert int(expected[1]) >= 8990 and int(expected[2]) < 10


def test_leading_dims_and_broadcast_seed():
    g = torch.Generator().manual_seed(0)
    weights = torch.rand(2, 3, 300, generator=g)
    seed, counter = torch.tensor([4, 5])[:, None], torch.arange(3)[None, :] + 10
    expected = sample_from_weights(weights, seed, counter, RandomStream.DRAFT)
    assert torch.equal(exponential_race(weights, seed, counter, RandomStream.DRAFT), expected)


def test_draws_follow_the_weights():
    """Many counters of one row: the empirical distribution matches the weights (TV < 0.05, about
    three standard deviations at 1200 draws)."""
    weights = torch.tensor([0.5, 0.0, 0.2, 0.3])
    draws = exponential_race(weights.expand(1200, 4), torch.tensor(3), torch.arange(1200), RandomStream.SAMPLE)
    frequency = torch.bincount(draws, minlength=4).float() / 1200
    assert frequency[1] == 0
    assert 0.5 * (frequency - weights).abs().sum() < 0.05


@pytest.mark.parametrize("chunks", [None, 1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_argmax_equals_argmax_with_ties(chunks, dtype):
    """The greedy choice on CUDA: the first largest, ties across and inside chunks, all-equal and
    all -inf rows (index 0), bf16 logits compared exactly."""
    from ssd.engine.triton_sampling import chunked_argmax
    vocab = 9000
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, vocab, generator=g).to(dtype)
    logits[0, 0, [3, vocab - 1]] = 50.0                    # across chunks: the first wins
    logits[0, 1, [4100, 4101]] = 50.0                      # inside one chunk
    logits[1, 2] = 0.0
    logits[1, 3] = float("-inf")
    logits[1, 1, -5:] = 60.0                               # the best only in the last block
    assert torch.equal(chunked_argmax(logits, chunks), logits.argmax(-1))
    assert torch.equal(chunked_argmax(logits[:, 1], chunks), logits[:, 1].argmax(-1))   # strided rows
