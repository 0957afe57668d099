"""monitor.metrics: every metric records, labels stay bounded, and the real
HTTP endpoint serves an exposition that `promtool check metrics` accepts."""

from __future__ import annotations

import itertools

import pytest

from monitor.metrics import SCORE_BUCKETS, Metrics

DETECTORS = ["harmful_intent", "deception"]


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(DETECTORS)


def exercise(m: Metrics) -> None:
    """Touch every metric once (or more) through the recording API."""
    m.observe_request("generate", "ok", duration_s=1.5)
    m.observe_request("generate", "blocked", duration_s=0.2)
    m.observe_request("score", "ok", duration_s=0.03)
    m.add_tokens("prompt", 12)
    m.add_tokens("completion", 5)
    m.add_tokens("completion", 2, outcome="blocked")
    m.observe_score("harmful_intent", 0.92)
    m.observe_score("deception", 0.07)
    m.observe_score("harmful_intent", 0.5)
    m.record_alert("harmful_intent", "block")
    m.record_intervention("harmful_intent", "block")
    m.record_intervention(None, "steer")
    m.observe_time_to_first_token(0.12)
    m.observe_inter_token_latency(0.02)
    m.observe_inter_token_latency(0.03)
    m.add_monitor_overhead(0.0004)
    m.add_monitor_overhead(0.0006)
    m.set_scheduler_queue_depth("generate", 3)
    m.set_scheduler_queue_depth("score", 1)
    m.observe_batch("score", 8)
    m.observe_batch("generate", 4, forward_kind="prefill")
    m.observe_batch("generate", 4)
    m.add_forward_passes("decode", 2)
    m.watch_storage(depth=lambda: 7, oldest_pending_s=lambda: 2.5, journal_bytes=lambda: 4096)
    m.record_storage_write_failure()
    m.record_storage_replayed(3)
    m.record_storage_drop()
    m.record_storage_reject()
    m.record_escalation("moderation", True, 0.08)
    m.record_escalation("moderation", None, 1.5)
    m.record_policy_reload(False)


def test_every_metric_records(metrics: Metrics) -> None:
    exercise(metrics)
    v = metrics.value
    assert v("latentwatch_requests_total", {"kind": "generate", "outcome": "ok"}) == 1
    assert v("latentwatch_requests_total", {"kind": "generate", "outcome": "blocked"}) == 1
    assert v("latentwatch_requests_total", {"kind": "score", "outcome": "ok"}) == 1
    assert v("latentwatch_request_duration_seconds_count", {"kind": "generate"}) == 2
    assert v("latentwatch_request_duration_seconds_sum", {"kind": "generate"}) == pytest.approx(1.7)
    assert v("latentwatch_tokens_total", {"kind": "prompt", "outcome": "ok"}) == 12
    assert v("latentwatch_tokens_total", {"kind": "completion", "outcome": "ok"}) == 5
    assert v("latentwatch_tokens_total", {"kind": "completion", "outcome": "blocked"}) == 2
    hi = {"detector": "harmful_intent"}
    assert v("latentwatch_detector_score_count", hi) == 2
    assert v("latentwatch_detector_score_bucket", {**hi, "le": "0.5"}) == 1
    assert v("latentwatch_detector_score_bucket", {**hi, "le": "0.95"}) == 2
    assert v("latentwatch_detector_score_count", {"detector": "deception"}) == 1
    assert v("latentwatch_alerts_total", {**hi, "action": "block"}) == 1
    assert v("latentwatch_interventions_total", {**hi, "kind": "block"}) == 1
    assert v("latentwatch_interventions_total", {"detector": "none", "kind": "steer"}) == 1
    assert v("latentwatch_time_to_first_token_seconds_count") == 1
    assert v("latentwatch_inter_token_latency_seconds_count") == 2
    assert v("latentwatch_monitor_overhead_seconds_total") == pytest.approx(0.001)
    assert v("latentwatch_monitor_step_overhead_seconds_count") == 2
    assert v("latentwatch_scheduler_queue_depth", {"kind": "generate"}) == 3
    assert v("latentwatch_scheduler_queue_depth", {"kind": "score"}) == 1
    assert v("latentwatch_batch_size_count", {"kind": "score"}) == 1
    assert v("latentwatch_batch_size_sum", {"kind": "score"}) == 8
    assert v("latentwatch_batch_size_sum", {"kind": "generate"}) == 8
    assert v("latentwatch_forward_passes_total", {"kind": "score"}) == 1
    assert v("latentwatch_forward_passes_total", {"kind": "prefill"}) == 1
    assert v("latentwatch_forward_passes_total", {"kind": "decode"}) == 3
    assert v("latentwatch_storage_queue_depth") == 7
    assert v("latentwatch_storage_oldest_pending_seconds") == 2.5
    assert v("latentwatch_storage_journal_bytes") == 4096
    assert v("latentwatch_storage_write_failures_total") == 1
    assert v("latentwatch_storage_replayed_records_total") == 3
    assert v("latentwatch_storage_dropped_records_total") == 1
    assert v("latentwatch_storage_rejected_records_total") == 1
    assert v("latentwatch_escalations_total", {"endpoint": "moderation", "verdict": "flagged"}) == 1
    assert v("latentwatch_escalations_total", {"endpoint": "moderation", "verdict": "failed"}) == 1
    assert v("latentwatch_escalation_latency_seconds_count", {"endpoint": "moderation"}) == 2
    assert v("latentwatch_policy_reloads_total", {"result": "failed"}) == 1
    assert v("latentwatch_policy_reloads_total", {"result": "ok"}) == 0  # present from the start


def test_score_buckets_are_0_to_1_in_0_05_steps() -> None:
    assert SCORE_BUCKETS[0] == 0.05 and SCORE_BUCKETS[-1] == 1.0 and len(SCORE_BUCKETS) == 20
    assert all(round(b - a, 6) == 0.05 for a, b in itertools.pairwise(SCORE_BUCKETS))


def test_naming_rules_and_own_registry(metrics: Metrics) -> None:
    exercise(metrics)
    families = list(metrics.registry.collect())
    assert families
    for fam in families:
        assert fam.name.startswith("latentwatch_"), fam.name
        if fam.type == "counter":
            assert any(s.name.endswith("_total") for s in fam.samples), fam.name
        if "seconds" in fam.name or fam.name.endswith(("_latency", "_duration")):
            assert "_seconds" in fam.name
    names = {f.name for f in families}
    # No process/platform/gc collectors: those belong to the default registry.
    assert not any(n.startswith(("process_", "python_")) for n in names)
    # A second instance registers fine (its own registry, no duplicate error).
    Metrics(DETECTORS).record_alert("deception", "alert")


def test_detector_labels_are_bounded(metrics: Metrics) -> None:
    for i in range(50):  # client-supplied junk ids
        metrics.observe_score(f"junk-{i}", 0.5)
        metrics.record_alert(f"junk-{i}", "alert")
        metrics.record_intervention(f"junk-{i}", "steer")
    metrics.record_alert("harmful_intent", "nonsense-action")
    metrics.observe_request("nonsense-kind", "nonsense-outcome")
    metrics.add_forward_passes("nonsense")
    detectors = {
        s.labels["detector"]
        for fam in metrics.registry.collect()
        for s in fam.samples
        if "detector" in s.labels
    }
    assert detectors <= {"harmful_intent", "deception", "other", "none"}
    v = metrics.value
    assert v("latentwatch_detector_score_count", {"detector": "other"}) == 50
    assert v("latentwatch_alerts_total", {"detector": "other", "action": "alert"}) == 50
    assert v("latentwatch_interventions_total", {"detector": "other", "kind": "steer"}) == 50
    assert v("latentwatch_alerts_total", {"detector": "harmful_intent", "action": "other"}) == 1
    assert v("latentwatch_requests_total", {"kind": "other", "outcome": "other"}) == 1
    assert v("latentwatch_forward_passes_total", {"kind": "other"}) == 1


def test_set_detectors_on_reload(metrics: Metrics) -> None:
    metrics.observe_score("deception", 0.3)
    metrics.record_alert("deception", "alert")
    metrics.set_detectors(["harmful_intent", "sycophancy"])
    assert metrics.detectors == {"harmful_intent", "sycophancy"}
    # The unloaded detector's series are gone; the new one's exist at zero.
    assert metrics.value("latentwatch_detector_score_count", {"detector": "deception"}) is None
    assert (
        metrics.value("latentwatch_alerts_total", {"detector": "deception", "action": "alert"})
        is None
    )
    assert (
        metrics.value("latentwatch_alerts_total", {"detector": "sycophancy", "action": "block"})
        == 0
    )
    metrics.observe_score("deception", 0.3)  # no longer loaded -> "other"
    metrics.observe_score("sycophancy", 0.3)
    assert metrics.value("latentwatch_detector_score_count", {"detector": "other"}) == 1
    assert metrics.value("latentwatch_detector_score_count", {"detector": "sycophancy"}) == 1
