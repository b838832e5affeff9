"""The testproject served by real servers (gunicorn gthread and gevent workers,
uvicorn), loaded by HTTP clients on 127.0.0.1, against a database migrated and
seeded for these tests.

Each test starts its server, checks every response and the rows written, and
samples ``pg_stat_activity`` during the load: every process tags its
connections with ``application_name = "<tag>-{pid}"``, so the server
connections of each worker process can be counted.
"""

from __future__ import annotations

import json
import os
import random
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from testsupport.pgserver import ServerSettings, ensure_server
from testsupport.servers import (
    ConnectionSampler,
    Library,
    Plan,
    Reply,
    backend_pids,
    free_port,
    hammer,
    library_database,
    project_env,
    purchases,
    request,
    running,
    send_all_at_once,
    stock_changes,
    token,
    wait_for_backends,
    wrong_replies,
)

pytestmark = pytest.mark.slow

GEVENT_CONFIG = "testproject/gunicorn_gevent.py"


@pytest.fixture(scope="module")
def library() -> Iterator[Library]:
    with library_database(ensure_server(), "pgpool_servers") as library:
        yield library


@pytest.fixture
def server() -> ServerSettings:
    return ensure_server()


def mixed_requests(library: Library) -> Plan:
    """Reads, purchases (a transaction) and session probes, on random books."""
    pks = sorted(library.books)

    def plan(rng: random.Random) -> tuple[str, str]:
        pk = rng.choice(pks)
        roll = rng.random()
        if roll < 0.25:
            return "POST", f"/books/{pk}/buy/"
        if roll < 0.40:
            return "GET", "/db/session/"
        return "GET", f"/books/{pk}/"

    return plan


def parent_pid(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("PPid:"):
                return int(line.split()[1])
    raise LookupError(pid)


def pid_of(application_name: str, tag: str) -> int:
    assert application_name.startswith(tag), application_name
    return int(application_name[len(tag) :])


# ---------------------------------------------------------------------- gunicorn gthread

WORKERS = 2
THREADS = 4
GTHREAD_MAX_SIZE = 2  # below the threads per worker: requests queue for the pool


@pytest.mark.timeout(120)
@pytest.mark.parametrize("preload", [False, True], ids=["fork-then-load", "preload"])
def test_gunicorn_gthread_answers_every_request_with_at_most_max_size_connections_per_worker(
    preload: bool, library: Library, server: ServerSettings, tmp_path: Path
) -> None:
    tag = f"gthread-{token()}-"
    port = free_port()
    settings = {
        "TESTPROJECT_POOL": json.dumps({"max_size": GTHREAD_MAX_SIZE, "timeout": 20}),
        "TESTPROJECT_APPLICATION_NAME": tag + "{pid}",
    }
    if preload:
        # The master queries the database while loading the application,
        # before it forks the workers.
        settings["TESTPROJECT_QUERY_IN_READY"] = "1"
    args = [
        sys.executable, "-m", "gunicorn", "testproject.wsgi:application",
        "--worker-class", "gthread", "--workers", str(WORKERS), "--threads", str(THREADS),
        "--bind", f"127.0.0.1:{port}", "--keep-alive", "10", "--timeout", "30",
        "--graceful-timeout", "5", "--log-level", "warning",
        *(["--preload"] if preload else []),
    ]  # fmt: skip
    stocks_before = library.stocks()
    with running(
        args, env=project_env(library.name, **settings), log_path=tmp_path / "gunicorn.log",
        port=port,
    ) as gunicorn:  # fmt: skip
        master = gunicorn.pid
        masters_sessions = backend_pids(server, f"{tag}{master}")
        with ConnectionSampler(server, application_prefix=tag) as sampler:
            replies = hammer(port, mixed_requests(library), clients=16, requests_each=40)
        masters_sessions_after = backend_pids(server, f"{tag}{master}")
        parents = {name: parent_pid(pid_of(name, tag)) for name in sampler.peaks}
        log = gunicorn.log()

    assert wrong_replies(replies, library) == [], log
    assert purchases(replies) == stock_changes(stocks_before, library.stocks())

    workers = {name: peak for name, peak in sampler.peaks.items() if name != f"{tag}{master}"}
    assert 1 <= len(workers) <= WORKERS, sampler.peaks
    assert max(workers.values()) <= GTHREAD_MAX_SIZE, sampler.peaks
    assert all(parents[name] == master for name in workers)  # each pool lives in a worker
    sessions = [reply.json() for reply in replies if reply.path == "/db/session/"]
    assert {session["application_name"] for session in sessions} <= set(workers)

    if preload:
        # The master kept its one session, untouched by the workers it forked:
        # none of them used it, and none closed it.
        assert len(masters_sessions) == 1
        assert masters_sessions_after == masters_sessions
        assert sampler.peaks[f"{tag}{master}"] == 1
        assert not masters_sessions & {session["backend_pid"] for session in sessions}
    else:
        assert masters_sessions == set()


# ---------------------------------------------------------------------- uvicorn (ASGI)


def default_executor_threads() -> int:
    """Threads of asyncio's default executor, which runs sync_to_async(thread_sensitive=False)."""
    cpus = getattr(os, "process_cpu_count", os.cpu_count)() or 1
    return min(32, cpus + 4)


def uvicorn(port: int) -> list[str]:
    return [
        sys.executable, "-m", "uvicorn", "testproject.asgi:application",
        "--host", "127.0.0.1", "--port", str(port), "--lifespan", "off",
        "--log-level", "warning", "--no-access-log",
    ]  # fmt: skip


def async_requests(library: Library) -> Plan:
    pks = sorted(library.books)

    def plan(rng: random.Random) -> tuple[str, str]:
        pk = rng.choice(pks)
        roll = rng.random()
        if roll < 0.35:
            return "GET", f"/async/books/{pk}/"  # async ORM, thread-sensitive
        if roll < 0.60:
            return "GET", f"/async/books/{pk}/thread/"  # sync_to_async(thread_sensitive=False)
        if roll < 0.75:
            return "POST", f"/books/{pk}/buy/"  # a sync view under ASGI
        if roll < 0.85:
            return "GET", "/db/session/"
        return "GET", f"/books/{pk}/"

    return plan


@pytest.mark.timeout(90)
def test_uvicorn_answers_async_views_correctly_when_max_size_exceeds_the_executor_threads(
    library: Library, server: ServerSettings, tmp_path: Path
) -> None:
    """The guarantee under ASGI: connections stay within max_size, and with
    max_size above the default executor's thread count every request is served.

    Each thread of the default executor that ran
    ``sync_to_async(thread_sensitive=False)`` code keeps the connection it took
    (Django's request_finished closes connections of the request's own thread
    only), so those threads pin up to one connection each; the rest of
    ``max_size`` serves everything else.
    """
    tag = f"asgi-{token()}-"
    port = free_port()
    max_size = default_executor_threads() + 2
    env = project_env(
        library.name,
        TESTPROJECT_POOL=json.dumps({"max_size": max_size, "timeout": 20}),
        TESTPROJECT_APPLICATION_NAME=tag + "{pid}",
    )
    stocks_before = library.stocks()
    with running(uvicorn(port), env=env, log_path=tmp_path / "uvicorn.log", port=port) as asgi:
        with ConnectionSampler(server, application_prefix=tag) as sampler:
            replies = hammer(port, async_requests(library), clients=16, requests_each=30)
        log = asgi.log()

    assert wrong_replies(replies, library) == [], log
    assert purchases(replies) == stock_changes(stocks_before, library.stocks())
    assert len(sampler.peaks) == 1
    assert max(sampler.peaks.values()) <= max_size


def async_orm_requests(library: Library) -> Plan:
    """Only async views: the async ORM (aget, acount, async iteration) and
    sync_to_async(thread_sensitive=False), with nothing giving connections back
    by hand."""
    pks = sorted(library.books)

    def plan(rng: random.Random) -> tuple[str, str]:
        pk = rng.choice(pks)
        roll = rng.random()
        if roll < 0.4:
            return "GET", f"/async/books/{pk}/thread/"
        if roll < 0.7:
            return "GET", f"/async/books/{pk}/"
        return "GET", "/async/books/"

    return plan


@pytest.mark.timeout(120)
def test_uvicorn_in_transaction_mode_serves_32_clients_from_4_connections(
    library: Library, server: ServerSettings, tmp_path: Path
) -> None:
    """With release="transaction", executor threads hold a connection only for
    the statement they run, so a pool far smaller than the executor serves
    every request, without closing_connections anywhere."""
    tag = f"asgi-transaction-{token()}-"
    port = free_port()
    env = project_env(
        library.name,
        TESTPROJECT_POOL=json.dumps({"max_size": 4, "timeout": 20, "release": "transaction"}),
        TESTPROJECT_APPLICATION_NAME=tag + "{pid}",
    )
    with running(uvicorn(port), env=env, log_path=tmp_path / "uvicorn.log", port=port) as asgi:
        with ConnectionSampler(server, application_prefix=tag) as sampler:
            replies = hammer(port, async_orm_requests(library), clients=32, requests_each=15)
        log = asgi.log()

    assert [reply.status for reply in replies] == [200] * len(replies), log
    assert wrong_replies(replies, library) == [], log
    catalogue = [reply.json() for reply in replies if reply.path == "/async/books/"]
    assert catalogue and all(len(body["titles"]) == 20 for body in catalogue)
    assert len(sampler.peaks) == 1
    assert max(sampler.peaks.values()) <= 4


@pytest.mark.timeout(90)
def test_uvicorn_with_max_size_below_the_executor_threads_runs_out_of_connections(
    library: Library, server: ServerSettings, tmp_path: Path
) -> None:
    """The limit of that guarantee, as it stands: once ``max_size`` executor
    threads have each taken a connection in ``sync_to_async(thread_sensitive=False)``
    code, no connection ever comes back, and every later request that needs
    the database waits ``timeout`` and fails, whatever kind of view it is.
    Connections taken in such code must be given back by it (see
    docs/deployment.md); tests/test_asgi_threads.py shows that this keeps a
    small pool serving.
    """
    tag = f"asgi-starved-{token()}-"
    port = free_port()
    max_size = 2
    env = project_env(
        library.name,
        TESTPROJECT_POOL=json.dumps({"max_size": max_size, "timeout": 1}),
        TESTPROJECT_APPLICATION_NAME=tag + "{pid}",
    )
    pks = sorted(library.books)
    burst = [("GET", f"/async/books/{pk}/thread/") for pk in pks[: default_executor_threads()]]
    with (
        running(uvicorn(port), env=env, log_path=tmp_path / "uvicorn.log", port=port),
        ConnectionSampler(server, application_prefix=tag) as sampler,
    ):
        in_threads = send_all_at_once(port, burst)
        afterwards = [
            request(port, "GET", path)
            for path in (f"/async/books/{pks[0]}/", f"/books/{pks[0]}/", "/db/session/")
        ]
        health = request(port, "GET", "/health/")

    # Two executor threads took the two connections (and served whatever else
    # came their way); calls in the others waited out the timeout.
    served = [reply for reply in in_threads if reply.status == 200]
    assert len({reply.json()["backend_pid"] for reply in served}) == max_size
    assert {reply.status for reply in in_threads} <= {200, 500}
    assert max(sampler.peaks.values()) <= max_size  # the bound holds even so
    # The pool is exhausted for good: each request waits out timeout=1 s, then fails.
    assert [reply.status for reply in afterwards] == [500, 500, 500]
    assert all(reply.seconds >= 0.9 for reply in afterwards)
    assert health.status == 200


# ---------------------------------------------------------------------- gunicorn gevent

GEVENT_MAX_SIZE = 4
GREENLETS = 200


def gevent_worker(port: int, config: str | None) -> list[str]:
    return [
        sys.executable, "-m", "gunicorn",
        *(["--config", config] if config else ["--worker-class", "gevent"]),
        "testproject.wsgi:application", "--workers", "1",
        "--worker-connections", str(GREENLETS * 2), "--bind", f"127.0.0.1:{port}",
        "--timeout", "30", "--graceful-timeout", "5", "--log-level", "warning",
    ]  # fmt: skip


@pytest.mark.timeout(120)
def test_gevent_worker_shares_a_small_pool_between_200_greenlets_without_blocking(
    library: Library, server: ServerSettings, tmp_path: Path
) -> None:
    tag = f"gevent-{token()}-"
    port = free_port()
    env = project_env(
        library.name,
        TESTPROJECT_POOL=json.dumps({"max_size": GEVENT_MAX_SIZE, "timeout": 30}),
        TESTPROJECT_APPLICATION_NAME=tag + "{pid}",
    )
    pks = sorted(library.books)
    locked_book = pks[0]
    stocks_before = library.stocks()
    with (
        running(
            gevent_worker(port, GEVENT_CONFIG), env=env, log_path=tmp_path / "g.log", port=port
        ) as gunicorn,
        ConnectionSampler(server, application_prefix=tag) as sampler,
    ):
        # 200 requests at once: reads and purchases on every book but the one
        # locked below.
        others = pks[1:]
        mixed = send_all_at_once(
            port,
            [
                ("POST", f"/books/{others[n % len(others)]}/buy/")
                if n % 3 == 0
                else ("GET", f"/books/{others[n % len(others)]}/")
                for n in range(GREENLETS)
            ],
        )
        # Another 200 purchases of one book whose row another session holds
        # locked: the first max_size take the pool's connections and wait in
        # PostgreSQL, the others wait for the pool.
        blocker = library.connect()
        blocker.autocommit = False
        with blocker.cursor() as cursor:
            cursor.execute("SELECT 1 FROM library_book WHERE id = %s FOR UPDATE", [locked_book])
        try:
            with ThreadPoolExecutor(1) as executor:
                queued = executor.submit(
                    send_all_at_once, port, [("POST", f"/books/{locked_book}/buy/")] * GREENLETS
                )
                blocked = wait_for_backends(
                    server,
                    "starts_with(application_name, %s) AND wait_event_type = 'Lock'",
                    [tag],
                    GEVENT_MAX_SIZE,
                    timeout=20,
                )
                # Meanwhile the worker keeps answering what needs no connection.
                health = [request(port, "GET", "/health/", timeout=5) for _ in range(20)]
                waiting_in_pool = not queued.done()
                blocker.rollback()
                purchases_of_locked = queued.result(timeout=60)
        finally:
            blocker.close()
        log = gunicorn.log()

    assert blocked, log
    assert waiting_in_pool
    assert [reply.status for reply in health] == [200] * 20
    assert max(reply.seconds for reply in health) < 0.5, [r.seconds for r in health]
    replies = mixed + purchases_of_locked
    assert wrong_replies(replies, library) == [], log
    assert purchases(replies) == stock_changes(stocks_before, library.stocks())
    assert purchases(replies)[locked_book] == GREENLETS
    assert len(sampler.peaks) == 1
    assert max(sampler.peaks.values()) == GEVENT_MAX_SIZE


@pytest.mark.timeout(90)
def test_gevent_workers_with_preload_serve_and_stop_cleanly(
    library: Library, server: ServerSettings, tmp_path: Path
) -> None:
    """The master touches the database before forking; its pool's background
    greenlet is copied into each worker by fork() and must stay out of the way."""
    tag = f"gevent-preload-{token()}-"
    port = free_port()
    env = project_env(
        library.name,
        TESTPROJECT_POOL=json.dumps({"max_size": GEVENT_MAX_SIZE, "timeout": 30}),
        TESTPROJECT_APPLICATION_NAME=tag + "{pid}",
        TESTPROJECT_QUERY_IN_READY="1",
    )
    args = [
        sys.executable, "-m", "gunicorn", "--config", "testproject/gunicorn_gevent_preload.py",
        "--preload", "testproject.wsgi:application", "--workers", "2",
        "--bind", f"127.0.0.1:{port}", "--timeout", "30", "--graceful-timeout", "5",
        "--log-level", "warning",
    ]  # fmt: skip
    pks = sorted(library.books)
    with (
        running(args, env=env, log_path=tmp_path / "g.log", port=port) as gunicorn,
        ConnectionSampler(server, application_prefix=tag) as sampler,
    ):
        replies = send_all_at_once(
            port, [("GET", f"/books/{pks[n % len(pks)]}/") for n in range(80)]
        )
    log = gunicorn.log()
    assert [reply.status for reply in replies] == [200] * 80, log
    assert "Traceback" not in log and "KeyError" not in log, log
    assert max(sampler.peaks.values()) <= GEVENT_MAX_SIZE  # per worker process


@pytest.mark.timeout(60)
def test_without_psycogreen_one_waiting_query_blocks_the_whole_gevent_worker(
    library: Library, server: ServerSettings, tmp_path: Path
) -> None:
    """Why the gevent configuration patches psycopg2 (and what the test above would catch)."""
    tag = f"gevent-unpatched-{token()}-"
    port = free_port()
    env = project_env(
        library.name,
        TESTPROJECT_POOL=json.dumps({"max_size": GEVENT_MAX_SIZE, "timeout": 30}),
        TESTPROJECT_APPLICATION_NAME=tag + "{pid}",
    )
    locked_book = sorted(library.books)[0]
    with running(gevent_worker(port, None), env=env, log_path=tmp_path / "g.log", port=port):
        blocker = library.connect()
        blocker.autocommit = False
        with blocker.cursor() as cursor:
            cursor.execute("SELECT 1 FROM library_book WHERE id = %s FOR UPDATE", [locked_book])
        try:
            with ThreadPoolExecutor(1) as executor:
                purchase = executor.submit(request, port, "POST", f"/books/{locked_book}/buy/")
                assert wait_for_backends(
                    server,
                    "starts_with(application_name, %s) AND wait_event_type = 'Lock'",
                    [tag],
                    1,
                    timeout=20,
                )
                health = request(port, "GET", "/health/", timeout=2)
                blocker.rollback()
                bought: Reply = purchase.result(timeout=30)
        finally:
            blocker.close()

    assert health.status == -1 and "timed out" in health.error
    assert bought.status == 200
