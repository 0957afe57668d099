"""The policy's decision trail: which rule decided, under which policy, with what score and outcome.

Requests, alerts and interventions get ``policy_version``; alerts and interventions ``rule_id``;
interventions the detector version, score, outcome, an escalation verdict and a shadow rule's
would-be action. Rows recorded before this revision read empty strings and nulls.

Revision ID: 0004_policy_trail
Revises: 0003_alert_explanation
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0004_policy_trail"
down_revision: str | None = "0003_alert_explanation"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copy of the JSON type used by this revision (later model changes must not alter it).
JSONType = sa.JSON().with_variant(JSONB(), "postgresql")


def _text(name: str) -> sa.Column:
    return sa.Column(name, sa.String(), nullable=False, server_default="")


def upgrade() -> None:
    with op.batch_alter_table("requests") as batch:
        batch.add_column(_text("policy_version"))
    with op.batch_alter_table("alerts") as batch:
        batch.add_column(_text("rule_id"))
        batch.add_column(_text("policy_version"))
    with op.batch_alter_table("interventions") as batch:
        for name in ("rule_id", "policy_version", "detector_version", "outcome"):
            batch.add_column(_text(name))
        batch.add_column(sa.Column("score", sa.Float(), nullable=True))
        batch.add_column(sa.Column("escalation", JSONType, nullable=True))
        batch.add_column(sa.Column("shadow_action", sa.String(), nullable=True))
        batch.create_index("ix_interventions_rule_id_created_at_id", ["rule_id", "created_at", "id"])


def downgrade() -> None:
    """Lossy: 0003 has no place for the policy's fields."""
    with op.batch_alter_table("interventions") as batch:
        batch.drop_index("ix_interventions_rule_id_created_at_id")
        for name in ("shadow_action", "escalation", "score", "outcome", "detector_version", "policy_version",
                     "rule_id"):
            batch.drop_column(name)
    with op.batch_alter_table("alerts") as batch:
        batch.drop_column("policy_version")
        batch.drop_column("rule_id")
    with op.batch_alter_table("requests") as batch:
        batch.drop_column("policy_version")
