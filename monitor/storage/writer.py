"""Background batch writer: the token path calls :meth:`StorageWriter.submit`, nothing else.

``submit`` never blocks and never raises for database trouble: it puts the record on a
bounded ``queue.Queue`` and returns. One daemon thread takes records off the queue and
writes them in batches (up to ``batch_size`` records, or whatever arrived within
``flush_interval_s``), each batch in one transaction.

Loss accounting (nothing is lost silently):

* queue full (or writer closed) -> the record is **dropped**: ``dropped`` counts it, a warning
  is logged (rate-limited) and ``on_drop(record)`` is called;
* a batch that still fails after ``retries`` retries with exponential backoff ->
  ``write_failures`` (batches) and ``records_failed`` (records) count it, an error is logged
  and ``on_failure(exc, n_records)`` is called; the thread carries on with the next batch.

A clean :meth:`close` writes everything submitted before it, then stops.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import URL, Connection, Engine

from monitor.domain import TEXT_POLICIES, TextPolicy
from monitor.storage.engine import mask_url, open_database
from monitor.storage.models import Alert, Base, Detector, Intervention, Request
from monitor.storage.records import (
    AlertRecord,
    DetectorRecord,
    InterventionRecord,
    Record,
    RequestRecord,
    text_sha256,
)

if TYPE_CHECKING:
    from typing import Self

log = logging.getLogger(__name__)

_DROP_LOG_INTERVAL_S = 10.0


class _Marker:
    """Queued by flush()/close(): set once every record queued before it is handled."""

    __slots__ = ("done", "stop")

    def __init__(self, stop: bool = False) -> None:
        self.done = threading.Event()
        self.stop = stop


class StorageWriter:
    """Writes records to the database from one background thread, in batches.

    ``url`` may also be an existing :class:`~sqlalchemy.engine.Engine` (already migrated,
    e.g. from :func:`~monitor.storage.open_database`); the writer then does not dispose it.
    """

    def __init__(
        self,
        url: str | URL | Engine,
        text_policy: TextPolicy = "alerts_only",
        batch_size: int = 256,
        flush_interval_s: float = 0.2,
        max_queue: int = 100_000,
        *,
        retries: int = 3,
        retry_backoff_s: float = 0.1,
        on_failure: Callable[[BaseException, int], None] | None = None,
        on_drop: Callable[[Record], None] | None = None,
    ) -> None:
        if text_policy not in TEXT_POLICIES:
            raise ValueError(f"text_policy must be one of {TEXT_POLICIES}, got {text_policy!r}")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if max_queue < 1:
            raise ValueError("max_queue must be >= 1")
        self._url = url
        self.text_policy: TextPolicy = text_policy
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.retries = retries
        self.retry_backoff_s = retry_backoff_s
        self.on_failure = on_failure
        self.on_drop = on_drop

        self._queue: queue.Queue[Record | _Marker] = queue.Queue(maxsize=max_queue)
        self._lock = threading.Lock()  # guards _closed vs. enqueue, and the counters
        self._closed = False
        self._thread: threading.Thread | None = None
        self._engine: Engine | None = url if isinstance(url, Engine) else None
        self._owns_engine = not isinstance(url, Engine)
        self._dropped = 0
        self._write_failures = 0
        self._records_failed = 0
        self._written = 0
        self._last_drop_log = 0.0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Self:
        """Open the database (running migrations) and start the writer thread.

        Raises :class:`~monitor.storage.StorageError` if the database cannot be opened, so a
        misconfigured service fails at startup rather than on the first alert.
        """
        with self._lock:
            if self._closed:
                raise RuntimeError("StorageWriter is closed")
            if self._thread is not None:
                return self
        if self._engine is None:
            self._engine = open_database(self._url)
        thread = threading.Thread(target=self._run, name="latentwatch-storage", daemon=True)
        with self._lock:
            self._thread = thread
        thread.start()
        return self

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise RuntimeError("StorageWriter not started")
        return self._engine

    # ------------------------------------------------------------------ token path

    def submit(self, record: Record) -> bool:
        """Queue ``record`` for writing. Never blocks, thread-safe.

        Returns False if the record was dropped (queue full, or writer closed).
        """
        with self._lock:
            if not self._closed:
                try:
                    self._queue.put_nowait(record)
                    return True
                except queue.Full:
                    reason = f"queue full ({self._queue.maxsize} records)"
            else:
                reason = "writer closed"
            self._dropped += 1
            dropped = self._dropped
            now = time.monotonic()
            should_log = now - self._last_drop_log >= _DROP_LOG_INTERVAL_S
            if should_log:
                self._last_drop_log = now
        if should_log:
            log.warning(
                "storage: DROPPED %s for request %s: %s; %d records dropped so far",
                type(record).__name__,
                getattr(record, "request_id", "-"),
                reason,
                dropped,
            )
        self._call(self.on_drop, record)
        return False

    # ------------------------------------------------------------------ shutdown / sync

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every record submitted before this call has been handled (written, or
        counted as failed). Returns False if that did not happen within ``timeout``."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            raise RuntimeError("StorageWriter not running (call start())")
        marker = _Marker()
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            self._queue.put(marker, timeout=timeout)
        except queue.Full:
            return False
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        return marker.done.wait(remaining)

    def close(self, timeout: float | None = None) -> bool:
        """Write everything submitted so far, then stop the thread (and dispose the engine if
        the writer created it). Later submits are dropped. Returns False if draining did not
        finish within ``timeout`` (the daemon thread keeps draining in the background)."""
        with self._lock:
            already = self._closed
            self._closed = True
            thread = self._thread
        if thread is None:
            pending = self._queue.qsize()
            if pending and not already:
                with self._lock:
                    self._dropped += pending
                log.error("storage: writer closed before start(); %d records DROPPED", pending)
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        if not already:
            try:
                self._queue.put(_Marker(stop=True), timeout=timeout)
            except queue.Full:
                log.error(
                    "storage: close() timed out; %d records not yet written", self._queue.qsize()
                )
                return False
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        thread.join(remaining)
        if thread.is_alive():
            log.error("storage: close() timed out; %d records not yet written", self._queue.qsize())
            return False
        if self._owns_engine and self._engine is not None:
            self._engine.dispose()
        return True

    # ------------------------------------------------------------------ observability

    @property
    def queue_depth(self) -> int:
        """Records (and flush markers) waiting to be written."""
        return self._queue.qsize()

    @property
    def write_failures(self) -> int:
        """Batches given up on after all retries."""
        return self._write_failures

    @property
    def records_failed(self) -> int:
        """Records in those batches (lost)."""
        return self._records_failed

    @property
    def dropped(self) -> int:
        """Records refused by ``submit`` (queue full or writer closed)."""
        return self._dropped

    @property
    def written(self) -> int:
        """Records committed to the database."""
        return self._written

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------ writer thread

    def _run(self) -> None:
        stop = False
        while not stop:
            batch: list[Record] = []
            markers: list[_Marker] = []
            try:
                stop = self._collect(batch, markers)
                if stop:  # submits racing close() may sit behind the stop marker
                    self._drain_nowait(batch, markers)
                for i in range(0, len(batch), self.batch_size):
                    self._write_with_retry(batch[i : i + self.batch_size])
            except Exception:  # never let the thread die
                log.exception("storage: unexpected error in writer thread")
            finally:
                for m in markers:
                    m.done.set()
        log.debug("storage: writer thread stopped")

    def _collect(self, batch: list[Record], markers: list[_Marker]) -> bool:
        """Fill ``batch`` (blocking for the first item). True when a stop marker was seen."""
        item = self._queue.get()
        deadline = time.monotonic() + self.flush_interval_s
        while True:
            if isinstance(item, _Marker):
                markers.append(item)
                return item.stop  # flush/close requested: write what we have now
            batch.append(item)
            if len(batch) >= self.batch_size:
                return False
            remaining = deadline - time.monotonic()
            try:
                item = (
                    self._queue.get(timeout=remaining)
                    if remaining > 0
                    else (self._queue.get_nowait())
                )
            except queue.Empty:
                return False

    def _drain_nowait(self, batch: list[Record], markers: list[_Marker]) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Marker):
                markers.append(item)
            else:
                batch.append(item)

    def _write_with_retry(self, batch: list[Record]) -> None:
        delay = self.retry_backoff_s
        for attempt in range(self.retries + 1):
            try:
                with self.engine.begin() as conn:
                    self._write_batch(conn, batch)
            except Exception as exc:  # noqa: BLE001  (any failure: retry, then count)
                if attempt < self.retries:
                    log.warning(
                        "storage: writing %d records failed (attempt %d/%d), retrying in %.2fs: %s",
                        len(batch),
                        attempt + 1,
                        self.retries + 1,
                        delay,
                        exc,
                    )
                    time.sleep(delay)
                    delay *= 2
                    continue
                with self._lock:
                    self._write_failures += 1
                    self._records_failed += len(batch)
                log.error(
                    "storage: giving up on a batch of %d records after %d attempts "
                    "(database %s); %d batches / %d records lost so far: %s",
                    len(batch),
                    attempt + 1,
                    mask_url(self.engine.url),
                    self._write_failures,
                    self._records_failed,
                    exc,
                )
                self._call(self.on_failure, exc, len(batch))
                return
            with self._lock:
                self._written += len(batch)
            return

    def _write_batch(self, conn: Connection, batch: list[Record]) -> None:
        requests: dict[str, dict[str, Any]] = {}
        alerts: dict[str, dict[str, Any]] = {}
        interventions: dict[str, dict[str, Any]] = {}
        detectors: dict[tuple[str, str], dict[str, Any]] = {}
        for rec in batch:  # later records with the same key replace earlier ones
            if isinstance(rec, RequestRecord):
                requests[rec.request_id] = self._request_row(rec)
            elif isinstance(rec, AlertRecord):
                alerts[rec.alert_id] = self._alert_row(rec)
            elif isinstance(rec, InterventionRecord):
                interventions[rec.intervention_id] = _intervention_row(rec)
            elif isinstance(rec, DetectorRecord):
                detectors[(rec.detector_id, rec.version)] = _detector_row(rec)
            else:
                log.error("storage: ignoring unknown record type %s", type(rec).__name__)
        if requests:
            _upsert(conn, Request, list(requests.values()), ["request_id"])
        if alerts:  # an upsert: a batch retried after an unclear commit must not fail on its own rows
            _upsert(conn, Alert, list(alerts.values()), ["alert_id"])
        if interventions:
            _upsert(conn, Intervention, list(interventions.values()), ["id"])
        if detectors:
            _upsert(conn, Detector, list(detectors.values()), ["id", "version"])

    def _request_row(self, rec: RequestRecord) -> dict[str, Any]:
        keep_text = self.text_policy == "always" or (
            self.text_policy == "alerts_only" and rec.alerted
        )
        return {
            "request_id": rec.request_id,
            "created_at": rec.created_at,
            "finished_at": rec.finished_at,
            "client_id": rec.client_id,
            "conversation_id": rec.conversation_id,
            "tags": dict(rec.tags),
            "kind": rec.kind,
            "model_id": rec.model_id,
            "finish_reason": rec.finish_reason,
            "prompt_tokens": rec.prompt_tokens,
            "completion_tokens": rec.completion_tokens,
            "prompt_text": rec.prompt_text if keep_text else None,
            "completion_text": rec.completion_text if keep_text else None,
            "text_sha256": text_sha256(rec.prompt_text, rec.completion_text),
            "alerted": rec.alerted,
            "snapshot_version": rec.snapshot_version,
        }

    def _alert_row(self, rec: AlertRecord) -> dict[str, Any]:
        return {
            "alert_id": rec.alert_id,
            "request_id": rec.request_id,
            "created_at": rec.created_at,
            "detector_id": rec.detector_id,
            "detector_version": rec.detector_version,
            "score": rec.score,
            "threshold": rec.threshold,
            "token_index": rec.token_index,
            "span_start": rec.span_start,
            "span_end": rec.span_end,
            # "never" keeps no text at all: the flagged span is text too (offsets stay).
            "span_text": None if self.text_policy == "never" else rec.span_text,
            "action": rec.action,
            "client_id": rec.client_id,
            "snapshot_version": rec.snapshot_version,
            "request_kind": rec.request_kind,
            "input_index": rec.input_index,
            "conversation_id": rec.conversation_id,
            "tags": dict(rec.tags),
        }

    @staticmethod
    def _call(fn: Callable[..., None] | None, *args: Any) -> None:
        if fn is None:
            return
        try:
            fn(*args)
        except Exception:
            log.exception("storage: callback %r raised", fn)


def _intervention_row(rec: InterventionRecord) -> dict[str, Any]:
    return {
        "id": rec.intervention_id,
        "request_id": rec.request_id,
        "created_at": rec.created_at,
        "kind": rec.kind,
        "detector_id": rec.detector_id,
        "trigger": rec.trigger,
        "steering_kind": rec.steering_kind,
        "hook_point": rec.hook_point,
        "vector_id": rec.vector_id,
        "coefficient": rec.coefficient,
        "details": dict(rec.details),
        "snapshot_version": rec.snapshot_version,
        "client_id": rec.client_id,
        "token_start": rec.token_start,
        "token_end": rec.token_end,
    }


def _detector_row(rec: DetectorRecord) -> dict[str, Any]:
    return {
        "id": rec.detector_id,
        "version": rec.version,
        "kind": rec.kind,
        "hook_point": rec.hook_point,
        "threshold": rec.threshold,
        "calibration": dict(rec.calibration),
        "metrics": dict(rec.metrics),
        "loaded_at": rec.loaded_at,
    }


def _upsert(
    conn: Connection, model: type[Base], rows: list[dict[str, Any]], keys: list[str]
) -> None:
    """INSERT ... ON CONFLICT (keys) DO UPDATE (PostgreSQL and SQLite >= 3.24)."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    else:
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    stmt = dialect_insert(model.__table__)
    stmt = stmt.on_conflict_do_update(
        index_elements=keys,
        set_={c: stmt.excluded[c] for c in rows[0] if c not in keys},
    )
    conn.execute(stmt, rows)
