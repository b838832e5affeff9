"""Prometheus metrics of every pool in the process (``pip install django-pgpool[prometheus]``).

Register once per process, for example in an ``AppConfig.ready()``::

    import django_pgpool.prometheus
    django_pgpool.prometheus.register()          # on prometheus_client's REGISTRY

Each scrape reads :func:`django_pgpool.stats` and exposes one series per
database alias (label ``alias``): gauges for the pool's current state and
counters (``..._total``) for what accumulated since the pool was built. A pool
rebuilt after a settings change starts its counters again from zero, which
Prometheus treats as a counter reset. Times are in seconds, as Prometheus
wants, where the pool's statistics count milliseconds.

Pools are per process: with several worker processes, scrape each one, or
expose them per process (prometheus_client's multiprocess mode does not
aggregate custom collectors).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import REGISTRY, CollectorRegistry

import django_pgpool

_MS = 0.001


@dataclass(frozen=True)
class MetricSpec:
    """How one entry of ``ConnectionPool.stats()`` is exposed."""

    stat: str
    name: str
    documentation: str
    counter: bool = False
    scale: float = 1.0  # milliseconds are exposed as seconds


#: Every statistic of ``ConnectionPool.stats()`` and the metric it becomes
#: (counters get Prometheus' ``_total`` suffix).
METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("pool_min", "django_pgpool_min_size", "The pool's min_size."),
    MetricSpec("pool_max", "django_pgpool_max_size", "The pool's max_size."),
    MetricSpec(
        "pool_size",
        "django_pgpool_connections",
        "Server connections the pool holds (idle, in use, being opened or reset).",
    ),
    MetricSpec(
        "pool_available", "django_pgpool_connections_idle", "Connections idle, ready to hand out."
    ),
    MetricSpec(
        "pool_in_use",
        "django_pgpool_connections_in_use",
        "Connections checked out by the ORM or by raw callers.",
    ),
    MetricSpec(
        "pool_resetting",
        "django_pgpool_connections_resetting",
        "Returned connections waiting for or undergoing their session reset.",
    ),
    MetricSpec(
        "requests_waiting",
        "django_pgpool_requests_waiting",
        "Requests waiting for a connection right now.",
    ),
    MetricSpec(
        "requests_wait_max_ms",
        "django_pgpool_request_wait_max_seconds",
        "Longest wait of a request for a connection since the pool was built.",
        scale=_MS,
    ),
    MetricSpec("requests_num", "django_pgpool_requests", "Connections handed out.", counter=True),
    MetricSpec(
        "requests_queued",
        "django_pgpool_requests_queued",
        "Requests that had to wait for a connection.",
        counter=True,
    ),
    MetricSpec(
        "requests_wait_ms",
        "django_pgpool_request_wait_seconds",
        "Time requests spent waiting for a connection.",
        counter=True,
        scale=_MS,
    ),
    MetricSpec(
        "requests_errors",
        "django_pgpool_request_errors",
        "Requests that got no connection (PoolTimeout or TooManyRequests).",
        counter=True,
    ),
    MetricSpec(
        "requests_timeouts",
        "django_pgpool_request_timeouts",
        "Requests that waited timeout seconds in vain (PoolTimeout).",
        counter=True,
    ),
    MetricSpec(
        "usage_ms",
        "django_pgpool_usage_seconds",
        "Time connections spent checked out.",
        counter=True,
        scale=_MS,
    ),
    MetricSpec(
        "returns_bad",
        "django_pgpool_returns_bad",
        "Connections returned closed, broken or in the middle of a query (discarded).",
        counter=True,
    ),
    MetricSpec(
        "returns_in_transaction",
        "django_pgpool_returns_in_transaction",
        "Connections returned with a transaction still open (rolled back).",
        counter=True,
    ),
    MetricSpec(
        "connections_num",
        "django_pgpool_connections_opened",
        "Server connections opened.",
        counter=True,
    ),
    MetricSpec(
        "connections_ms",
        "django_pgpool_connect_seconds",
        "Time spent opening server connections.",
        counter=True,
        scale=_MS,
    ),
    MetricSpec(
        "connections_errors",
        "django_pgpool_connection_errors",
        "Failed attempts to open a server connection.",
        counter=True,
    ),
    MetricSpec(
        "connections_lost",
        "django_pgpool_connections_lost",
        "Connections found dead by a check.",
        counter=True,
    ),
    MetricSpec(
        "connections_closed",
        "django_pgpool_connections_closed",
        "Server connections the pool closed, for any reason.",
        counter=True,
    ),
    MetricSpec(
        "connections_expired",
        "django_pgpool_connections_expired",
        "Connections retired on reaching max_lifetime.",
        counter=True,
    ),
    MetricSpec(
        "connections_reclaimed",
        "django_pgpool_connections_reclaimed",
        "Connections taken back from threads that ended without returning them.",
        counter=True,
    ),
    MetricSpec(
        "resets_num",
        "django_pgpool_resets",
        "Session resets of returned connections.",
        counter=True,
    ),
    MetricSpec(
        "checks_num",
        "django_pgpool_checks",
        "Round-trip checks before handing out a connection.",
        counter=True,
    ),
    MetricSpec(
        "checks_failed",
        "django_pgpool_checks_failed",
        "Checks that found the connection unusable.",
        counter=True,
    ),
    MetricSpec(
        "leaks_detected",
        "django_pgpool_leaks_detected",
        "Connections held longer than leak_threshold.",
        counter=True,
    ),
    MetricSpec(
        "pins_num",
        "django_pgpool_pins",
        'Connections pinned to a thread in release="transaction" mode.',
        counter=True,
    ),
    # Role awareness and pause (roles.py, control.py).
    MetricSpec("pool_paused", "django_pgpool_paused", "1 while the pool is paused, else 0."),
    MetricSpec(
        "connections_suspect",
        "django_pgpool_connections_suspect",
        "Connections to be checked before reuse because their server changed role or went away.",
    ),
    MetricSpec(
        "server_events",
        "django_pgpool_server_events",
        "Times a server of the pool changed role or went away.",
        counter=True,
    ),
    MetricSpec(
        "connections_wrong_role",
        "django_pgpool_connections_wrong_role",
        "Connections retired because their server no longer had the role the alias asks for.",
        counter=True,
    ),
    MetricSpec(
        "statements_retried",
        "django_pgpool_statements_retried",
        "Statements run again on another connection because their server turned read-only.",
        counter=True,
    ),
)

#: What a replica alias of django_pgpool.routers.PrimaryReplicaRouter adds.
REPLICA_METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(
        "replica_lag_seconds",
        "django_pgpool_replica_lag_seconds",
        "How far the replica is behind the primary, as last measured (-1: unknown).",
    ),
    MetricSpec(
        "replica_healthy",
        "django_pgpool_replica_healthy",
        "1 while the router sends reads to the replica, 0 while it skips it.",
    ),
)

_BY_STAT = {spec.stat: spec for spec in METRICS + REPLICA_METRICS}


def _family(spec: MetricSpec) -> CounterMetricFamily | GaugeMetricFamily:
    cls = CounterMetricFamily if spec.counter else GaugeMetricFamily
    return cls(spec.name, spec.documentation, labels=["alias"])


class Collector:
    """A prometheus_client collector of every pool in the process, labelled by alias."""

    def describe(self) -> Iterator[Metric]:
        # The names, without reading any pool: lets a registry check for
        # clashes at registration.
        for spec in METRICS:
            yield _family(spec)

    def collect(self) -> Iterator[Metric]:
        stats = django_pgpool.stats()
        families = {spec.stat: _family(spec) for spec in METRICS}
        for alias, values in stats.items():
            for stat, value in values.items():
                if isinstance(value, bool) or not isinstance(value, int | float):
                    continue
                spec = _BY_STAT.get(stat)
                if spec is None:
                    # A statistic this module doesn't know yet is still exposed.
                    spec = MetricSpec(stat, f"django_pgpool_{stat}", f"Pool statistic {stat}.")
                if stat not in families:  # that, or a replica's (REPLICA_METRICS)
                    families[stat] = _family(spec)
                families[stat].add_metric([alias], value * spec.scale)
        yield from families.values()


_registered: weakref.WeakKeyDictionary[CollectorRegistry, Collector] = weakref.WeakKeyDictionary()


def register(registry: CollectorRegistry = REGISTRY) -> Collector:
    """Register a :class:`Collector` on ``registry`` (once; later calls return the first)."""
    collector = _registered.get(registry)
    if collector is None:
        collector = Collector()
        registry.register(collector)
        _registered[registry] = collector
    return collector
