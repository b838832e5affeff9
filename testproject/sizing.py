"""How many PostgreSQL connections a deployment needs, with and without PgBouncer.

    python -m testproject.sizing
    python -m testproject.sizing --machines 1,2,4 --processes 4,8 --max-size 5,10 \\
        --max-connections 200 --pgbouncer-pool-size 20
    python -m testproject.sizing --server        # max_connections of the testproject's server

Every process (gunicorn or uWSGI worker, Celery worker process, ASGI server)
has its own pool for each alias, so directly on PostgreSQL a deployment may
open machines x processes x max_size x aliases server connections. PostgreSQL
accepts max_connections of them, less superuser_reserved_connections (and,
from version 16, reserved_connections), the same arithmetic as ``manage.py
pgpool check``. With PgBouncer in transaction pooling, the pools connect to
PgBouncer instead, and PostgreSQL sees only PgBouncer's server connections:
up to default_pool_size for each PgBouncer (per database and user). In session
pooling every pooled connection keeps a server connection, as if direct.
See docs/sizing.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Row:
    machines: int
    processes: int  # per machine
    max_size: int
    #: Server connections PostgreSQL may see without PgBouncer (or in session pooling).
    direct: int
    #: With a PgBouncer on each machine, in transaction pooling: server
    #: connections, and the client connections each PgBouncer accepts.
    per_machine: int
    per_machine_clients: int
    #: With one PgBouncer for all machines, in transaction pooling.
    central: int
    central_clients: int


def size(
    *,
    machines: list[int],
    processes: list[int],
    max_sizes: list[int],
    aliases: int,
    pgbouncer_pool_size: int,
) -> list[Row]:
    rows = []
    for n, p, m in itertools.product(machines, processes, max_sizes):
        clients = n * p * m * aliases
        # PgBouncer opens server connections as transactions need them, up to
        # default_pool_size per database and user (one per alias here).
        per_machine_clients = p * m * aliases
        rows.append(
            Row(
                machines=n,
                processes=p,
                max_size=m,
                direct=clients,
                per_machine=n * min(per_machine_clients, pgbouncer_pool_size * aliases),
                per_machine_clients=per_machine_clients,
                central=min(clients, pgbouncer_pool_size * aliases),
                central_clients=clients,
            )
        )
    return rows


def table(rows: list[Row], available: int, args: argparse.Namespace) -> str:
    lines = [
        f"PostgreSQL takes {available} application connections (max_connections "
        f"{args.max_connections} - {args.reserved} reserved); {args.aliases} pooled alias(es) "
        f"on this server in each process.",
        f"PgBouncer: transaction pooling, default_pool_size {args.pgbouncer_pool_size}, "
        f"max_client_conn {args.max_client_conn}. '!' marks what does not fit.",
        "",
        "| machines | processes each | max_size | direct | PgBouncer on each machine "
        "(its clients) | one PgBouncer (its clients) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]

    def server(value: int) -> str:
        return f"{value}" if value <= available else f"{value} !"

    def clients(value: int) -> str:
        return f"{value}" if value <= args.max_client_conn else f"{value} !"

    for row in rows:
        lines.append(
            f"| {row.machines} | {row.processes} | {row.max_size} | {server(row.direct)} "
            f"| {server(row.per_machine)} ({clients(row.per_machine_clients)}) "
            f"| {server(row.central)} ({clients(row.central_clients)}) |"
        )
    lines.append("")
    for max_size in args.max_size:
        most = available // (max_size * args.aliases)
        lines.append(
            f"Direct connections with max_size {max_size}: at most {most} processes, "
            f"all machines together."
        )
    return "\n".join(lines)


def server_limits() -> tuple[int, int]:
    """max_connections and the reserved connections of the testproject's server."""
    from testsupport.pgserver import ensure_server

    conn = ensure_server(quiet=True).connect()
    try:
        with conn.cursor() as cursor:
            cursor.execute(
                "SELECT current_setting('max_connections')::int, "
                "current_setting('superuser_reserved_connections')::int "
                "+ coalesce(current_setting('reserved_connections', true)::int, 0)"
            )
            max_connections, reserved = cursor.fetchone()
    finally:
        conn.close()
    return int(max_connections), int(reserved)


def numbers(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give whole numbers >= 1, comma-separated")
    return values


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m testproject.sizing",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--machines", type=numbers, default=[1, 2, 4, 8])
    parser.add_argument("--processes", type=numbers, default=[4, 8], help="per machine")
    parser.add_argument("--max-size", type=numbers, default=[4, 10], help="the pool's max_size")
    parser.add_argument("--aliases", type=int, default=1, help="pooled aliases per server")
    parser.add_argument("--max-connections", type=int, default=100)
    parser.add_argument(
        "--reserved",
        type=int,
        default=3,
        help="superuser_reserved_connections + reserved_connections",
    )
    parser.add_argument(
        "--server", action="store_true", help="read both from the testproject's server"
    )
    parser.add_argument("--pgbouncer-pool-size", type=int, default=20)
    parser.add_argument("--max-client-conn", type=int, default=100, help="PgBouncer's limit")
    parser.add_argument("--json", action="store_true", help="the rows as JSON")
    args = parser.parse_args(argv)
    if args.server:
        args.max_connections, args.reserved = server_limits()
    available = args.max_connections - args.reserved
    rows = size(
        machines=args.machines,
        processes=args.processes,
        max_sizes=args.max_size,
        aliases=args.aliases,
        pgbouncer_pool_size=args.pgbouncer_pool_size,
    )
    if args.json:
        result: dict[str, Any] = {
            "max_connections": args.max_connections,
            "reserved": args.reserved,
            "available": available,
            "max_client_conn": args.max_client_conn,
            "rows": [asdict(row) for row in rows],
        }
        print(json.dumps(result))
    else:
        print(table(rows, available, args))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
