"""SQLAlchemy 2.0 typed models. Only the storage package imports these.

The schema is created by the Alembic migrations in ``migrations/`` (never by
``metadata.create_all``); ``tests/monitor/storage/test_migrations.py`` checks the two agree.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware datetimes, stored in UTC.

    PostgreSQL: ``timestamptz``. SQLite has no time zones, so values are stored as naive UTC
    (its fixed-width text format then sorts chronologically) and come back tagged as UTC.
    Naive inputs are taken to be UTC already.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            value = value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


#: JSON everywhere, JSONB on PostgreSQL (indexable, compact).
JSONType = JSON().with_variant(JSONB(), "postgresql")
#: 64-bit autoincrement key; SQLite only autoincrements ``INTEGER PRIMARY KEY``.
BigIntPK = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    pass


class Request(Base):
    __tablename__ = "requests"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    client_id: Mapped[str | None] = mapped_column(String)
    conversation_id: Mapped[str | None] = mapped_column(String)
    tags: Mapped[dict[str, Any]] = mapped_column(JSONType)
    kind: Mapped[str] = mapped_column(String)  # "generate" | "score"
    model_id: Mapped[str] = mapped_column(String)
    finish_reason: Mapped[str | None] = mapped_column(String)
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    prompt_text: Mapped[str | None] = mapped_column(Text)
    completion_text: Mapped[str | None] = mapped_column(Text)
    text_sha256: Mapped[str | None] = mapped_column(String(64))
    alerted: Mapped[bool] = mapped_column()
    snapshot_version: Mapped[str] = mapped_column(String, server_default="")
    policy_version: Mapped[str] = mapped_column(String, server_default="")

    __table_args__ = (
        UniqueConstraint("request_id", name="uq_requests_request_id"),
        Index("ix_requests_created_at", "created_at"),
        Index("ix_requests_client_id_created_at", "client_id", "created_at"),
        Index("ix_requests_conversation_id", "conversation_id"),
    )


class Alert(Base):
    __tablename__ = "alerts"

    # Internal: the keyset tiebreaker of get_alerts. The public id is alert_id.
    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    alert_id: Mapped[str] = mapped_column(String)
    # Not a real foreign key: the requests row exists from admission, but alerts of a
    # request whose admission record was dropped must still be kept.
    request_id: Mapped[str] = mapped_column(String)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    detector_id: Mapped[str] = mapped_column(String)
    detector_version: Mapped[str] = mapped_column(String)
    score: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    token_index: Mapped[int | None] = mapped_column(Integer)
    span_start: Mapped[int | None] = mapped_column(Integer)
    span_end: Mapped[int | None] = mapped_column(Integer)
    span_text: Mapped[str | None] = mapped_column(Text)
    action: Mapped[str] = mapped_column(String)  # monitor.domain.ACTIONS
    client_id: Mapped[str | None] = mapped_column(String)
    snapshot_version: Mapped[str] = mapped_column(String, server_default="")
    request_kind: Mapped[str] = mapped_column(String, server_default="generate")
    input_index: Mapped[int | None] = mapped_column(Integer)  # Score: which input
    conversation_id: Mapped[str | None] = mapped_column(String)
    tags: Mapped[dict[str, str]] = mapped_column(JSONType, server_default="{}")
    # {"tokens": [...], "latents": [...]} (monitor.storage.records.AlertRecord), or null when it has none
    explanation: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    rule_id: Mapped[str] = mapped_column(String, server_default="")  # the detector id without a policy file
    policy_version: Mapped[str] = mapped_column(String, server_default="")

    __table_args__ = (
        UniqueConstraint("alert_id", name="uq_alerts_alert_id"),
        # get_alerts: keyset order (created_at, id), optionally narrowed by one filter.
        Index("ix_alerts_created_at_id", "created_at", "id"),
        Index("ix_alerts_detector_id_created_at_id", "detector_id", "created_at", "id"),
        Index("ix_alerts_client_id_created_at_id", "client_id", "created_at", "id"),
        Index("ix_alerts_request_id", "request_id"),
    )


class Intervention(Base):
    """The decision trail: every rule that fired (kind = its action), client steering and overrides."""

    __tablename__ = "interventions"

    id: Mapped[str] = mapped_column(String, primary_key=True)  # InterventionRecord.intervention_id
    request_id: Mapped[str] = mapped_column(String)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    kind: Mapped[str] = mapped_column(String)  # monitor.domain.INTERVENTION_KINDS
    detector_id: Mapped[str | None] = mapped_column(String)
    trigger: Mapped[str] = mapped_column(String)  # detector id or "request"
    steering_kind: Mapped[str | None] = mapped_column(String)  # kind="steer": "add" | "ablate" | "clamp"
    hook_point: Mapped[str | None] = mapped_column(String)
    vector_id: Mapped[str | None] = mapped_column(String)
    coefficient: Mapped[float | None] = mapped_column(Float)
    details: Mapped[dict[str, Any]] = mapped_column(JSONType, server_default="{}")
    snapshot_version: Mapped[str] = mapped_column(String, server_default="")
    client_id: Mapped[str | None] = mapped_column(String)
    token_start: Mapped[int] = mapped_column(Integer)
    token_end: Mapped[int | None] = mapped_column(Integer)
    rule_id: Mapped[str] = mapped_column(String, server_default="")
    policy_version: Mapped[str] = mapped_column(String, server_default="")
    detector_version: Mapped[str] = mapped_column(String, server_default="")
    score: Mapped[float | None] = mapped_column(Float)
    outcome: Mapped[str] = mapped_column(String, server_default="")  # monitor.domain.DECISION_OUTCOMES
    escalation: Mapped[dict[str, Any] | None] = mapped_column(JSONType)  # kind="escalate": the verdict
    shadow_action: Mapped[str | None] = mapped_column(String)  # kind="shadow": what it would have done

    __table_args__ = (
        # get_interventions: keyset order (created_at, id), optionally narrowed by one filter.
        Index("ix_interventions_created_at_id", "created_at", "id"),
        Index("ix_interventions_client_id_created_at_id", "client_id", "created_at", "id"),
        Index("ix_interventions_request_id", "request_id"),
        Index("ix_interventions_rule_id_created_at_id", "rule_id", "created_at", "id"),
    )


class Detector(Base):
    __tablename__ = "detectors"

    id: Mapped[str] = mapped_column(String, primary_key=True)
    version: Mapped[str] = mapped_column(String, primary_key=True)
    kind: Mapped[str] = mapped_column(String)
    hook_point: Mapped[str] = mapped_column(String)
    threshold: Mapped[float] = mapped_column(Float)
    calibration: Mapped[dict[str, Any]] = mapped_column(JSONType)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSONType)
    loaded_at: Mapped[datetime] = mapped_column(UTCDateTime)
