"""Records validate in the caller, against the shared vocabulary in monitor.domain."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta, timezone

import pytest

import monitor.domain as domain
import monitor.storage as storage
from monitor.storage import AlertRecord, InterventionRecord, RequestRecord


def _steer(**kw) -> InterventionRecord:
    fields = {"request_id": "r", "kind": "steer", "token_start": 3, "steering_kind": "ablate", "hook_point": "h"}
    return InterventionRecord(**{**fields, **kw})


def test_storage_speaks_the_domain_vocabulary():
    assert storage.TextPolicy is domain.TextPolicy
    for action in domain.ACTIONS:
        assert AlertRecord("r", "d", "1", 0.9, 0.5, action).action == action
    for kind in domain.REQUEST_KINDS:
        assert AlertRecord("r", "d", "1", 0.9, 0.5, request_kind=kind).request_kind == kind
        assert RequestRecord("r", kind, "m").kind == kind
    with pytest.raises(ValueError, match="request_kind"):
        AlertRecord("r", "d", "1", 0.9, 0.5, request_kind="chat")


def test_alert_defaults_and_checks():
    a, b = AlertRecord("r", "d", "1", 0.9, 0.5), AlertRecord("r", "d", "1", 0.9, 0.5)
    assert a.alert_id != b.alert_id and len(a.alert_id) == 32
    assert (a.snapshot_version, a.request_kind, a.input_index, a.conversation_id, a.tags) == (
        "",
        "generate",
        None,
        None,
        {},
    )
    assert RequestRecord("r", "score", "m").snapshot_version == ""
    for bad, match in [
        ({"input_index": -1}, "input_index"),
        ({"tags": {"n": 3}}, "tags"),
        ({"alert_id": ""}, "alert_id"),
        ({"created_at": datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=2)))}, "out of range"),
    ]:
        with pytest.raises(ValueError, match=match):
            dataclasses.replace(a, **bad)


def test_intervention_kinds_and_their_fields():
    for kind in domain.INTERVENTION_KINDS:
        extra = {"shadow_action": "block"} if kind == "shadow" else {}
        rec = _steer() if kind == "steer" else InterventionRecord("r", kind, 0, **extra)
        assert rec.kind == kind and len(rec.intervention_id) == 32
    with pytest.raises(ValueError, match="shadow_action"):
        InterventionRecord("r", "shadow", 0)  # a shadow record says what it would have done
    with pytest.raises(ValueError, match="shadow_action"):
        InterventionRecord("r", "block", 0, shadow_action="block")
    with pytest.raises(ValueError, match="escalation only applies"):
        InterventionRecord("r", "alert", 0, escalation={"flagged": True})
    with pytest.raises(ValueError, match="outcome"):
        InterventionRecord("r", "alert", 0, outcome="exploded")
    assert _steer().trigger == "request"  # the client asked for it
    assert _steer(detector_id="deception").trigger == "deception"
    assert InterventionRecord("r", "override", 0, detector_id="d", trigger="request").trigger == "request"
    for kind in domain.STEERING_KINDS:
        assert _steer(steering_kind=kind).steering_kind == kind
    with pytest.raises(ValueError, match="kind"):
        InterventionRecord("r", "add", 0)  # the 0001 spelling: now steering_kind
    with pytest.raises(ValueError, match="steering_kind"):
        _steer(steering_kind=None)
    with pytest.raises(ValueError, match="hook_point"):
        _steer(hook_point=None)
    with pytest.raises(ValueError, match="hook_point, coefficient only apply to kind='steer'"):
        InterventionRecord("r", "block", 0, hook_point="h", coefficient=1.0)


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"token_start": -1}, "token_start"),
        ({"token_start": None}, "token_start"),
        ({"token_end": 2}, "token_end"),
        ({"details": {"x": object()}}, "details"),
        ({"details": {"x": float("nan")}}, "details"),
        ({"created_at": datetime(2025, 1, 1)}, "timezone"),
        ({"intervention_id": ""}, "intervention_id"),
    ],
)
def test_intervention_rejects(bad, match):
    with pytest.raises(ValueError, match=match):
        _steer(**bad)


def test_request_tags_must_be_json():
    with pytest.raises(ValueError, match="tags"):
        RequestRecord("r", "generate", "m", tags={"when": datetime.now(UTC)})
