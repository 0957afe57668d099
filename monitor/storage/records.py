"""Plain, immutable records the service hands to :class:`~monitor.storage.writer.StorageWriter`.

The service builds these on the token path and never touches SQLAlchemy: the writer thread
turns them into rows. Validation happens in ``__post_init__`` so a malformed record fails in
the caller (a programming error), not later inside a batch where it would poison the write.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, get_args

TextPolicy = Literal["always", "alerts_only", "never"]
RequestKind = Literal["generate", "score"]
AlertAction = Literal["alert", "block", "steer"]
InterventionKind = Literal["add", "ablate"]

TEXT_POLICIES: tuple[str, ...] = get_args(TextPolicy)


def utcnow() -> datetime:
    return datetime.now(UTC)


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


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _check_aware(name: str, value: datetime | None) -> None:
    if value is not None and (value.tzinfo is None or value.utcoffset() is None):
        raise ValueError(f"{name} must be timezone-aware (use datetime.now(timezone.utc))")


@dataclass(frozen=True)
class RequestRecord:
    """One generate/score request. Submitting a record whose ``request_id`` is already stored
    replaces that row (so the service may write it at start and again when it finishes)."""

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

    def __post_init__(self) -> None:
        if not self.request_id:
            raise ValueError("request_id must be a non-empty string")
        _check_choice("kind", self.kind, get_args(RequestKind))
        _check_aware("created_at", self.created_at)
        _check_aware("finished_at", self.finished_at)


@dataclass(frozen=True)
class AlertRecord:
    """A detector fired. ``span_start``/``span_end`` are character offsets into the completion."""

    request_id: str
    detector_id: str
    detector_version: str
    score: float
    threshold: float
    action: AlertAction = "alert"
    created_at: datetime = field(default_factory=utcnow)
    token_index: int | None = None
    span_start: int | None = None
    span_end: int | None = None
    span_text: str | None = None
    client_id: str | None = None

    def __post_init__(self) -> None:
        _check_choice("action", self.action, get_args(AlertAction))
        _check_aware("created_at", self.created_at)


@dataclass(frozen=True)
class InterventionRecord:
    """A steering intervention. ``intervention_id`` identifies it: submit the record again
    with the same id (e.g. ``dataclasses.replace(rec, token_end=n)``) to close it."""

    request_id: str
    kind: InterventionKind
    hook_point: str
    vector_id: str
    coefficient: float
    trigger: str  # detector id, or "request" when the client asked for it
    token_start: int
    token_end: int | None = None
    created_at: datetime = field(default_factory=utcnow)
    intervention_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __post_init__(self) -> None:
        _check_choice("kind", self.kind, get_args(InterventionKind))
        _check_aware("created_at", self.created_at)


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
