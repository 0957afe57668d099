"""Every storage test runs twice: on a SQLite file and on a throw-away PostgreSQL server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy.engine import Engine, make_url

from monitor.storage import open_database
from tests.pg import PostgresServer, PostgresUnavailable


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    # A missing PostgreSQL is a FAILURE, not a skip: CI must install it (`make install`).
    try:
        server = PostgresServer().start()
    except PostgresUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:
    """URL of a fresh, empty database (no schema yet)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/db/latentwatch.db"
        return
    pg: PostgresServer = request.getfixturevalue("pg_server")
    url = pg.create_database()
    yield url
    pg.drop_database(make_url(url).database)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """A migrated engine on the fresh database."""
    eng = open_database(db_url)
    yield eng
    eng.dispose()
