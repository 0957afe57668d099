"""Public alert ids, snapshot versions, Score inputs, and the decision trail in interventions.

Alerts get ``alert_id`` (existing rows keep the id clients were shown: the integer key as
text), ``snapshot_version``, ``request_kind``, ``input_index``, ``conversation_id`` and
``tags``; requests get ``snapshot_version``. Interventions now hold blocks and overrides as
well as steering: the old ``kind`` (add | ablate) moves to ``steering_kind`` under
``kind='steer'``, and the steering columns become optional.

Revision ID: 0002_decision_trail
Revises: 0001_initial
Create Date: 2026-01-12
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0002_decision_trail"
down_revision: str | None = "0001_initial"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copy of the JSON type used by this revision (later model changes must not alter it).
JSONType = sa.JSON().with_variant(JSONB(), "postgresql")

requests = sa.table(
    "requests", sa.column("request_id"), sa.column("kind"), sa.column("client_id"), sa.column("conversation_id")
)
alerts = sa.table(
    "alerts",
    sa.column("id"),
    sa.column("alert_id"),
    sa.column("request_id"),
    sa.column("request_kind"),
    sa.column("conversation_id"),
)
interventions = sa.table(
    "interventions",
    sa.column("request_id"),
    sa.column("kind"),
    sa.column("trigger"),
    sa.column("detector_id"),
    sa.column("steering_kind"),
    sa.column("client_id"),
    sa.column("hook_point"),
    sa.column("vector_id"),
    sa.column("coefficient"),
)


def _from_request(table: sa.TableClause, column: str) -> sa.ScalarSelect:
    """The value of ``column`` in the row's request (NULL when that request was never stored)."""
    return sa.select(requests.c[column]).where(requests.c.request_id == table.c.request_id).scalar_subquery()


def upgrade() -> None:
    with op.batch_alter_table("requests") as batch:
        batch.add_column(sa.Column("snapshot_version", sa.String(), nullable=False, server_default=""))
    _upgrade_alerts()
    _upgrade_interventions()


def _upgrade_alerts() -> None:
    with op.batch_alter_table("alerts") as batch:
        batch.add_column(sa.Column("alert_id", sa.String(), nullable=True))
        batch.add_column(sa.Column("snapshot_version", sa.String(), nullable=False, server_default=""))
        batch.add_column(sa.Column("request_kind", sa.String(), nullable=False, server_default="generate"))
        batch.add_column(sa.Column("input_index", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("conversation_id", sa.String(), nullable=True))
        batch.add_column(sa.Column("tags", JSONType, nullable=False, server_default="{}"))
    op.execute(
        alerts.update().values(
            alert_id=sa.cast(alerts.c.id, sa.String()),  # what GetAlerts showed clients so far
            conversation_id=_from_request(alerts, "conversation_id"),
            request_kind=sa.func.coalesce(_from_request(alerts, "kind"), "generate"),
        )
    )
    with op.batch_alter_table("alerts") as batch:
        batch.alter_column("alert_id", existing_type=sa.String(), nullable=False)
        batch.create_unique_constraint("uq_alerts_alert_id", ["alert_id"])


def _upgrade_interventions() -> None:
    with op.batch_alter_table("interventions") as batch:
        batch.add_column(sa.Column("detector_id", sa.String(), nullable=True))
        batch.add_column(sa.Column("steering_kind", sa.String(), nullable=True))
        batch.add_column(sa.Column("details", JSONType, nullable=False, server_default="{}"))
        batch.add_column(sa.Column("snapshot_version", sa.String(), nullable=False, server_default=""))
        batch.add_column(sa.Column("client_id", sa.String(), nullable=True))
        batch.alter_column("hook_point", existing_type=sa.String(), nullable=True)
        batch.alter_column("vector_id", existing_type=sa.String(), nullable=True)
        batch.alter_column("coefficient", existing_type=sa.Float(), nullable=True)
        batch.drop_index("ix_interventions_created_at")
        batch.create_index("ix_interventions_created_at_id", ["created_at", "id"])
        batch.create_index("ix_interventions_client_id_created_at_id", ["client_id", "created_at", "id"])
    iv = interventions.c
    op.execute(  # every 0001 intervention was a steering one
        interventions.update().values(
            kind="steer",
            steering_kind=iv.kind,
            detector_id=sa.case((iv.trigger == "request", None), else_=iv.trigger),
            client_id=_from_request(interventions, "client_id"),
        )
    )


def downgrade() -> None:
    """Lossy: blocks and overrides have no place in 0001 and are deleted."""
    iv = interventions.c
    op.execute(interventions.delete().where(iv.kind != "steer"))
    op.execute(
        interventions.update().values(
            kind=iv.steering_kind,
            vector_id=sa.func.coalesce(iv.vector_id, "inline"),
            coefficient=sa.func.coalesce(iv.coefficient, 0.0),
        )
    )
    with op.batch_alter_table("interventions") as batch:
        batch.drop_index("ix_interventions_client_id_created_at_id")
        batch.drop_index("ix_interventions_created_at_id")
        batch.create_index("ix_interventions_created_at", ["created_at"])
        batch.alter_column("hook_point", existing_type=sa.String(), nullable=False)
        batch.alter_column("vector_id", existing_type=sa.String(), nullable=False)
        batch.alter_column("coefficient", existing_type=sa.Float(), nullable=False)
        for name in ("client_id", "snapshot_version", "details", "steering_kind", "detector_id"):
            batch.drop_column(name)
    with op.batch_alter_table("alerts") as batch:
        batch.drop_constraint("uq_alerts_alert_id", type_="unique")
        for name in ("tags", "conversation_id", "input_index", "request_kind", "snapshot_version", "alert_id"):
            batch.drop_column(name)
    with op.batch_alter_table("requests") as batch:
        batch.drop_column("snapshot_version")
