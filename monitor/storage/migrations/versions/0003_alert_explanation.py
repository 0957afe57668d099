"""Alert explanations: the tokens that scored highest and the SAE latents active where it fired.

Alerts get a nullable JSON ``explanation``; alerts recorded before this revision have none.

Revision ID: 0003_alert_explanation
Revises: 0002_decision_trail
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0003_alert_explanation"
down_revision: str | None = "0002_decision_trail"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copy of the JSON type used by this revision (later model changes must not alter it).
JSONType = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("alerts") as batch:
        batch.add_column(sa.Column("explanation", JSONType, nullable=True))


def downgrade() -> None:
    """Lossy: explanations have no place in 0002."""
    with op.batch_alter_table("alerts") as batch:
        batch.drop_column("explanation")
