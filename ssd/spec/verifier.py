"""Speculative-decoding verification for a batch, as pure tensor ops.

For each row the draft proposed K tokens d_0..d_{K-1}; the target scored K+1
positions. Tokens are accepted left to right; at the first rejection a
*recovered* token is emitted, and if all K are accepted a *bonus* token is
emitted from the last target position. Sampled rows use the rejection rule of
Leviathan et al. / Chen et al., so the emitted tokens follow the target
distribution exactly; greedy rows accept while the draft equals the target argmax.

Randomness comes from ssd.engine.random with counter = (sequence position of
output index 0) + i for output index i, so each position draws fresh numbers
and the next round, which starts at counter + num_emitted, never reuses a
number that influenced this round's output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ssd.engine.random import RandomStream, uniform_from_counters
from ssd.engine.sampler import SamplingTensors, probs_from_logits, sample_from_weights
from ssd.sampling_params import SamplingParams
from ssd.engine.greedy import greedy_tokens

PAD_TOKEN = -1


@dataclass(frozen=True, slots=True)
class VerifyResult:
    output_tokens: torch.Tensor  # [B, K+1] int64, PAD_TOKEN after the emitted ones
    num_accepted: torch.Tensor  # [B] int64, in [0, K]
    num_emitted: torch.Tensor  # [B] int64, num_accepted + 1


def one_hot_probs(tokens: torch.Tensor, vocab_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """draft_probs for a deterministic proposal: tokens [...] int64 -> [..., V]."""
    # zeros + scatter rather than F.one_hot, whose range check syncs with the host on some paths.
    probs = torch.zeros(*tokens.shape, vocab_size, dtype=dtype, device=tokens.device)
    return probs.scatter_(-1, tokens[..., None], 1.0)


def validate_verify_inputs(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_logits: torch.Tensor,
    sampling_params: Sequence[SamplingParams],
) -> None:
    """Host-side checks for verify(): shapes, dtypes and the greedy-only rule for
    draft_probs=None. Reads only shapes and Python params, so it never syncs."""
    if draft_tokens.dim() != 2 or draft_tokens.dtype != torch.int64:
        raise ValueError(f"draft_tokens must be int64 [B, K], got {draft_tokens.dtype} {list(draft_tokens.shape)}")
    batch_size, num_draft = draft_tokens.shape
    if num_draft < 1:
        raise ValueError("verify needs at least one draft token per row (K >= 1)")
    if target_logits.dim() != 3 or tuple(target_logits.shape[:2]) != (batch_size, num_draft + 1):
        raise ValueError(
            f"target_logits must be [B, K+1, V] = [{batch_size}, {num_draft + 1}, V], got {list(target_logits.shape)}"
        )
    vocab_size = target_logits.shape[2]
    if draft_probs is not None and tuple(draft_probs.shape) != (batch_size, num_draft, vocab_size):
        raise ValueError(
            f"draft_probs must be [B, K, V] = [{batch_size}, {num_draft}, {vocab_size}], got {list(draft_probs.shape)}"
        )
    if len(sampling_params) != batch_size:
        raise ValueError(f"got {len(sampling_params)} sampling params for a batch of {batch_size}")
    if draft_probs is None and not all(p.greedy for p in sampling_params):
        raise ValueError("draft_probs=None is only allowed when every row is greedy (temperature 0)")


def count_leading_true(flags: torch.Tensor) -> torch.Tensor:
    """[B, K] bool -> [B] int64: length of the all-True prefix of each row."""
    return flags.long().cumprod(dim=1).sum(dim=1)


def _position_counters(counter: torch.Tensor, length: int) -> torch.Tensor:
    return counter[:, None] + torch.arange(length, device=counter.device)  # [B, length]


def _acceptance_test(
    draft_tokens: torch.Tensor,
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor,
    seed: torch.Tensor,
    counter: torch.Tensor,
) -> torch.Tensor:
    """Accept d_i with probability min(1, p_i(d_i) / q_i(d_i)). Returns [B, K] bool."""
    positions = _position_counters(counter, draft_tokens.shape[1])  # [B, K]
    uniforms = uniform_from_counters(seed[:, None], positions, RandomStream.ACCEPT, 1).squeeze(-1)  # [B, K]
    p_of_draft = target_probs.gather(-1, draft_tokens[..., None]).squeeze(-1)  # [B, K]
    q_of_draft = draft_probs.gather(-1, draft_tokens[..., None]).squeeze(-1)  # [B, K]
    # Multiplied out to avoid dividing by q; strict `<` so p = 0 is never accepted.
    return uniforms * q_of_draft < p_of_draft


def _recovery_weights(target_probs: torch.Tensor, draft_probs: torch.Tensor) -> torch.Tensor:
    """Unnormalised max(0, p - q), or p where that is all zero (only when p == q). [B, V]."""
    residual = (target_probs - draft_probs).clamp_min(0.0)
    return torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, target_probs)


def _sample_recovered_or_bonus(
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor,
    num_accepted: torch.Tensor,
    seed: torch.Tensor,
    counter: torch.Tensor,
) -> torch.Tensor:
    """Sample the token emitted at position num_accepted: from the residual at a
    rejection, from p_K (q taken as zero) after K accepts. Returns [B] int64."""
    num_draft, vocab_size = draft_probs.shape[1:]
    at_rejection = num_accepted < num_draft  # [B]
    target_index = num_accepted[:, None, None].expand(-1, 1, vocab_size)  # [B, 1, V]
    draft_index = num_accepted.clamp_max(num_draft - 1)[:, None, None].expand(-1, 1, vocab_size)
    p = target_probs.gather(1, target_index).squeeze(1)  # [B, V]
    q = draft_probs.gather(1, draft_index).squeeze(1) * at_rejection[:, None]  # [B, V]
    return sample_from_weights(_recovery_weights(p, q), seed, counter + num_accepted, RandomStream.RECOVER)


def assemble_output(draft_tokens: torch.Tensor, last_token: torch.Tensor, num_accepted: torch.Tensor) -> torch.Tensor:
    """[B, K+1]: accepted draft tokens, then last_token, then PAD_TOKEN."""
    positions = torch.arange(draft_tokens.shape[1] + 1, device=draft_tokens.device)  # [K+1]
    accepted_count = num_accepted[:, None]  # [B, 1]
    padded_draft = F.pad(draft_tokens, (0, 1), value=PAD_TOKEN)  # [B, K+1]
    output = torch.where(positions < accepted_count, padded_draft, PAD_TOKEN)
    return torch.where(positions == accepted_count, last_token[:, None], output)


def _verify_all_greedy(draft_tokens: torch.Tensor, target_argmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    num_accepted = count_leading_true(draft_tokens == target_argmax[:, :-1])  # [B]
    last_token = target_argmax.gather(1, num_accepted[:, None]).squeeze(1)  # [B]
    return num_accepted, last_token


def _verify_mixed(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor,
    target_logits: torch.Tensor,
    target_argmax: torch.Tensor,
    st: SamplingTensors,
    counter: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    greedy = st.is_greedy  # [B]
    target_probs = probs_from_logits(target_logits, st)  # [B, K+1, V]
    draft_probs = draft_probs.float()
    greedy_accepted = draft_tokens == target_argmax[:, :-1]  # [B, K]
    sampled_accepted = _acceptance_test(draft_tokens, target_probs[:, :-1], draft_probs, st.seed, counter)
    num_accepted = count_leading_true(torch.where(greedy[:, None], greedy_accepted, sampled_accepted))
    greedy_last = target_argmax.gather(1, num_accepted[:, None]).squeeze(1)  # [B]
    sampled_last = _sample_recovered_or_bonus(target_probs, draft_probs, num_accepted, st.seed, counter)
    return num_accepted, torch.where(greedy, greedy_last, sampled_last)


def verify(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_logits: torch.Tensor,
    st: SamplingTensors,
    counter: torch.Tensor,
) -> VerifyResult:
    """Verify K draft tokens per row against the target.

    draft_tokens [B, K] int64; draft_probs [B, K, V] the distribution each draft
    token was actually drawn from (one_hot_probs() for a deterministic proposal),
    or None when every row is greedy (see validate_verify_inputs); target_logits
    [B, K+1, V]; counter [B] int64, the sequence position of output index 0.
    """
    target_argmax = greedy_tokens(target_logits)  # [B, K+1]
    if draft_probs is None:
        num_accepted, last_token = _verify_all_greedy(draft_tokens, target_argmax)
    else:
        num_accepted, last_token = _verify_mixed(draft_tokens, draft_probs, target_logits, target_argmax, st, counter)
    output_tokens = assemble_output(draft_tokens, last_token, num_accepted)
    return VerifyResult(output_tokens=output_tokens, num_accepted=num_accepted, num_emitted=num_accepted + 1)
