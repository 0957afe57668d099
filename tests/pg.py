"""Throw-away PostgreSQL server for tests.

Finds ``initdb``/``pg_ctl`` (``/usr/lib/postgresql/*/bin``, then ``$PATH``), initialises a
cluster in a fresh temp folder (trust auth, no fsync), starts it on 127.0.0.1 on a free port
with its unix socket inside that folder, and removes everything on :meth:`stop`. PostgreSQL
refuses to run as root, so as root the binaries run as the ``postgres`` system user (created
by the Debian ``postgresql`` package) through ``runuser``.

    with PostgresServer() as pg:
        url = pg.create_database("mydb")   # postgresql+psycopg://postgres@127.0.0.1:PORT/mydb
        pg.pause()                         # an outage: stopped, data and port kept
        pg.resume()
"""

from __future__ import annotations

import atexit
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Self

INSTALL_HINT = (
    "PostgreSQL server binaries (initdb, pg_ctl) not found in /usr/lib/postgresql/*/bin or "
    "on PATH: run `make install` (installs postgresql). By hand on Debian/Ubuntu: "
    "apt-get install -y postgresql, or scripts/ensure-postgres.sh"
)
SUPERUSER = "postgres"


class PostgresUnavailable(RuntimeError):
    """The PostgreSQL binaries are missing or the server would not start."""


def find_pg_bin() -> Path:
    """The folder holding initdb and pg_ctl (newest installed version first)."""

    def version(p: str) -> tuple[int, ...]:
        ver = Path(p).parent.parent.name
        return tuple(int(x) for x in ver.split(".") if x.isdigit()) or (0,)

    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=version, reverse=True)
    for initdb in candidates:
        bindir = Path(initdb).parent
        if (bindir / "pg_ctl").exists():
            return bindir
    initdb = shutil.which("initdb")
    if initdb:
        bindir = Path(os.path.realpath(initdb)).parent
        if (bindir / "pg_ctl").exists():
            return bindir
    raise PostgresUnavailable(INSTALL_HINT)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    def __init__(self) -> None:
        self.bindir = find_pg_bin()
        self.as_root = hasattr(os, "geteuid") and os.geteuid() == 0
        self.root = Path(tempfile.mkdtemp(prefix="latentwatch-pg-"))
        self.datadir = self.root / "data"
        self.logfile = self.root / "server.log"
        self.port: int | None = None
        self._opts = ""
        self._started = False

    # ---------------------------------------------------------------- helpers

    def _cmd(self, *args: str) -> list[str]:
        if self.as_root:
            runuser = shutil.which("runuser")
            if runuser:
                return [runuser, "-u", SUPERUSER, "--", *args]
            su = shutil.which("su") or "su"
            return [su, SUPERUSER, "-s", "/bin/sh", "-c", subprocess.list2cmdline(list(args))]
        return list(args)

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(self._cmd(*args), capture_output=True, text=True, timeout=timeout, check=False)
        if proc.returncode != 0:
            raise PostgresUnavailable(
                f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}\n{self._log_tail()}"
            )
        return proc

    def _log_tail(self) -> str:
        try:
            return "server log:\n" + self.logfile.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> Self:
        if self.as_root:
            try:
                import pwd

                pw = pwd.getpwnam(SUPERUSER)
            except KeyError:
                raise PostgresUnavailable(
                    f"running as root but there is no {SUPERUSER!r} system user to run PostgreSQL as; {INSTALL_HINT}"
                ) from None
            os.chmod(self.root, 0o700)
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self._run(
            str(self.bindir / "initdb"),
            "-D", str(self.datadir),
            "-U", SUPERUSER,
            "--auth=trust",
            "-E", "UTF8",
            "--locale=C",
            "--no-sync",
        )  # fmt: skip
        last_error: Exception | None = None
        for _ in range(5):  # the free port may be taken before the server binds it
            self.port = _free_port()
            opts = " ".join(
                [
                    "-c listen_addresses=127.0.0.1",
                    f"-p {self.port}",
                    f"-c unix_socket_directories={self.root}",
                    "-c fsync=off",
                    "-c synchronous_commit=off",
                    "-c full_page_writes=off",
                    "-c max_connections=200",
                ]
            )
            try:
                self._pg_ctl_start(opts)
            except PostgresUnavailable as exc:
                last_error = exc
                continue
            self._opts = opts
            self._started = True
            atexit.register(self.stop)
            return self
        self.stop()
        raise PostgresUnavailable(f"PostgreSQL did not start: {last_error}")

    def _pg_ctl_start(self, opts: str) -> None:
        self._run(
            str(self.bindir / "pg_ctl"),
            "start", "-w", "-t", "60",
            "-D", str(self.datadir),
            "-l", str(self.logfile),
            "-o", opts,
        )  # fmt: skip

    def pause(self) -> None:
        """Stop the server as an outage would (`pg_ctl stop -m fast`: connections are cut); the
        data and the port stay for :meth:`resume`."""
        self._run(str(self.bindir / "pg_ctl"), "stop", "-w", "-D", str(self.datadir), "-m", "fast")

    def resume(self) -> None:
        """Start the server again after :meth:`pause`, on the same port."""
        self._pg_ctl_start(self._opts)

    def stop(self) -> None:
        if self._started:
            self._started = False
            try:
                self._run(str(self.bindir / "pg_ctl"), "stop", "-D", str(self.datadir), "-m", "immediate")
            except (PostgresUnavailable, subprocess.TimeoutExpired):
                pass
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---------------------------------------------------------------- databases

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(
            host="127.0.0.1", port=self.port, user=SUPERUSER, dbname="postgres", autocommit=True
        ) as conn:
            conn.execute(sql)

    def create_database(self, name: str | None = None) -> str:
        """Create an empty database and return its SQLAlchemy URL."""
        name = name or f"t_{uuid.uuid4().hex[:16]}"
        self._admin(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        deadline = time.monotonic() + 10
        while True:
            try:
                self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
