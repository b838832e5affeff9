"""The pool's statistics: counters since the pool was built (``stats()``).

Names follow psycopg_pool's ``get_stats()`` where the meaning is the same, so
dashboards and habits carry over. Every counter is guarded by the pool's lock
(the pool updates the hot-path ones while it holds the lock anyway).
"""

from __future__ import annotations

import threading

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
)


class Counters:
    """A pool's counters, guarded by the pool's lock."""

    __slots__ = ("lock", "values")

    def __init__(self, lock: threading.Lock) -> None:
        self.lock = lock
        self.values: dict[str, float] = dict.fromkeys(COUNTERS, 0)

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

    def snapshot(self) -> dict[str, float]:
        """The counters, rounded for display. Lock held."""
        return {
            name: round(value, 3) if isinstance(value, float) else value
            for name, value in self.values.items()
        }
