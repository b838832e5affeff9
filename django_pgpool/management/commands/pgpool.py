"""``manage.py pgpool``: the pools of this process, and whether they fit the server.

``manage.py pgpool [--database ALIAS] [--open] [--json]``
    A table of every django_pgpool alias: its state, sizes and statistics.
    Pools belong to the process that built them, and a management command is
    a process of its own: without ``--open`` it has built none, so each alias
    shows as "not opened yet" with its configured sizes. ``--open`` builds
    each pool and waits for its ``min_size`` connections (a warm-up that
    fails when the database can't be reached, at once when it refuses), then
    shows them ("cannot connect" where that failed).

``manage.py pgpool check [--database ALIAS] [--processes N] [--json]``
    Runs a query through the alias's pool and reports the server's
    ``max_connections``, reserved slots and connections in use, and whether
    ``max_size`` x processes (for every pooled alias on that server) fits.
    N defaults to ``settings.PGPOOL_EXPECTED_PROCESSES`` (1). Exit status: 0
    when it fits, 1 when it doesn't (or the settings are wrong), 2 when the
    database can't be reached.
"""

from __future__ import annotations

import json
import os
import time
from argparse import ArgumentParser
from typing import Any

import psycopg2
from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError
from django.db import Error as DjangoDatabaseError
from django.db import connections

import django_pgpool
from django_pgpool import capacity
from django_pgpool.config import parse_pool_options, pool_is_enabled

#: Exit status when the database can't be reached (1 is a misfit or bad settings).
UNREACHABLE = 2

_COLUMNS = (
    ("alias", None),
    ("state", None),
    ("min", "pool_min"),
    ("max", "pool_max"),
    ("open", "pool_size"),
    ("in use", "pool_in_use"),
    ("idle", "pool_available"),
    ("waiting", "requests_waiting"),
    ("requests", "requests_num"),
    ("timeouts", "requests_timeouts"),
    ("database", None),
)


def _first_line(exc: BaseException) -> str:
    """An error's first line, without a closing period (it goes inside a sentence)."""
    lines = str(exc).strip().splitlines()
    return lines[0].rstrip(".") if lines else type(exc).__name__


class Command(BaseCommand):
    help = (
        "Show this process's django_pgpool pools (--open to build them), or "
        "'check' that an alias's pool reaches its server and fits its max_connections."
    )
    # A diagnostic tool: it must still run when the system checks find errors.
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument(
            "action",
            nargs="?",
            choices=("show", "check"),
            default="show",
            help="'show' (default): the pools of this process; 'check': connect and "
            "compare the pool sizes with the server's max_connections.",
        )
        parser.add_argument(
            "--database",
            metavar="ALIAS",
            help="The alias to show or check (check: 'default' unless given).",
        )
        parser.add_argument(
            "--processes",
            type=int,
            metavar="N",
            help="check: processes that run the project at once "
            f"(default: settings.{capacity.EXPECTED_PROCESSES_SETTING}, else 1).",
        )
        parser.add_argument(
            "--open",
            action="store_true",
            help="show: build each pool and wait for its min_size connections first.",
        )
        parser.add_argument(
            "--timeout",
            type=float,
            default=10.0,
            metavar="SECONDS",
            help="How long to wait for the database (default: 10).",
        )
        parser.add_argument("--json", action="store_true", help="Output JSON.")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["timeout"] <= 0:
            raise CommandError("--timeout must be a number of seconds > 0.")
        if options["action"] == "check":
            self._check(options)
        else:
            self._show(options)

    # ------------------------------------------------------------------ show

    def _pooled_aliases(self, only: str | None) -> list[str]:
        aliases = [
            alias
            for alias in connections.settings
            if capacity.is_pgpool_engine(connections.settings[alias])
        ]
        if only is None:
            return aliases
        if only not in connections.settings:
            raise CommandError(
                f"There is no database alias {only!r} in DATABASES "
                f"(aliases: {', '.join(connections.settings)})."
            )
        if only not in aliases:
            raise CommandError(
                f"DATABASES[{only!r}] does not use django_pgpool (ENGINE is "
                f"{connections.settings[only].get('ENGINE')!r}); set ENGINE to 'django_pgpool'."
            )
        return [only]

    def _show(self, options: dict[str, Any]) -> None:
        aliases = self._pooled_aliases(options["database"])
        failures: list[str] = []
        entries: dict[str, dict[str, Any]] = {}
        for alias in aliases:
            settings_dict = connections[alias].settings_dict
            entry: dict[str, Any] = {"database": capacity.describe_database(settings_dict)}
            entries[alias] = entry
            if not pool_is_enabled(settings_dict):
                entry["state"] = "not pooled"
                continue
            try:
                config = parse_pool_options(alias, settings_dict)
            except ImproperlyConfigured as exc:
                entry["state"] = "misconfigured"
                entry["error"] = str(exc)
                failures.append(str(exc))
                continue
            entry["config"] = config.as_dict()
            if options["open"]:
                try:
                    django_pgpool.get_pool(alias).open(wait=True, timeout=options["timeout"])
                except (psycopg2.Error, DjangoDatabaseError) as exc:
                    entry["state"] = "cannot connect"
                    entry["error"] = _first_line(exc)
                    failures.append(f"alias {alias!r}: {_first_line(exc)}")
        live = django_pgpool.stats()
        for alias, entry in entries.items():
            # Statistics of the pool this process built for the alias, if any.
            entry["stats"] = live.get(alias)
            if "state" not in entry:
                entry["state"] = "open" if alias in live else "not opened yet"

        if options["json"]:
            self.stdout.write(json.dumps({"process": os.getpid(), "aliases": entries}, indent=2))
        else:
            self._write_table(entries)
        if failures:
            raise CommandError("Some pools could not be opened:\n  " + "\n  ".join(failures))

    def _write_table(self, entries: dict[str, dict[str, Any]]) -> None:
        if not entries:
            self.stdout.write("No database alias uses ENGINE 'django_pgpool'.")
            return
        rows = [[title for title, _ in _COLUMNS]]
        for alias, entry in entries.items():
            stats = entry.get("stats")
            config = entry.get("config") or {}
            row = []
            for title, key in _COLUMNS:
                if title == "alias":
                    row.append(alias)
                elif title == "state":
                    row.append(entry["state"])
                elif title == "database":
                    row.append(entry["database"])
                elif stats is not None and key is not None:
                    row.append(str(stats[key]))
                elif title in ("min", "max") and config:
                    row.append(str(config[f"{title}_size"]))
                else:
                    row.append("-")
            rows.append(row)
        widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
        for row in rows:
            line = "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
            self.stdout.write(line.rstrip())
        if any(entry["state"] == "not opened yet" for entry in entries.values()):
            self.stdout.write(
                "\nPools belong to the process that built them; this command shows its own "
                "(use --open to build them). A running server's pools: "
                "django_pgpool.stats() in that process, or the Prometheus collector."
            )
        for alias, entry in entries.items():
            if "error" in entry:
                self.stderr.write(f"{alias}: {entry['error']}")

    # ------------------------------------------------------------------ check

    def _check(self, options: dict[str, Any]) -> None:
        alias = options["database"] or "default"
        self._pooled_aliases(alias)
        processes = options["processes"]
        if processes is None:
            try:
                processes = capacity.expected_processes()
            except ImproperlyConfigured as exc:
                raise CommandError(str(exc)) from None
        elif processes < 1:
            raise CommandError(f"--processes must be a whole number >= 1, not {processes}.")
        settings_dict = connections[alias].settings_dict
        database = capacity.describe_database(settings_dict)
        try:
            django_pgpool.get_pool(alias)
            demand = capacity.demand(alias, processes)
        except ImproperlyConfigured as exc:
            raise CommandError(str(exc)) from None

        started = time.monotonic()
        try:
            with django_pgpool.connection(alias, timeout=options["timeout"]) as conn:
                limits = capacity.read_server_limits(conn)
        except (psycopg2.Error, DjangoDatabaseError) as exc:
            if options["json"]:
                report = {"alias": alias, "database": database, "reachable": False}
                report["error"] = _first_line(exc)
                self.stdout.write(json.dumps(report, indent=2))
            raise CommandError(
                f"Alias {alias!r} cannot reach its database {database}: {_first_line(exc)}. "
                f"Check that the server runs and that HOST, PORT, NAME, USER and PASSWORD "
                f"in DATABASES[{alias!r}] are right.",
                returncode=UNREACHABLE,
            ) from None
        elapsed_ms = (time.monotonic() - started) * 1000.0
        fit = capacity.Fit(limits, demand)

        if options["json"]:
            self.stdout.write(
                json.dumps(
                    {
                        "alias": alias,
                        "database": database,
                        "reachable": True,
                        "query_ms": round(elapsed_ms, 1),
                        "server": limits.as_dict(),
                        "processes": processes,
                        "max_size": demand.max_sizes,
                        "needed": demand.total,
                        "fits": fit.fits,
                        "spare": fit.spare,
                        "largest_max_size": fit.largest_max_size,
                    },
                    indent=2,
                )
            )
        else:
            self._write_check(alias, database, elapsed_ms, fit)
        if not fit.fits:
            raise CommandError(
                f"The pools do not fit the server of alias {alias!r}: {fit.summary()}. "
                f"{fit.advice()}"
            )

    def _write_check(self, alias: str, database: str, elapsed_ms: float, fit: capacity.Fit) -> None:
        limits, demand = fit.limits, fit.demand
        reserved = (
            str(limits.reserved_connections)
            if limits.reserved_connections is not None
            else "(not in this PostgreSQL version)"
        )
        lines = [
            f"alias {alias!r}: {database}",
            f"  query through the pool           ok ({elapsed_ms:.1f} ms, "
            f"PostgreSQL {limits.server_version})",
            f"  max_connections                  {limits.max_connections}",
            f"  superuser_reserved_connections   {limits.superuser_reserved_connections}",
            f"  reserved_connections             {reserved}",
            f"  available to the application     {limits.available}",
            f"  in use on the server now         {limits.connections_in_use}",
            f"  processes                        {demand.processes}",
            f"  pools on this server             {demand.breakdown()}",
            f"  needed at most                   {demand.processes} x {demand.per_process} = "
            f"{demand.total}",
        ]
        if fit.fits:
            lines.append(
                f"  fits                             yes ({fit.spare} slot(s) to spare; "
                f"{limits.available - limits.connections_in_use} free right now)"
            )
        else:
            lines.append("  fits                             NO")
        self.stdout.write("\n".join(lines))
