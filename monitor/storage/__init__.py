"""Persistent record of every request, alert, intervention (block, steer, override) and
loaded detector.

The service builds plain records (:mod:`monitor.storage.records`) and hands them to a
:class:`StorageWriter`, which appends each to a local journal (:mod:`monitor.storage.journal`,
on disk before ``submit`` returns) and copies the journal into the database in batches from a
background thread, retrying while the database is down. Reads go
through :mod:`monitor.storage.queries` (a database that is down raises
:class:`StorageUnavailable`). Supported databases: SQLite (default, WAL mode) and
PostgreSQL through psycopg 3. The schema is managed by Alembic migrations shipped in this
package and applied by :func:`open_database` (idempotent).
"""

from __future__ import annotations

from monitor.domain import TextPolicy
from monitor.storage.engine import (
    StorageError,
    StorageFull,
    StorageUnavailable,
    alembic_config,
    check_url,
    create_storage_engine,
    mask_url,
    normalize_url,
    open_database,
    open_readonly,
    upgrade_database,
)
from monitor.storage.journal import check_journal_dir
from monitor.storage.queries import (
    AlertRow,
    InterventionRow,
    RequestRow,
    get_alerts,
    get_interventions,
    get_request,
)
from monitor.storage.records import (
    AlertRecord,
    DetectorRecord,
    InterventionRecord,
    Record,
    RequestRecord,
    text_sha256,
)
from monitor.storage.writer import StorageWriter

__all__ = [
    "AlertRecord",
    "AlertRow",
    "DetectorRecord",
    "InterventionRecord",
    "InterventionRow",
    "Record",
    "RequestRecord",
    "RequestRow",
    "StorageError",
    "StorageFull",
    "StorageUnavailable",
    "StorageWriter",
    "TextPolicy",
    "alembic_config",
    "check_journal_dir",
    "check_url",
    "create_storage_engine",
    "get_alerts",
    "get_interventions",
    "get_request",
    "mask_url",
    "normalize_url",
    "open_database",
    "open_readonly",
    "text_sha256",
    "upgrade_database",
]
