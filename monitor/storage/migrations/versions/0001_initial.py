"""Initial schema: requests, alerts, interventions, detectors.

Revision ID: 0001_initial
Revises:
Create Date: 2025-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

from monitor.storage.models import UTCDateTime

revision: str = "0001_initial"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the types used by this revision (later model changes must not alter it).
JSONType = sa.JSON().with_variant(JSONB(), "postgresql")
BigIntPK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "requests",
        sa.Column("id", BigIntPK, primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.String(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("finished_at", UTCDateTime(), nullable=True),
        sa.Column("client_id", sa.String(), nullable=True),
        sa.Column("conversation_id", sa.String(), nullable=True),
        sa.Column("tags", JSONType, nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("model_id", sa.String(), nullable=False),
        sa.Column("finish_reason", sa.String(), nullable=True),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("prompt_text", sa.Text(), nullable=True),
        sa.Column("completion_text", sa.Text(), nullable=True),
        sa.Column("text_sha256", sa.String(64), nullable=True),
        sa.Column("alerted", sa.Boolean(), nullable=False),
        sa.UniqueConstraint("request_id", name="uq_requests_request_id"),
    )
    op.create_index("ix_requests_created_at", "requests", ["created_at"])
    op.create_index("ix_requests_client_id_created_at", "requests", ["client_id", "created_at"])
    op.create_index("ix_requests_conversation_id", "requests", ["conversation_id"])

    op.create_table(
        "alerts",
        sa.Column("id", BigIntPK, primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.String(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("detector_id", sa.String(), nullable=False),
        sa.Column("detector_version", sa.String(), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("token_index", sa.Integer(), nullable=True),
        sa.Column("span_start", sa.Integer(), nullable=True),
        sa.Column("span_end", sa.Integer(), nullable=True),
        sa.Column("span_text", sa.Text(), nullable=True),
        sa.Column("action", sa.String(), nullable=False),
        sa.Column("client_id", sa.String(), nullable=True),
    )
    op.create_index("ix_alerts_created_at_id", "alerts", ["created_at", "id"])
    op.create_index(
        "ix_alerts_detector_id_created_at_id", "alerts", ["detector_id", "created_at", "id"]
    )
    op.create_index(
        "ix_alerts_client_id_created_at_id", "alerts", ["client_id", "created_at", "id"]
    )
    op.create_index("ix_alerts_request_id", "alerts", ["request_id"])

    op.create_table(
        "interventions",
        sa.Column("id", sa.String(), primary_key=True),
        sa.Column("request_id", sa.String(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("hook_point", sa.String(), nullable=False),
        sa.Column("vector_id", sa.String(), nullable=False),
        sa.Column("coefficient", sa.Float(), nullable=False),
        sa.Column("trigger", sa.String(), nullable=False),
        sa.Column("token_start", sa.Integer(), nullable=False),
        sa.Column("token_end", sa.Integer(), nullable=True),
    )
    op.create_index("ix_interventions_request_id", "interventions", ["request_id"])
    op.create_index("ix_interventions_created_at", "interventions", ["created_at"])

    op.create_table(
        "detectors",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("version", sa.String(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("hook_point", sa.String(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("calibration", JSONType, nullable=False),
        sa.Column("metrics", JSONType, nullable=False),
        sa.Column("loaded_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", "version", name="pk_detectors"),
    )


def downgrade() -> None:
    op.drop_table("detectors")
    op.drop_index("ix_interventions_created_at", table_name="interventions")
    op.drop_index("ix_interventions_request_id", table_name="interventions")
    op.drop_table("interventions")
    op.drop_index("ix_alerts_request_id", table_name="alerts")
    op.drop_index("ix_alerts_client_id_created_at_id", table_name="alerts")
    op.drop_index("ix_alerts_detector_id_created_at_id", table_name="alerts")
    op.drop_index("ix_alerts_created_at_id", table_name="alerts")
    op.drop_table("alerts")
    op.drop_index("ix_requests_conversation_id", table_name="requests")
    op.drop_index("ix_requests_client_id_created_at", table_name="requests")
    op.drop_index("ix_requests_created_at", table_name="requests")
    op.drop_table("requests")
