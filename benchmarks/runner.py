"""The benchmark: django_pgpool against the other ways a Django site gets its connections.

Two modes, each serving the testproject's real views through Django's
request cycle, so connections are taken and given back by
``request_started`` / ``request_finished`` exactly as in production:

- ``http``: each strategy served by its own gunicorn process (one worker,
  ``gthread``, as many threads as clients), loaded by keep-alive HTTP clients
  in this process over loopback;
- ``inprocess``: each strategy in a process of its own whose threads call
  Django's WSGI handler directly (no HTTP parsing); the pools are as big as
  the threads (``min_size = max_size``).

The strategies are interleaved in rounds, in a new order every round;
medians are reported, with the peak of each strategy's server connections.

Strategies:

- ``default``: Django's backend, ``CONN_MAX_AGE=0`` (a new connection per request);
- ``persistent``: Django's backend, ``CONN_MAX_AGE=None`` (one connection per
  thread, kept: the ceiling, with an unbounded connection count);
- ``pgpool``: django_pgpool with its defaults;
- ``pgpool-noreset``: django_pgpool with ``reset: False`` (the session reset's cost);
- ``native``: Django's built-in psycopg 3 pool, when psycopg 3 and psycopg_pool
  are installed.

All but ``native`` run on psycopg2. The server is the one ``DATABASE_URL`` or
``PG*`` names, else a throwaway cluster with password authentication over
TCP; the run creates a database of its own and drops it at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any

from testsupport import REPO

from . import report
from .load import (
    ASGI_CLIENTS,
    ASGI_OVERLOAD_POOL,
    BOOKS,
    OVERLOAD_POOL,
    OVERLOAD_THREADS,
    WORKLOADS,
    Cell,
)
from .strategies import STRATEGIES, Strategy
from .targets import TARGETS, Target

if TYPE_CHECKING:
    from .database import Monitor

MODES = tuple(report.MODES)


@dataclass
class BenchConfig:
    rounds: int = 3
    duration: float = 3.0
    warmup: float = 1.0
    threads: tuple[int, ...] = (1, 8, 32)
    strategies: tuple[str, ...] = tuple(STRATEGIES)
    modes: tuple[str, ...] = MODES
    overload: bool = True
    micro: bool = True
    out: Path = field(default_factory=lambda: REPO / "bench-results")

    def cells(self, mode: str = "http") -> list[Cell]:
        workloads = [w.name for w in WORKLOADS.values() if mode in w.modes]
        if mode == "asgi":
            cells = [Cell(workload, ASGI_CLIENTS) for workload in workloads]
            if self.overload:
                cells.append(Cell("async-executor", OVERLOAD_THREADS, overload=True))
            return cells
        cells = [Cell(workload, threads) for threads in self.threads for workload in workloads]
        if self.overload:
            cells.append(Cell("read", OVERLOAD_THREADS, overload=True))
        return cells


def pool_options(mode: str, cell: Cell) -> dict[str, Any]:
    """What each mode changes in the pooled strategies' ``OPTIONS["pool"]``."""
    if mode == "asgi":
        # Fewer connections than the event loop's executor threads: where
        # connections kept by executor threads run the pool dry.
        return {"max_size": ASGI_OVERLOAD_POOL, "timeout": 5} if cell.overload else {}
    # The overload cell: a pool of 8 for 64 threads, and a timeout longer than the run.
    overload = {"max_size": OVERLOAD_POOL, "timeout": 600} if cell.overload else {}
    if mode == "inprocess":
        size = OVERLOAD_POOL if cell.overload else cell.threads
        return {**overload, "min_size": size, "max_size": size}
    return overload


def measure(
    target: Target, cell: Cell, round_number: int, config: BenchConfig, monitor: Monitor
) -> report.Measurement:
    """One strategy on one cell: the load, and the peak of its server connections
    after the warm-up."""
    target.begin(cell, round_number, config.warmup, config.duration)
    began = time.monotonic()
    peak = 0
    while not target.finished():
        if time.monotonic() >= began + config.warmup:
            peak = max(peak, monitor.connections(target.application_name))
        time.sleep(0.02)
    result = target.result()
    return report.Measurement(
        mode=target.mode,
        strategy=target.strategy.name,
        workload=cell.workload,
        threads=cell.threads,
        round=round_number,
        requests=len(result.latencies),
        failed=result.failed,
        seconds=config.duration,
        requests_per_second=len(result.latencies) / config.duration,
        p50_ms=result.percentile(0.50) * 1000,
        p99_ms=result.percentile(0.99) * 1000,
        peak_server_connections=peak,
    )


def measure_mode(
    mode: str,
    strategies: list[Strategy],
    config: BenchConfig,
    env: dict[str, str],
    monitor: Monitor,
    progress: Progress,
) -> Iterator[report.Measurement]:
    """Every cell of one mode: the strategies' processes side by side for each
    concurrency, measured in turn, in a new order every round."""
    if mode == "asgi":
        strategies = [s for s in strategies if s.under_asgi]
    groups: dict[tuple[int, bool], list[Cell]] = {}
    for cell in config.cells(mode):
        groups.setdefault((cell.threads, cell.overload), []).append(cell)
    for group in groups.values():
        options = pool_options(mode, group[0])
        targets = [
            TARGETS[mode](strategy, group[0].threads, options, env, config.out)
            for strategy in strategies
        ]
        try:
            for target in targets:
                target.start()
            for round_number in range(config.rounds):
                for cell in group:
                    shift = round_number % len(targets)
                    for target in targets[shift:] + targets[:shift]:
                        yield measure(target, cell, round_number, config, monitor)
                        progress.step(f"{mode} {cell.key} {target.strategy.name}")
        finally:
            for target in targets:
                target.stop()


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
            f"{label:<48} eta {eta:4.0f} s"
        )
        if self.interactive:
            print(f"\r{line}", end="", file=sys.stderr, flush=True)
            if self.done == self.total:
                print(file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)


def missing_servers(modes: tuple[str, ...]) -> list[tuple[str, str]]:
    """(mode, module) for each mode whose server is not importable here."""
    return [
        (mode, TARGETS[mode].server_module)
        for mode in modes
        if find_spec(TARGETS[mode].server_module) is None
    ]


def run(config: BenchConfig) -> dict[str, Any]:
    # psycopg2 and the server launcher only now: --help needs neither.
    import psycopg2

    from . import checkout, database

    config.out.mkdir(parents=True, exist_ok=True)
    strategies = [STRATEGIES[name] for name in config.strategies]
    notes = []
    if "native" in config.strategies and not (find_spec("psycopg") and find_spec("psycopg_pool")):
        strategies = [s for s in strategies if s.name != "native"]
        notes.append(
            "native: skipped, psycopg 3 and psycopg_pool are not installed "
            "(pip install -e '.[bench]')"
        )
    lacking = missing_servers(config.modes)
    if lacking:
        # Found now, not after the modes before it have run for many minutes.
        raise SystemExit(
            "the benchmark needs "
            + ", ".join(f"{module} (for the {mode} mode)" for mode, module in lacking)
            + f", not installed in {sys.prefix}: pip install -e '.[bench]', "
            "or leave the mode out with --mode"
        )
    server, cluster = database.choose_server()
    try:
        auth = database.authentication_used(server)
        env = database.project_env(server)
        database.create_database(server, env)
        monitor = database.Monitor(server)
        progress = Progress(
            sum(
                len(config.cells(mode))
                * len([s for s in strategies if mode != "asgi" or s.under_asgi])
                for mode in config.modes
            )
            * config.rounds
        )
        measurements: list[report.Measurement] = []
        try:
            for mode in config.modes:
                measurements += measure_mode(mode, strategies, config, env, monitor, progress)
        finally:
            monitor.close()
        micro = (
            checkout.measure(server.connect_kwargs(dbname=database.BENCH_DATABASE))
            if config.micro
            else {}
        )
        result: dict[str, Any] = {
            "title": "django_pgpool benchmark: the testproject's views",
            "machine": report.machine_description(),
            "postgresql": database.server_version(server),
            "server": server.describe(),
            "authentication": auth,
            "config": {
                "modes": list(config.modes),
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
            "medians": report.medians(measurements),
            "micro_benchmark_us": micro,
        }
        result["targets"] = report.target_summary(result)
        return result
    finally:
        if cluster is not None:
            cluster.destroy()
        else:
            with contextlib.suppress(psycopg2.Error):
                database.drop_database(server)


@contextlib.contextmanager
def timed(label: str) -> Iterator[None]:
    started = time.monotonic()
    yield
    print(f"{label} in {time.monotonic() - started:.0f} s", file=sys.stderr)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python3 -m testproject bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rounds", type=int, help="default: 3")
    parser.add_argument("--duration", type=float, help="seconds measured per run (default: 3)")
    parser.add_argument("--warmup", type=float, help="seconds before measuring (default: 1)")
    parser.add_argument("--threads", help="client/server thread counts (default: 1,8,32)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument(
        "--mode",
        choices=(*MODES, "both", "all"),
        default="all",
        help="http (gunicorn), inprocess (threads calling Django's WSGI handler), asgi "
        "(uvicorn, async views), both (http and inprocess) or all (default)",
    )
    parser.add_argument(
        "--no-overload",
        action="store_true",
        help=f"skip {OVERLOAD_THREADS} threads on a pool of {OVERLOAD_POOL}",
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench-results")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a quick run that exercises everything (numbers mean nothing): 1 round of "
        "0.5 s after 0.2 s, 1 and 8 threads, no micro-benchmark, unless given otherwise",
    )
    return parser


#: What --smoke changes, unless given on the command line.
SMOKE = {"rounds": 1, "duration": 0.5, "warmup": 0.2, "threads": "1,8"}


def main(argv: list[str]) -> int:
    command_line = parser()
    args = command_line.parse_args(argv)
    defaults = BenchConfig()
    if args.smoke:
        for name, value in SMOKE.items():
            if getattr(args, name) is None:
                setattr(args, name, value)
    config = BenchConfig(
        rounds=defaults.rounds if args.rounds is None else args.rounds,
        duration=defaults.duration if args.duration is None else args.duration,
        warmup=defaults.warmup if args.warmup is None else args.warmup,
        threads=(
            defaults.threads
            if args.threads is None
            else tuple(int(t) for t in args.threads.split(","))
        ),
        strategies=tuple(args.strategies.split(",")),
        modes=(
            MODES
            if args.mode == "all"
            else ("http", "inprocess")
            if args.mode == "both"
            else (args.mode,)
        ),
        overload=not args.no_overload,
        micro=not args.smoke,
        out=args.out,
    )
    unknown = set(config.strategies) - set(STRATEGIES)
    if unknown:
        command_line.error(f"unknown strategies: {', '.join(sorted(unknown))}")
    with timed("benchmark finished"):
        result = run(config)
    (config.out / "results.json").write_text(json.dumps(result, indent=2))
    tables = report.markdown(result, config.strategies)
    (config.out / "results.md").write_text(tables + "\n")
    from . import chart

    chart.draw(result, config.out / "results.png", config.strategies)
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
    print(tables)
    for note in result["notes"]:
        print(f"\nnote: {note}")
    print("\nagainst the targets:")
    for line in result["targets"]:
        print(f"  {line}")
    print(f"\nraw results: {config.out / 'results.json'}, chart: {config.out / 'results.png'}")
    failed = sum(row["failed"] for row in result["medians"] if _must_not_fail(row))
    return 1 if failed else 0


def _must_not_fail(row: dict[str, Any]) -> bool:
    """Whether a failure in this row is django_pgpool's (the exit status says so).

    Under ASGI, the overload cell's pool is smaller than the event loop's
    executor: in the request mode, executor threads keep their connections and
    the rest wait out the timeout. That cell is there to show it.
    """
    if not row["strategy"].startswith("pgpool"):
        return False
    starved = row["mode"] == "asgi" and row["threads"] == OVERLOAD_THREADS
    return not starved or row["strategy"] == "pgpool-transaction"
