"""``manage.py pgpool``: the pools of this process, and whether they fit the server.

``manage.py pgpool [--database ALIAS] [--open] [--json]``
    A table of every django_pgpool alias: its state, sizes and statistics.
    Pools belong to the process that built them, and a management command is
    a process of its own: without ``--open`` it has built none, so each alias
    shows as "not opened yet" with its configured sizes. ``--open`` builds
    each pool and waits for its ``min_size`` connections (a warm-up that
    fails when the database can't be reached, at once when it refuses), then
    shows them ("cannot connect" where that failed).

``manage.py pgpool --watch [--interval SECONDS] [--count N] [--server]``
    The same pools refreshed every interval (1 s), like ``top``: in use,
    idle, waiting, requests and resets per second, acquire time p50 and p99
    over the interval; with ``--server``, the server's connections to each
    database from ``pg_stat_activity``, by ``application_name``. Runs until
    interrupted, or for ``--count`` refreshes.

``manage.py pgpool check [--database ALIAS] [--processes N] [--json]``
    Runs a query through the alias's pool and reports the server's
    ``max_connections``, reserved slots and connections in use, and whether
    ``max_size`` x processes (for every pooled alias on that server) fits.
    N defaults to ``settings.PGPOOL_EXPECTED_PROCESSES`` (1). Exit status: 0
    when it fits, 1 when it doesn't (or the settings are wrong), 2 when the
    database can't be reached.

``manage.py pgpool size --machines N[,N...] --processes P[,P...] [--database ALIAS]``
    The server connections a deployment of N machines running P processes
    each may open, directly and through PgBouncer in transaction pooling (one
    on each machine, or one for all), against the server's
    ``max_connections``: read through the alias's pool as ``check`` does, or
    given with ``--max-connections`` / ``--reserved``. When the server can't
    be reached it assumes PostgreSQL's defaults and says so. ``--max-size``
    tries other values for the alias; the other pooled aliases on the same
    server count with their own.

``manage.py pgpool pause|resume|drain [--database ALIAS] [--wait SECONDS]``
    Pause, resume or drain the pools of every process of the deployment
    through ``settings.PGPOOL_CONTROL_FILE`` (:mod:`django_pgpool.control`).
    ``--wait``: wait until every process applied it (and, for ``pause``,
    finished with every connection); exit status 1 if they did not in time.
``manage.py pgpool status [--json]``
    The control file, and what each process answered: paused or not,
    connections in use, the servers its connections reach.

``manage.py pgpool replicas [--json]``
    Measure the replicas of ``settings.PGPOOL_ROUTER`` once: their state and
    lag. Exit status 1 if one of them would be skipped.
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
from django_pgpool import capacity, control, registry, routers, watch
from django_pgpool.config import parse_pool_options, pool_is_enabled
from django_pgpool.counters import enable_timings
from django_pgpool.management import common, sizing

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


class Command(BaseCommand):
    help = (
        "Show this process's django_pgpool pools (--open to build them), "
        "'check' that an alias's pool reaches its server and fits its max_connections, "
        "or 'size' a deployment of machines x processes, directly and through PgBouncer."
    )
    # A diagnostic tool: it must still run when the system checks find errors.
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument(
            "action",
            nargs="?",
            choices=("show", "check", "size", "pause", "resume", "drain", "status", "replicas"),
            default="show",
            help="'show' (default): the pools of this process; 'check': connect and "
            "compare the pool sizes with the server's max_connections; 'size': the "
            "connections of a deployment of --machines x --processes, directly and "
            "through PgBouncer; 'pause', 'resume', 'drain': the pools of every process "
            "(settings.PGPOOL_CONTROL_FILE); 'status': what every process answered; "
            "'replicas': the health and lag of the router's replicas.",
        )
        parser.add_argument(
            "--wait",
            type=float,
            metavar="SECONDS",
            help="pause, resume, drain: wait until every process applied it (pause: and "
            "finished with its connections); exit status 1 if not in time.",
        )
        parser.add_argument(
            "--database",
            metavar="ALIAS",
            help="The alias to show, check or size (check, size: 'default' unless given).",
        )
        parser.add_argument(
            "--processes",
            metavar="N",
            help="check: processes that run the project at once; size: processes on each "
            "machine, comma-separated to compare (default: "
            f"settings.{capacity.EXPECTED_PROCESSES_SETTING}, else 1).",
        )
        parser.add_argument(
            "--machines",
            metavar="N",
            default="1",
            help="size: machines running those processes, comma-separated to compare (default: 1).",
        )
        parser.add_argument(
            "--max-size",
            metavar="N",
            help="size: max_size values to try for the alias, comma-separated (default: its own).",
        )
        parser.add_argument(
            "--max-connections",
            type=int,
            metavar="N",
            help="size: the server's max_connections, instead of asking the server "
            f"(default with --reserved: {capacity.DEFAULT_MAX_CONNECTIONS}).",
        )
        parser.add_argument(
            "--reserved",
            type=int,
            metavar="N",
            help="size: superuser_reserved_connections + reserved_connections, instead of "
            f"asking the server (default with --max-connections: "
            f"{capacity.DEFAULT_SUPERUSER_RESERVED_CONNECTIONS}).",
        )
        parser.add_argument(
            "--pgbouncer-pool-size",
            type=int,
            default=20,
            metavar="N",
            help="size: PgBouncer's default_pool_size (default: 20).",
        )
        parser.add_argument(
            "--max-client-conn",
            type=int,
            default=100,
            metavar="N",
            help="size: PgBouncer's max_client_conn (default: 100).",
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
        parser.add_argument(
            "--watch",
            action="store_true",
            help="show: refresh every --interval like top (rates and acquire percentiles "
            "over each interval) until interrupted.",
        )
        parser.add_argument(
            "--interval",
            type=float,
            default=1.0,
            metavar="SECONDS",
            help="--watch: seconds between refreshes (default: 1).",
        )
        parser.add_argument(
            "--count",
            type=int,
            metavar="N",
            help="--watch: stop after N refreshes (default: until interrupted).",
        )
        parser.add_argument(
            "--server",
            action="store_true",
            help="--watch: also the server's connections (pg_stat_activity) by application_name.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["timeout"] <= 0:
            raise CommandError("--timeout must be a number of seconds > 0.")
        if options["action"] == "check":
            self._check(options)
        elif options["action"] == "size":
            self._size(options)
        elif options["action"] in ("pause", "resume", "drain", "status"):
            self._control(options)
        elif options["action"] == "replicas":
            self._replicas(options)
        elif options["watch"]:
            self._watch(options)
        else:
            self._show(options)

    # ------------------------------------------------------------------ show

    def _show(self, options: dict[str, Any]) -> None:
        aliases = common.pooled_aliases(options["database"])
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
                    entry["error"] = common.first_line(exc)
                    failures.append(f"alias {alias!r}: {common.first_line(exc)}")
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

    # ------------------------------------------------------------------ watch

    def _watch(self, options: dict[str, Any]) -> None:
        interval, count = options["interval"], options["count"]
        if interval <= 0:
            raise CommandError("--interval must be a number of seconds > 0.")
        if count is not None and count < 1:
            raise CommandError("--count must be a whole number >= 1.")
        if options["json"]:
            raise CommandError("--watch prints a table; use 'pgpool --json' for one reading.")
        aliases = common.pooled_aliases(options["database"])
        if options["open"]:
            for alias in aliases:
                django_pgpool.get_pool(alias).open(wait=True, timeout=options["timeout"])
        enable_timings()  # the acquire percentiles come from the histogram
        server = _ServerView(aliases) if options["server"] else None
        clear = "\x1b[H\x1b[2J" if self.stdout.isatty() else ""
        before = watch.take(registry.pools())
        next_at = before.at
        refreshes = 0
        try:
            while count is None or refreshes < count:
                next_at += interval
                time.sleep(max(0.0, next_at - time.monotonic()))
                after = watch.take(registry.pools())
                # On a terminal each refresh replaces the last; elsewhere they follow.
                separator = clear or ("\n" if refreshes else "")
                lines = [
                    f"{separator}django_pgpool  process {os.getpid()}  "
                    f"{time.strftime('%H:%M:%S')}  every {interval:g} s",
                    *watch.table(watch.POOL_COLUMNS, watch.pool_rows(before, after, aliases)),
                ]
                if server is not None:
                    lines += server.lines()
                self.stdout.write("\n".join(lines) + "\n")
                self.stdout.flush()
                before = after
                refreshes += 1
        except KeyboardInterrupt:
            pass
        finally:
            if server is not None:
                server.close()

    # ------------------------------------------------------------------ check

    def _check(self, options: dict[str, Any]) -> None:
        alias = options["database"] or "default"
        common.pooled_aliases(alias)
        if options["processes"] is None:
            processes = common.expected_processes()
        else:
            try:
                processes = int(options["processes"])
            except ValueError:
                processes = 0
            if processes < 1:
                raise CommandError(
                    f"--processes must be a whole number >= 1, not {options['processes']}."
                )
        settings_dict = connections[alias].settings_dict
        database = capacity.describe_database(settings_dict)
        try:
            django_pgpool.get_pool(alias)
            demand = capacity.demand(alias, processes)
        except ImproperlyConfigured as exc:
            raise CommandError(str(exc)) from None

        started = time.monotonic()
        try:
            limits = common.read_limits(alias, options["timeout"])
        except (psycopg2.Error, DjangoDatabaseError) as exc:
            if options["json"]:
                report = {"alias": alias, "database": database, "reachable": False}
                report["error"] = common.first_line(exc)
                self.stdout.write(json.dumps(report, indent=2))
            raise CommandError(
                f"Alias {alias!r} cannot reach its database {database}: {common.first_line(exc)}. "
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

    # ------------------------------------------------------------------ size

    def _size(self, options: dict[str, Any]) -> None:
        sizing.report(self.stdout, options)

    # ------------------------------------------------------------------ pause, resume, drain

    def _control(self, options: dict[str, Any]) -> None:
        path = control.configured_path()
        if path is None:
            raise CommandError(
                f"settings.{control.SETTING} is not set: name a file that every process of "
                f"the deployment can read and this command can write (for example "
                f"'/run/shop/pgpool-control.json'), then restart the processes."
            )
        action = options["action"]
        if action == "status":
            self._write_status(path, options["json"])
            return
        aliases = common.pooled_aliases(options["database"])
        state = control.change(
            path,
            aliases,
            paused={"pause": True, "resume": False}.get(action),
            drain=action == "drain",
        )
        done = {"pause": "paused", "resume": "resumed", "drain": "drained"}[action]
        what = ", ".join(repr(alias) for alias in aliases)
        self.stdout.write(f"{what} {done} in {path} (version {state.version}).")
        if options["wait"] is None:
            return
        left = control.wait_for(
            path, state.version, aliases, idle=action == "pause", timeout=options["wait"]
        )
        if left:
            raise CommandError(
                f"Not every process followed within {options['wait']:g} s: " + "; ".join(left)
            )
        processes = len(control.answers(path))
        idle = ", with no connection in use" if action == "pause" else ""
        self.stdout.write(f"Every process ({processes}) followed{idle}.")

    def _write_status(self, path: str, as_json: bool) -> None:
        state = control.read_state(path)
        answers = control.answers(path)
        if as_json:
            self.stdout.write(
                json.dumps({"control": state.as_dict(), "processes": answers}, indent=2)
            )
            return
        lines = [f"control file {path} (version {state.version})"]
        for alias, alias_state in sorted(state.aliases.items()):
            lines.append(
                f"  {alias}: {'paused' if alias_state.paused else 'running'}, "
                f"drained {alias_state.drains} time(s)"
            )
        lines.append(f"{len(answers)} process(es):")
        for answer in answers:
            for alias, info in sorted((answer.get("aliases") or {}).items()):
                servers = ", ".join(
                    f"{server} ({count})" for server, count in sorted(info["servers"].items())
                )
                lines.append(
                    f"  {answer['host']} pid {answer['pid']} version {answer['version']} "
                    f"{alias}: {'paused' if info['paused'] else 'running'}, "
                    f"{info['in_use']} in use, {info['waiting']} waiting, "
                    f"connections to {servers or 'none'}"
                )
        self.stdout.write("\n".join(lines))

    # ------------------------------------------------------------------ replicas

    def _replicas(self, options: dict[str, Any]) -> None:
        try:
            config = routers.read_settings()
        except ImproperlyConfigured as exc:
            raise CommandError(str(exc)) from None
        results = routers.ReplicaMonitor(config, log=False).measure()
        if options["json"]:
            report = {
                "primary": config.primary,
                "max_lag": config.max_lag,
                "replicas": {alias: health.as_dict() for alias, health in results.items()},
            }
            self.stdout.write(json.dumps(report, indent=2))
        else:
            lines = [f"primary {config.primary!r}, max_lag {config.max_lag:g} s"]
            for alias, health in results.items():
                lag = "-" if health.lag is None else f"{health.lag:.2f} s"
                detail = f": {health.detail}" if health.detail else ""
                lines.append(
                    f"  {alias}: {health.state}, lag {lag}, server {health.server or '-'}{detail}"
                )
            self.stdout.write("\n".join(lines))
        skipped = [alias for alias, health in results.items() if not health.healthy]
        if skipped:
            raise CommandError(f"Reads skip {', '.join(map(repr, skipped))}.")


class _ServerView:
    """What the server sees of each database the aliases use, over a connection of its own.

    Not from the pool (it would count itself), and tagged so it leaves itself out.
    """

    def __init__(self, aliases: list[str]) -> None:
        self.wrappers: dict[str, Any] = {}
        for alias in aliases:
            settings_dict = connections[alias].settings_dict
            database = capacity.describe_database(settings_dict)
            if database in self.wrappers:
                continue
            options = {
                **settings_dict["OPTIONS"],
                "pool": False,
                "application_name": "django_pgpool watch",
            }
            wrapper = type(connections[alias])({**settings_dict, "OPTIONS": options}, alias)
            self.wrappers[database] = wrapper

    def lines(self) -> list[str]:
        lines = []
        for database, wrapper in self.wrappers.items():
            lines.append(f"server: {database} (pg_stat_activity)")
            try:
                with wrapper.cursor() as cursor:
                    rows = watch.server_rows(cursor, wrapper.settings_dict["NAME"])
            except (psycopg2.Error, DjangoDatabaseError) as exc:
                lines.append(f"  unreachable: {common.first_line(exc)}")
                continue
            lines += ["  " + line for line in watch.table(watch.SERVER_COLUMNS, rows)]
        return lines

    def close(self) -> None:
        for wrapper in self.wrappers.values():
            wrapper.close()
