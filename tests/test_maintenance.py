"""Planned maintenance: pause, resume and drain, in one process and across a deployment.

The switchover runbook of docs/deployment.md, run against a primary and a
streaming standby on loopback: pause the pools, let the requests in flight
finish, stop the primary, promote the standby, drain, resume. Not one request
fails, and every connection afterwards is on the promoted server.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.db import connections
from django.test import override_settings

from django_pgpool import PoolTimeout, control
from testsupport import REPO, eventually
from testsupport.pgserver import ServerSettings
from testsupport.replication import execute, primary_and_standby, promote
from testsupport.servers import Reply, free_port, project_env, request, running

from .clusters import CREATE_WRITES, aliases, multi_host_settings, writers
from .helpers import query_one

# ------------------------------------------------------------------ one pool


def test_while_paused_new_checkouts_wait_and_connections_in_use_finish(make_pool: Any) -> None:
    pool = make_pool(min_size=0, max_size=2, timeout=10)
    held = pool.getconn()
    pool.pause()
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(pool.getconn()))
    waiter.start()
    assert eventually(lambda: pool.stats()["requests_waiting"] == 1)
    assert query_one(held, "SELECT 1") == 1  # in use: carries on
    pool.putconn(held)  # comes back, and stays idle
    time.sleep(0.2)
    stats = pool.stats()
    assert not got and stats["pool_paused"] == 1 and stats["pool_available"] == 1
    assert stats["pool_size"] == 1  # nobody opened a connection for the waiter either
    pool.resume()
    waiter.join(5)
    assert len(got) == 1 and query_one(got[0], "SELECT 1") == 1
    assert pool.stats()["pool_paused"] == 0
    pool.putconn(got[0])


def test_a_pause_longer_than_the_timeout_says_the_pool_is_paused(make_pool: Any) -> None:
    pool = make_pool(min_size=0, max_size=2, timeout=0.3)
    pool.pause()
    with pytest.raises(PoolTimeout, match="the pool is paused"):
        pool.getconn()
    pool.resume()
    pool.putconn(pool.getconn())


# ------------------------------------------------------------------ a switchover


PASSWORD = "maintenance"


@pytest.mark.slow
def test_a_switchover_with_pause_drain_resume_fails_no_request(
    django_db_blocker: Any, record_property: Any
) -> None:
    with primary_and_standby(PASSWORD) as (primary, standby):
        execute(primary, CREATE_WRITES)
        alias = "switchover"
        settings_dict = multi_host_settings(
            (primary, standby), alias, min_size=2, max_size=8, timeout=10
        )
        with (
            django_db_blocker.unblock(),
            aliases(switchover=settings_dict),
            writers(alias, threads=8, pause=0.002) as results,
        ):
            time.sleep(1.0)
            pool = connections[alias].pool
            paused_at = time.monotonic()
            pool.pause()
            assert eventually(lambda: pool.stats()["pool_in_use"] == 0, timeout=5)
            primary.stop()
            promote(standby)
            pool.drain()
            pool.resume()
            resumed_at = time.monotonic()
            time.sleep(2.0)
            servers = pool.roles.servers()

    failed = [w for w in results if not w.ok]
    after = [w for w in results if w.started >= resumed_at]
    record_property("switchover_pause_seconds", round(resumed_at - paused_at, 2))
    print(
        f"\nswitchover: paused {resume_took(paused_at, resumed_at)}, {len(results)} writes, "
        f"{len(failed)} failed"
    )
    assert not failed, failed
    assert len(after) > 50 and {w.port for w in after} == {standby.port}
    assert set(servers) == {f"127.0.0.1:{standby.port}"}


def resume_took(paused_at: float, resumed_at: float) -> str:
    return f"{resumed_at - paused_at:.2f} s"


# ------------------------------------------------------------------ a deployment


def manage_py(
    env: dict[str, str], *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "django", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def control_file(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "pgpool-control.json"
    control.stop()


def test_a_pool_follows_the_control_file_from_the_moment_it_is_built(
    control_file: Path, fresh_pools: None
) -> None:
    with override_settings(PGPOOL_CONTROL_FILE=str(control_file)):
        control.change(control_file, ["default"], paused=True)
        pool = connections["default"].pool  # built now: paused from the start
        assert pool.paused
        state = control.change(control_file, ["default"], paused=False)
        assert eventually(lambda: not pool.paused, timeout=5)
        assert eventually(
            lambda: (
                control.answers(control_file)
                and not control.pending(control_file, state.version, ["default"], idle=True)
            ),
            timeout=5,
        )
        (answer,) = control.answers(control_file)
        assert answer["pid"] == os.getpid() and answer["version"] == state.version
        generation = pool.generation
        control.change(control_file, ["default"], drain=True)
        assert eventually(lambda: pool.generation == generation + 1, timeout=5)


SERVERS = {
    # Two worker processes each, the pool's connections fewer than the threads.
    "gunicorn": lambda port: [
        sys.executable, "-m", "gunicorn", "testproject.wsgi:application",
        "--worker-class", "gthread", "--workers", "2", "--threads", "4",
        "--bind", f"127.0.0.1:{port}",
    ],
    "uvicorn": lambda port: [
        sys.executable, "-m", "uvicorn", "testproject.asgi:application",
        "--workers", "2", "--host", "127.0.0.1", "--port", str(port), "--lifespan", "off",
        "--log-level", "warning", "--no-access-log",
    ],
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("server_name", sorted(SERVERS))
def test_pause_drain_resume_move_every_worker_process_to_the_new_primary(
    server: ServerSettings,
    control_file: Path,
    tmp_path: Path,
    record_property: Any,
    server_name: str,
) -> None:
    with primary_and_standby(server.password or None) as (primary, standby):
        execute(primary, "CREATE DATABASE shop")
        base = project_env(
            "shop", TESTPROJECT_DB_HOST="127.0.0.1", TESTPROJECT_DB_PORT=str(primary.port)
        )
        for command in (("migrate", "--verbosity", "0"), ("seed", "--books", "5")):
            result = manage_py(base, *command)
            assert result.returncode == 0, result.stderr
        env = project_env(
            "shop",
            TESTPROJECT_DB_HOST="127.0.0.1,127.0.0.1",
            TESTPROJECT_DB_PORT=f"{primary.port},{standby.port}",
            TESTPROJECT_TARGET_SESSION_ATTRS="read-write",
            TESTPROJECT_CONTROL_FILE=str(control_file),
            TESTPROJECT_POOL=json.dumps({"max_size": 4, "timeout": 30}),
        )
        port = free_port()
        args = SERVERS[server_name](port)
        with running(args, env=env, log_path=tmp_path / "server.log", port=port) as process:
            replies: list[Reply] = []
            stop = threading.Event()

            def client(index: int) -> None:
                rng = random.Random(index)
                while not stop.is_set():
                    pk = rng.randint(1, 5)
                    method, path = (
                        ("POST", f"/books/{pk}/buy/") if index % 2 else ("GET", f"/books/{pk}/")
                    )
                    replies.append(request(port, method, path, timeout=60))

            clients = [threading.Thread(target=client, args=(i,)) for i in range(8)]
            for thread in clients:
                thread.start()
            try:
                time.sleep(2.0)
                # The runbook: pause every process and wait for the requests in flight...
                started = time.monotonic()
                result = manage_py(env, "pgpool", "pause", "--wait", "20")
                assert result.returncode == 0, result.stdout + result.stderr
                assert "Every process (2) followed, with no connection in use" in result.stdout
                # ...switch...
                primary.stop()
                promote(standby)
                # ...move every connection to the new primary, and let the requests in.
                for action in ("drain", "resume"):
                    result = manage_py(env, "pgpool", action, "--wait", "20")
                    assert result.returncode == 0, result.stdout + result.stderr
                paused_for = time.monotonic() - started
                time.sleep(2.0)
                status = manage_py(env, "pgpool", "status", "--json")
            finally:
                stop.set()
                for thread in clients:
                    thread.join()
            log = process.log()
    failed = [reply for reply in replies if reply.status != 200]
    record_property(f"{server_name}_switchover_pause_seconds", round(paused_for, 2))
    print(
        f"\n{server_name} switchover: paused {paused_for:.2f} s, {len(replies)} requests, "
        f"{len(failed)} failed"
    )
    assert not failed, (failed[:3], log)
    assert status.returncode == 0, status.stderr
    processes = json.loads(status.stdout)["processes"]
    assert len(processes) == 2
    for answer in processes:
        default = answer["aliases"]["default"]
        assert not default["paused"]
        assert set(default["servers"]) == {f"127.0.0.1:{standby.port}"}, answer
