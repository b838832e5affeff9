"""``manage.py pgpool size``: the server connections a deployment may open.

Directly, and through PgBouncer in transaction pooling (one on each machine,
or one for all), for every combination of machines, processes and
``max_size`` given, against the server's ``max_connections`` (read through
the alias's pool, given on the command line, or PostgreSQL's defaults when
the server can't be reached: the report then says so). The arithmetic is
:mod:`django_pgpool.capacity`'s.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import psycopg2
from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import CommandError
from django.db import Error as DjangoDatabaseError
from django.db import connections

from django_pgpool import capacity
from django_pgpool.management import common


def report(stdout: Any, options: dict[str, Any]) -> None:
    """The ``size`` action: the table (or ``--json``) for ``options``."""
    alias = options["database"] or "default"
    common.pooled_aliases(alias)
    machines = common.whole_numbers("--machines", options["machines"])
    if options["processes"] is None:
        processes = [common.expected_processes()]
    else:
        processes = common.whole_numbers("--processes", options["processes"])
    for name in ("pgbouncer_pool_size", "max_client_conn"):
        if options[name] < 1:
            flag = "--" + name.replace("_", "-")
            raise CommandError(f"{flag} must be a whole number >= 1, not {options[name]}.")
    try:
        own = capacity.demand(alias, 1).max_sizes
    except ImproperlyConfigured as exc:
        raise CommandError(str(exc)) from None
    if options["max_size"] is None:
        max_sizes = [own[alias]]
    else:
        max_sizes = common.whole_numbers("--max-size", options["max_size"])
    limits, source, error = _limits(alias, options)
    deployments = [
        capacity.Deployment(machines=n, processes=p, max_sizes={**own, alias: m})
        for n, p, m in itertools.product(machines, processes, max_sizes)
    ]
    pool_size = options["pgbouncer_pool_size"]
    rows = [
        {
            "machines": d.machines,
            "processes": d.processes,
            "max_size": d.max_sizes[alias],
            "direct": d.direct,
            "per_machine": d.server_connections_per_machine(pool_size),
            "per_machine_clients": d.clients_per_machine,
            "central": d.server_connections_central(pool_size),
            "central_clients": d.direct,
        }
        for d in deployments
    ]
    if options["json"]:
        report: dict[str, Any] = {
            "alias": alias,
            "other_aliases": {name: size for name, size in own.items() if name != alias},
            "limits": source,
            "max_connections": limits.max_connections,
            "reserved": limits.max_connections - limits.available,
            "available": limits.available,
            "pgbouncer_pool_size": pool_size,
            "max_client_conn": options["max_client_conn"],
            "rows": rows,
        }
        if error:
            report["error"] = error
        stdout.write(json.dumps(report, indent=2))
        return
    _write(stdout, alias, own, max_sizes, limits, source, error, rows, options)


def _limits(alias: str, options: dict[str, Any]) -> tuple[capacity.ServerLimits, str, str]:
    """The server's limits, where they come from ('given', 'server' or 'assumed'), and
    why they had to be assumed."""
    given_max, given_reserved = options["max_connections"], options["reserved"]
    if given_max is not None or given_reserved is not None:
        limits = capacity.assumed_limits(
            capacity.DEFAULT_MAX_CONNECTIONS if given_max is None else given_max,
            capacity.DEFAULT_SUPERUSER_RESERVED_CONNECTIONS
            if given_reserved is None
            else given_reserved,
        )
        if limits.superuser_reserved_connections < 0 or limits.available < 1:
            raise CommandError(
                f"--max-connections {limits.max_connections} and --reserved "
                f"{limits.superuser_reserved_connections} leave no connection to the "
                f"application: give max_connections above the reserved connections (>= 0)."
            )
        return limits, "given", ""
    try:
        return common.read_limits(alias, options["timeout"]), "server", ""
    except (psycopg2.Error, DjangoDatabaseError) as exc:
        database = capacity.describe_database(connections[alias].settings_dict)
        error = f"alias {alias!r} cannot reach its database {database}: {common.first_line(exc)}"
        return capacity.assumed_limits(), "assumed", error


def _write(
    stdout: Any,
    alias: str,
    own: dict[str, int],
    max_sizes: list[int],
    limits: capacity.ServerLimits,
    source: str,
    error: str,
    rows: list[dict[str, Any]],
    options: dict[str, Any],
) -> None:
    others = {name: size for name, size in own.items() if name != alias}
    available = limits.available
    reserved = limits.max_connections - available
    line = f"Each process pools alias {alias!r} (max_size {', '.join(map(str, max_sizes))})"
    if others:
        line += " and, on the same server, " + ", ".join(
            f"{name!r} (max_size {size})" for name, size in others.items()
        )
    lines = [line + "."]
    limits_line = (
        f"PostgreSQL takes {available} connections from the application "
        f"(max_connections {limits.max_connections} - {reserved} reserved)"
    )
    if source == "server":
        lines.append(f"{limits_line}, read from the server (PostgreSQL {limits.server_version}).")
    elif source == "given":
        lines.append(f"{limits_line}, as given.")
    else:
        lines += [
            f"{limits_line}: ASSUMED, PostgreSQL's defaults. Give --max-connections and "
            f"--reserved for the real server's.",
            f"(The server could not be asked: {error}.)",
        ]
    max_client_conn = options["max_client_conn"]
    lines += [
        f"PgBouncer: transaction pooling, default_pool_size "
        f"{options['pgbouncer_pool_size']}, max_client_conn {max_client_conn}. "
        "'!' marks what does not fit.",
        "",
        "| machines | processes each | max_size | direct | PgBouncer on each machine "
        "(its clients) | one PgBouncer (its clients) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]

    def server(value: int) -> str:
        return f"{value}" if value <= available else f"{value} !"

    def clients(value: int) -> str:
        return f"{value}" if value <= max_client_conn else f"{value} !"

    for row in rows:
        lines.append(
            f"| {row['machines']} | {row['processes']} | {row['max_size']} "
            f"| {server(row['direct'])} "
            f"| {server(row['per_machine'])} ({clients(row['per_machine_clients'])}) "
            f"| {server(row['central'])} ({clients(row['central_clients'])}) |"
        )
    lines.append("")
    for max_size in max_sizes:
        per_process = max_size + sum(others.values())
        what = f"max_size {max_size}" + "".join(
            f" + {size} for {name!r}" for name, size in others.items()
        )
        lines.append(
            f"Directly on PostgreSQL with {what}: at most {available // per_process} "
            f"processes, all machines together."
        )
    stdout.write("\n".join(lines))
