"""Entry point of a draft worker process: build the draft model, then follow target rank 0's commands."""
from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.distributed as dist

from ssd.distributed.tp_group import TPGroup
from ssd.draft_worker.async_draft import AsyncDraft, AsyncReply
from ssd.draft_worker.proposer import DraftProposer
from ssd.draft_worker.tree import TreeBuilder
from ssd.spec.spec_config import AsyncSpecConfig
from ssd.draft_worker.protocol import (HEADER_LEN, OUTCOME_ROWS, REPLAY_FLAG, DraftOp, command_payload, command_size,
                                      pack_reply)
from ssd.engine.kv_cache import check_draft_fits
from ssd.engine.model_runner import ModelRunner
from ssd.engine.runner_config import RunnerConfig
from ssd.engine.sampler import SamplingTensors

log = logging.getLogger(__name__)

TARGET_RANK0 = 0


class DraftServer:
    def __init__(self, proposer: DraftProposer, async_draft: AsyncDraft | None = None,
                 link: dist.ProcessGroup | None = None):
        """link: the group commands arrive on (TPGroup.draft_link; None: the default group)."""
        self.proposer, self.async_draft, self.link = proposer, async_draft, link
        self.state = async_draft or proposer  # owner of prefill / move_slot
        self.device = proposer.runner.device
        self.message = torch.zeros(command_size(proposer.runner.cfg.num_slots), dtype=torch.int64, device=self.device)

    def recv(self, shape, dtype=torch.int64) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype, device=self.device)
        dist.recv(t, TARGET_RANK0)
        return t

    def payload(self, rows: int, batch: int) -> torch.Tensor:
        """The command's inline [rows, batch] payload: a view of the message buffer, which the next
        command overwrites (what outlives this command is cloned)."""
        return command_payload(self.message, rows, batch)

    @torch.inference_mode()
    def serve(self) -> None:
        while True:
            dist.recv(self.message, TARGET_RANK0, group=self.link)
            op, a, b, c, d, _ = self.message[:HEADER_LEN].tolist()
            if op == DraftOp.STOP:
                return
            self.handle(DraftOp(op), a, b, c, d)

    def handle(self, op: DraftOp, a: int, b: int, c: int, d: int = 0) -> None:
        if op == DraftOp.PREFILL:
            self.state.prefill(self.recv((a, b)), self.recv((a, b)), c)
        elif op == DraftOp.SET_SAMPLING:
            temperature, top_p = self.recv(a, torch.float32), self.recv(a, torch.float32)
            top_k, seed = self.recv(a), self.recv(a)
            self.proposer.set_sampling(SamplingTensors(temperature, top_k, top_p, seed, bool(b & 1), bool(b & 2)))
        elif op == DraftOp.MOVE_SLOT:
            self.state.move_slot(a, b, c)
        elif op == DraftOp.PROPOSE:
            prev, last, lengths = self.payload(3, a)
            proposal = self.proposer.propose(prev, last, lengths, b, bool(c))
            self.send_proposal(proposal)
        elif op == DraftOp.SPECULATE:
            prev, last, lengths = self.payload(3, a).clone()
            self.send_reply(self.async_draft.speculate(prev, last, lengths, b, bool(c)))
            self.async_draft.build_cache(b)
        elif op == DraftOp.SET_FANOUT:
            fanout = tuple(self.recv(a).tolist())
            self.async_draft.tree.set_fanout(fanout)
            self.proposer.saguaro_fanout = fanout
        elif op == DraftOp.JOIN:
            last, lengths = self.payload(2, a).clone()
            self.send_reply(self.async_draft.join(last, lengths, bool(c), d))
            self.async_draft.build_cache(b)
        elif op == DraftOp.KEEP_ROWS:
            self.async_draft.keep_rows(self.payload(1, a)[0])
        elif op == DraftOp.OUTCOME:
            outcome = self.payload(len(OUTCOME_ROWS), a)
            self.send_reply(self.async_draft.outcome(outcome, b, bool(c & 1), bool(c & REPLAY_FLAG)))
            self.async_draft.build_cache(b)

    def send_proposal(self, proposal) -> None:
        dist.send(proposal.tokens.contiguous(), TARGET_RANK0)
        if proposal.probs is not None:
            dist.send(proposal.probs.contiguous(), TARGET_RANK0)

    def send_reply(self, reply: AsyncReply) -> None:
        proposal = reply.proposal
        packed = reply.packed if reply.packed is not None else \
            pack_reply(proposal.tokens, reply.hit, reply.recovered, reply.timings)
        dist.send(packed, TARGET_RANK0)
        if proposal.probs is not None:
            dist.send(proposal.probs.contiguous(), TARGET_RANK0)


def serve_draft(tp: TPGroup, cfg: RunnerConfig, k: int, async_spec: AsyncSpecConfig | None = None,
                on_ready: Callable[[], None] | None = None) -> None:
    """`tp` is the draft's own (single-rank) group; the world group carries the p2p traffic."""
    runner = ModelRunner(cfg, tp)
    check_draft_fits(runner.max_len, cfg.max_len)  # the target's own cache may be smaller, never larger
    if async_spec is None:
        proposer, async_draft = DraftProposer(runner, k), None
    else:
        proposer = DraftProposer(runner, k, async_spec.saguaro_c, async_spec.shape.fanout_miss)
        async_draft = AsyncDraft(proposer, TreeBuilder(runner, async_spec.shape, async_spec.saguaro_c),
                                 async_spec.backup)
    log.info("draft worker ready on %s%s", runner.device, " (async speculation)" if async_draft else "")
    if on_ready:
        on_ready()
    DraftServer(proposer, async_draft, tp.draft_link).serve()
    log.info("draft worker stopping")
