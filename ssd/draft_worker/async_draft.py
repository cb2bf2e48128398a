"""Draft side of asynchronous speculation: answer an outcome from the speculation cache (hit) or the
backup (miss), then build the next cache while the target verifies what was just sent."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ssd.draft_worker.answer_buffer import AnswerBuffer
from ssd.draft_worker.proposer import DraftProposer, Proposal
from ssd.draft_worker.protocol import BACKUP_CODES, REPLY_TIMINGS
from ssd.draft_worker.backup_choice import BackupChooser
from ssd.draft_worker.outcome_lookup import answer_outcome_buffer
from ssd.draft_worker.tree import SpeculationCache, TreeBuilder
from ssd.spec.ngram import ngram_propose
from ssd.spec.verifier import one_hot_probs

BACKUPS = ("jit", "fast", "auto")


@dataclass
class AsyncReply:
    proposal: Proposal
    hit: torch.Tensor          # [B] bool (int64 0/1 in the draft's answer): the proposal came from the cache
    recovered: torch.Tensor    # [B] the outcome's last committed token (resolved by the draft on profile replay)
    # [REPLY_TIMINGS] float64: seconds of the last tree build, of the host's drafting of misses (jit), of
    # the draft's idling before the outcome; then the backup chosen for misses (protocol.BACKUP_CODES, 0: none)
    timings: torch.Tensor
    packed: torch.Tensor | None = None   # the draft's reply already packed (pack_reply's layout), sent as is

    def extend(self, joined: "AsyncReply") -> "AsyncReply":
        """These rows, then those of `joined` (sequences that joined the batch). Where only one side
        carries probabilities (sampled rows joining greedy ones, or greedy rows joining rows drafted
        with probabilities for a sampled row since finished), the other was drafted greedily: one-hot."""
        proposals = (self.proposal, joined.proposal)
        vocab = next((p.probs.shape[-1] for p in proposals if p.probs is not None), None)
        probs = None if vocab is None else torch.cat(
            [p.probs if p.probs is not None else one_hot_probs(p.tokens, vocab) for p in proposals])
        proposal = Proposal(torch.cat([self.proposal.tokens, joined.proposal.tokens]), probs)
        return AsyncReply(proposal, torch.cat([self.hit, joined.hit]), torch.cat([self.recovered, joined.recovered]),
                          self.timings)

    def select_rows(self, rows: list[int]) -> "AsyncReply":
        index = torch.tensor(rows, device=self.hit.device)
        probs = self.proposal.probs
        proposal = Proposal(self.proposal.tokens[index], probs[index] if probs is not None else None)
        return AsyncReply(proposal, self.hit[index], self.recovered[index], self.timings)


@dataclass
class UnobservedReply:
    """An outcome answered but not yet folded into the chooser (observe_reply)."""
    answer: AnswerBuffer
    backup: str
    hit_host: torch.Tensor | None   # [B] bool, where read already (jit)
    wait_s: float                   # the host's drafting of misses
    from_ngram: torch.Tensor        # [B] bool, host: rows of the verified window that the n-gram proposed


class TokenHistory:
    """Committed tokens per slot, kept by the draft itself for the n-gram (`fast`) backup."""

    def __init__(self, num_slots: int, max_len: int, device: torch.device):
        self.tokens = torch.zeros((num_slots, max_len), dtype=torch.int64, device=device)

    def write_prompts(self, ids: torch.Tensor, first_slot: int) -> None:
        self.tokens[first_slot:first_slot + ids.shape[0], : ids.shape[1]] = ids.to(self.tokens.device)

    def move_slot(self, src: int, dst: int) -> None:
        self.tokens[dst] = self.tokens[src]


class AsyncDraft:
    def __init__(self, proposer: DraftProposer, tree: TreeBuilder, backup: str):
        if backup not in BACKUPS:
            raise ValueError(f"backup must be one of {BACKUPS}, got {backup!r}")
        self.proposer, self.tree, self.backup = proposer, tree, backup
        runner = proposer.runner
        self.history = TokenHistory(runner.cfg.num_slots, runner.max_len, runner.device)
        self.cache: SpeculationCache | None = None
        self.window: torch.Tensor | None = None   # [B, K+1] the speculation the target is verifying
        self.lengths: torch.Tensor | None = None
        self.build_s, self.built_at = 0.0, time.perf_counter()
        self.chooser = BackupChooser(proposer.k)
        self.from_ngram: torch.Tensor | None = None   # [B] bool, host: the window in flight's row is an n-gram's
        self.unobserved: UnobservedReply | None = None   # the last outcome, for observe_reply (in build_cache)

    def prefill(self, ids: torch.Tensor, positions: torch.Tensor, first_slot: int) -> None:
        self.proposer.prefill(ids, positions, first_slot)
        self.history.write_prompts(ids, first_slot)

    def move_slot(self, src: int, dst: int, length: int) -> None:
        """length: the committed tokens. The speculation in flight (kept by keep_rows) had its window's
        K+1 entries written past them by the last cache build: they move too."""
        self.proposer.move_slot(src, dst, min(length + self.proposer.k + 1, self.proposer.runner.max_len))
        self.history.move_slot(src, dst)

    def speculate(self, prev, last, lengths, max_length: int, want_probs: bool) -> AsyncReply:
        """Fresh speculation for a new batch: every row from the backup's neural path."""
        proposal = self.proposer.propose(prev, last, lengths, max_length, want_probs)
        hit = torch.zeros(prev.shape[0], dtype=torch.bool, device=proposal.tokens.device)
        self.remember(last, proposal, lengths, hit)
        return AsyncReply(proposal, hit, last, torch.zeros(REPLY_TIMINGS, dtype=torch.float64))

    def join(self, last, lengths, want_probs: bool, joined: int) -> AsyncReply:
        """The batch grew: its last `joined` rows are new (prefilled, no speculation yet) while the
        others' speculation is in flight. The new rows get the near-free n-gram proposal from their
        own prompts (verified with its one-hot distribution: exact), so the round waits for no
        drafting and the rows in flight keep their speculation; the window in flight grows (the
        cache rebuilt next covers every row)."""
        batch = lengths.shape[0]
        new = slice(batch - joined, batch)
        rows = torch.arange(batch - joined, batch, device=lengths.device)
        self.history.tokens[rows, lengths[new] - 1] = last[new]
        fresh = self.ngram_proposal(self.history.tokens[new], lengths[new], want_probs)
        hit = torch.zeros(joined, dtype=torch.bool, device=lengths.device)
        self.window = torch.cat([self.window, torch.cat([last[new, None], fresh.tokens], 1)])
        self.lengths = torch.cat([self.lengths, lengths[new]])
        self.last_hit = torch.cat([self.last_hit, hit])
        self.from_ngram = torch.cat([self.from_ngram, torch.ones(joined, dtype=torch.bool)])
        return AsyncReply(fresh, hit, last[new], torch.zeros(REPLY_TIMINGS, dtype=torch.float64))

    @torch.inference_mode()
    def outcome(self, outcome: torch.Tensor, max_length: int, want_probs: bool, replay: bool = False) -> AsyncReply:
        """outcome [OUTCOME_ROWS, B] (protocol): accepted/recovered, the verified outcome of the window in
        flight; prev, the token before recovered; lengths, the new committed lengths (recovered is the
        last committed token); ranks, on profile replay (`replay`), the draft rank of the token that
        follows the accepted ones — the cache's guess of that rank replaces `recovered` where the
        fan-out holds it. The answer is one kernel writing the reply in place (AnswerBuffer); only the
        `jit` backup reads `hit` back before the reply leaves (to draft the misses); the bookkeeping
        that needs it on the host waits for build_cache, after the reply was sent."""
        idle_s = time.perf_counter() - self.built_at
        self.chooser.observe_round(self.build_s, idle_s)
        backup = self.choose_backup(outcome.shape[1])
        answer = self.answer(outcome, replay, ngram=backup == "fast",
                             timings=(self.build_s, idle_s, BACKUP_CODES[backup]))
        probs = self.cache.branch_probs(answer.branch) if want_probs else None
        hit_host, wait_s = None, 0.0
        if backup == "jit":
            start = time.perf_counter()
            hit_host = answer.hit.cpu().bool()
            if not bool(hit_host.all()):
                probs = self.draft_misses(answer, outcome[2], hit_host, max_length, want_probs, probs)
                wait_s = time.perf_counter() - start
                answer.timings[1] = wait_s
        elif want_probs:
            probs = self.one_hot_misses(answer, probs)
        self.unobserved = UnobservedReply(answer, backup, hit_host, wait_s, self.from_ngram)
        self.window, self.lengths = answer.window, answer.lengths
        return AsyncReply(Proposal(answer.tokens, probs), answer.hit, answer.recovered, answer.timings,
                          packed=answer.message)

    def draft_misses(self, answer: AnswerBuffer, prev, hit_host, max_length: int, want_probs: bool, probs):
        """`jit`: K draft steps from the real outcome for every row, kept where the cache missed (in the
        answer's proposal and next window). Returns the reply's distributions."""
        drafted = self.proposer.propose(prev, answer.recovered, answer.lengths, max_length, want_probs)
        hit = hit_host.to(answer.data.device)
        answer.tokens.copy_(torch.where(hit[:, None], answer.tokens, drafted.tokens))
        answer.window[:, 1:].copy_(answer.tokens)
        if not want_probs:
            return None
        return drafted.probs if probs is None else torch.where(hit[:, None, None], probs, drafted.probs)

    def one_hot_misses(self, answer: AnswerBuffer, probs: torch.Tensor | None) -> torch.Tensor:
        """`fast`: the n-gram's proposals (the rows that missed) are verified with their one-hot
        distribution; probs [B, K, V] (the cached branches', a fresh tensor) is rewritten in place on
        the device — which rows missed is not known on the host yet."""
        if probs is None:
            return one_hot_probs(answer.tokens, self.proposer.runner.arch.vocab_size)
        missed = (answer.hit == 0).to(probs.dtype)[:, None, None].expand(-1, answer.k, 1)
        probs.mul_(answer.hit[:, None, None])
        return probs.scatter_add_(2, answer.tokens[..., None], missed)

    def answer(self, outcome: torch.Tensor, replay: bool, ngram: bool, timings) -> AnswerBuffer:
        """answer_outcome on this draft's history, window in flight and cache, into an AnswerBuffer: one
        Triton kernel on the GPU (with at least one branch), the PyTorch ops elsewhere."""
        cache = self.cache
        args = (self.history.tokens, self.window, self.lengths, outcome, cache.valid, cache.fork, cache.rank,
                cache.guess, cache.tokens, replay, ngram, timings)
        if self.history.tokens.is_cuda and cache.guess.shape[1] > 0:
            from ssd.draft_worker.triton_outcome import answer_outcome_kernel   # triton: with CUDA only
            return answer_outcome_kernel(*args)
        return answer_outcome_buffer(*args)

    def observe_reply(self, seen: UnobservedReply, hit_host: torch.Tensor, accepted: list[int]) -> None:
        """The last outcome's bookkeeping, after its reply left: the chooser's lookups, waits and
        proposals, and which rows of the new window the n-gram proposed."""
        self.chooser.observe_lookups(int(hit_host.sum()), hit_host.numel())
        if not bool(hit_host.all()):
            self.chooser.observe_wait(seen.backup, seen.wait_s)
        self.chooser.observe_proposals(accepted, seen.from_ngram.tolist())
        self.from_ngram = ~hit_host if seen.backup == "fast" else torch.zeros_like(hit_host)

    def keep_rows(self, rows: torch.Tensor) -> None:
        """The target retired sequences and compacted its batch (KV slots moved by move_slot): keep
        the speculation in flight and its cache for the surviving rows, in their new order."""
        rows = rows.to(self.window.device)
        self.window, self.lengths, self.last_hit = self.window[rows], self.lengths[rows], self.last_hit[rows]
        self.from_ngram = self.from_ngram[rows.cpu()]
        if self.cache is not None:
            self.cache = self.cache.select_rows(rows)

    def remember(self, last, proposal: Proposal, lengths, hit) -> None:
        """A fresh (neural) speculation for the whole batch is in flight (an outcome of an earlier
        batch not yet observed is dropped)."""
        self.unobserved = None
        self.window = torch.cat([last[:, None], proposal.tokens], 1)
        self.lengths, self.last_hit = lengths, hit
        self.from_ngram = torch.zeros(hit.shape[0], dtype=torch.bool)

    def build_cache(self, max_length: int) -> None:
        """Runs after the reply went out: overlaps the target's verification of self.window."""
        start = time.perf_counter()
        seen, self.unobserved = self.unobserved, None
        if seen is not None:   # the rows the cache answered: the tree's fan-out (hit / miss lists) and the chooser
            self.last_hit = seen.answer.hit != 0
            hit_copy = seen.hit_host if seen.hit_host is not None else seen.answer.hit.to("cpu", non_blocking=True)
            accepted_copy = seen.answer.accepted.to("cpu", non_blocking=True)
        self.cache = self.tree.build(self.window, self.lengths, self.last_hit, self.proposer.sampling, max_length)
        device = self.proposer.runner.device
        if device.type == "cuda":  # the draft idles until the outcome anyway: make the build time GPU time
            torch.cuda.synchronize(device)
        if seen is not None:   # read back behind the build, not before it
            self.observe_reply(seen, hit_copy.bool(), accepted_copy.tolist())
        self.built_at = time.perf_counter()
        self.build_s = self.built_at - start

    def ngram_proposal(self, history: torch.Tensor, lengths: torch.Tensor, want_probs: bool) -> Proposal:
        """The near-free proposal: K tokens by n-gram lookup in each row's history [R, L], with the
        one-hot distribution they were drawn from (exact to verify)."""
        tokens = ngram_propose(history, lengths, self.proposer.k)
        vocab = self.proposer.runner.arch.vocab_size
        return Proposal(tokens, one_hot_probs(tokens, vocab) if want_probs else None)

    def choose_backup(self, batch: int) -> str:
        """`auto`: the backup with more expected tokens per second (ssd.draft_worker.backup_choice)."""
        return self.backup if self.backup != "auto" else self.chooser.choose(batch)
