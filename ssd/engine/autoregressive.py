"""Autoregressive decoding with continuous batching: admit (prefill) → decode step → retire."""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch

from ssd.engine.model_runner import ModelRunner
from ssd.engine.prefill_groups import prefill_groups
from ssd.engine.sampler import SamplingTensors, sample
from ssd.engine.sequence import Sequence
from ssd.engine.stats import GenerationStats


def pad_prompts(seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded prompt batch: ids [n, T], positions [n, T], index of each last prompt token [n]."""
    width = max(len(s.prompt_token_ids) for s in seqs)
    ids = torch.zeros((len(seqs), width), dtype=torch.int64)
    for row, s in enumerate(seqs):
        ids[row, : len(s.prompt_token_ids)] = torch.tensor(s.prompt_token_ids)
    positions = torch.arange(width).expand(len(seqs), width).contiguous()
    last = torch.tensor([len(s.prompt_token_ids) - 1 for s in seqs])
    return ids, positions, last


@dataclass
class InflightStep:
    """Sampled tokens [B] of a launched step, copied to the host asynchronously."""
    host: torch.Tensor
    done: torch.cuda.Event | None

    @classmethod
    def start(cls, tokens: torch.Tensor) -> "InflightStep":
        if tokens.device.type != "cuda":
            return cls(tokens, None)
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return cls(host, done)

    def wait(self) -> list[int]:
        if self.done is not None:
            self.done.synchronize()
        return self.host.tolist()


class AutoregressiveDecoder:
    def __init__(self, runner: ModelRunner, stats: GenerationStats, engine_seed: int,
                 on_finish: Callable[[Sequence], None] = lambda s: None):
        self.runner, self.stats, self.engine_seed = runner, stats, engine_seed
        self.on_finish = on_finish
        self.sampling: SamplingTensors | None = None
        self.next_ids: torch.Tensor | None = None    # [B, 1] device-resident decode inputs,
        self.positions: torch.Tensor | None = None   # [B, 1] valid while the batch is unchanged
        self.inflight: InflightStep | None = None    # a launched step whose tokens are not appended yet

    def run(self, seqs: list[Sequence]) -> None:
        waiting, running = deque(seqs), []
        while waiting or running:
            self.step(waiting, running)

    def step(self, waiting: deque[Sequence], running: list[Sequence]) -> None:
        """One round of continuous batching: admit → decode step → retire."""
        self.admit(waiting, running)
        if any(not s.finished for s in running):  # prefill's token may finish them all (max_tokens = 1, EOS)
            self.decode_step(running)
        self.retire(running)

    def admit(self, waiting: deque[Sequence], running: list[Sequence]) -> None:
        fresh = []
        if waiting and len(running) < self.runner.cfg.num_slots:
            self.flush(running)
        while waiting and len(running) + len(fresh) < self.runner.cfg.num_slots:
            fresh.append(waiting.popleft())
        if not fresh:
            return
        start = time.perf_counter()
        self.prefill(fresh, first_slot=len(running))
        running.extend(fresh)
        self.stats.prefill_time_s += time.perf_counter() - start
        self.stats.prefill_tokens += sum(len(s.prompt_token_ids) for s in fresh)

    def prefill(self, fresh: list[Sequence], first_slot: int) -> None:
        logits = torch.cat([self.prefill_padded(*pad_prompts(group), first_slot + offset)
                            for offset, group in prefill_groups(fresh, self.runner.cfg.max_prefill_tokens)])
        self.append_sampled(fresh, logits, self.build_sampling(fresh, logits.device))
        self.sampling = None  # the running batch changes

    def prefill_padded(self, ids: torch.Tensor, positions: torch.Tensor, last: torch.Tensor,
                       first_slot: int) -> torch.Tensor:
        """One group of right-padded prompts (pad_prompts) -> the logits [n, V] at each one's last token."""
        return self.runner.prefill(ids, positions, last, first_slot)

    def decode_step(self, running: list[Sequence]) -> None:
        """One token per sequence, one step ahead: step t+1 is launched (its input is step t's token,
        still on the device) before the host waits for step t's tokens, so the GPU never idles while
        the host appends tokens and checks stop conditions. A finish flushes the step in flight."""
        start = time.perf_counter()
        sampling = self.sampling_for(running, self.runner.device)
        if self.next_ids is None:  # batch changed: rebuild the device-resident inputs once
            self.next_ids = torch.tensor([[s.last_token] for s in running], device=self.runner.device)
            self.positions = torch.tensor([[s.num_tokens - 1] for s in running], device=self.runner.device)
        newest = max(s.num_tokens for s in running) - 1
        if self.inflight is None:
            self.inflight = self.launch(sampling, newest)
        # the step after next cannot start before these tokens are appended, so launch at most one ahead,
        # and none when a sequence is about to reach max_tokens
        ahead = None if any(len(s.output_ids) + 1 >= s.params.max_tokens for s in running) \
            else self.launch(sampling, newest + 1)
        self.append_inflight(running)
        self.inflight = ahead
        if ahead is not None and any(s.finished for s in running):
            self.flush(running)
        self.stats.decode_time_s += time.perf_counter() - start

    def launch(self, sampling: SamplingTensors, max_position: int) -> "InflightStep":
        logits = self.runner.forward(self.next_ids, self.positions, max_position)[:, -1]
        tokens = sample(logits, sampling, self.positions[:, 0] + 1)
        self.next_ids, self.positions = tokens[:, None], self.positions + 1
        self.stats.num_rounds += 1
        return InflightStep.start(tokens)

    def append_inflight(self, running: list[Sequence]) -> None:
        tokens = self.inflight.wait()
        self.stats.decode_tokens += sum(s.append([t]) for s, t in zip(running, tokens))
        self.inflight = None

    def flush(self, running: list[Sequence]) -> None:
        """Append the step in flight (finished sequences ignore theirs) before the batch changes."""
        if self.inflight is not None:
            self.append_inflight(running)

    def append_sampled(self, seqs: list[Sequence], logits: torch.Tensor, sampling: SamplingTensors) -> int:
        """Sample one token per row of logits [n, V] (n = len(seqs)) and append it."""
        counter = torch.tensor([s.num_tokens for s in seqs], device=logits.device)
        tokens = sample(logits, sampling, counter).tolist()
        return sum(s.append([t]) for s, t in zip(seqs, tokens))

    def sampling_for(self, seqs: list[Sequence], device: torch.device) -> SamplingTensors:
        """Cached while the running batch is unchanged (admit/retire reset it)."""
        if self.sampling is None or self.sampling.batch_size != len(seqs):
            self.sampling = self.build_sampling(seqs, device)
            self.next_ids = None
        return self.sampling

    def build_sampling(self, seqs: list[Sequence], device: torch.device) -> SamplingTensors:
        return SamplingTensors.from_params([s.params for s in seqs], device, self.engine_seed,
                                           request_ids=[s.index for s in seqs])

    def retire(self, running: list[Sequence]) -> None:
        """Drop finished sequences, moving the last running sequence's KV into the freed slot."""
        if any(s.finished for s in running):
            self.flush(running)  # e.g. a request aborted from outside while a step was in flight
        i = 0
        while i < len(running):
            if not running[i].finished:
                i += 1
                continue
            self.on_finish(running[i])
            last = running.pop()
            if i < len(running):
                self.move_slot(len(running), i, last.num_tokens)
                running[i] = last
            self.sampling = None

    def move_slot(self, src: int, dst: int, length: int) -> None:
        self.runner.move_slot(src, dst, length)
