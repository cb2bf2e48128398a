"""Commands from target rank 0 to a draft worker in its own process (torch.distributed p2p).

Every command starts with a fixed-size int64 header; the tensors that follow have shapes the
header determines, so both sides allocate them without further negotiation."""
from __future__ import annotations

from enum import IntEnum

import torch

HEADER_LEN = 6
REPLAY_FLAG = 2  # OUTCOME: the ranks row holds replayed acceptance-profile ranks


class DraftOp(IntEnum):
    PREFILL = 1       # header: B, T, first_slot      then ids [B,T], positions [B,T]
    SET_SAMPLING = 2  # header: B                      then temperature [B] f32, top_p [B] f32, top_k [B], seed [B], flags
    PROPOSE = 3       # header: B, max_length, want_probs   then prev/last/lengths [3, B]; reply tokens [B,K] (+probs [B,K,V])
    MOVE_SLOT = 4     # header: src, dst, length
    STOP = 5
    SPECULATE = 6     # async: like PROPOSE, then the draft builds the speculation cache for it
    OUTCOME = 7       # async, header: B, max_length, want_probs | REPLAY_FLAG   then accepted/recovered/prev/
                      # lengths/replayed ranks [5, B]; reply: one packed int64 message (pack_reply)
                      # (+probs [B,K,V] f32); then the draft builds the next cache
    SET_FANOUT = 8    # async, header: K+1   then the new fan-out list [K+1] (same branch budget)
    KEEP_ROWS = 9     # async, header: B'    then the surviving rows [B'] (old indices, in their new order)
    JOIN = 10         # async, header: B, max_length, want_probs, J   the batch's last J rows are new (prefilled):
                      # then last/lengths [2, B]; reply for the J rows as OUTCOME's; then the draft
                      # rebuilds the cache for all B rows (the J rows answered by n-gram: no drafting on the critical path)


REPLY_TIMINGS = 4   # build s, backup s, idle s, the backup that answered misses (BACKUP_CODES; 0: none)
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
