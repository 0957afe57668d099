from __future__ import annotations

import socket
import time

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text

from monitor.storage import (
    AlertRecord,
    InterventionRecord,
    StorageError,
    StorageWriter,
    alembic_config,
    check_url,
    create_storage_engine,
    get_alerts,
    get_interventions,
    get_request,
    normalize_url,
    open_database,
    open_readonly,
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
        iv_indexes = {ix["name"] for ix in inspect(engine).get_indexes("interventions")}
        assert {
            "ix_interventions_created_at_id",
            "ix_interventions_client_id_created_at_id",
            "ix_interventions_request_id",
        } <= iv_indexes
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


def _migrate(url: str, target: str, *, down: bool = False) -> None:
    engine = create_storage_engine(url)
    try:
        with engine.begin() as conn:
            cfg = alembic_config()
            cfg.attributes["connection"] = conn
            (command.downgrade if down else command.upgrade)(cfg, target)
    finally:
        engine.dispose()


# Rows as latentwatch 0001 wrote them: a Score request, two alerts, two steering interventions.
_ROWS_0001 = [
    "INSERT INTO requests (request_id, created_at, client_id, conversation_id, tags, kind, model_id,"
    " prompt_tokens, completion_tokens, alerted) VALUES ('r1', '2025-01-01 00:00:00', 'c1', 'conv-1',"
    " '{}', 'score', 'm', 3, 0, true)",
    "INSERT INTO alerts (request_id, created_at, detector_id, detector_version, score, threshold, action)"
    " VALUES ('r1', '2025-01-01 00:00:01', 'deception', '1', 0.9, 0.5, 'alert')",
    "INSERT INTO alerts (request_id, created_at, detector_id, detector_version, score, threshold, action)"
    " VALUES ('gone', '2025-01-01 00:00:02', 'deception', '1', 0.8, 0.5, 'block')",
    'INSERT INTO interventions (id, request_id, created_at, kind, hook_point, vector_id, coefficient, "trigger",'
    " token_start) VALUES ('iv1', 'r1', '2025-01-01 00:00:01', 'add', 'blocks.3.resid_post', 'v', 2.5,"
    " 'deception', 4)",
    'INSERT INTO interventions (id, request_id, created_at, kind, hook_point, vector_id, coefficient, "trigger",'
    " token_start) VALUES ('iv2', 'gone', '2025-01-01 00:00:02', 'ablate', 'blocks.3.resid_post', 'v', 1.0,"
    " 'request', 0)",
]


def test_upgrade_from_0001_keeps_and_converts_rows(db_url):
    _migrate(db_url, "0001_initial")
    bare = create_storage_engine(db_url)
    with bare.begin() as conn:
        for sql in _ROWS_0001:
            conn.execute(text(sql))
        old_ids = conn.execute(text("SELECT id FROM alerts ORDER BY id")).scalars().all()
    bare.dispose()

    engine = open_database(db_url)  # migrates to head
    try:
        assert _current(engine) == _head()
        alerts, _ = get_alerts(engine)
        assert [a.alert_id for a in alerts] == [str(i) for i in old_ids]  # what clients were shown
        assert [(a.request_kind, a.conversation_id) for a in alerts] == [("score", "conv-1"), ("generate", None)]
        assert all((a.snapshot_version, a.input_index, a.tags) == ("", None, {}) for a in alerts)
        ivs, _ = get_interventions(engine)
        assert [(i.intervention_id, i.kind, i.steering_kind, i.detector_id, i.trigger, i.client_id) for i in ivs] == [
            ("iv1", "steer", "add", "deception", "deception", "c1"),
            ("iv2", "steer", "ablate", None, "request", None),
        ]
        assert all((i.details, i.snapshot_version) == ({}, "") for i in ivs)
        assert get_request(engine, "r1").snapshot_version == ""
        # new rows go in next to the old ones
        w = StorageWriter(engine).start()
        w.submit(AlertRecord("r1", "deception", "2", 0.95, 0.5))
        w.submit(InterventionRecord("r1", "block", 5, detector_id="deception"))
        assert w.close(timeout=30) and w.write_failures == 0
        assert len(get_alerts(engine)[0]) == 3 and len(get_interventions(engine)[0]) == 3
    finally:
        engine.dispose()


def test_downgrade_to_0001_and_back(db_url):
    engine = open_database(db_url)
    w = StorageWriter(engine).start()
    w.submit(AlertRecord("r1", "d", "1", 0.9, 0.5))
    w.submit(InterventionRecord("r1", "steer", 2, steering_kind="ablate", hook_point="blocks.1.mlp_out"))
    w.submit(InterventionRecord("r1", "block", 3, detector_id="d"))
    assert w.close(timeout=30) and w.write_failures == 0
    engine.dispose()

    _migrate(db_url, "0001_initial", down=True)
    bare = create_storage_engine(db_url)
    with bare.connect() as conn:
        kinds = conn.execute(text("SELECT kind, vector_id FROM interventions")).all()
        assert conn.execute(text("SELECT count(*) FROM alerts")).scalar_one() == 1
    bare.dispose()
    assert [tuple(k) for k in kinds] == [("ablate", "inline")]  # the block has no place in 0001

    engine = open_database(db_url)
    try:
        assert [i.steering_kind for i in get_interventions(engine)[0]] == ["ablate"]
    finally:
        engine.dispose()


def test_upgrade_from_0002_keeps_alerts_and_stores_explanations(db_url):
    _migrate(db_url, "0002_decision_trail")
    bare = create_storage_engine(db_url)
    with bare.begin() as conn:
        conn.execute(text("INSERT INTO alerts (alert_id, request_id, created_at, detector_id, detector_version,"
                          " score, threshold, action) VALUES ('a1', 'r1', '2025-01-01 00:00:01', 'd', '1', 0.9, 0.5,"
                          " 'alert')"))
    bare.dispose()

    engine = open_database(db_url)  # migrates to head
    try:
        assert _current(engine) == _head()
        why = {"tokens": [{"position": 4, "text": " lock", "score": 0.96875}],
               "latents": [{"sae_id": "sae-1", "latent": 12, "activation": 3.5}]}
        w = StorageWriter(engine).start()
        w.submit(AlertRecord("r1", "d", "1", 0.95, 0.5, explanation=why))
        assert w.close(timeout=30) and w.write_failures == 0
        alerts, _ = get_alerts(engine)
        assert [(a.alert_id, a.explanation) for a in alerts] == [("a1", None), (alerts[1].alert_id, why)]
    finally:
        engine.dispose()


def test_storage_error_is_a_value_error():
    assert issubclass(StorageError, ValueError)


def test_open_readonly_never_creates_a_database(tmp_path):
    path = tmp_path / "typo" / "lw.db"
    for url in (f"sqlite:///{path}", "sqlite://"):
        with pytest.raises(StorageError, match="^no database at "):
            open_readonly(url)
    assert not path.parent.exists()
    for url in ("not a url", "mysql://u:hunter2@h/db"):
        with pytest.raises(StorageError, match="URL") as info:
            open_readonly(url)
        assert "hunter2" not in str(info.value)


def test_open_readonly_reads_a_current_database(db_url):
    open_database(db_url).dispose()
    engine = open_readonly(db_url)
    try:
        assert get_alerts(engine) == ([], None)
    finally:
        engine.dispose()


def test_open_readonly_refuses_an_old_or_foreign_schema(db_url):
    bare = create_storage_engine(db_url)
    with bare.begin() as conn:
        conn.execute(text("CREATE TABLE other (x INTEGER)"))
    bare.dispose()
    with pytest.raises(StorageError, match="schema none"):
        open_readonly(db_url)
    _migrate(db_url, "0001_initial")
    with pytest.raises(StorageError, match="schema 0001_initial.*start the server on it once"):
        open_readonly(db_url)
    bare = create_storage_engine(db_url)
    assert _current(bare) == "0001_initial"  # it did not migrate
    bare.dispose()


def test_open_readonly_unreachable_server_masks_the_password():
    port = _closed_port()
    with pytest.raises(StorageError) as info:
        open_readonly(f"postgresql://watcher:s3cret-pw@127.0.0.1:{port}/latentwatch")
    assert "s3cret-pw" not in str(info.value) and f"127.0.0.1:{port}" in str(info.value)


def test_check_url_sqlite_locations(tmp_path):
    deep = tmp_path / "new" / "folder" / "lw.db"
    check_url(f"sqlite:///{deep}")
    assert not (tmp_path / "new").exists()  # checked, not created
    check_url("sqlite://")
    existing = tmp_path / "lw.db"
    open_database(f"sqlite:///{existing}").dispose()
    check_url(f"sqlite:///{existing}")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(StorageError, match="not a writable folder"):
        check_url(f"sqlite:///{blocker}/sub/lw.db")
    with pytest.raises(StorageError, match="not a readable and writable file"):
        check_url(f"sqlite:///{tmp_path}")  # a folder where the file should be
    with pytest.raises(StorageError, match="unsupported"):
        check_url("mysql://u:hunter2@h/db")


def test_check_url_postgres(pg_server):
    check_url(pg_server.url())
    port = _closed_port()
    with pytest.raises(StorageError) as info:
        check_url(f"postgresql://watcher:s3cret-pw@127.0.0.1:{port}/latentwatch")
    assert "s3cret-pw" not in str(info.value) and f"127.0.0.1:{port}" in str(info.value)


def test_check_url_gives_up_on_a_silent_server_within_seconds():
    with socket.socket() as silent:  # accepts TCP, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(StorageError) as info:
            check_url(f"postgresql://watcher:s3cret-pw@127.0.0.1:{port}/latentwatch?connect_timeout=60")
        assert time.monotonic() - started < 8
    assert "s3cret-pw" not in str(info.value)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens here once closed
