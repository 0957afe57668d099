"""Between the wire and the domain: proto requests to domain objects, domain records to protos.

Every enum crosses here through one table built from `monitor.domain`; a number the table does
not know is INVALID_ARGUMENT naming the field, never silently mapped to a default.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime

import torch
from google.protobuf.timestamp_pb2 import Timestamp

from latentwatch.v1 import monitor_pb2 as pb
from monitor.admission import ClientSteering, Override
from monitor.auth import identity
from monitor.config import Settings
from monitor.domain import OVERRIDE_ACTIONS, HookPointError
from monitor.enums import ACTION, DETECTOR_KIND, INTERVENTION, POSITIONS, REQUEST_KIND, ROLES, STEERING_KIND
from monitor.errors import RequestError, clip
from monitor.generation import Sampling
from monitor.steering import Steering
from monitor.trail import RequestContext


def _enum(field: str, value: int, table: dict[int, str], *, unset: str | None = None) -> str | None:
    """The domain name of an enum number; 0 (unset) maps to `unset`."""
    if value == 0:
        return unset
    if value not in table:
        raise RequestError("INVALID_ARGUMENT", f"{field}: unknown enum value {value}")
    return table[value]


def timestamp(dt: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(dt if dt.tzinfo else dt.replace(tzinfo=UTC))
    return ts


def when(ts: Timestamp, field: str) -> datetime:
    try:
        return ts.ToDatetime(UTC)
    except (ValueError, OverflowError):
        raise RequestError("INVALID_ARGUMENT", f"{field}: timestamp out of range") from None


# ------------------------------------------------------------------------------ requests


def client_id(md: pb.RequestMetadata) -> str:
    """Who a request is from: with authentication on, its token's client id, whatever the
    request says (so no caller records or acts as another client); else the id it gives."""
    who = identity()
    return who.client_id if who is not None else md.client_id


def context(kind: str, md: pb.RequestMetadata, snapshot) -> RequestContext:
    return RequestContext(kind, snapshot.version, snapshot.policy_version, client_id=client_id(md) or None,
                          conversation_id=md.conversation_id or None, tags=dict(md.tags))


def transcript(msgs) -> str:
    """Chat messages as plain text for a second opinion: one message is its content, several are
    ``role: content`` paragraphs."""
    if len(msgs) == 1:
        return msgs[0].content
    return "\n\n".join(f"{m.role}: {m.content}" for m in msgs)


def input_text(inp: pb.ScoreInput) -> str:
    return inp.text or transcript(inp.messages)


def messages(msgs, field: str) -> list[dict]:
    out = []
    for j, m in enumerate(msgs):
        if m.role not in ROLES:
            raise RequestError("INVALID_ARGUMENT", f"{field}[{j}].role: must be one of {ROLES}, got {clip(m.role)}")
        out.append({"role": m.role, "content": m.content})
    return out


def sampling(request: pb.GenerateRequest, settings: Settings) -> Sampling:
    limit = settings.max_new_tokens
    n = request.max_new_tokens or settings.default_max_new_tokens
    if n > limit:
        raise RequestError("INVALID_ARGUMENT", f"max_new_tokens: {n} exceeds this server's limit of {limit}")
    s = request.sampling
    for i, stop in enumerate(s.stop_sequences):
        if not stop:
            raise RequestError("INVALID_ARGUMENT", f"sampling.stop_sequences[{i}]: must not be empty")
        if len(stop) > 256:
            raise RequestError("INVALID_ARGUMENT", f"sampling.stop_sequences[{i}]: longer than 256 characters")
    if len(s.stop_sequences) > 16:
        raise RequestError("INVALID_ARGUMENT", "sampling.stop_sequences: at most 16")
    values = {"temperature": s.temperature if s.HasField("temperature") else 0.0,
              "top_p": s.top_p if s.HasField("top_p") else 1.0,
              "top_k": s.top_k if s.HasField("top_k") else 0}
    for name, v in values.items():
        if not math.isfinite(v):
            raise RequestError("INVALID_ARGUMENT", f"sampling.{name}: must be finite")
    try:
        return Sampling(max_new_tokens=n, seed=s.seed if s.HasField("seed") else None, stop=tuple(s.stop_sequences),
                        **values)
    except ValueError as e:
        name = next((k for k in values if k in str(e)), "")
        raise RequestError("INVALID_ARGUMENT", f"sampling.{name}: out of range") from None


def client_steering(request: pb.GenerateRequest, runner, snapshot) -> list[ClientSteering]:
    out = []
    for i, s in enumerate(request.steering):
        f = f"steering[{i}]"
        kind = _enum(f"{f}.kind", s.kind, {v: k for k, v in STEERING_KIND.items()})
        if kind is None:
            raise RequestError("INVALID_ARGUMENT", f"{f}.kind: must be STEERING_KIND_ADD, STEERING_KIND_ABLATE or "
                                                   "STEERING_KIND_CLAMP")
        positions = _enum(f"{f}.positions", s.positions, POSITIONS, unset="generated")
        if not math.isfinite(s.coefficient):
            raise RequestError("INVALID_ARGUMENT", f"{f}.coefficient: must be finite")
        if kind == "clamp":
            steering = _clamp(f, s, runner, snapshot.saes, positions)
        else:
            steering = _vector_steering(f, s, kind, runner, positions)
        trigger = s.trigger_detector_id or None
        if trigger is not None and trigger not in snapshot.by_id:
            raise RequestError("NOT_FOUND", f"{f}.trigger_detector_id: unknown detector id {clip(trigger)}")
        out.append(ClientSteering(steering, trigger))
    return out


def _vector_steering(f: str, s: pb.SteeringRequest, kind: str, runner, positions: str) -> Steering:
    """Add or ablate along an inline vector."""
    if s.sae_id or s.latent:
        raise RequestError("INVALID_ARGUMENT", f"{f}.{'sae_id' if s.sae_id else 'latent'}: only for "
                                               "STEERING_KIND_CLAMP")
    if s.vector_id:
        raise RequestError("NOT_FOUND", f"{f}.vector_id: no steering vector {clip(s.vector_id)} is registered")
    if not s.vector:
        raise RequestError("INVALID_ARGUMENT", f"{f}: set vector_id or vector")
    if len(s.vector) != runner.d_model:
        raise RequestError("INVALID_ARGUMENT", f"{f}.vector: has {len(s.vector)} values, "
                                               f"the model's hidden size is {runner.d_model}")
    if not all(math.isfinite(v) for v in s.vector):
        raise RequestError("INVALID_ARGUMENT", f"{f}.vector: values must be finite")
    point = _hook_point(f, s.hook_point, runner)
    try:
        return Steering(point, kind, torch.tensor(list(s.vector)), s.coefficient, positions, id="inline")
    except ValueError as e:
        raise RequestError("INVALID_ARGUMENT", f"{f}: {e}") from None


def _clamp(f: str, s: pb.SteeringRequest, runner, saes, positions: str) -> Steering:
    """Set one latent of a loaded SAE, at the SAE's own hook point."""
    for name in ("vector_id", "vector"):
        if getattr(s, name):
            raise RequestError("INVALID_ARGUMENT", f"{f}.{name}: must be unset with STEERING_KIND_CLAMP "
                                                   "(sae_id and latent name what is clamped)")
    loaded = f"loaded: {sorted(saes)}"
    if not s.sae_id:
        raise RequestError("INVALID_ARGUMENT", f"{f}.sae_id: required with STEERING_KIND_CLAMP; {loaded}")
    sae = saes.get(s.sae_id)
    if sae is None:
        raise RequestError("NOT_FOUND", f"{f}.sae_id: no SAE {clip(s.sae_id)} is loaded; {loaded}")
    if s.latent >= sae.d_sae:
        raise RequestError("INVALID_ARGUMENT", f"{f}.latent: {s.latent} is out of range; SAE {sae.id!r} has "
                                               f"latents 0..{sae.d_sae - 1}")
    if s.hook_point and _hook_point(f, s.hook_point, runner) != sae.hook_point:
        raise RequestError("INVALID_ARGUMENT", f"{f}.hook_point: SAE {sae.id!r} reads {sae.hook_point}; leave "
                                               "hook_point empty or give that one")
    try:
        runner.hooks.resolve(sae.hook_point)
    except HookPointError as e:
        raise RequestError("INVALID_ARGUMENT", f"{f}.sae_id: SAE {sae.id!r} cannot be clamped on this model: "
                                               f"{e}") from None
    return Steering.clamp(sae, s.latent, s.coefficient, positions)


def _hook_point(f: str, name: str, runner):
    try:
        return runner.hooks.resolve(name)
    except HookPointError as e:
        raise RequestError("INVALID_ARGUMENT", f"{f}.hook_point: {e}") from None


def overrides(request: pb.GenerateRequest) -> list[Override]:
    actions = {v: k for k, v in ACTION.items()}
    out = []
    for i, o in enumerate(request.policy_overrides):
        threshold = o.threshold if o.HasField("threshold") else None
        if threshold is not None and not math.isfinite(threshold):
            raise RequestError("INVALID_ARGUMENT", f"policy_overrides[{i}].threshold: must be finite")
        action = _enum(f"policy_overrides[{i}].action", o.action, actions)
        if action is not None and action not in OVERRIDE_ACTIONS:
            raise RequestError("INVALID_ARGUMENT", f"policy_overrides[{i}].action: a request may override with "
                                                   f"{', '.join(OVERRIDE_ACTIONS)}; {action} is for policy rules")
        out.append(Override(o.detector_id, threshold, action))
    return out


# ------------------------------------------------------------------------------ responses


def metadata(ctx: RequestContext) -> pb.RequestMetadata:
    return pb.RequestMetadata(client_id=ctx.client_id or "", conversation_id=ctx.conversation_id or "",
                              tags=ctx.tags)


def alert(rec, md: pb.RequestMetadata | None = None) -> pb.Alert:
    """An AlertRecord (as raised) or an AlertRow (as stored): the same message either way."""
    if md is None:
        md = pb.RequestMetadata(client_id=rec.client_id or "", conversation_id=rec.conversation_id or "",
                                tags=dict(rec.tags or {}))
    msg = pb.Alert(alert_id=rec.alert_id, create_time=timestamp(rec.created_at), request_id=rec.request_id,
                   request_kind=REQUEST_KIND.get(rec.request_kind, 0), detector_id=rec.detector_id,
                   detector_version=rec.detector_version, score=rec.score, threshold=rec.threshold,
                   action=ACTION.get(rec.action, 0), token_index=rec.token_index or 0,
                   input_index=rec.input_index or 0, metadata=md, snapshot_version=rec.snapshot_version or "",
                   rule_id=rec.rule_id or "", policy_version=rec.policy_version or "")
    if rec.explanation is not None:
        e = rec.explanation
        msg.explanation.CopyFrom(pb.Explanation(
            tokens=[pb.TokenContribution(position=t["position"], text=t["text"] or "", score=t["score"])
                    for t in e["tokens"]],
            latents=[pb.LatentActivation(sae_id=la["sae_id"], latent=la["latent"], activation=la["activation"])
                     for la in e["latents"]]))
    return msg


def intervention(rec, md: pb.RequestMetadata) -> pb.Intervention:
    """An InterventionRecord (as made) or an InterventionRow (as stored): the same message either way.
    A clamp is echoed as it is asked for, by sae_id and latent (vector_id unset)."""
    msg = pb.Intervention(intervention_id=rec.intervention_id, create_time=timestamp(rec.created_at),
                          request_id=rec.request_id, kind=INTERVENTION[rec.kind], detector_id=rec.detector_id or "",
                          token_index=rec.token_start, metadata=md, snapshot_version=rec.snapshot_version,
                          rule_id=rec.rule_id or "", policy_version=rec.policy_version or "",
                          detector_version=rec.detector_version or "", score=rec.score or 0.0,
                          outcome=rec.outcome or "", shadow_action=ACTION.get(rec.shadow_action, 0))
    if rec.escalation is not None:
        v = rec.escalation
        msg.escalation.CopyFrom(pb.EscalationVerdict(
            endpoint=v.get("endpoint", ""), flagged=bool(v.get("flagged")), categories=v.get("categories", []),
            latency_seconds=v.get("latency_s", 0.0), error=v.get("error") or ""))
    if rec.kind == "steer":
        clamp = rec.steering_kind == "clamp"
        msg.steering.CopyFrom(pb.SteeringRequest(
            vector_id="" if clamp else rec.vector_id or "", hook_point=rec.hook_point or "",
            coefficient=rec.coefficient or 0.0, kind=STEERING_KIND[rec.steering_kind],
            trigger_detector_id=rec.detector_id or "", sae_id=rec.details.get("sae_id", ""),
            latent=rec.details.get("latent", 0),
            positions={v: k for k, v in POSITIONS.items() if k}.get(rec.details.get("positions"), 0)))
    elif rec.kind == "override":
        o = pb.DetectorPolicy(detector_id=rec.detector_id or "", action=ACTION.get(rec.details.get("action"), 0))
        if "threshold" in rec.details:
            o.threshold = rec.details["threshold"]
        msg.override.CopyFrom(o)
    return msg


def score_result(enc, res, views, token_scores: bool) -> pb.ScoreResult:
    out = pb.ScoreResult(token_count=len(enc))
    for r in views:
        score = finite(res.probs[r.slot])
        dr = pb.DetectorResult(detector_id=r.detector, score=score, flagged=score >= r.threshold)
        if token_scores:
            dr.token_scores.extend(finite(p) for p in res.token_probs[:, r.slot])
        out.detectors.append(dr)
    if token_scores:
        out.tokens.extend(enc.token_text(i) for i in range(enc.score_from, len(enc)))
    return out


def finite(p) -> float:
    """A score as clients see it: a non-finite one reads 1.0, as `decisions.decide` treats it."""
    p = float(p)
    return p if math.isfinite(p) else 1.0


def detector(rule, det) -> pb.Detector:
    man = det.manifest
    d = pb.Detector(id=rule.detector, version=rule.version, kind=DETECTOR_KIND.get(det.head.scorer_kind, 0),
                    hook_point=rule.hook_point, threshold=rule.threshold, action=ACTION[rule.action],
                    description=getattr(man, "description", "") or "")
    cal = getattr(man, "calibration", None)
    if cal is not None:
        d.calibration.CopyFrom(pb.Calibration(method=cal.method, dataset=cal.benign_set, target_fpr=cal.target_fpr))
    for split, values in (getattr(man, "metrics", None) or {}).items():
        for name, v in values.items():
            d.metrics[name if split == "test" else f"{split}.{name}"] = float(v)
    return d


def detectors(snapshot) -> list[pb.Detector]:
    return [detector(r, snapshot.bank.detectors[r.slot]) for r in snapshot.views]
