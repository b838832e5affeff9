"""Prometheus metrics of every pool in the process (``pip install django-pgpool[prometheus]``).

Register once per process, for example in an ``AppConfig.ready()``::

    import django_pgpool.prometheus
    django_pgpool.prometheus.register()          # on prometheus_client's REGISTRY

One series per database alias (label ``alias``): gauges for the pool's current
state, counters (``..._total``) for what accumulated since the pool was built,
histograms of how long checkouts took (``django_pgpool_acquire_seconds``) and
how long connections were held (``django_pgpool_usage_seconds``), and discards
by reason. A pool rebuilt after a settings change starts its counters again
from zero, which Prometheus treats as a counter reset. Times are in seconds, as
Prometheus wants, where the pool's statistics count milliseconds.

Two modes, chosen by the environment as prometheus_client chooses its own:

- **One process** (the default): :class:`Collector`, a custom collector that
  reads every pool at each scrape.
- **Several processes behind one port** (gunicorn, uWSGI) with
  ``PROMETHEUS_MULTIPROC_DIR`` set: custom collectors are not aggregated
  there, so :class:`MultiProcessExporter` copies the pools' numbers into
  prometheus_client's own metrics, which write per-process files that
  ``prometheus_client.multiprocess.MultiProcessCollector`` sums at scrape
  time. A thread in each process does it every ``interval`` seconds (1 s by
  default), so a scrape is at most that old.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import REGISTRY, CollectorRegistry

from .counters import BUCKETS, Reading, enable_timings, read
from .counters import Histogram as Buckets
from .registry import pools as current_pools

if TYPE_CHECKING:
    from .pool import ConnectionPool

logger = logging.getLogger("django_pgpool")

_MS = 0.001

#: prometheus_client's multiprocess modes for gauges (see its documentation).
MultiprocessMode = Literal["livesum", "liveall", "max", "livemax", "sum", "all"]


@dataclass(frozen=True)
class MetricSpec:
    """How one entry of ``ConnectionPool.stats()`` is exposed."""

    stat: str
    name: str
    documentation: str
    counter: bool = False
    scale: float = 1.0  # milliseconds are exposed as seconds
    #: How ``MultiProcessCollector`` combines the processes' values of a gauge:
    #: ``livesum`` adds up the live processes (connections are a deployment's
    #: total, as the server sees them; ``max_size`` summed keeps
    #: ``connections_in_use / max_size`` the saturation); ``max`` keeps the
    #: longest wait any process saw.
    multiprocess_mode: MultiprocessMode = "livesum"


#: Every statistic of ``ConnectionPool.stats()`` and the metric it becomes
#: (counters get Prometheus' ``_total`` suffix), except ``usage_ms``: the
#: total time connections were held is the usage histogram's ``_sum``.
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
        multiprocess_mode="max",
    ),
    MetricSpec(
        "requests_num",
        "django_pgpool_requests",
        "Requests for a connection, served or not.",
        counter=True,
    ),
    MetricSpec(
        "requests_queued",
        "django_pgpool_requests_queued",
        "Requests that had to wait because every connection was in use.",
        counter=True,
    ),
    MetricSpec(
        "requests_wait_ms",
        "django_pgpool_request_wait_seconds",
        "Time queued requests spent waiting for a connection.",
        counter=True,
        scale=_MS,
    ),
    MetricSpec(
        "requests_errors",
        "django_pgpool_request_errors",
        "Requests that got no connection, whatever the error.",
        counter=True,
    ),
    MetricSpec(
        "requests_timeouts",
        "django_pgpool_request_timeouts",
        "Requests that waited timeout seconds in vain (PoolTimeout).",
        counter=True,
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
        "Connections found dead (by a check, or reading their reset's answer).",
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
        "resets_failed",
        "django_pgpool_resets_failed",
        "Session resets that failed (the connection was discarded).",
        counter=True,
    ),
    MetricSpec(
        "checks_num",
        "django_pgpool_checks",
        "Round-trip checks (before handing out, of suspects, keepalives).",
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
        multiprocess_mode="max",
    ),
    MetricSpec(
        "replica_healthy",
        "django_pgpool_replica_healthy",
        "1 while the router sends reads to the replica, 0 while it skips it.",
        multiprocess_mode="liveall",
    ),
)

_BY_STAT = {spec.stat: spec for spec in METRICS + REPLICA_METRICS}


@dataclass(frozen=True)
class HistogramSpec:
    """A histogram of the pool's :class:`~django_pgpool.counters.Timings`."""

    timing: Literal["acquire", "usage"]
    name: str
    documentation: str


#: The two histograms, with :data:`django_pgpool.counters.BUCKETS` (seconds)
#: as their buckets: from 1 µs, which resolves a checkout from the idle stack,
#: to 50 s.
HISTOGRAMS: tuple[HistogramSpec, ...] = (
    HistogramSpec(
        "acquire",
        "django_pgpool_acquire_seconds",
        "Time from asking the pool for a connection to getting it, waits included "
        "(requests that got none are counted in django_pgpool_request_errors_total).",
    ),
    HistogramSpec(
        "usage",
        "django_pgpool_usage_seconds",
        "Time connections were held, from checkout to return.",
    ),
)

#: Statistics exposed through a histogram instead of a metric of their own:
#: the total time connections were held is ``django_pgpool_usage_seconds_sum``.
COVERED_BY_HISTOGRAMS = frozenset({"usage_ms"})

DISCARDS_NAME = "django_pgpool_connections_discarded"
DISCARDS_DOCUMENTATION = (
    "Connections closed for a reason other than the pool closing, by reason "
    "(check_failed, max_lifetime, max_idle, drained, resized, reset_failed, "
    "closed_by_caller, interrupted, broken, other)."
)

#: Multiprocess mode only: connections in use in each live process (label ``pid``),
#: to find the one worker whose pool is exhausted while the others are idle.
PROCESS_IN_USE_NAME = "django_pgpool_process_connections_in_use"
PROCESS_IN_USE_DOCUMENTATION = "Connections checked out in each live process (label pid)."


def _family(spec: MetricSpec) -> CounterMetricFamily | GaugeMetricFamily:
    cls = CounterMetricFamily if spec.counter else GaugeMetricFamily
    return cls(spec.name, spec.documentation, labels=["alias"])


def _unknown_spec(stat: str, counter: bool) -> MetricSpec:
    # A statistic this module doesn't know yet (a counter added to the pool
    # later) is still exposed, under its own name.
    return MetricSpec(stat, f"django_pgpool_{stat}", f"Pool statistic {stat}.", counter=counter)


def read_pools() -> dict[str, Reading]:
    """Everything each current pool of the process counts, by alias."""
    return {alias: read(pool) for alias, pool in current_pools().items()}


def _bucket_samples(buckets: Buckets) -> list[tuple[str, float]]:
    """Cumulative ``(le, count)`` pairs, as Prometheus exposes a histogram."""
    samples = []
    total = 0
    for bound, count in zip((*BUCKETS, float("inf")), buckets.counts, strict=True):
        total += count
        samples.append(("+Inf" if bound == float("inf") else repr(bound), float(total)))
    return samples


class Collector:
    """A prometheus_client collector of every pool in the process, labelled by alias.

    For one process serving the metrics of its own pools; see
    :class:`MultiProcessExporter` for several.
    """

    def __init__(self) -> None:
        enable_timings()

    def describe(self) -> Iterator[Metric]:
        # The names, without reading any pool: lets a registry check for
        # clashes at registration.
        for spec in METRICS:
            yield _family(spec)
        for histogram in HISTOGRAMS:
            yield HistogramMetricFamily(histogram.name, histogram.documentation, labels=["alias"])
        yield CounterMetricFamily(DISCARDS_NAME, DISCARDS_DOCUMENTATION, labels=["alias", "reason"])

    def collect(self) -> Iterator[Metric]:
        readings = read_pools()
        families = {spec.stat: _family(spec) for spec in METRICS}
        histograms = {
            spec.timing: HistogramMetricFamily(spec.name, spec.documentation, labels=["alias"])
            for spec in HISTOGRAMS
        }
        discards = CounterMetricFamily(
            DISCARDS_NAME, DISCARDS_DOCUMENTATION, labels=["alias", "reason"]
        )
        for alias, reading in readings.items():
            for counter, values in ((False, reading.gauges), (True, reading.values)):
                for stat, value in values.items():
                    if stat in COVERED_BY_HISTOGRAMS:
                        continue
                    spec = _BY_STAT.get(stat) or _unknown_spec(stat, counter)
                    if stat not in families:  # an unknown statistic, or a replica's
                        families[stat] = _family(spec)
                    families[stat].add_metric([alias], value * spec.scale)
            timings = reading.timings
            if timings is not None:
                for histogram in HISTOGRAMS:
                    buckets = getattr(timings, histogram.timing)
                    histograms[histogram.timing].add_metric(
                        [alias], _bucket_samples(buckets), sum_value=buckets.sum
                    )
            for reason, count in sorted(reading.discards.items()):
                discards.add_metric([alias, reason], count)
        yield from families.values()
        yield from histograms.values()
        yield discards


_registered: weakref.WeakKeyDictionary[CollectorRegistry, Collector] = weakref.WeakKeyDictionary()


def multiprocess_mode() -> bool:
    """Whether prometheus_client runs in multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set)."""
    # The lower-case name is the one older prometheus_client versions read.
    return bool(
        os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir")  # noqa: SIM112
    )


def register(
    registry: CollectorRegistry = REGISTRY, *, interval: float = 1.0
) -> Collector | MultiProcessExporter:
    """Expose the pools' metrics (once per registry and process; later calls return the first).

    One process: registers a :class:`Collector` on ``registry``. With
    ``PROMETHEUS_MULTIPROC_DIR`` set: starts this process's
    :class:`MultiProcessExporter` instead, which writes every ``interval``
    seconds where ``MultiProcessCollector`` finds it (``registry`` is not used:
    scrapes read the multiprocess directory).
    """
    if multiprocess_mode():
        return start_multiprocess_exporter(interval)
    collector = _registered.get(registry)
    if collector is None:
        collector = Collector()
        registry.register(collector)
        _registered[registry] = collector
    return collector


# ---------------------------------------------------------------------- multiprocess mode


class MultiProcessExporter:
    """Copies every pool's numbers into prometheus_client's own metrics, for multiprocess mode.

    With ``PROMETHEUS_MULTIPROC_DIR`` set, prometheus_client's metric objects
    keep their values in memory-mapped files, one per process, which
    ``MultiProcessCollector`` combines at scrape time: counters and histograms
    are summed over every process that ever ran (dead ones included, so
    nothing counted is lost when a worker is recycled), and gauges as their
    ``multiprocess_mode`` says. A thread (``pgpool-prometheus``) reads each
    pool every ``interval`` seconds (under the pool's lock, a copy of a few
    dozen numbers) and adds what changed since its last read; the request path
    does nothing more than with one process. In a forked child (gunicorn
    ``--preload``) the thread starts again for the child's own pools. At exit
    it writes once more, with the process's gauges at zero.
    """

    def __init__(self, interval: float = 1.0) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be a number of seconds > 0, not {interval!r}")
        enable_timings()
        self.interval = interval
        self._gauges: dict[str, Gauge] = {}
        self._counters: dict[str, Counter] = {}
        self._histograms = {
            spec.timing: Histogram(
                spec.name, spec.documentation, ["alias"], buckets=BUCKETS, registry=None
            )
            for spec in HISTOGRAMS
        }
        self._discards = Counter(
            DISCARDS_NAME, DISCARDS_DOCUMENTATION, ["alias", "reason"], registry=None
        )
        self._process_in_use = Gauge(
            PROCESS_IN_USE_NAME,
            PROCESS_IN_USE_DOCUMENTATION,
            ["alias"],
            multiprocess_mode="liveall",
            registry=None,
        )
        for spec in METRICS:
            if spec.stat not in COVERED_BY_HISTOGRAMS:
                self._metric(spec)
        # What was last written, per pool: the next write adds what changed since.
        self._written: weakref.WeakKeyDictionary[ConnectionPool, tuple[str, Reading]] = (
            weakref.WeakKeyDictionary()
        )
        self._aliases: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _metric(self, spec: MetricSpec) -> Counter | Gauge:
        if spec.counter:
            counter = self._counters.get(spec.stat)
            if counter is None:
                counter = Counter(spec.name, spec.documentation, ["alias"], registry=None)
                self._counters[spec.stat] = counter
            return counter
        gauge = self._gauges.get(spec.stat)
        if gauge is None:
            gauge = Gauge(
                spec.name,
                spec.documentation,
                ["alias"],
                multiprocess_mode=spec.multiprocess_mode,
                registry=None,
            )
            self._gauges[spec.stat] = gauge
        return gauge

    # ------------------------------------------------------------------ writing

    def flush(self) -> None:
        """Write what the pools counted since the last flush (and their gauges now)."""
        with self._lock:
            pools = current_pools()
            current = {id(pool) for pool in pools.values()}
            for alias, pool in pools.items():
                self._write(alias, pool, gauges=True)
                self._aliases.add(alias)
            # A pool closed or replaced since the last flush: what it counted
            # before it went is written too, then it is forgotten.
            for pool, (alias, _) in list(self._written.items()):
                if id(pool) not in current:
                    self._write(alias, pool, gauges=False)
                    del self._written[pool]
            for alias in self._aliases - set(pools):
                self._zero_gauges(alias)
            self._aliases &= set(pools)

    def _write(self, alias: str, pool: ConnectionPool, *, gauges: bool) -> None:
        reading = read(pool)
        earlier = self._written.get(pool)
        before = earlier[1] if earlier is not None else None
        for counter, values in ((False, reading.gauges), (True, reading.values)):
            for stat, value in values.items():
                if stat in COVERED_BY_HISTOGRAMS:
                    continue
                spec = _BY_STAT.get(stat) or _unknown_spec(stat, counter)
                metric = self._metric(spec)
                if spec.counter:
                    # labels() even without a change: the series exists from the
                    # start, at 0, so that increase() sees its first step.
                    child = metric.labels(alias)
                    delta = value - (before.values.get(stat, 0) if before is not None else 0)
                    if delta > 0:
                        child.inc(delta * spec.scale)
                elif gauges:
                    assert isinstance(metric, Gauge)
                    metric.labels(alias).set(value * spec.scale)
        if gauges:
            self._process_in_use.labels(alias).set(reading.gauges.get("pool_in_use", 0))
        for reason, count in reading.discards.items():
            delta = count - (before.discards.get(reason, 0) if before is not None else 0)
            if delta > 0:
                self._discards.labels(alias, reason).inc(delta)
        if reading.timings is not None:
            earlier_timings = before.timings if before is not None else None
            for histogram in HISTOGRAMS:
                buckets = getattr(reading.timings, histogram.timing)
                then = getattr(earlier_timings, histogram.timing) if earlier_timings else None
                observed = self._histograms[histogram.timing].labels(alias)
                _add_observations(observed, buckets.since(then))
        self._written[pool] = (alias, reading)

    def _zero_gauges(self, alias: str) -> None:
        for stat, gauge in self._gauges.items():
            spec = _BY_STAT.get(stat)
            if spec is None or spec.multiprocess_mode.startswith("live"):
                gauge.labels(alias).set(0)
        self._process_in_use.labels(alias).set(0)

    # ------------------------------------------------------------------ the thread

    def start(self) -> None:
        """Start writing every ``interval`` seconds in this process (idempotent)."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._run, name="pgpool-prometheus", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        stop = self._stop
        while not stop.wait(self.interval):
            try:
                self.flush()
            except Exception:
                logger.exception("django_pgpool: writing the Prometheus metrics failed")

    def stop(self) -> None:
        """Stop the thread, and write a last time with this process's gauges at zero."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5.0)
        self.flush()
        with self._lock:
            for alias in self._aliases:
                self._zero_gauges(alias)

    def _before_fork(self) -> None:
        # Never fork in the middle of a write: the child would inherit
        # prometheus_client's lock held by a thread it doesn't have.
        self._lock.acquire()

    def _after_fork_in_parent(self) -> None:
        self._lock.release()

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()
        # The parent's pools are not the child's (its own start from zero,
        # and prometheus_client starts files of its own for this process).
        self._written = weakref.WeakKeyDictionary()
        self._aliases = set()
        if self._thread is not None:
            self._thread = None
            self.start()


def _add_observations(child: Histogram, delta: Buckets) -> None:
    """Add counted observations to a prometheus_client histogram, bucket by bucket.

    prometheus_client's public API observes one value at a time; the pool has
    already sorted them into the same buckets, so their counts are added to
    the histogram's per-bucket values directly (non-cumulative there, as
    ``observe()`` keeps them).
    """
    values = getattr(child, "_buckets", None)
    if values is None or len(values) != len(delta.counts) or not hasattr(child, "_sum"):
        raise RuntimeError(
            "this version of prometheus_client keeps histograms differently than "
            "django_pgpool expects; please report it with the version installed"
        )
    for value, count in zip(values, delta.counts, strict=True):
        if count:
            value.inc(count)
    if delta.sum:
        child._sum.inc(delta.sum)


_exporter: MultiProcessExporter | None = None
_exporter_lock = threading.Lock()


def start_multiprocess_exporter(interval: float = 1.0) -> MultiProcessExporter:
    """This process's :class:`MultiProcessExporter`, started (the first call's ``interval``)."""
    global _exporter
    with _exporter_lock:
        if _exporter is None:
            exporter = MultiProcessExporter(interval)
            if hasattr(os, "register_at_fork"):
                os.register_at_fork(
                    before=exporter._before_fork,
                    after_in_parent=exporter._after_fork_in_parent,
                    after_in_child=exporter._after_fork_in_child,
                )
            atexit.register(exporter.stop)
            _exporter = exporter
        exporter = _exporter
    exporter.start()
    return exporter
