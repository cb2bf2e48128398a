"""What the coordinator measures: per round, its view of the round against the engine's own time
(the difference is what the coordinator path adds per round); per request, TTFT and TPOT."""
from __future__ import annotations

from dataclasses import fields

from ssd.coordinator.messages import RoundTimings


class CoordinatorMetrics:
    def __init__(self):
        self.timings = RoundTimings()
        self.previous_arrival: float | None = None  # of the last round, while requests were outstanding

    def record_round(self, round_index: int | None, arrival: float, engine_round_s: float,
                     engine_between_s: float, handled_s: float, outstanding: int) -> None:
        """A round's deltas arrived at `arrival` and took `handled_s` to process; `outstanding`
        requests remain. The interval to the previous round counts only if the engine had work
        throughout (requests were outstanding after that round)."""
        if round_index is None:
            return
        if self.previous_arrival is not None:
            self.timings.coordinator_round_s.append(arrival - self.previous_arrival)
            self.timings.engine_round_s.append(engine_round_s)
            self.timings.engine_between_s.append(engine_between_s)
        self.timings.handling_s.append(handled_s)
        self.previous_arrival = arrival if outstanding else None

    def idle(self) -> None:
        """No request outstanding: the next interval would include idle time."""
        self.previous_arrival = None

    def record_request(self, ttft_s: float | None, tpot_s: float | None) -> None:
        if ttft_s is not None:
            self.timings.ttft_s.append(ttft_s)
        if tpot_s is not None:
            self.timings.tpot_s.append(tpot_s)

    def snapshot(self, reset: bool) -> RoundTimings:
        taken = self.timings
        if reset:
            self.timings = RoundTimings()
        else:
            taken = RoundTimings(**{f.name: list(getattr(taken, f.name)) for f in fields(taken)})
        return taken
