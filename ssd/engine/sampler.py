"""Batched sampling: temperature, top-k, top-p and seeded sampling as pure tensor ops.

Nothing here synchronises with the host or has data-dependent shapes, so it can
run inside CUDA-graph-captured code. Rows with temperature < GREEDY_TEMPERATURE_EPS
are greedy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch

from ssd.engine.greedy import greedy_tokens
from ssd.engine.random import RandomStream, uniform_at_columns, uniform_from_counters
from ssd.sampling_params import GREEDY_TEMPERATURE_EPS, SamplingParams

_UINT64_MASK = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _UINT64_MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _UINT64_MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _UINT64_MASK
    return x ^ (x >> 31)


def _as_int64(x: int) -> int:
    """Wrap any Python int to the int64 with the same low 64 bits."""
    return ((x + (1 << 63)) & _UINT64_MASK) - (1 << 63)


def derive_seed(engine_seed: int, request_index: int) -> int:
    """A deterministic per-request seed for requests that did not give one."""
    return _as_int64(_splitmix64(_splitmix64(engine_seed & _UINT64_MASK) ^ (request_index & _UINT64_MASK)))


@dataclass(slots=True)
class SamplingTensors:
    """Per-row sampling parameters on device.

    apply_filters=False skips the top-k/top-p sort entirely (a host-side decision
    made from the Python params; code captured in a CUDA graph that may see
    filtered rows must be captured with True).
    """

    temperature: torch.Tensor  # [B] float32; < GREEDY_TEMPERATURE_EPS means greedy
    top_k: torch.Tensor  # [B] int64; <= 0 or >= vocab means off
    top_p: torch.Tensor  # [B] float32; 1 means off
    seed: torch.Tensor  # [B] int64
    apply_filters: bool = True
    all_greedy: bool = False  # host-side fact from the params: sampling reduces to argmax

    @classmethod
    def from_params(
        cls,
        params: Sequence[SamplingParams],
        device: torch.device | str,
        default_seed: int,
        request_ids: Sequence[int] | None = None,
    ) -> SamplingTensors:
        """Rows without a seed get derive_seed(default_seed, request id).

        request_ids defaults to the row index; pass stable request ids so an
        unseeded request keeps its random stream when the batch changes.
        """
        if request_ids is None:
            request_ids = range(len(params))
        if len(request_ids) != len(params):
            raise ValueError(f"got {len(params)} params but {len(request_ids)} request ids")
        temperature = [0.0 if p.greedy else float(p.temperature) for p in params]
        top_k = [max(p.top_k, 0) for p in params]
        top_p = [float(p.top_p) for p in params]
        seed = [
            _as_int64(p.seed) if p.seed is not None else derive_seed(default_seed, rid)
            for p, rid in zip(params, request_ids)
        ]
        return cls(
            temperature=torch.tensor(temperature, dtype=torch.float32, device=device),
            top_k=torch.tensor(top_k, dtype=torch.int64, device=device),
            top_p=torch.tensor(top_p, dtype=torch.float32, device=device),
            seed=torch.tensor(seed, dtype=torch.int64, device=device),
            apply_filters=any(k > 0 or p < 1.0 for k, p in zip(top_k, top_p)),
            all_greedy=all(t == 0.0 for t in temperature),
        )

    def select_rows(self, rows: torch.Tensor) -> SamplingTensors:
        """The parameters of the given rows (int64 [R]), e.g. after the batch changed."""
        return SamplingTensors(
            temperature=self.temperature[rows],
            top_k=self.top_k[rows],
            top_p=self.top_p[rows],
            seed=self.seed[rows],
            apply_filters=self.apply_filters,
            all_greedy=self.all_greedy,
        )

    @property
    def batch_size(self) -> int:
        return self.temperature.shape[0]

    @property
    def is_greedy(self) -> torch.Tensor:
        return self.temperature < GREEDY_TEMPERATURE_EPS  # [B] bool


def _per_row(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """View a [B] tensor as [B, 1, ..., 1] to broadcast against `like` ([B, ..., V])."""
    return values.view(-1, *([1] * (like.dim() - 1)))


def _top_k_sorted(sorted_logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Top-k on logits sorted descending [..., W] (k off or beyond W: all W); dropped -> -inf."""
    width = sorted_logits.shape[-1]
    k = torch.where((top_k <= 0) | (top_k > width), width, top_k)
    kth_largest = sorted_logits.gather(-1, k.expand(*sorted_logits.shape[:-1], 1) - 1)  # [..., 1]
    # Compare values, not ranks, so tokens tied with the k-th are all kept.
    return sorted_logits.masked_fill(sorted_logits < kth_largest, float("-inf"))


def _top_p_sorted(sorted_logits: torch.Tensor, top_p: torch.Tensor,
                  log_normalizer: torch.Tensor | None = None) -> torch.Tensor:
    """Top-p on logits sorted descending [..., W]; dropped -> -inf. log_normalizer [..., 1]: log of
    the distribution's total mass when the W entries are only its largest ones (None: all of it)."""
    if log_normalizer is None:
        sorted_probs = sorted_logits.softmax(dim=-1)
    else:
        sorted_probs = (sorted_logits - log_normalizer).exp()
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # exclusive cumsum, [..., W]
    # The top token has mass_before 0 < top_p, so it always survives.
    drop = (mass_before >= top_p) & (top_p < 1.0)
    return sorted_logits.masked_fill(drop, float("-inf"))


def _mask_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set filtered-out logits to -inf. logits [..., V]; top_k, top_p broadcastable [..., 1]."""
    sorted_logits, sorted_index = logits.sort(dim=-1, descending=True, stable=True)  # [..., V]
    filtered = _top_p_sorted(_top_k_sorted(sorted_logits, top_k), top_p)
    return torch.empty_like(logits).scatter_(-1, sorted_index, filtered)


def _mask_top_k_top_p_among(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                            candidates: int) -> torch.Tensor:
    """As _mask_top_k_top_p, among the `candidates` largest logits only (a top-k, not a sort of the
    vocabulary; on CUDA ssd.engine.triton_topk's, which may swap the lowest few for the next largest):
    the same result whenever the kept set fits in them, else truncated to them. For
    the draft only — any proposal distribution keeps verification exact, if the verifier is given it;
    the target's own distribution always takes the full sort. Rows without filters stay unfiltered."""
    vocab_size = logits.shape[-1]
    if candidates >= vocab_size:
        return _mask_top_k_top_p(logits, top_k, top_p)
    values, index = largest_logits(logits, candidates)
    kept = _filter_sorted(values, top_k, top_p, candidates, logits.logsumexp(-1, keepdim=True))
    filtered = torch.full_like(logits, float("-inf")).scatter_(-1, index, kept)
    unfiltered = ((top_k <= 0) | (top_k >= vocab_size)) & (top_p >= 1.0)
    return torch.where(unfiltered, logits, filtered)


def _filter_sorted(values: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, candidates: int,
                   log_normalizer: torch.Tensor) -> torch.Tensor:
    """The `candidates` largest logits [..., W] sorted descending, filtered (dropped -> -inf);
    log_normalizer [..., 1]: the log-sum-exp of all the row's logits."""
    kept = _top_k_sorted(values, top_k)
    # top-p counts mass against the top-k distribution when k fits in the candidates, else the whole one
    k_fits = (top_k > 0) & (top_k <= candidates)
    return _top_p_sorted(kept, top_p, torch.where(k_fits, kept.logsumexp(-1, keepdim=True), log_normalizer))


def _scaled_candidates(logits: torch.Tensor, temperature: torch.Tensor,
                       k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Of scaled = logits [R, V] / temperature [R] (1 on greedy rows): topk(k) (values, ids) and
    logsumexp [R]; on CUDA ssd.engine.triton_topk's two kernels, which never write `scaled`."""
    op = _fused_scaled_topk() if logits.is_cuda else None
    return op(logits, temperature, k) if op is not None else scaled_topk_reference(logits, temperature, k)


def scaled_topk_reference(logits: torch.Tensor, temperature: torch.Tensor,
                          k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """_scaled_candidates in PyTorch: the scaled logits written, then topk and logsumexp."""
    scaled = logits.float() / torch.where(temperature < GREEDY_TEMPERATURE_EPS, 1.0, temperature.float())[:, None]
    values, index = scaled.topk(k, dim=-1)
    return values, index, scaled.logsumexp(-1)


def largest_logits(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits.topk(k) over the last dim (values, indices); for float32 on CUDA ssd.engine.triton_topk's
    two kernels (see its bound: exact for k <= its PER_CHUNK)."""
    op = _fused_topk() if logits.is_cuda and logits.dtype == torch.float32 else None
    if op is None:
        return logits.topk(k, dim=-1)
    values, index = op(logits.reshape(-1, logits.shape[-1]), k)
    return values.view(*logits.shape[:-1], k), index.view(*logits.shape[:-1], k)


@lru_cache(maxsize=None)
def _fused_scaled_topk():
    try:
        from ssd.engine.triton_topk import scaled_top_candidates_op
    except ImportError:  # no Triton: PyTorch
        return None
    return scaled_top_candidates_op


@lru_cache(maxsize=None)
def _fused_topk():
    try:
        from ssd.engine.triton_topk import top_candidates_op
    except ImportError:  # no Triton: torch.topk
        return None
    return top_candidates_op


def _one_hot_argmax(logits: torch.Tensor) -> torch.Tensor:
    # a comparison, not a scatter into zeros: elementwise, so torch.compile fuses it with the softmax
    vocab = torch.arange(logits.shape[-1], device=logits.device)
    return (vocab == logits.argmax(dim=-1, keepdim=True)).to(logits.dtype)


def probs_from_logits(logits: torch.Tensor, st: SamplingTensors, candidates: int | None = None) -> torch.Tensor:
    """Filtered, renormalised float32 probabilities from logits [B, V] or [B, T, V].

    Order: temperature, top-k, top-p. Greedy rows return one-hot argmax. The
    target's p always filters over the whole vocabulary; a draft may pass
    `candidates` to filter among that many top tokens only (no full sort).
    """
    logits = logits.float()
    temperature = _per_row(st.temperature, logits)
    greedy = temperature < GREEDY_TEMPERATURE_EPS
    scaled = logits / torch.where(greedy, 1.0, temperature)
    if st.apply_filters:
        top_k, top_p = _per_row(st.top_k, logits), _per_row(st.top_p, logits)
        scaled = _mask_top_k_top_p(scaled, top_k, top_p) if candidates is None else \
            _mask_top_k_top_p_among(scaled, top_k, top_p, candidates)
    return torch.where(greedy, _one_hot_argmax(logits), scaled.softmax(dim=-1))


def compact_probs_from_logits(logits: torch.Tensor, st: SamplingTensors,
                              candidates: int) -> tuple[torch.Tensor, torch.Tensor]:
    """probs_from_logits(logits [R, V], st, candidates) kept compact, for a draft: the token ids
    [R, W] of the W = min(candidates, V) largest temperature-scaled logits and their filtered,
    renormalised float32 probabilities [R, W] (0 where filtered out; the rest of the vocabulary has
    none). Unlike probs_from_logits, rows without filters are truncated to the candidates too —
    another proposal distribution, still exact if the verifier is given it. Greedy rows: 1 on the
    first candidate, the largest logit."""
    width = min(candidates, logits.shape[-1])
    values, ids, log_normalizer = _scaled_candidates(logits, st.temperature, width)
    kept = _filter_sorted(values, st.top_k[:, None], st.top_p[:, None], width, log_normalizer[:, None])
    greedy = (st.temperature < GREEDY_TEMPERATURE_EPS)[:, None]
    first = (torch.arange(width, device=logits.device) == 0).to(torch.float32)
    return ids, torch.where(greedy, first, kept.softmax(dim=-1))


def sample_among(ids: torch.Tensor, weights: torch.Tensor, seed: torch.Tensor, counter: torch.Tensor,
                 salt: int) -> torch.Tensor:
    """sample_from_weights for rows whose only nonzero weights [..., W] sit at the token ids
    [..., W] (distinct within a row): the same race at those columns, with the same numbers, so
    the same token as sample_from_weights on the dense rows (up to exact float ties)."""
    exponentials = -torch.log(uniform_at_columns(seed, counter, salt, ids))
    return ids.gather(-1, (weights / exponentials).argmax(dim=-1, keepdim=True)).squeeze(-1)


def sample_from_weights(
    weights: torch.Tensor, seed: torch.Tensor, counter: torch.Tensor, salt: int
) -> torch.Tensor:
    """Draw one index per row of non-negative weights [..., V] (need not sum to 1).

    Exponential race: argmax(w / E) with E ~ Exp(1) picks index i with
    probability w_i / sum(w), and never picks a zero-weight index.
    seed, counter broadcast to weights.shape[:-1]. Returns int64 [...].
    On CUDA one fused Triton kernel draws the same numbers (ssd.engine.triton_sampling).
    """
    race = _fused_race() if weights.is_cuda else None
    if race is not None:
        return race(weights, seed, counter, salt)
    uniforms = uniform_from_counters(seed, counter, salt, weights.shape[-1])  # [..., V]
    exponentials = -torch.log(uniforms)
    return (weights / exponentials).argmax(dim=-1)


@lru_cache(maxsize=None)
def _fused_race():
    try:
        from ssd.engine.triton_sampling import exponential_race
    except ImportError:  # no Triton: the PyTorch race (same numbers, more kernels)
        return None
    return exponential_race


def sample_with_probs(
    logits: torch.Tensor,
    st: SamplingTensors,
    counter: torch.Tensor,
    salt: int = RandomStream.SAMPLE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample tokens [B] int64 from logits [B, V]; also return the probs [B, V] used (filtered over
    the whole vocabulary: a draft filters among its top candidates, ssd.draft_worker.proposer)."""
    probs = probs_from_logits(logits, st)  # [B, V]
    sampled = sample_from_weights(probs, st.seed, counter, salt)  # [B]
    tokens = torch.where(st.is_greedy, greedy_tokens(logits), sampled)
    return tokens, probs


def sample(
    logits: torch.Tensor,
    st: SamplingTensors,
    counter: torch.Tensor,
    salt: int = RandomStream.SAMPLE,
) -> torch.Tensor:
    """Sample tokens [B] int64 from logits [B, V]; greedy rows take the argmax."""
    if st.all_greedy:
        return greedy_tokens(logits)
    return sample_with_probs(logits, st, counter, salt)[0]
