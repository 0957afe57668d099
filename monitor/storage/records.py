"""Plain, immutable records the service hands to :class:`~monitor.storage.writer.StorageWriter`.

The service builds these on the token path and never touches SQLAlchemy: the writer thread
turns them into rows. Validation happens in ``__post_init__`` so a malformed record fails in
the caller (a programming error), not later inside a batch where it would poison the write.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from monitor.domain import (
    ACTIONS,
    DECISION_OUTCOMES,
    EXPLAIN_MAX_LATENTS,
    EXPLAIN_MAX_TEXT,
    EXPLAIN_MAX_TOKENS,
    INTERVENTION_KINDS,
    REQUEST_KINDS,
    STEERING_KINDS,
    InterventionKind,
    RequestKind,
    RuleActionName,
    SteeringKind,
)

# Fields that only a steering intervention may carry.
_STEERING_FIELDS = ("steering_kind", "hook_point", "vector_id", "coefficient")


def utcnow() -> datetime:
    return datetime.now(UTC)


def _new_id() -> str:
    return uuid.uuid4().hex


def text_sha256(prompt_text: str | None, completion_text: str | None) -> str | None:
    """SHA-256 (hex) of a request's text, or None when there is no text at all.

    Hashed bytes: ``utf8(prompt) + b"\\x00" + utf8(completion)`` (a missing side counts as
    ""), so ("ab", "c") and ("a", "bc") hash differently. Anyone holding a transcript can
    recompute this to prove or disprove that it is the one that was monitored.
    """
    if prompt_text is None and completion_text is None:
        return None
    h = hashlib.sha256()
    h.update((prompt_text or "").encode("utf-8"))
    h.update(b"\x00")
    h.update((completion_text or "").encode("utf-8"))
    return h.hexdigest()


def _check_choice(name: str, value: str | None, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _check_aware(name: str, value: datetime | None) -> None:
    if value is None:
        return
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware (use datetime.now(timezone.utc))")
    try:  # the writer stores UTC: a time that has none would fail the whole batch
        value.astimezone(UTC)
    except OverflowError:
        raise ValueError(f"{name} is out of range: {value.isoformat()}") from None


def _check_json(name: str, value: Mapping[str, Any]) -> None:
    try:
        json.dumps(dict(value), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a JSON object: {exc}") from None


_TOKEN_KEYS = {"position", "text", "score"}
_LATENT_KEYS = {"sae_id", "latent", "activation"}


def _check_explanation(value: Mapping[str, Any] | None) -> None:
    """None, or {"tokens": [{position, text, score}], "latents": [{sae_id, latent, activation}]}
    within the bounds of monitor.domain (text None where none may be kept)."""
    if value is None:
        return
    _check_json("explanation", value)
    tokens, latents = value.get("tokens"), value.get("latents")
    if set(value) != {"tokens", "latents"} or not isinstance(tokens, list) or not isinstance(latents, list):
        raise ValueError("explanation must be {'tokens': [...], 'latents': [...]}")
    if len(tokens) > EXPLAIN_MAX_TOKENS or len(latents) > EXPLAIN_MAX_LATENTS:
        raise ValueError(f"explanation: at most {EXPLAIN_MAX_TOKENS} tokens and {EXPLAIN_MAX_LATENTS} latents, "
                         f"got {len(tokens)} and {len(latents)}")
    for t in tokens:
        if not isinstance(t, Mapping) or set(t) != _TOKEN_KEYS or len(t["text"] or "") > EXPLAIN_MAX_TEXT:
            raise ValueError(f"explanation tokens are {sorted(_TOKEN_KEYS)} with at most {EXPLAIN_MAX_TEXT} "
                             f"characters of text, got {t!r:.200}")
    if not all(isinstance(la, Mapping) and set(la) == _LATENT_KEYS for la in latents):
        raise ValueError(f"explanation latents are {sorted(_LATENT_KEYS)}")


@dataclass(frozen=True)
class RequestRecord:
    """One generate/score request. Submitting a record whose ``request_id`` is already stored
    replaces that row: the service writes it at admission (``finished_at`` None) so alerts
    always have their request, and again when it ends."""

    request_id: str
    kind: RequestKind
    model_id: str
    created_at: datetime = field(default_factory=utcnow)
    finished_at: datetime | None = None
    client_id: str | None = None
    conversation_id: str | None = None
    tags: Mapping[str, Any] = field(default_factory=dict)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_text: str | None = None
    completion_text: str | None = None
    alerted: bool = False
    snapshot_version: str = ""
    policy_version: str = ""

    def __post_init__(self) -> None:
        if not self.request_id:
            raise ValueError("request_id must be a non-empty string")
        _check_choice("kind", self.kind, REQUEST_KINDS)
        _check_aware("created_at", self.created_at)
        _check_aware("finished_at", self.finished_at)
        _check_json("tags", self.tags)


@dataclass(frozen=True)
class AlertRecord:
    """A detector fired. ``span_start``/``span_end`` are character offsets into the completion.

    ``alert_id`` is the public id: the server streams it to the client and GetAlerts returns
    the same one. ``input_index`` says which input of a Score request fired. ``explanation``
    (monitor.explain) lists the tokens that scored highest and the SAE latents active where it
    fired; its token texts are kept as ``span_text`` is (not under text_policy "never").
    ``rule_id`` is the policy rule that raised it (the detector id when no policy file is used).
    """

    request_id: str
    detector_id: str
    detector_version: str
    score: float
    threshold: float
    action: RuleActionName = "alert"
    created_at: datetime = field(default_factory=utcnow)
    token_index: int | None = None
    span_start: int | None = None
    span_end: int | None = None
    span_text: str | None = None
    client_id: str | None = None
    alert_id: str = field(default_factory=_new_id)
    snapshot_version: str = ""
    request_kind: RequestKind = "generate"
    input_index: int | None = None
    conversation_id: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)
    explanation: Mapping[str, Any] | None = None
    rule_id: str = ""
    policy_version: str = ""

    def __post_init__(self) -> None:
        if not self.alert_id:
            raise ValueError("alert_id must be a non-empty string")
        _check_choice("action", self.action, tuple(ACTIONS))
        _check_choice("request_kind", self.request_kind, REQUEST_KINDS)
        _check_aware("created_at", self.created_at)
        if self.input_index is not None and self.input_index < 0:
            raise ValueError(f"input_index must be >= 0, got {self.input_index}")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.tags.items()):
            raise ValueError("tags must map strings to strings")
        _check_explanation(self.explanation)


@dataclass(frozen=True)
class InterventionRecord:
    """One entry of a request's decision trail: a policy rule that fired (its action is the
    kind: log, alert, block, steer, escalate, shadow), steering a client asked for, or a
    per-request override of a rule (``details`` holds what was overridden, e.g.
    ``{"threshold": 0.9, "action": "alert"}``; for a latent clamp, ``sae_id`` and ``latent``).

    ``detector_id`` is the detector whose decision caused it (None when the client asked);
    ``trigger`` defaults to that id, or ``"request"``. A rule's record also carries the rule,
    the policy and detector versions, the score, what the monitor did (``outcome``, one of
    monitor.domain.DECISION_OUTCOMES), an escalation's verdict (``escalation``) and a shadow
    rule's would-be action (``shadow_action``). ``intervention_id`` identifies the record:
    submit it again with the same id (``dataclasses.replace(rec, token_end=n)``) to close it.
    """

    request_id: str
    kind: InterventionKind
    token_start: int
    detector_id: str | None = None
    trigger: str = ""
    steering_kind: SteeringKind | None = None
    hook_point: str | None = None
    vector_id: str | None = None
    coefficient: float | None = None
    details: Mapping[str, Any] = field(default_factory=dict)
    snapshot_version: str = ""
    client_id: str | None = None
    token_end: int | None = None
    created_at: datetime = field(default_factory=utcnow)
    intervention_id: str = field(default_factory=_new_id)
    rule_id: str = ""
    policy_version: str = ""
    detector_version: str = ""
    score: float | None = None
    outcome: str = ""
    escalation: Mapping[str, Any] | None = None  # monitor.escalation.Verdict.to_record()
    shadow_action: str | None = None

    def __post_init__(self) -> None:
        if not self.intervention_id:
            raise ValueError("intervention_id must be a non-empty string")
        _check_choice("kind", self.kind, INTERVENTION_KINDS)
        if self.outcome:
            _check_choice("outcome", self.outcome, DECISION_OUTCOMES)
        if (self.kind == "shadow") != (self.shadow_action is not None):
            raise ValueError("shadow_action is set exactly for kind='shadow'")
        if self.shadow_action is not None:
            _check_choice("shadow_action", self.shadow_action, tuple(ACTIONS))
        if self.escalation is not None:
            if self.kind != "escalate":
                raise ValueError(f"escalation only applies to kind='escalate', not {self.kind!r}")
            _check_json("escalation", self.escalation)
        if not self.trigger:
            object.__setattr__(self, "trigger", self.detector_id or "request")
        if self.kind == "steer":
            _check_choice("steering_kind", self.steering_kind, STEERING_KINDS)
            if not self.hook_point:
                raise ValueError("a steer intervention needs its hook_point")
        else:
            given = [f for f in _STEERING_FIELDS if getattr(self, f) is not None]
            if given:
                raise ValueError(f"{', '.join(given)} only apply to kind='steer', not {self.kind!r}")
        if not isinstance(self.token_start, int) or self.token_start < 0:
            raise ValueError(f"token_start must be an int >= 0, got {self.token_start!r}")
        if self.token_end is not None and self.token_end < self.token_start:
            raise ValueError(f"token_end ({self.token_end}) is before token_start ({self.token_start})")
        _check_aware("created_at", self.created_at)
        _check_json("details", self.details)


@dataclass(frozen=True)
class DetectorRecord:
    """A loaded detector; (detector_id, version) is unique, re-submitting updates the row."""

    detector_id: str
    version: str
    kind: str
    hook_point: str
    threshold: float
    calibration: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, Any] = field(default_factory=dict)
    loaded_at: datetime = field(default_factory=utcnow)

    def __post_init__(self) -> None:
        _check_aware("loaded_at", self.loaded_at)


Record = RequestRecord | AlertRecord | InterventionRecord | DetectorRecord
RECORD_TYPES = (RequestRecord, AlertRecord, InterventionRecord, DetectorRecord)
_TYPES = {cls.__name__: cls for cls in RECORD_TYPES}
_TIMES = ("created_at", "finished_at", "loaded_at")


def to_json(record: Record) -> tuple[str, dict[str, Any]]:
    """``record`` as its type's name and JSON-ready fields (times in ISO 8601), for the journal."""
    fields = {}
    for f in dataclasses.fields(record):
        v = getattr(record, f.name)
        fields[f.name] = v.isoformat() if isinstance(v, datetime) else dict(v) if isinstance(v, Mapping) else v
    return type(record).__name__, fields


def from_json(kind: str, fields: Mapping[str, Any]) -> Record:
    """The record :func:`to_json` described, validated again. ValueError when it describes none
    (e.g. a journal written by a version whose records had other fields)."""
    cls = _TYPES.get(kind)
    if cls is None:
        raise ValueError(f"unknown record type {kind!r}")
    try:
        return cls(**{k: datetime.fromisoformat(v) if k in _TIMES and v is not None else v
                      for k, v in fields.items()})
    except TypeError as exc:
        raise ValueError(f"not a {kind}: {exc}") from None
