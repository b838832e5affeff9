"""Whether the configured pools fit their PostgreSQL server.

Every process opens up to ``max_size`` connections for each pooled alias, so
a deployment of N processes (web workers, Celery workers, cron jobs...) may
need N x ``max_size`` of the server's connection slots, for every alias that
points at that server. A server has ``max_connections`` slots, less
``superuser_reserved_connections`` (and, from PostgreSQL 16,
``reserved_connections``) kept for administrators; an application gets the rest.

N comes from the ``PGPOOL_EXPECTED_PROCESSES`` setting (default 1). The
``pgpool check`` management command and the ``django_pgpool.W002`` system
check both use this module. :class:`Deployment` spreads the processes over
machines and adds PgBouncer in transaction pooling, for ``pgpool size``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from django.core.exceptions import ImproperlyConfigured

from .config import parse_pool_options, pool_is_enabled

#: The Django setting holding how many processes run the project at once.
EXPECTED_PROCESSES_SETTING = "PGPOOL_EXPECTED_PROCESSES"

#: What PostgreSQL ships with, assumed when the server can't be asked.
DEFAULT_MAX_CONNECTIONS = 100
DEFAULT_SUPERUSER_RESERVED_CONNECTIONS = 3

# current_setting(name, true) returns NULL for a setting the server doesn't
# have: reserved_connections only exists from PostgreSQL 16.
_LIMITS_SQL = """
SELECT current_setting('max_connections')::int,
       current_setting('superuser_reserved_connections')::int,
       current_setting('reserved_connections', true)::int,
       (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')::int,
       current_setting('server_version')
"""


def is_pgpool_engine(settings_dict: Mapping[str, Any]) -> bool:
    """Whether an alias's ENGINE is django_pgpool (read from settings, nothing imported)."""
    engine = str(settings_dict.get("ENGINE") or "")
    return engine == "django_pgpool" or engine.startswith("django_pgpool.")


def describe_database(settings_dict: Mapping[str, Any]) -> str:
    """``user@host:port/name`` for messages; never the password."""
    user = settings_dict.get("USER") or ""
    host = settings_dict.get("HOST") or "(local socket)"
    port = settings_dict.get("PORT") or "5432"
    name = settings_dict.get("NAME") or ""
    return f"{user}@{host}:{port}/{name}" if user else f"{host}:{port}/{name}"


def server_key(settings_dict: Mapping[str, Any]) -> tuple[str, str]:
    """What "the same server" means here: the same HOST and PORT settings."""
    return (str(settings_dict.get("HOST") or ""), str(settings_dict.get("PORT") or ""))


def expected_processes() -> int:
    """``settings.PGPOOL_EXPECTED_PROCESSES``, validated (default 1)."""
    from django.conf import settings

    value = getattr(settings, EXPECTED_PROCESSES_SETTING, 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ImproperlyConfigured(
            f"settings.{EXPECTED_PROCESSES_SETTING} = {value!r} is invalid: it must be a whole "
            f"number >= 1, how many processes run this project against the same database "
            f"server at once (web workers plus Celery workers plus anything else), for "
            f"example 8 for 4 gunicorn workers and 4 Celery worker processes."
        )
    return value


@dataclass(frozen=True)
class ServerLimits:
    """The server's connection slots, read through a pooled connection."""

    max_connections: int
    superuser_reserved_connections: int
    reserved_connections: int | None  # None before PostgreSQL 16
    connections_in_use: int  # client backends on the whole server right now
    server_version: str

    @property
    def available(self) -> int:
        """Slots an application role (not a superuser) can take."""
        return (
            self.max_connections
            - self.superuser_reserved_connections
            - (self.reserved_connections or 0)
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "max_connections": self.max_connections,
            "superuser_reserved_connections": self.superuser_reserved_connections,
            "reserved_connections": self.reserved_connections,
            "available": self.available,
            "connections_in_use": self.connections_in_use,
            "server_version": self.server_version,
        }


def assumed_limits(
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    reserved: int = DEFAULT_SUPERUSER_RESERVED_CONNECTIONS,
) -> ServerLimits:
    """Limits that were not read from a server: given, or PostgreSQL's defaults."""
    return ServerLimits(
        max_connections=max_connections,
        superuser_reserved_connections=reserved,
        reserved_connections=None,
        connections_in_use=0,
        server_version="unknown",
    )


def read_server_limits(conn: Any) -> ServerLimits:
    """Query the server's limits and current use on a psycopg2 connection."""
    with conn.cursor() as cursor:
        cursor.execute(_LIMITS_SQL)
        row = cursor.fetchone()
    return ServerLimits(
        max_connections=int(row[0]),
        superuser_reserved_connections=int(row[1]),
        reserved_connections=None if row[2] is None else int(row[2]),
        connections_in_use=int(row[3]),
        server_version=str(row[4]),
    )


@dataclass(frozen=True)
class _PoolSizes:
    #: max_size of every pooled alias on the server, per process, the alias first.
    max_sizes: dict[str, int]

    @property
    def per_process(self) -> int:
        return sum(self.max_sizes.values())


@dataclass(frozen=True)
class Demand(_PoolSizes):
    """The most connections the pooled aliases on one server may open."""

    alias: str
    processes: int

    @property
    def total(self) -> int:
        return self.per_process * self.processes

    @property
    def others_per_process(self) -> int:
        return self.per_process - self.max_sizes[self.alias]

    def breakdown(self) -> str:
        """``max_size 8 for 'default' + 8 for 'replica'``."""
        parts = [f"{size} for {alias!r}" for alias, size in self.max_sizes.items()]
        return "max_size " + " + ".join(parts)


def demand(alias: str, processes: int) -> Demand:
    """What ``alias`` and the other pooled aliases on the same server need.

    Raises ``ImproperlyConfigured`` if ``alias`` itself is not a valid pooled
    alias; other aliases with invalid options are left out (the system
    checks report them).
    """
    from django.db import connections

    settings_dict = connections[alias].settings_dict
    max_sizes = {alias: parse_pool_options(alias, settings_dict).max_size}
    key = server_key(settings_dict)
    for other in connections.settings:
        if other == alias or not is_pgpool_engine(connections.settings[other]):
            continue
        other_settings = connections[other].settings_dict
        if server_key(other_settings) != key or not pool_is_enabled(other_settings):
            continue
        try:
            max_sizes[other] = parse_pool_options(other, other_settings).max_size
        except ImproperlyConfigured:
            continue
    return Demand(alias=alias, processes=processes, max_sizes=max_sizes)


@dataclass(frozen=True)
class Fit:
    """A :class:`Demand` held against a server's :class:`ServerLimits`."""

    limits: ServerLimits
    demand: Demand

    @property
    def fits(self) -> bool:
        return self.demand.total <= self.limits.available

    @property
    def spare(self) -> int:
        return self.limits.available - self.demand.total

    @property
    def largest_max_size(self) -> int:
        """The largest max_size for the alias that fits (0 or less: none does)."""
        return self.limits.available // self.demand.processes - self.demand.others_per_process

    def summary(self) -> str:
        d, limits = self.demand, self.limits
        reserved = f"superuser_reserved_connections {limits.superuser_reserved_connections}"
        if limits.reserved_connections:
            reserved += f" - reserved_connections {limits.reserved_connections}"
        return (
            f"{d.processes} process(es) x {d.per_process} connection(s) ({d.breakdown()}) = "
            f"{d.total} connection(s) at most, and the server takes {limits.available} "
            f"(max_connections {limits.max_connections} - {reserved})"
        )

    def advice(self) -> str:
        """How to make a demand that doesn't fit fit."""
        d = self.demand
        largest = self.largest_max_size
        others = [repr(alias) for alias in d.max_sizes if alias != d.alias]
        remedies = (
            (f"lower max_size of {', '.join(others)}, " if others else "")
            + f"raise max_connections on the server, run fewer than {d.processes} "
            f"process(es), or put PgBouncer between the processes and the server"
        )
        if largest >= 1:
            return (
                f"Lower DATABASES[{d.alias!r}]['OPTIONS']['pool']['max_size'] to {largest} or "
                f"less, {remedies}."
            )
        return f"Even max_size=1 for {d.alias!r} does not fit: {remedies}."


@dataclass(frozen=True)
class Deployment(_PoolSizes):
    """Processes spread over machines, and the server connections they may need.

    Directly on PostgreSQL (or through PgBouncer in *session* pooling, where a
    pooled connection keeps its server connection), every pooled connection is
    a server connection. Through PgBouncer in *transaction* pooling, the pools
    are PgBouncer's clients, and PostgreSQL sees at most ``default_pool_size``
    server connections per PgBouncer for each pool of PgBouncer's (one per
    database and user; counted here as one per alias).
    """

    machines: int
    processes: int  # on each machine

    @property
    def direct(self) -> int:
        """Server connections without PgBouncer: every process's every pooled connection."""
        return self.machines * self.processes * self.per_process

    def demand(self, alias: str) -> Demand:
        """The same connections as a :class:`Demand` of all processes, to hold against limits."""
        return Demand(
            alias=alias, processes=self.machines * self.processes, max_sizes=self.max_sizes
        )

    @property
    def clients_per_machine(self) -> int:
        """Client connections a PgBouncer on each machine accepts from that machine."""
        return self.processes * self.per_process

    def server_connections_per_machine(self, pgbouncer_pool_size: int) -> int:
        """Server connections of a PgBouncer on each machine, all machines together."""
        return self.machines * sum(
            min(self.processes * size, pgbouncer_pool_size) for size in self.max_sizes.values()
        )

    def server_connections_central(self, pgbouncer_pool_size: int) -> int:
        """Server connections of one PgBouncer that all machines share."""
        return sum(
            min(self.machines * self.processes * size, pgbouncer_pool_size)
            for size in self.max_sizes.values()
        )
