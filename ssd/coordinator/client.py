"""The user's handle on a coordinator process: start it, generate or stream through it, stop it.

    with Coordinator("path/to/checkpoint", max_num_seqs=8) as coordinator:
        outputs = coordinator.generate(prompts, SamplingParams(temperature=0))
        for delta in coordinator.stream(prompts, params):
            print(delta.index, delta.new_text, end="")

Calls may overlap (threads, or streams left paused while others run): whichever call is reading
the one socket puts each message in its request's inbox, and each call takes its own. Every wait
polls with a timeout and checks that the coordinator is alive, so a dead coordinator or engine
raises instead of hanging."""
from __future__ import annotations

import dataclasses
import itertools
import logging
import multiprocessing as mp
import os
import shutil
import tempfile
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator

import zmq

from ssd.coordinator.config import CoordinatorConfig
from ssd.coordinator.endpoints import bind_fresh, configure
from ssd.coordinator.errors import (CoordinatorDiedError, CoordinatorError, EngineDiedError,
                                    RequestRejectedError, StartupError)
from ssd.coordinator.messages import (Abort, EngineFailed, EngineReady, GetTimings, OutputDelta,
                                      RequestOutputs, RequestRejected, RoundTimings, Shutdown, Submit,
                                      decode, encode)
from ssd.coordinator.processes import stop_process
from ssd.coordinator.server import coordinator_main
from ssd.engine.sequence import RequestMetrics, RequestOutput
from ssd.sampling_params import SamplingParams

log = logging.getLogger(__name__)

POLL_MS = 100
SEND_TIMEOUT_MS = 5000
STOP_MARGIN_S = 10.0  # the coordinator itself waits stop_timeout_s for the engine


@dataclass(slots=True)
class StreamDelta:
    index: int                  # the prompt's position in the call
    request_id: str
    new_text: str               # "" without a tokenizer
    new_token_ids: list[int]
    finish_reason: str | None   # "stop" | "length" | "abort" | "rejected" on the last delta of a request
    output: RequestOutput | None = None  # the whole result, on the last delta
    error: str | None = None    # why the engine rejected the request ("rejected")


@dataclass(slots=True)
class Pending:
    index: int
    prompt: object
    token_ids: list[int] = dataclasses.field(default_factory=list)


class Coordinator:
    def __init__(self, model: str, *, mode: str | None = None, start_timeout_s: float = 600.0,
                 stop_timeout_s: float = 30.0, refill_wait: bool = True, log_level: int = logging.INFO,
                 **llm_kwargs):
        """llm_kwargs: as for LLM(model, ...); the engine process builds it. mode: the engine's decoding
        mode ("ar" | "sync" | "async"; default as LLM.generate's)."""
        self.workdir = tempfile.mkdtemp(prefix="ssd-client-")
        self.context = zmq.Context()
        self.socket = configure(self.context.socket(zmq.DEALER), linger_ms=0)
        self.socket.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)
        config = CoordinatorConfig(
            engine_kwargs={"model": model, **llm_kwargs},
            client_endpoint=bind_fresh(self.socket, self.workdir, "client"),
            parent_pid=os.getpid(), workdir=self.workdir, mode=mode, start_timeout_s=start_timeout_s,
            stop_timeout_s=stop_timeout_s, log_level=log_level, refill_wait=refill_wait)
        self.process = mp.get_context("spawn").Process(target=coordinator_main, args=(config,),
                                                       name="ssd-coordinator", daemon=False)  # it spawns the engine
        self.process.start()
        self._release = weakref.finalize(self, release, self.process, self.socket, self.context, self.workdir,
                                         stop_timeout_s + STOP_MARGIN_S)
        self.failure: CoordinatorError | None = None
        self.request_numbers = itertools.count()
        self.socket_lock = threading.Lock()     # a zmq socket is not thread-safe
        self.inboxes: dict[str, deque] = {}     # request id -> its messages not yet taken by its call
        self.timings: deque[RoundTimings] = deque()
        try:
            self.info = self.wait_ready(start_timeout_s + STOP_MARGIN_S)
        except BaseException:
            self.close()
            raise

    def wait_ready(self, timeout_s: float) -> EngineReady:
        try:
            message = self.receive(deadline=time.monotonic() + timeout_s)
        except CoordinatorError as error:
            raise StartupError(f"coordinator failed to start: {error}") from None
        except TimeoutError:
            raise StartupError(f"coordinator not ready after {timeout_s:g}s") from None
        if isinstance(message, EngineFailed):
            raise StartupError(message.error)
        if not isinstance(message, EngineReady):
            raise StartupError(f"coordinator sent {message.TYPE!r} before it was ready")
        return message

    @property
    def engine_pid(self) -> int:
        return self.info.engine_pid

    # ---- generation ----
    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 chat: bool = False, on_delta: Callable[[StreamDelta], None] | None = None) -> list[RequestOutput]:
        """As LLM.generate (outputs in prompt order); on_delta is called with every streamed delta. A
        request the engine rejects does not stop the others: when they are done, RequestRejectedError
        names each rejected prompt and carries the others' outputs (`.outputs`, by prompt index)."""
        outputs, rejected = {}, []
        for delta in self.stream(prompts, sampling_params, chat):
            if on_delta is not None:
                on_delta(delta)
            if delta.output is not None:
                outputs[delta.index] = delta.output
            if delta.error is not None:
                rejected.append(f"request {delta.index} ({delta.request_id}) rejected: {delta.error}")
        if rejected:
            raise RequestRejectedError("; ".join(rejected), outputs)
        return [outputs[i] for i in sorted(outputs)]

    def stream(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
               chat: bool = False) -> Iterator[StreamDelta]:
        """Deltas as rounds complete. prompts: strings or token-id lists; with chat=True, strings (one
        user turn) or lists of {"role", "content"} messages. A rejected request ends with one delta
        (finish_reason "rejected", `error` says why). Leaving the loop early aborts the rest."""
        self.check_usable()
        prompts = as_prompt_list(prompts)
        pending = self.submit(prompts, per_prompt(sampling_params, len(prompts)), chat)
        try:
            while pending:
                yield self.delta_of(self.next_message(pending), pending)
        finally:
            for request_id in pending:
                self.inboxes.pop(request_id, None)
            if pending and self.usable:
                self.abort(list(pending))

    def submit(self, prompts: list, params: list[SamplingParams], chat: bool) -> dict[str, Pending]:
        pending = {}
        for index, (prompt, sp) in enumerate(zip(prompts, params)):
            request_id = f"req-{next(self.request_numbers)}"
            self.inboxes[request_id] = deque()
            pending[request_id] = Pending(index, prompt)
            self.send(Submit(request_id, prompt, dataclasses.asdict(sp), chat, following=len(prompts) - index - 1))
        return pending

    def next_message(self, pending: dict[str, Pending]) -> OutputDelta | RequestRejected:
        """The next message for one of these requests: from its inbox, else read from the socket."""
        while True:
            self.check_usable()   # closed or failed: what is left in the inboxes is void
            for request_id in pending:
                if self.inboxes[request_id]:
                    return self.inboxes[request_id].popleft()
            self.receive_one()

    def receive_one(self) -> None:
        """Wait up to POLL_MS for one message and put it where it belongs (the socket held meanwhile)."""
        with self.socket_lock:
            self.check_usable()
            if not self.socket.poll(POLL_MS):
                self.check_alive()
                return
            message = decode(self.socket.recv())
        if isinstance(message, RequestOutputs):
            for output in message.outputs:
                self.inboxes.get(output.request_id, deque()).append(output)   # no inbox: aborted
        elif isinstance(message, RequestRejected):
            self.inboxes.get(message.request_id, deque()).append(message)
        elif isinstance(message, RoundTimings):
            self.timings.append(message)
        elif isinstance(message, EngineFailed):
            raise self.broken(EngineDiedError(message.error))

    def delta_of(self, message: OutputDelta | RequestRejected, pending: dict[str, Pending]) -> StreamDelta:
        if isinstance(message, RequestRejected):
            self.inboxes.pop(message.request_id, None)
            index = pending.pop(message.request_id).index
            return StreamDelta(index, message.request_id, "", [], "rejected", error=message.error)
        return self.to_delta(message, pending)

    def to_delta(self, output: OutputDelta, pending: dict[str, Pending]) -> StreamDelta:
        request = pending[output.request_id]
        request.token_ids.extend(output.new_token_ids)
        delta = StreamDelta(request.index, output.request_id, output.new_text, output.new_token_ids,
                            output.finish_reason)
        if output.finish_reason is not None:
            del pending[output.request_id]
            self.inboxes.pop(output.request_id, None)
            delta.output = final_output(request, output)
        return delta

    def abort(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.send(Abort(request_id))

    def round_timings(self, reset: bool = False) -> RoundTimings:
        """The coordinator's measurements so far (reset: start afresh). Call between generate calls."""
        self.check_usable()
        self.send(GetTimings(reset))
        while not self.timings:
            self.receive_one()
        return self.timings.popleft()

    # ---- the connection ----
    def send(self, message) -> None:
        with self.socket_lock:
            self.check_usable()
            try:
                self.socket.send(encode(message))
            except zmq.Again:
                self.check_alive()
                raise self.broken(CoordinatorDiedError("the coordinator stopped reading requests")) from None

    def receive(self, deadline: float | None = None):
        """At start-up only (no call can run yet): the next message."""
        while not self.socket.poll(POLL_MS):
            self.check_alive()
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError
        return decode(self.socket.recv())

    def check_alive(self) -> None:
        if not self.process.is_alive():
            raise self.broken(CoordinatorDiedError(
                f"coordinator process (pid {self.process.pid}) exited with code {self.process.exitcode}"))

    @property
    def usable(self) -> bool:
        return self.failure is None and self._release.alive

    def check_usable(self) -> None:
        if self.failure is not None:
            raise type(self.failure)(f"the coordinator failed earlier: {self.failure}")
        if not self._release.alive:
            raise CoordinatorError("the coordinator is closed")

    def broken(self, error: CoordinatorError) -> CoordinatorError:
        self.failure = error
        self.close()
        return error

    # ---- lifecycle ----
    def close(self) -> None:
        self._release()

    def __enter__(self) -> "Coordinator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def as_prompt_list(prompts) -> list:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, dict):
        raise TypeError("prompts is one chat message: a chat prompt is a list of messages, so one "
                        "conversation of one message is [[{'role': 'user', 'content': ...}]]")
    return list(prompts)


def per_prompt(sampling_params, count: int) -> list[SamplingParams]:
    params = sampling_params or SamplingParams()
    params = params if isinstance(params, list) else [params] * count
    if len(params) != count:
        raise ValueError(f"got {len(params)} sampling params for {count} prompts")
    return params


def final_output(request: Pending, output: OutputDelta) -> RequestOutput:
    arrival, first, finish = output.times
    metrics = RequestMetrics(arrival, first, finish, len(request.token_ids))
    prompt = request.prompt if isinstance(request.prompt, str) else None
    return RequestOutput(request.index, prompt, output.prompt_token_ids, request.token_ids, output.text,
                         output.finish_reason, metrics, output.stop_reason)


def release(process: mp.Process, socket: zmq.Socket, context: zmq.Context, workdir: str, timeout_s: float) -> None:
    """Stop the coordinator (it stops the engine) and free the client's socket; runs once."""
    if process.is_alive():
        try:
            socket.send(encode(Shutdown()), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # not connected: stop_process kills it after the timeout
        stop_process(process, timeout_s)
    socket.close(linger=0)
    context.term()
    shutil.rmtree(workdir, ignore_errors=True)
