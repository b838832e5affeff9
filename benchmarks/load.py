"""The load: threads sending one workload's requests as fast as they are answered.

The same loop drives both modes. Over HTTP each thread has a keep-alive
connection to gunicorn (:class:`HttpClient`); in-process each thread calls
Django's WSGI handler directly (:class:`WsgiClient`), which runs the same
request cycle without any HTTP parsing. Every request picks a random book.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from testsupport import wsgi_environ

#: Books in the run's database; requests pick one of their primary keys.
BOOKS = 1000
#: The overload cell: this many threads on a pool of OVERLOAD_POOL connections.
OVERLOAD_THREADS = 64
OVERLOAD_POOL = 8


#: The ASGI mode's clients, and its overload cell's pool: smaller than the
#: event loop's executor (at least 5 threads: min(32, CPUs + 4)).
ASGI_CLIENTS = 32
ASGI_OVERLOAD_POOL = 4


@dataclass(frozen=True)
class Workload:
    name: str
    method: str
    path: str  # with {pk}
    description: str
    #: The modes that run it: the WSGI views, or the async views under ASGI.
    modes: tuple[str, ...] = ("http", "inprocess")


WORKLOADS = {
    workload.name: workload
    for workload in (
        Workload("read", "GET", "/books/{pk}/", "one primary-key read"),
        Workload("transaction", "POST", "/books/{pk}/buy/", "atomic(): read, update, insert"),
        Workload("async-read", "GET", "/async/books/{pk}/", "async view, aget()", modes=("asgi",)),
        Workload(
            "async-executor",
            "GET",
            "/async/books/{pk}/thread/",
            "async view, ORM in sync_to_async(thread_sensitive=False)",
            modes=("asgi",),
        ),
    )
}


@dataclass(frozen=True)
class Cell:
    """One workload at one concurrency: what every strategy is measured on in turn."""

    workload: str
    threads: int
    overload: bool = False

    @property
    def key(self) -> str:
        return f"{self.workload}/{self.threads}" + (" (overload)" if self.overload else "")


@dataclass
class LoadResult:
    #: Seconds each successful request of the measured window took, sorted.
    latencies: list[float]
    failed: int

    def percentile(self, fraction: float) -> float:
        if not self.latencies:
            return float("nan")
        index = min(len(self.latencies) - 1, round(fraction * (len(self.latencies) - 1)))
        return self.latencies[index]


class Client(Protocol):
    def send(self, method: str, path: str) -> bool:
        """Send one request; whether it succeeded."""

    def close(self) -> None: ...


class HttpClient:
    """A minimal keep-alive HTTP/1.1 client: cheap enough not to be what is measured."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.buffer = b""
        self.sock = self._connect()

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=600)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def request(self, method: str, path: str) -> tuple[int, bytes]:
        self.sock.sendall(
            f"{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: 0\r\n\r\n".encode()
        )
        while b"\r\n\r\n" not in self.buffer:
            self._read()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(self.buffer) < length:
            self._read()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return status, body

    def send(self, method: str, path: str) -> bool:
        try:
            status, _ = self.request(method, path)
        except OSError:
            # Start again on a new connection, as a browser would.
            self.close()
            self.buffer = b""
            self.sock = self._connect()
            return False
        return status == 200

    def _read(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        self.buffer += chunk

    def close(self) -> None:
        self.sock.close()


class WsgiClient:
    """Calls a WSGI application in this thread, as a WSGI server's worker thread would.

    With Django's ``WSGIHandler``, ``request_started`` is sent when the call
    begins and ``request_finished`` when the response is closed, so connections
    are taken and given back exactly as under gunicorn.
    """

    def __init__(self, application: Callable[..., Any]) -> None:
        self.application = application

    def send(self, method: str, path: str) -> bool:
        status: list[str] = []
        environ = wsgi_environ(method, path, "bench")
        try:
            response = self.application(environ, lambda s, headers, exc_info=None: status.append(s))
            try:
                for _ in response:
                    pass
            finally:
                response.close()
        except Exception:
            return False
        return status[0].startswith("200 ")

    def close(self) -> None:
        pass


def run_load(
    open_client: Callable[[], Client],
    workload: Workload,
    *,
    threads: int,
    warmup: float,
    duration: float,
    seed: int,
    executor: Executor | None = None,
) -> LoadResult:
    """``threads`` clients send requests for ``warmup + duration`` seconds; what the
    last ``duration`` seconds measured.

    The clients run on ``executor``'s threads when it is given (it must have
    ``threads`` of them, kept from one load to the next as a WSGI server keeps
    its worker threads, and with them what each holds: a persistent
    connection), else on threads of their own.
    """
    if executor is None:
        with ThreadPoolExecutor(threads) as own:
            return run_load(
                open_client,
                workload,
                threads=threads,
                warmup=warmup,
                duration=duration,
                seed=seed,
                executor=own,
            )
    latencies: list[list[float]] = [[] for _ in range(threads)]
    failures = [0] * threads
    # Every client waits for all the others, so each runs on a thread of its own.
    start_gate = threading.Barrier(threads)
    window: list[float] = []

    def client_thread(index: int) -> None:
        rng = random.Random(index * 7919 + seed)
        client = open_client()
        if start_gate.wait() == 0:
            now = time.monotonic()
            window[:] = [now + warmup, now + warmup + duration]
        start_gate.wait()  # the window is set
        measure_from, stop_at = window
        mine = latencies[index]
        while True:
            started = time.perf_counter()
            if time.monotonic() >= stop_at:
                break
            ok = client.send(workload.method, workload.path.format(pk=rng.randint(1, BOOKS)))
            if time.monotonic() >= measure_from:
                if ok:
                    mine.append(time.perf_counter() - started)
                else:
                    failures[index] += 1
        client.close()

    for future in [executor.submit(client_thread, index) for index in range(threads)]:
        future.result()
    return LoadResult(
        latencies=sorted(latency for per_thread in latencies for latency in per_thread),
        failed=sum(failures),
    )
