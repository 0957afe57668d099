"""Prometheus metrics for the latentwatch server.

All metrics live in the ``Metrics.registry`` object (not the process-global
default registry), are prefixed ``latentwatch_``, and follow Prometheus naming:
counters end in ``_total``, durations are in seconds (``_seconds``).

Label values are bounded. Every label takes its value from a closed set; an
unknown value is recorded as ``"other"``. Detector labels take only the ids of
the loaded detectors (see :meth:`Metrics.set_detectors`, to be called on every
(re)load), so a client passing arbitrary detector ids cannot blow up the
number of series.

The metric objects are public attributes (prometheus-client ``Counter`` etc.);
code should prefer the recording methods, which normalise label values.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)

from monitor.domain import ACTIONS, INTERVENTION_KINDS, OUTCOMES

PREFIX = "latentwatch_"
OTHER = "other"
# Detector label for interventions not triggered by a detector (steering
# requested to run from the start).
NO_DETECTOR = "none"

RPC_KINDS = ("generate", "score", "list_detectors", "get_alerts", "get_interventions", "reload_detectors",
             "get_server_info")
TOKEN_KINDS = ("prompt", "completion")
BATCH_KINDS = ("generate", "score")
REFUSAL_REASONS = ("busy", "client_limit", "deadline")
FORWARD_KINDS = ("prefill", "decode", "score")
AUTH_FAILURES = ("missing", "invalid", "forbidden")  # no token, a token not in the file, a role lacking
VERDICTS = ("flagged", "clear", "failed")  # escalation verdicts
RELOAD_RESULTS = ("ok", "failed")
ALERT_ACTIONS = tuple(ACTIONS)

# Calibrated scores are in [0, 1]: 0.05, 0.10, ..., 1.0 (+Inf is implicit).
SCORE_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))
# fmt: off
# Request-level latencies: 1 ms .. 5 min.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)
# Per-token latencies: 1 ms .. 10 s.
TOKEN_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
)
# Monitoring work in one forward step: 10 us .. 1 s.
OVERHEAD_BUCKETS = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
)
# fmt: on
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _pick(value: str, allowed: Iterable[str]) -> str:
    return value if value in allowed else OTHER


class Metrics:
    """The server's metrics, in their own ``CollectorRegistry``.

    Attributes (name exposed to Prometheus; labels):

    - ``requests``: ``latentwatch_requests_total``; kind, outcome
    - ``tokens``: ``latentwatch_tokens_total``; kind (prompt/completion), outcome
    - ``detector_score``: ``latentwatch_detector_score`` histogram; detector
    - ``alerts``: ``latentwatch_alerts_total``; detector, action
    - ``interventions``: ``latentwatch_interventions_total``; detector (trigger), kind
    - ``time_to_first_token``: ``latentwatch_time_to_first_token_seconds``
    - ``inter_token_latency``: ``latentwatch_inter_token_latency_seconds``
    - ``request_duration``: ``latentwatch_request_duration_seconds``; kind
    - ``monitor_overhead``: ``latentwatch_monitor_overhead_seconds_total``
    - ``monitor_step_overhead``: ``latentwatch_monitor_step_overhead_seconds``
    - ``scheduler_queue_depth``: ``latentwatch_scheduler_queue_depth`` gauge; kind
    - ``batch_size``: ``latentwatch_batch_size`` histogram; kind (generate/score)
    - ``storage_queue_depth``: ``latentwatch_storage_queue_depth`` gauge (records in the
      journal, not yet in the database)
    - ``storage_oldest_pending``: ``latentwatch_storage_oldest_pending_seconds`` gauge
    - ``storage_journal_bytes``: ``latentwatch_storage_journal_bytes`` gauge
    - ``storage_write_failures``: ``latentwatch_storage_write_failures_total``
    - ``storage_replayed``: ``latentwatch_storage_replayed_records_total``
    - ``storage_dropped``: ``latentwatch_storage_dropped_records_total``
    - ``storage_rejected``: ``latentwatch_storage_rejected_records_total``
    - ``forward_passes``: ``latentwatch_forward_passes_total``; kind
      (prefill/decode/score)
    - ``admitted``: ``latentwatch_admitted_requests`` gauge; kind (generate/score)
    - ``refused``: ``latentwatch_refused_requests_total``; kind, reason
    - ``snapshot``: ``latentwatch_detector_snapshot_info`` gauge (1); version
    - ``auth_failures``: ``latentwatch_auth_failures_total``; reason (missing/invalid/forbidden)
    """

    def __init__(self, detectors: Iterable[str] = ()) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._detectors: frozenset[str] = frozenset()

        self.requests = Counter(
            PREFIX + "requests",
            "RPCs handled, by RPC kind and outcome.",
            ["kind", "outcome"],
            registry=r,
        )
        self.tokens = Counter(
            PREFIX + "tokens",
            "Tokens processed: prompt (read) or completion (generated).",
            ["kind", "outcome"],
            registry=r,
        )
        self.detector_score = Histogram(
            PREFIX + "detector_score",
            "Calibrated per-token detector scores in [0, 1].",
            ["detector"],
            buckets=SCORE_BUCKETS,
            registry=r,
        )
        self.alerts = Counter(
            PREFIX + "alerts",
            "Detector alerts, by detector and the action taken.",
            ["detector", "action"],
            registry=r,
        )
        self.interventions = Counter(
            PREFIX + "interventions",
            "Interventions (block/steer), by triggering detector ('none' if untriggered).",
            ["detector", "kind"],
            registry=r,
        )
        self.time_to_first_token = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "Time from receiving a Generate request to its first generated token.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            PREFIX + "inter_token_latency_seconds",
            "Time between consecutive generated tokens of one request.",
            buckets=TOKEN_LATENCY_BUCKETS,
            registry=r,
        )
        self.request_duration = Histogram(
            PREFIX + "request_duration_seconds",
            "End-to-end RPC latency.",
            ["kind"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.monitor_overhead = Counter(
            PREFIX + "monitor_overhead_seconds",
            "Time spent in activation hooks and the detector bank.",
            registry=r,
        )
        self.monitor_step_overhead = Histogram(
            PREFIX + "monitor_step_overhead_seconds",
            "Time spent in hooks and the detector bank per model forward step.",
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        self.scheduler_queue_depth = Gauge(
            PREFIX + "scheduler_queue_depth",
            "Requests waiting for the model scheduler.",
            ["kind"],
            registry=r,
        )
        self.batch_size = Histogram(
            PREFIX + "batch_size",
            "Sequences per batched model forward pass.",
            ["kind"],
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.storage_queue_depth = Gauge(
            PREFIX + "storage_queue_depth",
            "Records in the alert journal that are not in the database yet.",
            registry=r,
        )
        self.storage_oldest_pending = Gauge(
            PREFIX + "storage_oldest_pending_seconds",
            "Age of the oldest record not in the database yet (grows while the database is down).",
            registry=r,
        )
        self.storage_journal_bytes = Gauge(
            PREFIX + "storage_journal_bytes",
            "Bytes the alert journal holds on disk (at journal_max_bytes it is full).",
            registry=r,
        )
        self.storage_write_failures = Counter(
            PREFIX + "storage_write_failures",
            "Failed database writes; their records stay in the journal and are written again.",
            registry=r,
        )
        self.storage_replayed = Counter(
            PREFIX + "storage_replayed_records",
            "Records an earlier run left in the journal, written at startup.",
            registry=r,
        )
        self.storage_dropped = Counter(
            PREFIX + "storage_dropped_records",
            "Records dropped because the journal was full (journal_full = fail_open).",
            registry=r,
        )
        self.storage_rejected = Counter(
            PREFIX + "storage_rejected_records",
            "Records the database refused for what they hold, kept in the journal's rejected.jsonl.",
            registry=r,
        )
        self.forward_passes = Counter(
            PREFIX + "forward_passes",
            "Model forward passes, by kind.",
            ["kind"],
            registry=r,
        )
        self.admitted = Gauge(
            PREFIX + "admitted_requests",
            "Requests admitted and not yet finished (running or queued), by kind.",
            ["kind"],
            registry=r,
        )
        self.refused = Counter(
            PREFIX + "refused_requests",
            "Requests refused at admission, by kind and reason (busy, client_limit, deadline).",
            ["kind", "reason"],
            registry=r,
        )
        self.snapshot = Gauge(
            PREFIX + "detector_snapshot_info",
            "1 for the detector snapshot now admitting requests, by version.",
            ["version"],
            registry=r,
        )
        self._snapshot_version: str | None = None
        self.auth_failures = Counter(
            PREFIX + "auth_failures",
            "Requests refused for their bearer token, by reason: missing, invalid, forbidden (a role lacking).",
            ["reason"],
            registry=r,
        )
        self.escalations = Counter(
            PREFIX + "escalations",
            "Second opinions asked by escalate rules, by endpoint (policy name) and verdict: flagged, clear, "
            "failed. Deferral rate: rate of this over rate of requests.",
            ["endpoint", "verdict"],
            registry=r,
        )
        self.escalation_latency = Histogram(
            PREFIX + "escalation_latency_seconds",
            "How long a second opinion took, failures included (bounded by the endpoint's timeout).",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.policy_reloads = Counter(
            PREFIX + "policy_reloads",
            "Snapshot reloads (ReloadDetectors, SIGHUP, a changed policy file) by result; on `failed` the running "
            "snapshot stays in force.",
            ["result"],
            registry=r,
        )

        # Create the fixed-label series up front so they read 0, not absent.
        for kind in RPC_KINDS:
            self.request_duration.labels(kind)
            for outcome in ("ok", "internal"):
                self.requests.labels(kind, outcome)
        for kind in TOKEN_KINDS:
            self.tokens.labels(kind, "ok")
        for kind in BATCH_KINDS:
            self.scheduler_queue_depth.labels(kind)
            self.batch_size.labels(kind)
            self.admitted.labels(kind)
            for reason in REFUSAL_REASONS:
                self.refused.labels(kind, reason)
        for kind in FORWARD_KINDS:
            self.forward_passes.labels(kind)
        for reason in AUTH_FAILURES:
            self.auth_failures.labels(reason)
        for result in RELOAD_RESULTS:
            self.policy_reloads.labels(result)
        self.set_detectors(detectors)

    # -- detector label set -------------------------------------------------

    @property
    def detectors(self) -> frozenset[str]:
        """Detector ids currently allowed as label values."""
        return self._detectors

    def set_detectors(self, detector_ids: Iterable[str]) -> None:
        """Set the allowed detector label values; call on every (re)load.

        Series of detectors no longer loaded are removed, so the number of
        series stays bounded by the loaded detectors.
        """
        new = frozenset(str(d) for d in detector_ids) - {OTHER, NO_DETECTOR}
        old = self._detectors
        self._detectors = new
        for det in old - new:
            self._remove(self.detector_score, det)
            for action in ALERT_ACTIONS:
                self._remove(self.alerts, det, action)
            for kind in INTERVENTION_KINDS:
                self._remove(self.interventions, det, kind)
        for det in new - old:
            self.detector_score.labels(det)
            for action in ALERT_ACTIONS:
                self.alerts.labels(det, action)

    def set_admitted(self, kind: str, count: int) -> None:
        self.admitted.labels(_pick(kind, BATCH_KINDS)).set(count)

    def record_refusal(self, kind: str, reason: str) -> None:
        self.refused.labels(_pick(kind, BATCH_KINDS), _pick(reason, REFUSAL_REASONS)).inc()

    def set_snapshot(self, version: str) -> None:
        """Expose the snapshot now admitting requests; the previous one's series goes."""
        if self._snapshot_version is not None and self._snapshot_version != version:
            self._remove(self.snapshot, self._snapshot_version)
        self._snapshot_version = version
        self.snapshot.labels(version).set(1)

    @staticmethod
    def _remove(metric, *labels: str) -> None:
        try:
            metric.remove(*labels)
        except KeyError:
            pass

    def detector_label(self, detector_id: str) -> str:
        """The label value for ``detector_id``: itself if loaded, else "other"."""
        return detector_id if detector_id in self._detectors else OTHER

    # -- recording ----------------------------------------------------------

    def observe_request(self, kind: str, outcome: str, duration_s: float | None = None) -> None:
        """Count a finished RPC and, if given, its end-to-end latency."""
        kind = _pick(kind, RPC_KINDS)
        self.requests.labels(kind, _pick(outcome, OUTCOMES)).inc()
        if duration_s is not None:
            self.request_duration.labels(kind).observe(duration_s)

    def add_tokens(self, kind: str, count: int, outcome: str = "ok") -> None:
        """Count ``count`` prompt or completion tokens."""
        if count:
            self.tokens.labels(_pick(kind, TOKEN_KINDS), _pick(outcome, OUTCOMES)).inc(count)

    def observe_score(self, detector_id: str, score: float) -> None:
        """Record one per-token detector score."""
        self.detector_score.labels(self.detector_label(detector_id)).observe(score)

    def record_alert(self, detector_id: str, action: str) -> None:
        """Count an alert; action is alert, block or steer."""
        self.alerts.labels(self.detector_label(detector_id), _pick(action, ALERT_ACTIONS)).inc()

    def record_intervention(self, detector_id: str | None, kind: str) -> None:
        """Count an intervention (block/steer); detector_id None or "" if untriggered."""
        det = self.detector_label(detector_id) if detector_id else NO_DETECTOR
        self.interventions.labels(det, _pick(kind, INTERVENTION_KINDS)).inc()

    def observe_time_to_first_token(self, seconds: float) -> None:
        self.time_to_first_token.observe(seconds)

    def observe_inter_token_latency(self, seconds: float) -> None:
        self.inter_token_latency.observe(seconds)

    def add_monitor_overhead(self, seconds: float) -> None:
        """Record the hook + detector time of one forward step."""
        self.monitor_overhead.inc(seconds)
        self.monitor_step_overhead.observe(seconds)

    def set_scheduler_queue_depth(self, kind: str, depth: int) -> None:
        self.scheduler_queue_depth.labels(_pick(kind, BATCH_KINDS)).set(depth)

    def observe_batch(self, kind: str, size: int, forward_kind: str | None = None) -> None:
        """Record a batched forward pass of ``size`` sequences.

        Also counts one forward pass of ``forward_kind`` (default: "score" for
        score batches, "decode" for generate batches).
        """
        kind = _pick(kind, BATCH_KINDS)
        self.batch_size.labels(kind).observe(size)
        if forward_kind is None:
            forward_kind = "score" if kind == "score" else "decode"
        self.add_forward_passes(forward_kind)

    def add_forward_passes(self, kind: str, count: int = 1) -> None:
        self.forward_passes.labels(_pick(kind, FORWARD_KINDS)).inc(count)

    def watch_storage(self, depth: Callable[[], float], oldest_pending_s: Callable[[], float],
                      journal_bytes: Callable[[], float]) -> None:
        """Read the journal's gauges from these at every scrape (they change on the writer thread)."""
        self.storage_queue_depth.set_function(depth)
        self.storage_oldest_pending.set_function(oldest_pending_s)
        self.storage_journal_bytes.set_function(journal_bytes)

    def record_storage_write_failure(self, count: int = 1) -> None:
        self.storage_write_failures.inc(count)

    def record_storage_replayed(self, count: int) -> None:
        self.storage_replayed.inc(count)

    def record_storage_drop(self) -> None:
        self.storage_dropped.inc()

    def record_storage_reject(self) -> None:
        self.storage_rejected.inc()

    def record_escalation(self, endpoint: str, flagged: bool | None, latency_s: float) -> None:
        """`endpoint` is a name from the server's policy file (bounded); `flagged` None = the check failed."""
        verdict = "failed" if flagged is None else "flagged" if flagged else "clear"
        self.escalations.labels(endpoint, verdict).inc()
        self.escalation_latency.labels(endpoint).observe(latency_s)

    def record_policy_reload(self, ok: bool) -> None:
        self.policy_reloads.labels("ok" if ok else "failed").inc()

    def record_auth_failure(self, reason: str) -> None:
        """Count a refused request: never with the token, which is no label value."""
        self.auth_failures.labels(_pick(reason, AUTH_FAILURES)).inc()

    # -- reading / serving --------------------------------------------------

    def value(self, name: str, labels: Mapping[str, str] | None = None) -> float | None:
        """A sample's current value by its exposed name, e.g.
        ``value("latentwatch_forward_passes_total", {"kind": "score"})``."""
        return self.registry.get_sample_value(name, dict(labels or {}))
