"""The engine process behind the coordinator: target rank 0 running continuous batching on requests
that arrive over a socket.

Each loop: take the coordinator's messages (without waiting while sequences run) → one round
exactly as the decoders' run() does (admit → decode step → retire) → one message with the tokens
every request gained. The engine enforces EOS and max_tokens; the coordinator decides admission."""
from __future__ import annotations

import logging
import math
import os
import signal
import time
from collections import deque
from dataclasses import dataclass

import torch
import zmq

from ssd.coordinator.endpoints import configure
from ssd.coordinator.messages import (Abort, AddRequest, EngineFailed, EngineReady, RequestRejected,
                                      RoundDeltas, Shutdown, TokenDelta, decode, encode)
from ssd.coordinator.processes import Throttle, exit_now
from ssd.distributed.orphan_watch import parent_alive
from ssd.engine.llm import LLM, WorkerDiedError
from ssd.engine.sequence import Sequence
from ssd.sampling_params import SamplingParams

log = logging.getLogger(__name__)

IDLE_POLL_MS = 200
PARENT_CHECK_S = 0.5
BURST_WAIT_S = 0.05   # an idle engine told more requests are right behind: how long it waits for them


@dataclass(slots=True)
class Tracked:
    seq: Sequence
    reported: int = 0  # output tokens already sent to the coordinator


class EngineService:
    def __init__(self, llm: LLM, socket: zmq.Socket, mode: str | None, parent_pid: int,
                 refill_wait: bool = True):
        self.llm, self.socket, self.parent_pid = llm, socket, parent_pid
        self.mode = llm.check_mode(mode)
        self.decoder = llm.decoder(self.mode, on_finish=lambda seq: None)
        self.refill_wait = refill_wait
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.tracked: dict[str, Tracked] = {}
        self.unreported: list[TokenDelta] = []  # aborted before they were admitted
        self.next_index = 0
        self.round_index = 0
        self.previous_round_end: float | None = None
        self.coordinator_queued = 0  # the coordinator's backlog, as of its last AddRequest
        self.burst_following = 0     # AddRequests announced right behind the last one (AddRequest.following)
        self.stopping = False
        self.parent_check = Throttle(PARENT_CHECK_S)

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def serve(self) -> None:
        self.send(EngineReady(os.getpid(), self.llm.cfg.num_slots, self.llm.max_model_len, self.mode))
        while not self.stopping:
            self.receive(timeout_ms=0 if self.busy else IDLE_POLL_MS)
            if self.refill_wait and self.burst_following and not self.running:
                # as LLM.generate would: a call's requests start together, not one round apart
                self.await_refill(self.burst_following, BURST_WAIT_S)
            self.burst_following = 0
            if self.busy:
                self.run_round()
            elif self.unreported:
                self.send(RoundDeltas(None, 0.0, self.take_unreported()))
            self.check_parent()

    def check_parent(self) -> None:
        if (not self.busy or self.parent_check.due()) and not parent_alive(self.parent_pid):
            log.warning("the coordinator is gone; stopping")
            self.stopping = True

    # ---- messages ----
    def send(self, message) -> None:
        self.socket.send(encode(message))

    def receive(self, timeout_ms: int) -> int:
        """Handle every message that is there (waiting up to timeout_ms for the first).
        Returns how many requests were added."""
        added = 0
        if not self.socket.poll(timeout_ms):
            return added
        while True:
            try:
                data = self.socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                return added
            added += self.handle(decode(data))

    def handle(self, message) -> int:
        if isinstance(message, AddRequest):
            return self.add(message)
        if isinstance(message, Abort):
            self.abort(message.request_id)
        elif isinstance(message, Shutdown):
            self.stopping = True
        else:
            log.warning("ignoring unexpected %s message", message.TYPE)
        return 0

    # ---- requests ----
    def add(self, request: AddRequest) -> int:
        self.coordinator_queued, self.burst_following = request.queued, request.following
        try:
            seq = self.make_sequence(request)
        except (ValueError, TypeError) as error:
            self.send(RequestRejected(request.request_id, str(error)))
            return 0
        self.tracked[request.request_id] = Tracked(seq)
        self.waiting.append(seq)
        return 1

    def make_sequence(self, request: AddRequest) -> Sequence:
        """As LLM.make_sequences builds them, with a unique index per request (it keys the sampler's
        per-request random stream)."""
        if request.request_id in self.tracked:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        params = SamplingParams(**request.sampling_params)
        seq = self.llm.make_sequence(self.next_index, request.prompt_token_ids, params, request.request_id,
                                     self.mode)
        self.next_index += 1
        return seq

    def abort(self, request_id: str) -> None:
        tracked = self.tracked.get(request_id)
        if tracked is None:
            return  # finished meanwhile
        if any(s is tracked.seq for s in self.waiting):
            self.waiting = deque(s for s in self.waiting if s is not tracked.seq)
            del self.tracked[request_id]
            self.unreported.append(TokenDelta(request_id, [], "abort"))
        else:  # running: the next round appends nothing to it and retires it
            tracked.seq.finish_reason = "abort"

    # ---- rounds ----
    @torch.inference_mode()
    def run_round(self) -> None:
        start = time.perf_counter()
        self.decoder.step(self.waiting, self.running)
        end = time.perf_counter()
        elapsed, between = end - start, start - (self.previous_round_end or start)
        outputs = self.take_unreported() + self.collect_deltas()
        self.send(RoundDeltas(self.round_index, elapsed, outputs, between))
        self.round_index += 1
        self.previous_round_end = end
        freed = sum(d.finished for d in outputs)
        if self.refill_wait and freed and self.running and self.coordinator_queued:
            self.await_refill(min(freed, self.coordinator_queued), elapsed / self.llm.cfg.num_slots)

    def collect_deltas(self) -> list[TokenDelta]:
        deltas = []
        for request_id, tracked in list(self.tracked.items()):
            seq = tracked.seq
            if len(seq.output_ids) == tracked.reported and not seq.finished:
                continue
            deltas.append(TokenDelta(request_id, seq.output_ids[tracked.reported:], seq.finish_reason,
                                     seq.stop_reason))
            tracked.reported = len(seq.output_ids)
            if seq.finished:
                del self.tracked[request_id]
        return deltas

    def take_unreported(self) -> list[TokenDelta]:
        taken, self.unreported = self.unreported, []
        return taken

    def await_refill(self, expected: int, budget_s: float) -> None:
        """Wait up to budget_s for `expected` requests so they join the next round, as they would in
        LLM.generate: after freed slots with requests queued in the coordinator (worth it while the wait
        costs the running batch less than an empty slot costs: about one round's time per slot), or
        when idle with a burst announced (AddRequest.following)."""
        deadline = time.perf_counter() + budget_s
        while expected > 0:
            remaining_ms = math.ceil(1000 * (deadline - time.perf_counter()))
            if remaining_ms <= 0 or self.stopping:
                return
            added = self.receive(timeout_ms=remaining_ms)
            if not added and time.perf_counter() >= deadline:
                return
            expected -= added


# ---- the process ----
def engine_main(engine_kwargs: dict, endpoint: str, mode: str | None, parent_pid: int,
                log_level: int = logging.INFO, refill_wait: bool = True) -> None:
    """Entry point of the engine process (started by the coordinator)."""
    logging.basicConfig(level=log_level, format="%(asctime)s [engine] %(levelname)s %(name)s: %(message)s")
    os.setpgid(0, 0)  # its own process group: the coordinator can end its TP ranks and draft with it
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the coordinator decides when the engine stops
    context = zmq.Context()
    socket = configure(context.socket(zmq.DEALER))
    socket.connect(endpoint)
    try:
        code = run_engine(engine_kwargs, socket, mode, parent_pid, refill_wait)
    finally:
        socket.close()
        context.term()
    exit_now(code)


def run_engine(engine_kwargs: dict, socket: zmq.Socket, mode: str | None, parent_pid: int,
               refill_wait: bool) -> int:
    try:
        llm = LLM(**engine_kwargs)
    except Exception as error:
        log.exception("engine failed to start")
        socket.send(encode(EngineFailed(f"engine failed to start: {describe(error)}")))
        return 1
    try:
        service = EngineService(llm, socket, mode, parent_pid, refill_wait)
    except Exception as error:
        llm.shutdown()
        socket.send(encode(EngineFailed(f"engine failed to start: {describe(error)}")))
        return 1
    return serve_until_stopped(llm, service, socket)


def serve_until_stopped(llm: LLM, service: EngineService, socket: zmq.Socket) -> int:
    try:
        service.serve()
    except Exception as error:
        error = worker_death_or(llm, error)
        log.error("engine failed: %s", describe(error), exc_info=error)
        socket.send(encode(EngineFailed(describe(error))))
        llm.abandon()
        return 1
    llm.shutdown()
    return 0


def worker_death_or(llm: LLM, error: Exception) -> Exception:
    """The clearer error: a dead worker explains a broken collective."""
    try:
        llm.raise_if_workers_died(error)
    except WorkerDiedError as died:
        return died
    return error


def describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"
