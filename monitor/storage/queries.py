"""Read side: alerts and interventions with keyset pagination, and one request with its
alerts/interventions.

Results are frozen dataclasses, never ORM objects, so callers need no session. Every input
is checked before it reaches the database (a bad token or filter is a ValueError, never a
database error), and a database that is down raises :class:`StorageUnavailable`.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, or_, select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from monitor.storage.engine import StorageUnavailable
from monitor.storage.models import Alert, Base, Intervention, Request

MAX_PAGE_SIZE = 1000
_TOKEN_VERSION = 2
_MAX_TOKEN_CHARS = 512  # ours are ~150; anything far longer is not one of them
_MAX_KEY = 2**63 - 1  # BIGINT
# The ends of what Python (and so the drivers) can hold in UTC: bounds beyond them clamp here.
_MIN_TIME = datetime.min.replace(tzinfo=UTC)
_MAX_TIME = datetime.max.replace(tzinfo=UTC)
_DOWN = (OperationalError, InterfaceError, DisconnectionError, PoolTimeoutError)
_KEY = "page_key"  # the keyset tiebreaker, selected next to a row's columns


@dataclass(frozen=True)
class AlertRow:
    alert_id: str
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
    snapshot_version: str
    request_kind: str
    input_index: int | None
    conversation_id: str | None
    tags: dict[str, str]
    explanation: dict[str, Any] | None  # as AlertRecord.explanation (texts None under text_policy "never")
    rule_id: str
    policy_version: str


@dataclass(frozen=True)
class InterventionRow:
    intervention_id: str
    request_id: str
    created_at: datetime
    kind: str
    detector_id: str | None
    trigger: str
    steering_kind: str | None
    hook_point: str | None
    vector_id: str | None
    coefficient: float | None
    details: dict[str, Any]
    snapshot_version: str
    client_id: str | None
    token_start: int
    token_end: int | None
    rule_id: str
    policy_version: str
    detector_version: str
    score: float | None
    outcome: str
    escalation: dict[str, Any] | None
    shadow_action: str | None


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
    snapshot_version: str
    policy_version: str
    alerts: tuple[AlertRow, ...] = ()
    interventions: tuple[InterventionRow, ...] = ()


def _columns(model: type[Base], row_type: type, **renamed: Any) -> list[ColumnElement[Any]]:
    """The columns that fill ``row_type``, each labelled with its field name."""
    names = [f.name for f in fields(row_type) if f.name not in ("alerts", "interventions")]
    return [(renamed[n] if n in renamed else getattr(model, n)).label(n) for n in names]


_ALERT_COLUMNS = _columns(Alert, AlertRow)
_INTERVENTION_COLUMNS = _columns(Intervention, InterventionRow, intervention_id=Intervention.id)
_REQUEST_COLUMNS = _columns(Request, RequestRow)


@contextmanager
def _reading(engine: Engine) -> Iterator[Connection]:
    """A connection for one read; a database that cannot be reached raises StorageUnavailable
    (its message names no host, SQL or parameters: it may reach a client)."""
    try:
        with engine.connect() as conn:
            yield conn
    except SQLAlchemyError as exc:
        if isinstance(exc, _DOWN) or getattr(exc, "connection_invalidated", False):
            raise StorageUnavailable() from exc
        raise


def _check_text(name: str, value: str | None) -> None:
    """PostgreSQL refuses NUL and the drivers unencodable text: say so before they do."""
    if value is None:
        return
    if not isinstance(value, str) or "\x00" in value:
        raise ValueError(f"{name}: must be text without NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{name}: not valid UTF-8 text") from None


def _utc_bound(name: str, value: datetime | None) -> datetime | None:
    """``value`` in UTC (naive is taken as UTC), clamped to years 1..9999 UTC: a bound beyond
    them selects the same rows as that end, and no driver overflows."""
    if value is None:
        return None
    if not isinstance(value, datetime):
        raise ValueError(f"{name}: must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        value = value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:
        return _MIN_TIME if value.year == 1 else _MAX_TIME


def _scope(table: str, filters: dict[str, Any]) -> str:
    """Short hash of a query and its filters: a page token only continues the query it came from."""
    raw = json.dumps([table, filters], sort_keys=True, default=datetime.isoformat, separators=(",", ":"))
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _encode_token(scope: str, created_at: datetime, key: int | str) -> str:
    payload = {"v": _TOKEN_VERSION, "f": scope, "t": created_at.astimezone(UTC).isoformat(), "i": key}
    raw = json.dumps(payload, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_token(token: str, scope: str, key_type: type) -> tuple[datetime, int | str]:
    """The (created_at, key) a page token continues after; ValueError unless this query issued it."""
    try:
        if not isinstance(token, str) or len(token) > _MAX_TOKEN_CHARS:
            raise ValueError
        payload = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        if payload["v"] != _TOKEN_VERSION or not isinstance(payload["f"], str):
            raise ValueError
        created_at = datetime.fromisoformat(payload["t"])
        key = payload["i"]
        if created_at.utcoffset() is None or type(key) is not key_type:
            raise ValueError
        if isinstance(key, int) and not 0 <= key <= _MAX_KEY:
            raise ValueError
        if isinstance(key, str):
            _check_text("key", key)
    except (ValueError, TypeError, KeyError, AttributeError):
        shown = token[:32] + "..." if isinstance(token, str) and len(token) > 32 else token
        raise ValueError(
            f"page_token: invalid ({shown!r}); pass back the next_page_token of the previous call unchanged"
        ) from None
    if payload["f"] != scope:
        raise ValueError("page_token: was issued for other filters; start again without it")
    return _utc_bound("page_token", created_at), key


def _paged(
    engine: Engine,
    model: type[Alert] | type[Intervention],
    columns: list[ColumnElement[Any]],
    row_type: type,
    *,
    since: datetime | None,
    until: datetime | None,
    page_size: int,
    page_token: str | None,
    **equal: str | None,
) -> tuple[list[Any], str | None]:
    """One page of ``model`` rows in keyset order (created_at, id), narrowed by since/until
    and by equality on the ``equal`` columns that are not None."""
    if not isinstance(page_size, int) or not 1 <= page_size <= MAX_PAGE_SIZE:
        raise ValueError(f"page_size must be between 1 and {MAX_PAGE_SIZE}, got {page_size}")
    for name, value in equal.items():
        _check_text(name, value)
    since, until = _utc_bound("since", since), _utc_bound("until", until)
    scope = _scope(model.__tablename__, {"since": since, "until": until, **equal})
    conds = [getattr(model, name) == value for name, value in equal.items() if value is not None]
    if since is not None:
        conds.append(model.created_at >= since)
    if until is not None:
        conds.append(model.created_at < until)
    if page_token:
        after_t, after_key = _decode_token(page_token, scope, model.id.type.python_type)
        conds.append(or_(model.created_at > after_t, and_(model.created_at == after_t, model.id > after_key)))
    stmt = (
        select(model.id.label(_KEY), *columns).where(*conds).order_by(model.created_at, model.id).limit(page_size + 1)
    )
    with _reading(engine) as conn:
        found = conn.execute(stmt).all()
    rows = [row_type(**{k: v for k, v in r._asdict().items() if k != _KEY}) for r in found[:page_size]]
    if len(found) <= page_size:
        return rows, None
    last = found[page_size - 1]._mapping
    return rows, _encode_token(scope, last["created_at"], last[_KEY])


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
    """Alerts oldest first, filtered by all given arguments.

    ``since`` is inclusive, ``until`` exclusive (timezone-aware datetimes; naive ones are taken
    as UTC; bounds beyond years 1..9999 UTC are clamped). Returns the page and an opaque
    ``next_page_token`` (None on the last page), valid only with the same filters.
    Keyset pagination: pages neither repeat nor skip rows even while new alerts arrive.
    Raises ValueError for a bad filter, ``page_token`` or ``page_size`` outside 1..1000, and
    StorageUnavailable when the database cannot be reached.
    """
    return _paged(
        engine,
        Alert,
        _ALERT_COLUMNS,
        AlertRow,
        since=since,
        until=until,
        page_size=page_size,
        page_token=page_token,
        detector_id=detector_id,
        request_id=request_id,
        client_id=client_id,
    )


def get_interventions(
    engine: Engine,
    *,
    request_id: str | None = None,
    client_id: str | None = None,
    detector_id: str | None = None,
    rule_id: str | None = None,
    kind: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    page_size: int = 100,
    page_token: str | None = None,
) -> tuple[list[InterventionRow], str | None]:
    """The decision trail oldest first, filtered by all given arguments (``kind``: one of
    monitor.domain.INTERVENTION_KINDS); paging and errors as :func:`get_alerts`."""
    return _paged(
        engine,
        Intervention,
        _INTERVENTION_COLUMNS,
        InterventionRow,
        since=since,
        until=until,
        page_size=page_size,
        page_token=page_token,
        request_id=request_id,
        client_id=client_id,
        detector_id=detector_id,
        rule_id=rule_id,
        kind=kind,
    )


def get_request(engine: Engine, request_id: str) -> RequestRow | None:
    """One request with its alerts and interventions (both oldest first), or None.

    Raises ValueError for an unusable ``request_id`` and StorageUnavailable when the database
    cannot be reached.
    """
    _check_text("request_id", request_id)
    with _reading(engine) as conn:
        row = conn.execute(select(*_REQUEST_COLUMNS).where(Request.request_id == request_id)).first()
        if row is None:
            return None
        alerts = conn.execute(
            select(*_ALERT_COLUMNS).where(Alert.request_id == request_id).order_by(Alert.created_at, Alert.id)
        )
        interventions = conn.execute(
            select(*_INTERVENTION_COLUMNS)
            .where(Intervention.request_id == request_id)
            .order_by(Intervention.created_at, Intervention.id)
        )
        return RequestRow(
            **row._asdict(),
            alerts=tuple(AlertRow(**r._asdict()) for r in alerts),
            interventions=tuple(InterventionRow(**r._asdict()) for r in interventions),
        )
