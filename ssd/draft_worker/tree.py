"""The draft's speculation cache for the next round (Saguaro): while the target verifies the window
[last committed token, d1..dK], guess the likely outcomes (j accepted, then token t*) and draft each
guess's K-token continuation, batched over sequences and branches with a tree attention mask."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

from ssd.engine.model_runner import ModelRunner
from ssd.engine.random import RandomStream
from ssd.draft_worker.compact_probs import CompactProbs
from ssd.draft_worker.proposer import DRAFT_FILTER_CANDIDATES, draft_distribution
from ssd.engine.sampler import (SamplingTensors, compact_probs_from_logits, largest_logits, sample_among,
                                sample_from_weights)
from ssd.spec.saguaro import saguaro_probs
from ssd.sampling_params import SamplingParams
from ssd.engine.greedy import greedy_tokens
from ssd.engine.graph_capture import graph_capture
from ssd.layers.embed_head import spread_columns
from ssd.engine.progress_log import ProgressLog

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TreeShape:
    """Branch layout shared by every sequence: F_max[j] branches fork at window position j."""
    k: int
    fanout_hit: tuple[int, ...]    # K+1 entries, for sequences whose last speculation was a cache hit
    fanout_miss: tuple[int, ...]   # ... and for those whose speculation came from the backup

    @property
    def fanout_max(self) -> tuple[int, ...]:
        return tuple(max(h, m) for h, m in zip(self.fanout_hit, self.fanout_miss))

    @property
    def num_branches(self) -> int:
        return sum(self.fanout_max)

    @property
    def scratch_len(self) -> int:
        return self.num_branches * self.k

    def branch_fork(self, device) -> torch.Tensor:
        """[N] window position each branch forks at."""
        return torch.repeat_interleave(torch.arange(self.k + 1, device=device),
                                       torch.tensor(self.fanout_max, device=device))

    def branch_rank(self, device) -> torch.Tensor:
        """[N] rank of each branch's guess among its position's guesses."""
        return torch.cat([torch.arange(f, device=device) for f in self.fanout_max])

    def scratch_mask(self, depth: int, device) -> torch.Tensor:
        """[N, N*K]: at `depth`, branch n sees its own entries of depths 0..depth."""
        n = self.num_branches
        entry = torch.arange(n * self.k, device=device)
        own = (entry // self.k)[None, :] == torch.arange(n, device=device)[:, None]
        return own & ((entry % self.k)[None, :] <= depth)


@dataclass
class SpeculationCache:
    fork: torch.Tensor            # [N] window position of each branch
    rank: torch.Tensor            # [N] rank of each branch's guess among its position's guesses
    guess: torch.Tensor           # [B, N] t* each branch assumes
    valid: torch.Tensor           # [B, N] branch exists under this row's fan-out list
    tokens: torch.Tensor          # [B, N, K] the branch's draft continuation
    # [B, N, K, V] distributions the continuation was drawn from, compact ([B, N, K] rows of a
    # few tokens) where the draft filters with top-k / top-p
    probs: torch.Tensor | CompactProbs | None

    def branch_probs(self, branch: torch.Tensor) -> torch.Tensor | None:
        """branch [B] -> [B, K, V] the distributions its continuation was drawn from (None: greedy)."""
        if self.probs is None:
            return None
        probs = self.probs[torch.arange(branch.shape[0], device=branch.device), branch]
        return probs.dense() if isinstance(probs, CompactProbs) else probs

    def select_rows(self, rows: torch.Tensor) -> "SpeculationCache":
        probs = self.probs[rows] if self.probs is not None else None
        return SpeculationCache(self.fork, self.rank, self.guess[rows], self.valid[rows], self.tokens[rows], probs)


def fork_guesses(logits: torch.Tensor, drafted: torch.Tensor, fork: torch.Tensor, rank: torch.Tensor,
                 width: int, kept_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Top-F_j tokens of the draft's distribution at each window position j, excluding the token
    drafted there (the target never emits it after rejecting it; nothing excluded at j = K): one
    top-`width` (= max F_j + 1) over every position, then branch n takes the rank[n]-th kept token at
    position fork[n]. logits [B, K+1, V]; drafted [B, K]; fork, rank [N] (TreeShape.branch_fork /
    branch_rank, on the device) -> guesses [B, N]. On the GPU the top-`width` is Triton's (at B = 16
    torch.topk's radix select took ~0.26 ms of a 1B draft's round on an H200): its 8 largest are
    always exact (ssd.engine.triton_topk's bound), enough for any F_j <= 7. kept_ids [N]: logits
    are a restricted head's kept tokens only [B, K+1, N] (column i: token kept_ids[i]): the same
    guesses as over the -inf-filled full rows, up to the order of tied logits (a guess is only a
    guess: any choice stays exact)."""
    top = largest_logits(logits, width)[1]                                               # [B, K+1, W]
    if kept_ids is not None:
        top = kept_ids[top]
    excluded = torch.nn.functional.pad(drafted, (0, 1), value=-1)[..., None]             # [B, K+1, 1]
    ranks = torch.arange(width, device=top.device)
    order = torch.where(top != excluded, ranks, width).argsort(dim=-1, stable=True)      # drafted moves last
    return top.gather(-1, order)[:, fork, rank]


class TreeBuilder:
    def __init__(self, runner: ModelRunner, shape: TreeShape, saguaro_c: float = 1.0):
        self.runner, self.shape, self.c = runner, shape, saguaro_c
        device = runner.device
        self.fork = shape.branch_fork(device)
        self.rank = shape.branch_rank(device)
        self.masks = [shape.scratch_mask(d, device) for d in range(shape.k)]
        self.fanout_hit = torch.tensor(shape.fanout_hit, device=device)
        self.fanout_miss = torch.tensor(shape.fanout_miss, device=device)
        # on the graph path the sampled step's full-vocabulary passes (temperature, filters, softmax,
        # Saguaro rescale, the write into the cache's probs) run as a few fused kernels
        self.distribution = torch.compile(branch_distribution) if runner.cfg.use_cuda_graphs and runner.cfg.compile \
            else branch_distribution
        # top-k / top-p: the distribution among the largest logits only, kept compact, and the draw from it
        self.compact_step = torch.compile(compact_branch_step) if runner.cfg.use_cuda_graphs and runner.cfg.compile \
            else compact_branch_step
        # temperature only (no top-k / top-p, C = 1): distribution and draw in three chunked kernels
        self.temperature_sample = load_temperature_sample() if runner.device.type == "cuda" and saguaro_c >= 1.0 \
            else None
        # the window forward's logits: a restricted head's kept tokens only (RunnerConfig.kept_logits)
        self.kept_ids = runner.kept_logit_ids
        self.head_ids = runner.model.lm_head.kept_ids   # a restricted head's token ids (None: the full head)
        self.graphs = BranchGraphs(self) if runner.graphs is not None and shape.num_branches else None
        self.fork_graphs = ForkGraphs(self) if self.graphs is not None else None

    def set_fanout(self, fanout: tuple[int, ...]) -> None:
        """Online re-allocation (one list for hits and misses) within the same branch budget: the
        layout tensors are rewritten in place, so captured graphs keep reading them."""
        if sum(fanout) != self.shape.num_branches or len(fanout) != self.shape.k + 1:
            raise ValueError(f"fan-out {fanout} must keep {self.shape.k + 1} entries and "
                             f"{self.shape.num_branches} branches")
        self.shape = TreeShape(self.shape.k, tuple(fanout), tuple(fanout))
        device = self.fork.device
        for target, value in ((self.fork, self.shape.branch_fork(device)), (self.rank, self.shape.branch_rank(device)),
                              (self.fanout_hit, torch.tensor(fanout, device=device)),
                              (self.fanout_miss, torch.tensor(fanout, device=device))):
            target.copy_(value)

    def row_fanout(self, last_was_hit: torch.Tensor) -> torch.Tensor:
        """[B, K+1] fan-out list of each row."""
        return torch.where(last_was_hit[:, None], self.fanout_hit[None], self.fanout_miss[None])

    @torch.inference_mode()
    def build(self, window: torch.Tensor, lengths: torch.Tensor, last_was_hit: torch.Tensor,
              sampling: SamplingTensors | None, max_length: int) -> SpeculationCache:
        """window [B, K+1] = [last committed token, d1..dK] at positions lengths-1 ..; lengths [B]."""
        k = self.shape.k
        positions = lengths[:, None] - 1 + torch.arange(k + 1, device=lengths.device)
        # the window forward also writes the window's KV at its true positions (a hit's tokens lived
        # only in scratch until now)
        logits = self.runner.forward(window, positions, max_length - 1 + k)            # [B, K+1, V or N kept]
        if self.shape.num_branches == 0:
            empty = torch.zeros((window.shape[0], 0), dtype=torch.int64, device=window.device)
            no_tokens = torch.zeros((window.shape[0], 1, k), dtype=torch.int64, device=window.device)
            return SpeculationCache(self.fork.clone(), self.rank.clone(), empty, empty.bool(), no_tokens, None)
        attend_len = self.runner.attend_bucket(max_length + k)  # the window forward's (see ModelRunner.forward)
        if self.fork_graphs is not None and self.fork_graphs.has(window.shape[0], attend_len):
            guess = self.fork_graphs.replay(window.shape[0], attend_len)
        else:
            guess = fork_guesses(logits, window[:, 1:], self.fork, self.rank, max(self.shape.fanout_max) + 1,
                                 self.kept_ids)                                           # [B, N]
        valid = self.rank[None, :] < self.row_fanout(last_was_hit).gather(1, self.fork.expand_as(guess))
        horizon = self.runner.attend_bucket(max_length + 2 * k + 1)
        if self.graphs is not None and self.graphs.has(guess.shape[0], horizon):
            tokens, probs = self.graphs.replay(guess, lengths, sampling, horizon)
        else:
            tokens, probs = self.decode_branches(guess, lengths, sampling, max_length + 2 * k)
        return SpeculationCache(self.fork.clone(), self.rank.clone(), guess, valid, tokens, probs)

    def decode_branches(self, guess, lengths, sampling, max_position: int, probs_out: torch.Tensor | None = None):
        """K tree steps: depth m feeds each branch's latest token at position lengths + fork + m.
        Free of host syncs (captured as CUDA graphs per batch bucket and attention length). Sampled
        branches' distributions go to probs_out [B, N, K, V] (filtered: CompactProbs [B, N, K]) when
        given (a graph's static buffer)."""
        k, batch, n = self.shape.k, *guess.shape
        scratch_start = self.runner.max_len
        entry = scratch_start + torch.arange(n, device=guess.device) * k                # [N]
        prefix_limit = (lengths[:, None] - 1 + self.fork[None, :]).expand(batch, n)
        steps = self.runner.tree_round(prefix_limit, entry, k)
        current, tokens, probs = guess, [], []
        greedy = sampling is None or sampling.all_greedy
        counters = None if greedy else steps.positions + 1        # a drawn token's position: its stream
        for depth in range(k):
            tree = steps.context(depth, scratch_start, self.masks[depth])
            if greedy:   # the argmax straight from the head (a restricted one: over its kept tokens only)
                current = self.runner.tree_forward(current, steps, tree, prefix_limit, max_position, greedy=True)
            else:
                logits = self.runner.tree_forward(current, steps, tree, prefix_limit, max_position,
                                                  kept=self.samples_kept_columns())
                current, p = self.pick(logits, counters[depth], sampling, depth,
                                       probs_out[:, :, depth] if probs_out is not None else None)
                if probs_out is None:
                    probs.append(p)
            tokens.append(current)
        if greedy:
            return torch.stack(tokens, 2), None
        if probs_out is not None:
            return torch.stack(tokens, 2), probs_out
        return torch.stack(tokens, 2), CompactProbs.stack(probs, 2) if sampling.apply_filters else torch.stack(probs, 2)

    def samples_kept_columns(self) -> bool:
        """Sampled steps of a restricted head run on its kept tokens' logits: the filtered ones' candidate
        columns map to token ids, the Triton temperature kernel writes q at the kept tokens' columns and
        races by token id, the PyTorch distribution (C < 1, no Triton) is written at those columns —
        the tokens and q of the -inf-filled full rows every way."""
        return self.head_ids is not None

    def filtered_width(self) -> int:
        """Candidates a filtered step keeps per branch (CompactProbs' width)."""
        columns = self.runner.arch.vocab_size if self.head_ids is None else len(self.head_ids)
        return min(DRAFT_FILTER_CANDIDATES, columns)

    def pick(self, logits, counter, sampling, depth, out: torch.Tensor | None = None):
        """Next token of every branch: argmax, or a sample from the (Saguaro-rescaled) draft
        distribution, counter = the token's position (same stream a backup would use there); the
        distribution is written to out [B, N, V] when given. logits [B, N, V], or [B, N, kept] of a
        restricted head (samples_kept_columns)."""
        if sampling is None or sampling.all_greedy:
            return greedy_tokens(logits), None
        batch, n, columns = logits.shape
        vocab = self.runner.arch.vocab_size
        sequence = torch.arange(batch, device=logits.device).repeat_interleave(n)   # each branch's row
        if self.temperature_sample is not None and not sampling.apply_filters:
            token, q = self.temperature_sample(logits.reshape(batch * n, columns), sampling.temperature[sequence],
                                               sampling.seed[sequence], counter.reshape(-1), RandomStream.DRAFT,
                                               out.view(batch * n, vocab) if out is not None else None,
                                               ids=self.head_ids, vocab_size=vocab)
            return token.view(batch, n), q.view(batch, n, vocab)
        rows = sampling.select_rows(sequence)
        if sampling.apply_filters:
            token, ids, probs = self.compact_step(logits.reshape(batch * n, columns), rows, self.fanout_hit[depth],
                                                  self.c, self.shape.num_branches, counter.reshape(-1), self.head_ids)
            q = out.copy_(ids, probs) if out is not None else CompactProbs(ids, probs, vocab).view(batch, n)
            return token.view(batch, n), q
        # a branch is used only on a hit, where its token at depth m is the next window's d_{m+1}:
        # the cache will fork at that position with the hit list's F_m (a device tensor: an online
        # re-fit rewrites it in place, and captured graphs read the new value)
        q = self.distribution(logits.reshape(batch * n, columns), rows, self.fanout_hit[depth], self.c,
                              self.shape.num_branches, out, self.head_ids, vocab).view(batch * n, vocab)
        token = sample_from_weights(q, rows.seed, counter.reshape(-1), RandomStream.DRAFT)
        return token.view(batch, n), q.view(batch, n, vocab)


def load_temperature_sample():
    try:
        from ssd.engine.triton_temperature_sampling import temperature_sample
    except ImportError:  # no Triton: the compiled PyTorch path
        return None
    return temperature_sample


def compact_branch_step(logits: torch.Tensor, sampling: SamplingTensors, top_f: torch.Tensor, c: float, max_f: int,
                        counter: torch.Tensor, kept_ids: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A filtered tree step over rows of logits [R, V]: the draft's distribution among its
    DRAFT_FILTER_CANDIDATES largest logits (compact_probs_from_logits, Saguaro-rescaled on its top
    F — see pick) and the token drawn from it, the one sample_from_weights would draw from the
    dense rows: (tokens [R], ids [R, W], probs [R, W]). kept_ids [N]: logits [R, N] are a restricted
    head's kept tokens' (sorted ids, so ties keep the full rows' order, lower id first)."""
    ids, probs = compact_probs_from_logits(logits, sampling, DRAFT_FILTER_CANDIDATES)
    if kept_ids is not None:
        ids = kept_ids[ids]
    probs = saguaro_probs(probs, top_f, c, max_f)
    return sample_among(ids, probs, sampling.seed, counter, RandomStream.DRAFT), ids, probs


def branch_distribution(logits: torch.Tensor, sampling: SamplingTensors, top_f: torch.Tensor, c: float, max_f: int,
                        out: torch.Tensor | None, kept_ids: torch.Tensor | None = None,
                        vocab_size: int = 0) -> torch.Tensor:
    """draft_distribution of logits [B*N, V], written into out [B, N, V] when given (a slice of a
    graph's static probs buffer; compiled, the last pass stores there directly). kept_ids [N kept]:
    logits [B*N, N kept] are a restricted head's kept tokens' (sorted ids: the top F keep the full
    rows' order); q goes to those columns of vocab_size, 0 elsewhere (out is zero there: a restricted
    head's sampled steps write its kept columns only)."""
    q = draft_distribution(logits, sampling, top_f, c, max_f)
    if kept_ids is None:
        return q if out is None else out.copy_(q.view(out.shape))
    if out is None:
        return spread_columns(q, kept_ids, vocab_size)
    return out.index_copy_(-1, kept_ids, q.view(*out.shape[:-1], -1))


class BranchGraphs:
    """The branch decode (K tree steps + token choice) as CUDA graphs captured at start-up, per
    (batch bucket, attention length) and mode: greedy (argmax), or sampled with / without top-k/top-p
    filters (the sampling parameters are static inputs; the distributions land in static buffers
    per bucket: [bucket, N, K, V], or compact [bucket, N, K] rows with filters). Ghost rows decode
    into free slots' scratch."""

    MODES = ("greedy", "sampled", "filtered")

    def __init__(self, builder: TreeBuilder):
        self.builder = builder
        pool = builder.runner.graphs
        runner, shape = builder.runner, builder.shape
        # zeros: a restricted head's sampled steps write its kept tokens' columns only
        self.probs_out = {b: torch.zeros((b, shape.num_branches, shape.k, runner.arch.vocab_size),
                                         dtype=torch.float32, device=runner.device) for b in pool.buckets}
        width = builder.filtered_width()
        self.compact_out = {b: CompactProbs.empty((b, shape.num_branches, shape.k), width, runner.arch.vocab_size,
                                                  runner.device) for b in pool.buckets}
        self.sampling = {b: SamplingTensors.from_params([SamplingParams(temperature=1.0)] * b, runner.device, 0)
                         for b in pool.buckets}
        self.graphs: dict[tuple[str, int, int], tuple] = {}
        total = len(self.MODES) * len(pool.attend_lens) * len(pool.buckets)
        log.info("capturing %d tree graphs (new shapes' kernels timed first)", total)
        progress = ProgressLog(log, "tree graphs captured", total)
        for mode in self.MODES:
            for attend_len in reversed(pool.attend_lens):
                for bucket in reversed(pool.buckets):
                    self.graphs[mode, bucket, attend_len] = self.capture(mode, bucket, attend_len, pool)
                    progress.step(builder.runner.linear_summary)
        log.info("captured %d tree graphs (%s)%s", len(self.graphs), ", ".join(self.MODES),
                 builder.runner.linear_summary())

    def has(self, batch: int, attend_len: int) -> bool:
        bucket = self.builder.runner.graphs.bucket_for(batch)
        return bucket is not None and ("greedy", bucket, attend_len) in self.graphs

    def static_sampling(self, mode: str, bucket: int) -> SamplingTensors | None:
        if mode == "greedy":
            return None
        return dataclasses.replace(self.sampling[bucket], apply_filters=mode == "filtered", all_greedy=False)

    @torch.inference_mode()
    def capture(self, mode: str, bucket: int, attend_len: int, pool):
        device = self.builder.runner.device
        guess = torch.zeros((bucket, self.builder.shape.num_branches), dtype=torch.int64, device=device)
        lengths = torch.full((bucket,), 2, dtype=torch.int64, device=device)
        sampling = self.static_sampling(mode, bucket)
        probs_out = self.compact_out[bucket] if mode == "filtered" else self.probs_out[bucket]
        with self.builder.runner.measuring_shapes():
            for _ in range(2):
                self.builder.decode_branches(guess, lengths, sampling, attend_len - 1, probs_out)
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        with graph_capture(graph, pool=pool.pool):
            tokens, probs = self.builder.decode_branches(guess, lengths, sampling, attend_len - 1, probs_out)
        return graph, guess, lengths, tokens, probs

    def replay(self, guess: torch.Tensor, lengths: torch.Tensor, sampling: SamplingTensors | None,
               attend_len: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch = guess.shape[0]
        bucket = self.builder.runner.graphs.bucket_for(batch)
        mode = "greedy" if sampling is None or sampling.all_greedy else \
            "filtered" if sampling.apply_filters else "sampled"
        graph, static_guess, static_lengths, tokens, probs = self.graphs[mode, bucket, attend_len]
        static_guess[:batch].copy_(guess)
        static_lengths[:batch].copy_(lengths)
        if sampling is not None and mode != "greedy":
            static = self.sampling[bucket]
            for name in ("temperature", "top_k", "top_p", "seed"):
                getattr(static, name)[:batch].copy_(getattr(sampling, name))
        graph.replay()
        # the pool is shared: copy tokens out before another graph runs; the probs buffer is this
        # bucket's own and is only rewritten by the next build, after this cache was looked up
        return tokens[:batch].clone(), probs[:batch] if probs is not None else None


class ForkGraphs:
    """fork_guesses as CUDA graphs, one per window-forward graph (batch bucket, attention length),
    reading that graph's static logits and input buffers: eager, its ~35 small kernels cost ~0.3 ms
    of launches per round at B = 1 for ~0.08 ms of work. Captured with the widest top-k any
    re-fitted fan-out of the same budget can need (the kept tokens' order does not depend on it)."""

    def __init__(self, builder: TreeBuilder):
        self.builder, self.pool = builder, builder.runner.graphs
        columns = builder.runner.arch.vocab_size if builder.kept_ids is None else len(builder.kept_ids)
        self.width = min(builder.shape.num_branches + 1, columns)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        for (bucket, tokens, attend_len), window_graph in self.pool.graphs.items():
            if tokens == builder.shape.k + 1:
                self.graphs[bucket, attend_len] = self.capture(window_graph)

    def fork(self, window_graph) -> torch.Tensor:
        return fork_guesses(window_graph.logits, window_graph.input_ids[:, 1:], self.builder.fork,
                            self.builder.rank, self.width, self.builder.kept_ids)

    @torch.inference_mode()
    def capture(self, window_graph) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        for _ in range(2):
            self.fork(window_graph)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with graph_capture(graph, pool=self.pool.pool):
            guess = self.fork(window_graph)
        return graph, guess

    def has(self, batch: int, attend_len: int) -> bool:
        """True when the window forward of this batch replayed a captured graph."""
        return (self.pool.bucket_for(batch), attend_len) in self.graphs

    def replay(self, batch: int, attend_len: int) -> torch.Tensor:
        """The guesses [B, N] for the window forward graph just replayed (copied out of the shared pool)."""
        graph, guess = self.graphs[self.pool.bucket_for(batch), attend_len]
        graph.replay()
        return guess[:batch].clone()
