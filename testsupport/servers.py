"""Real servers for the end-to-end tests: a database made for them, server
processes that are always stopped, an HTTP client and a sampler of the server
connections PostgreSQL sees.

Every process is started in a session of its own and stopped by signalling its
whole process group, so that workers forked by a server never outlive a test.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

from testsupport import REPO, eventually
from testsupport.pgserver import ServerSettings


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def token() -> str:
    """A short random tag, so that concurrent runs never share names."""
    return secrets.token_hex(4)


def project_env(database: str, **settings: str) -> dict[str, str]:
    """The environment of a process running the testproject on ``database``.

    ``TESTPROJECT_*`` variables inherited from whoever runs the tests are
    dropped, so that each server runs exactly with the settings it is given.
    """
    env = {key: value for key, value in os.environ.items() if not key.startswith("TESTPROJECT_")}
    env.update(
        PYTHONPATH=str(REPO),
        PYTHONUNBUFFERED="1",
        DJANGO_SETTINGS_MODULE="testproject.settings",
        TESTPROJECT_DB_NAME=database,
        **settings,
    )
    return env


def admin_connection(server: ServerSettings, dbname: str = "postgres") -> Any:
    conn = server.connect(dbname=dbname, application_name="pgpool-servers-admin")
    conn.autocommit = True
    return conn


def fetch_all(conn: Any, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    with conn.cursor() as cursor:
        cursor.execute(sql, params or None)
        return list(cursor.fetchall())


# ---------------------------------------------------------------------- the database


@dataclass(frozen=True)
class BookRow:
    title: str
    author: str
    price: str


@dataclass
class Library:
    """A migrated, seeded testproject database of the tests' own."""

    server: ServerSettings
    name: str
    books: dict[int, BookRow] = field(default_factory=dict)

    def connect(self) -> Any:
        return admin_connection(self.server, self.name)

    def stocks(self) -> dict[int, int]:
        conn = self.connect()
        try:
            rows = fetch_all(conn, "SELECT id, stock FROM library_book")
        finally:
            conn.close()
        return {pk: stock for pk, stock in rows}

    def order_ids(self) -> set[int]:
        conn = self.connect()
        try:
            return {row[0] for row in fetch_all(conn, "SELECT id FROM library_order")}
        finally:
            conn.close()


def manage(database: str, *args: str, timeout: float = 120) -> None:
    """Run a management command of the testproject on ``database`` in a subprocess."""
    result = subprocess.run(
        [sys.executable, "-m", "django", *args],
        env=project_env(database),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise RuntimeError(f"django {' '.join(args)} failed:\n{result.stdout}{result.stderr}")


def drop_database(server: ServerSettings, name: str) -> None:
    admin = admin_connection(server)
    try:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.close()


@contextmanager
def library_database(server: ServerSettings, prefix: str, books: int = 50) -> Iterator[Library]:
    """Create a database, migrate and seed it as a deployment would, drop it afterwards."""
    name = f"{prefix}_{token()}"
    admin = admin_connection(server)
    try:
        with admin.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
    finally:
        admin.close()
    try:
        manage(name, "migrate", "--verbosity", "0")
        manage(name, "seed", "--books", str(books), "--verbosity", "0")
        library = Library(server, name)
        conn = library.connect()
        try:
            rows = fetch_all(
                conn,
                "SELECT b.id, b.title, a.name, b.price FROM library_book b "
                "JOIN library_author a ON a.id = b.author_id",
            )
        finally:
            conn.close()
        library.books = {pk: BookRow(title, name, str(price)) for pk, title, name, price in rows}
        yield library
    finally:
        drop_database(server, name)


# ---------------------------------------------------------------------- processes


class ServerProcess:
    """A server started in its own session; :meth:`stop` ends its whole process group."""

    def __init__(
        self,
        args: Sequence[str],
        *,
        env: dict[str, str],
        log_path: Path,
        port: int | None = None,
        ready_path: str = "/health/",
        user: str | None = None,
    ) -> None:
        self.args = list(args)
        self.env = env
        self.log_path = log_path
        self.port = port
        self.ready_path = ready_path
        self.user = user
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout: float = 30.0) -> None:
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.args,
                env=self.env,
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                user=self.user,
            )
        if self.port is None:
            return
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.args[:3]} exited at start-up:\n{self.log()}")
            if self._answers():
                return
            if time.monotonic() >= deadline:
                raise RuntimeError(f"{self.args[:3]} not ready after {timeout:g} s:\n{self.log()}")
            time.sleep(0.05)

    def _answers(self) -> bool:
        assert self.port is not None
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                pass
        except OSError:
            return False
        if not self.ready_path:
            return True
        try:
            return request(self.port, "GET", self.ready_path, timeout=5).status == 200
        except OSError:
            return False

    def stop(self, timeout: float = 10.0) -> None:
        process = self.process
        if process is None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            try:
                process.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # Workers that outlived their master are in the same process group.
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(5.0)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""


@contextmanager
def running(
    args: Sequence[str],
    *,
    env: dict[str, str],
    log_path: Path,
    port: int | None = None,
    ready_path: str = "/health/",
    user: str | None = None,
) -> Iterator[ServerProcess]:
    process = ServerProcess(
        args, env=env, log_path=log_path, port=port, ready_path=ready_path, user=user
    )
    try:
        process.start()
        yield process
    finally:
        process.stop()


# ---------------------------------------------------------------------- HTTP


@dataclass(frozen=True)
class Reply:
    method: str
    path: str
    status: int  # -1: no HTTP response at all (see ``error``)
    body: bytes
    seconds: float
    error: str = ""

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    port: int,
    method: str,
    path: str,
    *,
    timeout: float = 30.0,
    conn: http.client.HTTPConnection | None = None,
) -> Reply:
    """One HTTP request to 127.0.0.1; a new connection (closed after) unless ``conn`` is given."""
    own = conn is None
    if conn is None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    started = time.monotonic()
    try:
        headers = {"Connection": "close"} if own else {}
        conn.request(method, path, headers=headers)
        response = conn.getresponse()
        body = response.read()
        return Reply(method, path, response.status, body, time.monotonic() - started)
    except (OSError, http.client.HTTPException) as exc:
        conn.close()
        error = f"{type(exc).__name__}: {exc}"
        return Reply(method, path, -1, b"", time.monotonic() - started, error)
    finally:
        if own:
            conn.close()


#: Chooses each request of a client: ``plan(rng) -> (method, path)``.
Plan = Callable[[random.Random], tuple[str, str]]


def hammer(
    port: int,
    plan: Plan,
    *,
    clients: int,
    requests_each: int,
    timeout: float = 60.0,
) -> list[Reply]:
    """``clients`` threads each send ``requests_each`` requests chosen by ``plan(rng)``.

    Even-numbered clients keep their connection alive between requests, odd
    ones open a new connection for every request, so both paths of the server
    are exercised.
    """
    barrier = threading.Barrier(clients)

    def client(index: int) -> list[Reply]:
        rng = random.Random(index)
        keep_alive = index % 2 == 0
        conn = HTTPConnection("127.0.0.1", port, timeout=timeout) if keep_alive else None
        replies = []
        barrier.wait()
        for _ in range(requests_each):
            method, path = plan(rng)
            reply = request(port, method, path, timeout=timeout, conn=conn)
            replies.append(reply)
            if reply.status == -1 and keep_alive:
                conn = HTTPConnection("127.0.0.1", port, timeout=timeout)
        if conn is not None:
            conn.close()
        return replies

    with ThreadPoolExecutor(clients) as executor:
        return [reply for replies in executor.map(client, range(clients)) for reply in replies]


def send_all_at_once(
    port: int, requests: Sequence[tuple[str, str]], *, timeout: float = 60.0
) -> list[Reply]:
    """Every request on its own connection, all sent at the same moment."""
    barrier = threading.Barrier(len(requests))

    def one(method_path: tuple[str, str]) -> Reply:
        barrier.wait()
        return request(port, *method_path, timeout=timeout)

    with ThreadPoolExecutor(len(requests)) as executor:
        return list(executor.map(one, requests))


# ---------------------------------------------------------------------- checking replies


def wrong_replies(replies: Sequence[Reply], library: Library) -> list[str]:
    """What is wrong with each reply of the testproject's views (an empty list: all right)."""
    problems = []
    for reply in replies:
        problem = _check_reply(reply, library)
        if problem:
            problems.append(f"{reply.method} {reply.path}: {problem}")
    return problems


_BOOK = re.compile(r"^/(?:async/)?books/(\d+)/(thread/|buy/)?$")


def _check_reply(reply: Reply, library: Library) -> str:
    if reply.status != 200:
        return f"status {reply.status} {reply.error}{reply.body[:300]!r}"
    data = reply.json()
    if reply.path == "/db/session/":
        if data["database"] != library.name or data["time_zone"] != "UTC":
            return f"served from the wrong session: {data}"
        return ""
    match = _BOOK.match(reply.path)
    if match is None:
        return ""
    pk, suffix = int(match.group(1)), match.group(2)
    if suffix == "buy/":
        if data["book"] != pk or not isinstance(data["order"], int):
            return f"wrong purchase {data}"
        return ""
    row = library.books[pk]
    expected = {"id": pk, "title": row.title, "author": row.author, "price": row.price}
    if {key: data.get(key) for key in expected} != expected or not isinstance(data["stock"], int):
        return f"wrong book {data}, expected {expected}"
    if suffix == "thread/" and not isinstance(data.get("backend_pid"), int):
        return f"no backend pid in {data}"
    return ""


def purchases(replies: Sequence[Reply]) -> dict[int, int]:
    """Successful purchases per book."""
    bought: dict[int, int] = {}
    for reply in replies:
        match = _BOOK.match(reply.path)
        if reply.method == "POST" and reply.status == 200 and match:
            pk = int(match.group(1))
            bought[pk] = bought.get(pk, 0) + 1
    return bought


def stock_changes(before: dict[int, int], after: dict[int, int]) -> dict[int, int]:
    return {pk: before[pk] - after[pk] for pk in before if before[pk] != after[pk]}


# ---------------------------------------------------------------------- server connections


class ConnectionSampler:
    """Counts client backends in ``pg_stat_activity`` in a background thread.

    Backends are grouped by ``application_name`` (all those starting with
    ``prefix``) or by database; :attr:`peaks` keeps each group's highest count.
    """

    def __init__(
        self,
        server: ServerSettings,
        *,
        application_prefix: str | None = None,
        database: str | None = None,
        interval: float = 0.005,
    ) -> None:
        clauses = ["backend_type = 'client backend'", "pid <> pg_backend_pid()"]
        params: list[Any] = []
        if application_prefix is not None:
            clauses.append("starts_with(application_name, %s)")
            params.append(application_prefix)
            group = "application_name"
        else:
            group = "datname"
        if database is not None:
            clauses.append("datname = %s")
            params.append(database)
        self._sql = (
            f"SELECT {group}, count(*) FROM pg_stat_activity "
            f"WHERE {' AND '.join(clauses)} GROUP BY 1"
        )
        self._params = params
        self._server = server
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._conn: Any = None
        self.peaks: dict[str, int] = {}
        self.samples = 0

    def counts(self) -> dict[str, int]:
        return {name: int(count) for name, count in fetch_all(self._conn, self._sql, self._params)}

    def _record(self) -> None:
        for name, count in self.counts().items():
            if count > self.peaks.get(name, 0):
                self.peaks[name] = count
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self._record()
            time.sleep(self._interval)

    def __enter__(self) -> ConnectionSampler:
        self._conn = admin_connection(self._server)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._record()
        self._conn.close()


def backend_pids(server: ServerSettings, application_name: str) -> set[int]:
    admin = admin_connection(server)
    try:
        rows = fetch_all(
            admin,
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s "
            "AND backend_type = 'client backend'",
            [application_name],
        )
    finally:
        admin.close()
    return {row[0] for row in rows}


def wait_for_backends(
    server: ServerSettings, condition: str, params: Sequence[Any], count: int, timeout: float
) -> bool:
    """Wait until ``count`` client backends satisfy the SQL ``condition``."""
    admin = admin_connection(server)
    try:
        sql = (
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
            f"AND pid <> pg_backend_pid() AND {condition}"
        )
        return bool(eventually(lambda: fetch_all(admin, sql, params)[0][0] >= count, timeout))
    finally:
        admin.close()
