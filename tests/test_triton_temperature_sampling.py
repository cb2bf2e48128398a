"""Temperature sampling in chunked Triton kernels (run here under Triton's CPU interpreter): q is
softmax(logits / T) (one-hot argmax on greedy rows) and the token is what the exponential race of
sample_from_weights draws from that q."""
import pytest
import torch

pytest.importorskip("triton")

from ssd.engine.random import RandomStream  # noqa: E402
from ssd.engine.sampler import sample_from_weights  # noqa: E402
from ssd.engine.triton_temperature_sampling import temperature_sample  # noqa: E402


@pytest.mark.parametrize("chunks", [None, 1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_distribution_and_draw(chunks, dtype):
    g = torch.Generator().manual_seed(7)
    vocab = 5000
    logits = (torch.randn(5, vocab, generator=g) * 4).to(dtype)
    logits[3, [10, 4000]] = 30.0                                    # a greedy row with a tie: the first wins
    temperature = torch.tensor([1.0, 0.5, 1.7, 0.0, 0.9])
    seed, counter = torch.tensor([1, 2, 3, 4, 2**40]), torch.tensor([9, 9, 10, 11, 2**33])
    tokens, q = temperature_sample(logits, temperature, seed, counter, RandomStream.DRAFT, chunks=chunks)
    scaled = logits.float() / torch.where(temperature < 1e-5, 1.0, temperature)[:, None]
    expected = scaled.softmax(-1)
    expected[3] = torch.nn.functional.one_hot(logits[3].float().argmax(), vocab).float()
    torch.testing.assert_close(q, expected, rtol=1e-5, atol=1e-7)
    assert torch.equal(tokens, sample_from_weights(q, seed, counter, RandomStream.DRAFT))
    assert int(tokens[3]) == 10


@pytest.mark.parametrize("chunks", [1, 4])
def test_chunks_of_minus_inf_logits_get_zero_probability(chunks):
    """A restricted draft head (ssd.spec.draft_vocabulary) leaves whole chunks at -inf."""
    g = torch.Generator().manual_seed(3)
    logits = torch.full((3, 4096), float("-inf"))
    logits[:, :700] = torch.randn(3, 700, generator=g)
    logits[2, 3000] = 1.0                                            # one kept token far out
    temperature, seed, counter = torch.tensor([1.0, 0.6, 0.0]), torch.arange(3), torch.full((3,), 4)
    tokens, q = temperature_sample(logits, temperature, seed, counter, RandomStream.DRAFT, chunks=chunks)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q[:2], (logits[:2] / temperature[:2, None]).softmax(-1), rtol=1e-5, atol=1e-7)
    assert torch.equal(tokens, sample_from_weights(q, seed, counter, RandomStream.DRAFT))


def test_writes_into_strided_rows_of_a_larger_buffer():
    """As the tree writes into its graph's probs buffer [B, N, K, V] at one depth."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2 * 3, 700, generator=g)
    buffer = torch.full((2, 3, 4, 700), -1.0)
    out = buffer[:, :, 2].view(6, 700)
    temperature, seed, counter = torch.full((6,), 0.8), torch.arange(6), torch.full((6,), 5)
    tokens, q = temperature_sample(logits, temperature, seed, counter, RandomStream.DRAFT, out=out)
    assert q.data_ptr() == out.data_ptr()
    torch.testing.assert_close(buffer[:, :, 2].reshape(6, 700), (logits / 0.8).softmax(-1), rtol=1e-5, atol=1e-7)
    assert (buffer[:, :, [0, 1, 3]] == -1.0).all()                  # the other depths untouched
    assert torch.equal(tokens, sample_from_weights(out, seed, counter, RandomStream.DRAFT))


def test_draws_follow_the_distribution():
    """Many counters of one row: empirical frequencies match softmax(logits / T) (TV < 0.05)."""
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0]]).expand(1500, 4)
    tokens, _ = temperature_sample(logits, torch.full((1500,), 0.7), torch.full((1500,), 3), torch.arange(1500),
                                   RandomStream.SAMPLE)
    expected = (logits[0] / 0.7).softmax(-1)
    frequency = torch.bincount(tokens, minlength=4).float() / 1500
    assert 0.5 * (frequency - expected).abs().sum() < 0.05


@pytest.mark.parametrize("chunks", [1, 3])
def test_kept_columns_give_the_tokens_and_q_of_the_full_rows(chunks):
    """A restricted head's kept logits with their token ids: q written at those tokens' columns (the rest
    left at zero) and the token drawn are exactly those of the -inf-filled full rows."""
    g = torch.Generator().manual_seed(11)
    vocab, kept = 3000, 700
    ids = torch.randperm(vocab, generator=g)[:kept].sort().values
    logits = torch.randn(4, kept, generator=g) * 3
    logits[2, [5, 600]] = 40.0                                      # a greedy row with a tie: the first wins
    full = torch.full((4, vocab), float("-inf")).index_copy_(1, ids, logits)
    temperature, seed, counter = torch.tensor([1.0, 0.4, 0.0, 2.0]), torch.arange(4) + 7, torch.full((4,), 3)
    tokens, q = temperature_sample(full, temperature, seed, counter, RandomStream.DRAFT, chunks=chunks)
    out = torch.zeros(4, 2, vocab)[:, 1]                             # strided rows, as a graph's buffer slice
    kept_tokens, kept_q = temperature_sample(logits, temperature, seed, counter, RandomStream.DRAFT, out=out,
                                             chunks=chunks, ids=ids, vocab_size=vocab)
    assert torch.equal(kept_tokens, tokens) and int(tokens[2]) == int(ids[5])
    torch.testing.assert_close(kept_q, q, rtol=1e-6, atol=1e-9)
    assert kept_q.data_ptr() == out.data_ptr()
    new_tokens, new_q = temperature_sample(logits, temperature, seed, counter, RandomStream.DRAFT, chunks=chunks,
                                           ids=ids, vocab_size=vocab)
    assert torch.equal(new_tokens, tokens) and torch.equal(new_q, kept_q)
