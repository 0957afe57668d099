"""Read side: alerts with keyset pagination, and one request with its alerts/interventions.

Results are frozen dataclasses, never ORM objects, so callers need no session.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import and_, or_, select
from sqlalchemy.engine import Engine

from monitor.storage.models import Alert, Intervention, Request

MAX_PAGE_SIZE = 1000
_TOKEN_VERSION = 1


@dataclass(frozen=True)
class AlertRow:
    id: int
    request_id: str
    created_at: datetime
    detector_id: str
    detector_version: str
    score: float
    threshold: float
    token_index: int | None
    span_start: int | None
    span_end: int | None
    span_text: str | None
    action: str
    client_id: str | None


@dataclass(frozen=True)
class InterventionRow:
    id: str
    request_id: str
    created_at: datetime
    kind: str
    hook_point: str
    vector_id: str
    coefficient: float
    trigger: str
    token_start: int
    token_end: int | None


@dataclass(frozen=True)
class RequestRow:
    request_id: str
    created_at: datetime
    finished_at: datetime | None
    client_id: str | None
    conversation_id: str | None
    tags: dict[str, Any]
    kind: str
    model_id: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    prompt_text: str | None
    completion_text: str | None
    text_sha256: str | None
    alerted: bool
    alerts: tuple[AlertRow, ...] = ()
    interventions: tuple[InterventionRow, ...] = ()


_ALERT_COLUMNS = [c for c in AlertRow.__dataclass_fields__]
_INTERVENTION_COLUMNS = [c for c in InterventionRow.__dataclass_fields__]
_REQUEST_COLUMNS = [
    c for c in RequestRow.__dataclass_fields__ if c not in ("alerts", "interventions")
]


def _encode_token(created_at: datetime, row_id: int) -> str:
    payload = {
        "v": _TOKEN_VERSION,
        "t": created_at.astimezone(UTC).isoformat(),
        "i": row_id,
    }
    raw = json.dumps(payload, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_token(token: str) -> tuple[datetime, int]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        payload = json.loads(raw)
        if payload.get("v") != _TOKEN_VERSION:
            raise ValueError("unknown version")
        created_at = datetime.fromisoformat(payload["t"])
        row_id = payload["i"]
        if created_at.tzinfo is None or not isinstance(row_id, int) or isinstance(row_id, bool):
            raise ValueError("malformed fields")
    except (ValueError, TypeError, KeyError, AttributeError, binascii.Error) as exc:
        raise ValueError(
            f"invalid page_token {token[:40]!r}: pass back the next_page_token returned by "
            f"a previous get_alerts call unchanged ({exc})"
        ) from None
    return created_at, row_id


def get_alerts(
    engine: Engine,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    detector_id: str | None = None,
    request_id: str | None = None,
    client_id: str | None = None,
    page_size: int = 100,
    page_token: str | None = None,
) -> tuple[list[AlertRow], str | None]:
    """Alerts oldest first, ordered by (created_at, id), filtered by all given arguments.

    ``since`` is inclusive, ``until`` exclusive (timezone-aware datetimes; naive ones are taken
    as UTC). Returns the page and an opaque ``next_page_token`` (None on the last page).
    Keyset pagination: pages neither repeat nor skip rows even while new alerts arrive.
    Raises ValueError for a bad ``page_token`` or ``page_size`` outside 1..1000.
    """
    if not 1 <= page_size <= MAX_PAGE_SIZE:
        raise ValueError(f"page_size must be between 1 and {MAX_PAGE_SIZE}, got {page_size}")
    conds = []
    if since is not None:
        conds.append(Alert.created_at >= since)
    if until is not None:
        conds.append(Alert.created_at < until)
    if detector_id is not None:
        conds.append(Alert.detector_id == detector_id)
    if request_id is not None:
        conds.append(Alert.request_id == request_id)
    if client_id is not None:
        conds.append(Alert.client_id == client_id)
    if page_token:
        after_t, after_id = _decode_token(page_token)
        conds.append(
            or_(Alert.created_at > after_t, and_(Alert.created_at == after_t, Alert.id > after_id))
        )
    cols = [getattr(Alert, c) for c in _ALERT_COLUMNS]
    stmt = select(*cols).where(*conds).order_by(Alert.created_at, Alert.id).limit(page_size + 1)
    with engine.connect() as conn:
        rows = [AlertRow(**r._asdict()) for r in conn.execute(stmt)]
    if len(rows) <= page_size:
        return rows, None
    rows = rows[:page_size]
    last = rows[-1]
    return rows, _encode_token(last.created_at, last.id)


def get_request(engine: Engine, request_id: str) -> RequestRow | None:
    """One request with its alerts and interventions (both oldest first), or None."""
    with engine.connect() as conn:
        row = conn.execute(
            select(*[getattr(Request, c) for c in _REQUEST_COLUMNS]).where(
                Request.request_id == request_id
            )
        ).first()
        if row is None:
            return None
        alerts = conn.execute(
            select(*[getattr(Alert, c) for c in _ALERT_COLUMNS])
            .where(Alert.request_id == request_id)
            .order_by(Alert.created_at, Alert.id)
        )
        interventions = conn.execute(
            select(*[getattr(Intervention, c) for c in _INTERVENTION_COLUMNS])
            .where(Intervention.request_id == request_id)
            .order_by(Intervention.created_at, Intervention.id)
        )
        return RequestRow(
            **row._asdict(),
            alerts=tuple(AlertRow(**r._asdict()) for r in alerts),
            interventions=tuple(InterventionRow(**r._asdict()) for r in interventions),
        )
