"""The filtered draft distribution kept compact (token ids + probabilities of its largest logits)
equals the dense one, and the draw from it is the draw sample_from_weights makes on the dense rows."""
import pytest
import torch

from ssd.draft_worker.compact_probs import CompactProbs
from ssd.engine.random import RandomStream, uniform_at_columns, uniform_from_counters
from ssd.engine.sampler import (SamplingTensors, compact_probs_from_logits, probs_from_logits, sample_among,
                                sample_from_weights)

VOCAB = 1000


def sampling(temperature, top_k, top_p, seed=0):
    rows = len(temperature)
    return SamplingTensors(torch.tensor(temperature), torch.tensor(top_k), torch.tensor(top_p),
                           torch.arange(seed, seed + rows))


def test_uniforms_at_columns_are_those_columns_of_the_full_rows():
    seed, counter = torch.tensor([3, 4]), torch.tensor([17, 900])
    columns = torch.tensor([[5, 0, 999], [42, 7, 1]])
    full = uniform_from_counters(seed, counter, RandomStream.DRAFT, VOCAB)
    assert torch.equal(uniform_at_columns(seed, counter, RandomStream.DRAFT, columns), full.gather(1, columns))


@pytest.mark.parametrize("candidates", [64, VOCAB + 24])   # a few of the tokens, and all of them
def test_filtered_rows_equal_the_dense_distribution(candidates):
    g = torch.Generator().manual_seed(candidates)
    logits = 3 * torch.randn(6, VOCAB, generator=g)
    # top-p, top-k, both, top-k past the candidates with top-p, greedy, a lower temperature with top-p
    st = sampling([1.0, 1.0, 0.7, 1.0, 0.0, 0.5], [0, 20, 30, 5000, 0, 0], [0.8, 1.0, 0.9, 0.5, 1.0, 0.95])
    ids, probs = compact_probs_from_logits(logits, st, candidates)
    width = min(candidates, VOCAB)
    assert ids.shape == probs.shape == (6, width)
    assert all(len(set(row.tolist())) == width for row in ids)           # distinct ids per row
    dense = CompactProbs(ids, probs, VOCAB).dense()
    torch.testing.assert_close(dense, probs_from_logits(logits, st, candidates), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(dense.sum(-1), torch.ones(6))


def test_unfiltered_rows_are_truncated_to_the_candidates():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, VOCAB, generator=g)
    ids, probs = compact_probs_from_logits(logits, sampling([1.0, 0.8], [0, 0], [1.0, 1.0]), 50)
    for row, temperature in enumerate((1.0, 0.8)):
        top = (logits[row] / temperature).topk(50)
        assert set(ids[row].tolist()) == set(top.indices.tolist())
        torch.testing.assert_close(probs[row], top.values.softmax(-1), rtol=1e-5, atol=1e-7)


def test_the_draw_is_the_dense_race_draw():
    """Same seed and counter: the same token as sample_from_weights on the widened rows, so the
    tokens a filtered tree step caches are the ones the dense path drew."""
    g = torch.Generator().manual_seed(2)
    rows = 400
    logits = 2 * torch.randn(rows, VOCAB, generator=g)
    st = sampling([1.0] * rows, [0] * rows, [0.9] * rows, seed=11)
    ids, probs = compact_probs_from_logits(logits, st, 64)
    counter = torch.arange(rows) + 5
    compact = sample_among(ids, probs, st.seed, counter, RandomStream.DRAFT)
    dense = sample_from_weights(CompactProbs(ids, probs, VOCAB).dense(), st.seed, counter, RandomStream.DRAFT)
    assert torch.equal(compact, dense)
    assert (probs.gather(1, (ids == compact[:, None]).int().argmax(1, keepdim=True)) > 0).all()


def test_compact_rows_index_stack_and_widen():
    ids = torch.tensor([[[3, 1], [0, 2]], [[2, 3], [1, 0]]])          # [2, 2, W=2]
    probs = torch.tensor([[[0.75, 0.25], [1.0, 0.0]], [[0.5, 0.5], [0.2, 0.8]]])
    q = CompactProbs(ids, probs, 4)
    assert torch.equal(q[1, 0].dense(), torch.tensor([0.0, 0.0, 0.5, 0.5]))
    assert torch.equal(q.view(4).dense()[3], torch.tensor([0.8, 0.2, 0.0, 0.0]))
    stacked = CompactProbs.stack([q[:, 0], q[:, 1]], 1)
    assert torch.equal(stacked.dense(), q.dense())
    buffer = CompactProbs.empty((2, 2), 2, 4, "cpu")
    assert torch.equal(buffer.copy_(ids, probs).dense(), q.dense())
