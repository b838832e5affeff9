"""The pool's statistics: counters since the pool was built (``stats()``).

Names follow psycopg_pool's ``get_stats()`` where the meaning is the same, so
dashboards and habits carry over. Every counter is guarded by the pool's lock
(the pool updates the hot-path ones while it holds the lock anyway).

Beside the counters, two histograms with fixed, log-spaced buckets (as
HikariCP's Micrometer metrics have): how long each checkout took
(``acquire``: from ``getconn()`` being called to the connection being handed
out, waits included) and how long each connection was held (``usage``). They
cost a few hundred nanoseconds per checkout and return, so they are kept only once
something reads them (:func:`enable_timings`: the Prometheus exporter,
``manage.py pgpool --watch``); until then the pool does not even read the clock
for them.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING

from . import process

if TYPE_CHECKING:
    from .pool import ConnectionPool

#: Counters, in the order ``stats()`` reports them (after the gauges).
COUNTERS = (
    "requests_num",
    "requests_queued",
    "requests_wait_ms",
    "requests_wait_max_ms",
    "requests_errors",
    "requests_timeouts",
    "usage_ms",
    "returns_bad",
    "returns_in_transaction",
    "connections_num",
    "connections_ms",
    "connections_errors",
    "connections_lost",
    "connections_closed",
    "connections_expired",
    "connections_reclaimed",
    "resets_num",
    "resets_failed",
    "checks_num",
    "checks_failed",
    "leaks_detected",
    "pins_num",
)

#: Upper bounds (seconds) of the histograms' buckets: 1, 2.5 and 5 per decade
#: from 1 µs (a checkout from the idle stack takes a few) to 50 s (longer than
#: any sensible ``timeout``); above the last, the ``+Inf`` bucket.
BUCKETS: tuple[float, ...] = tuple(
    float(f"{mantissa}e{exponent}") for exponent in range(-6, 2) for mantissa in ("1", "2.5", "5")
)

#: Kinds of discard, from the reason the pool gives for closing a connection
#: (``connection_discarded``'s ``reason``): the first kind whose words appear
#: in the reason. Closing with the pool is not a discard.
DISCARD_KINDS: tuple[tuple[str, str], ...] = (
    ("the pool was closed", ""),
    ("check", "check_failed"),
    ("max_lifetime", "max_lifetime"),
    ("max_idle", "max_idle"),
    ("drained", "drained"),
    ("resized", "resized"),
    ("reset", "reset_failed"),
    ("caller", "closed_by_caller"),
    ("interrupted", "interrupted"),
    ("broken", "broken"),
    ("middle of a query", "broken"),
    ("its server went away", "server_gone"),
    ("role the alias asks for", "wrong_role"),
)


def discard_kind(reason: str) -> str:
    """The kind of discard a closing reason is ("" for the pool closing), for a metric label."""
    for words, kind in DISCARD_KINDS:
        if words in reason:
            return kind
    return "other"


class Histogram:
    """Counts per bucket of :data:`BUCKETS` (the last one ``+Inf``) and their sum, in seconds."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        """Count one duration. Lock held."""
        # bisect_left: a duration equal to a bound belongs to that bound's
        # bucket (Prometheus' "le").
        self.counts[bisect_left(BUCKETS, seconds)] += 1
        self.sum += seconds

    def copy(self) -> Histogram:
        copy = Histogram()
        copy.counts = list(self.counts)
        copy.sum = self.sum
        return copy

    @property
    def count(self) -> int:
        return sum(self.counts)

    def since(self, earlier: Histogram | None) -> Histogram:
        """The observations made after ``earlier`` (a copy of this one taken before)."""
        if earlier is None:
            return self.copy()
        delta = Histogram()
        delta.counts = [now - then for now, then in zip(self.counts, earlier.counts, strict=True)]
        delta.sum = self.sum - earlier.sum
        return delta

    def quantile(self, q: float) -> float | None:
        """The ``q`` quantile (0 < q < 1) in seconds, interpolated within its bucket as
        Prometheus' ``histogram_quantile()`` does; None without observations."""
        return bucket_quantile(self.counts, q)


def bucket_quantile(counts: Sequence[float], q: float) -> float | None:
    """``histogram_quantile`` over per-bucket counts of :data:`BUCKETS` (+Inf last)."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    seen = 0.0
    for index, count in enumerate(counts):
        if count and seen + count >= rank:
            if index == len(BUCKETS):
                return BUCKETS[-1]  # in +Inf: all that can be said is "above the last bound"
            lower = BUCKETS[index - 1] if index else 0.0
            return lower + (BUCKETS[index] - lower) * (rank - seen) / count
        seen += count
    return BUCKETS[-1]


class Timings:
    """A pool's acquire-time and usage-time histograms, guarded by the pool's lock.

    A checkout takes no lock to be counted: its acquire time is appended to
    ``acquired`` (a deque: thread-safe without the lock) and sorted into its
    bucket by the next return, which holds the pool's lock anyway, or by the
    next reader. So every reader sees every checkout made before it read, and
    a checkout costs an append.
    """

    __slots__ = ("acquire", "acquired", "usage")

    def __init__(self) -> None:
        self.acquire = Histogram()
        self.usage = Histogram()
        #: Acquire times (seconds) not yet in ``acquire``.
        self.acquired: deque[float] = deque()

    def returned_locked(self, held: float) -> None:
        """A connection was held this long; also counts the pending acquire times. Lock held."""
        usage = self.usage
        usage.counts[bisect_left(BUCKETS, held)] += 1
        usage.sum += held
        if self.acquired:
            self.count_acquired_locked()

    def count_acquired_locked(self) -> None:
        """Sort the pending acquire times into their buckets. Lock held."""
        acquired, acquire = self.acquired, self.acquire
        counts = acquire.counts
        while acquired:
            seconds = acquired.popleft()
            counts[bisect_left(BUCKETS, seconds)] += 1
            acquire.sum += seconds

    def copy(self) -> Timings:
        """A copy, every pending acquire time counted. Lock held."""
        self.count_acquired_locked()
        copy = Timings()
        copy.acquire = self.acquire.copy()
        copy.usage = self.usage.copy()
        return copy


class Reading:
    """Everything a pool counts, read in one locked step (for exporters)."""

    __slots__ = ("discards", "gauges", "timings", "values")

    def __init__(
        self,
        gauges: dict[str, int],
        values: dict[str, float],
        discards: dict[str, int],
        timings: Timings | None,
    ) -> None:
        self.gauges = gauges
        self.values = values
        self.discards = discards
        self.timings = timings


class Counters:
    """A pool's counters, guarded by the pool's lock."""

    __slots__ = ("discards", "lock", "timings", "values")

    def __init__(self, lock: threading.Lock) -> None:
        self.lock = lock
        self.values: dict[str, float] = dict.fromkeys(COUNTERS, 0)
        #: Connections discarded, by :func:`discard_kind`.
        self.discards: dict[str, int] = {}
        #: The histograms, once :func:`enable_timings` was called (None until then).
        self.timings: Timings | None = Timings() if _timings_enabled else None

    def add(self, name: str, amount: float = 1) -> None:
        """Add to a counter. Never call with the pool's lock held (use ``values``)."""
        with self.lock:
            self.values[name] += amount

    def record_wait(self, waited_ms: float) -> None:
        """A request waited this long for its connection. Lock held."""
        values = self.values
        values["requests_wait_ms"] += waited_ms
        if waited_ms > values["requests_wait_max_ms"]:
            values["requests_wait_max_ms"] = waited_ms

    def closed(self, reason: str) -> None:
        """A server connection was closed for ``reason``. Never call with the lock held."""
        kind = discard_kind(reason)
        with self.lock:
            self.values["connections_closed"] += 1
            if kind:
                self.discards[kind] = self.discards.get(kind, 0) + 1

    def snapshot(self) -> dict[str, float]:
        """The counters, rounded for display. Lock held."""
        return {
            name: round(value, 3) if isinstance(value, float) else value
            for name, value in self.values.items()
        }

    def read_locked(self, gauges: dict[str, int]) -> Reading:
        """A copy of everything counted, with the pool's ``gauges``. Lock held."""
        timings = self.timings
        return Reading(
            gauges,
            dict(self.values),
            dict(self.discards),
            None if timings is None else timings.copy(),
        )


def read(pool: ConnectionPool) -> Reading:
    """Everything ``pool`` counts, with its gauges, read in one locked step."""
    slots = pool.slots
    with slots.lock:
        reading = pool.counters.read_locked(slots.gauges_locked())
    # Role awareness counts apart (roles.py): its counters, and its gauges
    # (connections_suspect, a replica's lag and health).
    from .roles import COUNTERS as ROLE_COUNTERS

    for name, value in pool.roles.stats().items():
        if name in ROLE_COUNTERS:
            reading.values[name] = value
        else:
            reading.gauges[name] = value  # type: ignore[assignment]
    return reading


_timings_enabled = False
_enable_lock = threading.Lock()


def enable_timings() -> None:
    """Keep the acquire-time and usage-time histograms in every pool of the process
    from now on (idempotent). Costs a few hundred nanoseconds per checkout."""
    global _timings_enabled
    with _enable_lock:
        if _timings_enabled:
            return
        _timings_enabled = True
        for pool in process.live_pools():
            attach_timings(pool.counters)
        from . import observers  # which imports this module

        observers.watch()


def attach_timings(counters: Counters) -> None:
    """Give a pool's counters their histograms (a pool built while timings were switched on)."""
    with counters.lock:
        if counters.timings is None:
            counters.timings = Timings()


def timings_enabled() -> bool:
    return _timings_enabled
