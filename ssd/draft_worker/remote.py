"""Target rank 0's handle on a draft worker process: the DraftProposer interface, over p2p."""
from __future__ import annotations

import torch
import torch.distributed as dist

from ssd.draft_worker.async_draft import AsyncReply
from ssd.draft_worker.proposer import Proposal
from ssd.draft_worker.protocol import REPLAY_FLAG, DraftOp, command_message, reply_size, unpack_reply
from ssd.engine.sampler import SamplingTensors


class RemoteDraft:
    def __init__(self, draft_rank: int, device: torch.device, k: int, vocab_size: int, max_batch: int,
                 link: dist.ProcessGroup | None = None):
        """link: the group the draft waits on for commands (TPGroup.draft_link; None: the default)."""
        self.rank, self.device, self.k, self.vocab_size = draft_rank, device, k, vocab_size
        self.max_batch = max_batch   # the draft's slots: every command message is sized for it
        self.link = link

    def _command(self, op: DraftOp, *args: int, rows=()) -> None:
        """One message: the header, then the payload rows ([B] each, on the host) inline."""
        dist.send(command_message(op, args, rows, self.max_batch).to(self.device), self.rank, group=self.link)

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
        self._command(DraftOp.PROPOSE, prev.shape[0], max_length, int(want_probs),
                      rows=(prev, last, lengths))
        return self._recv_proposal(prev.shape[0], want_probs)

    def speculate(self, prev, last, lengths, max_length: int, want_probs: bool) -> AsyncReply:
        self._command(DraftOp.SPECULATE, prev.shape[0], max_length, int(want_probs),
                      rows=(prev, last, lengths))
        return self._recv_reply(prev.shape[0], want_probs)

    def set_fanout(self, fanout: tuple[int, ...]) -> None:
        self._command(DraftOp.SET_FANOUT, len(fanout))
        self._send(torch.tensor(fanout, dtype=torch.int64))

    def outcome(self, accepted, recovered, prev, lengths, max_length: int, want_probs: bool,
                replayed_ranks: torch.Tensor | None = None) -> AsyncReply:
        replay = replayed_ranks is not None
        self._command(DraftOp.OUTCOME, prev.shape[0], max_length, int(want_probs) | REPLAY_FLAG * replay,
                      rows=(accepted, recovered, prev, lengths, replayed_ranks))
        return self._recv_reply(prev.shape[0], want_probs)

    def join(self, last, lengths, max_length: int, want_probs: bool, joined: int) -> AsyncReply:
        self._command(DraftOp.JOIN, last.shape[0], max_length, int(want_probs), joined,
                      rows=(last, lengths))
        return self._recv_reply(joined, want_probs)

    def keep_rows(self, rows: torch.Tensor) -> None:
        self._command(DraftOp.KEEP_ROWS, rows.shape[0], rows=(rows,))

    def _recv(self, shape, dtype=torch.int64) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype, device=self.device)
        dist.recv(t, self.rank)
        return t

    def _recv_proposal(self, batch: int, want_probs: bool) -> Proposal:
        tokens = self._recv((batch, self.k))
        probs = self._recv((batch, self.k, self.vocab_size), torch.float32) if want_probs else None
        if self.device.type == "cuda":  # NCCL recv only enqueues: wait, so the draft's time is the draft's
            torch.cuda.current_stream(self.device).synchronize()
        return Proposal(tokens, probs)

    def _recv_reply(self, batch: int, want_probs: bool) -> AsyncReply:
        packed = self._recv(reply_size(batch, self.k))
        probs = self._recv((batch, self.k, self.vocab_size), torch.float32) if want_probs else None
        tokens, hit, recovered, timings = unpack_reply(packed, batch, self.k)   # waits for both transfers
        return AsyncReply(Proposal(tokens, probs), hit, recovered, timings)
