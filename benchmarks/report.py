"""The benchmark's results: measurements, their medians, the Markdown tables and
the targets this project set itself (measured, never asserted)."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .load import ASGI_CLIENTS, ASGI_OVERLOAD_POOL, OVERLOAD_POOL, OVERLOAD_THREADS, WORKLOADS

#: What each mode runs, as the report's headings say it.
MODES = {
    "http": "over HTTP: gunicorn gthread, keep-alive clients",
    "inprocess": "in-process: threads calling Django's WSGI handler, pool size = threads",
    "asgi": (
        "under ASGI: uvicorn, async views, the ORM in the event loop's executor threads, "
        f"{ASGI_CLIENTS} keep-alive clients (overload: {OVERLOAD_THREADS} clients on a pool of "
        f"{ASGI_OVERLOAD_POOL}, fewer connections than executor threads)"
    ),
}


@dataclass
class Measurement:
    mode: str
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


def medians(measurements: Iterable[Measurement]) -> list[dict[str, Any]]:
    """One row per mode, strategy and cell: medians of the rounds (failures summed,
    the highest peak of server connections)."""
    groups: dict[tuple[str, str, str, int], list[Measurement]] = {}
    for m in measurements:
        groups.setdefault((m.mode, m.strategy, m.workload, m.threads), []).append(m)
    return [
        {
            "mode": mode,
            "strategy": strategy,
            "workload": workload,
            "threads": threads,
            "requests_per_second": statistics.median(m.requests_per_second for m in group),
            "p50_ms": statistics.median(m.p50_ms for m in group),
            "p99_ms": statistics.median(m.p99_ms for m in group),
            "failed": sum(m.failed for m in group),
            "peak_server_connections": max(m.peak_server_connections for m in group),
        }
        for (mode, strategy, workload, threads), group in groups.items()
    ]


def cells_in_order(rows: Iterable[dict[str, Any]]) -> list[tuple[str, int]]:
    """(workload, threads) of the rows: reads first, the overload cell last."""
    return sorted(
        {(r["workload"], r["threads"]) for r in rows},
        key=lambda c: (c[1] == OVERLOAD_THREADS, c[0] != "read", c[1]),
    )


def table(rows: list[dict[str, Any]], strategies: Iterable[str]) -> str:
    """One mode's medians as a Markdown table, with each strategy's ratio to the
    persistent, default and native strategies of the same cell."""
    lines = [
        "| workload | threads | strategy | req/s | p50 ms | p99 ms | failed | peak conns "
        "| × persistent | × default | × native |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    order = list(strategies)
    for workload, threads in cells_in_order(rows):
        cell = {
            r["strategy"]: r for r in rows if (r["workload"], r["threads"]) == (workload, threads)
        }

        def ratio(rps: float, other: str, cell: dict[str, Any] = cell) -> str:
            base = cell.get(other, {}).get("requests_per_second")
            return f"{rps / base:.2f}" if base else "–"

        label = workload + (" (overload)" if threads == OVERLOAD_THREADS else "")
        for name in order:
            row = cell.get(name)
            if row is None:
                continue
            rps = row["requests_per_second"]
            lines.append(
                f"| {label} | {threads} | {name} | {rps:.0f} | {row['p50_ms']:.2f} | "
                f"{row['p99_ms']:.2f} | {row['failed']} | {row['peak_server_connections']} | "
                f"{ratio(rps, 'persistent')} | {ratio(rps, 'default')} | {ratio(rps, 'native')} |"
            )
    return "\n".join(lines)


def markdown(result: dict[str, Any], strategies: Iterable[str]) -> str:
    """Every mode's table under a heading of its own."""
    order = list(strategies)
    parts = []
    for mode in result["config"]["modes"]:
        rows = [r for r in result["medians"] if r["mode"] == mode]
        if rows:
            heading = MODES[mode][0].upper() + MODES[mode][1:]
            parts.append(f"### {heading}\n\n{table(rows, order)}")
    return "\n\n".join(parts)


def target_summary(result: dict[str, Any]) -> list[str]:
    """The targets this project set itself, measured in each mode (never asserted)."""
    lines = []
    for mode in result["config"]["modes"]:
        rows = {
            (r["strategy"], r["workload"], r["threads"]): r
            for r in result["medians"]
            if r["mode"] == mode
        }
        if rows:
            lines += [f"{mode}: {line}" for line in _targets(rows, result["config"]["threads"])]
    micro = result.get("micro_benchmark_us")
    if micro:
        lines.append(
            "uncontended checkout + return: "
            + ", ".join(f"{name} {value:.2f} µs" for name, value in micro.items())
            + " (target for django_pgpool ≤ 3 µs)"
        )
    return lines


def _targets(
    rows: dict[tuple[str, str, int], dict[str, Any]], thread_counts: list[int]
) -> list[str]:
    def rps(strategy: str, workload: str, threads: int) -> float | None:
        row = rows.get((strategy, workload, threads))
        return row["requests_per_second"] if row else None

    def ratios(other: str) -> list[tuple[str, int, float]]:
        found = []
        for workload in WORKLOADS:
            for threads in thread_counts:
                ours, theirs = rps("pgpool", workload, threads), rps(other, workload, threads)
                if ours and theirs:
                    found.append((workload, threads, ours / theirs))
        return found

    lines = []
    persistent = ratios("persistent")
    if persistent:
        average = statistics.mean(r for _, _, r in persistent)
        worst = min(persistent, key=lambda r: r[2])
        lines.append(
            f"django_pgpool vs persistent: {average:.3f} × on average (target ≥ 0.97), worst cell "
            f"{worst[0]}/{worst[1]} threads {worst[2]:.3f} × (target ≥ 0.90)"
        )
    native = ratios("native")
    if native:
        lines.append(
            "django_pgpool vs Django's native pool: "
            + ", ".join(f"{w}/{t}: {r:.2f} ×" for w, t, r in native)
            + " (target ≥ 1.15)"
        )
    per_transaction = [
        (workload, threads, rps("pgpool-transaction", workload, threads) or 0.0, ours)
        for (strategy, workload, threads) in rows
        if strategy == "pgpool" and (ours := rps("pgpool", workload, threads))
    ]
    if any(theirs for _, _, theirs, _ in per_transaction):
        lines.append(
            'release="transaction" vs "request": '
            + ", ".join(
                f"{w}/{t}: {theirs / ours:.2f} ×"
                for w, t, theirs, ours in sorted(per_transaction)
                if theirs
            )
            + " (target ≥ 1.00 at 32 threads and overload, ≥ 0.95 elsewhere)"
        )
    for threads in thread_counts:
        ours, default = rps("pgpool", "read", threads), rps("default", "read", threads)
        if ours and default:
            lines.append(
                f"django_pgpool vs Django's default, read/{threads}: {ours / default:.2f} × "
                f"(target ≥ 5)"
            )
    over = {s: rows.get((s, "read", OVERLOAD_THREADS)) for s in ("pgpool", "native")}
    ours_over, native_over = over["pgpool"], over["native"]
    if ours_over:
        text = (
            f"overload ({OVERLOAD_THREADS} threads, pool of {OVERLOAD_POOL}): django_pgpool "
            f"{ours_over['failed']} failed, {ours_over['requests_per_second']:.0f} req/s, p99 "
            f"{ours_over['p99_ms']:.1f} ms"
        )
        if native_over:
            text += (
                f"; native pool {native_over['failed']} failed, "
                f"{native_over['requests_per_second']:.0f} req/s, p99 "
                f"{native_over['p99_ms']:.1f} ms"
            )
        lines.append(text)
    return lines


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
