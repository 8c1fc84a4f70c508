"""A real PostgreSQL (Debian's ``postgresql`` package) in a temporary directory on a free loopback port.

One server per test session (``initdb`` takes seconds); each test gets its own fresh database.
initdb refuses to run as root, so under root the server runs as the ``postgres`` OS user.
"""

from __future__ import annotations

import functools
import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest

from serving.loopback import LOOPBACK, free_port


def _unavailable(message: str):
    """Skip locally; under CI a missing PostgreSQL fails the test instead."""
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def require_postgres() -> Path:
    """The directory holding ``initdb``, ``pg_ctl`` and ``postgres`` (newest Debian version first)."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(Path(d).parent.name), reverse=True)
    on_path = shutil.which("pg_ctl")
    for directory in [*candidates, *([str(Path(on_path).parent)] if on_path else [])]:
        if all((Path(directory) / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return Path(directory)
    _unavailable("PostgreSQL is not installed: `apt-get install postgresql` (.ci/run does)")


class PostgresServer:
    """A PostgreSQL cluster of our own: ``start``, ``stop`` (a restart keeps its data) and fresh databases."""

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.port = free_port()
        # initdb refuses root; the data directory must belong to whoever runs the server.
        self._as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self._as_user:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                _unavailable("running as root needs the `postgres` OS user (Debian's postgresql package creates it)")
        self.root = Path(tempfile.mkdtemp(prefix="stillhouse-pg-"))
        if self._as_user:
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self._names = itertools.count()
        self._run("initdb", "--pgdata", str(self.data), "--username", "postgres", "--auth", "trust", "--no-sync", "--encoding", "UTF8")

    def _run(self, tool: str, *args: str) -> None:
        done = subprocess.run([*self._as_user, str(self.bindir / tool), *args], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            log = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stdout[-2000:]}{done.stderr[-2000:]}{log}")

    def url(self, database: str = "postgres") -> str:
        """The URL of ``database`` on this server."""
        return f"postgresql://postgres@{LOOPBACK}:{self.port}/{database}"

    def start(self) -> None:
        """Start the server (loopback TCP only, no fsync) and wait until it accepts connections."""
        options = f"-p {self.port} -c listen_addresses={LOOPBACK} -c unix_socket_directories='' -c fsync=off -c full_page_writes=off"
        self._run("pg_ctl", "--pgdata", str(self.data), "--log", str(self.log), "--options", options, "--wait", "start")

    def stop(self) -> None:
        """Stop the server, disconnecting every client (its data stays for a later ``start``)."""
        self._run("pg_ctl", "--pgdata", str(self.data), "--mode", "fast", "--wait", "stop")

    @contextmanager
    def stopped(self):
        """The server down for the body of a ``with``, as in a database outage; up again after it."""
        self.stop()
        try:
            yield
        finally:
            self.start()

    def create_database(self) -> str:
        """A new empty database; its URL."""
        name = f"test_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def remove(self) -> None:
        """Stop the server if it runs and delete its directory."""
        if (self.data / "postmaster.pid").exists():
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@functools.cache
def _session_server() -> PostgresServer:
    server = PostgresServer(require_postgres())
    server.start()
    return server


@pytest.fixture(scope="session")
def postgres_server():
    """One PostgreSQL server for the whole session, shared by every module that imports this fixture."""
    server = _session_server()
    yield server
    server.remove()


@pytest.fixture()
def postgres_url(postgres_server: PostgresServer) -> str:
    """The URL of a fresh, empty database on the session's server."""
    return postgres_server.create_database()
