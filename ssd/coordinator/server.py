"""The coordinator process: between the client and the engine, on an asyncio (uvloop) event loop.

It starts the engine process, owns the request table, tokenizes prompts, admits at most
max_num_seqs requests into the engine (the rest wait here), detokenizes and streams each round's
tokens to the client, forwards aborts, and measures TTFT / TPOT and its own cost per round."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import multiprocessing as mp
import os
import shutil
import signal
import tempfile
import time

import uvloop
import zmq
import zmq.asyncio

from ssd.coordinator.admission import Admission
from ssd.coordinator.config import CoordinatorConfig
from ssd.engine.detokenizer import IncrementalDetokenizer
from ssd.coordinator.endpoints import bind_fresh, configure
from ssd.coordinator.engine_service import describe, engine_main
from ssd.coordinator.messages import (Abort, AddRequest, EngineFailed, EngineReady, GetTimings, ProtocolError,
                                      RequestOutputs, RequestRejected, RoundDeltas, Shutdown, Submit,
                                      TokenDelta, decode, encode)
from ssd.coordinator.metrics import CoordinatorMetrics
from ssd.coordinator.processes import exit_now, kill_process_group
from ssd.distributed.orphan_watch import parent_alive
from ssd.coordinator.request_state import RequestState
from ssd.coordinator.tokenization import prompt_token_ids
from ssd.engine.llm import resolve_checkpoint
from ssd.loading.generation_info import load_tokenizer
from ssd.sampling_params import SamplingParams

log = logging.getLogger(__name__)

CHECK_INTERVAL_MS = 100  # engine and parent liveness
CHECK_INTERVAL_S = CHECK_INTERVAL_MS / 1000
DEATH_GRACE_S = 0.3      # a dead engine's last message (its error) is read before its exit is reported


class CoordinatorServer:
    def __init__(self, config: CoordinatorConfig, workdir: str):
        self.config = config
        self.context = zmq.asyncio.Context()
        self.client = configure(self.context.socket(zmq.DEALER))
        self.client.connect(config.client_endpoint)
        self.engine_socket = configure(self.context.socket(zmq.DEALER))
        self.engine_endpoint = bind_fresh(self.engine_socket, workdir, "engine")
        self.engine: mp.Process | None = None
        self.engine_ready = False
        self.tokenizer = None
        self.admission: Admission | None = None
        self.requests: dict[str, RequestState] = {}
        self.metrics = CoordinatorMetrics()
        self.stopped = asyncio.Event()
        self.exit_code = 0

    async def serve(self) -> int:
        self.start_engine()
        try:
            if await self.start_up():
                await self.run_until_stopped()
        except Exception as error:
            log.exception("coordinator failed")
            await self.fail(f"coordinator failed: {describe(error)}")
        finally:
            await self.stop_engine()
            self.context.destroy(linger=1000)
        return self.exit_code

    # ---- start-up ----
    def start_engine(self) -> None:
        cfg = self.config
        self.engine = mp.get_context("spawn").Process(
            target=engine_main, name="ssd-engine", daemon=False,  # it spawns its TP ranks and draft
            args=(cfg.engine_kwargs, self.engine_endpoint, cfg.mode, os.getpid(), cfg.log_level,
                  cfg.refill_wait))
        self.engine.start()

    async def start_up(self) -> bool:
        ready = await self.wait_for_engine()
        if ready is None:
            return False
        self.tokenizer = load_tokenizer(resolve_checkpoint(self.config.engine_kwargs["model"]))
        self.admission = Admission(ready.max_num_seqs)
        self.engine_ready = True
        await self.send_client(ready)
        log.info("engine ready (pid %d, %s, max_num_seqs %d)", ready.engine_pid, ready.mode, ready.max_num_seqs)
        return True

    async def wait_for_engine(self) -> EngineReady | None:
        """The engine's ready message; None once a failure to start has been reported, or when the
        client asked to stop meanwhile."""
        poller = zmq.asyncio.Poller()
        poller.register(self.engine_socket, zmq.POLLIN)
        poller.register(self.client, zmq.POLLIN)
        deadline = time.monotonic() + self.config.start_timeout_s
        while time.monotonic() < deadline:
            events = dict(await poller.poll(CHECK_INTERVAL_MS))
            if self.client in events and isinstance(await self.receive(self.client), Shutdown):
                return None
            if self.engine_socket in events:
                message = await self.receive(self.engine_socket)
                if isinstance(message, EngineReady):
                    return message
                if isinstance(message, EngineFailed):
                    await self.fail(message.error)
                    return None
            elif not self.engine.is_alive():
                await self.fail(f"engine process exited with code {self.engine.exitcode} during start-up")
                return None
            elif not parent_alive(self.config.parent_pid):
                self.exit_code = 1
                return None
        await self.fail(f"engine not ready after {self.config.start_timeout_s:g}s")
        return None

    async def fail(self, error: str) -> None:
        """Tell the client and stop (exit code 1)."""
        self.exit_code = 1
        await self.send_client(EngineFailed(error))
        self.stopped.set()

    # ---- running ----
    async def run_until_stopped(self) -> None:
        loops = [asyncio.create_task(loop()) for loop in (self.read_client, self.read_engine, self.watch)]
        stopped = asyncio.create_task(self.stopped.wait())
        done, _ = await asyncio.wait([*loops, stopped], return_when=asyncio.FIRST_COMPLETED)
        for task in (*loops, stopped):
            task.cancel()
        for task in done:
            if task is not stopped and task.exception():
                raise task.exception()

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(CHECK_INTERVAL_S)
            if not parent_alive(self.config.parent_pid):
                log.warning("the client is gone; stopping")
                self.stopped.set()
                return
            if not self.engine.is_alive():
                await asyncio.sleep(DEATH_GRACE_S)
                if not self.stopped.is_set():
                    await self.fail(f"engine process (pid {self.engine.pid}) exited unexpectedly "
                                    f"with code {self.engine.exitcode}")
                return

    async def read_client(self) -> None:
        while True:
            message = await self.receive(self.client)
            if isinstance(message, Submit):
                await self.on_submit(message)
            elif isinstance(message, Abort):
                await self.on_abort(message.request_id)
            elif isinstance(message, GetTimings):
                await self.send_client(self.metrics.snapshot(message.reset))
            elif isinstance(message, Shutdown):
                self.stopped.set()
                return
            elif message is not None:
                log.warning("ignoring unexpected %s message from the client", message.TYPE)

    async def read_engine(self) -> None:
        while True:
            message = await self.receive(self.engine_socket)
            arrival = time.perf_counter()
            if isinstance(message, RoundDeltas):
                await self.on_round(message, arrival)
            elif isinstance(message, RequestRejected):
                await self.on_rejected(message)
            elif isinstance(message, EngineFailed):
                await self.fail(message.error)
                return
            elif message is not None:
                log.warning("ignoring unexpected %s message from the engine", message.TYPE)

    @staticmethod
    async def receive(socket: zmq.asyncio.Socket):
        data = await socket.recv()
        try:
            return decode(data)
        except ProtocolError as error:
            log.error("dropping a bad control message: %s", error)
            return None

    # ---- requests ----
    async def on_submit(self, submit: Submit) -> None:
        try:
            state = self.new_request(submit)
        except Exception as error:  # whatever the tokenizer or chat template objects to
            await self.send_client(RequestRejected(submit.request_id, str(error)))
            return
        self.requests[submit.request_id] = state
        self.admission.enqueue(submit.request_id)
        await self.admit(submit.following)

    def new_request(self, submit: Submit) -> RequestState:
        if submit.request_id in self.requests:
            raise ValueError(f"request id {submit.request_id!r} is already in use")
        params = SamplingParams(**submit.sampling_params)  # a clear error here rather than from the engine
        ids = prompt_token_ids(self.tokenizer, submit.prompt, submit.chat)
        detokenizer = IncrementalDetokenizer(self.tokenizer) if self.tokenizer is not None else None
        return RequestState(submit.request_id, ids, params, detokenizer, time.perf_counter())

    async def admit(self, following: int = 0) -> None:
        """Send the engine what admission lets in; following: requests of the same client call still
        on their way here (the last one sent tells the engine how many of them will fit after it)."""
        admitted = self.admission.admit()
        fitting = min(following, self.admission.limit - len(self.admission.in_engine))
        for n, (request_id, queued) in enumerate(admitted):
            state = self.requests[request_id]
            await self.send_engine(AddRequest(request_id, state.prompt_token_ids, dataclasses.asdict(state.params),
                                              queued, fitting if n == len(admitted) - 1 else 0))

    async def on_abort(self, request_id: str) -> None:
        if request_id not in self.requests:
            return
        if not self.admission.withdraw(request_id):
            await self.send_engine(Abort(request_id))  # the engine answers with its final delta
            return
        state = self.requests.pop(request_id)
        await self.send_client(RequestOutputs([state.advance(TokenDelta(request_id, [], "abort"),
                                                             time.perf_counter())]))
        self.note_if_idle()

    async def on_round(self, deltas: RoundDeltas, arrival: float) -> None:
        for delta in deltas.outputs:
            if delta.finished:
                self.admission.release(delta.request_id)
        await self.admit()  # first: the engine may be waiting to fill the slots just freed
        outputs = [self.advance(d, arrival) for d in deltas.outputs if d.request_id in self.requests]
        if outputs:
            await self.send_client(RequestOutputs(outputs))
        self.metrics.record_round(deltas.round_index, arrival, deltas.engine_round_s, deltas.engine_between_s,
                                  time.perf_counter() - arrival, self.admission.outstanding)

    def advance(self, delta: TokenDelta, now: float):
        state = self.requests[delta.request_id]
        output = state.advance(delta, now)
        if delta.finished:
            del self.requests[delta.request_id]
            self.metrics.record_request(state.ttft_s, state.tpot_s(now))
        return output

    async def on_rejected(self, rejected: RequestRejected) -> None:
        self.admission.release(rejected.request_id)
        self.requests.pop(rejected.request_id, None)
        await self.send_client(rejected)
        await self.admit()
        self.note_if_idle()

    def note_if_idle(self) -> None:
        if not self.admission.outstanding:
            self.metrics.idle()

    # ---- sockets and processes ----
    async def send_client(self, message) -> None:
        await self.client.send(encode(message))

    async def send_engine(self, message) -> None:
        await self.engine_socket.send(encode(message))

    async def stop_engine(self) -> None:
        """Ask a ready engine to stop (it stops its workers); one still starting cannot listen: end it."""
        if self.engine is None:
            return
        if self.engine.is_alive() and self.engine_ready:
            try:
                await self.engine_socket.send(encode(Shutdown()), zmq.NOBLOCK)
                await self.wait_for_engine_exit(self.config.stop_timeout_s)
            except zmq.Again:
                pass  # its connection is gone: it is dying
        if self.engine.is_alive():
            if self.engine_ready:
                log.warning("engine (pid %d) did not stop in %.0fs; killing it", self.engine.pid,
                            self.config.stop_timeout_s)
            self.engine.kill()
        self.engine.join(5)
        kill_process_group(self.engine.pid)  # its TP ranks / draft, if it died before stopping them

    async def wait_for_engine_exit(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self.engine.is_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)


def coordinator_main(config: CoordinatorConfig) -> None:
    """Entry point of the coordinator process (started by the client)."""
    logging.basicConfig(level=config.log_level,
                        format="%(asctime)s [coordinator] %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the client decides when the coordinator stops
    workdir = tempfile.mkdtemp(prefix="coordinator-", dir=config.workdir)
    try:
        code = uvloop.run(serve(config, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    exit_now(code)


async def serve(config: CoordinatorConfig, workdir: str) -> int:
    return await CoordinatorServer(config, workdir).serve()
