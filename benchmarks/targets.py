"""What the load is sent to: one process per strategy, serving the testproject.

- :class:`AppServer` (``http`` mode): gunicorn, ``gthread``, one worker with
  as many threads as clients; the clients are threads of the benchmark's own
  process, on keep-alive connections over loopback.
- :class:`InProcessWorker` (``inprocess`` mode): :mod:`benchmarks.worker`,
  whose own threads call Django's WSGI handler directly.

Both serve every request through Django's request cycle. A measurement is
started with :meth:`begin`, polled with :meth:`finished` (the runner counts
server connections meanwhile) and read with :meth:`result`.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any, Protocol

from testsupport import REPO

from .load import WORKLOADS, Cell, HttpClient, LoadResult, run_load
from .strategies import Strategy


class Target(Protocol):
    mode: str
    strategy: Strategy
    application_name: str

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def begin(self, cell: Cell, seed: int, warmup: float, duration: float) -> None:
        """Start measuring ``cell``: ``warmup`` seconds, then ``duration`` measured."""

    def finished(self) -> bool: ...

    def result(self) -> LoadResult: ...


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_process_group(process: subprocess.Popen[Any]) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


class _Process:
    """A strategy's process: its settings, log file and application_name."""

    mode = ""
    #: The module ``python -m`` runs to serve this target (checked before a run starts).
    server_module = "benchmarks.worker"

    def __init__(
        self,
        strategy: Strategy,
        threads: int,
        pool_options: dict[str, Any],
        env: dict[str, str],
        log_dir: Path,
    ) -> None:
        self.strategy = strategy
        self.threads = threads
        self.application_name = f"bench-{self.mode}-{strategy.name}-{threads}"
        self.log_path = log_dir / f"{self.mode}-{strategy.name}-{threads}.log"
        self.env = {
            **env,
            **strategy.settings_env(**pool_options),
            "TESTPROJECT_APPLICATION_NAME": self.application_name,
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.log: IO[bytes] | None = None

    def _spawn(self, args: list[str], *, piped: bool = False) -> subprocess.Popen[bytes]:
        """Start the process, its output in the log (``piped``: stdin and stdout are
        pipes to this process instead)."""
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        return subprocess.Popen(
            args,
            env=self.env,
            cwd=REPO,
            stdin=subprocess.PIPE if piped else subprocess.DEVNULL,
            stdout=subprocess.PIPE if piped else self.log,
            stderr=self.log,
            start_new_session=True,
        )

    def stop(self) -> None:
        if self.process is not None:
            stop_process_group(self.process)
        if self.log is not None:
            self.log.close()

    def _failed(self, what: str) -> RuntimeError:
        return RuntimeError(f"{self.strategy.name} ({self.mode}): {what}; see {self.log_path}")


class AppServer(_Process):
    """gunicorn (gthread, one worker) serving the testproject with one strategy."""

    mode = "http"
    server_module = "gunicorn"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.port = free_port()
        self._load: threading.Thread | None = None
        self._result: LoadResult | None = None

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            self.server_module,
            "testproject.wsgi:application",
            "--worker-class",
            "gthread",
            "--workers",
            "1",
            "--threads",
            str(self.threads),
            "--bind",
            f"127.0.0.1:{self.port}",
            "--keep-alive",
            "120",
            "--backlog",
            "2048",
            "--timeout",
            "600",
            "--graceful-timeout",
            "5",
            "--log-level",
            "warning",
        ]

    def start(self) -> None:
        self.process = self._spawn(self.command())
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise self._failed("the server exited")
            with contextlib.suppress(OSError):
                client = HttpClient(self.port)
                status, _ = client.request("GET", "/health/")
                client.close()
                if status == 200:
                    return
            time.sleep(0.1)
        raise self._failed("the server did not answer")

    def begin(self, cell: Cell, seed: int, warmup: float, duration: float) -> None:
        def load() -> None:
            self._result = run_load(
                lambda: HttpClient(self.port),
                WORKLOADS[cell.workload],
                threads=cell.threads,
                warmup=warmup,
                duration=duration,
                seed=seed,
            )

        self._result = None
        self._load = threading.Thread(target=load, name=f"load-{self.strategy.name}")
        self._load.start()

    def finished(self) -> bool:
        return self._load is None or not self._load.is_alive()

    def result(self) -> LoadResult:
        if self._load is not None:
            self._load.join()
        if self._result is None:
            raise self._failed("the load's clients failed")
        return self._result


class InProcessWorker(_Process):
    """A process of :mod:`benchmarks.worker`: the testproject called in-process by threads."""

    mode = "inprocess"

    def start(self) -> None:
        self.process = self._spawn(
            [sys.executable, "-m", self.server_module, str(self.threads)], piped=True
        )
        if not self._readable(timeout=60):
            raise self._failed("the worker did not start")
        if json.loads(self._read_line() or "{}").get("ready") is not True:
            raise self._failed("the worker failed to start")

    def begin(self, cell: Cell, seed: int, warmup: float, duration: float) -> None:
        assert self.process is not None and self.process.stdin is not None
        command = {
            "workload": cell.workload,
            "seed": seed,
            "warmup": warmup,
            "duration": duration,
        }
        self.process.stdin.write(json.dumps(command).encode() + b"\n")
        self.process.stdin.flush()

    def finished(self) -> bool:
        return self._readable(timeout=0)

    def result(self) -> LoadResult:
        answer = json.loads(self._read_line() or "{}")
        if "latencies" not in answer:
            raise self._failed("the worker gave no result")
        return LoadResult(latencies=answer["latencies"], failed=answer["failed"])

    def _readable(self, timeout: float) -> bool:
        assert self.process is not None and self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        return bool(ready)

    def _read_line(self) -> str:
        assert self.process is not None and self.process.stdout is not None
        return self.process.stdout.readline().decode()

    def stop(self) -> None:
        if self.process is not None and self.process.stdin is not None:
            # End of input: the worker closes its pools and exits.
            with contextlib.suppress(OSError):
                self.process.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(10)
        super().stop()


class AsgiServer(AppServer):
    """uvicorn (one process) serving the testproject's async views with one strategy."""

    mode = "asgi"
    server_module = "uvicorn"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            self.server_module,
            "testproject.asgi:application",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--lifespan",
            "off",
            "--backlog",
            "2048",
            "--timeout-keep-alive",
            "120",
            "--log-level",
            "warning",
            "--no-access-log",
        ]


TARGETS: dict[str, type[AppServer] | type[InProcessWorker]] = {
    AppServer.mode: AppServer,
    InProcessWorker.mode: InProcessWorker,
    AsgiServer.mode: AsgiServer,
}
