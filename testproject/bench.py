"""The benchmark: django_pgpool against the other ways a Django site gets its connections.

Each strategy serves the testproject's real views from its own gunicorn
process (one worker, ``gthread``, as many threads as clients), so every request
goes through Django's real request cycle: connections are opened and closed by
``request_started`` / ``request_finished`` exactly as in production. Client
threads in this process send keep-alive HTTP requests over loopback. The
strategies are interleaved in rounds; medians are reported.

Strategies:

- ``default``: Django's backend, ``CONN_MAX_AGE=0`` (a new connection per request);
- ``persistent``: Django's backend, ``CONN_MAX_AGE=None`` (one connection per
  thread, kept: the ceiling, with an unbounded connection count);
- ``pgpool``: django_pgpool with its defaults;
- ``pgpool-noreset``: django_pgpool with ``reset: False`` (the session reset's cost);
- ``native``: Django's built-in psycopg 3 pool, when psycopg 3 and psycopg_pool
  are installed.

All but ``native`` run on psycopg2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import psycopg2

from testsupport.pgserver import EmbeddedPostgres, ServerSettings, from_environment, is_reachable

REPO = Path(__file__).resolve().parent.parent
# One database per run, dropped at the end: runs against the same server at
# once (two checkouts, CI beside a developer) must not share tables.
BENCH_DATABASE = f"pgpool_bench_{os.getpid()}"
BOOKS = 1000
OVERLOAD_THREADS = 64
OVERLOAD_POOL = 8


@dataclass(frozen=True)
class Strategy:
    name: str
    label: str
    engine: str
    pool: Any  # OPTIONS["pool"] (False: none)
    conn_max_age: str = "0"
    driver: str = "psycopg2"

    def settings_env(self, overload: bool) -> dict[str, str]:
        pool = self.pool
        if overload and pool is not False:
            # A pool of 8 for 64 threads, and a timeout longer than the run.
            pool = {**pool, "max_size": OVERLOAD_POOL, "timeout": 600}
            if self.name == "native":
                pool["min_size"] = 1
        return {
            "TESTPROJECT_ENGINE": self.engine,
            "TESTPROJECT_POOL": json.dumps(pool),
            "TESTPROJECT_CONN_MAX_AGE": self.conn_max_age,
            "TESTPROJECT_DRIVER": self.driver,
        }


STRATEGIES = {
    strategy.name: strategy
    for strategy in (
        Strategy(
            "default",
            "Django default (new connection per request)",
            "django.db.backends.postgresql",
            False,
        ),
        Strategy(
            "persistent",
            "Django persistent (CONN_MAX_AGE=None)",
            "django.db.backends.postgresql",
            False,
            conn_max_age="none",
        ),
        Strategy("pgpool", "django_pgpool (defaults)", "django_pgpool", {}),
        Strategy("pgpool-noreset", "django_pgpool, reset off", "django_pgpool", {"reset": False}),
        # Same sizes as django_pgpool's defaults (min_size 1, max_size 10).
        Strategy(
            "native",
            "Django's native psycopg 3 pool",
            "django.db.backends.postgresql",
            {"min_size": 1, "max_size": 10, "timeout": 30},
            driver="psycopg3",
        ),
    )
}

WORKLOADS = {
    "read": ("GET", "/books/{pk}/", "one primary-key read"),
    "transaction": ("POST", "/books/{pk}/buy/", "atomic(): read, update, insert"),
}


@dataclass
class Measurement:
    strategy: str
    workload: str
    threads: int
    round: int
    requests: int
    failed: int
    seconds: float
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    peak_server_connections: int


@dataclass
class Cell:
    workload: str
    threads: int
    overload: bool = False

    @property
    def key(self) -> str:
        return f"{self.workload}/{self.threads}" + (" (overload)" if self.overload else "")


@dataclass
class BenchConfig:
    rounds: int = 3
    duration: float = 3.0
    warmup: float = 1.0
    threads: tuple[int, ...] = (1, 8, 32)
    strategies: tuple[str, ...] = tuple(STRATEGIES)
    overload: bool = True
    micro: bool = True
    out: Path = field(default_factory=lambda: REPO / "bench-results")


# ---------------------------------------------------------------------- the server


def choose_server() -> tuple[ServerSettings, EmbeddedPostgres | None]:
    """PostgreSQL from the environment, else a throwaway cluster with password auth over TCP."""
    configured = from_environment()
    if configured is not None and is_reachable(configured):
        return configured, None
    if configured is not None:
        print(f"[bench] {configured.describe()} does not answer; starting a throwaway cluster")
    cluster = EmbeddedPostgres(password="bench-" + os.urandom(6).hex(), max_connections=300)
    cluster.start()
    return cluster.settings, cluster


def authentication_used(server: ServerSettings) -> str:
    """'password' if the server checks it over TCP, else 'trust (no password checked)'."""
    try:
        conn = psycopg2.connect(**server.connect_kwargs(password="certainly-not-the-password"))
    except psycopg2.OperationalError as exc:
        if "password" in str(exc).lower():
            return "password (TCP)"
        raise
    conn.close()
    return "trust (TCP, no password checked)"


@contextlib.contextmanager
def admin_cursor(server: ServerSettings) -> Iterator[Any]:
    """A cursor on the server's maintenance database, in autocommit mode."""
    admin = server.connect(dbname="postgres")
    admin.autocommit = True
    try:
        with admin.cursor() as cursor:
            yield cursor
    finally:
        admin.close()


def prepare_database(server: ServerSettings, env: dict[str, str]) -> None:
    drop_database(server)  # a leftover of an earlier run with the same process id
    with admin_cursor(server) as cursor:
        cursor.execute(f'CREATE DATABASE "{BENCH_DATABASE}"')
    for command in (
        ["migrate", "--noinput", "-v", "0"],
        ["seed", "--books", str(BOOKS), "-v", "0"],
    ):
        subprocess.run([sys.executable, "-m", "django", *command], env=env, cwd=REPO, check=True)


def drop_database(server: ServerSettings) -> None:
    with admin_cursor(server) as cursor:
        # The app servers are stopped; a monitor connection may linger briefly.
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
            [BENCH_DATABASE],
        )
        cursor.execute(f'DROP DATABASE IF EXISTS "{BENCH_DATABASE}"')


def base_env(server: ServerSettings) -> dict[str, str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "DJANGO_SETTINGS_MODULE": "testproject.settings",
        "PGHOST": server.host,
        "PGPORT": str(server.port),
        "PGUSER": server.user,
        "PGDATABASE": server.dbname,
        "TESTPROJECT_DB_NAME": BENCH_DATABASE,
    }
    env.pop("DATABASE_URL", None)
    if server.password:
        env["PGPASSWORD"] = server.password
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class AppServer:
    """gunicorn (gthread, one worker) serving the testproject with one strategy."""

    def __init__(
        self, strategy: Strategy, threads: int, overload: bool, env: dict[str, str], log_dir: Path
    ) -> None:
        self.strategy = strategy
        self.threads = threads
        self.port = free_port()
        self.application_name = f"bench-{strategy.name}-{threads}"
        self.log_path = log_dir / f"gunicorn-{strategy.name}-{threads}.log"
        self.env = {
            **env,
            **strategy.settings_env(overload),
            "TESTPROJECT_APPLICATION_NAME": self.application_name,
        }
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
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
            ],
            env=self.env,
            cwd=REPO,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.strategy.name}: gunicorn exited; see {self.log_path}")
            with contextlib.suppress(OSError):
                client = HttpClient(self.port)
                status, _ = client.request("GET", "/health/")
                client.close()
                if status == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"{self.strategy.name}: gunicorn did not answer; see {self.log_path}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, 15)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait()
        self.log.close()


# ---------------------------------------------------------------------- the client


class HttpClient:
    """A minimal keep-alive HTTP/1.1 client: cheap enough not to be what is measured."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=600)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

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

    def _read(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        self.buffer += chunk

    def close(self) -> None:
        self.sock.close()


def count_connections(admin: Any, application_name: str) -> int:
    with admin.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
            [application_name],
        )
        return int(cursor.fetchone()[0])


def measure(
    server: AppServer, cell: Cell, round_number: int, config: BenchConfig, admin: Any
) -> Measurement:
    method, template, _ = WORKLOADS[cell.workload]
    stop_at = time.monotonic() + config.warmup + config.duration
    measure_from = stop_at - config.duration
    latencies: list[list[float]] = [[] for _ in range(cell.threads)]
    failures = [0] * cell.threads
    peak = 0
    start_gate = threading.Barrier(cell.threads + 1)

    def client_thread(index: int) -> None:
        rng = random.Random(index * 7919 + round_number)
        client = HttpClient(server.port)
        start_gate.wait()
        mine = latencies[index]
        while True:
            started = time.perf_counter()
            if time.monotonic() >= stop_at:
                break
            path = template.format(pk=rng.randint(1, BOOKS))
            try:
                status, _ = client.request(method, path)
                ok = status == 200
            except OSError:
                ok = False
                client.close()
                client = HttpClient(server.port)
            if time.monotonic() >= measure_from:
                if ok:
                    mine.append(time.perf_counter() - started)
                else:
                    failures[index] += 1
        client.close()

    threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(cell.threads)]
    for thread in threads:
        thread.start()
    start_gate.wait()
    began = time.monotonic()
    while any(thread.is_alive() for thread in threads):
        if time.monotonic() >= began + config.warmup:
            peak = max(peak, count_connections(admin, server.application_name))
        time.sleep(0.02)
    for thread in threads:
        thread.join()
    all_latencies = sorted(latency for per_thread in latencies for latency in per_thread)
    done = len(all_latencies)
    return Measurement(
        strategy=server.strategy.name,
        workload=cell.workload,
        threads=cell.threads,
        round=round_number,
        requests=done,
        failed=sum(failures),
        seconds=config.duration,
        requests_per_second=done / config.duration,
        p50_ms=percentile(all_latencies, 0.50) * 1000,
        p99_ms=percentile(all_latencies, 0.99) * 1000,
        peak_server_connections=peak,
    )


def percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, round(fraction * (len(sorted_values) - 1)))
    return sorted_values[index]


# ---------------------------------------------------------------------- micro-benchmark


def checkout_micro_benchmark(server: ServerSettings) -> dict[str, float]:
    """Uncontended checkout + return, in µs (best of 5 runs of 100 000)."""
    import psycopg2.pool

    from django_pgpool.config import PoolConfig
    from django_pgpool.pool import ConnectionPool

    kwargs = server.connect_kwargs(dbname=BENCH_DATABASE)

    def best(get: Any, put: Any) -> float:
        put(get())
        runs = []
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(100_000):
                put(get())
            runs.append((time.perf_counter() - started) / 100_000 * 1e6)
        return min(runs)

    results = {}
    ours = ConnectionPool(PoolConfig(name="micro", min_size=1, max_size=4), kwargs)
    results["django_pgpool"] = best(ours.getconn, ours.putconn)
    ours.close()
    plain = psycopg2.pool.ThreadedConnectionPool(1, 4, **kwargs)
    results["psycopg2 ThreadedConnectionPool"] = best(plain.getconn, plain.putconn)
    plain.closeall()
    if find_spec("psycopg_pool") and find_spec("psycopg"):
        code = (
            "import time, psycopg_pool, json, sys\n"
            "p = psycopg_pool.ConnectionPool(kwargs=json.loads(sys.argv[1]), min_size=1, "
            "max_size=4, open=True)\n"
            "p.putconn(p.getconn()); runs = []\n"
            "for _ in range(5):\n"
            "    t = time.perf_counter()\n"
            "    for _ in range(100000): p.putconn(p.getconn())\n"
            "    runs.append((time.perf_counter() - t) / 100000 * 1e6)\n"
            "p.close(); print(min(runs))\n"
        )
        native = subprocess.run(
            [sys.executable, "-c", code, json.dumps(kwargs)], capture_output=True, text=True
        )
        if native.returncode == 0:
            results["psycopg_pool"] = float(native.stdout.strip())
    return results


# ---------------------------------------------------------------------- report


def medians(measurements: list[Measurement]) -> dict[tuple[str, str, int], dict[str, float]]:
    groups: dict[tuple[str, str, int], list[Measurement]] = {}
    for m in measurements:
        groups.setdefault((m.strategy, m.workload, m.threads), []).append(m)
    return {
        key: {
            "requests_per_second": statistics.median(m.requests_per_second for m in group),
            "p50_ms": statistics.median(m.p50_ms for m in group),
            "p99_ms": statistics.median(m.p99_ms for m in group),
            "failed": sum(m.failed for m in group),
            "peak_server_connections": max(m.peak_server_connections for m in group),
        }
        for key, group in groups.items()
    }


def report(result: dict[str, Any], config: BenchConfig) -> str:
    table = result["medians"]
    lines = [
        "| workload | threads | strategy | req/s | p50 ms | p99 ms | failed | peak conns "
        "| × persistent | × default |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    cells = sorted(
        {(r["workload"], r["threads"]) for r in table},
        key=lambda c: (c[1] == OVERLOAD_THREADS, c[0] != "read", c[1]),
    )
    for workload, threads in cells:
        rows = {
            r["strategy"]: r for r in table if (r["workload"], r["threads"]) == (workload, threads)
        }
        persistent = rows.get("persistent", {}).get("requests_per_second")
        default = rows.get("default", {}).get("requests_per_second")
        for name in config.strategies:
            row = rows.get(name)
            if row is None:
                continue
            rps = row["requests_per_second"]
            vs_persistent = f"{rps / persistent:.2f}" if persistent else "–"
            vs_default = f"{rps / default:.2f}" if default else "–"
            label = f"{workload}" + (" (overload)" if threads == OVERLOAD_THREADS else "")
            lines.append(
                f"| {label} | {threads} | {name} | {rps:.0f} | {row['p50_ms']:.2f} | "
                f"{row['p99_ms']:.2f} | {row['failed']} | {row['peak_server_connections']} | "
                f"{vs_persistent} | {vs_default} |"
            )
    return "\n".join(lines)


def target_summary(result: dict[str, Any]) -> list[str]:
    """The issue's targets, measured (never asserted)."""
    rows = {(r["strategy"], r["workload"], r["threads"]): r for r in result["medians"]}
    lines = []

    def rps(strategy: str, workload: str, threads: int) -> float | None:
        row = rows.get((strategy, workload, threads))
        return row["requests_per_second"] if row else None

    ratios = []
    for workload in WORKLOADS:
        for threads in result["config"]["threads"]:
            ours, ceiling = rps("pgpool", workload, threads), rps("persistent", workload, threads)
            if ours and ceiling:
                ratios.append((workload, threads, ours / ceiling))
    if ratios:
        average = statistics.mean(r for _, _, r in ratios)
        worst = min(ratios, key=lambda r: r[2])
        lines.append(
            f"django_pgpool vs persistent: {average:.3f} × on average (target ≥ 0.97), worst cell "
            f"{worst[0]}/{worst[1]} threads {worst[2]:.3f} × (target ≥ 0.90)"
        )
    native = []
    for workload in WORKLOADS:
        for threads in result["config"]["threads"]:
            ours, theirs = rps("pgpool", workload, threads), rps("native", workload, threads)
            if ours and theirs:
                native.append((workload, threads, ours / theirs))
    if native:
        lines.append(
            "django_pgpool vs Django's native pool: "
            + ", ".join(f"{w}/{t}: {r:.2f} ×" for w, t, r in native)
            + " (target ≥ 1.15)"
        )
    for threads in result["config"]["threads"]:
        ours, default = rps("pgpool", "read", threads), rps("default", "read", threads)
        if ours and default:
            lines.append(
                f"django_pgpool vs Django's default, read/{threads}: {ours / default:.2f} × "
                f"(target ≥ 5)"
            )
    over = {s: rows.get((s, "read", OVERLOAD_THREADS)) for s in ("pgpool", "native")}
    if over["pgpool"]:
        text = (
            f"overload (64 threads, pool of 8): django_pgpool {over['pgpool']['failed']} failed, "
            f"{over['pgpool']['requests_per_second']:.0f} req/s, p99 "
            f"{over['pgpool']['p99_ms']:.1f} ms"
        )
        if over["native"]:
            text += (
                f"; native pool {over['native']['failed']} failed, "
                f"{over['native']['requests_per_second']:.0f} req/s, p99 "
                f"{over['native']['p99_ms']:.1f} ms"
            )
        lines.append(text)
    micro = result.get("micro_benchmark_us")
    if micro:
        lines.append(
            "uncontended checkout + return: "
            + ", ".join(f"{name} {value:.2f} µs" for name, value in micro.items())
            + " (target for django_pgpool ≤ 3 µs)"
        )
    return lines


def chart(result: dict[str, Any], path: Path, strategies: tuple[str, ...]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = result["medians"]
    cells = sorted(
        {(r["workload"], r["threads"]) for r in table},
        key=lambda c: (c[1] == OVERLOAD_THREADS, c[0] != "read", c[1]),
    )
    present = [s for s in strategies if any(r["strategy"] == s for r in table)]
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(12, 8), sharex=True)
    width = 0.8 / max(1, len(present))
    for index, name in enumerate(present):
        rps, p99 = [], []
        for workload, threads in cells:
            row = next(
                (
                    r
                    for r in table
                    if (r["strategy"], r["workload"], r["threads"]) == (name, workload, threads)
                ),
                None,
            )
            rps.append(row["requests_per_second"] if row else 0)
            p99.append(row["p99_ms"] if row else 0)
        positions = [c + (index - (len(present) - 1) / 2) * width for c in range(len(cells))]
        top.bar(positions, rps, width, label=name)
        bottom.bar(positions, p99, width, label=name)
    labels = [
        f"{w}\n{t} threads" + ("\n(pool 8)" if t == OVERLOAD_THREADS else "") for w, t in cells
    ]
    bottom.set_xticks(range(len(cells)), labels)
    top.set_ylabel("requests / s (median)")
    bottom.set_ylabel("p99 latency, ms (median)")
    bottom.set_yscale("log")
    top.legend(ncol=len(present), fontsize="small")
    top.set_title(result["title"])
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ---------------------------------------------------------------------- main


class Progress:
    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.started = time.monotonic()
        self.interactive = sys.stderr.isatty()

    def step(self, label: str) -> None:
        self.done += 1
        width = 30
        filled = int(width * self.done / self.total)
        elapsed = time.monotonic() - self.started
        eta = elapsed / self.done * (self.total - self.done)
        line = (
            f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
            f"{label:<40} eta {eta:4.0f} s"
        )
        if self.interactive:
            print(f"\r{line}", end="", file=sys.stderr, flush=True)
            if self.done == self.total:
                print(file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)


def run(config: BenchConfig) -> dict[str, Any]:
    config.out.mkdir(parents=True, exist_ok=True)
    strategies = [STRATEGIES[name] for name in config.strategies]
    notes = []
    if "native" in config.strategies and not (find_spec("psycopg") and find_spec("psycopg_pool")):
        strategies = [s for s in strategies if s.name != "native"]
        notes.append(
            "native: skipped, psycopg 3 and psycopg_pool are not installed "
            "(pip install -e '.[bench]')"
        )
    server, cluster = choose_server()
    try:
        auth = authentication_used(server)
        env = base_env(server)
        prepare_database(server, env)
        admin = server.connect(dbname="postgres", application_name="bench-monitor")
        admin.autocommit = True
        cells = [Cell(workload, threads) for threads in config.threads for workload in WORKLOADS]
        if config.overload:
            cells.append(Cell("read", OVERLOAD_THREADS, overload=True))
        groups: dict[tuple[int, bool], list[Cell]] = {}
        for cell in cells:
            groups.setdefault((cell.threads, cell.overload), []).append(cell)
        progress = Progress(len(cells) * len(strategies) * config.rounds)
        measurements: list[Measurement] = []
        for (threads, overload), group in groups.items():
            servers = [AppServer(s, threads, overload, env, config.out) for s in strategies]
            try:
                for app in servers:
                    app.start()
                for round_number in range(config.rounds):
                    for cell in group:
                        # Rotate the order every round, so no strategy always goes first.
                        shift = round_number % len(servers)
                        for app in servers[shift:] + servers[:shift]:
                            measurements.append(measure(app, cell, round_number, config, admin))
                            progress.step(f"{cell.key} {app.strategy.name}")
            finally:
                for app in servers:
                    app.stop()
        admin.close()
        micro = checkout_micro_benchmark(server) if config.micro else {}
        result = {
            "title": "django_pgpool benchmark: testproject views under gunicorn gthread",
            "machine": machine_description(),
            "postgresql": server_version(server),
            "server": server.describe(),
            "authentication": auth,
            "config": {
                "rounds": config.rounds,
                "duration_s": config.duration,
                "warmup_s": config.warmup,
                "threads": list(config.threads),
                "overload_threads": OVERLOAD_THREADS,
                "overload_pool": OVERLOAD_POOL,
                "books": BOOKS,
            },
            "strategies": {s.name: s.label for s in strategies},
            "notes": notes,
            "measurements": [asdict(m) for m in measurements],
            "medians": [
                {"strategy": k[0], "workload": k[1], "threads": k[2], **v}
                for k, v in medians(measurements).items()
            ],
            "micro_benchmark_us": micro,
        }
        result["targets"] = target_summary(result)
        return result
    finally:
        if cluster is not None:
            cluster.destroy()
        else:
            with contextlib.suppress(psycopg2.Error):
                drop_database(server)


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = ""
    with contextlib.suppress(OSError, ValueError):
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f", {kb / 1024 / 1024:.0f} GiB"
    return (
        f"{os.cpu_count()} CPUs ({cpu}){memory}, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}"
    )


def server_version(server: ServerSettings) -> str:
    conn = server.connect()
    with conn.cursor() as cursor:
        cursor.execute("SHOW server_version")
        version = str(cursor.fetchone()[0])
    conn.close()
    return version


@contextlib.contextmanager
def timed(label: str) -> Iterator[None]:
    started = time.monotonic()
    yield
    print(f"{label} in {time.monotonic() - started:.0f} s", file=sys.stderr)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m testproject bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds measured per run")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
    parser.add_argument("--threads", default="1,8,32", help="client/server thread counts")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--no-overload", action="store_true", help="skip 64 threads vs pool of 8")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a quick run that exercises everything (numbers mean nothing)",
    )
    args = parser.parse_args(argv)
    config = BenchConfig(
        rounds=args.rounds,
        duration=args.duration,
        warmup=args.warmup,
        threads=tuple(int(t) for t in args.threads.split(",")),
        strategies=tuple(args.strategies.split(",")),
        overload=not args.no_overload,
        out=args.out,
    )
    if args.smoke:
        config.rounds, config.duration, config.warmup = 1, 0.5, 0.2
        config.threads, config.micro = (1, 8), False
    unknown = set(config.strategies) - set(STRATEGIES)
    if unknown:
        parser.error(f"unknown strategies: {', '.join(sorted(unknown))}")
    with timed("benchmark finished"):
        result = run(config)
    (config.out / "results.json").write_text(json.dumps(result, indent=2))
    table = report(result, config)
    (config.out / "results.md").write_text(table + "\n")
    chart(result, config.out / "results.png", config.strategies)
    print(f"\n{result['title']}")
    print(f"machine: {result['machine']}")
    print(
        f"PostgreSQL {result['postgresql']}: {result['server']}, authentication: "
        f"{result['authentication']}"
    )
    print(
        f"{config.rounds} rounds × {config.duration:g} s per strategy and cell (after "
        f"{config.warmup:g} s warm-up); medians\n"
    )
    print(table)
    for note in result["notes"]:
        print(f"\nnote: {note}")
    print("\nagainst the targets:")
    for line in result["targets"]:
        print(f"  {line}")
    print(f"\nraw results: {config.out / 'results.json'}, chart: {config.out / 'results.png'}")
    failed = sum(row["failed"] for row in result["medians"] if row["strategy"].startswith("pgpool"))
    return 1 if failed else 0
