"""Find a PostgreSQL server to run against, or start a throwaway one.

The testproject's settings only *name* a server (:func:`configured_server`:
``DATABASE_URL`` or ``PG*`` variables, else ``127.0.0.1:5432`` as user
``postgres``) and never connect. :func:`ensure_server` makes sure a server is
there, in this order; the test session, the demo and the benchmark call it
before they use the database:

1. ``DATABASE_URL``, or any of ``PGHOST`` / ``PGPORT`` / ``PGUSER`` /
   ``PGPASSWORD`` / ``PGDATABASE``, when that server answers;
2. a local server on the usual place (``127.0.0.1:5432``, user ``postgres``);
3. otherwise the *embedded default*: a throwaway cluster made with the
   machine's PostgreSQL binaries (``initdb`` / ``pg_ctl``) in a temporary
   directory, on a free loopback port, stopped and deleted at exit.

Whatever is chosen is exported as ``PG*`` variables, so settings imported
after it and subprocesses (the tests start some) find the same server
without starting another one.
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import psycopg2

_ENV_VARS = ("PGHOST", "PGPORT", "PGUSER", "PGPASSWORD", "PGDATABASE")


@dataclass(frozen=True)
class ServerSettings:
    """How to reach a PostgreSQL server (a password is never printed)."""

    host: str = "127.0.0.1"
    port: int = 5432
    user: str = "postgres"
    password: str = ""
    dbname: str = "postgres"
    options: tuple[tuple[str, str], ...] = ()
    source: str = "environment"

    def connect_kwargs(self, **overrides: Any) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "dbname": self.dbname,
            **dict(self.options),
        }
        if self.password:
            kwargs["password"] = self.password
        kwargs.update(overrides)
        return kwargs

    def connect(self, **overrides: Any) -> Any:
        return psycopg2.connect(**self.connect_kwargs(**overrides))

    def django_database(self, engine: str = "django_pgpool", **extra: Any) -> dict[str, Any]:
        """A ``DATABASES`` entry for this server."""
        return {
            "ENGINE": engine,
            "NAME": self.dbname,
            "USER": self.user,
            "PASSWORD": self.password,
            "HOST": self.host,
            "PORT": str(self.port),
            "OPTIONS": dict(self.options),
            **extra,
        }

    def export(self) -> None:
        """Publish as PG* variables for this process and its children."""
        os.environ.update(
            PGHOST=self.host,
            PGPORT=str(self.port),
            PGUSER=self.user,
            PGDATABASE=self.dbname,
        )
        if self.password:
            os.environ["PGPASSWORD"] = self.password
        else:
            os.environ.pop("PGPASSWORD", None)
        os.environ.pop("DATABASE_URL", None)

    def describe(self) -> str:
        auth = "password" if self.password else "no password"
        return f"{self.user}@{self.host}:{self.port}/{self.dbname} ({auth}; {self.source})"


def parse_database_url(url: str) -> ServerSettings:
    """``postgres://user:password@host:port/dbname?sslmode=...`` to settings."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgres", "postgresql", "pgsql", "django-pgpool"):
        raise ValueError(f"DATABASE_URL scheme {parts.scheme!r} is not PostgreSQL")
    return ServerSettings(
        host=unquote(parts.hostname or "127.0.0.1"),
        port=parts.port or 5432,
        user=unquote(parts.username or "postgres"),
        password=unquote(parts.password or ""),
        dbname=unquote(parts.path.lstrip("/")) or "postgres",
        options=tuple(parse_qsl(parts.query)),
        source="DATABASE_URL",
    )


def from_environment() -> ServerSettings | None:
    url = os.environ.get("DATABASE_URL")
    if url:
        return parse_database_url(url)
    if not any(os.environ.get(name) for name in _ENV_VARS):
        return None
    return ServerSettings(
        host=os.environ.get("PGHOST") or "127.0.0.1",
        port=int(os.environ.get("PGPORT") or 5432),
        user=os.environ.get("PGUSER") or "postgres",
        password=os.environ.get("PGPASSWORD") or "",
        dbname=os.environ.get("PGDATABASE") or "postgres",
        source="PG* environment variables",
    )


def configured_server() -> ServerSettings:
    """The server the environment names, else the usual local one; nothing is
    connected to (settings call this at import)."""
    return from_environment() or ServerSettings(source="local server on 127.0.0.1:5432")


def is_reachable(settings: ServerSettings, timeout: int = 3) -> bool:
    try:
        conn = settings.connect(connect_timeout=timeout)
    except psycopg2.Error:
        return False
    conn.close()
    return True


def find_server_binaries() -> str:
    """The directory holding ``initdb`` and ``pg_ctl`` (newest version first)."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda path: [int(n) for n in re.findall(r"\d+", path)],
        reverse=True,
    )
    if shutil.which("pg_config"):
        try:
            bindir = subprocess.run(
                ["pg_config", "--bindir"], capture_output=True, text=True, check=True
            ).stdout.strip()
            candidates.insert(0, os.path.join(bindir, "initdb"))
        except subprocess.CalledProcessError:
            pass
    found = shutil.which("initdb")
    if found:
        candidates.append(found)
    for initdb in candidates:
        if os.path.exists(initdb) and os.path.exists(
            os.path.join(os.path.dirname(initdb), "pg_ctl")
        ):
            return os.path.dirname(initdb)
    raise RuntimeError(
        "No PostgreSQL server binaries (initdb, pg_ctl) found and no server reachable. "
        "Install them (Debian/Ubuntu: apt-get install postgresql) or point PGHOST/PGPORT/"
        "PGUSER/PGPASSWORD/PGDATABASE or DATABASE_URL at a server."
    )


def unprivileged_user(server: str) -> str:
    """The user a ``server`` started as root runs as (both refuse to run as root)."""
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    raise RuntimeError(f"running as root and no 'postgres' or 'nobody' user to run {server} as")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedPostgres:
    """A throwaway PostgreSQL cluster in a temporary directory.

    ``initdb`` refuses to run as root, so as root the cluster is owned by and
    run as the ``postgres`` user (or ``nobody``). With ``password`` set, TCP
    connections authenticate with SCRAM, as production servers do.
    """

    def __init__(
        self,
        *,
        password: str | None = None,
        port: int | None = None,
        max_connections: int = 200,
        settings: dict[str, str] | None = None,
    ) -> None:
        self.bindir = find_server_binaries()
        self.password = password or ""
        self.port = port or _free_port()
        self.max_connections = max_connections
        self.extra_settings = settings or {}
        self.directory = tempfile.mkdtemp(prefix="pgpool-cluster-")
        self.datadir = os.path.join(self.directory, "data")
        self.logfile = os.path.join(self.directory, "server.log")
        self.run_as = unprivileged_user("PostgreSQL") if os.geteuid() == 0 else None
        self._started = False

    @property
    def settings(self) -> ServerSettings:
        return ServerSettings(
            host="127.0.0.1",
            port=self.port,
            user="postgres",
            password=self.password,
            dbname="postgres",
            source="embedded throwaway cluster",
        )

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [os.path.join(self.bindir, args[0]), *args[1:]],
            capture_output=True,
            text=True,
            check=check,
            user=self.run_as,
            cwd=self.directory,
            stdin=subprocess.DEVNULL,
        )

    def _chown(self, path: str) -> None:
        if self.run_as:
            entry = pwd.getpwnam(self.run_as)
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def initialise(self) -> None:
        self._chown(self.directory)
        args = ["initdb", "-D", self.datadir, "-U", "postgres", "-E", "UTF8", "--no-sync"]
        if self.password:
            pwfile = os.path.join(self.directory, "pwfile")
            with open(pwfile, "w") as handle:
                handle.write(self.password)
            self._chown(pwfile)
            args += ["--pwfile", pwfile, "--auth-local=trust", "--auth-host=scram-sha-256"]
        else:
            args += ["--auth=trust"]
        try:
            self._run(*args)
        except subprocess.CalledProcessError as exc:
            raise RuntimeError(f"initdb failed: {exc.stderr.strip()}") from exc

    def start(self) -> ServerSettings:
        if not os.path.exists(self.datadir):
            self.initialise()
        options = {
            "port": str(self.port),
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": self.directory,
            "max_connections": str(self.max_connections),
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            **self.extra_settings,
        }
        server_options = " ".join(f"-c {name}={value}" for name, value in options.items())
        try:
            self._run(
                "pg_ctl",
                "-D",
                self.datadir,
                "-l",
                self.logfile,
                "-o",
                server_options,
                "-w",
                "start",
            )
        except subprocess.CalledProcessError as exc:
            raise RuntimeError(
                f"pg_ctl start failed: {exc.stdout}{exc.stderr}{self.log_tail()}"
            ) from exc
        self._started = True
        return self.settings

    def stop(self, mode: str = "fast") -> None:
        if self._started:
            self._run("pg_ctl", "-D", self.datadir, "-m", mode, "-w", "stop", check=False)
            self._started = False

    def restart(self, down_for: float = 0.0) -> None:
        """Stop the server (sessions are terminated), stay down a while, start again."""
        self.stop()
        if down_for:
            time.sleep(down_for)
        self.start()

    def accepting(self) -> bool:
        return is_reachable(self.settings, timeout=1)

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.directory, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.logfile) as handle:
                return "".join(handle.readlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.destroy()


_chosen: ServerSettings | None = None


def ensure_server(*, quiet: bool = False) -> ServerSettings:
    """The server this process should use: configured, local, or embedded (see module doc)."""
    global _chosen
    if _chosen is not None:
        return _chosen
    configured = from_environment()
    if configured is not None:
        if is_reachable(configured):
            _chosen = configured
            # Filled in (PGPASSWORD alone names the local server): tests that
            # start Python processes of their own pass them all on.
            configured.export()
            return configured
        if not quiet:
            print(
                f"[pgserver] the configured server {configured.describe()} does not answer; "
                f"starting a throwaway cluster instead",
                file=sys.stderr,
            )
    else:
        local = ServerSettings(source="local server on 127.0.0.1:5432")
        if is_reachable(local):
            _chosen = local
            local.export()
            return local
    server = EmbeddedPostgres(password=secrets.token_urlsafe(12))
    server.start()
    atexit.register(server.destroy)
    _chosen = server.settings
    _chosen.export()
    if not quiet:
        print(f"[pgserver] started {_chosen.describe()} in {server.directory}", file=sys.stderr)
    return _chosen


def with_database(settings: ServerSettings, dbname: str) -> ServerSettings:
    return replace(settings, dbname=dbname)
