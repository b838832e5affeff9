"""PgBouncer in front of the test PostgreSQL: Debian's ``pgbouncer`` started on a
free loopback port with a configuration written for one database.

PgBouncer refuses to run as root; as root it is started with ``-u`` as an
unprivileged user, which then owns its directory.
"""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg2

from testsupport import eventually
from testsupport.pgserver import ServerSettings, unprivileged_user
from testsupport.servers import ServerProcess, free_port

EXECUTABLES = ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer")


def executable() -> str | None:
    found = shutil.which("pgbouncer")
    if found:
        return found
    return next((path for path in EXECUTABLES if os.access(path, os.X_OK)), None)


class PgBouncer:
    """One PgBouncer process pooling connections to ``database`` on ``server``."""

    def __init__(
        self,
        server: ServerSettings,
        database: str,
        *,
        pool_mode: str,
        default_pool_size: int,
        settings: dict[str, str] | None = None,
    ) -> None:
        self.server = server
        self.database = database
        self.pool_mode = pool_mode
        self.default_pool_size = default_pool_size
        self.port = free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="pgpool-pgbouncer-"))
        self.user = unprivileged_user("PgBouncer") if os.geteuid() == 0 else None
        self.settings = settings or {}
        self._process: ServerProcess | None = None

    def _write_configuration(self) -> Path:
        target = [f"host={self.server.host}", f"port={self.server.port}", f"dbname={self.database}"]
        if self.server.password:
            # PgBouncer logs in to PostgreSQL with the server's password;
            # clients on loopback are trusted (auth_type below).
            target += [f"user={self.server.user}", f"password={self.server.password}"]
        settings = {
            "listen_addr": "127.0.0.1",
            "listen_port": str(self.port),
            "unix_socket_dir": "",
            "auth_type": "trust",
            "auth_file": str(self.directory / "userlist.txt"),
            "admin_users": self.server.user,
            "pool_mode": self.pool_mode,
            "default_pool_size": str(self.default_pool_size),
            "max_client_conn": "500",
            "logfile": str(self.directory / "pgbouncer.log"),
            "pidfile": str(self.directory / "pgbouncer.pid"),
            **self.settings,
        }
        ini = self.directory / "pgbouncer.ini"
        ini.write_text(
            "[databases]\n"
            f"{self.database} = {' '.join(target)}\n\n"
            "[pgbouncer]\n" + "".join(f"{name} = {value}\n" for name, value in settings.items())
        )
        (self.directory / "userlist.txt").write_text(f'"{self.server.user}" ""\n')
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            for path in (self.directory, *self.directory.iterdir()):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        return ini

    def start(self) -> None:
        program = executable()
        if program is None:
            raise RuntimeError("pgbouncer is not installed (Debian: apt-get install pgbouncer)")
        ini = self._write_configuration()
        args = [program, *(["-u", self.user] if self.user else []), str(ini)]
        self._process = ServerProcess(
            args, env=dict(os.environ), log_path=self.directory / "stdout.log"
        )
        self._process.start()
        if not eventually(self._answers, timeout=10):
            raise RuntimeError(f"PgBouncer did not start:\n{self.log()}")

    def _answers(self) -> bool:
        try:
            self.admin().close()
        except psycopg2.OperationalError:
            return False
        return True

    def stop(self) -> None:
        if self._process is not None:
            self._process.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def log(self) -> str:
        try:
            return (self.directory / "pgbouncer.log").read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def admin(self) -> Any:
        """A connection to PgBouncer's admin console (``SHOW POOLS`` and friends)."""
        conn = psycopg2.connect(
            host="127.0.0.1", port=self.port, dbname="pgbouncer", user=self.server.user
        )
        conn.autocommit = True
        return conn

    def pool_row(self, admin: Any) -> dict[str, int]:
        """This database's row of ``SHOW POOLS``: client and server connections."""
        with admin.cursor() as cursor:
            cursor.execute("SHOW POOLS")
            columns = [column.name for column in cursor.description]
            for row in cursor.fetchall():
                values = dict(zip(columns, row, strict=True))
                if values["database"] == self.database:
                    return {name: value for name, value in values.items() if isinstance(value, int)}
        return {}

    def django_settings(self) -> dict[str, str]:
        """The testproject settings that send its connections through this PgBouncer."""
        return {"TESTPROJECT_DB_HOST": "127.0.0.1", "TESTPROJECT_DB_PORT": str(self.port)}


@contextmanager
def pgbouncer(
    server: ServerSettings,
    database: str,
    *,
    pool_mode: str,
    default_pool_size: int,
    settings: dict[str, str] | None = None,
) -> Iterator[PgBouncer]:
    bouncer = PgBouncer(
        server,
        database,
        pool_mode=pool_mode,
        default_pool_size=default_pool_size,
        settings=settings,
    )
    try:
        bouncer.start()
        yield bouncer
    finally:
        bouncer.stop()
