"""The engine process's service loop starts a client call's requests together: an AddRequest that
announces more right behind it (`following`) makes an idle engine wait briefly for them, as
LLM.generate would start them, instead of running a round for the first alone. A fake LLM over an
in-process socket pair; the real coordinator path is tests/test_coordinator.py."""
import threading
import time
from types import SimpleNamespace

import zmq

from ssd.coordinator import engine_service
from ssd.coordinator.engine_service import EngineService
from ssd.coordinator.messages import AddRequest, Shutdown, decode, encode


class FakeDecoder:
    """Records how many requests wait at each round; finishes every running one after one round."""

    def __init__(self):
        self.waiting_per_round = []

    def step(self, waiting, running):
        self.waiting_per_round.append(len(waiting))
        for seq in list(waiting):
            waiting.remove(seq)
            seq.finished, seq.finish_reason, seq.output_ids = True, "length", [1]


def fake_llm(decoder):
    def make_sequence(index, prompt, params, request_id, mode):
        return SimpleNamespace(output_ids=[], finished=False, finish_reason=None, stop_reason=None)
    return SimpleNamespace(check_mode=lambda mode: "ar", decoder=lambda mode, on_finish: decoder,
                           cfg=SimpleNamespace(num_slots=16), max_model_len=64, make_sequence=make_sequence)


def serve_burst(count: int, gap_s: float, refill_wait: bool = True) -> list[int]:
    """Send `count` AddRequests of one burst, gap_s apart, to a service loop; the rounds' waiting counts."""
    context = zmq.Context()
    engine_side, coordinator_side = context.socket(zmq.PAIR), context.socket(zmq.PAIR)
    engine_side.bind("inproc://burst")
    coordinator_side.connect("inproc://burst")
    decoder = FakeDecoder()
    service = EngineService(fake_llm(decoder), engine_side, None, parent_pid=0, refill_wait=refill_wait)
    service.check_parent = lambda: None
    loop = threading.Thread(target=service.serve)
    loop.start()
    assert decode(coordinator_side.recv()).TYPE == "engine_ready"
    for i in range(count):
        coordinator_side.send(encode(AddRequest(f"r{i}", [1, 2], {"max_tokens": 1}, following=count - i - 1)))
        time.sleep(gap_s)
    time.sleep(0.1)
    coordinator_side.send(encode(Shutdown()))
    loop.join(timeout=10)
    assert not loop.is_alive()
    engine_side.close()
    coordinator_side.close()
    context.term()
    return decoder.waiting_per_round


def test_an_idle_engine_starts_a_burst_together():
    assert serve_burst(5, gap_s=0.005) == [5]


def test_a_burst_that_stops_short_starts_after_a_bounded_wait(monkeypatch):
    monkeypatch.setattr(engine_service, "BURST_WAIT_S", 0.02)
    started = time.perf_counter()
    rounds = serve_burst(1, gap_s=0.0)           # announces none behind it: no wait
    assert rounds == [1]
    rounds = serve_burst(3, gap_s=0.05)          # each arrives after the wait ran out: a round each
    assert rounds == [1, 1, 1] and time.perf_counter() - started < 5


def test_without_refill_waits_each_request_may_start_alone():
    assert sum(serve_burst(5, gap_s=0.005, refill_wait=False)) == 5
