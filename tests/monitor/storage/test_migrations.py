from __future__ import annotations

import socket

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text

from monitor.storage import (
    StorageError,
    alembic_config,
    create_storage_engine,
    normalize_url,
    open_database,
)
from monitor.storage.models import Base

TABLES = {"requests", "alerts", "interventions", "detectors"}
VERSION_TABLE = "latentwatch_alembic_version"


def _head() -> str:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def _current(engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_revision()


def test_migrations_apply_on_empty_database(db_url):
    bare = create_storage_engine(db_url)
    assert inspect(bare).get_table_names() == []
    bare.dispose()

    engine = open_database(db_url)
    try:
        assert TABLES | {VERSION_TABLE} == set(inspect(engine).get_table_names())
        assert _current(engine) == _head()
        alert_indexes = {ix["name"] for ix in inspect(engine).get_indexes("alerts")}
        assert {
            "ix_alerts_created_at_id",
            "ix_alerts_detector_id_created_at_id",
            "ix_alerts_client_id_created_at_id",
            "ix_alerts_request_id",
        } <= alert_indexes
    finally:
        engine.dispose()


def test_migrations_are_idempotent(db_url):
    first = open_database(db_url)
    with first.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO detectors (id, version, kind, hook_point, threshold, calibration,"
                " metrics, loaded_at) VALUES ('d', '1', 'linear', 'h', 0.5, '{}', '{}',"
                " '2025-01-01 00:00:00')"
            )
        )
    first.dispose()
    # second and third opens: for PostgreSQL also through the plain postgresql:// spelling
    plain = db_url.replace("postgresql+psycopg://", "postgresql://")
    for url in (db_url, plain):
        again = open_database(url)
        assert _current(again) == _head()
        with again.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM detectors")).scalar_one() == 1
        again.dispose()


def test_models_match_migrations(engine):
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(ctx, Base.metadata)
    diff = [d for d in diff if not (d[0] == "remove_table" and d[1].name == VERSION_TABLE)]
    assert diff == []


def test_sqlite_pragmas_and_parent_folder(tmp_path):
    path = tmp_path / "deep" / "er" / "lw.db"
    engine = open_database(f"sqlite:///{path}")
    try:
        assert path.exists()
        with engine.connect() as conn:
            assert conn.execute(text("PRAGMA journal_mode")).scalar_one().lower() == "wal"
            assert conn.execute(text("PRAGMA foreign_keys")).scalar_one() == 1
            assert conn.execute(text("PRAGMA busy_timeout")).scalar_one() >= 1000
    finally:
        engine.dispose()


def test_sqlite_in_memory(tmp_path):
    engine = open_database("sqlite://")
    assert TABLES <= set(inspect(engine).get_table_names())
    engine.dispose()


@pytest.mark.parametrize(
    "url",
    ["postgresql://u:p@h/db", "postgres://u:p@h/db", "postgresql+psycopg://u:p@h/db"],
)
def test_postgres_urls_use_psycopg3(url):
    assert normalize_url(url).drivername == "postgresql+psycopg"


@pytest.mark.parametrize(
    "url",
    [
        "mysql://root:hunter2@localhost/db",
        "postgresql+psycopg2://root:hunter2@localhost/db",
        "not a url",
    ],
)
def test_unsupported_url_is_a_clear_error(url):
    with pytest.raises(StorageError) as info:
        open_database(url)
    assert "hunter2" not in str(info.value)


def test_unreachable_server_names_url_with_masked_password():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    url = f"postgresql://watcher:s3cret-pw@127.0.0.1:{port}/latentwatch"
    with pytest.raises(StorageError) as info:
        open_database(url)
    msg = str(info.value)
    assert "s3cret-pw" not in msg
    assert f"postgresql+psycopg://watcher:***@127.0.0.1:{port}/latentwatch" in msg


def test_unwritable_sqlite_location_is_a_storage_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(StorageError, match="sqlite"):
        open_database(f"sqlite:///{blocker}/sub/lw.db")
