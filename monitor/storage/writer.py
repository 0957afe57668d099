"""Background writer: records go into the journal at once, and from there into the database.

:meth:`StorageWriter.submit` appends the record to the :class:`~monitor.storage.journal.Journal`
(on disk when it returns) and wakes one daemon thread, which reads the journal in order and
writes batches (up to ``batch_size`` records, or whatever arrived within ``flush_interval_s``),
each in one transaction, and commits them in the journal only after the database did. While
the database is down nothing is dropped: the batch is retried with capped exponential backoff
for as long as it takes and the journal holds what arrives meanwhile, across restarts too
(:meth:`start` writes what an earlier process left before anything new).

Accounting (nothing is lost silently):

* journal full (``journal_max_bytes``): under ``journal_full="fail_closed"`` :meth:`submit`
  raises :class:`StorageFull` and :attr:`accepting` is False until there is room again
  (``on_accepting(bool)`` hears both); under ``"fail_open"`` the record is **dropped**:
  ``dropped`` counts it, a warning is logged (rate-limited), ``on_drop(record)`` is called;
* a failed write -> ``write_failures`` counts it and ``on_failure(exc, n_records)`` is
  called; the records stay in the journal and the write is tried again;
* a record the database refuses for what it holds (a DataError or IntegrityError, e.g. a
  number beyond its column's range) goes to the journal's ``rejected.jsonl`` instead:
  ``records_failed`` counts it, an error is logged, ``on_reject(record, exc)`` is called.
"""

from __future__ import annotations

import functools
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.exc import DataError, IntegrityError

from monitor.domain import TEXT_POLICIES, TextPolicy
from monitor.storage.engine import StorageFull, open_database
from monitor.storage.journal import DEFAULT_MAX_BYTES, Entry, Journal, JournalFull
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

_LOG_INTERVAL_S = 10.0
_GATHER_POLL_S = 0.02
_REFUSED = (DataError, IntegrityError)  # the record's own content: retrying cannot help
_ABORT_WAIT_S = 15.0  # close() after its timeout: how long a write in progress may take to notice
JournalFullPolicy = Literal["fail_closed", "fail_open"]


class _Stopped(Exception):
    """close() stopped waiting: the thread leaves what is not written in the journal."""


def _reason(exc: BaseException) -> str:
    """The driver's message only: SQLAlchemy's own text carries the SQL and its parameters."""
    orig = getattr(exc, "orig", None) or exc
    return f"{type(orig).__name__}: {(str(orig).splitlines() or [''])[0]}"


class StorageWriter:
    """Writes records to the database from one background thread, through the journal.

    ``url`` may also be an existing :class:`~sqlalchemy.engine.Engine` (already migrated,
    e.g. from :func:`~monitor.storage.open_database`); the writer then does not dispose it.
    ``journal_dir`` None journals into a temporary folder that :meth:`close` removes: that
    survives a database outage but not a restart (for tools and tests). The journal is opened
    here (StorageError when its folder cannot be used), so records may be submitted before
    :meth:`start`.
    """

    def __init__(
        self,
        url: str | URL | Engine,
        text_policy: TextPolicy = "alerts_only",
        batch_size: int = 256,
        flush_interval_s: float = 0.2,
        *,
        journal_dir: str | Path | None = None,
        journal_max_bytes: int = DEFAULT_MAX_BYTES,
        journal_full: JournalFullPolicy = "fail_closed",
        retry_backoff_s: float = 0.1,
        max_backoff_s: float = 2.0,
        replay_timeout_s: float = 60.0,
        on_failure: Callable[[BaseException, int], None] | None = None,
        on_drop: Callable[[Record], None] | None = None,
        on_reject: Callable[[Record, BaseException], None] | None = None,
        on_accepting: Callable[[bool], None] | None = None,
    ) -> None:
        if text_policy not in TEXT_POLICIES:
            raise ValueError(f"text_policy must be one of {TEXT_POLICIES}, got {text_policy!r}")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if journal_full not in ("fail_closed", "fail_open"):
            raise ValueError(f"journal_full must be fail_closed or fail_open, got {journal_full!r}")
        self._url = url
        self.text_policy: TextPolicy = text_policy
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.journal_full: JournalFullPolicy = journal_full
        self.retry_backoff_s = retry_backoff_s
        self.max_backoff_s = max_backoff_s
        self.replay_timeout_s = replay_timeout_s
        self.on_failure = on_failure
        self.on_drop = on_drop
        self.on_reject = on_reject
        self.on_accepting = on_accepting

        self._tmpdir = None if journal_dir is not None else tempfile.mkdtemp(prefix="latentwatch-journal-")
        self.journal = Journal(journal_dir or self._tmpdir, journal_max_bytes).open()
        self._lock = threading.Lock()  # guards _closed vs. appends, the counters and the flags
        self._wake = threading.Event()  # set by submit, flush and close
        self._hurry = threading.Event()  # set by flush and close: a batch being gathered goes now
        self._progress = threading.Condition()  # notified on every commit and failed write
        self._urgent = 0  # flush() calls waiting: no batching delay
        self._stopping = False
        self._abort = threading.Event()
        self._closed = False
        self._full = False
        self._failing_since: float | None = None
        self._thread: threading.Thread | None = None
        self._engine: Engine | None = url if isinstance(url, Engine) else None
        self._owns_engine = not isinstance(url, Engine)
        self._dropped = 0
        self._write_failures = 0
        self._records_failed = 0
        self._written = 0
        self._last_drop_log = 0.0
        self._last_retry_log = 0.0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Self:
        """Open the database (running migrations), start the writer thread, and write what an
        earlier process left in the journal before returning (up to ``replay_timeout_s``).

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
        if self.replayed:
            t0 = time.monotonic()
            if self.flush(self.replay_timeout_s):
                log.info("storage: wrote the %d records an earlier run left in the journal %s (%.1f s)",
                         self.replayed, self.journal.folder, time.monotonic() - t0)
            else:
                log.warning("storage: %d records of an earlier run are still being written from the journal %s",
                            self.depth, self.journal.folder)
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
        """Append ``record`` to the journal; it is on disk when this returns if a client may hear
        of it (alerts, interventions, finished requests); an admission row or a detector row is
        synced with the next of those, or by the writer thread within 0.1 s. Thread-safe.

        Returns False if the record was dropped (writer closed, or journal full under
        fail_open). Raises :class:`StorageFull` if the journal is full under fail_closed.
        """
        with self._lock:
            closed = self._closed
            if not closed:
                try:
                    self.journal.append(record, sync=_told(record))
                except JournalFull as exc:
                    full = exc
                else:
                    self._wake.set()
                    return True
        if closed:
            return self._drop(record, "writer closed")
        self._set_full(full)
        if self.journal_full == "fail_closed":
            raise StorageFull(self.refusal)
        return self._drop(record, f"journal full: {full}")

    def _drop(self, record: Record, reason: str) -> bool:
        now = time.monotonic()
        with self._lock:
            self._dropped += 1
            dropped = self._dropped
            should_log = now - self._last_drop_log >= _LOG_INTERVAL_S
            if should_log:
                self._last_drop_log = now
        if should_log:
            log.warning("storage: DROPPED %s for request %s: %s; %d records dropped so far",
                        type(record).__name__, getattr(record, "request_id", "-"), reason, dropped)
        self._call(self.on_drop, record)
        return False

    @property
    def accepting(self) -> bool:
        """False while the journal is full under fail_closed: admit no new requests."""
        return not (self._full and self.journal_full == "fail_closed")

    @property
    def refusal(self) -> str:
        """What a client is told while the journal is full (nothing internal: safe to send)."""
        down = self.outage_s
        why = f"the database has been unreachable for {down:.0f} s" if down else "the database is not keeping up"
        return f"alert journal full: {why}; retry on another replica"

    def _set_full(self, exc: JournalFull) -> None:
        with self._lock:
            was, self._full = self._full, True
        if not was:
            log.error("storage: the alert journal %s is full (%s): %s", self.journal.folder, exc,
                      "refusing new requests" if self.journal_full == "fail_closed" else "DROPPING records")
            if self.journal_full == "fail_closed":
                self._call(self.on_accepting, False)

    def _check_room(self) -> None:
        """Full no more once a segment's worth is free (or nothing is pending)."""
        j = self.journal
        with self._lock:
            room = self._full and (j.free_bytes >= j.segment_bytes or not j.depth)
            if room:
                self._full = False
        if room:
            log.info("storage: the alert journal %s has room again", j.folder)
            if self.journal_full == "fail_closed":
                self._call(self.on_accepting, True)

    # ------------------------------------------------------------------ shutdown / sync

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every record submitted before this call is in the database. Returns False
        after ``timeout``, and at once while writes are failing (the records are safe in the
        journal, and waiting would not bring the database back)."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            raise RuntimeError("StorageWriter not running (call start())")
        target = self.journal.last_seq
        with self._progress:
            self._urgent += 1
            self._wake.set()
            self._hurry.set()
            try:
                self._progress.wait_for(
                    lambda: self.journal.done_seq >= target or self._failing_since is not None
                    or not thread.is_alive(), timeout)
            finally:
                self._urgent -= 1
        return self.journal.done_seq >= target

    def close(self, timeout: float | None = None) -> bool:
        """Write what the journal holds, then stop the thread (and dispose the engine if the writer
        created it). Later submits are dropped. Returns False if that did not finish within
        ``timeout``, or while writes are failing: what is left stays in the journal, and the
        next start writes it."""
        with self._lock:
            if self._closed:
                return self.journal.depth == 0
            self._closed = True
            thread = self._thread
        if thread is not None:
            self._stopping = True
            self._wake.set()
            self._hurry.set()
            deadline = None if timeout is None else time.monotonic() + timeout
            while thread.is_alive() and self._failing_since is None:
                thread.join(0.1 if deadline is None else max(0.0, min(0.1, deadline - time.monotonic())))
                if deadline is not None and time.monotonic() >= deadline:
                    break
            self._abort.set()
            thread.join(_ABORT_WAIT_S)
        left = self.journal.depth
        if left:
            log.warning("storage: %d records are not in the database yet; they stay in the journal %s%s", left,
                        self.journal.folder, " (temporary: LOST)" if self._tmpdir else " for the next start")
        if thread is not None and thread.is_alive():
            return False  # a write still in progress keeps the journal and the engine
        self.journal.close()
        if self._owns_engine and self._engine is not None:
            self._engine.dispose()
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
        return not left

    # ------------------------------------------------------------------ observability

    @property
    def depth(self) -> int:
        """Records in the journal, not yet in the database."""
        return self.journal.depth

    @property
    def oldest_pending_s(self) -> float:
        """Age of the oldest record not yet in the database (0 when there is none)."""
        return self.journal.oldest_age_s

    @property
    def journal_bytes(self) -> int:
        return self.journal.size_bytes

    @property
    def replayed(self) -> int:
        """Records an earlier process left in the journal, written by :meth:`start`."""
        return self.journal.replayed

    @property
    def outage_s(self) -> float:
        """How long writes have been failing (0 while they succeed)."""
        since = self._failing_since
        return 0.0 if since is None else time.monotonic() - since

    @property
    def write_failures(self) -> int:
        """Write attempts that failed (their records stayed in the journal)."""
        return self._write_failures

    @property
    def records_failed(self) -> int:
        """Records the database refused, kept in the journal's ``rejected.jsonl``."""
        return self._records_failed

    @property
    def dropped(self) -> int:
        """Records refused by ``submit`` (writer closed, or journal full under fail_open)."""
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
        while True:
            try:
                batch = self._collect()
                if batch is None:
                    break
                self._write(batch)
                self.journal.commit(batch)
                self._check_room()
            except _Stopped:
                break
            except Exception:  # never let the thread die: what is not committed stays in the journal
                log.exception("storage: unexpected error in the writer thread")
                if self._abort.wait(self.max_backoff_s):
                    break
            finally:
                with self._progress:
                    self._progress.notify_all()
        log.debug("storage: writer thread stopped")

    def _collect(self) -> list[Entry] | None:
        """The next batch: wait for a first entry, then up to ``flush_interval_s`` for a full
        batch unless a flush or close is waiting. None once closing with nothing left, or
        when close() stopped waiting. While a batch gathers, appends do not wake this thread
        (it looks every ``_GATHER_POLL_S``): a burst of requests does not pay for a wake-up and
        a journal read per record."""
        while not self._abort.is_set():
            self._wake.clear()
            self.journal.sync()
            batch = self.journal.read(self.batch_size)
            if batch:
                break
            if self._stopping:
                return None
            self._check_room()
            self._wake.wait(0.1)
        else:
            return None
        deadline = time.monotonic() + self.flush_interval_s
        self._hurry.clear()
        while not (self._urgent or self._stopping) and \
                self.journal.last_seq - batch[-1].seq < self.batch_size - len(batch):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._hurry.wait(min(remaining, _GATHER_POLL_S))
        return batch + self.journal.read(self.batch_size - len(batch))

    def _write(self, batch: list[Entry]) -> None:
        """Put ``batch`` in the database, however long that takes; records the database refuses
        for what they hold go to the journal's rejected file instead."""
        try:
            self._commit([e.record for e in batch])
        except _REFUSED:
            for entry in batch:
                try:
                    self._commit([entry.record])
                except _REFUSED as exc:
                    self._reject(entry, exc)

    def _commit(self, records: list[Record]) -> None:
        delay = self.retry_backoff_s
        while True:
            try:
                with self.engine.begin() as conn:
                    self._write_batch(conn, records)
            except _REFUSED:
                raise
            except Exception as exc:  # noqa: BLE001 - down, locked, schema missing: retried until it works
                self._failed(exc, len(records), delay)
                if self._abort.wait(delay):
                    raise _Stopped from None
                delay = min(delay * 2, self.max_backoff_s)
                continue
            with self._lock:
                self._written += len(records)
                since, self._failing_since = self._failing_since, None
            if since is not None:
                log.warning("storage: writing works again after %.1f s; %d records in the journal",
                            time.monotonic() - since, self.depth)
            return

    def _failed(self, exc: BaseException, n: int, delay: float) -> None:
        now = time.monotonic()
        with self._lock:
            self._write_failures += 1
            first = self._failing_since is None
            if first:
                self._failing_since = now
            should_log = first or now - self._last_retry_log >= _LOG_INTERVAL_S
            if should_log:
                self._last_retry_log = now
        if should_log:
            log.warning("storage: writing %d records failed for %.0f s (%d attempts); retrying every %.1f s or "
                        "less, %d records wait in the journal: %s", n, now - self._failing_since,
                        self._write_failures, self.max_backoff_s, self.depth, _reason(exc))
        self._call(self.on_failure, exc, n)
        with self._progress:
            self._progress.notify_all()

    def _reject(self, entry: Entry, exc: BaseException) -> None:
        reason = _reason(exc)
        self.journal.reject(entry, reason)
        with self._lock:
            self._records_failed += 1
        log.error("storage: the database refused a %s of request %s (%s); kept in %s",
                  type(entry.record).__name__, getattr(entry.record, "request_id", "-"), reason,
                  self.journal.folder / "rejected.jsonl")
        self._call(self.on_reject, entry.record, exc)

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
            "policy_version": rec.policy_version,
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
            "explanation": self._explanation(rec.explanation),
            "rule_id": rec.rule_id,
            "policy_version": rec.policy_version,
        }

    def _explanation(self, explanation: Mapping[str, Any] | None) -> dict[str, Any] | None:
        """Token texts are prompt or completion text: under "never" only positions and scores stay."""
        if explanation is None:
            return None
        if self.text_policy == "never":
            return {**explanation, "tokens": [{**t, "text": None} for t in explanation["tokens"]]}
        return dict(explanation)

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
        "rule_id": rec.rule_id,
        "policy_version": rec.policy_version,
        "detector_version": rec.detector_version,
        "score": rec.score,
        "outcome": rec.outcome,
        "escalation": dict(rec.escalation) if rec.escalation is not None else None,
        "shadow_action": rec.shadow_action,
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
        rows = [{k: _without_nul(v) for k, v in row.items()} for row in rows]
    conn.execute(_upsert_statement(conn.dialect.name, model.__table__, tuple(rows[0]), tuple(keys)), rows)


@functools.lru_cache(maxsize=64)
def _upsert_statement(dialect: str, table, columns: tuple[str, ...], keys: tuple[str, ...]):
    """One statement per table and column set, reused: building one aliases the table (`excluded`),
    a cycle of objects per write that only the cyclic GC would free."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    else:
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    stmt = dialect_insert(table)
    return stmt.on_conflict_do_update(index_elements=list(keys),
                                      set_={c: stmt.excluded[c] for c in columns if c not in keys})


def _without_nul(value: Any) -> Any:
    """PostgreSQL refuses NUL in text and JSON: U+FFFD stands in for it, so a prompt cannot keep
    its alert out of the database with one (``text_sha256`` is of the text as it was)."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {_without_nul(k): _without_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_nul(v) for v in value]
    return value


def _told(record: Record) -> bool:
    """Whether a client may hear of this record as soon as `submit` returns."""
    if isinstance(record, DetectorRecord):
        return False
    return not (isinstance(record, RequestRecord) and record.finished_at is None)
