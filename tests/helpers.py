"""Helpers shared by the tests (fixtures are in conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from testsupport import REPO, eventually, wsgi_environ

__all__ = ["REPO", "eventually"]


def query_one(conn: Any, sql: str, params: Any = None) -> Any:
    with conn.cursor() as cursor:
        cursor.execute(sql, params)
        row = cursor.fetchone()
    return row[0] if row and len(row) == 1 else row


def backends(
    admin: Any, *, application_name: str | None = None, database: str | None = None
) -> int:
    """Server connections (from pg_stat_activity) with that application_name or database."""
    clauses = ["pid <> pg_backend_pid()", "backend_type = 'client backend'"]
    params: list[Any] = []
    if application_name is not None:
        clauses.append("application_name = %s")
        params.append(application_name)
    if database is not None:
        clauses.append("datname = %s")
        params.append(database)
    return int(
        query_one(
            admin, f"SELECT count(*) FROM pg_stat_activity WHERE {' AND '.join(clauses)}", params
        )
    )


class PeakSampler:
    """Samples a count in a background thread and keeps the highest value seen."""

    def __init__(
        self,
        sample: Callable[[], int],
        interval: float = 0.01,
        on_exit: Callable[[], Any] | None = None,
    ) -> None:
        self.peak = 0
        self._sample = sample
        self._on_exit = on_exit
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            time.sleep(self._interval)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._sample())
        if self._on_exit is not None:
            self._on_exit()


@contextmanager
def pool_options(alias: str = "default", **options: Any) -> Iterator[None]:
    """Run with other OPTIONS["pool"] for an alias (the pool is rebuilt for them)."""
    from django.db import connections

    connections[alias].close()  # the next connection comes from the new pool
    settings_dict = connections[alias].settings_dict
    saved = settings_dict["OPTIONS"].get("pool", True)
    base = saved if isinstance(saved, dict) else {}
    settings_dict["OPTIONS"]["pool"] = {**base, **options}
    try:
        yield
    finally:
        connections[alias].close()
        settings_dict["OPTIONS"]["pool"] = saved
        connections[alias].close_pool()


def serve(path: str, method: str = "GET") -> tuple[int, bytes]:
    """One request through Django's real WSGI request cycle.

    Unlike the test client, this keeps Django's request_started /
    request_finished handlers, so connections are taken and given back
    exactly as in production.
    """
    from django.core.handlers.wsgi import WSGIHandler

    handler = _wsgi_handler()
    status: list[str] = []
    environ = wsgi_environ(method, path, "testserver")
    assert isinstance(handler, WSGIHandler)
    response = handler(environ, lambda s, headers, exc_info=None: status.append(s))
    try:
        body = b"".join(response)
    finally:
        response.close()
    return int(status[0].split()[0]), body


_handler: Any = None


def _wsgi_handler() -> Any:
    global _handler
    if _handler is None:
        from django.core.handlers.wsgi import WSGIHandler

        _handler = WSGIHandler()
    return _handler


def run_python(
    code: str, *, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run Python code in a fresh interpreter with the repository on the path."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=REPO,
    )


def run_in_threads(count: int, target: Callable[[int], Any]) -> list[Any]:
    """Run target(i) in ``count`` threads at once; re-raise the first error."""
    results: list[Any] = [None] * count
    errors: list[BaseException] = []
    barrier = threading.Barrier(count)

    def body(index: int) -> None:
        try:
            barrier.wait()
            results[index] = target(index)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results
