"""The coordinator process serves exactly what LLM.generate does, streams it, survives bad requests,
and fails loudly (never hangs) when the engine dies. CPU, tiny models, multi-process."""
import os
import pickle
import signal
import threading
import time

import msgpack
import pytest

from ssd import LLM, SamplingParams
from ssd.coordinator import (Coordinator, CoordinatorDiedError, CoordinatorError, EngineDiedError,
                             RequestRejectedError, StartupError)
from ssd.coordinator.admission import Admission
from ssd.engine.detokenizer import IncrementalDetokenizer
from ssd.coordinator.messages import (PROTOCOL_VERSION, Abort, AddRequest, EngineFailed, EngineReady,
                                      GetTimings, OutputDelta, ProtocolError, RequestOutputs, RequestRejected,
                                      RoundDeltas, RoundTimings, Shutdown, Submit, TokenDelta, decode, encode)
from tiny_models import add_word_tokenizer, make_checkpoint, perturbed_copy

PROMPTS = [[5, 6, 7], [9] * 11, list(range(3, 30)), [40, 41], [3]]
# different lengths, some stopping at EOS: requests finish at different rounds and others join
PARAMS = [SamplingParams(temperature=0, max_tokens=6 + 5 * i, ignore_eos=i % 2 == 0) for i in range(5)]
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}w3{% endif %}"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("coordinator")
    target = make_checkpoint("qwen3", root / "target")  # qwen3: AutoTokenizer keeps the saved tokenizer
    add_word_tokenizer(target, CHAT_TEMPLATE)
    return {"target": target, "draft": perturbed_copy(target, root / "draft", noise=0.08)}


def engine_kwargs(pair, mode: str, max_num_seqs: int) -> dict:
    kwargs = dict(max_model_len=128, max_num_seqs=max_num_seqs)
    if mode == "async":
        kwargs.update(draft=str(pair["draft"]), num_speculative_tokens=3, async_spec=True, fan_out=2)
    return kwargs


@pytest.fixture(scope="module")
def coordinator_for(pair):
    """One coordinator per (mode, max_num_seqs), shared by the module's tests; all stopped at the end."""
    started = {}

    def get(mode: str, max_num_seqs: int) -> Coordinator:
        if (mode, max_num_seqs) not in started:
            started[mode, max_num_seqs] = Coordinator(str(pair["target"]), mode=mode, start_timeout_s=120,
                                                      **engine_kwargs(pair, mode, max_num_seqs))
        return started[mode, max_num_seqs]

    yield get
    for coordinator in started.values():
        coordinator.close()
        assert coordinator.process.exitcode == 0
        with pytest.raises(ProcessLookupError):  # the engine is gone too
            os.kill(coordinator.engine_pid, 0)


# ---------------------------------------------------------------- messages
SAMPLES = [
    AddRequest("r1", [1, 2, 3], {"temperature": 0.0, "max_tokens": 4}, queued=2, following=3),
    Abort("r1"), Shutdown(), EngineReady(123, 8, 2048, "async"),
    RoundDeltas(7, 0.012, [TokenDelta("r1", [4, 5], None), TokenDelta("r2", [], "abort"),
                           TokenDelta("r3", [6], "stop", "w6"), TokenDelta("r4", [7], "stop", 7)], 0.0003),
    RoundDeltas(None, 0.0, []), RequestRejected("r3", "prompt too long"), EngineFailed("boom"),
    Submit("r4", [{"role": "user", "content": "hi"}], {"seed": 3}, chat=True), Submit("r5", "text", {}, following=1),
    RequestOutputs([OutputDelta("r1", [4], "é", None), OutputDelta("r2", [5], "", "stop", [1], "x", [1.0, None, 2.0]),
                    OutputDelta("r3", [6], "", "stop", [1], "x", [1.0, 1.5, 2.0], "w6")]),
    GetTimings(reset=True), RoundTimings([0.1], [0.001], [0.2], [0.01], [0.5], [0.05]),
]


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: m.TYPE)
def test_every_message_survives_encode_decode(message):
    assert decode(encode(message)) == message


def test_message_of_another_protocol_version_is_rejected():
    body = msgpack.unpackb(encode(Abort("r1")))
    assert body["v"] == PROTOCOL_VERSION
    for version in (PROTOCOL_VERSION + 1, None):
        with pytest.raises(ProtocolError, match="protocol version"):
            decode(msgpack.packb({**body, "v": version}))


@pytest.mark.parametrize("data, error", [
    (msgpack.packb({"v": PROTOCOL_VERSION, "type": "teleport"}), "unknown control message type"),
    (msgpack.packb({"v": PROTOCOL_VERSION, "type": "abort"}), "malformed 'abort'"),
    (msgpack.packb({"v": PROTOCOL_VERSION, "type": "abort", "request_id": "r", "x": 1}), "malformed"),
    (msgpack.packb([1, 2]), "is a map"),
    (b"\xc1\xc1", "not a msgpack"),
    (pickle.dumps(Abort("r1")), "not a msgpack"),
])
def test_malformed_messages_are_rejected(data, error):
    with pytest.raises(ProtocolError, match=error):
        decode(data)


def test_messages_never_pickle(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("pickle used")
    for name in ("dumps", "loads", "dump", "load"):
        monkeypatch.setattr(pickle, name, forbidden)
    for message in SAMPLES:
        assert decode(encode(message)) == message
    with pytest.raises(TypeError, match="plain data only"):
        encode(Submit("r", [object()], {}))
    with pytest.raises(TypeError, match="not a control message"):
        encode(TokenDelta("r", [1]))


# ---------------------------------------------------------------- coordinator pieces
class ByteTokenizer:
    """Token = one UTF-8 byte: decoding part of a character gives U+FFFD, as byte-level BPE does."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def test_incremental_detokenizer_never_emits_half_a_character():
    text = "héllo wörld ✓ 🙂!"
    ids = list(text.encode())
    detokenizer = IncrementalDetokenizer(ByteTokenizer())
    pieces = [detokenizer.add(ids[i:i + 3]) for i in range(0, len(ids), 3)]
    assert "".join(pieces) == detokenizer.emitted == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_admission_holds_at_most_the_limit_in_order():
    admission = Admission(limit=2)
    for request_id in "abcd":
        admission.enqueue(request_id)
    assert admission.admit() == [("a", 3), ("b", 2)]
    assert admission.admit() == []
    assert admission.withdraw("d") and not admission.withdraw("a")
    admission.release("a")
    assert admission.admit() == [("c", 0)]
    assert admission.outstanding == 2


# ---------------------------------------------------------------- through the processes
def direct_outputs(pair, mode: str, max_num_seqs: int, prompts, params):
    with LLM(str(pair["target"]), **engine_kwargs(pair, mode, max_num_seqs)) as llm:
        return llm.generate(prompts, params, use_tqdm=False, mode=mode)


@pytest.mark.parametrize("mode, max_num_seqs", [
    ("ar", 1), ("ar", 3), ("async", 3),
    pytest.param("async", 1, marks=pytest.mark.slow),  # ~25 s: engine + draft processes, direct run with a draft
])
def test_greedy_through_coordinator_matches_llm_generate(pair, coordinator_for, mode, max_num_seqs):
    expected = direct_outputs(pair, mode, max_num_seqs, PROMPTS, PARAMS)
    outputs = coordinator_for(mode, max_num_seqs).generate(PROMPTS, PARAMS)
    assert [o.token_ids for o in outputs] == [e.token_ids for e in expected]
    assert [o.finish_reason for o in outputs] == [e.finish_reason for e in expected]
    assert [o.text for o in outputs] == [e.text for e in expected]
    assert [(o.index, o.prompt_token_ids) for o in outputs] == list(enumerate(PROMPTS))
    assert all(o.metrics.ttft_s > 0 and o.metrics.e2e_s >= o.metrics.ttft_s for o in outputs)


def test_seeded_sampling_through_coordinator_matches_llm_generate(pair, coordinator_for):
    """Unseeded requests get a fresh random stream per request (a unique index in the engine);
    seeded ones sample exactly as LLM.generate does."""
    params = [SamplingParams(temperature=0.8, top_p=0.9, max_tokens=12, seed=i, ignore_eos=True) for i in range(5)]
    expected = direct_outputs(pair, "ar", 3, PROMPTS, params)
    outputs = coordinator_for("ar", 3).generate(PROMPTS, params)
    assert [o.token_ids for o in outputs] == [e.token_ids for e in expected]


def test_streamed_deltas_concatenate_to_the_final_output(coordinator_for):
    coordinator = coordinator_for("ar", 3)
    prompts = [" ".join(f"w{t}" for t in prompt) for prompt in PROMPTS]
    deltas = list(coordinator.stream(prompts, PARAMS))
    outputs = coordinator.generate(prompts, PARAMS)
    for output in outputs:
        mine = [d for d in deltas if d.index == output.index]
        assert [d.output is not None for d in mine] == [False] * (len(mine) - 1) + [True]
        assert mine[-1].output.token_ids == output.token_ids
        assert sum((d.new_token_ids for d in mine), []) == output.token_ids
        assert "".join(d.new_text for d in mine) == output.text
        assert output.prompt == prompts[output.index]
        assert output.prompt_token_ids == PROMPTS[output.index]


def test_stop_strings_through_the_coordinator_stream_nothing_of_the_stop(pair, coordinator_for):
    """The engine ends a request at its stop string; the stream holds back text a stop string may
    begin with, so no delta ever shows part of it, and the result equals LLM.generate's."""
    coordinator = coordinator_for("ar", 3)
    prompts = [" ".join(f"w{t}" for t in prompt) for prompt in PROMPTS[:3]]
    long = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    words = [o.text.split() for o in coordinator.generate(prompts, long)]
    stops = [" ".join(words[0][4:6]), [words[1][7] + " ", "w1000"], "no such words"]
    params = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=stop) for stop in stops]
    deltas = list(coordinator.stream(prompts, params))
    expected = direct_outputs(pair, "ar", 3, prompts, params)
    for output in expected:
        mine = [d for d in deltas if d.index == output.index]
        streamed = "".join(d.new_text for d in mine)
        assert streamed == output.text == mine[-1].output.text
        assert mine[-1].output.token_ids == output.token_ids
        assert mine[-1].output.stop_reason == output.stop_reason
    assert [o.finish_reason for o in expected] == ["stop", "stop", "length"]
    assert expected[0].stop_reason == stops[0] and not any(stops[0] in d.new_text for d in deltas)


def test_chat_prompts_go_through_the_chat_template(coordinator_for):
    coordinator = coordinator_for("ar", 3)
    chat = coordinator.generate(["w5 w6", [{"role": "user", "content": "w7"}]], PARAMS[0], chat=True)
    plain = coordinator.generate([[5, 6, 3], [7, 3]], PARAMS[0])
    assert [o.prompt_token_ids for o in chat] == [[5, 6, 3], [7, 3]]
    assert [o.token_ids for o in chat] == [o.token_ids for o in plain]


def test_bad_requests_are_rejected_and_the_engine_keeps_serving(coordinator_for):
    coordinator = coordinator_for("ar", 3)
    expected = coordinator.generate(PROMPTS, PARAMS)
    with pytest.raises(RequestRejectedError, match=r"request 2 \(req-\d+\) rejected: .* max_model_len is 128") as error:
        coordinator.generate(PROMPTS[:2] + [[5] * 200] + PROMPTS[2:], PARAMS[:2] + [PARAMS[0]] + PARAMS[2:])
    others = error.value.outputs   # the call's other requests went on
    assert [others[i].token_ids for i in (0, 1, 3, 4, 5)] == [e.token_ids for e in expected] and 2 not in others
    deltas = list(coordinator.stream([[5] * 200, PROMPTS[0]], PARAMS[0]))
    assert sorted((d.index, d.finish_reason) for d in deltas if d.finish_reason) == [(0, "rejected"), (1, "length")]
    with pytest.raises(RequestRejectedError, match=r"token ids must lie in \[0, 97\)"):
        coordinator.generate([[500]])
    with pytest.raises(RequestRejectedError, match="no chat template|a chat prompt"):
        coordinator.generate([[1, 2]], chat=True)
    assert [o.token_ids for o in coordinator.generate(PROMPTS, PARAMS)] == [e.token_ids for e in expected]


def test_chat_prompts_of_the_wrong_shape_are_named(coordinator_for):
    coordinator = coordinator_for("ar", 3)
    with pytest.raises(TypeError, match="one chat message"):   # not a list of two prompts "role", "content"
        coordinator.generate({"role": "user", "content": "w5"}, chat=True)
    for bad in ([{"role": "user"}], [{"role": "user", "content": 5}], [{"content": "w5"}], []):
        with pytest.raises(RequestRejectedError, match="a chat prompt is a string or a non-empty list"):
            coordinator.generate([bad], chat=True)


def tokens_by_index(deltas) -> dict[int, list[int]]:
    tokens = {}
    for delta in deltas:
        tokens.setdefault(delta.index, []).extend(delta.new_token_ids)
    return tokens


def test_overlapping_calls_each_get_their_own_tokens(coordinator_for):
    """A stream left paused while another call runs, and calls from two threads: each call's requests
    get all of their own tokens (whichever call reads the socket files the others' messages)."""
    coordinator = coordinator_for("ar", 3)
    expected = [o.token_ids for o in coordinator.generate(PROMPTS, PARAMS)]
    paused = coordinator.stream(PROMPTS[:2], PARAMS[:2])
    first = [next(paused)]
    middle = coordinator.generate(PROMPTS[2:], PARAMS[2:])
    streamed = tokens_by_index(first + list(paused))
    assert [streamed[0], streamed[1]] + [o.token_ids for o in middle] == expected
    results = {}

    def run(part: slice) -> None:
        results[part.start] = [o.token_ids for o in coordinator.generate(PROMPTS[part], PARAMS[part])]
    threads = [threading.Thread(target=run, args=(part,)) for part in (slice(0, 3), slice(3, 5))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert results[0] + results[3] == expected


def test_a_stream_outliving_its_coordinator_says_so(pair):
    with Coordinator(str(pair["target"]), mode="ar", max_model_len=128, max_num_seqs=2) as coordinator:
        stream = coordinator.stream(PROMPTS[:2], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
        next(stream)
    with pytest.raises(CoordinatorError, match="the coordinator is closed"):
        next(stream)
    stream.close()   # nothing left to abort: no error either


def test_leaving_a_stream_early_aborts_its_requests(coordinator_for):
    coordinator = coordinator_for("ar", 3)
    expected = coordinator.generate(PROMPTS, PARAMS)
    long = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    for delta in coordinator.stream(PROMPTS, long):
        break
    assert [o.token_ids for o in coordinator.generate(PROMPTS, PARAMS)] == [e.token_ids for e in expected]


def test_round_timings_pair_the_coordinator_view_with_the_engine_time(coordinator_for):
    coordinator = coordinator_for("ar", 3)
    coordinator.round_timings(reset=True)
    coordinator.generate(PROMPTS, PARAMS)
    timings = coordinator.round_timings(reset=True)
    assert len(timings.coordinator_round_s) == len(timings.engine_round_s) == len(timings.engine_between_s) > 0
    assert len(timings.ttft_s) == len(PROMPTS)
    assert coordinator.round_timings().engine_round_s == []


def kill_soon(pid: int, delay_s: float) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(delay_s), os.kill(pid, signal.SIGKILL)), daemon=True)
    thread.start()
    return thread


def test_killing_the_engine_mid_run_fails_generate_quickly(pair):
    long = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    with Coordinator(str(pair["target"]), mode="ar", max_model_len=512, max_num_seqs=2) as coordinator:
        kill_soon(coordinator.engine_pid, 1.0)
        start = time.perf_counter()
        with pytest.raises(EngineDiedError, match="exited unexpectedly with code -9"):
            for _ in range(1000):  # long enough that the kill lands mid-run
                coordinator.generate([[5, 6, 7]] * 4, long)
        assert time.perf_counter() - start < 20
        with pytest.raises(EngineDiedError, match="failed earlier"):
            coordinator.generate([[5, 6, 7]], long)
        coordinator.process.join(10)
        assert coordinator.process.exitcode == 1


@pytest.mark.slow
def test_killing_the_coordinator_fails_generate_and_the_engine_leaves_by_itself(pair):
    long = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    with Coordinator(str(pair["target"]), mode="ar", max_model_len=512, max_num_seqs=2) as coordinator:
        kill_soon(coordinator.process.pid, 1.0)
        with pytest.raises(CoordinatorDiedError, match="exited with code -9"):
            for _ in range(1000):
                coordinator.generate([[5, 6, 7]] * 4, long)
        deadline = time.monotonic() + 10
        while process_exists(coordinator.engine_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not process_exists(coordinator.engine_pid)  # it noticed its parent is gone


def process_exists(pid: int) -> bool:
    """Running (not exited, not a zombie waiting to be reaped)."""
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_engine_that_cannot_start_fails_the_coordinator_with_its_error(tmp_path):
    start = time.perf_counter()
    with pytest.raises(StartupError, match="neither a checkpoint directory nor a random-weights preset"):
        Coordinator(str(tmp_path / "missing"), start_timeout_s=60)
    assert time.perf_counter() - start < 60
