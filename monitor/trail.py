"""The decision trail: every request, alert and intervention as a storage record plus metrics.

The servicer hands this module domain objects (decisions, overrides, steering) on the event
loop, never on the model thread; records go to the storage writer's journal (on disk before
the client is told), metrics to `Metrics`. Ids are made here, so the id streamed to a client
is the id that is stored.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from monitor.admission import ClientSteering, Override
from monitor.config import Settings
from monitor.decisions import Decision
from monitor.domain import ACTIONS, OUTCOME_OF_ACTION
from monitor.errors import RequestError
from monitor.escalation import Verdict
from monitor.metrics import Metrics
from monitor.snapshot import Rule
from monitor.steering import Steering
from monitor.storage import (
    AlertRecord,
    DetectorRecord,
    InterventionRecord,
    RequestRecord,
    StorageFull,
    StorageWriter,
)


@dataclass
class RequestContext:
    """Who asked, with which snapshot: copied into every record of the request."""

    kind: str  # monitor.domain.REQUEST_KINDS
    snapshot_version: str
    policy_version: str = ""
    client_id: str | None = None
    conversation_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))


def open_writer(settings: Settings, metrics: Metrics) -> StorageWriter:
    """The storage writer `settings` ask for, counted in `metrics`; started, so what an earlier
    run left in the journal is in the database when this returns."""
    writer = StorageWriter(settings.db, text_policy=settings.text_policy, journal_dir=settings.journal_path,
                           journal_max_bytes=settings.journal_max_bytes, journal_full=settings.journal_full,
                           on_failure=lambda exc, n: metrics.record_storage_write_failure(),
                           on_drop=lambda rec: metrics.record_storage_drop(),
                           on_reject=lambda rec, exc: metrics.record_storage_reject())
    metrics.watch_storage(lambda: writer.depth, lambda: writer.oldest_pending_s, lambda: writer.journal_bytes)
    try:
        writer.start()
    except Exception:
        writer.close()  # lets go of the journal folder
        raise
    metrics.record_storage_replayed(writer.replayed)
    return writer


class Trail:
    def __init__(self, writer: StorageWriter | None, metrics: Metrics, model_id: str):
        self.writer, self.metrics, self.model_id = writer, metrics, model_id

    def submit(self, rec) -> None:
        """Journal `rec` before anyone hears of it; a full journal (fail_closed) fails the request."""
        if self.writer is not None:
            try:
                self.writer.submit(rec)
            except StorageFull as e:
                raise RequestError("UNAVAILABLE", str(e)) from None

    def request(self, ctx: RequestContext, **fields: Any) -> None:
        """The request's row: at admission (so alerts are never orphaned), again when it ends."""
        self.submit(RequestRecord(ctx.request_id, ctx.kind, self.model_id, created_at=ctx.created_at,
                                  client_id=ctx.client_id, conversation_id=ctx.conversation_id, tags=ctx.tags,
                                  snapshot_version=ctx.snapshot_version, policy_version=ctx.policy_version,
                                  **fields))

    def alert(self, ctx: RequestContext, rule: Rule, score: float, token_index: int | None, *,
              action: str | None = None, input_index: int | None = None,
              span: tuple[int | None, int | None, str | None] = (None, None, None),
              explanation: Mapping[str, Any] | None = None) -> AlertRecord:
        rec = AlertRecord(ctx.request_id, rule.detector, rule.version, score, rule.threshold, action or rule.action,
                          token_index=token_index, span_start=span[0], span_end=span[1], span_text=span[2],
                          client_id=ctx.client_id, snapshot_version=ctx.snapshot_version, request_kind=ctx.kind,
                          input_index=input_index, conversation_id=ctx.conversation_id, tags=ctx.tags,
                          explanation=explanation, rule_id=rule.id, policy_version=ctx.policy_version)
        self.submit(rec)
        self.metrics.record_alert(rule.detector, rec.action)
        return rec

    def decision(self, ctx: RequestContext, d: Decision, explanation: Mapping[str, Any] | None = None, *,
                 effect: str | None = None, verdict: Verdict | None = None, outcome: str | None = None,
                 input_index: int | None = None, span: tuple = (None, None, None), steer_from: int | None = None,
                 ) -> tuple[AlertRecord | None, list[InterventionRecord]]:
        """A fired rule on the trail: an alert when what it did raises one, then its records (one per
        steering switched on, with the rule's fields, when it steers).

        `effect` is the action taken: by default the rule's own; for an escalation the one its
        verdict led to (None: nothing, e.g. a failed check that served on); Score, which cannot
        block or steer, passes "alert". `outcome` defaults to the effect's.
        A shadow rule records what it would have done, and nothing else.
        """
        rule = d.rule
        if rule.action == "shadow":
            return None, [self._decided(ctx, d, "shadow", "shadowed", shadow_action=rule.would)]
        if effect is None and rule.action != "escalate":
            effect = rule.action
        outcome = outcome or OUTCOME_OF_ACTION[effect]
        alert = None
        if effect is not None and ACTIONS[effect].records_alert:
            alert = self.alert(ctx, rule, d.score, d.token_index, action=effect, explanation=explanation,
                               input_index=input_index, span=span)
        records = []
        if rule.action == "escalate":
            records.append(self._decided(ctx, d, "escalate", outcome,
                                         escalation=verdict.to_record() if verdict is not None else None))
        elif effect != "steer":
            records.append(self._decided(ctx, d, effect, outcome))
        # the rule's steering, and client steering it triggered, from the next token on (`steer_from`:
        # a restart that steers from the first token)
        start = d.token_index + 1 if steer_from is None else steer_from
        records += [self.steering(ctx, s, start, trigger=rule.id, rule=rule, score=d.score) for s in d.steering]
        return alert, records

    def _decided(self, ctx: RequestContext, d: Decision, kind: str, outcome: str, **fields: Any) -> InterventionRecord:
        r = d.rule
        return self._intervention(ctx, kind, d.token_index, r.detector, r.id, rule_id=r.id,
                                  detector_version=r.version, score=float(d.score), outcome=outcome, **fields)

    def steering(self, ctx: RequestContext, s: Steering, token_index: int, *, trigger: str | None,
                 rule: Rule | None = None, score: float | None = None) -> InterventionRecord:
        """A clamp keeps its SAE and latent in `details` (its vector_id reads ``<sae id>:<latent>``)."""
        details = {"positions": s.positions}
        if s.kind == "clamp":
            details |= {"sae_id": s.sae.id, "latent": s.latent}
        by_rule = {"rule_id": rule.id, "detector_version": rule.version, "score": score} if rule is not None else {}
        return self._intervention(ctx, "steer", token_index, rule.detector if rule is not None else trigger,
                                  trigger or "request", steering_kind=s.kind, hook_point=str(s.hook_point),
                                  vector_id=s.id or "inline", coefficient=float(s.coefficient), details=details,
                                  outcome="steered", **by_rule)

    def client_steering(self, ctx: RequestContext, items: list[ClientSteering]) -> list[InterventionRecord]:
        """Steering asked for from the start is on the trail at admission; triggered steering when it starts."""
        return [self.steering(ctx, c.steering, 0, trigger=None) for c in items if c.trigger is None]

    def overrides(self, ctx: RequestContext, overrides: list[Override]) -> list[InterventionRecord]:
        return [self._intervention(ctx, "override", 0, o.detector_id, "request", outcome="overridden",
                                   details={k: v for k, v in (("threshold", o.threshold), ("action", o.action))
                                            if v is not None})
                for o in overrides]

    def _intervention(self, ctx: RequestContext, kind: str, token_index: int, detector_id: str | None,
                      trigger: str, **fields: Any) -> InterventionRecord:
        rec = InterventionRecord(ctx.request_id, kind, token_index, detector_id=detector_id, trigger=trigger,
                                 snapshot_version=ctx.snapshot_version, client_id=ctx.client_id,
                                 policy_version=ctx.policy_version, **fields)
        self.submit(rec)
        self.metrics.record_intervention(detector_id, kind)
        return rec

    def detectors(self, snapshot) -> None:
        for d in snapshot.bank.detectors if snapshot.bank else []:
            man = d.manifest
            cal = getattr(man, "calibration", None)
            self.submit(DetectorRecord(d.id, d.version, getattr(man, "kind", "linear"), str(d.hook_point),
                                       float(d.threshold), calibration=cal.model_dump() if cal is not None else {},
                                       metrics=dict(getattr(man, "metrics", {}) or {})))
