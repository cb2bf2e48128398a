"""Admission: at most `limit` requests in the engine at once; the rest wait here, first come first
served, and join as others finish."""
from __future__ import annotations

from collections import deque


class Admission:
    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError("the admission limit must be >= 1")
        self.limit = limit
        self.waiting: deque[str] = deque()
        self.in_engine: set[str] = set()

    def enqueue(self, request_id: str) -> None:
        self.waiting.append(request_id)

    def admit(self) -> list[tuple[str, int]]:
        """Requests to send to the engine now, each with how many still wait after it."""
        admitted = []
        while self.waiting and len(self.in_engine) < self.limit:
            request_id = self.waiting.popleft()
            self.in_engine.add(request_id)
            admitted.append((request_id, len(self.waiting)))
        return admitted

    def release(self, request_id: str) -> None:
        """The engine is done with it (finished, aborted or rejected)."""
        self.in_engine.discard(request_id)

    def withdraw(self, request_id: str) -> bool:
        """Take a request that has not reached the engine out of the queue; False if it has."""
        if request_id in self.in_engine or request_id not in self.waiting:
            return False
        self.waiting.remove(request_id)
        return True

    @property
    def outstanding(self) -> int:
        return len(self.waiting) + len(self.in_engine)
