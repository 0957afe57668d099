"""Persistent record of every request, alert, steering intervention and loaded detector.

The service builds plain records (:mod:`monitor.storage.records`) and hands them to a
:class:`StorageWriter`, which writes them in batches from a background thread. Reads go
through :mod:`monitor.storage.queries`. Supported databases: SQLite (default, WAL mode) and
PostgreSQL through psycopg 3. The schema is managed by Alembic migrations shipped in this
package and applied by :func:`open_database` (idempotent).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.pool import StaticPool

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 10_000
PG_CONNECT_TIMEOUT_S = 10
# Key for pg_advisory_xact_lock: two processes starting at once migrate one after the other.
_PG_MIGRATION_LOCK = 0x6C77_6D69_6772  # "lwmigr"


class StorageError(RuntimeError):
    """The database cannot be used: unsupported URL, unreachable server, bad schema."""


def mask_url(url: str | URL) -> str:
    """The URL as text with any password replaced by ``***`` (safe to log)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001  (unparsable: say nothing that could be a secret)
        return "<unparsable database URL>"


def normalize_url(url: str | URL) -> URL:
    """Parse and check a database URL; PostgreSQL URLs are pointed at psycopg 3.

    Accepted: ``sqlite:///relative.db``, ``sqlite:////abs/path.db``, ``sqlite://`` (memory),
    ``postgresql://…``, ``postgres://…``, ``postgresql+psycopg://…``.
    """
    try:
        u = make_url(url)
    except ArgumentError as exc:
        raise StorageError(f"invalid database URL {mask_url(url)!r}: {exc}") from None
    backend, _, driver = u.drivername.partition("+")
    if backend in ("postgresql", "postgres"):
        if driver not in ("", "psycopg"):
            raise StorageError(
                f"unsupported PostgreSQL driver {driver!r} in {mask_url(u)!r}: "
                "use postgresql:// or postgresql+psycopg:// (psycopg 3)"
            )
        return u.set(drivername="postgresql+psycopg")
    if backend == "sqlite":
        if driver not in ("", "pysqlite"):
            raise StorageError(f"unsupported SQLite driver {driver!r} in {mask_url(u)!r}")
        return u
    raise StorageError(
        f"unsupported database URL {mask_url(u)!r}: use sqlite:///path/to/file.db "
        "or postgresql://user:password@host:port/dbname"
    )


def _is_sqlite_memory(u: URL) -> bool:
    return u.database in (None, "", ":memory:") or (u.database or "").startswith("file::memory:")


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    try:
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")  # safe with WAL; fsync at checkpoints
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    finally:
        cur.close()


def create_storage_engine(url: str | URL) -> Engine:
    """An Engine for ``url`` configured for latentwatch, without running migrations."""
    u = normalize_url(url)
    kwargs: dict[str, Any] = {"future": True}
    if u.get_backend_name() == "sqlite":
        connect_args: dict[str, Any] = {"check_same_thread": False}
        if _is_sqlite_memory(u):
            kwargs["poolclass"] = StaticPool  # one shared connection, or every one is empty
        else:
            try:
                Path(u.database).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StorageError(
                    f"cannot create the folder for SQLite database {mask_url(u)!r}: {exc}"
                ) from exc
        kwargs["connect_args"] = connect_args
    else:
        if "connect_timeout" not in u.query:
            kwargs["connect_args"] = {"connect_timeout": PG_CONNECT_TIMEOUT_S}
        kwargs["pool_pre_ping"] = True  # survive server restarts / idle disconnects
    try:
        engine = create_engine(u, **kwargs)
    except (ArgumentError, NoSuchModuleError, ImportError) as exc:
        raise StorageError(f"cannot create engine for {mask_url(u)!r}: {exc}") from exc
    if u.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def alembic_config(url: str | URL | None = None) -> Any:
    """An ``alembic.config.Config`` pointing at the migrations shipped in this package.

    Development use: ``command.revision(alembic_config("sqlite:///dev.db"), "msg",
    autogenerate=True)``.
    """
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        cfg.set_main_option(
            "sqlalchemy.url",
            normalize_url(url).render_as_string(hide_password=False).replace("%", "%%"),
        )
    return cfg


def upgrade_database(engine: Engine) -> None:
    """Apply all migrations (``alembic upgrade head``) in one transaction; idempotent."""
    from alembic import command

    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def open_database(url: str | URL, *, migrate: bool = True) -> Engine:
    """Open (and by default migrate to the latest schema) the database at ``url``.

    SQLite: creates the parent folder, WAL journal, foreign keys on, busy timeout.
    PostgreSQL: ``postgresql://`` is rewritten to ``postgresql+psycopg://``.
    Raises :class:`StorageError` (naming the URL, password masked) when the URL is
    unsupported, the database cannot be reached, or migrating fails.
    """
    engine = create_storage_engine(url)
    masked = mask_url(engine.url)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        if migrate:
            upgrade_database(engine)
    except SQLAlchemyError as exc:
        engine.dispose()
        raise StorageError(
            f"cannot open database {masked!r}: {_scrub(str(exc), engine.url)}"
        ) from exc
    except Exception as exc:  # alembic CommandError (e.g. schema newer than this code), ...
        engine.dispose()
        raise StorageError(
            f"cannot migrate database {masked!r}: {_scrub(str(exc), engine.url)}"
        ) from exc
    return engine


def _scrub(message: str, url: URL) -> str:
    if url.password:
        message = message.replace(str(url.password), "***")
    return message


from monitor.storage.queries import (  # after the names above: submodules import them
    AlertRow,
    InterventionRow,
    RequestRow,
    get_alerts,
    get_request,
)
from monitor.storage.records import (
    AlertRecord,
    DetectorRecord,
    InterventionRecord,
    Record,
    RequestRecord,
    TextPolicy,
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
    "StorageWriter",
    "TextPolicy",
    "alembic_config",
    "create_storage_engine",
    "get_alerts",
    "get_request",
    "mask_url",
    "normalize_url",
    "open_database",
    "text_sha256",
    "upgrade_database",
]
