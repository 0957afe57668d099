"""The scheduler: the one thread that touches the model.

Hooks share per-runner state, so every forward pass runs on this thread. Concurrent Score calls
are merged into batches (closed when full or `max_wait_ms` after the first arrival). Concurrent
Generate requests are decoded together in one `Generation` (one forward per step for all rows);
requests arriving while a generation batch decodes join it at the next step boundary (prefilled
on their own, then merged into the KV cache; a cache that cannot be left-padded makes them wait
for the next batch), and waiting Score
batches are served between decode steps so scoring never waits for a long generation.
Cancellation and deadlines are checked before every step, so a cancelled row runs at most one
more step.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from monitor.bank import DetectorBank
from monitor.generation import Generation, Sampling, TokenEvent
from monitor.metrics import Metrics
from monitor.runner import Encoded, ModelRunner, ScoreResult
from monitor.steering import Steering

log = logging.getLogger(__name__)


@dataclass
class Reaction:
    """What a request's policy wants after a token: stop it, and/or switch steering on."""

    block: bool = False
    steer: list[Steering] = field(default_factory=list)


class GenJob:
    """One Generate request as the scheduler sees it. Subclass hooks run on the model thread."""

    def __init__(self, encoded: Encoded, sampling: Sampling, steering: list[Steering] | None = None,
                 deadline: float | None = None):
        self.encoded, self.sampling, self.steering = encoded, sampling, list(steering or [])
        self.deadline = deadline  # time.monotonic() value
        self.arrived = time.monotonic()
        self.steps = 0  # forward steps this request took part in
        self.steps_at_cancel: int | None = None
        self.cancelled = False
        self.finished = threading.Event()

    def cancel(self) -> None:
        """Thread-safe; the row leaves the batch before the next step."""
        if not self.cancelled:
            self.steps_at_cancel = self.steps
            self.cancelled = True

    # hooks, called on the model thread
    def on_start(self, bank: DetectorBank | None) -> None:
        pass

    def on_token(self, event: TokenEvent) -> Reaction:
        return Reaction()

    def on_end(self, reason: str, error: BaseException | None = None) -> None:
        """reason: stop | length | blocked | cancelled | deadline_exceeded | error."""


@dataclass
class _ScoreJob:
    items: list[Encoded]
    future: concurrent.futures.Future
    arrived: float = field(default_factory=time.monotonic)


class Scheduler:
    def __init__(self, runner: ModelRunner, bank: DetectorBank | None, metrics: Metrics | None = None, *,
                 score_batch: int = 16, score_wait_ms: float = 5.0, gen_batch: int = 8, gen_wait_ms: float = 20.0):
        self.runner, self.bank = runner, bank
        self.metrics = metrics or Metrics()
        self.score_batch, self.score_wait = score_batch, score_wait_ms / 1000
        self.gen_batch, self.gen_wait = gen_batch, gen_wait_ms / 1000
        self._cond = threading.Condition()
        self._scores: collections.deque[_ScoreJob] = collections.deque()
        self._gens: collections.deque[GenJob] = collections.deque()
        self._calls: collections.deque[tuple[Callable[[], Any], concurrent.futures.Future]] = collections.deque()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="latentwatch-model", daemon=True)
        self.finished_jobs: collections.deque[GenJob] = collections.deque(maxlen=256)  # for tests/inspection

    # --------------------------------------------------------------------- public, any thread

    def start(self) -> Scheduler:
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Finish queued work, then end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit_score(self, items: list[Encoded]) -> concurrent.futures.Future:
        """Future of (bank, list[ScoreResult]); the bank is the one that scored them."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            self._check_open()
            self._scores.append(_ScoreJob(list(items), fut))
            self.metrics.set_scheduler_queue_depth("score", len(self._scores))
            self._cond.notify_all()
        return fut

    def submit_generate(self, job: GenJob) -> None:
        with self._cond:
            self._check_open()
            self._gens.append(job)
            self.metrics.set_scheduler_queue_depth("generate", len(self._gens))
            self._cond.notify_all()

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run fn on the model thread between batches (reloads, model-side queries)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            self._check_open()
            self._calls.append((fn, fut))
            self._cond.notify_all()
        return fut

    def _check_open(self) -> None:
        if self._stopping:
            raise RuntimeError("scheduler is stopped")

    # -------------------------------------------------------------------------- model thread

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._calls:
                        fn, fut = self._calls.popleft()
                        break
                    now = time.monotonic()
                    score_ready = self._scores and (
                        self._stopping
                        or sum(len(j.items) for j in self._scores) >= self.score_batch
                        or now >= self._scores[0].arrived + self.score_wait
                    )
                    gen_ready = self._gens and (
                        self._stopping
                        or len(self._gens) >= self.gen_batch
                        or now >= self._gens[0].arrived + self.gen_wait
                    )
                    if score_ready or gen_ready:
                        fn = fut = None
                        break
                    if self._stopping and not self._scores and not self._gens:
                        return
                    waits = [self._scores[0].arrived + self.score_wait] if self._scores else []
                    waits += [self._gens[0].arrived + self.gen_wait] if self._gens else []
                    self._cond.wait(max(0.0, min(waits) - now) if waits else None)
            try:
                if fn is not None:
                    self._run_call(fn, fut)
                elif score_ready:
                    self._run_scores()
                else:
                    self._run_generation()
            except Exception:  # noqa: BLE001 - the model thread must outlive any one batch
                log.exception("scheduler batch failed")

    def _run_call(self, fn, fut) -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn())
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            fut.set_exception(e)

    def _take_scores(self, wait: bool) -> list[_ScoreJob]:
        with self._cond:
            jobs, n = [], 0
            while self._scores and (not jobs or n + len(self._scores[0].items) <= self.score_batch):
                job = self._scores.popleft()
                jobs.append(job)
                n += len(job.items)
            self.metrics.set_scheduler_queue_depth("score", len(self._scores))
        return jobs

    def _run_scores(self, wait: bool = True) -> None:
        jobs = [j for j in self._take_scores(wait) if j.future.set_running_or_notify_cancel()]
        if not jobs:
            return
        bank = self.bank
        items = [it for j in jobs for it in j.items]
        try:
            if bank is None or bank.size == 0:
                raise LookupError("no detectors are loaded")
            results = self.runner.score(items, bank, batch_size=self.score_batch, token_scores=True)
            for start in range(0, len(items), self.score_batch):
                self.metrics.observe_batch("score", min(self.score_batch, len(items) - start), "score")
            self.metrics.add_monitor_overhead(self.runner.take_monitor_seconds())
        except BaseException as e:  # noqa: BLE001 - every caller gets the error
            for j in jobs:
                j.future.set_exception(e)
            return
        i = 0
        for j in jobs:
            j.future.set_result((bank, results[i : i + len(j.items)]))
            i += len(j.items)

    def _scores_ready(self) -> bool:
        with self._cond:
            return bool(self._scores) and (
                sum(len(j.items) for j in self._scores) >= self.score_batch
                or time.monotonic() >= self._scores[0].arrived + self.score_wait
            )

    def _run_generation(self) -> None:
        jobs = self._take_gens(self.gen_batch)
        if not jobs:
            return
        bank = self.bank if self.bank is not None and self.bank.size else None
        try:
            gen = Generation(self.runner, [j.encoded for j in jobs], [j.sampling for j in jobs], bank,
                             steering=[j.steering for j in jobs])
        except BaseException as e:  # noqa: BLE001
            log.exception("could not start a generation batch")
            for j in jobs:
                self._end(j, "error", e)
            return
        for j in jobs:
            j.on_start(bank)
        first = True
        try:
            while not gen.done:
                for row in gen.active():
                    if self._finish_if_cancelled(jobs[row]):
                        gen.stop(row)
                if gen.done:
                    break
                active = gen.active()
                events = gen.step()
                self.metrics.observe_batch("generate", len(active), "prefill" if first else "decode")
                self.metrics.add_monitor_overhead(self.runner.take_monitor_seconds())
                first = False
                for row in active:
                    jobs[row].steps += 1
                self._react(gen, jobs, events)
                self._join_waiting(gen, jobs, bank)
                if self._scores_ready():  # Score never waits for a long generation
                    self._run_scores()
                while self._calls_pending_cheap():
                    pass
        except BaseException as e:  # noqa: BLE001 - the batch fails, the server keeps serving
            log.exception("generation batch failed")
            for j in jobs:
                if not j.finished.is_set():
                    self._end(j, "error", e)
        finally:
            gen.close()
            for j in jobs:
                if not j.finished.is_set():
                    self._end(j, "cancelled" if j.cancelled else "error", None)

    def _take_gens(self, n: int) -> list[GenJob]:
        """Up to n queued Generate requests, skipping any cancelled while they waited."""
        with self._cond:
            jobs = [self._gens.popleft() for _ in range(min(n, len(self._gens)))]
            self.metrics.set_scheduler_queue_depth("generate", len(self._gens))
        return [j for j in jobs if not self._finish_if_cancelled(j)]

    def _react(self, gen: Generation, jobs: list[GenJob], events: list[TokenEvent]) -> None:
        """Hand each token to its request; apply what its policy asks for before the next step."""
        for ev in events:
            job = jobs[ev.row]
            reaction = job.on_token(ev)
            if reaction.block:
                if ev.finish_reason is None:
                    gen.stop(ev.row)
                self._end(job, "blocked")
            elif ev.finish_reason is not None:
                self._end(job, ev.finish_reason)
            elif reaction.steer:
                for s in reaction.steer:
                    gen.steer(ev.row, s)

    def _join_waiting(self, gen: Generation, jobs: list[GenJob], bank: DetectorBank | None) -> None:
        """Requests that arrived mid-decode join at this step boundary while the batch has room."""
        room = self.gen_batch - len(gen.active())
        if room <= 0 or gen.done or not gen.can_join:
            return
        waiting = self._take_gens(room)
        if not waiting:
            return
        assert gen.requests == len(jobs)  # request ids index `jobs`
        jobs.extend(waiting)
        for j in waiting:
            j.on_start(bank)
        events = gen.join([j.encoded for j in waiting], [j.sampling for j in waiting], [j.steering for j in waiting])
        self.metrics.observe_batch("generate", len(waiting), "prefill")
        self.metrics.add_monitor_overhead(self.runner.take_monitor_seconds())
        for j in waiting:
            j.steps += 1
        self._react(gen, jobs, events)

    def _calls_pending_cheap(self) -> bool:
        """Calls (e.g. detector reloads) never wait for a running generation either."""
        with self._cond:
            if not self._calls:
                return False
            fn, fut = self._calls.popleft()
        self._run_call(fn, fut)
        return True

    def _finish_if_cancelled(self, job: GenJob) -> bool:
        if job.finished.is_set():
            return True
        if job.cancelled:
            self._end(job, "cancelled")
            return True
        if job.deadline is not None and time.monotonic() >= job.deadline:
            job.cancel()
            self._end(job, "deadline_exceeded")
            return True
        return False

    def _end(self, job: GenJob, reason: str, error: BaseException | None = None) -> None:
        if job.finished.is_set():
            return
        try:
            job.on_end(reason, error)
        except Exception:  # noqa: BLE001
            log.exception("request end hook failed")
        job.finished.set()
        self.finished_jobs.append(job)


__all__ = ["GenJob", "Reaction", "Scheduler", "ScoreResult"]
