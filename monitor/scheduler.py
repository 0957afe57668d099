"""The scheduler: the one thread that touches the model.

Hooks share per-runner state, so every forward pass runs on this thread. Every job carries the
detector bank of the snapshot it was admitted with, and the scheduler never mixes banks:
concurrent Score calls are merged into batches of one bank (closed when full or `max_wait_ms`
after the first arrival); Generate requests decode together in one `Generation` per bank (one
forward per step for all its rows). A request arriving while a batch of its bank decodes joins
it at the next step boundary (prefilled on its own, then merged into the KV cache; a cache that
cannot be left-padded makes it start a batch of its own). After a reload, batches of the old
bank drain while new ones start beside them, stepped in turn. Waiting Score batches and calls
are served between decode steps, so neither waits for a long generation. Cancellation and
deadlines are checked before every step, so a cancelled row runs at most one more step.
"""

from __future__ import annotations

import collections
import concurrent.futures
import ctypes
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from monitor.bank import DetectorBank
from monitor.decisions import Reaction
from monitor.generation import Generation, Sampling, TokenEvent
from monitor.metrics import Metrics
from monitor.runner import Encoded, ModelRunner, ScoreResult
from monitor.steering import Steering

log = logging.getLogger(__name__)


class GenJob:
    """One Generate request as the scheduler sees it. Subclass hooks run on the model thread."""

    def __init__(self, encoded: Encoded, sampling: Sampling, steering: list[Steering] | None = None,
                 deadline: float | None = None, bank: DetectorBank | None = None):
        self.encoded, self.sampling, self.steering = encoded, sampling, list(steering or [])
        self.bank = bank if bank is not None and bank.size else None  # the admitted snapshot's
        self.deadline = deadline  # time.monotonic() value
        self.arrived = time.monotonic()
        self.steps = 0  # forward steps this request took part in
        self.steps_at_cancel: int | None = None
        self.cancelled = False
        self.reason: str | None = None  # how it ended: monitor.domain.END_REASONS
        self.finished = threading.Event()

    def cancel(self) -> None:
        """Thread-safe; the row leaves the batch before the next step. A no-op once it ended."""
        if not self.cancelled and not self.finished.is_set():
            self.steps_at_cancel = self.steps
            self.cancelled = True

    # hooks, called on the model thread
    def on_token(self, event: TokenEvent) -> Reaction:
        return Reaction()

    def on_end(self, reason: str, error: BaseException | None = None) -> None:
        """reason: stop | length | blocked | cancelled | deadline_exceeded | error."""


@dataclass
class _ScoreJob:
    items: list[Encoded]
    bank: DetectorBank
    future: concurrent.futures.Future
    arrived: float = field(default_factory=time.monotonic)


@dataclass
class _Batch:
    """One running Generation and its jobs; request ids index `jobs`."""

    gen: Generation
    jobs: list[GenJob]
    bank: DetectorBank | None
    prefilled: bool = False


class Scheduler:
    def __init__(self, runner: ModelRunner, metrics: Metrics | None = None, *, score_batch: int = 16,
                 score_wait_ms: float = 5.0, gen_batch: int = 8, gen_wait_ms: float = 20.0, nice: int = 0):
        self.runner = runner
        self.nice = nice
        self.metrics = metrics or Metrics()
        self.score_batch, self.score_wait = score_batch, score_wait_ms / 1000
        self.gen_batch, self.gen_wait = gen_batch, gen_wait_ms / 1000
        self._cond = threading.Condition()
        self._scores: collections.deque[_ScoreJob] = collections.deque()
        self._gens: collections.deque[GenJob] = collections.deque()
        self._calls: collections.deque[tuple[Callable[[], Any], concurrent.futures.Future]] = collections.deque()
        self._batches: list[_Batch] = []  # model thread only
        self._stopping = False
        self._trim = _Trim()
        self._thread = threading.Thread(target=self._run, name="latentwatch-model", daemon=True)

    # --------------------------------------------------------------------- public, any thread

    def start(self) -> Scheduler:
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Finish queued and running work, then end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit_score(self, items: list[Encoded], bank: DetectorBank) -> concurrent.futures.Future:
        """Future of list[ScoreResult], scored by `bank` (the caller's snapshot)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            self._check_open()
            self._scores.append(_ScoreJob(list(items), bank, fut))
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
        """Run fn on the model thread between forward passes (model-side queries)."""
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
        _lower_priority(self.nice)
        while True:
            with self._cond:
                while not (self._calls or self._batches or self._score_ready() or self._gen_ready()):
                    if self._stopping and not self._scores and not self._gens:
                        return
                    self._cond.wait(self._next_deadline())
            try:
                self._run_calls()
                if self._score_ready(locked=False):
                    self._run_scores()
                self._admit()
                for batch in list(self._batches):
                    self._step(batch)
                self._trim.maybe()
            except Exception:  # noqa: BLE001 - the model thread must outlive any one batch
                log.exception("scheduler iteration failed")

    def _next_deadline(self) -> float | None:
        now = time.monotonic()
        waits = [self._scores[0].arrived + self.score_wait] if self._scores else []
        waits += [self._gens[0].arrived + self.gen_wait] if self._gens else []
        return max(0.0, min(waits) - now) if waits else None

    def _score_ready(self, locked: bool = True) -> bool:
        if not locked:
            with self._cond:
                return self._score_ready()
        return bool(self._scores) and (
            self._stopping
            or sum(len(j.items) for j in self._scores) >= self.score_batch
            or time.monotonic() >= self._scores[0].arrived + self.score_wait
        )

    def _gen_ready(self) -> bool:
        return bool(self._gens) and (
            self._stopping
            or len(self._gens) >= self.gen_batch
            or time.monotonic() >= self._gens[0].arrived + self.gen_wait
        )

    def _run_calls(self) -> None:
        while True:
            with self._cond:
                if not self._calls:
                    return
                fn, fut = self._calls.popleft()
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    fut.set_exception(e)

    # ------------------------------------------------------------------------------- scoring

    def _take_scores(self) -> list[_ScoreJob]:
        """The oldest waiting Score jobs of the oldest job's bank, up to a batch of inputs."""
        with self._cond:
            if not self._scores:
                return []
            bank, jobs, n, rest = self._scores[0].bank, [], 0, collections.deque()
            while self._scores:
                job = self._scores.popleft()
                if job.bank is bank and (not jobs or n + len(job.items) <= self.score_batch):
                    jobs.append(job)
                    n += len(job.items)
                else:
                    rest.append(job)
            self._scores = rest
            self.metrics.set_scheduler_queue_depth("score", len(self._scores))
        return [j for j in jobs if j.future.set_running_or_notify_cancel()]

    def _run_scores(self) -> None:
        jobs = self._take_scores()
        if not jobs:
            return
        items = [it for j in jobs for it in j.items]
        try:
            results = self.runner.score(items, jobs[0].bank, batch_size=self.score_batch, token_scores=True)
            for start in range(0, len(items), self.score_batch):
                self.metrics.observe_batch("score", min(self.score_batch, len(items) - start), "score")
            self.metrics.add_monitor_overhead(self.runner.take_monitor_seconds())
        except BaseException as e:  # noqa: BLE001 - every caller gets the error
            for j in jobs:
                j.future.set_exception(e)
            return
        i = 0
        for j in jobs:
            j.future.set_result(results[i : i + len(j.items)])
            i += len(j.items)

    # ---------------------------------------------------------------------------- generation

    def _admit(self) -> None:
        """Waiting Generate requests join a running batch of their bank at this step boundary, or
        start a batch of their own once the oldest waited `max_wait_ms` (or a batch's worth waits)."""
        room = self.gen_batch - sum(len(b.gen.active()) for b in self._batches)
        for batch in self._batches:
            if room > 0 and not batch.gen.done and batch.gen.can_join:
                room -= self._join(batch, self._take_gens(room, batch.bank))
        with self._cond:
            if room <= 0 or not self._gen_ready():
                return
            bank = self._gens[0].bank
        jobs = self._take_gens(room, bank)
        if jobs:
            self._start(jobs, bank)

    def _take_gens(self, n: int, bank: DetectorBank | None) -> list[GenJob]:
        """Up to n queued Generate requests of this bank, oldest first, skipping cancelled ones."""
        with self._cond:
            jobs, rest = [], collections.deque()
            while self._gens:
                job = self._gens.popleft()
                (jobs if job.bank is bank and len(jobs) < n else rest).append(job)
            self._gens = rest
            self.metrics.set_scheduler_queue_depth("generate", len(self._gens))
        return [j for j in jobs if not self._finish_if_cancelled(j)]

    def _start(self, jobs: list[GenJob], bank: DetectorBank | None) -> None:
        try:
            gen = Generation(self.runner, [j.encoded for j in jobs], [j.sampling for j in jobs], bank,
                             steering=[j.steering for j in jobs])
        except BaseException as e:  # noqa: BLE001
            log.exception("could not start a generation batch")
            for j in jobs:
                self._end(j, "error", e)
            return
        self._batches.append(_Batch(gen, jobs, bank))

    def _join(self, batch: _Batch, waiting: list[GenJob]) -> int:
        if not waiting:
            return 0
        batch.jobs.extend(waiting)
        events = batch.gen.join([j.encoded for j in waiting], [j.sampling for j in waiting],
                                [j.steering for j in waiting])
        self.metrics.observe_batch("generate", len(waiting), "prefill")
        self.metrics.add_monitor_overhead(self.runner.take_monitor_seconds())
        for j in waiting:
            j.steps += 1
        self._react(batch, events)
        return len(waiting)

    def _step(self, batch: _Batch) -> None:
        """One forward step of one batch; a batch that fails ends its own requests only."""
        gen, jobs = batch.gen, batch.jobs
        try:
            for row in gen.active():
                if self._finish_if_cancelled(jobs[row]):
                    gen.stop(row)
            if not gen.done:
                active = gen.active()
                events = gen.step()
                self.metrics.observe_batch("generate", len(active), "decode" if batch.prefilled else "prefill")
                self.metrics.add_monitor_overhead(self.runner.take_monitor_seconds())
                batch.prefilled = True
                for row in active:
                    jobs[row].steps += 1
                self._react(batch, events)
        except BaseException as e:  # noqa: BLE001 - the batch fails, the server keeps serving
            log.exception("generation batch failed")
            for j in jobs:
                self._end(j, "error", e)
            gen.close()
        if gen.done:
            gen.close()
            for j in jobs:
                self._end(j, "cancelled" if j.cancelled else "error", None)
            self._batches.remove(batch)

    def _react(self, batch: _Batch, events: list[TokenEvent]) -> None:
        """Hand each token to its request; apply what its policy asks for before the next step."""
        for ev in events:
            job = batch.jobs[ev.row]
            reaction = job.on_token(ev)
            if reaction.block:
                if ev.finish_reason is None:
                    batch.gen.stop(ev.row)
                self._end(job, "blocked")
            elif ev.finish_reason is not None:
                self._end(job, ev.finish_reason)
            else:
                for s in reaction.steer:
                    batch.gen.steer(ev.row, s)

    def _finish_if_cancelled(self, job: GenJob) -> bool:
        if job.finished.is_set():
            return True
        if job.deadline is not None and time.monotonic() >= job.deadline:
            job.cancel()
            self._end(job, "deadline_exceeded")
            return True
        if job.cancelled:
            self._end(job, "cancelled")
            return True
        return False

    def _end(self, job: GenJob, reason: str, error: BaseException | None = None) -> None:
        if job.finished.is_set():
            return
        job.reason = reason
        try:
            job.on_end(reason, error)
        except Exception:  # noqa: BLE001
            log.exception("request end hook failed")
        job.finished.set()


__all__ = ["GenJob", "Reaction", "Scheduler", "ScoreResult"]


def _lower_priority(nice: int) -> None:
    """Lower this thread's CPU priority by `nice` (the intra-op threads torch starts from it
    inherit it), so the event loop (health, refusals, token delivery) is not starved when the
    model saturates the CPU. Linux only: elsewhere priority is per process."""
    if not nice or sys.platform != "linux":
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except OSError as e:
        log.warning("could not lower the model thread's priority (model_thread_nice=%d): %s", nice, e)


MMAP_THRESHOLD = 128 * 1024  # glibc's initial value, kept


def pin_mmap_threshold(size: int = MMAP_THRESHOLD) -> bool:
    """Give every allocation over `size` its own mapping, returned to the OS when freed (glibc only;
    an operator's MALLOC_MMAP_THRESHOLD_ wins). Whether it took.

    glibc raises its mmap threshold each time a mapped block is freed, up to 32 MiB, after which
    activations and KV caches of ever-changing shapes come from the heap and fragment it. Setting
    the threshold stops that adjustment. `bench/soak.py` (10 minutes, 32 streams) grew RSS by
    4.4-10 MB a minute in four runs before; with it pinned, +0.66 (MALLOC_MMAP_THRESHOLD_ at
    process start) and +1.88 (this, called before the model loads)."""
    if sys.platform != "linux" or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    return mallopt(-3, size) == 1  # M_MMAP_THRESHOLD


class _Trim:
    """Hands freed heap memory back to the OS every `interval` s of model work (glibc only).

    Batches of changing shapes free and allocate tensors of ever-different sizes; glibc keeps
    the freed pages, so a steady load grew RSS by a few MB a minute (`bench/soak.py`), though
    nothing leaked. `malloc_trim` releases them; ctypes drops the GIL for the call (~2 ms)."""

    def __init__(self, interval: float = 10.0):
        self.interval, self.last = interval, time.monotonic()
        try:
            self.fn = ctypes.CDLL(None).malloc_trim if sys.platform == "linux" else None
        except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
            self.fn = None

    def maybe(self) -> None:
        if self.fn is not None and time.monotonic() - self.last >= self.interval:
            self.fn(0)
            self.last = time.monotonic()
