"""The two-stage greedy argmax equals torch.argmax, ties included (the first largest wins)."""
import pytest
import torch

from ssd.engine.greedy import greedy_tokens, vocab_chunks


@pytest.mark.parametrize("vocab", [128256, 151936, 32000, 1000, 97])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equals_argmax_with_ties(vocab, dtype):
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(2, 5, vocab, generator=g).to(dtype)
    logits[0, 0, [3, vocab - 1]] = 50.0                    # a tie across chunks: the first wins
    logits[0, 1, [vocab // 2, vocab // 2 + 1]] = 50.0      # a tie inside one chunk
    logits[1, 2] = 0.0                                     # all equal: index 0
    expected = logits.argmax(-1)
    assert torch.equal(greedy_tokens(logits), expected)
    assert torch.equal(greedy_tokens(logits[:, 1]), expected[:, 1])   # a strided [B, V] view


def test_chunks_divide_the_vocabulary_or_fall_back():
    assert vocab_chunks(128256) == 256 and 128256 % vocab_chunks(128256) == 0
    assert vocab_chunks(151936) == 128
    assert vocab_chunks(97) == 1   # prime: one plain argmax
