"""The pool never loses capacity: whatever interrupts a caller, its slot comes back.

Each test interrupts the pool at one of its blocking points (a request
waiting for a connection, a warm-up opening connections) the way production
does it: a signal handler that raises (Celery's soft time limit,
``signal.alarm``), an asynchronous exception, ``gevent.Timeout``. Afterwards
the pool must still serve ``max_size`` connections at once.
"""

from __future__ import annotations

import ctypes
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from django_pgpool import PoolTimeout

from .helpers import eventually, run_python


class Interrupted(Exception):
    """What the tests' signal handlers raise, as Celery's SoftTimeLimitExceeded would."""


@contextmanager
def interrupt_after(seconds: float) -> Iterator[None]:
    """Raise ``Interrupted`` in the main thread after ``seconds``, from a signal handler."""

    def handler(signum: int, frame: Any) -> None:
        raise Interrupted(f"signal {signum}")

    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def assert_serves_max_size_at_once(pool: Any) -> None:
    """Every slot is usable: max_size connections can be held at the same time."""
    held = [pool.getconn(timeout=2) for _ in range(pool.maxconn)]
    stats = pool.stats()
    assert stats["pool_in_use"] == pool.maxconn
    assert stats["requests_waiting"] == 0
    for conn in held:
        pool.putconn(conn)
    assert pool.stats()["pool_available"] == pool.maxconn


def test_a_wait_interrupted_by_a_signal_leaves_the_queue_and_loses_no_slot(make_pool: Any) -> None:
    pool = make_pool(min_size=0, max_size=2, max_idle=None)
    held = [pool.getconn(), pool.getconn()]
    for _ in range(2):
        with pytest.raises(Interrupted), interrupt_after(0.1):
            pool.getconn(timeout=5)
    assert pool.stats()["requests_waiting"] == 0
    for conn in held:
        pool.putconn(conn)
    assert_serves_max_size_at_once(pool)


def test_a_connection_handed_to_a_waiter_that_dies_goes_back_to_the_pool(make_pool: Any) -> None:
    # An asynchronous exception (PyThreadState_SetAsyncExc, as debuggers and
    # some task runners use) is raised when the waiter wakes up: after the
    # returning thread has handed it the connection.
    pool = make_pool(min_size=0, max_size=1, max_idle=None)
    held = pool.getconn()
    outcome: list[BaseException] = []

    def waiter() -> None:
        try:
            pool.getconn(timeout=5)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=waiter)
    thread.start()
    assert eventually(lambda: pool.stats()["requests_waiting"] == 1)
    assert ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread.ident or 0), ctypes.py_object(Interrupted)
    )
    pool.putconn(held)  # handed to the waiter, which raises as it wakes up
    thread.join(5)
    assert len(outcome) == 1 and isinstance(outcome[0], Interrupted)
    assert pool.stats()["pool_available"] == 1
    assert_serves_max_size_at_once(pool)


def test_a_connection_handed_to_a_dead_waiter_goes_to_the_next_one(make_pool: Any) -> None:
    pool = make_pool(min_size=0, max_size=1, max_idle=None)
    held = pool.getconn()
    results: dict[str, Any] = {}
    first_waiting = threading.Event()

    def first() -> None:
        first_waiting.set()
        try:
            pool.getconn(timeout=5)
        except BaseException as exc:
            results["first"] = exc

    def second() -> None:
        conn = pool.getconn(timeout=5)
        results["second"] = conn
        pool.putconn(conn)

    first_thread = threading.Thread(target=first)
    first_thread.start()
    assert eventually(lambda: pool.stats()["requests_waiting"] == 1)
    second_thread = threading.Thread(target=second)
    second_thread.start()
    assert eventually(lambda: pool.stats()["requests_waiting"] == 2)
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(first_thread.ident or 0), ctypes.py_object(Interrupted)
    )
    pool.putconn(held)
    first_thread.join(5)
    second_thread.join(5)
    assert isinstance(results["first"], Interrupted)
    assert results["second"] is held
    assert_serves_max_size_at_once(pool)


def test_a_wait_that_times_out_after_interrupted_ones_still_says_who_waits(make_pool: Any) -> None:
    pool = make_pool(min_size=0, max_size=1, max_idle=None)
    held = pool.getconn()
    with pytest.raises(Interrupted), interrupt_after(0.05):
        pool.getconn(timeout=5)
    with pytest.raises(PoolTimeout) as caught:
        pool.getconn(timeout=0.2)
    assert caught.value.waiting == 1
    pool.putconn(held)
    assert_serves_max_size_at_once(pool)


@pytest.fixture
def silent_server() -> Iterator[tuple[str, int]]:
    """A TCP port that accepts connections and never says anything."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    try:
        yield listener.getsockname()
    finally:
        listener.close()


def test_a_warm_up_interrupted_while_connecting_gives_its_slot_back(
    make_pool: Any, silent_server: tuple[str, int]
) -> None:
    host, port = silent_server
    pool = make_pool(
        {"host": host, "port": port, "user": "nobody", "dbname": "none", "connect_timeout": 2},
        min_size=1,
        max_size=2,
    )
    started = time.monotonic()
    with pytest.raises(Interrupted), interrupt_after(0.1):
        pool.open(wait=True, timeout=10)
    # libpq retries the system call a signal interrupts, so the handler runs
    # once connect_timeout ends the attempt.
    assert time.monotonic() - started < 5
    # (The worker, started by open(), may be trying too: its slot comes back
    # when its own attempt times out.)
    assert eventually(lambda: pool.stats()["pool_size"] == 0, timeout=6)


GEVENT_SCRIPT = """
from gevent import monkey
monkey.patch_all()
import gevent, json, sys
from django_pgpool.config import PoolConfig
from django_pgpool.pool import ConnectionPool
from testsupport.pgserver import ensure_server

config = PoolConfig(min_size=0, max_size=2, max_idle=None)
pool = ConnectionPool(config, ensure_server().connect_kwargs())
held = [pool.getconn(), pool.getconn()]

def wait_for_one():
    with gevent.Timeout(0.1):
        pool.getconn(timeout=5)

timeouts = 0
for _ in range(3):
    try:
        gevent.spawn(wait_for_one).get()
    except gevent.Timeout:
        timeouts += 1
for conn in held:
    pool.putconn(conn)
again = [pool.getconn(timeout=2), pool.getconn(timeout=2)]
print(json.dumps({"timeouts": timeouts, "stats": pool.stats()}))
for conn in again:
    pool.putconn(conn)
pool.close()
"""


@pytest.mark.slow
def test_a_greenlet_killed_by_gevent_timeout_while_waiting_loses_no_slot(server: Any) -> None:
    import json

    result = run_python(GEVENT_SCRIPT)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["timeouts"] == 3
    assert report["stats"]["pool_in_use"] == 2
    assert report["stats"]["requests_waiting"] == 0
