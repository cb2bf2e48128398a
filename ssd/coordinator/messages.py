"""The control-plane messages between client, coordinator and engine.

On the wire a message is one msgpack map {"v": PROTOCOL_VERSION, "type": ..., <fields>}; records
nested in a message (TokenDelta, OutputDelta: named tuples, packed at C speed) travel as msgpack
arrays in field order. Only plain data (ints, floats, strings, lists, maps) is encoded: anything
else fails to encode, nothing is ever pickled."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from functools import cache
from typing import Any, ClassVar, NamedTuple

import msgpack

PROTOCOL_VERSION = 3   # 2: stop_reason in TokenDelta and OutputDelta; 3: `following` in Submit and AddRequest


class ProtocolError(ValueError):
    """Bytes that are not a valid control message of this protocol version."""


# ---------------------------------------------------------------- coordinator → engine
@dataclass(slots=True)
class AddRequest:
    TYPE: ClassVar[str] = "add_request"
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: dict[str, Any]   # SamplingParams fields
    queued: int = 0                   # requests still waiting in the coordinator after this one
    following: int = 0                # AddRequests of the same burst (one client call) on their way right
                                      # behind this one: an idle engine waits briefly to start them together


@dataclass(slots=True)
class Abort:
    TYPE: ClassVar[str] = "abort"
    request_id: str


@dataclass(slots=True)
class Shutdown:
    TYPE: ClassVar[str] = "shutdown"


# ---------------------------------------------------------------- engine → coordinator
@dataclass(slots=True)
class EngineReady:
    TYPE: ClassVar[str] = "engine_ready"
    engine_pid: int
    max_num_seqs: int
    max_model_len: int
    mode: str


class TokenDelta(NamedTuple):
    """What one request gained in one engine round."""
    request_id: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort"; None while it runs
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RoundDeltas:
    TYPE: ClassVar[str] = "round_deltas"
    round_index: int | None    # None: no round ran (requests aborted before they started)
    engine_round_s: float      # admit → decode step → retire, as the engine timed it
    outputs: list[TokenDelta]
    engine_between_s: float = 0.0  # from the end of the engine's previous round to this one's start

    def __post_init__(self):
        self.outputs = as_records(TokenDelta, self.outputs)


@dataclass(slots=True)
class RequestRejected:
    TYPE: ClassVar[str] = "request_rejected"
    request_id: str
    error: str


@dataclass(slots=True)
class EngineFailed:
    TYPE: ClassVar[str] = "engine_failed"
    error: str


# ---------------------------------------------------------------- client ↔ coordinator
@dataclass(slots=True)
class Submit:
    TYPE: ClassVar[str] = "submit"
    request_id: str
    prompt: str | list[int] | list[dict[str, str]]  # text, token ids, or chat messages
    sampling_params: dict[str, Any]
    chat: bool = False
    following: int = 0                # Submits of the same call right behind this one


class OutputDelta(NamedTuple):
    """A request's progress as the client sees it; the final one (finish_reason set) carries the rest."""
    request_id: str
    new_token_ids: list[int]
    new_text: str
    finish_reason: str | None = None
    prompt_token_ids: list[int] | None = None   # final only
    text: str | None = None                     # final only: the whole output, detokenized at once
    times: list[float] | None = None            # final only: arrival, first token, finish (perf_counter)
    stop_reason: str | int | None = None        # final only: the stop string or stop token id, if one


@dataclass(slots=True)
class RequestOutputs:
    TYPE: ClassVar[str] = "request_outputs"
    outputs: list[OutputDelta]

    def __post_init__(self):
        self.outputs = as_records(OutputDelta, self.outputs)


@dataclass(slots=True)
class GetTimings:
    TYPE: ClassVar[str] = "get_timings"
    reset: bool = False


@dataclass(slots=True)
class RoundTimings:
    """Per engine round: the engine's own time and the interval between the coordinator receiving it
    and the round before (only while requests were outstanding); per finished request: TTFT, TPOT."""
    TYPE: ClassVar[str] = "round_timings"
    engine_round_s: list[float] = field(default_factory=list)
    engine_between_s: list[float] = field(default_factory=list)   # the engine's messaging and waits
    coordinator_round_s: list[float] = field(default_factory=list)
    handling_s: list[float] = field(default_factory=list)   # coordinator busy on one round's deltas
    ttft_s: list[float] = field(default_factory=list)
    tpot_s: list[float] = field(default_factory=list)


MESSAGE_TYPES = {cls.TYPE: cls for cls in (
    AddRequest, Abort, Shutdown, EngineReady, RoundDeltas, RequestRejected, EngineFailed,
    Submit, RequestOutputs, GetTimings, RoundTimings)}


def as_records(cls, items: list) -> list:
    """Nested records arrive as arrays in field order."""
    return [item if isinstance(item, cls) else cls(*item) for item in items]


def encode(message) -> bytes:
    if type(message) not in MESSAGE_TYPES.values():
        raise TypeError(f"{type(message).__name__} is not a control message")
    body = {"v": PROTOCOL_VERSION, "type": message.TYPE}
    body.update((name, getattr(message, name)) for name in field_names(type(message)))
    return msgpack.packb(body, default=refuse)


def refuse(obj):
    raise TypeError(f"cannot put a {type(obj).__name__} in a control message (plain data only)")


@cache
def field_names(cls) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


def decode(data: bytes):
    try:
        body = msgpack.unpackb(data)
    except Exception as error:
        raise ProtocolError(f"not a msgpack control message: {error}") from error
    if not isinstance(body, dict):
        raise ProtocolError(f"a control message is a map, got {type(body).__name__}")
    version, kind = body.pop("v", None), body.pop("type", None)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"control message has protocol version {version!r}; this build speaks "
                            f"version {PROTOCOL_VERSION} (client, coordinator and engine must match)")
    if kind not in MESSAGE_TYPES:
        raise ProtocolError(f"unknown control message type {kind!r}")
    try:
        return MESSAGE_TYPES[kind](**body)
    except TypeError as error:
        raise ProtocolError(f"malformed {kind!r} message: {error}") from error
