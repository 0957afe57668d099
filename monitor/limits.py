"""Admission control: bounded work per RPC kind and per client, refused at once beyond it.

A request holds a slot from admission until it ends. A kind admits `max_batch` running plus
`max_queue` waiting requests; past that the caller gets RESOURCE_EXHAUSTED straight away with a
retry hint (trailing metadata `retry-after-ms`, an estimate from recent request durations), so
an overload never turns into a queue that only deadlines drain. The same counts let shutdown
wait for what is in flight.
"""

from __future__ import annotations

import contextlib
import math
import time

from monitor.config import Settings
from monitor.errors import RequestError, clip
from monitor.metrics import Metrics

WILDCARD = "*"


class Admission:
    def __init__(self, settings: Settings, metrics: Metrics):
        self.metrics = metrics
        self.capacity = {k: getattr(settings, k).max_batch + getattr(settings, k).max_queue
                         for k in ("generate", "score")}
        self.running = {k: getattr(settings, k).max_batch for k in ("generate", "score")}
        self.per_client = dict(settings.client_concurrency)
        self.admitted = {k: 0 for k in self.capacity}
        self.by_client: dict[str, int] = {}
        self.seconds = {k: 1.0 for k in self.capacity}  # EWMA of a request's duration, for retry hints

    @property
    def total(self) -> int:
        return sum(self.admitted.values())

    def retry_after_ms(self, kind: str) -> int:
        waves = math.ceil(max(1, self.admitted[kind] - self.running[kind] + 1) / self.running[kind])
        return int(1000 * waves * self.seconds[kind])

    def check(self, kind: str, context) -> None:
        """Refuse (RESOURCE_EXHAUSTED) when `kind` is full. The interceptor asks before the request is
        even read, so a burst is refused at the cost of a bare gRPC call; `slot` asks again."""
        if kind in self.capacity and self.admitted[kind] >= self.capacity[kind]:
            self._refuse(context, kind, "busy", f"server busy: {self.admitted[kind]} {kind} requests admitted "
                                                f"({self.running[kind]} running, the rest queued)")

    @contextlib.contextmanager
    def slot(self, kind: str, client_id: str, context):
        """Hold one slot of `kind` (and of the client's allowance) for the duration of a request."""
        self.check(kind, context)
        limit = self.per_client.get(client_id, self.per_client.get(WILDCARD))
        if limit is not None and self.by_client.get(client_id, 0) >= limit:
            self._refuse(context, kind, "client_limit",
                         f"client {clip(client_id)} has {limit} requests in flight, its limit (client_concurrency)")
        self.admitted[kind] += 1
        self.metrics.set_admitted(kind, self.admitted[kind])
        self.by_client[client_id] = self.by_client.get(client_id, 0) + 1
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.admitted[kind] -= 1
            self.metrics.set_admitted(kind, self.admitted[kind])
            self.by_client[client_id] -= 1
            if not self.by_client[client_id]:
                del self.by_client[client_id]
            self.seconds[kind] += 0.1 * (time.monotonic() - t0 - self.seconds[kind])

    def check_deadline(self, kind: str, remaining: float | None) -> None:
        """Refuse early a request whose deadline will pass before the queue ahead of it is served."""
        queued = self.admitted[kind] - self.running[kind]
        if remaining is None or queued <= 0:
            return
        wait = math.ceil(queued / self.running[kind]) * self.seconds[kind]
        if remaining < wait:
            self.metrics.record_refusal(kind, "deadline")
            raise RequestError("DEADLINE_EXCEEDED", f"deadline in {remaining:.2f} s cannot be met: about {wait:.1f} s "
                                                    f"of queued {kind} work is ahead; retry later or elsewhere")

    def _refuse(self, context, kind: str, reason: str, why: str) -> None:
        self.metrics.record_refusal(kind, reason)
        hint = self.retry_after_ms(kind)
        context.set_trailing_metadata((("retry-after-ms", str(hint)),))
        raise RequestError("RESOURCE_EXHAUSTED", f"{why}; retry in about {hint / 1000:.1f} s")
