"""``manage.py pgpool --watch``: the pools of this process, and the server's view
of them, refreshed every interval like ``top``.

Per alias, over the last interval: connections in use, idle and waiting (now),
requests and resets per second, and the median and 99th percentile of the
time a checkout took (from the acquire-time histogram, interpolated within its
bucket as Prometheus' ``histogram_quantile()`` does). With ``--server``, the
server's own count of the connections to each database, from
``pg_stat_activity``, grouped by ``application_name`` (tag each process's
connections with ``OPTIONS["application_name"] = "shop-web-{pid}"`` to see
them per worker process).

No Django here: the command gives the pools and a cursor.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .counters import Reading, read

if TYPE_CHECKING:
    from .pool import ConnectionPool

#: The server's connections to one database, by ``application_name``.
SERVER_SQL = """
SELECT coalesce(nullif(application_name, ''), '(none)'),
       count(*) FILTER (WHERE state = 'active'),
       count(*) FILTER (WHERE state = 'idle'),
       count(*) FILTER (WHERE state LIKE 'idle in transaction%%'),
       count(*)
FROM pg_stat_activity
WHERE datname = %s AND backend_type = 'client backend' AND pid <> pg_backend_pid()
GROUP BY 1
ORDER BY 1
"""

POOL_COLUMNS = (
    "alias",
    "in use",
    "idle",
    "waiting",
    "requests/s",
    "resets/s",
    "acquire p50",
    "acquire p99",
)
SERVER_COLUMNS = ("application_name", "active", "idle", "idle in transaction", "total")


@dataclass
class Snapshot:
    """Every pool's numbers at one moment."""

    at: float
    #: alias -> (the pool's id, what it counted): a pool rebuilt since counts from zero.
    pools: dict[str, tuple[int, Reading]] = field(default_factory=dict)


def take(pools: Mapping[str, ConnectionPool]) -> Snapshot:
    return Snapshot(
        time.monotonic(), {alias: (id(pool), read(pool)) for alias, pool in pools.items()}
    )


def _milliseconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.3f} ms"


def _per_second(reading: Reading, previous: Reading | None, name: str, elapsed: float) -> str:
    then = previous.values.get(name, 0) if previous is not None else 0
    return f"{(reading.values.get(name, 0) - then) / elapsed:.1f}"


def pool_rows(before: Snapshot, after: Snapshot, aliases: Sequence[str]) -> list[list[str]]:
    """One row per alias over the interval between two snapshots ("-" for a pool not built)."""
    elapsed = max(after.at - before.at, 1e-9)
    rows = []
    for alias in aliases:
        current = after.pools.get(alias)
        if current is None:
            rows.append([alias, *["-"] * (len(POOL_COLUMNS) - 1)])
            continue
        pool_id, reading = current
        earlier = before.pools.get(alias)
        previous = earlier[1] if earlier is not None and earlier[0] == pool_id else None

        def per_second(
            name: str, reading: Reading = reading, previous: Reading | None = previous
        ) -> str:
            then = previous.values.get(name, 0) if previous is not None else 0
            return f"{(reading.values.get(name, 0) - then) / elapsed:.1f}"

        p50 = p99 = None
        if reading.timings is not None:
            then_timings = previous.timings if previous is not None else None
            acquired = reading.timings.acquire.since(
                then_timings.acquire if then_timings is not None else None
            )
            p50, p99 = acquired.quantile(0.5), acquired.quantile(0.99)
        gauges = reading.gauges
        rows.append(
            [
                alias,
                str(gauges["pool_in_use"]),
                str(gauges["pool_available"]),
                str(gauges["requests_waiting"]),
                _per_second(reading, previous, "requests_num", elapsed),
                _per_second(reading, previous, "resets_num", elapsed),
                _milliseconds(p50),
                _milliseconds(p99),
            ]
        )
    return rows


def server_rows(cursor: Any, database: str) -> list[list[str]]:
    """The server's connections to ``database`` by application_name (the watcher's own left out)."""
    cursor.execute(SERVER_SQL, [database])
    return [[str(cell) for cell in row] for row in cursor.fetchall()]


def table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Aligned text lines: the header, then the rows."""
    everything = [list(columns), *[list(row) for row in rows]]
    widths = [max(len(row[i]) for row in everything) for i in range(len(columns))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in everything
    ]
