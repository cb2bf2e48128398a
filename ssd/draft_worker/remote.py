"""Target rank 0's handle on a draft worker process: the DraftProposer interface, over p2p."""
from __future__ import annotations

import torch
import torch.distributed as dist

from ssd.draft_worker.proposer import Proposal
from ssd.draft_worker.protocol import HEADER_LEN, DraftOp
from ssd.engine.sampler import SamplingTensors


class RemoteDraft:
    def __init__(self, draft_rank: int, device: torch.device, k: int, vocab_size: int):
        self.rank, self.device, self.k, self.vocab_size = draft_rank, device, k, vocab_size

    def _command(self, op: DraftOp, *args: int) -> None:
        header = torch.tensor([op, *args] + [0] * (HEADER_LEN - 1 - len(args)), dtype=torch.int64)
        dist.send(header.to(self.device), self.rank)

    def _send(self, *tensors: torch.Tensor) -> None:
        for t in tensors:
            dist.send(t.to(self.device).contiguous(), self.rank)

    def prefill(self, ids: torch.Tensor, positions: torch.Tensor, first_slot: int) -> None:
        self._command(DraftOp.PREFILL, *ids.shape, first_slot)
        self._send(ids, positions)

    def set_sampling(self, st: SamplingTensors) -> None:
        self._command(DraftOp.SET_SAMPLING, st.batch_size, int(st.apply_filters) | 2 * int(st.all_greedy))
        self._send(st.temperature, st.top_p, st.top_k, st.seed)

    def move_slot(self, src: int, dst: int, length: int) -> None:
        self._command(DraftOp.MOVE_SLOT, src, dst, length)

    def stop(self) -> None:
        self._command(DraftOp.STOP)

    def propose(self, prev, last, lengths, max_length: int, want_probs: bool) -> Proposal:
        batch = prev.shape[0]
        self._command(DraftOp.PROPOSE, batch, max_length, int(want_probs))
        self._send(torch.stack([prev, last, lengths]))
        tokens = torch.empty((batch, self.k), dtype=torch.int64, device=self.device)
        dist.recv(tokens, self.rank)
        probs = None
        if want_probs:
            probs = torch.empty((batch, self.k, self.vocab_size), dtype=torch.float32, device=self.device)
            dist.recv(probs, self.rank)
        return Proposal(tokens, probs)
