"""Commands from target rank 0 to a draft worker in its own process (torch.distributed p2p).

Every command is one int64 message of a fixed size (command_size: both sides know the batch
limit): a header, then the command's small per-row payload inline — one transfer and one
device-to-host read on the draft per round. Larger tensors (prompts, sampling parameters, a
fan-out list) follow as messages of their own, with shapes the header determines."""
from __future__ import annotations

from enum import IntEnum

import torch

HEADER_LEN = 6
PAYLOAD_ROWS = 5   # the widest inline payload: OUTCOME's [5, B]
REPLAY_FLAG = 2  # OUTCOME: the ranks row holds replayed acceptance-profile ranks
OUTCOME_ROWS = ("accepted", "recovered", "prev", "lengths", "ranks")


class DraftOp(IntEnum):
    PREFILL = 1       # header: B, T, first_slot      then ids [B,T], positions [B,T]
    SET_SAMPLING = 2  # header: B                      then temperature [B] f32, top_p [B] f32, top_k [B],
                      # seed [B], flags
    PROPOSE = 3       # header: B, max_length, want_probs; payload prev/last/lengths [3, B];
                      # reply tokens [B,K] (+probs [B,K,V])
    MOVE_SLOT = 4     # header: src, dst, length
    STOP = 5
    SPECULATE = 6     # async: like PROPOSE, then the draft builds the speculation cache for it
    OUTCOME = 7       # async, header: B, max_length, want_probs | REPLAY_FLAG; payload OUTCOME_ROWS [5, B]
                      # (ranks: replayed ranks, or -1); reply: one packed int64 message (pack_reply)
                      # (+probs [B,K,V] f32); then the draft builds the next cache
    SET_FANOUT = 8    # async, header: K+1   then the new fan-out list [K+1] (same branch budget)
    KEEP_ROWS = 9     # async, header: B'; payload the surviving rows [B'] (old indices, in their new order)
    JOIN = 10         # async, header: B, max_length, want_probs, J   the batch's last J rows are new (prefilled):
                      # payload last/lengths [2, B]; reply for the J rows as OUTCOME's; then the draft
                      # rebuilds the cache for all B rows (the J rows answered by n-gram: no drafting on
                      # the critical path)


def command_size(max_batch: int) -> int:
    return HEADER_LEN + PAYLOAD_ROWS * max_batch


def command_message(op: DraftOp, args: tuple[int, ...], rows=(), max_batch: int = 1) -> torch.Tensor:
    """The int64 host message: [op, *args, 0...] (HEADER_LEN), then the payload rows (each [B] int64,
    B <= max_batch; None: a row of -1; a [R, B] tensor is R rows) one after the other, then zeros."""
    rows = list(rows)
    batch = next((row.numel() for row in rows if row is not None), 0)
    if len(args) >= HEADER_LEN or len(rows) > PAYLOAD_ROWS or batch > max_batch:
        raise ValueError(f"{op.name}: {len(args)} header arguments / {len(rows)} payload rows of {batch} do not "
                         f"fit a command for {max_batch} sequences")
    message = torch.zeros(command_size(max_batch), dtype=torch.int64)
    values = message.numpy()   # written in place: numpy's slicing is ~3x cheaper than the tensor's here
    values[: 1 + len(args)] = (int(op), *args)
    for i, row in enumerate(rows):
        values[HEADER_LEN + i * batch: HEADER_LEN + (i + 1) * batch] = -1 if row is None else row.cpu().numpy()
    return message


def outcome_payload(accepted: torch.Tensor, recovered: torch.Tensor, prev: torch.Tensor, lengths: torch.Tensor,
                    replayed_ranks: torch.Tensor | None = None) -> torch.Tensor:
    """OUTCOME's payload [OUTCOME_ROWS, B] (ranks -1 without profile replay), on accepted's device."""
    ranks = replayed_ranks.to(accepted.device) if replayed_ranks is not None else torch.full_like(accepted, -1)
    return torch.stack([accepted, recovered, prev, lengths, ranks])


def command_payload(message: torch.Tensor, rows: int, batch: int) -> torch.Tensor:
    """The [rows, batch] payload of a received command (a view of the message)."""
    return message[HEADER_LEN: HEADER_LEN + rows * batch].view(rows, batch)


# build s, backup s (the host's drafting of misses: jit), idle s, the backup chosen for this round's
# misses (BACKUP_CODES; 0: none — the target counts it where a row missed)
REPLY_TIMINGS = 4
BACKUP_CODES = {"jit": 1, "fast": 2}


def reply_size(batch: int, k: int) -> int:
    return batch * (k + 2) + REPLY_TIMINGS


def pack_reply(tokens: torch.Tensor, hit: torch.Tensor, recovered: torch.Tensor, timings: torch.Tensor) -> torch.Tensor:
    """An asynchronous reply as one int64 message (one p2p transfer on the critical path instead of
    three): tokens [B, K], hit [B], recovered [B], then timings [REPLY_TIMINGS] float64 by bit pattern."""
    device = tokens.device
    return torch.cat([tokens.flatten(), hit.to(device, torch.int64), recovered.to(device, torch.int64),
                      timings.to(device, torch.float64).view(torch.int64)])


def unpack_reply(packed: torch.Tensor, batch: int, k: int):
    """pack_reply's message (on the device it was received on) -> tokens [B, K] there; hit [B] bool,
    recovered [B] int64, timings [REPLY_TIMINGS] float64 on the host (one device-to-host copy, which waits for
    every transfer received before it on the stream)."""
    host = packed.cpu()
    tokens = packed[: batch * k].view(batch, k)
    hit, recovered = host[batch * k: batch * (k + 1)].bool(), host[batch * (k + 1): batch * (k + 2)]
    return tokens, hit, recovered, host[batch * (k + 2):].view(torch.float64)
