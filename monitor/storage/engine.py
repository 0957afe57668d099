"""Engines: URL checks, SQLite pragmas, Alembic migrations, read-only opening, storage errors."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
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
CHECK_CONNECT_TIMEOUT_S = 3  # check_url: a startup check must not hold up the server for long
VERSION_TABLE = "latentwatch_alembic_version"
# Key for pg_advisory_xact_lock: two processes starting at once migrate one after the other.
_PG_MIGRATION_LOCK = 0x6C77_6D69_6772  # "lwmigr"


class StorageError(ValueError):
    """The database cannot be used: bad or unsupported URL, no database there, unreachable
    server, bad schema. A ValueError: what is wrong is the configured URL or what it names."""


class StorageUnavailable(Exception):
    """A read could not reach the database (down, restarting, locked): retry later.

    The message is always the same, so it may reach a client; the cause, which can name the
    host, the SQL and its parameters, stays in ``__cause__`` for the server's log.
    """

    def __init__(self) -> None:
        super().__init__("database unavailable; retry later")


class StorageFull(Exception):
    """A record could not be journaled (the journal is full, ``journal_full="fail_closed"``), so
    nobody may be told of it: refuse the request. The message is meant for the client."""


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
    return _opened(create_storage_engine(url), upgrade_database if migrate else None)


def open_readonly(url: str | URL) -> Engine:
    """Open an existing database at the latest schema for reading; never creates or migrates.

    For the ``latentwatch alerts`` CLI: a mistyped path must say so instead of showing an
    empty, freshly created database. Raises :class:`StorageError`.
    """
    u = normalize_url(url)
    if u.get_backend_name() == "sqlite":
        path = None if _is_sqlite_memory(u) else Path(u.database).expanduser()
        if path is None or not path.is_file():
            raise StorageError(
                f"no database at {path or ':memory:'}: check the URL (the server creates the "
                "database when it first starts)"
            )
    return _opened(create_storage_engine(u), _require_head)


def check_url(url: str | URL) -> None:
    """Fail fast, before the model loads, on a database URL the server could not use.

    SQLite: the file, or the nearest existing folder above it, must be writable (nothing is
    created). PostgreSQL: the server must accept a connection within
    ``CHECK_CONNECT_TIMEOUT_S``. Raises :class:`StorageError` (password masked).
    """
    u = normalize_url(url)
    if u.get_backend_name() == "sqlite":
        _check_sqlite_location(u)
        return
    engine = create_storage_engine(u.update_query_dict({"connect_timeout": str(CHECK_CONNECT_TIMEOUT_S)}))
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        reason = _scrub(str(getattr(exc, "orig", None) or exc), u)
        raise StorageError(f"cannot connect to database {mask_url(u)!r}: {reason}") from exc
    finally:
        engine.dispose()


def _check_sqlite_location(u: URL) -> None:
    if _is_sqlite_memory(u):
        return
    path = Path(u.database).expanduser().resolve()
    if path.exists() and not (path.is_file() and os.access(path, os.R_OK | os.W_OK)):
        raise StorageError(f"SQLite database {path} is not a readable and writable file")
    folder = next(p for p in path.parents if p.exists())  # WAL writes next to the file too
    if not (folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)):
        raise StorageError(f"cannot create SQLite database {path}: {folder} is not a writable folder")


def _require_head(engine: Engine) -> None:
    from alembic.migration import MigrationContext
    from alembic.script import ScriptDirectory

    with engine.connect() as conn:
        current = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_revision()
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if current != head:
        raise StorageError(
            f"database {mask_url(engine.url)!r} has schema {current or 'none (not a latentwatch database)'}, "
            f"this latentwatch reads {head}: start the server on it once to migrate it"
        )


def _opened(engine: Engine, prepare: Callable[[Engine], None] | None) -> Engine:
    """``engine`` once it answers and ``prepare`` (migrate, or check the schema) passed.

    On any failure the engine is disposed and StorageError names the URL (password masked).
    """
    masked = mask_url(engine.url)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        if prepare is not None:
            prepare(engine)
    except StorageError:
        engine.dispose()
        raise
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
